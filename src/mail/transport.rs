//! Where messages go: an SMTP server when `KEEL_SMTP_URL` is set, else one file per message
//! under the data dir's `outbox/` (the embedded default shows every mail), named after its job so
//! that a second attempt replaces the file rather than adding one.

use std::path::PathBuf;

use anyhow::Context as _;
use lettre::message::Message;
use lettre::{AsyncSmtpTransport, AsyncTransport as _, Tokio1Executor};

/// Where messages go.
#[derive(Clone)]
pub enum Transport {
    /// An SMTP server.
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    /// Files in a directory, one per message, named after its job.
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

    /// Hands `message` (of job `id`) over.
    pub async fn send(&self, message: &Message, id: &str) -> anyhow::Result<()> {
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
