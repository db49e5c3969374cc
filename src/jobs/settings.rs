//! jobs' part of the operator surface: where e-mail goes and who sends it, and what a job made
//! through the API may cost.

use clap::Args;

/// jobs' settings. Its `Debug` hides the SMTP URL's credentials.
#[derive(Clone, Args)]
#[command(next_help_heading = "Jobs and e-mail")]
pub struct JobSettings {
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

    /// Attempts a job made through JobService gets before it is DEAD.
    #[arg(
        long,
        env = "KEEL_JOB_MAX_ATTEMPTS",
        default_value_t = 5,
        global = true
    )]
    pub job_max_attempts: i32,
}

impl std::fmt::Debug for JobSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobSettings")
            .field(
                "smtp_url",
                &self.smtp_url.as_deref().map(crate::config::redacted),
            )
            .field("mail_from", &self.mail_from)
            .field("job_max_attempts", &self.job_max_attempts)
            .finish()
    }
}

impl JobSettings {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        if self.job_max_attempts < 1 {
            return Err(crate::config::ConfigError::Zero("KEEL_JOB_MAX_ATTEMPTS"));
        }
        if self.mail_from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(crate::config::ConfigError::MailFrom(self.mail_from.clone()));
        }
        Ok(())
    }
}
