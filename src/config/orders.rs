//! orders' part of the operator surface: how often the reconciler sweeps, how long an order
//! may go without moving before it counts as stuck, and what one caller's watches may hold.

use std::time::Duration;

use clap::Args;

use super::{ConfigError, parse_duration};

/// orders' settings.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Orders")]
pub struct OrderSettings {
    /// How often one of the processes that run order jobs sweeps for orders whose saga stopped
    /// (its job died) and drives them again.
    #[arg(long, env = "KEEL_ORDER_RECONCILE_EVERY", default_value = "30s", value_parser = parse_duration, global = true)]
    pub order_reconcile_every: Duration,

    /// An order whose saga has not moved for this long is looked at by the sweep, and counted
    /// in `keel_orders_unsettled_total` (an alert fires on it).
    #[arg(long, env = "KEEL_ORDER_STUCK_AFTER", default_value = "2m", value_parser = parse_duration, global = true)]
    pub order_stuck_after: Duration,

    /// WatchOrder streams one caller holds open at once, per process (RESOURCE_EXHAUSTED past
    /// it).
    #[arg(
        long,
        env = "KEEL_ORDER_WATCHES_PER_CALLER",
        default_value_t = 10,
        global = true
    )]
    pub order_watches_per_caller: usize,

    /// How long a WatchOrder stream stays open before it ends (OK), for the client to watch
    /// again: none is held for ever by a client that went away.
    #[arg(long, env = "KEEL_ORDER_WATCH_LIFETIME", default_value = "10m", value_parser = parse_duration, global = true)]
    pub order_watch_lifetime: Duration,
}

impl OrderSettings {
    /// Checks what clap cannot: a sweep interval that is not zero.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.order_reconcile_every.is_zero() {
            return Err(ConfigError::Zero("KEEL_ORDER_RECONCILE_EVERY"));
        }
        Ok(())
    }
}
