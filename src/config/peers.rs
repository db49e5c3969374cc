//! `--<service>-endpoints` / `KEEL_<SERVICE>_ENDPOINTS` for every service: where a peer lives
//! when it is not in this process. The names are [`SERVICES`], which a test holds equal to the
//! registry's (the settings name no service module, so that no import runs back through it).

use std::collections::BTreeMap;

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};
use keel_mesh::client::Target;

/// The services a process may be told the endpoints of: the registry's names, in its order.
pub const SERVICES: &[&str] = &["identity", "todos", "catalog", "payments", "orders", "jobs"];

/// Each peer service's endpoints, by service name, for those that were given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerEndpoints(BTreeMap<&'static str, Target>);

impl PeerEndpoints {
    /// Where `service` lives, if its endpoints were given.
    pub fn get(&self, service: &str) -> Option<&Target> {
        self.0.get(service)
    }

    /// Sets where `service` lives.
    pub fn set(&mut self, service: &'static str, target: Target) {
        self.0.insert(service, target);
    }

    /// Every service with endpoints, with them.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Target)> {
        self.0.iter().map(|(name, target)| (*name, target))
    }
}

fn id(service: &str) -> String {
    format!("{service}_endpoints")
}

impl Args for PeerEndpoints {
    fn augment_args(command: Command) -> Command {
        SERVICES.iter().fold(command, |command, &name| {
            command.arg(
                Arg::new(id(name))
                    .long(format!("{name}-endpoints"))
                    .env(format!("KEEL_{}_ENDPOINTS", name.to_uppercase()))
                    .value_name("ENDPOINTS")
                    .value_parser(clap::value_parser!(Target))
                    .global(true)
                    .help(format!(
                        "Where {name} lives when not in this process: `host:port,host:port` or \
                         `dns:///name:port`"
                    )),
            )
        })
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
}

impl FromArgMatches for PeerEndpoints {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(Self(
            SERVICES
                .iter()
                .filter_map(|&name| {
                    matches
                        .get_one::<Target>(&id(name))
                        .map(|target| (name, target.clone()))
                })
                .collect(),
        ))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}
