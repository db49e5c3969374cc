//! gRPC status → HTTP: the status code table of grpc-gateway and Envoy, and a body that is the
//! `google.rpc.Status` as proto3 JSON, details included; RetryInfo becomes `Retry-After`. A
//! failure below the service (transport, a bug) reaches the client as a generic message with the
//! request id; its detail goes to the log.

use http::{HeaderValue, StatusCode};
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{Value as Json, json};
use tonic::Code;
use tonic_types::StatusExt as _;

/// A finished HTTP error: status, body, and a `Retry-After` when the server asked for one.
#[derive(Debug, Clone)]
pub struct HttpError {
    /// The HTTP status.
    pub status: StatusCode,
    /// `google.rpc.Status` as JSON.
    pub body: Vec<u8>,
    /// Seconds, from RetryInfo.
    pub retry_after: Option<u64>,
}

/// The HTTP status for a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).expect("499 is a valid status"),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
            StatusCode::BAD_REQUEST
        }
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// What a client is told instead of a failure's detail, by code; `None` for codes whose message
/// is the service's own answer to the request.
fn generic(code: Code) -> Option<&'static str> {
    match code {
        Code::Unknown | Code::Internal | Code::DataLoss => Some("internal error"),
        Code::Unavailable => Some("the service is unavailable; retry later"),
        _ => None,
    }
}

/// The HTTP error for a gRPC status, with its details rendered through `pool`. Failures below
/// the service keep their code and any RetryInfo, but say only `generic` text and `request_id`.
pub fn from_status(status: &tonic::Status, pool: &DescriptorPool, request_id: &str) -> HttpError {
    let (message, details) = match generic(status.code()) {
        Some(text) => {
            tracing::warn!(
                code = ?status.code(),
                detail = %status.message(),
                request_id,
                "a call failed below the service"
            );
            let retry = status.get_details_retry_info().map(|_| status);
            (
                format!("{text} (request id {request_id})"),
                retry.map_or_else(|| Json::Array(Vec::new()), |s| details(s, pool)),
            )
        }
        None => (status.message().to_owned(), details(status, pool)),
    };
    let body = json!({
        "code": status.code() as i32,
        "message": message,
        "details": details,
    });
    let retry_after = status
        .get_details_retry_info()
        .and_then(|info| info.retry_delay)
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0));
    HttpError {
        status: http_status(status.code()),
        body: serde_json::to_vec(&body).unwrap_or_default(),
        retry_after,
    }
}

/// An error the gateway itself raises (no backend involved).
pub fn local(code: Code, message: &str, field: Option<&str>) -> HttpError {
    let details = match field {
        Some(field) => json!([{
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{ "field": field, "description": message }],
        }]),
        None => json!([]),
    };
    let body = json!({ "code": code as i32, "message": message, "details": details });
    HttpError {
        status: http_status(code),
        body: serde_json::to_vec(&body).unwrap_or_default(),
        retry_after: None,
    }
}

fn details(status: &tonic::Status, pool: &DescriptorPool) -> Json {
    if status.details().is_empty() {
        return Json::Array(Vec::new());
    }
    let Some(descriptor) = pool.get_message_by_name("google.rpc.Status") else {
        return Json::Array(Vec::new());
    };
    let Ok(decoded) = DynamicMessage::decode(descriptor, status.details()) else {
        return Json::Array(Vec::new());
    };
    let rendered = crate::transcode::to_json(&decoded, None)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Json>(&bytes).ok());
    rendered
        .and_then(|mut v| v.get_mut("details").map(Json::take))
        .unwrap_or_else(|| Json::Array(Vec::new()))
}

/// `Retry-After` as a header value.
pub fn retry_after_header(seconds: u64) -> HeaderValue {
    HeaderValue::from(seconds.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: [(Code, u16); 17] = [
        (Code::Ok, 200),
        (Code::Cancelled, 499),
        (Code::Unknown, 500),
        (Code::InvalidArgument, 400),
        (Code::DeadlineExceeded, 504),
        (Code::NotFound, 404),
        (Code::AlreadyExists, 409),
        (Code::PermissionDenied, 403),
        (Code::ResourceExhausted, 429),
        (Code::FailedPrecondition, 400),
        (Code::Aborted, 409),
        (Code::OutOfRange, 400),
        (Code::Unimplemented, 501),
        (Code::Internal, 500),
        (Code::Unavailable, 503),
        (Code::DataLoss, 500),
        (Code::Unauthenticated, 401),
    ];

    #[test]
    fn every_code_has_the_documented_status_and_a_status_body() {
        let pool = DescriptorPool::new();
        for (code, status) in TABLE {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
            let error = from_status(&tonic::Status::new(code, "why"), &pool, "r1");
            assert_eq!(error.status.as_u16(), status);
            let body: Json = serde_json::from_slice(&error.body).unwrap();
            assert_eq!(body["code"], code as i32, "{code:?}");
            assert!(body["details"].is_array());
            // A failure below the service shows no detail (written out here, not read from the
            // implementation's own table).
            let hidden = match code {
                Code::Unknown | Code::Internal | Code::DataLoss => Some("internal error"),
                Code::Unavailable => Some("the service is unavailable; retry later"),
                _ => None,
            };
            match hidden {
                None => assert_eq!(body["message"], "why", "{code:?}"),
                Some(text) => assert_eq!(
                    body["message"],
                    format!("{text} (request id r1)"),
                    "{code:?}: a failure below the service shows no detail"
                ),
            }
        }
    }

    #[test]
    fn retry_info_becomes_retry_after() {
        let status = tonic::Status::with_error_details(
            Code::ResourceExhausted,
            "slow down",
            tonic_types::ErrorDetails::with_retry_info(Some(std::time::Duration::from_millis(
                2500,
            ))),
        );
        assert_eq!(
            from_status(&status, &DescriptorPool::new(), "r").retry_after,
            Some(3)
        );
    }
}
