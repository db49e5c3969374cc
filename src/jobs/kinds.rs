//! The job kinds people may make through JobService, what each accepts, and what runs them:
//! `email.send` (admins; `to`, `subject`, `body`) and `noop` (admins; for trying the queue: an
//! optional `sleep_ms` and an optional `fail` that every attempt ends with).

use async_trait::async_trait;
use keel_queue::{Failure, Handler, Job};
use serde_json::Value;

use crate::input::{self, FieldError};
use crate::mail::{EMAIL_SEND, Email, Postman};

/// The kind that does nothing (or fails, or takes its time).
pub const NOOP: &str = "noop";
/// Longest a `noop` may sleep.
const MAX_SLEEP_MS: u64 = 60_000;

/// Who may make a kind through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Admins.
    Admins,
    /// Nobody: keel makes these itself (listed, as the proto's Job schema says).
    Keel,
}

/// The kinds keel writes for itself; a test checks them against the kinds a keel runs.
pub const KEEL_OWN: &[&str] = &[
    "order.saga",
    "order.email",
    "order.reconcile",
    "cache.invalidate",
];

/// Checks `payload` for `kind` and says who may make it; unknown kinds are refused.
pub fn accept(kind: &str, payload: &Value) -> Result<(Value, Who), FieldError> {
    match kind {
        EMAIL_SEND => {
            let text = |name: &'static str, field: &'static str, max: usize, multiline: bool| {
                let raw = payload
                    .get(name)
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                input::text(raw, field, 1, max, multiline)
            };
            let email = Email {
                to: input::email(
                    payload
                        .get("to")
                        .and_then(Value::as_str)
                        .unwrap_or_default(),
                    "job.payload.to",
                )?,
                subject: text("subject", "job.payload.subject", 200, false)?,
                body: text("body", "job.payload.body", 100_000, true)?,
            };
            Ok((serde_json::to_value(email).unwrap_or_default(), Who::Admins))
        }
        NOOP => {
            let sleep_ms = match payload.get("sleep_ms") {
                None | Some(Value::Null) => 0,
                Some(v) => v
                    .as_f64()
                    .filter(|ms| *ms >= 0.0 && *ms <= MAX_SLEEP_MS as f64)
                    .ok_or_else(|| {
                        FieldError::new(
                            "job.payload.sleep_ms",
                            format!("a number of milliseconds up to {MAX_SLEEP_MS}"),
                        )
                    })? as u64,
            };
            let fail = match payload.get("fail") {
                None | Some(Value::Null) => None,
                Some(v) => Some(input::text(
                    v.as_str().unwrap_or_default(),
                    "job.payload.fail",
                    1,
                    500,
                    false,
                )?),
            };
            Ok((
                serde_json::json!({"sleep_ms": sleep_ms, "fail": fail}),
                Who::Admins,
            ))
        }
        own if KEEL_OWN.contains(&own) => Ok((payload.clone(), Who::Keel)),
        other => Err(FieldError::new(
            "job.type",
            format!("unknown job type {other:?}; known: {EMAIL_SEND}, {NOOP}"),
        )),
    }
}

/// Runs `email.send` jobs: the payload is the message.
pub struct EmailSend(pub Postman);

#[async_trait]
impl Handler for EmailSend {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        let email: Email = serde_json::from_value(job.payload.clone())
            .map_err(|e| Failure::Permanent(format!("not an e-mail: {e}")))?;
        self.0.deliver(job, &email).await
    }
}

/// Runs `noop` jobs.
#[derive(Debug, Default)]
pub struct Noop;

#[async_trait]
impl Handler for Noop {
    async fn run(&self, job: &Job) -> Result<(), Failure> {
        let sleep = job
            .payload
            .get("sleep_ms")
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .min(MAX_SLEEP_MS);
        if sleep > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(sleep)).await;
        }
        match job.payload.get("fail").and_then(Value::as_str) {
            Some(error) => Err(Failure::Retry(error.to_owned())),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads_are_checked_per_kind() {
        let email = json!({"to": "Ada@Example.com", "subject": "Hi", "body": "Hello"});
        let (checked, who) = accept(EMAIL_SEND, &email).unwrap();
        assert_eq!(
            (checked["to"].as_str(), who),
            (Some("ada@example.com"), Who::Admins)
        );
        let no_subject = json!({"to": "ada@example.com", "body": "x"});
        assert_eq!(
            accept(EMAIL_SEND, &no_subject).unwrap_err().field,
            "job.payload.subject"
        );
        assert_eq!(accept(NOOP, &json!({})).unwrap().1, Who::Admins);
        assert!(accept(NOOP, &json!({"sleep_ms": -1})).is_err());
        assert!(accept(NOOP, &json!({"sleep_ms": 1e9})).is_err());
        assert_eq!(accept("rm.rf", &json!({})).unwrap_err().field, "job.type");
    }
}
