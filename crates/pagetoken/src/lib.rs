//! Opaque, tamper-evident page tokens and page sizes for AIP-158 list calls.
//!
//! A token is `base64url(cursor JSON ‖ checksum)`, where the checksum covers the cursor and a
//! fingerprint of the query it continues (filter, order, parent). A token that was edited, cut,
//! or replayed against a different query fails to decode and the caller answers
//! INVALID_ARGUMENT. The checksum is not a secret: a token only ever selects rows the caller may
//! list anyway, so integrity is what matters, not confidentiality.

#![forbid(unsafe_code)]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};

/// Page size when the request leaves `page_size` at 0.
pub const DEFAULT_PAGE_SIZE: u64 = 50;
/// Largest page a list call returns; larger requests are clamped to it (AIP-158).
pub const MAX_PAGE_SIZE: u64 = 1000;

const CHECKSUM_LEN: usize = 16;
const DOMAIN: &[u8] = b"keel.page_token.v1";

/// Why a page token or page size was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PageError {
    /// The token is not one this service issued for this query.
    #[error("page_token is invalid or does not belong to this query")]
    InvalidToken,
    /// `page_size` was negative.
    #[error("page_size must not be negative")]
    NegativePageSize,
}

/// The page size to use for a request's `page_size`: 0 means the default, above the maximum
/// is clamped, negative is an error.
pub fn page_size(requested: i32) -> Result<u64, PageError> {
    match requested {
        n if n < 0 => Err(PageError::NegativePageSize),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as u64).min(MAX_PAGE_SIZE)),
    }
}

/// Encodes `cursor` as a token bound to `query` (a fingerprint of everything but the page).
pub fn encode<C: Serialize>(cursor: &C, query: &str) -> String {
    let mut bytes = serde_json::to_vec(cursor).expect("cursor types serialize infallibly");
    let checksum = checksum(&bytes, query);
    bytes.extend_from_slice(&checksum);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes a token made by [`encode`] for the same `query`. An empty token means "first page"
/// and yields `None`.
pub fn decode<C: DeserializeOwned>(token: &str, query: &str) -> Result<Option<C>, PageError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| PageError::InvalidToken)?;
    if bytes.len() <= CHECKSUM_LEN {
        return Err(PageError::InvalidToken);
    }
    let (payload, sum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
    if checksum(payload, query) != sum {
        return Err(PageError::InvalidToken);
    }
    serde_json::from_slice(payload)
        .map(Some)
        .map_err(|_| PageError::InvalidToken)
}

fn checksum(payload: &[u8], query: &str) -> [u8; CHECKSUM_LEN] {
    let mut hasher = Sha256::new();
    hasher.update(DOMAIN);
    hasher.update((query.len() as u64).to_be_bytes());
    hasher.update(query.as_bytes());
    hasher.update(payload);
    let digest = hasher.finalize();
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&digest[..CHECKSUM_LEN]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Cursor {
        after: String,
    }

    #[test]
    fn page_size_defaults_clamps_and_refuses_negative() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7), Ok(7));
        assert_eq!(page_size(5000), Ok(MAX_PAGE_SIZE));
        assert_eq!(page_size(-1), Err(PageError::NegativePageSize));
    }

    #[test]
    fn empty_token_is_the_first_page() {
        assert_eq!(decode::<Cursor>("", "q"), Ok(None));
    }

    #[test]
    fn a_token_for_another_query_is_refused() {
        let token = encode(&Cursor { after: "a".into() }, "filter=x");
        assert_eq!(
            decode::<Cursor>(&token, "filter=y"),
            Err(PageError::InvalidToken)
        );
    }

    #[test]
    fn garbage_is_refused() {
        for token in ["%%%", "abc", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"] {
            assert_eq!(decode::<Cursor>(token, ""), Err(PageError::InvalidToken));
        }
    }

    proptest! {
        #[test]
        fn round_trips(after in ".{0,40}", query in ".{0,20}") {
            let cursor = Cursor { after };
            let token = encode(&cursor, &query);
            prop_assert_eq!(decode::<Cursor>(&token, &query), Ok(Some(cursor)));
        }

        #[test]
        fn any_single_character_change_is_refused(after in "[a-z0-9]{1,40}", at in any::<prop::sample::Index>(), with in "[A-Za-z0-9_-]") {
            let token = encode(&Cursor { after }, "");
            let i = at.index(token.len());
            let mut edited: Vec<char> = token.chars().collect();
            let replacement = with.chars().next().unwrap();
            prop_assume!(edited[i] != replacement);
            edited[i] = replacement;
            let edited: String = edited.into_iter().collect();
            prop_assert!(decode::<Cursor>(&edited, "").is_err());
        }
    }
}
