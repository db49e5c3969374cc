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

/// A list call's page as its request asks for it: how large, and where the previous page ended.
/// Fetch [`PageRequest::fetch`] rows (one more than the page holds), then let
/// [`PageRequest::finish`] cut them to the page and make the next page's token.
#[derive(Debug, Clone)]
pub struct PageRequest<C> {
    size: u64,
    after: Option<C>,
    query: String,
}

impl<C: Serialize + DeserializeOwned + Clone> PageRequest<C> {
    /// The page that `page_size` and `page_token` ask for, in a list whose other parameters
    /// (parent, filter, order) are fingerprinted as `query`: a token made for another query is
    /// refused.
    pub fn new(
        page_size: i32,
        page_token: &str,
        query: impl Into<String>,
    ) -> Result<Self, PageError> {
        let query = query.into();
        Ok(Self {
            size: self::page_size(page_size)?,
            after: decode(page_token, &query)?,
            query,
        })
    }

    /// Where the previous page ended; `None` on the first page.
    pub fn after(&self) -> Option<C> {
        self.after.clone()
    }

    /// How many rows the page holds.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many rows to fetch: one more than the page holds, to learn whether another follows.
    pub fn fetch(&self) -> u64 {
        self.size + 1
    }

    /// `rows`, fetched with [`PageRequest::fetch`], cut to the page, and the token of the next
    /// page made from the last row kept by `cursor` (empty when no row follows).
    pub fn finish<T>(&self, mut rows: Vec<T>, cursor: impl FnOnce(&T) -> C) -> (Vec<T>, String) {
        if rows.len() as u64 <= self.size {
            return (rows, String::new());
        }
        rows.truncate(self.size as usize);
        let token = rows
            .last()
            .map(|last| encode(&cursor(last), &self.query))
            .unwrap_or_default();
        (rows, token)
    }
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

    #[test]
    fn a_page_is_cut_to_size_and_continues_after_its_last_row() {
        let first: PageRequest<u32> = PageRequest::new(2, "", "q").unwrap();
        assert_eq!((first.fetch(), first.after()), (3, None));
        let (rows, token) = first.finish(vec![1, 2, 3], |last| *last);
        assert_eq!(rows, vec![1, 2]);
        let second: PageRequest<u32> = PageRequest::new(2, &token, "q").unwrap();
        assert_eq!(second.after(), Some(2));
        let (rows, token) = second.finish(vec![3], |last| *last);
        assert_eq!(
            (rows, token.as_str()),
            (vec![3], ""),
            "the last page has no token"
        );
        assert_eq!(
            PageRequest::<u32>::new(2, "tampered", "q").unwrap_err(),
            PageError::InvalidToken
        );
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
