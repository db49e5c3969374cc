//! The command line: the commands keel runs, and which services a process serves.

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser as _};
use clap::{Parser, Subcommand};

use crate::config::Settings;
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

impl Cli {
    /// Whether the process this command starts signs access tokens (a serving process with
    /// identity in it, or with nothing saying where identity runs); `keel worker`, `migrate`,
    /// `keys`, `users` and `probe` never do.
    pub fn signs_tokens(&self) -> bool {
        let settings = &self.settings;
        match &self.command {
            None | Some(Command::Dev) => crate::app::signs_tokens(settings, registry::DOMAINS),
            Some(Command::Serve { service }) => {
                crate::app::signs_tokens(settings, &service.domains())
            }
            Some(_) => false,
        }
    }

    /// Every check of the settings that can be made before starting: [`Settings::validate`],
    /// and the signing key if this process signs.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        self.settings.validate()?;
        self.settings.validate_signing(self.signs_tokens())
    }
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
    /// Asks the keel listening on this host's admin port (KEEL_ADMIN_ADDR) whether it is ready
    /// (`GET /readyz`); exits 0 if it is, 1 if not: the container image's health check.
    Probe,
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use clap::CommandFactory as _;

    use super::*;
    use crate::config::*;
    use keel_mesh::client::Target;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("keel").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_serve_the_embedded_mode() {
        let cli = parse(&[]).unwrap();
        assert!(cli.command.is_none());
        let s = Settings::defaults();
        assert_eq!(s.listen.grpc_addr.to_string(), "127.0.0.1:50051");
        assert_eq!(s.listen.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.listen.admin_addr.to_string(), "127.0.0.1:9090");
        assert_eq!(s.stores.data_dir, PathBuf::from("./.keel"));
        assert_eq!(s.operations.shutdown_grace, Duration::from_secs(10));
        assert_eq!(s.identity.access_token_ttl, Duration::from_secs(15 * 60));
        assert!(s.validate().is_ok());
    }

    /// A key id is a base64url thumbprint, which may begin with `-`: it is still the id, not a
    /// flag (one in sixty-four keys could not be removed).
    #[test]
    fn a_key_id_that_begins_with_a_hyphen_is_a_key_id() {
        let cli = parse(&["keys", "remove", "-6Qm0"]).unwrap();
        let Some(Command::Keys {
            action: KeysAction::Remove { kid },
        }) = cli.command
        else {
            panic!("not keys remove: {:?}", cli.command);
        };
        assert_eq!(kid, "-6Qm0");
    }

    #[test]
    fn flags_work_after_the_subcommand() {
        let cli = parse(&[
            "serve",
            "identity",
            "--grpc-addr",
            "0.0.0.0:7000",
            "--admin-emails",
            "a@x.io,b@x.io",
        ])
        .unwrap();
        let Some(Command::Serve { service }) = cli.command else {
            panic!("serve identity");
        };
        assert_eq!(service.name(), "identity");
        assert_eq!(cli.settings.listen.grpc_addr.to_string(), "0.0.0.0:7000");
        assert_eq!(cli.settings.identity.admin_emails, vec!["a@x.io", "b@x.io"]);
    }

    #[test]
    fn every_registered_service_can_be_served_alone() {
        for domain in registry::DOMAINS {
            let cli = parse(&["serve", domain.name]).unwrap();
            let Some(Command::Serve { service }) = cli.command else {
                panic!("serve {}", domain.name);
            };
            assert_eq!(service.domains(), vec![*domain]);
        }
        let gateway = parse(&["serve", "gateway"]).unwrap();
        assert!(matches!(
            gateway.command,
            Some(Command::Serve {
                service: Served::Gateway
            })
        ));
    }

    #[test]
    fn production_refuses_embedded_stores_and_generated_keys() {
        let base = ["--env", "production"];
        let s = parse(&base).unwrap().settings;
        assert!(matches!(
            s.validate(),
            Err(ConfigError::ProductionWithoutDatabase)
        ));
        let s = parse(
            &[
                &base[..],
                &[
                    "--database-url",
                    "postgres://x/y",
                    "--redis-url",
                    "redis://x",
                ],
            ]
            .concat(),
        )
        .unwrap()
        .settings;
        assert!(matches!(
            s.validate(),
            Err(ConfigError::ProductionWithoutServiceSecret)
        ));
        assert!(
            s.validate_signing(false).is_ok(),
            "a process that does not sign needs no key"
        );
        assert!(matches!(
            s.validate_signing(true),
            Err(ConfigError::ProductionWithoutSigningKey)
        ));
    }

    #[test]
    fn a_job_limit_is_a_number_or_unlimited_which_lifts_a_kinds_default() {
        let settings = parse(&["--job-limits", "email.send=4,noop=unlimited"])
            .unwrap()
            .settings;
        assert_eq!(settings.workers.limit("email.send"), Some(Some(4)));
        assert_eq!(settings.workers.limit("noop"), Some(None));
        assert_eq!(settings.workers.limit("order.saga"), None);
        for refused in ["noop=0", "noop=-1", "noop=many", "noop"] {
            assert!(parse(&["--job-limits", refused]).is_err(), "{refused}");
        }
    }

    #[test]
    fn a_kinds_own_slots_are_a_number_or_shared() {
        let settings = parse(&["--job-concurrency", "order.saga=64,email.send=shared"])
            .unwrap()
            .settings;
        assert_eq!(settings.workers.slots("order.saga"), Some(Some(64)));
        assert_eq!(settings.workers.slots("email.send"), Some(None));
        assert_eq!(settings.workers.slots("noop"), None);
        for refused in ["order.saga=0", "order.saga=unlimited", "order.saga"] {
            assert!(parse(&["--job-concurrency", refused]).is_err(), "{refused}");
        }
    }

    #[test]
    fn a_job_retention_or_live_job_quota_of_nothing_is_refused() {
        for args in [
            ["--job-retention", "0s"],
            ["--dead-job-retention", "0s"],
            ["--job-live-per-caller", "0"],
        ] {
            let settings = parse(&args).unwrap().settings;
            assert!(
                matches!(settings.validate(), Err(ConfigError::Zero(_))),
                "{args:?}"
            );
        }
        let kept = parse(&["--job-retention", "2h"]).unwrap().settings;
        assert_eq!(
            kept.workers.retention().succeeded,
            std::time::Duration::from_secs(7200)
        );
    }

    #[test]
    fn https_on_the_rest_port_needs_both_files() {
        let cert = parse(&["--http-tls-cert", "rest.pem"]).unwrap().settings;
        assert!(matches!(cert.validate(), Err(ConfigError::PartialHttpTls)));
        let key = parse(&["--http-tls-key", "rest-key.pem"]).unwrap().settings;
        assert!(matches!(key.validate(), Err(ConfigError::PartialHttpTls)));
        let both = [
            "--http-tls-cert",
            "rest.pem",
            "--http-tls-key",
            "rest-key.pem",
        ];
        assert!(parse(&both).unwrap().settings.validate().is_ok());
    }

    #[test]
    fn peers_and_replicas_are_flags() {
        let cli = parse(&[
            "serve",
            "gateway",
            "--identity-endpoints",
            "127.0.0.1:7001,127.0.0.1:7002",
            "--catalog-endpoints",
            "dns:///catalog:50051",
            "--replicas",
            "3",
            "--connections-per-endpoint",
            "2",
        ])
        .unwrap();
        let mesh = &cli.settings.mesh;
        assert_eq!(
            mesh.endpoints.get("identity"),
            Some(&Target::Static(vec![
                "127.0.0.1:7001".into(),
                "127.0.0.1:7002".into()
            ]))
        );
        assert_eq!(
            mesh.endpoints.get("catalog"),
            Some(&Target::Dns("catalog:50051".into()))
        );
        assert_eq!(mesh.endpoints.get("todos"), None);
        assert_eq!(mesh.replicas, 3);
        assert_eq!(mesh.connections_per_endpoint, 2);
        assert!(cli.settings.validate().is_ok());
        let zero = parse(&["--replicas", "0"]).unwrap().settings;
        assert!(matches!(zero.validate(), Err(ConfigError::Replicas(0))));
        let none = parse(&["--connections-per-endpoint", "0"])
            .unwrap()
            .settings;
        assert!(matches!(none.validate(), Err(ConfigError::Zero(_))));
    }

    #[test]
    fn every_registered_service_has_a_peer_flag_and_variable() {
        let command = Cli::command();
        for domain in registry::DOMAINS {
            let id = format!("{}_endpoints", domain.name);
            let arg = command
                .get_arguments()
                .find(|a| a.get_id().as_str() == id)
                .unwrap_or_else(|| panic!("no --{}-endpoints", domain.name));
            assert_eq!(
                arg.get_long(),
                Some(format!("{}-endpoints", domain.name).as_str())
            );
            assert_eq!(
                arg.get_env().and_then(|e| e.to_str()),
                Some(format!("KEEL_{}_ENDPOINTS", domain.name.to_uppercase()).as_str())
            );
        }
    }

    #[test]
    fn store_credentials_never_print() {
        let cli = parse(&[
            "--database-url",
            "postgres://keel:pg-s3cret@db:5432/keel?sslmode=require&password=other-s3cret",
            "--redis-url",
            "redis://:redis-s3cret@cache:6379/0",
        ])
        .unwrap();
        let printed = format!("{:?}", cli.settings);
        for secret in ["pg-s3cret", "other-s3cret", "redis-s3cret"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        assert!(printed.contains("postgres://keel:***@db:5432/keel?sslmode=require&password=***"));
        assert!(printed.contains("redis://:***@cache:6379/0"));
        assert_eq!(redacted("postgres://db/keel"), "postgres://db/keel");
    }

    #[test]
    fn bad_values_are_refused_by_the_parser() {
        assert!(parse(&["--catalog-endpoints", "catalog"]).is_err());
        assert!(parse(&["--shutdown-grace", "soon"]).is_err());
        assert!(parse(&["--log-format", "xml"]).is_err());
        assert!(parse(&["--grpc-addr", "nowhere"]).is_err());
        assert!(parse(&["serve", "billing"]).is_err());
    }

    #[test]
    fn reflection_lists_internal_services_only_where_asked() {
        let mut s = Settings::defaults();
        assert!(s.operations.reflects_all(), "development lists all");
        s.operations.environment = Environment::Production;
        assert!(
            !s.operations.reflects_all(),
            "production lists the public ones"
        );
        s.operations.reflection = Some(Reflection::All);
        assert!(s.operations.reflects_all(), "unless asked");
    }
}
