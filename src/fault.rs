//! Named fault points, for tests that prove a guarantee at the worst statement: the process
//! kills itself there (SIGKILL), or stands still there (SIGSTOP: a long pause, as a frozen VM or a
//! stop-the-world collector makes one) until the test sends SIGCONT or SIGKILL. Compiled only
//! with the `fault-injection` feature, which the test suite enables: a release binary has no
//! fault point and reads no variable for them.
//!
//! `KEEL_FAULT_POINTS=order.charge.refused=stop,mail.before_send=kill` arms points; each fires
//! the first time the process reaches it, and never again.

/// Reaching the point called `name`: nothing happens unless a test armed it.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Reaching the point called `name`: a test may have armed it to kill or stop this process.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    armed::reach(name);
}

#[cfg(feature = "fault-injection")]
mod armed {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    use nix::sys::signal::{Signal, raise};

    /// What an armed point does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Action {
        Kill,
        Stop,
    }

    struct Armed {
        name: String,
        action: Action,
        fired: AtomicBool,
    }

    fn points() -> &'static [Armed] {
        static POINTS: OnceLock<Vec<Armed>> = OnceLock::new();
        POINTS.get_or_init(|| {
            std::env::var("KEEL_FAULT_POINTS")
                .unwrap_or_default()
                .split(',')
                .filter(|p| !p.trim().is_empty())
                .map(|p| {
                    let (name, action) = p.trim().split_once('=').unwrap_or((p.trim(), "kill"));
                    Armed {
                        name: name.to_owned(),
                        action: if action == "stop" {
                            Action::Stop
                        } else {
                            Action::Kill
                        },
                        fired: AtomicBool::new(false),
                    }
                })
                .collect()
        })
    }

    pub fn reach(name: &str) {
        let Some(armed) = points().iter().find(|p| p.name == name) else {
            return;
        };
        if armed.fired.swap(true, Ordering::SeqCst) {
            return;
        }
        // Raised on this thread: the thread that reached the point takes the signal itself
        // before it runs another instruction. (`kill` of the process let the kernel hand the stop
        // to any thread; under load that thread ran milliseconds later, and this one went on
        // meanwhile: it wrote the very decision the test meant to hold back.)
        match armed.action {
            Action::Kill => {
                tracing::warn!(point = name, "fault point reached: killing this process");
                let _ = raise(Signal::SIGKILL);
                std::process::abort();
            }
            Action::Stop => {
                tracing::warn!(point = name, "fault point reached: stopping this process");
                // The whole process stands still until SIGCONT.
                let _ = raise(Signal::SIGSTOP);
                tracing::warn!(point = name, "fault point: continued");
            }
        }
    }
}
