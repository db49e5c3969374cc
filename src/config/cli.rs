//! The command line: the commands keel runs, and which services a process serves.

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
use clap::{Parser, Subcommand};

use super::Settings;
use crate::domain::Domain;
use crate::registry;

/// keel: a mesh of gRPC services with client-side load balancing, fronted by a REST translator.
#[derive(Debug, Parser)]
#[command(name = "keel", version, about, propagate_version = true)]
pub struct Cli {
    /// Settings shared by every command.
    #[command(flatten)]
    pub settings: Settings,
    /// What to run; `dev` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// What the `keel` binary runs.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Every service in one process with embedded stores by default (the default command).
    Dev,
    /// One service, or the REST gateway alone in front of services elsewhere.
    Serve {
        /// The service to run.
        #[arg(value_parser = served())]
        service: Served,
    },
    /// Applies every service's database migrations and exits.
    Migrate,
    /// Runs jobs only (no gRPC, no REST): any number of these, on any machine, share the queue.
    Worker,
    /// Lists, rotates or removes the keys that sign access tokens (in KEEL_SIGNING_KEY when it
    /// is a directory, else the development keys under the data dir).
    Keys {
        /// What to do with them.
        #[command(subcommand)]
        action: KeysAction,
    },
    /// Acts on user accounts as the operator, outside the API.
    Users {
        /// What to do.
        #[command(subcommand)]
        action: UsersAction,
    },
    /// Writes a development CA and a certificate per service for mTLS, then exits.
    #[cfg(feature = "dev-certs")]
    DevCerts {
        /// Where to write the PEM files.
        #[arg(long, default_value = "./.keel/certs")]
        out: PathBuf,
    },
}

/// What `keel keys` does.
#[derive(Debug, Clone, Subcommand)]
pub enum KeysAction {
    /// Every live key, oldest first; the last signs.
    List,
    /// Adds a new key that signs from identity's next reload; the others keep verifying.
    Rotate,
    /// Removes a key: tokens it signed stop verifying once verifiers refresh their key set.
    Remove {
        /// The key id (`kid`) to remove. A thumbprint may begin with `-`; it is still the id.
        #[arg(allow_hyphen_values = true)]
        kid: String,
    },
}

/// What `keel users` does.
#[derive(Debug, Clone, Subcommand)]
pub enum UsersAction {
    /// Makes the user registered with `email` an admin: how a production deploy gets its first
    /// one (no one becomes an admin by registering first there).
    GrantAdmin {
        /// The e-mail the user registered with (matched without regard to case).
        email: String,
        /// Grant it even though the address was never confirmed with its mailed code: anyone
        /// can register any address, so only when you know whose account it is.
        #[arg(long)]
        unconfirmed: bool,
    },
}

/// What `keel serve` runs: one registered service, or the gateway alone.
#[derive(Clone, Copy)]
pub enum Served {
    /// One service of [`registry::DOMAINS`].
    Domain(&'static Domain),
    /// The REST gateway only, calling the services at their `--<service>-endpoints`.
    Gateway,
}

impl std::fmt::Debug for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Served {
    /// The services this process runs itself (none for the gateway alone).
    pub fn domains(self) -> Vec<&'static Domain> {
        match self {
            Served::Domain(domain) => vec![domain],
            Served::Gateway => Vec::new(),
        }
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Served::Domain(domain) => domain.name,
            Served::Gateway => "gateway",
        }
    }
}

/// `keel serve`'s argument: a registered service's name, or `gateway`.
fn served() -> impl clap::builder::TypedValueParser<Value = Served> {
    let names = registry::DOMAINS
        .iter()
        .map(|d| PossibleValue::new(d.name).help(d.about))
        .chain([PossibleValue::new("gateway")
            .help("The REST gateway only, calling the services at their --<service>-endpoints")]);
    PossibleValuesParser::new(names).map(|name| match registry::named(&name) {
        Some(domain) => Served::Domain(domain),
        None => Served::Gateway,
    })
}
