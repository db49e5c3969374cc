//! The e-mail job every service may write in its own transaction: its kind and payload. The
//! jobs service runs it (`jobs/mail.rs`); identity writes welcome e-mails and orders
//! confirmations with it, without knowing how mail is sent.

use serde::Deserialize;

/// The job kind that sends one e-mail.
pub const EMAIL_SEND: &str = "email.send";

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
    /// The job that sends it.
    pub fn job(&self, creator: &str, unique_key: Option<String>) -> keel_queue::NewJob {
        keel_queue::NewJob {
            kind: EMAIL_SEND.into(),
            payload: serde_json::to_value(self).unwrap_or_default(),
            creator: creator.into(),
            unique_key,
            ..keel_queue::NewJob::default()
        }
    }
}
