//! keel's services calling each other's internal APIs as themselves: the deployment's service
//! secret (provisioned, or generated under the data dir in development), exchanged with identity
//! for a short-lived access token of role `service`, cached and renewed before it expires.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use keel_mesh::client::MeshChannel;
use tokio::sync::Mutex;

use crate::config::Settings;
use crate::proto::keel::identity::v1::IssueServiceTokenRequest;
use crate::proto::keel::identity::v1::service_token_service_client::ServiceTokenServiceClient;

/// Where the development service secret lives under the data dir.
const DEV_SECRET_FILE: &str = "service-secret";

/// The service secret: the provisioned one, else the development one under the data dir
/// (generated once; processes sharing the data dir agree on it).
pub fn service_secret(settings: &Settings) -> anyhow::Result<String> {
    if let Some(secret) = &settings.workers.service_secret {
        return Ok(secret.clone());
    }
    development_secret(&settings.stores.data_dir)
}

fn development_secret(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join(DEV_SECRET_FILE);
    if let Ok(secret) = std::fs::read_to_string(&path) {
        return Ok(secret.trim().to_owned());
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("create data dir {}", data_dir.display()))?;
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let staged = data_dir.join(format!(
        ".{DEV_SECRET_FILE}.{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::write(&staged, &secret).with_context(|| format!("write {}", staged.display()))?;
    // A link never replaces: the first process to publish wins, the others read its secret.
    let _ = std::fs::hard_link(&staged, &path);
    let _ = std::fs::remove_file(&staged);
    Ok(std::fs::read_to_string(&path)
        .with_context(|| format!("read {}", path.display()))?
        .trim()
        .to_owned())
}

/// A service's credentials for the internal APIs: a token from identity, renewed a minute
/// before it expires.
pub struct ServiceCredentials {
    identity: MeshChannel,
    service: &'static str,
    secret: String,
    token: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for ServiceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCredentials")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl ServiceCredentials {
    /// `service`'s credentials, obtained from identity at `identity` with `secret`.
    pub fn new(identity: MeshChannel, service: &'static str, secret: String) -> Self {
        Self {
            identity,
            service,
            secret,
            token: Mutex::new(None),
        }
    }

    /// A current token.
    pub async fn token(&self) -> Result<String, tonic::Status> {
        let mut cached = self.token.lock().await;
        if let Some((token, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(token.clone());
        }
        let issued = ServiceTokenServiceClient::new(self.identity.clone())
            .issue_service_token(IssueServiceTokenRequest {
                service: self.service.to_owned(),
                secret: self.secret.clone(),
            })
            .await?
            .into_inner();
        let lifetime = Duration::from_secs(u64::try_from(issued.expires_in).unwrap_or(0));
        let renew_at = Instant::now() + lifetime.saturating_sub(Duration::from_secs(60));
        *cached = Some((issued.access_token.clone(), renew_at));
        Ok(issued.access_token)
    }

    /// `message` as a request carrying this service's token.
    pub async fn request<T>(&self, message: T) -> Result<tonic::Request<T>, tonic::Status> {
        let token = self.token().await?;
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| tonic::Status::internal("internal error"))?;
        request.metadata_mut().insert("authorization", value);
        Ok(request)
    }
}
