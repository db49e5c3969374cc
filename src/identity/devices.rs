//! Device tokens: proof that a client signed in to an account before. Failed sign-ins that come
//! with one for the account they name are counted apart from everyone else's, so that failures
//! aimed at an account from anywhere cannot lock its owner out (OWASP's "device cookies").
//!
//! A token is `kdv_` and, in base64url, the user's id, a random device id, an expiry (Unix
//! seconds) and an HMAC-SHA256 of those under a key derived from the deployment's service secret:
//! nothing is stored, and a token is worth nothing for another account or after it expires.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use uuid::Uuid;

const PREFIX: &str = "kdv_";
/// How long a device stays known without signing in again.
const LIFETIME: chrono::Duration = chrono::Duration::days(180);
/// user id, device id, expiry.
const SIGNED: usize = 16 + 16 + 8;
const MAC: usize = 32;

/// Issues and checks device tokens.
#[derive(Clone)]
pub struct Devices {
    key: Hmac<Sha256>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Devices")
    }
}

/// A device that signed in to an account before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The account it signed in to.
    pub user_id: Uuid,
    /// Which device: its own bucket of failed sign-ins.
    pub id: Uuid,
}

impl Devices {
    /// Tokens under a key derived from `secret` (the deployment's service secret).
    pub fn new(secret: &str) -> Self {
        let mut derive =
            Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
        derive.update(b"keel device tokens v1");
        let key = derive.finalize().into_bytes();
        Self {
            key: Hmac::new_from_slice(&key).expect("HMAC takes any key"),
        }
    }

    /// A token for a new device of `user_id`.
    pub fn issue(&self, user_id: Uuid) -> String {
        let expires = (chrono::Utc::now() + LIFETIME).timestamp();
        let mut bytes = Vec::with_capacity(SIGNED + MAC);
        bytes.extend_from_slice(user_id.as_bytes());
        bytes.extend_from_slice(Uuid::new_v4().as_bytes());
        bytes.extend_from_slice(&expires.to_be_bytes());
        let mut mac = self.key.clone();
        mac.update(&bytes);
        bytes.extend_from_slice(&mac.finalize().into_bytes());
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(bytes))
    }

    /// The device `token` proves, if it is one of ours and has not expired.
    pub fn verify(&self, token: &str) -> Option<Device> {
        let bytes = URL_SAFE_NO_PAD.decode(token.strip_prefix(PREFIX)?).ok()?;
        if bytes.len() != SIGNED + MAC {
            return None;
        }
        let (signed, tag) = bytes.split_at(SIGNED);
        let mut mac = self.key.clone();
        mac.update(signed);
        mac.verify_slice(tag).ok()?;
        let expires = i64::from_be_bytes(signed[32..].try_into().ok()?);
        (expires > chrono::Utc::now().timestamp()).then(|| Device {
            user_id: Uuid::from_slice(&signed[..16]).expect("16 bytes"),
            id: Uuid::from_slice(&signed[16..32]).expect("16 bytes"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_proves_its_device_to_its_own_key_only() {
        let (ours, theirs) = (Devices::new("one secret"), Devices::new("another"));
        let user = Uuid::now_v7();
        let token = ours.issue(user);
        let device = ours.verify(&token).expect("ours");
        assert_eq!(device.user_id, user);
        assert_ne!(ours.verify(&ours.issue(user)).unwrap().id, device.id);
        assert_eq!(theirs.verify(&token), None);
        let mut forged = URL_SAFE_NO_PAD
            .decode(token.strip_prefix(PREFIX).unwrap())
            .unwrap();
        forged[0] ^= 1;
        let forged = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(forged));
        for bad in [
            forged.as_str(),
            "",
            "kdv_",
            "kdv_!!",
            &token[..token.len() - 2],
        ] {
            assert_eq!(ours.verify(bad), None, "{bad}");
        }
    }
}
