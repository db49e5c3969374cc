//! jobs: the queue's API (make, read, list, retry jobs) and the kinds of job keel runs for
//! everyone: `email.send` (through the shared [`crate::mail::Postman`]) and `noop`.

mod error;
mod kinds;
mod migration;
mod service;

use std::sync::Arc;

pub use crate::config::JobSettings;
pub use crate::mail::{EMAIL_SEND, Email};
pub use error::JobError;
pub use kinds::NOOP;
pub use service::JobService;

use crate::domain::{Domain, Migrator, Parts, Services};
use crate::proto::keel::jobs::v1::job_service_server::JobServiceServer;
use crate::proto::lane;

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

fn build(parts: &Parts<'_>, services: &mut Services) -> anyhow::Result<()> {
    let service = JobService::new(
        parts.queue.clone(),
        parts.settings.jobs.job_max_attempts,
        parts.settings.jobs.job_live_per_caller,
    );
    let service = Arc::new(service);
    services.add(
        JobServiceServer::from_arc(service.clone())
            .max_decoding_message_size(parts.max_message_bytes()),
        lane::job_service(&service),
    );
    Ok(())
}

fn jobs(parts: &Parts<'_>) -> anyhow::Result<Vec<keel_queue::Kind>> {
    let postman = crate::mail::Postman::new(
        &parts.settings.mail,
        &parts.settings.stores.data_dir,
        parts.db.clone(),
    )?;
    Ok(vec![
        keel_queue::Kind::new(EMAIL_SEND, Arc::new(kinds::EmailSend(postman)))
            .retried_for(crate::mail::RETRY_WINDOW),
        // At most one at a time across the fleet by default (KEEL_JOB_LIMITS overrides): a burst
        // of slow no-ops never holds every worker's slots while orders wait.
        keel_queue::Kind::new(NOOP, Arc::new(kinds::Noop)).limited(Some(1)),
    ])
}
