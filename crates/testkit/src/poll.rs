//! Waiting for a condition by polling it until a deadline, never by sleeping a fixed time.

use std::future::Future;
use std::time::{Duration, Instant};

/// Polls `check` every few milliseconds until it yields `Some`, and returns that; panics naming
/// `what` when `within` runs out first.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
