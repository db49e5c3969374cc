//! payments: a wallet per user whose balance is the sum of an append-only ledger and never goes
//! below zero; top-ups, and the internal charges and refunds that orders use.

mod entity;
mod error;
mod ledger;
mod migration;
mod service;

pub use crate::config::PaymentSettings;
pub use error::PaymentError;
pub use ledger::Ledger;
pub use service::PaymentService;

use std::sync::Arc;

use crate::config::{Environment, Settings};
use crate::domain::{Domain, Migrator, Parts, Services};
use crate::proto::keel::payments::v1::ledger_service_server::LedgerServiceServer;
use crate::proto::keel::payments::v1::payment_service_server::PaymentServiceServer;
use crate::proto::lane;

/// The fully-qualified gRPC names, as health and reflection list them.
pub const SERVICE_NAME: &str = "keel.payments.v1.PaymentService";
/// The internal ledger service.
pub const LEDGER_SERVICE_NAME: &str = "keel.payments.v1.LedgerService";

/// payments in the registry.
pub static DOMAIN: Domain = Domain {
    name: "payments",
    about: "Wallets and the ledger",
    grpc_names: &[SERVICE_NAME, LEDGER_SERVICE_NAME],
    guarded: &[],
    migrations: &Migrator::<migration::Migrator>::new(),
    build,
    jobs: crate::domain::no_jobs,
    openapi_rules,
};

/// Wallets hold the deployment's one currency: a top-up in another is refused, so the document
/// says which.
fn openapi_rules(settings: &Settings) -> Vec<(&'static str, serde_json::Value)> {
    let currency = &settings.payments.wallet_currency;
    vec![(
        "keel.payments.v1.TopUpWalletRequest.amount",
        serde_json::json!({
            "properties": { "currencyCode": { "const": currency } },
            "description": format!("Positive amount in the wallets' currency, {currency}."),
        }),
    )]
}

fn build(parts: &Parts<'_>, services: &mut Services) -> anyhow::Result<()> {
    let settings = parts.settings;
    let service = PaymentService::new(
        Ledger::new(
            parts.reads.clone(),
            settings.payments.wallet_currency.clone(),
        ),
        // Development lets owners fund their own wallet.
        settings.operations.environment == Environment::Development,
    );
    let max = parts.max_message_bytes();
    let service = Arc::new(service);
    services
        .add(
            PaymentServiceServer::from_arc(service.clone()).max_decoding_message_size(max),
            lane::payment_service(&service),
        )
        .add(
            LedgerServiceServer::from_arc(service.clone()).max_decoding_message_size(max),
            lane::ledger_service(&service),
        );
    Ok(())
}
