//! ServiceTokenService: short-lived access tokens of role `service` for keel's own services, in
//! exchange for the deployment's service secret. Only such a token reaches the internal APIs.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use keel_auth::{AccessClaims, ISSUER};
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::keys::SigningKeys;
use crate::input::FieldError;
use crate::principal::SERVICE_ROLE;
use crate::proto::keel::identity::v1::service_token_service_server::ServiceTokenService as ServiceTokenApi;
use crate::proto::keel::identity::v1::{IssueServiceTokenRequest, IssueServiceTokenResponse};

/// How long a service token lives.
const SERVICE_TOKEN_TTL: Duration = Duration::from_secs(300);

/// Issues service tokens.
#[derive(Clone)]
pub struct ServiceTokens {
    keys: Arc<SigningKeys>,
    secret: [u8; 32],
}

impl std::fmt::Debug for ServiceTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTokens").finish_non_exhaustive()
    }
}

impl ServiceTokens {
    /// Tokens signed by `keys` for callers that present `secret`.
    pub fn new(keys: Arc<SigningKeys>, secret: &str) -> Self {
        Self {
            keys,
            secret: Sha256::digest(secret.as_bytes()).into(),
        }
    }

    /// Whether `presented` is the secret, compared in constant time.
    fn admits(&self, presented: &str) -> bool {
        let presented: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        presented
            .iter()
            .zip(&self.secret)
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
    }

    fn issue(&self, r: IssueServiceTokenRequest) -> Result<IssueServiceTokenResponse, Status> {
        let service = r.service.trim();
        if service.is_empty()
            || service.len() > 32
            || !service.bytes().all(|b| b.is_ascii_lowercase() || b == b'-')
        {
            return Err(
                FieldError::new("service", "a lower-case service name such as orders").into(),
            );
        }
        if !self.admits(&r.secret) {
            tracing::warn!(%service, "a service token was asked for with a wrong secret");
            return Err(Status::unauthenticated("invalid service credentials"));
        }
        let now = Utc::now().timestamp();
        let ttl = i64::try_from(SERVICE_TOKEN_TTL.as_secs()).unwrap_or(300);
        let claims = AccessClaims {
            sub: format!("services/{service}"),
            role: SERVICE_ROLE.to_owned(),
            iss: ISSUER.to_owned(),
            aud: ISSUER.to_owned(),
            iat: now,
            exp: now + ttl,
            jti: Uuid::now_v7().to_string(),
            generation: 0,
        };
        let access_token = self.keys.sign(&claims).map_err(|e| {
            tracing::error!(error = %format!("{e:#}"), "cannot sign a service token");
            Status::internal("internal error")
        })?;
        Ok(IssueServiceTokenResponse {
            access_token,
            expires_in: ttl,
        })
    }
}

#[tonic::async_trait]
impl ServiceTokenApi for ServiceTokens {
    async fn issue_service_token(
        &self,
        request: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<IssueServiceTokenResponse>, Status> {
        Ok(Response::new(self.issue(request.into_inner())?))
    }
}
