//! identity's policy from its settings ([`crate::config::IdentitySettings`]).

use super::service::{Bootstrap, IdentityConfig};
use crate::config::{Environment, IdentitySettings};

impl IdentitySettings {
    /// The service's policy in `environment`.
    pub fn policy(&self, environment: Environment) -> IdentityConfig {
        IdentityConfig {
            bootstrap: match environment {
                Environment::Development => Bootstrap::Trusting,
                Environment::Production => Bootstrap::Confirmed,
            },
            access_token_ttl: self.access_token_ttl,
            refresh_token_ttl: self.refresh_token_ttl,
            admin_emails: self
                .admin_emails
                .iter()
                .map(|e| e.trim().to_lowercase())
                .collect(),
        }
    }
}
