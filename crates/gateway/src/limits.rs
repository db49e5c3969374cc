//! What a request may look like before the gateway does any work for it: headers within their
//! size (431), a query string within its length and nesting (414, 400), a body of a type and
//! encoding the gateway reads (415). Each refusal is a `google.rpc.Status` with the right 4xx,
//! so that bad input never reaches a backend nor turns into a 5xx there.

use axum::http::{HeaderMap, StatusCode, Uri, header};
use tonic::Code;

use crate::errors::{self, HttpError};

/// All request headers together, in bytes (names and values).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// One header value, in bytes: what a backend accepts as one metadata entry with room to spare.
pub const MAX_HEADER_VALUE_BYTES: usize = 8 * 1024;
/// The query string, in bytes: room for a batch read's 1000 resource names (about 54 KB), which
/// AIP-231 puts in the query string, and under the 64 KiB that an `http::Uri` can hold.
pub const MAX_QUERY_BYTES: usize = 60 * 1024;
/// Dotted segments in one query parameter's name (`a.b.c` is 3).
pub const MAX_QUERY_DEPTH: usize = 16;

fn refused(status: StatusCode, message: &str, field: Option<&str>) -> HttpError {
    let mut error = errors::local(Code::InvalidArgument, message, field);
    error.status = status;
    error
}

/// Refuses a request whose headers or query string are out of bounds.
pub fn check_head(uri: &Uri, headers: &HeaderMap) -> Result<(), HttpError> {
    let total: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if total > MAX_HEADER_BYTES || headers.values().any(|v| v.len() > MAX_HEADER_VALUE_BYTES) {
        return Err(refused(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &format!(
                "request headers too large: at most {MAX_HEADER_VALUE_BYTES} bytes a header and \
                 {MAX_HEADER_BYTES} in all"
            ),
            None,
        ));
    }
    if let Some(query) = uri.query() {
        if query.len() > MAX_QUERY_BYTES {
            return Err(refused(
                StatusCode::URI_TOO_LONG,
                &format!("query string longer than {MAX_QUERY_BYTES} bytes"),
                None,
            ));
        }
        if let Some((name, _)) = form_urlencoded::parse(query.as_bytes())
            .find(|(name, _)| name.split('.').count() > MAX_QUERY_DEPTH)
        {
            return Err(refused(
                StatusCode::BAD_REQUEST,
                &format!("query parameter nested deeper than {MAX_QUERY_DEPTH} fields"),
                Some(&name.chars().take(64).collect::<String>()),
            ));
        }
    }
    Ok(())
}

/// Refuses a body the gateway cannot read: a media type other than JSON (curl's default form
/// type and text/plain are read as JSON, as grpc-gateway does), or a content coding.
pub fn check_body(headers: &HeaderMap) -> Result<(), HttpError> {
    let has_body = headers
        .get(header::CONTENT_LENGTH)
        .is_none_or(|v| v.as_bytes() != b"0")
        && (headers.contains_key(header::CONTENT_LENGTH)
            || headers.contains_key(header::TRANSFER_ENCODING));
    if !has_body {
        return Ok(());
    }
    if let Some(encoding) = headers.get(header::CONTENT_ENCODING)
        && !encoding.as_bytes().eq_ignore_ascii_case(b"identity")
    {
        return Err(refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "request bodies are read without a content coding (no Content-Encoding)",
            None,
        ));
    }
    let Some(media) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let media = media
        .to_str()
        .unwrap_or_default()
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let json = media == "application/json"
        || media.ends_with("+json")
        || media == "application/x-www-form-urlencoded"
        || media == "text/plain";
    if json {
        Ok(())
    } else {
        Err(refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "request bodies are JSON (Content-Type: application/json)",
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    #[test]
    fn oversized_headers_are_431() {
        let uri: Uri = "/v1/users/me".parse().unwrap();
        let big = "x".repeat(60 * 1024);
        let error = check_head(&uri, &headers(&[("authorization", &big)])).unwrap_err();
        assert_eq!(error.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
        let many: Vec<(&'static str, String)> =
            (0..40).map(|_| ("x-filler", "y".repeat(500))).collect();
        let mut map = HeaderMap::new();
        for (name, value) in &many {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        assert!(check_head(&uri, &map).is_err(), "in all, too");
        assert!(check_head(&uri, &headers(&[("authorization", "Bearer t")])).is_ok());
    }

    #[test]
    fn long_and_deep_queries_are_refused() {
        let long: Uri = format!("/v1/products?filter={}", "a".repeat(MAX_QUERY_BYTES + 1))
            .parse()
            .unwrap();
        assert_eq!(
            check_head(&long, &HeaderMap::new()).unwrap_err().status,
            StatusCode::URI_TOO_LONG
        );
        let deep: Uri = format!("/v1/products?{}=1", vec!["a"; 40].join("."))
            .parse()
            .unwrap();
        assert_eq!(
            check_head(&deep, &HeaderMap::new()).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn bodies_are_json_without_a_coding() {
        let ok = |pairs: &[(&'static str, &str)]| check_body(&headers(pairs)).is_ok();
        assert!(ok(&[
            ("content-length", "2"),
            ("content-type", "application/json")
        ]));
        assert!(ok(&[
            ("content-length", "2"),
            ("content-type", "application/json; charset=utf-8")
        ]));
        assert!(ok(&[
            ("content-length", "2"),
            ("content-type", "application/x-www-form-urlencoded")
        ]));
        assert!(ok(&[("content-length", "2")]));
        assert!(
            ok(&[("content-type", "application/xml")]),
            "no body, no check"
        );
        assert!(!ok(&[
            ("content-length", "2"),
            ("content-type", "application/xml")
        ]));
        assert!(!ok(&[
            ("transfer-encoding", "chunked"),
            ("content-type", "multipart/form-data")
        ]));
        assert!(!ok(&[
            ("content-length", "2"),
            ("content-encoding", "gzip")
        ]));
    }
}
