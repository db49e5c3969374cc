//! jobs: the queue's API (make, read, list, retry jobs) and the kinds of job keel runs for
//! everyone: `email.send` (SMTP, or the data dir's outbox) and `noop`.

mod error;
mod kinds;
pub mod mail;
mod migration;
mod service;
mod settings;

use anyhow::Context as _;
use tonic::service::RoutesBuilder;

pub use crate::mail::{EMAIL_SEND, Email};
pub use error::JobError;
pub use kinds::NOOP;
pub use service::JobService;
pub use settings::JobSettings;

use crate::domain::{Domain, Migrator, Parts};
use crate::proto::keel::jobs::v1::job_service_server::JobServiceServer;

/// The fully-qualified gRPC name, as health and reflection list it.
pub const SERVICE_NAME: &str = "keel.jobs.v1.JobService";

/// jobs in the registry.
pub static DOMAIN: Domain = Domain {
    name: "jobs",
    about: "Background jobs and e-mail",
    grpc_names: &[SERVICE_NAME],
    guarded: &[],
    migrations: &Migrator::<migration::Migrator>::new(),
    build,
    jobs,
    openapi_rules: crate::domain::no_openapi_rules,
};

fn build(parts: &Parts<'_>, routes: &mut RoutesBuilder) -> anyhow::Result<()> {
    let service = JobService::new(parts.queue.clone(), parts.settings.jobs.job_max_attempts);
    routes.add_service(
        JobServiceServer::new(service).max_decoding_message_size(parts.max_message_bytes()),
    );
    Ok(())
}

fn jobs(parts: &Parts<'_>) -> anyhow::Result<Vec<keel_queue::Kind>> {
    let settings = &parts.settings.jobs;
    let transport = mail::Transport::new(
        settings.smtp_url.as_deref(),
        &parts.settings.stores.data_dir,
    )?;
    let from = settings
        .mail_from
        .parse()
        .context("KEEL_MAIL_FROM is not a mailbox")?;
    Ok(vec![
        keel_queue::Kind {
            name: EMAIL_SEND.into(),
            handler: std::sync::Arc::new(mail::Mailer::new(transport, from, parts.db.clone())),
            limit: None,
        },
        keel_queue::Kind {
            name: NOOP.into(),
            handler: std::sync::Arc::new(kinds::Noop),
            limit: None,
        },
    ])
}
