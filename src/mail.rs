//! E-mail, for every service: the `email.send` job any service may write in its own
//! transaction, where mail goes (`KEEL_SMTP_URL`, else files under the data dir), and the
//! [`Postman`] that hands a message over once: the attempt holding the message's job checks the
//! message's mark under its fence just before sending and marks it after, so a redelivered or
//! taken-over job does not send it again and an attempt that lost its job sends nothing.

mod transport;

use std::path::Path;

use anyhow::Context as _;
use keel_queue::{Failure, Job};
use lettre::message::{Mailbox, Message, header::ContentType};
use sea_orm::DatabaseConnection;
use serde::Deserialize;

pub use transport::{Transport, outbox};

pub use crate::config::MailSettings;

/// The job kind that sends one e-mail.
pub const EMAIL_SEND: &str = "email.send";

/// How long keel keeps trying to hand a message to SMTP: longer than any outage worth waiting
/// out (an MTA keeps a message about as long), whatever the number of attempts.
pub const RETRY_WINDOW: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// What an `email.send` job carries.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Email {
    /// One recipient address.
    pub to: String,
    /// Subject line.
    pub subject: String,
    /// Plain-text body.
    pub body: String,
}

impl Email {
    /// The job that sends it, tried for [`RETRY_WINDOW`] rather than a number of attempts.
    pub fn job(&self, creator: &str, unique_key: Option<String>) -> keel_queue::NewJob {
        keel_queue::NewJob {
            kind: EMAIL_SEND.into(),
            payload: serde_json::to_value(self).unwrap_or_default(),
            creator: creator.into(),
            unique_key,
            max_attempts: Some(i32::MAX),
            ..keel_queue::NewJob::default()
        }
    }
}

/// Hands messages to the transport, each once, for the attempt that holds its job.
#[derive(Clone)]
pub struct Postman {
    transport: Transport,
    from: Mailbox,
    db: DatabaseConnection,
}

impl Postman {
    /// Sends as the settings say, marking what was sent in `db` (the queue's own table).
    pub fn new(
        settings: &MailSettings,
        data_dir: &Path,
        db: DatabaseConnection,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            transport: Transport::new(settings.smtp_url.as_deref(), data_dir)?,
            from: settings
                .mail_from
                .parse()
                .context("KEEL_MAIL_FROM is not a mailbox")?,
            db,
        })
    }

    /// Sends `email` as the message of `job` (its Message-ID derives from the job), unless it
    /// was sent already; only while `job`'s attempt still holds it.
    pub async fn deliver(&self, job: &Job, email: &Email) -> Result<(), Failure> {
        let to: Mailbox = email
            .to
            .parse()
            .map_err(|e| Failure::Permanent(format!("recipient {}: {e}", email.to)))?;
        let message_id = format!("<{}@keel>", job.id);
        let mark = format!("mail:{message_id}");
        let fence = job.fence();
        crate::fault::point("mail.before_send");
        if !keel_queue::effect::pending(&self.db, &fence, &mark).await? {
            return Ok(());
        }
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(email.subject.clone())
            .message_id(Some(message_id))
            .header(ContentType::TEXT_PLAIN)
            .body(email.body.clone())
            .map_err(|e| Failure::Permanent(format!("cannot build the message: {e}")))?;
        self.transport
            .send(&message, &job.id)
            .await
            .map_err(|e| Failure::Retry(format!("{e:#}")))?;
        crate::fault::point("mail.sent");
        Ok(keel_queue::effect::done(&self.db, &fence, &mark).await?)
    }
}
