//! The outbox relay: hands due jobs from the SQL table to their Redis streams.

use std::time::Duration;

use fred::prelude::*;
use tokio::sync::Notify;

use super::streams::{COMMAND, JOB_FIELD, stream_key};
use crate::store::JobStore;

/// Hands due jobs from the table to their streams (the outbox relay): every job written, once
/// due; again if Redis may have lost it (handed out long ago and still waiting).
pub async fn relay(
    store: JobStore,
    client: Client,
    prefix: String,
    wake: std::sync::Arc<Notify>,
    stale: Duration,
    idle: Duration,
    stopped: impl std::future::Future<Output = ()> + Send,
) {
    const BATCH: usize = 500;
    let mut stopped = std::pin::pin!(stopped);
    loop {
        let woken = wake.notified();
        let handed = match store.take_unpublished(BATCH, stale).await {
            Ok(due) => {
                let n = due.len();
                let pipeline = client.pipeline();
                for (id, kind) in due {
                    let _: Result<(), _> = pipeline
                        .xadd(
                            stream_key(&prefix, &kind),
                            false,
                            None::<()>,
                            "*",
                            vec![(JOB_FIELD, id)],
                        )
                        .await;
                }
                if n > 0 {
                    let sent: Result<Result<Vec<Value>, _>, _> =
                        tokio::time::timeout(COMMAND * 4, pipeline.all()).await;
                    if !matches!(sent, Ok(Ok(_))) {
                        tracing::warn!(
                            "cannot hand jobs to Redis; workers claim them from the table"
                        );
                    }
                }
                n
            }
            Err(e) => {
                tracing::warn!(error = %e, "relay cannot read the jobs table");
                0
            }
        };
        if handed < BATCH {
            tokio::select! {
                () = &mut stopped => return,
                _ = tokio::time::timeout(idle, woken) => {}
            }
        }
    }
}
