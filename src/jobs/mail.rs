//! E-mail, as the `email.send` job sends it: through SMTP when `KEEL_SMTP_URL` is set, else one
//! file per message under the data dir's `outbox/` (the embedded default shows every mail). The
//! Message-ID derives from the job and a sent mark is recorded after sending, so a redelivered
//! job sends nothing twice. What remains possible: a crash after the SMTP server accepted the
//! message and before the mark was written sends it again on the next attempt.

use std::path::PathBuf;

use crate::mail::Email;
use anyhow::Context as _;
use async_trait::async_trait;
use keel_queue::{Failure, Handler, Job};
use lettre::message::{Mailbox, Message, header::ContentType};
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};
use sea_orm::{ConnectionTrait as _, DatabaseConnection, Statement};

/// Where messages go.
#[derive(Clone)]
pub enum Transport {
    /// An SMTP server.
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// Files in a directory, one per message, named after its Message-ID.
    Outbox(PathBuf),
}

impl Transport {
    /// SMTP at `url`, else the outbox under `data_dir`.
    pub fn new(url: Option<&str>, data_dir: &std::path::Path) -> anyhow::Result<Self> {
        Ok(match url {
            Some(url) => Transport::Smtp(
                AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
                    .context("KEEL_SMTP_URL is not an SMTP URL")?
                    .build(),
            ),
            None => Transport::Outbox(outbox(data_dir)),
        })
    }

    async fn send(&self, message: &Message, id: &str) -> anyhow::Result<()> {
        match self {
            Transport::Smtp(smtp) => {
                smtp.send(message.clone()).await.context("SMTP")?;
            }
            Transport::Outbox(dir) => {
                let (dir, bytes, id) = (dir.clone(), message.formatted(), id.to_owned());
                tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("create {}", dir.display()))?;
                    let staged = dir.join(format!(".{id}.tmp"));
                    std::fs::write(&staged, bytes)
                        .with_context(|| format!("write {}", staged.display()))?;
                    // The same job writes the same file: a second attempt replaces, never adds.
                    std::fs::rename(&staged, dir.join(format!("{id}.eml")))
                        .context("publish the message")
                })
                .await
                .context("outbox task")??;
            }
        }
        Ok(())
    }
}

/// The outbox under `data_dir`.
pub fn outbox(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("outbox")
}

/// Sends `email.send` jobs.
pub struct Mailer {
    transport: Transport,
    from: Mailbox,
    db: DatabaseConnection,
}

impl Mailer {
    /// Sends as `from` through `transport`, marking what it sent in `db`.
    pub fn new(transport: Transport, from: Mailbox, db: DatabaseConnection) -> Self {
        Self {
            transport,
            from,
            db,
        }
    }

    async fn sent(&self, message_id: &str) -> Result<bool, sea_orm::DbErr> {
        let backend = self.db.get_database_backend();
        let row = self
            .db
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                "SELECT 1 AS sent FROM jobs_mail_sent WHERE message_id = $1",
                [message_id.into()],
            ))
            .await?;
        Ok(row.is_some())
    }

    async fn mark(&self, message_id: &str, job: &str) -> Result<(), sea_orm::DbErr> {
        let backend = self.db.get_database_backend();
        self.db
            .execute_raw(Statement::from_sql_and_values(
                backend,
                "INSERT INTO jobs_mail_sent (message_id, job_id, sent_at) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                [
                    message_id.into(),
                    job.into(),
                    keel_queue::job::now_ms().into(),
                ],
            ))
            .await?;
        Ok(())
    }
}

#[async_trait]
impl Handler for Mailer {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        let email: Email = serde_json::from_value(job.payload.clone())
            .map_err(|e| Failure::Permanent(format!("not an e-mail: {e}")))?;
        let to: Mailbox = email
            .to
            .parse()
            .map_err(|e| Failure::Permanent(format!("recipient {}: {e}", email.to)))?;
        let message_id = format!("<{}@keel>", job.id);
        let retry = |e: &dyn std::fmt::Display| Failure::Retry(e.to_string());
        if self.sent(&message_id).await.map_err(|e| retry(&e))? {
            return Ok(());
        }
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(email.subject)
            .message_id(Some(message_id.clone()))
            .header(ContentType::TEXT_PLAIN)
            .body(email.body)
            .map_err(|e| Failure::Permanent(format!("cannot build the message: {e}")))?;
        self.transport
            .send(&message, &job.id)
            .await
            .map_err(|e| Failure::Retry(format!("{e:#}")))?;
        self.mark(&message_id, &job.id).await.map_err(|e| retry(&e))
    }
}
