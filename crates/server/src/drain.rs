//! A graceful drain: one signal that flips health to NOT_SERVING, stops accepting, lets
//! in-flight calls finish and bounds the whole by a grace period.

use std::future::Future;
use std::time::Duration;

use tokio::sync::watch;

/// A cloneable drain switch. Everything that must stop on shutdown waits on [`Drain::started`].
#[derive(Clone, Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain that has not started.
    pub fn new() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }

    /// Starts the drain; later calls do nothing.
    pub fn start(&self) {
        self.tx
            .send_if_modified(|started| !std::mem::replace(started, true));
    }

    /// Whether the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }

    /// Resolves once the drain has started.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.tx.subscribe();
        async move {
            // The sender lives in `self`, which outlives every waiter that matters; if it is
            // dropped the process is going away, which is a drain too.
            let _ = rx.wait_for(|started| *started).await;
        }
    }
}

/// SIGTERM or SIGINT (Ctrl-C), heard from the moment [`Termination::listen`] is called (not
/// from the first poll of some future: a process reports ready before its drain task runs, and
/// a SIGTERM in between would kill it outright), by every clone: start-up races it (a process
/// told to stop while it waits for its database stops), and the drain follows it once running.
#[derive(Debug, Clone)]
pub struct Termination(watch::Receiver<bool>);

impl Termination {
    /// Installs the handlers now. Call it inside the runtime.
    pub fn listen() -> Self {
        let (received, heard) = watch::channel(false);
        #[cfg(unix)]
        let signal = {
            use tokio::signal::unix::{SignalKind, signal};
            let handlers = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            );
            async move {
                match handlers {
                    (Ok(mut term), Ok(mut int)) => {
                        tokio::select! {
                            _ = term.recv() => tracing::info!("SIGTERM received; draining"),
                            _ = int.recv() => tracing::info!("SIGINT received; draining"),
                        }
                    }
                    _ => {
                        tracing::error!("cannot install signal handlers; Ctrl-C only");
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
            }
        };
        #[cfg(not(unix))]
        let signal = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        tokio::spawn(async move {
            signal.await;
            // Kept after the sender is gone: whoever looks later reads it at once.
            received.send_replace(true);
        });
        Self(heard)
    }

    /// Resolves once a signal was received (at once if one was).
    pub fn received(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut heard = self.0.clone();
        async move {
            let _ = heard.wait_for(|received| *received).await;
        }
    }
}

/// How a server run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Every in-flight call finished within the grace period.
    Drained,
    /// The grace period ran out with calls still in flight; they were cut.
    GraceElapsed,
}

/// Runs `serve` until it returns; once `drain` starts, gives it at most `grace` to finish.
pub async fn bounded<F, E>(serve: F, drain: &Drain, grace: Duration) -> Result<Ended, E>
where
    F: Future<Output = Result<(), E>>,
{
    let deadline = {
        let started = drain.started();
        async move {
            started.await;
            tokio::time::sleep(grace).await;
        }
    };
    tokio::select! {
        result = serve => result.map(|()| Ended::Drained),
        () = deadline => {
            tracing::warn!(grace = ?grace, "grace period elapsed with calls in flight; stopping");
            Ok(Ended::GraceElapsed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SIGTERM that comes after `listen` and before anything waits for it (a process ready
    /// before its drain task runs) is heard: without the handler installed at the call, it
    /// would kill this test's process.
    #[cfg(unix)]
    #[tokio::test]
    async fn a_sigterm_before_anyone_waits_is_heard_not_fatal() {
        let termination = Termination::listen();
        let pid = std::process::id().to_string();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(20), termination.received())
            .await
            .expect("the SIGTERM sent before anyone waited is heard");
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_cuts_a_server_that_outlives_the_grace() {
        let drain = Drain::new();
        drain.start();
        let never = std::future::pending::<Result<(), ()>>();
        let ended = bounded(never, &drain, Duration::from_secs(10)).await;
        assert_eq!(ended, Ok(Ended::GraceElapsed));
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_waits_for_a_server_that_finishes() {
        let drain = Drain::new();
        let d = drain.clone();
        let serve = async move {
            d.started().await;
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<(), ()>(())
        };
        drain.start();
        assert_eq!(
            bounded(serve, &drain, Duration::from_secs(10)).await,
            Ok(Ended::Drained)
        );
    }

    #[tokio::test]
    async fn started_resolves_for_late_waiters_too() {
        let drain = Drain::new();
        drain.start();
        drain.start();
        drain.started().await;
        assert!(drain.is_draining());
    }
}
