//! Password hashing with argon2id on the blocking pool, a bounded number at a time and a
//! bounded number waiting, so that a wave of logins can neither starve every other call of CPU
//! nor queue without end: past the queue, it is refused at once with a retry delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use super::error::IdentityError;

/// Hashes and verifies passwords.
#[derive(Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    argon2: Argon2<'static>,
    /// A hash of a random password, verified against when the e-mail is unknown so that an
    /// unknown e-mail costs the same time as a wrong password.
    decoy: Arc<String>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("available_permits", &self.permits.available_permits())
            .finish()
    }
}

impl Passwords {
    /// At most `concurrency` hashes run at once and `max_waiting` wait for a slot; OWASP's
    /// argon2id parameters (19 MiB, t=2, p=1).
    pub fn new(concurrency: usize, max_waiting: usize) -> anyhow::Result<Self> {
        let params = Params::new(19 * 1024, 2, 1, None)
            .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let decoy = argon2
            .hash_password(uuid::Uuid::new_v4().to_string().as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
            .to_string();
        Ok(Self {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting,
            argon2,
            decoy: Arc::new(decoy),
        })
    }

    /// The PHC string of `password` with a fresh salt.
    pub async fn hash(&self, password: String) -> Result<String, IdentityError> {
        let argon2 = self.argon2.clone();
        self.blocking(move || {
            let salt = SaltString::generate(&mut rand::rngs::OsRng);
            argon2
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| IdentityError::Internal(anyhow::anyhow!("argon2: {e}")))
        })
        .await
    }

    /// Whether `password` matches `hash`; with no hash (unknown user) verifies against the
    /// decoy and answers false, taking as long as a real check.
    pub async fn verify(
        &self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, IdentityError> {
        let argon2 = self.argon2.clone();
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| self.decoy.as_str().to_owned());
        self.blocking(move || {
            let parsed = PasswordHash::new(&hash)
                .map_err(|e| IdentityError::Internal(anyhow::anyhow!("stored hash: {e}")))?;
            Ok(argon2.verify_password(password.as_bytes(), &parsed).is_ok() && known)
        })
        .await
    }

    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> Result<T, IdentityError> + Send + 'static,
    ) -> Result<T, IdentityError> {
        let _permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let waiting = Waiting::join(&self.waiting);
                if waiting.ahead >= self.max_waiting {
                    return Err(IdentityError::Busy);
                }
                self.permits
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| IdentityError::Internal(anyhow::anyhow!("hash pool closed")))?
            }
        };
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|e| IdentityError::Internal(anyhow::anyhow!("hash task: {e}")))?
    }
}

/// A place in the queue for a hashing slot, given back when dropped (also when the waiting call
/// is cancelled).
struct Waiting<'a> {
    count: &'a AtomicUsize,
    ahead: usize,
}

impl<'a> Waiting<'a> {
    fn join(count: &'a AtomicUsize) -> Self {
        let ahead = count.fetch_add(1, Ordering::SeqCst);
        Self { count, ahead }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_never_do() {
        let passwords = Passwords::new(2, 4).unwrap();
        let hash = passwords.hash("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(
            passwords
                .verify("correct horse".into(), Some(hash.clone()))
                .await
                .unwrap()
        );
        assert!(!passwords.verify("wrong".into(), Some(hash)).await.unwrap());
        assert!(
            !passwords
                .verify("correct horse".into(), None)
                .await
                .unwrap()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_queue_a_hash_is_refused_at_once() {
        let passwords = Passwords::new(1, 2).unwrap();
        let busy_slot = passwords.permits.clone().acquire_owned().await.unwrap();
        let queued: Vec<_> = (0..2)
            .map(|_| {
                let passwords = passwords.clone();
                tokio::spawn(async move { passwords.hash("correct horse".into()).await })
            })
            .collect();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while passwords.waiting.load(Ordering::SeqCst) < 2 {
            assert!(std::time::Instant::now() < deadline, "two calls queue");
            tokio::task::yield_now().await;
        }
        assert!(matches!(
            passwords.hash("correct horse".into()).await,
            Err(IdentityError::Busy)
        ));
        drop(busy_slot);
        for call in queued {
            assert!(
                call.await.unwrap().is_ok(),
                "the queued calls get their turn"
            );
        }
        assert_eq!(passwords.waiting.load(Ordering::SeqCst), 0);
    }
}
