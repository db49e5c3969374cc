//! The operator surface: every setting is a flag and a `KEEL_*` variable (README's settings
//! table; `keel --help` says the same), grouped by
//! concern, with defaults that serve the embedded mode and checks that stop a bad start with one
//! clear line.

mod cli;
mod edge;
mod identity;
mod jobs;
mod limits;
mod mesh;
mod operations;
mod orders;
mod payments;
mod peers;
mod stores;
mod workers;

use std::time::Duration;

use clap::{Args, CommandFactory as _, FromArgMatches as _};

pub use cli::{Cli, Command, KeysAction, Served, UsersAction};
pub use edge::{EdgeSettings, RateLimit};
pub use identity::IdentitySettings;
pub use jobs::JobSettings;
pub use limits::{ConcurrencyLimit, Limits};
pub use mesh::{MeshSettings, Switch};
pub use operations::{Environment, Operations, Reflection};
pub use orders::OrderSettings;
pub use payments::PaymentSettings;
pub use peers::PeerEndpoints;
pub use stores::{Listen, StoreSettings, redacted};
pub use workers::WorkerSettings;

/// Every setting, as flags and `KEEL_*` variables, by concern.
#[derive(Debug, Clone, Args)]
pub struct Settings {
    /// Where this process listens.
    #[command(flatten)]
    pub listen: Listen,
    /// The database and the cache.
    #[command(flatten)]
    pub stores: StoreSettings,
    /// Environment, logs, health and drain.
    #[command(flatten)]
    pub operations: Operations,
    /// What one call may cost.
    #[command(flatten)]
    pub limits: Limits,
    /// Who the client is and how much it may ask, over REST and gRPC.
    #[command(flatten)]
    pub edge: EdgeSettings,
    /// Peers, replicas and mTLS.
    #[command(flatten)]
    pub mesh: MeshSettings,
    /// identity's policy.
    #[command(flatten)]
    pub identity: IdentitySettings,
    /// payments' policy.
    #[command(flatten)]
    pub payments: PaymentSettings,
    /// orders' reconciler.
    #[command(flatten)]
    pub orders: OrderSettings,
    /// How jobs run.
    #[command(flatten)]
    pub workers: WorkerSettings,
    /// The jobs API.
    #[command(flatten)]
    pub jobs: JobSettings,
    /// Where e-mail goes.
    #[command(flatten)]
    pub mail: crate::mail::MailSettings,
}

/// A duration flag: `10s`, `15m`, `30d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 10s, 15m, 30d)"))
}

/// A setting that cannot work; printed as one line before exit.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Production needs a real database.
    #[error("KEEL_ENV=production needs KEEL_DATABASE_URL: the embedded SQLite is for development")]
    ProductionWithoutDatabase,
    /// Production needs a provisioned signing key.
    #[error(
        "KEEL_ENV=production needs KEEL_SIGNING_KEY: a generated development key would sign production tokens"
    )]
    ProductionWithoutSigningKey,
    /// Production should not run a per-process cache across replicas.
    #[error(
        "KEEL_ENV=production needs KEEL_REDIS_URL: an in-process cache is not shared by replicas"
    )]
    ProductionWithoutRedis,
    /// Some but not all of the TLS files.
    #[error("mTLS needs all of KEEL_TLS_CA, KEEL_TLS_CERT and KEEL_TLS_KEY, or none (plaintext)")]
    PartialTls,
    /// A REST certificate without its key or the other way round.
    #[error("HTTPS needs both KEEL_HTTP_TLS_CERT and KEEL_HTTP_TLS_KEY, or neither (plaintext)")]
    PartialHttpTls,
    /// Not an ISO 4217 code.
    #[error("KEEL_WALLET_CURRENCY must be a three-letter ISO 4217 code such as EUR, not {0:?}")]
    Currency(String),
    /// Zero-sized limits.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// Replicas out of range.
    #[error("KEEL_REPLICAS must be between 1 and {MAX_REPLICAS}, not {0}")]
    Replicas(usize),
    /// Production needs a provisioned service secret.
    #[error(
        "KEEL_ENV=production needs KEEL_SERVICE_SECRET: keel's services authenticate to each other with it"
    )]
    ProductionWithoutServiceSecret,
    /// Not a mailbox.
    #[error("KEEL_MAIL_FROM must be a mailbox such as `keel <keel@example.com>`, not {0:?}")]
    MailFrom(String),
}

/// More replicas than this in one process is a typo, not a laptop mesh.
pub const MAX_REPLICAS: usize = 16;

/// `Err(Zero(name))` when `value` is zero.
fn positive(value: usize, name: &'static str) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::Zero(name))
    } else {
        Ok(())
    }
}

impl Settings {
    /// Checks what clap cannot: the production rules and sane limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.operations.environment == Environment::Production {
            if self.stores.database_url.is_none() {
                return Err(ConfigError::ProductionWithoutDatabase);
            }
            if self.stores.redis_url.is_none() {
                return Err(ConfigError::ProductionWithoutRedis);
            }
            if self.identity.signing_key.is_none() {
                return Err(ConfigError::ProductionWithoutSigningKey);
            }
            if self.workers.service_secret.is_none() {
                return Err(ConfigError::ProductionWithoutServiceSecret);
            }
        }
        let mesh = &self.mesh;
        let tls = [&mesh.tls_ca, &mesh.tls_cert, &mesh.tls_key];
        if tls.iter().any(|f| f.is_some()) && !tls.iter().all(|f| f.is_some()) {
            return Err(ConfigError::PartialTls);
        }
        if self.edge.http_tls_cert.is_some() != self.edge.http_tls_key.is_some() {
            return Err(ConfigError::PartialHttpTls);
        }
        positive(
            self.stores.database_max_connections as usize,
            "KEEL_DATABASE_MAX_CONNECTIONS",
        )?;
        positive(
            self.limits.max_concurrent_calls,
            "KEEL_MAX_CONCURRENT_CALLS",
        )?;
        positive(self.limits.max_message_bytes, "KEEL_MAX_MESSAGE_BYTES")?;
        positive(
            mesh.connections_per_endpoint,
            "KEEL_CONNECTIONS_PER_ENDPOINT",
        )?;
        if !(1..=MAX_REPLICAS).contains(&mesh.replicas) {
            return Err(ConfigError::Replicas(mesh.replicas));
        }
        self.identity.validate()?;
        self.jobs.validate()?;
        self.mail.validate()?;
        self.orders.validate()?;
        self.payments.validate()
    }

    /// The defaults alone, as `keel` with no flags and no `KEEL_*` variables would have them:
    /// what tests start from, whatever the developer's environment holds.
    pub fn defaults() -> Self {
        let command = Cli::command().mut_args(|arg| arg.env(None::<&str>));
        let matches = command
            .try_get_matches_from(["keel"])
            .expect("the defaults parse");
        Self::from_arg_matches(&matches).expect("the defaults are settings")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    use clap::Parser as _;

    use crate::registry;
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
            Err(ConfigError::ProductionWithoutSigningKey)
        ));
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
