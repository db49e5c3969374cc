//! Where e-mail goes and who sends it.

use clap::Args;

/// Where e-mail goes and who sends it. Its `Debug` hides the SMTP URL's credentials.
#[derive(Clone, Args)]
#[command(next_help_heading = "E-mail")]
pub struct MailSettings {
    /// SMTP server for e-mail (`smtp://host:25`, `smtps://user:password@host`); without it,
    /// every message is a file under the data dir's `outbox/`.
    #[arg(long, env = "KEEL_SMTP_URL", global = true, hide_env_values = true)]
    pub smtp_url: Option<String>,

    /// The sender of keel's e-mail.
    #[arg(
        long,
        env = "KEEL_MAIL_FROM",
        default_value = "keel <keel@localhost>",
        global = true
    )]
    pub mail_from: String,
}

impl std::fmt::Debug for MailSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MailSettings")
            .field("smtp_url", &self.smtp_url.as_deref().map(super::redacted))
            .field("mail_from", &self.mail_from)
            .finish()
    }
}

impl MailSettings {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), super::ConfigError> {
        if self.mail_from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(super::ConfigError::MailFrom(self.mail_from.clone()));
        }
        Ok(())
    }
}
