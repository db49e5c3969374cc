//! How much a call matters when a server must shed load: `keel-criticality` metadata
//! (`critical`, `default`, `sheddable`), kept for the task that serves the call and sent on with
//! every call that task makes, as the deadline is.

use std::future::Future;

use http::{HeaderMap, HeaderValue};

/// The metadata key.
pub const HEADER: &str = "keel-criticality";

/// A call's criticality; a call without one (or with one keel does not know) is `Default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Criticality {
    /// Refused last: the call a user is waiting on to complete a purchase, say.
    Critical,
    /// Every call that says nothing.
    #[default]
    Default,
    /// Refused first: prefetches, batch work, anything that can come back later.
    Sheddable,
}

impl Criticality {
    /// The metadata value.
    pub fn as_str(self) -> &'static str {
        match self {
            Criticality::Critical => "critical",
            Criticality::Default => "default",
            Criticality::Sheddable => "sheddable",
        }
    }
}

/// The criticality `headers` carry.
pub fn of(headers: &HeaderMap) -> Criticality {
    match headers.get(HEADER).map(HeaderValue::as_bytes) {
        Some(b"critical") => Criticality::Critical,
        Some(b"sheddable") => Criticality::Sheddable,
        _ => Criticality::Default,
    }
}

// A task-local: it rides with the task that serves the call, and `tokio::spawn` does not
// carry it. Work spawned for a call that must keep the call's criticality takes it along
// explicitly (read it with `current()` and scope the spawned future again).
tokio::task_local! {
    static CURRENT: Criticality;
}

/// The criticality of the call this task is serving, if it was set.
pub fn current() -> Option<Criticality> {
    CURRENT.try_with(|c| *c).ok()
}

/// Runs `future` (a handler) with `criticality` as the task's.
pub fn scope<F: Future>(criticality: Criticality, future: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(criticality, future)
}

/// Sends the serving call's criticality on with an outgoing call, unless the caller set one.
pub fn propagate(headers: &mut HeaderMap) {
    if headers.contains_key(HEADER) {
        return;
    }
    if let Some(criticality) = current().filter(|c| *c != Criticality::Default) {
        headers.insert(HEADER, HeaderValue::from_static(criticality.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_s_criticality_travels_with_the_calls_its_handler_makes() {
        let mut incoming = HeaderMap::new();
        incoming.insert(HEADER, HeaderValue::from_static("sheddable"));
        let criticality = of(&incoming);
        assert_eq!(criticality, Criticality::Sheddable);
        let outgoing = scope(criticality, async {
            let mut headers = HeaderMap::new();
            propagate(&mut headers);
            headers
        })
        .await;
        assert_eq!(outgoing[HEADER], "sheddable");

        let mut unknown = HeaderMap::new();
        unknown.insert(HEADER, HeaderValue::from_static("urgent!"));
        assert_eq!(of(&unknown), Criticality::Default);
        let mut outside = HeaderMap::new();
        propagate(&mut outside);
        assert!(
            outside.get(HEADER).is_none(),
            "outside a call, nothing is sent"
        );
    }
}
