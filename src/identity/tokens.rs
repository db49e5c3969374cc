//! Opaque secrets (refresh tokens, e-mail codes): 256 random bits, handed out once, stored only as
//! a SHA-256 hash.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// Every refresh token starts with this, so that a leaked one is easy to recognise in logs and
/// secret scanners.
const PREFIX: &str = "krt_";

/// Every e-mail confirmation code starts with this.
const EMAIL_CODE_PREFIX: &str = "kec_";

/// A new refresh token and its hash.
pub fn new_refresh_token() -> (String, String) {
    new_secret(PREFIX)
}

/// A new e-mail confirmation code and its hash.
pub fn new_email_code() -> (String, String) {
    new_secret(EMAIL_CODE_PREFIX)
}

fn new_secret(prefix: &str) -> (String, String) {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let secret = format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes));
    let hash = hash(&secret);
    (secret, hash)
}

/// The stored form of a secret. A high-entropy secret needs no slow hash.
pub fn hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_and_hashed() {
        let (a, ha) = new_refresh_token();
        let (b, hb) = new_refresh_token();
        assert_ne!(a, b);
        assert_ne!(ha, hb);
        assert_eq!(hash(&a), ha);
        assert!(a.starts_with(PREFIX));
        assert_eq!(ha.len(), 64);
    }
}
