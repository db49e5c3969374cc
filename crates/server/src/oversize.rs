//! grpc-go and grpc-java answer a request message over the size limit with RESOURCE_EXHAUSTED;
//! tonic says OUT_OF_RANGE. Clients written against the former expect the former, so the status
//! is rewritten wherever it travels: in a trailers-only response's headers or in the trailers.

use http::{HeaderMap, HeaderValue, Response};
use tonic::body::Body;

use keel_mesh::trailers::OnTrailers;

/// Rewrites tonic's "decoded message length too large" OUT_OF_RANGE as RESOURCE_EXHAUSTED.
pub fn oversized_message_is_resource_exhausted(mut response: Response<Body>) -> Response<Body> {
    if response.headers().contains_key("grpc-status") {
        rewrite(response.headers_mut());
        return response;
    }
    response.map(|inner| {
        OnTrailers::wrap(inner, |trailers| {
            if let Some(trailers) = trailers {
                rewrite(trailers);
            }
        })
    })
}

fn rewrite(headers: &mut HeaderMap) {
    let oversized = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            // tonic percent-encodes the message, spaces included.
            .is_some_and(|m| m.replace("%20", " ").contains("message length too large"));
    if oversized {
        headers.insert("grpc-status", HeaderValue::from_static("8"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("request message larger than the server accepts"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::BodyExt as _;

    #[test]
    fn trailers_only_responses_are_rewritten() {
        let response = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        )
        .into_http::<Body>();
        let response = oversized_message_is_resource_exhausted(response);
        assert_eq!(response.headers()["grpc-status"], "8");
    }

    #[test]
    fn other_out_of_range_errors_stay() {
        let response = tonic::Status::out_of_range("page past the end").into_http::<Body>();
        let response = oversized_message_is_resource_exhausted(response);
        assert_eq!(response.headers()["grpc-status"], "11");
    }

    #[tokio::test]
    async fn trailers_are_rewritten() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("11"));
        trailers.insert(
            "grpc-message",
            HeaderValue::from_static("Error, decoded message length too large: found 9"),
        );
        let body =
            http_body_util::StreamBody::new(futures::stream::iter(vec![Ok::<_, tonic::Status>(
                Frame::trailers(trailers),
            )]));
        let response = oversized_message_is_resource_exhausted(Response::new(Body::new(body)));
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "8");
    }
}
