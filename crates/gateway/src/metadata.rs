//! What crosses between HTTP headers and gRPC metadata: credentials, trace context, request ids,
//! the client's address, `Grpc-Metadata-*` both ways, and deadlines from `Grpc-Timeout` or
//! `X-Timeout`.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};

const FORWARDED: &[&str] = &["authorization", "traceparent", "tracestate"];
const PREFIX: &str = "grpc-metadata-";
/// Metadata only the gateway sets: a client cannot pass its own through `Grpc-Metadata-*`. A
/// public client does not choose its call's criticality (`keel-criticality`) either.
const RESERVED: &[&str] = &[
    "x-forwarded-for",
    "forwarded",
    keel_guard::HOP_HEADER,
    "keel-criticality",
];

/// The request's `x-request-id`, or a fresh one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get("x-request-id")
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(|| {
            HeaderValue::from_str(&uuid::Uuid::new_v4().to_string())
                .expect("a UUID is a header value")
        })
}

/// The bearer token, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The header an operator's proxy sets to give a request's criticality (`critical`,
/// `default`, `sheddable`), believed only from a trusted proxy.
pub const CRITICALITY_HEADER: &str = "x-keel-criticality";

/// Sets the call's `keel-criticality` from [`CRITICALITY_HEADER`] when the request came from a
/// trusted proxy (an operator's edge); a public client's is ignored, as is an unknown value.
pub fn forward_criticality<T>(headers: &HeaderMap, trusted: bool, request: &mut tonic::Request<T>) {
    let Some(value) = headers.get(CRITICALITY_HEADER).filter(|_| trusted) else {
        return;
    };
    if matches!(value.as_bytes(), b"critical" | b"default" | b"sheddable")
        && let Ok(value) = MetadataValue::try_from(value.as_bytes())
    {
        request.metadata_mut().insert("keel-criticality", value);
    }
}

/// Copies what the backend should see into `request`'s metadata and sets its deadline.
pub fn forward<T>(
    headers: &HeaderMap,
    request_id: &HeaderValue,
    request: &mut tonic::Request<T>,
) -> Result<(), String> {
    let metadata = request.metadata_mut();
    for name in FORWARDED {
        if let Some(value) = headers.get(*name) {
            let value = MetadataValue::try_from(value.as_bytes())
                .map_err(|_| format!("the {name} header is not a valid header value"))?;
            metadata.insert(*name, value);
        }
    }
    if let Ok(value) = MetadataValue::try_from(request_id.as_bytes()) {
        metadata.insert("x-request-id", value);
    }
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(PREFIX) else {
            continue;
        };
        if key == "authorization" {
            // The edge limits and verifies by the Authorization header; credentials that go
            // around it would be limited by address while the backend trusts them.
            return Err(
                "Grpc-Metadata-Authorization is not accepted: send the token in \
                        Authorization"
                    .into(),
            );
        }
        if key.starts_with("grpc-") || key.is_empty() || RESERVED.contains(&key) {
            continue;
        }
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_bytes()),
        ) {
            metadata.append(key, value);
        }
    }
    let timeout = match (headers.get("grpc-timeout"), headers.get("x-timeout")) {
        (Some(v), _) => Some(
            grpc_timeout(v.to_str().unwrap_or_default())
                .ok_or("Grpc-Timeout must look like 500m or 5S")?,
        ),
        (None, Some(v)) => Some(
            humantime::parse_duration(v.to_str().unwrap_or_default())
                .map_err(|_| "X-Timeout must look like 500ms or 5s")?,
        ),
        _ => None,
    };
    if let Some(timeout) = timeout {
        // Bounded before it reaches tonic, which cannot write a deadline past what the gRPC
        // header holds (and panics trying).
        if timeout > MAX_TIMEOUT {
            return Err("X-Timeout and Grpc-Timeout are at most 24h".into());
        }
        request.set_timeout(timeout);
    }
    Ok(())
}

/// The longest deadline a client may give a call.
const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Tells the backend who the client is: `x-forwarded-for` with the address the gateway
/// determined, vouched for with `hop_secret` when the backend runs in this process.
pub fn forward_client<T>(
    client: std::net::IpAddr,
    hop_secret: Option<&str>,
    request: &mut tonic::Request<T>,
) {
    let metadata = request.metadata_mut();
    if let Ok(value) = MetadataValue::try_from(client.to_string()) {
        metadata.insert("x-forwarded-for", value);
    }
    if let Some(secret) = hop_secret.and_then(|s| MetadataValue::try_from(s).ok()) {
        metadata.insert(keel_guard::HOP_HEADER, secret);
    }
}

/// The gRPC wire format of a timeout: digits and a unit (H, M, S, m, u, n).
fn grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The backend's response metadata as `Grpc-Metadata-*` headers.
pub fn backward(metadata: &MetadataMap, headers: &mut HeaderMap) {
    for (key, value) in metadata.clone().into_headers().iter() {
        let name = key.as_str();
        if name.starts_with("grpc-")
            || matches!(
                name,
                "content-type" | "date" | "content-length" | "te" | "trailer"
            )
        {
            continue;
        }
        if let Ok(header) = axum::http::HeaderName::from_bytes(format!("{PREFIX}{name}").as_bytes())
        {
            headers.append(header, value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        assert_eq!(grpc_timeout("500m"), Some(Duration::from_millis(500)));
        assert_eq!(grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(grpc_timeout("5"), None);
        assert_eq!(grpc_timeout("m"), None);
        assert_eq!(grpc_timeout("123456789S"), None);
    }

    #[test]
    fn response_metadata_becomes_grpc_metadata_headers() {
        let mut metadata = MetadataMap::new();
        metadata.insert("x-served-by", "replica-2".parse().unwrap());
        metadata.insert("grpc-status", "0".parse().unwrap());
        metadata.insert("content-type", "application/grpc".parse().unwrap());
        let mut headers = HeaderMap::new();
        backward(&metadata, &mut headers);
        assert_eq!(headers["grpc-metadata-x-served-by"], "replica-2");
        assert_eq!(headers.len(), 1, "reserved names stay behind: {headers:?}");
    }

    #[test]
    fn only_a_trusted_proxy_sets_a_call_s_criticality() {
        let criticality = |value: &'static str, trusted| {
            let mut headers = HeaderMap::new();
            headers.insert(CRITICALITY_HEADER, HeaderValue::from_static(value));
            let mut request = tonic::Request::new(());
            forward_criticality(&headers, trusted, &mut request);
            request.metadata().get("keel-criticality").cloned()
        };
        assert_eq!(criticality("critical", true).unwrap(), "critical");
        assert!(
            criticality("critical", false).is_none(),
            "a public client's header is ignored"
        );
        assert!(
            criticality("urgent", true).is_none(),
            "an unknown value is ignored"
        );
    }

    #[test]
    fn headers_become_metadata() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        headers.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        headers.insert("grpc-metadata-tenant", HeaderValue::from_static("acme"));
        headers.insert("grpc-metadata-grpc-status", HeaderValue::from_static("0"));
        headers.insert(
            "grpc-metadata-x-forwarded-for",
            HeaderValue::from_static("6.6.6.6"),
        );
        headers.insert(
            "grpc-metadata-keel-forwarded-by",
            HeaderValue::from_static("guess"),
        );
        headers.insert(
            "grpc-metadata-keel-criticality",
            HeaderValue::from_static("critical"),
        );
        headers.insert("cookie", HeaderValue::from_static("secret"));
        headers.insert("x-timeout", HeaderValue::from_static("250ms"));
        let mut request = tonic::Request::new(());
        forward(&headers, &HeaderValue::from_static("rid"), &mut request).unwrap();
        let m = request.metadata();
        assert_eq!(m.get("authorization").unwrap(), "Bearer t");
        assert_eq!(m.get("tenant").unwrap(), "acme");
        assert_eq!(m.get("x-request-id").unwrap(), "rid");
        assert_eq!(m.get("grpc-timeout").unwrap(), "250000u");
        assert!(m.get("cookie").is_none(), "only the listed headers cross");
        assert!(m.get("grpc-status").is_none(), "reserved names never cross");
        assert!(
            m.get("x-forwarded-for").is_none(),
            "only the gateway says who calls"
        );
        assert!(m.get(keel_guard::HOP_HEADER).is_none());
        assert!(
            m.get("keel-criticality").is_none(),
            "a public client does not choose its criticality"
        );
    }
}
