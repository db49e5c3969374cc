//! Access tokens in a process: who signs them (identity's keys here, reloaded as they rotate)
//! or publishes the keys that verify them, and the revocations every process checks.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use keel_auth::{KeySource, TokenVerifier};
use keel_server::{Drain, Health};

use keel_auth::VerificationKey;
use keel_mesh::client::MeshChannel;

use crate::config::Settings;
use crate::domain::{Domain, Parts};
use crate::identity::{self, LocalKeys, SigningKeys};
use crate::peers::Peers;
use crate::proto::keel::identity::v1::GetJwksRequest;
use crate::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;

/// How this process verifies access tokens, and the keys it signs them with when it does: identity
/// signs them here, or publishes its key set at its endpoints; without either (development),
/// the signing key file or the development key verifies them.
pub(super) fn token_verification(
    settings: &Settings,
    domains: &[&Domain],
    peers: &Peers,
) -> anyhow::Result<(Option<Arc<SigningKeys>>, TokenVerifier)> {
    let signing = if signs_tokens(settings, domains) {
        let identity = &settings.identity;
        Some(Arc::new(match &identity.signing_key {
            Some(path) => SigningKeys::load(path)?,
            None => SigningKeys::development(&settings.stores.data_dir)?,
        }))
    } else {
        None
    };
    let source: Arc<dyn KeySource> = match &signing {
        Some(keys) => Arc::new(LocalKeys(keys.clone())),
        None => Arc::new(RemoteKeys(
            peers
                .get(identity::DOMAIN.name)
                .context("identity's channel")?
                .clone(),
        )),
    };
    Ok((
        signing,
        TokenVerifier::with_refresh(source, settings.identity.key_set_refresh),
    ))
}

/// Whether a process serving `domains` signs access tokens itself: identity runs in it, or
/// nothing says where identity runs (development, every service in one process).
pub fn signs_tokens(settings: &Settings, domains: &[&Domain]) -> bool {
    domains.contains(&&identity::DOMAIN)
        || settings.mesh.endpoints.get(identity::DOMAIN.name).is_none()
}

/// `verifier`, also checking tokens against their subject's generation where the stores are
/// (`parts`); the gateway alone leaves that to the services it calls.
pub(super) fn checking_revocations(
    verifier: TokenVerifier,
    parts: Option<&Parts<'_>>,
) -> Arc<TokenVerifier> {
    Arc::new(match parts {
        Some(parts) => verifier.with_revocations(Arc::new(Generations {
            cache: parts.cache(identity::GENERATIONS),
            directory: identity::Directory::new(parts.db.clone()),
        })),
        None => verifier,
    })
}

/// Token generations as identity keeps them, read through the shared cache: what makes a
/// revoked token fail in every process.
struct Generations {
    cache: keel_cache::CacheAside,
    directory: identity::Directory,
}

#[async_trait::async_trait]
impl keel_auth::Revocations for Generations {
    async fn generation(&self, subject: &str) -> Option<u64> {
        identity::generation(&self.cache, &self.directory, subject).await
    }
}

/// What a process that verifies tokens with identity's published key set waits for.
pub(super) const KEY_SET: &str = "identity's token key set";

/// Lets `healths` stop waiting for [`KEY_SET`] once `verifier` holds it, fetched over the mesh,
/// or once `wait` has passed without it: a process that cannot verify a token yet is not ready
/// for one, but an identity that stays away does not keep its public calls down. Past `wait` the
/// set is still fetched here until it comes, so that the first token after identity is up finds
/// it (fetched on that token instead, it waited on a peer the mesh might not have admitted yet).
pub(super) async fn key_set_awaited(
    verifier: Arc<TokenVerifier>,
    healths: Vec<Health>,
    wait: Duration,
) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut pause = Duration::from_millis(50);
    let held = loop {
        match tokio::time::timeout_at(deadline, verifier.fetch_keys()).await {
            Ok(Ok(())) => break true,
            Ok(Err(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause)).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            _ => break false,
        }
    };
    for health in &healths {
        health.waiting_for(KEY_SET, false).await;
    }
    if held {
        return;
    }
    tracing::warn!(
        ?wait,
        "no token key set from identity yet; ready all the same, still fetching it"
    );
    while verifier.fetch_keys().await.is_err() {
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
    tracing::info!("token key set from identity fetched, after the wait");
}

/// Reads the signing keys again every `every` until the drain starts, so that a rotated key
/// signs and a removed one is no longer published.
pub(super) async fn reload_keys(keys: Arc<SigningKeys>, every: Duration, drain: Drain) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = drain.started() => return,
        }
        let keys = keys.clone();
        match tokio::task::spawn_blocking(move || keys.reload()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "cannot reload the signing keys")
            }
            Err(e) => tracing::warn!(error = %e, "signing key reload panicked"),
        }
    }
}

/// The token key set as identity publishes it (GetJwks), fetched over the mesh.
#[derive(Clone)]
pub struct RemoteKeys(pub MeshChannel);

#[async_trait::async_trait]
impl KeySource for RemoteKeys {
    async fn keys(&self) -> anyhow::Result<Vec<VerificationKey>> {
        let jwks = IdentityServiceClient::new(self.0.clone())
            .get_jwks(GetJwksRequest {})
            .await?
            .into_inner();
        Ok(jwks
            .keys
            .into_iter()
            .map(|k| VerificationKey { kid: k.kid, x: k.x })
            .collect())
    }
}
