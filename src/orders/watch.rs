//! WatchOrder's streams: every change of an order as it happens, wherever the saga runs. A
//! caller holds at most so many open at once (per process), and each ends — OK, after the
//! order's current state — once its lifetime is up, for the client to watch again: a stream is
//! never held for ever by someone who opened it and went away.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::Stream;
use tonic::Status;
use uuid::Uuid;

use super::changes::Changes;
use super::error::OrderError;
use super::store::{OrderStore, Placed};
use crate::proto::keel::orders::v1::WatchOrderResponse;

/// The stream WatchOrder answers with.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchOrderResponse, Status>> + Send>>;

/// The open watches of a process, by caller.
#[derive(Debug)]
pub struct Watches {
    open: Mutex<HashMap<Uuid, usize>>,
    per_caller: usize,
    lifetime: Duration,
}

impl Watches {
    /// At most `per_caller` open watches per caller, each open at most `lifetime`.
    pub fn new(per_caller: usize, lifetime: Duration) -> Arc<Self> {
        Arc::new(Self {
            open: Mutex::default(),
            per_caller,
            lifetime,
        })
    }

    /// A place for one more watch of `caller`'s, or RESOURCE_EXHAUSTED.
    pub fn open(self: &Arc<Self>, caller: Uuid) -> Result<Watch, OrderError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let held = open.entry(caller).or_default();
        if *held >= self.per_caller {
            return Err(OrderError::TooManyWatches(self.per_caller));
        }
        *held += 1;
        Ok(Watch {
            watches: self.clone(),
            caller,
        })
    }

    /// `placed`'s changes, from its state now, while `watch` holds its place.
    pub fn stream(
        &self,
        watch: Watch,
        placed: &Placed,
        store: OrderStore,
        hub: Changes,
    ) -> WatchStream {
        struct Watching {
            last: Option<i64>,
            done: bool,
            changes: tokio::sync::broadcast::Receiver<super::changes::Change>,
            until: tokio::time::Instant,
            _watch: Watch,
        }
        let id = placed.order.id;
        let first = Watching {
            last: None,
            done: false,
            changes: hub.subscribe(),
            until: tokio::time::Instant::now() + self.lifetime,
            _watch: watch,
        };
        let stream = futures::stream::unfold(first, move |mut watching| {
            let (store, hub) = (store.clone(), hub.clone());
            async move {
                if watching.done {
                    return None;
                }
                loop {
                    if watching.last.is_some() {
                        tokio::select! {
                            () = hub.wait(id, &mut watching.changes) => {}
                            // Its time is up: the stream ends, OK; the client watches again.
                            () = tokio::time::sleep_until(watching.until) => return None,
                        }
                    }
                    let placed = match store.find(id).await {
                        Ok(Some(placed)) => placed,
                        Ok(None) => {
                            watching.done = true;
                            return Some((Err(Status::not_found("the order is gone")), watching));
                        }
                        Err(e) => {
                            watching.done = true;
                            return Some((Err(e.into()), watching));
                        }
                    };
                    if watching.last != Some(placed.order.version) {
                        watching.last = Some(placed.order.version);
                        watching.done = placed.settled();
                        let event = WatchOrderResponse {
                            order: Some(super::service::to_proto(&placed)),
                        };
                        return Some((Ok(event), watching));
                    }
                }
            }
        });
        Box::pin(stream)
    }
}

/// One open watch's place, given back when its stream ends.
#[derive(Debug)]
pub struct Watch {
    watches: Arc<Watches>,
    caller: Uuid,
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut open = self.watches.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = open.get_mut(&self.caller) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.caller);
            }
        }
    }
}
