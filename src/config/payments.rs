//! payments' part of the operator surface: the wallets' currency.

use clap::Args;

use super::ConfigError;

/// payments' settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Payments")]
pub struct PaymentSettings {
    /// The currency of every wallet (ISO 4217).
    #[arg(
        long,
        env = "KEEL_WALLET_CURRENCY",
        default_value = "EUR",
        global = true
    )]
    pub wallet_currency: String,
}

impl PaymentSettings {
    /// Checks what clap cannot: an ISO 4217 code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let code = &self.wallet_currency;
        if !crate::money::is_currency_code(code) {
            return Err(ConfigError::Currency(code.clone()));
        }
        Ok(())
    }
}
