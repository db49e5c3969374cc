//! Access tokens: the claims identity signs, their local verification against a JWKS (cached,
//! refetched on an unknown `kid` and refreshed on an interval, so that a removed key stops
//! verifying) with verified tokens remembered until they expire, and the tower layer that
//! attaches the verified [`Caller`] to every request that carries `authorization: Bearer …`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{Request, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

/// The `iss` and `aud` of every keel access token.
pub const ISSUER: &str = "keel";

/// What an access token says. Identity signs these; every service verifies them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The principal's id.
    pub sub: String,
    /// The principal's role, as the issuer names it.
    pub role: String,
    /// Always [`ISSUER`].
    pub iss: String,
    /// Always [`ISSUER`].
    pub aud: String,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Expires at, seconds since the epoch.
    pub exp: i64,
    /// Unique token id.
    pub jti: String,
    /// The subject's token generation when this was signed: once the subject's generation moves
    /// past it (a role change, a sign-out, a deletion), the token is revoked. Absent (0) in
    /// tokens signed before generations existed and in service tokens.
    #[serde(default)]
    pub generation: u64,
}

/// The verified principal of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's subject.
    pub subject: String,
    /// The token's role.
    pub role: String,
}

impl Caller {
    /// The caller of `request`, or UNAUTHENTICATED when it carried no bearer token.
    pub fn of<T>(request: &tonic::Request<T>) -> Result<&Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))
    }
}

/// One Ed25519 verification key of a JWKS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerificationKey {
    /// The key id that tokens name in their `kid` header.
    pub kid: String,
    /// The public key, base64url without padding (the JWK `x`).
    pub x: String,
}

/// Where verification keys come from: identity's key set in-process, or its GetJwks over gRPC.
#[async_trait]
pub trait KeySource: Send + Sync + 'static {
    /// The current keys.
    async fn keys(&self) -> anyhow::Result<Vec<VerificationKey>>;
}

/// Where the current generation of a subject's tokens is read. Tokens carry the generation they
/// were signed at; a token older than its subject's current one was revoked.
#[async_trait]
pub trait Revocations: Send + Sync + 'static {
    /// The generation a token of `subject` must carry at least (`u64::MAX` for a subject that is
    /// gone); `None` when it cannot be read right now, and the token is judged by its signature
    /// and expiry alone.
    async fn generation(&self, subject: &str) -> Option<u64>;
}

/// Why a token was refused. Every variant is UNAUTHENTICATED to the caller.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Not `Bearer <jwt>`, not a JWT, or an algorithm other than EdDSA (`none` included).
    #[error("malformed or unsupported access token")]
    Malformed,
    /// Signed by a key that the key set does not hold, even after a refetch.
    #[error("access token signed by an unknown key")]
    UnknownKey,
    /// Past its expiry.
    #[error("access token expired")]
    Expired,
    /// Bad signature, wrong issuer or audience, missing claims.
    #[error("invalid access token")]
    Invalid,
    /// The key set could not be fetched.
    #[error("cannot verify access tokens right now")]
    KeysUnavailable,
    /// Signed before its subject's tokens were revoked: sign in (or refresh) again.
    #[error("access token revoked")]
    Revoked,
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::KeysUnavailable => Status::unavailable(e.to_string()),
            _ => Status::unauthenticated(e.to_string()),
        }
    }
}

/// The shortest time between two refetches of the key set triggered by unknown `kid`s, so that
/// a stream of forged `kid`s cannot turn into a stream of fetches.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(5);

/// How long a fetched key set is used before it is fetched again, by default.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);

/// Seconds a token is still accepted after its `exp`, for clocks that disagree a little.
const LEEWAY_SECONDS: i64 = 30;

/// Most memory the verified tokens remembered take (each about 250 bytes: some 60,000 tokens).
const VERIFIED_BYTES: u64 = 16 * 1024 * 1024;

/// What a verified token said, remembered under the token's SHA-256.
#[derive(Debug)]
struct Verified {
    caller: Caller,
    kid: String,
    exp: i64,
    generation: u64,
}

impl Verified {
    /// What remembering it costs: its digest, itself, its strings, and the cache's bookkeeping.
    fn weight(&self) -> u32 {
        let strings = self.caller.subject.len() + self.caller.role.len() + self.kid.len();
        u32::try_from(32 + std::mem::size_of::<Self>() + strings + 96).unwrap_or(u32::MAX)
    }
}

/// The verified tokens remembered, at most `bytes` of them.
fn remembered(bytes: u64) -> moka::sync::Cache<[u8; 32], Arc<Verified>> {
    moka::sync::Cache::builder()
        .weigher(|_, verified: &Arc<Verified>| verified.weight())
        .max_capacity(bytes)
        .build()
}

/// Seconds since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

fn system_clock() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Verifies access tokens locally against a cached key set.
pub struct TokenVerifier {
    source: Arc<dyn KeySource>,
    keys: RwLock<Arc<HashMap<String, DecodingKey>>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    /// When the key set is due for a refresh, in milliseconds since `epoch` (0: never fetched).
    due: AtomicU64,
    epoch: Instant,
    refresh: Duration,
    validation: Validation,
    /// Tokens already verified: a hit costs a hash instead of an Ed25519 verification.
    verified: moka::sync::Cache<[u8; 32], Arc<Verified>>,
    revocations: Option<Arc<dyn Revocations>>,
    clock: Clock,
    signature_checks: AtomicU64,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").finish_non_exhaustive()
    }
}

impl TokenVerifier {
    /// A verifier that fetches keys from `source` when it first needs them, and again once they
    /// are [`DEFAULT_REFRESH`] old.
    pub fn new(source: Arc<dyn KeySource>) -> Self {
        Self::with_refresh(source, DEFAULT_REFRESH)
    }

    /// A verifier whose key set is fetched again once it is `refresh` old.
    pub fn with_refresh(source: Arc<dyn KeySource>, refresh: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss", "aud"]);
        // Expiry is checked against `clock`, here and for remembered tokens alike.
        validation.validate_exp = false;
        Self {
            source,
            keys: RwLock::new(Arc::new(HashMap::new())),
            last_fetch: tokio::sync::Mutex::new(None),
            due: AtomicU64::new(0),
            epoch: Instant::now(),
            refresh,
            validation,
            verified: remembered(VERIFIED_BYTES),
            revocations: None,
            clock: Arc::new(system_clock),
            signature_checks: AtomicU64::new(0),
        }
    }

    /// The same verifier reading the time from `clock` (seconds since the epoch).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The same verifier refusing tokens older than their subject's generation in
    /// `revocations`, on every call (remembered tokens included).
    pub fn with_revocations(mut self, revocations: Arc<dyn Revocations>) -> Self {
        self.revocations = Some(revocations);
        self
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The caller that `token` (a compact JWT) names, if it verifies. A token verified before is
    /// taken from memory while it has not expired and its key is still in the key set.
    pub async fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if let Some(known) = self.verified.get(&digest) {
            if self.now_ms() >= self.due.load(Ordering::Relaxed) {
                let _ = self.refetch(Refetch::Due).await;
            }
            if self.cached(&known.kid).is_some() {
                if (self.clock)() > known.exp.saturating_add(LEEWAY_SECONDS) {
                    self.verified.invalidate(&digest);
                    return Err(AuthError::Expired);
                }
                self.not_revoked(&known).await?;
                return Ok(known.caller.clone());
            }
            // Its key left the set: verify afresh, which refuses it.
            self.verified.invalidate(&digest);
        }
        let verified = self.verify_signature(token).await?;
        self.not_revoked(&verified).await?;
        let caller = verified.caller.clone();
        self.verified.insert(digest, Arc::new(verified));
        Ok(caller)
    }

    /// Refuses a token signed before its subject's current generation.
    async fn not_revoked(&self, token: &Verified) -> Result<(), AuthError> {
        let Some(revocations) = &self.revocations else {
            return Ok(());
        };
        match revocations.generation(&token.caller.subject).await {
            Some(current) if token.generation < current => Err(AuthError::Revoked),
            _ => Ok(()),
        }
    }

    /// How many tokens were checked by their signature (not taken from memory).
    pub fn signature_checks(&self) -> u64 {
        self.signature_checks.load(Ordering::Relaxed)
    }

    async fn verify_signature(&self, token: &str) -> Result<Verified, AuthError> {
        self.signature_checks.fetch_add(1, Ordering::Relaxed);
        let header = decode_header(token).map_err(|_| AuthError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(AuthError::Malformed);
        }
        let kid = header.kid.ok_or(AuthError::Malformed)?;
        if self.now_ms() >= self.due.load(Ordering::Relaxed) {
            // Due for a refresh: a failure keeps the keys we have (and is logged).
            let _ = self.refetch(Refetch::Due).await;
        }
        let key = match self.cached(&kid) {
            Some(key) => key,
            None => {
                self.refetch(Refetch::UnknownKey).await?;
                self.cached(&kid).ok_or(AuthError::UnknownKey)?
            }
        };
        let data = decode::<AccessClaims>(token, &key, &self.validation)
            .map_err(|_| AuthError::Invalid)?;
        if (self.clock)() > data.claims.exp.saturating_add(LEEWAY_SECONDS) {
            return Err(AuthError::Expired);
        }
        Ok(Verified {
            caller: Caller {
                subject: data.claims.sub,
                role: data.claims.role,
            },
            kid,
            exp: data.claims.exp,
            generation: data.claims.generation,
        })
    }

    fn cached(&self, kid: &str) -> Option<DecodingKey> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        keys.get(kid).cloned()
    }

    /// Fetches the key set now, whatever is cached: what a starting process does before it
    /// reports ready, so that its first token is not refused for want of keys. A failure keeps
    /// the keys it has, as a refresh's does.
    pub async fn fetch_keys(&self) -> Result<(), AuthError> {
        self.refetch(Refetch::Now).await
    }

    /// Fetches the key set again, as `why` allows.
    async fn refetch(&self, why: Refetch) -> Result<(), AuthError> {
        let mut last = self.last_fetch.lock().await;
        let fresh = match why {
            Refetch::UnknownKey => last.is_some_and(|at| at.elapsed() < MIN_REFETCH_INTERVAL),
            Refetch::Due => self.now_ms() < self.due.load(Ordering::Relaxed),
            Refetch::Now => false,
        };
        if fresh {
            return Ok(());
        }
        let fetched = match self.source.keys().await {
            Ok(fetched) => fetched,
            Err(e) => {
                tracing::warn!(error = %e, "cannot fetch the token key set");
                // Keep the keys we have; try again shortly, not on every call.
                let retry = u64::try_from(MIN_REFETCH_INTERVAL.as_millis()).unwrap_or(u64::MAX);
                self.due
                    .store(self.now_ms().saturating_add(retry), Ordering::Relaxed);
                return Err(AuthError::KeysUnavailable);
            }
        };
        let mut keys = HashMap::new();
        for key in fetched {
            match URL_SAFE_NO_PAD.decode(&key.x) {
                Ok(raw) if raw.len() == 32 => {
                    keys.insert(key.kid, DecodingKey::from_ed_der(&raw));
                }
                _ => tracing::warn!(kid = %key.kid, "skipping a malformed Ed25519 key"),
            }
        }
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        *last = Some(Instant::now());
        let refresh = u64::try_from(self.refresh.as_millis()).unwrap_or(u64::MAX);
        self.due
            .store(self.now_ms().saturating_add(refresh), Ordering::Relaxed);
        Ok(())
    }
}

/// Why the key set is fetched again.
#[derive(Clone, Copy)]
enum Refetch {
    /// A token names a key the set does not hold: at most every [`MIN_REFETCH_INTERVAL`].
    UnknownKey,
    /// The set is due for a refresh: unless another call refreshed it meanwhile.
    Due,
    /// Asked for: always.
    Now,
}

/// Verifies bearer tokens on every request that carries one; requests without one pass through
/// without a [`Caller`] (public RPCs such as Register accept them; others refuse them). A
/// request that already carries a [`Caller`] was verified in this process and is not verified
/// again.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    verifier: Arc<TokenVerifier>,
}

impl AuthLayer {
    /// A layer verifying with `verifier`.
    pub fn new(verifier: Arc<TokenVerifier>) -> Self {
        Self { verifier }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            verifier: self.verifier.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    verifier: Arc<TokenVerifier>,
}

fn bearer(value: &http::HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl<S, B> Service<Request<B>> for AuthService<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // A caller this process already verified (its gateway calling in process) passes as is:
        // a request read from the network starts with no extensions, so none can claim one.
        if request.extensions().get::<Caller>().is_some() {
            return Box::pin(self.inner.call(request));
        }
        let Some(header) = request.headers().get(http::header::AUTHORIZATION) else {
            return Box::pin(self.inner.call(request));
        };
        let Some(token) = bearer(header).map(str::to_owned) else {
            let status = Status::unauthenticated("authorization must be `Bearer <access token>`");
            return Box::pin(async move { Ok(status.into_http()) });
        };
        // The service that was made ready is the one that must be called; take it and leave a
        // fresh clone behind (tower's documented pattern for async work before the call).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        Box::pin(async move {
            match verifier.verify(&token).await {
                Ok(caller) => {
                    request.extensions_mut().insert(caller);
                    inner.call(request).await
                }
                Err(e) => Ok(Status::from(e).into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Keys(Mutex<Vec<VerificationKey>>, std::sync::atomic::AtomicUsize);

    #[async_trait]
    impl KeySource for Keys {
        async fn keys(&self) -> anyhow::Result<Vec<VerificationKey>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(self.0.lock().unwrap().clone())
        }
    }

    /// A key id, its public key (JWK `x`) and a token it signed.
    fn signed_token() -> (String, String, String) {
        signed_token_expiring(4_000_000_000)
    }

    /// [`signed_token`] with `exp`.
    fn signed_token_expiring(exp: i64) -> (String, String, String) {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let mut der = vec![
            0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22,
            0x04, 0x20,
        ];
        der.extend_from_slice(&key.to_bytes());
        let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
        let mut header = jsonwebtoken::Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let claims = AccessClaims {
            sub: "s".into(),
            role: "user".into(),
            iss: ISSUER.into(),
            aud: ISSUER.into(),
            iat: 0,
            exp,
            jti: "j".into(),
            generation: 1,
        };
        let token = jsonwebtoken::encode(
            &header,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(&der),
        )
        .unwrap();
        ("k1".into(), x, token)
    }

    #[test]
    fn bearer_parsing() {
        let v = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(bearer(&v("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&v("bearer abc")), Some("abc"));
        assert_eq!(bearer(&v("Basic abc")), None);
        assert_eq!(bearer(&v("Bearer ")), None);
        assert_eq!(bearer(&v("abc")), None);
    }

    #[tokio::test]
    async fn an_unknown_kid_is_refetched_once_then_refused() {
        let source = Arc::new(Keys(Mutex::new(vec![]), Default::default()));
        let verifier = TokenVerifier::new(source.clone());
        // A syntactically valid EdDSA header naming a kid nobody has.
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"EdDSA","typ":"JWT","kid":"nope"}"#);
        let token = format!("{header}.e30.c2ln");
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::UnknownKey)
        ));
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::UnknownKey)
        ));
        assert_eq!(
            source.1.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "refetches are rate-limited"
        );
    }

    #[tokio::test]
    async fn keys_fetched_ahead_verify_the_first_token_without_another_fetch() {
        let (kid, x, token) = signed_token();
        let source = Arc::new(Keys(
            Mutex::new(vec![VerificationKey { kid, x }]),
            Default::default(),
        ));
        let verifier = TokenVerifier::new(source.clone());
        verifier.fetch_keys().await.expect("the source answers");
        verifier
            .fetch_keys()
            .await
            .expect("asked again, fetched again");
        verifier
            .verify(&token)
            .await
            .expect("a fetched key verifies");
        assert_eq!(source.1.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_key_removed_from_the_set_stops_verifying_at_the_next_refresh() {
        let (kid, x, token) = signed_token();
        let source = Arc::new(Keys(
            Mutex::new(vec![VerificationKey { kid, x }]),
            Default::default(),
        ));
        let verifier = TokenVerifier::with_refresh(source.clone(), Duration::ZERO);
        verifier.verify(&token).await.expect("a live key verifies");
        source.0.lock().unwrap().clear();
        assert!(
            verifier.verify(&token).await.is_err(),
            "the refresh dropped the key"
        );
    }

    #[tokio::test]
    async fn alg_none_is_refused_without_a_fetch() {
        let source = Arc::new(Keys(Mutex::new(vec![]), Default::default()));
        let verifier = TokenVerifier::new(source.clone());
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD
            .encode(br#"{"sub":"x","role":"admin","iss":"keel","aud":"keel","exp":99999999999}"#);
        let token = format!("{header}.{body}.");
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::Malformed)
        ));
        assert_eq!(source.1.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    fn verifier_of(kid: String, x: String) -> (Arc<Keys>, TokenVerifier) {
        let source = Arc::new(Keys(
            Mutex::new(vec![VerificationKey { kid, x }]),
            Default::default(),
        ));
        (source.clone(), TokenVerifier::new(source))
    }

    #[tokio::test]
    async fn a_verified_token_is_not_verified_again() {
        let (kid, x, token) = signed_token();
        let (_, verifier) = verifier_of(kid, x);
        for _ in 0..5 {
            assert_eq!(verifier.verify(&token).await.unwrap().subject, "s");
        }
        assert_eq!(verifier.signature_checks(), 1);
    }

    #[test]
    fn remembered_tokens_are_bounded_by_their_bytes() {
        let remembered = remembered(64 * 1024);
        for i in 0..1000_u32 {
            let mut digest = [0; 32];
            digest[..4].copy_from_slice(&i.to_be_bytes());
            let verified = Verified {
                caller: Caller {
                    subject: format!("{i:08x}-0000-4000-8000-000000000000"),
                    role: "user".into(),
                },
                kid: "20261205T000000.000000Z-0a1b2c3d".into(),
                exp: 4_000_000_000,
                generation: 1,
            };
            remembered.insert(digest, Arc::new(verified));
        }
        remembered.run_pending_tasks();
        let held: u64 = remembered.iter().map(|(_, v)| u64::from(v.weight())).sum();
        assert!(held <= 64 * 1024, "{held} bytes remembered past 64 KiB");
        assert!(remembered.entry_count() > 0);
    }

    /// The generation of subject `s`, as a test moves it; `None` while it cannot be read.
    struct Generation(std::sync::atomic::AtomicU64);

    #[async_trait]
    impl Revocations for Generation {
        async fn generation(&self, subject: &str) -> Option<u64> {
            assert_eq!(subject, "s");
            match self.0.load(Ordering::SeqCst) {
                u64::MAX => None,
                current => Some(current),
            }
        }
    }

    #[tokio::test]
    async fn a_remembered_token_is_refused_once_its_subjects_generation_moves_on() {
        let (kid, x, token) = signed_token();
        let current = Arc::new(Generation(1.into()));
        let (_, verifier) = verifier_of(kid, x);
        let verifier = verifier.with_revocations(current.clone());
        verifier
            .verify(&token)
            .await
            .expect("signed at the current generation");
        current.0.store(2, Ordering::SeqCst);
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::Revoked)
        ));
        // Unreadable generations judge by signature and expiry alone.
        current.0.store(u64::MAX, Ordering::SeqCst);
        verifier
            .verify(&token)
            .await
            .expect("not known to be revoked");
        assert_eq!(verifier.signature_checks(), 1, "remembered all along");
    }

    #[tokio::test]
    async fn a_remembered_token_expires_with_the_clock() {
        let exp = 2_000_000_000;
        let (kid, x, token) = signed_token_expiring(exp);
        let now = Arc::new(std::sync::atomic::AtomicI64::new(exp - 60));
        let clock = now.clone();
        let (_, verifier) = verifier_of(kid, x);
        let verifier = verifier.with_clock(Arc::new(move || clock.load(Ordering::SeqCst)));
        verifier.verify(&token).await.expect("not yet expired");
        now.store(exp + LEEWAY_SECONDS + 1, Ordering::SeqCst);
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::Expired)
        ));
        assert!(
            matches!(verifier.verify(&token).await, Err(AuthError::Expired)),
            "and stays refused"
        );
    }

    #[tokio::test]
    async fn a_token_altered_by_one_byte_is_refused_beside_its_remembered_original() {
        let (kid, x, token) = signed_token();
        let (_, verifier) = verifier_of(kid, x);
        verifier.verify(&token).await.unwrap();
        let mut altered = token.clone().into_bytes();
        let last = altered.len() - 2;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(matches!(
            verifier.verify(&altered).await,
            Err(AuthError::Invalid)
        ));
        assert!(verifier.verify(&token).await.is_ok());
    }

    #[tokio::test]
    async fn a_remembered_token_of_a_removed_key_is_refused_at_the_refresh() {
        let (kid, x, token) = signed_token();
        let source = Arc::new(Keys(
            Mutex::new(vec![VerificationKey { kid, x }]),
            Default::default(),
        ));
        let verifier = TokenVerifier::with_refresh(source.clone(), Duration::ZERO);
        verifier.verify(&token).await.unwrap();
        verifier.verify(&token).await.unwrap();
        source.0.lock().unwrap().clear();
        assert!(matches!(
            verifier.verify(&token).await,
            Err(AuthError::UnknownKey)
        ));
    }

    /// Calls an [`AuthService`] in front of a handler that answers with the subject it was
    /// given (`-` for none), or the refusal's gRPC status.
    async fn subject_seen(verifier: Arc<TokenVerifier>, request: Request<()>) -> String {
        use tower::ServiceExt as _;
        let handler = tower::service_fn(|request: Request<()>| async move {
            let subject = request
                .extensions()
                .get::<Caller>()
                .map_or("-".to_owned(), |c| c.subject.clone());
            let mut response = Response::new(Body::empty());
            response
                .headers_mut()
                .insert("subject", subject.parse().unwrap());
            Ok::<_, std::convert::Infallible>(response)
        });
        let response = AuthLayer::new(verifier)
            .layer(handler)
            .oneshot(request)
            .await
            .unwrap();
        let header = |name| response.headers().get(name).map(|v| v.to_str().unwrap());
        header("subject")
            .map(str::to_owned)
            .or_else(|| header("grpc-status").map(|code| format!("grpc-status {code}")))
            .unwrap()
    }

    #[tokio::test]
    async fn a_caller_verified_in_process_passes_and_a_claimed_one_is_verified() {
        let (kid, x, token) = signed_token();
        let (_, verifier) = verifier_of(kid, x);
        let verifier = Arc::new(verifier);
        let with_token = |token: &str| {
            Request::builder()
                .header("authorization", format!("Bearer {token}"))
                .body(())
                .unwrap()
        };

        assert_eq!(
            subject_seen(verifier.clone(), with_token(&token)).await,
            "s"
        );
        assert_eq!(verifier.signature_checks(), 1);

        // Verified in this process already (the gateway calling in process): not again.
        let mut vouched = with_token("not-even-a-token");
        vouched.extensions_mut().insert(Caller {
            subject: "in-process".into(),
            role: "user".into(),
        });
        assert_eq!(subject_seen(verifier.clone(), vouched).await, "in-process");

        // Without the extension the same header is what it is: refused.
        let refused = subject_seen(verifier.clone(), with_token("not-even-a-token")).await;
        assert_eq!(refused, "grpc-status 16");
        assert_eq!(subject_seen(verifier, Request::new(())).await, "-");
    }
}
