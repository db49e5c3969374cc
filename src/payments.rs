//! payments: a wallet per user whose balance is the sum of an append-only ledger and never goes
//! below zero; top-ups, and the internal charges and refunds that orders use.

mod entity;
mod error;
mod ledger;
mod migration;
mod service;

pub use error::PaymentError;
pub use ledger::Ledger;
pub use migration::Migrator;
pub use service::PaymentService;

/// The fully-qualified gRPC names, as health and reflection list them.
pub const SERVICE_NAME: &str = "keel.payments.v1.PaymentService";
/// The internal ledger service.
pub const LEDGER_SERVICE_NAME: &str = "keel.payments.v1.LedgerService";
