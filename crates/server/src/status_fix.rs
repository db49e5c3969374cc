//! The status a client sees is one it can act on, wherever it came from: a request message over
//! the size limit is RESOURCE_EXHAUSTED as grpc-go and grpc-java say it (tonic says
//! OUT_OF_RANGE); a request that is not a valid protobuf message, or not well-formed gRPC framing,
//! is INVALID_ARGUMENT (tonic says INTERNAL, and it is the client's); a client whose connection
//! broke while its request was read is CANCELLED (tonic says UNKNOWN); and any other INTERNAL,
//! UNKNOWN or DATA_LOSS says only "internal error" with the request id, its detail logged.
//! Rewritten wherever the status travels: a trailers-only response's headers, or the trailers.

use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request, Response};
use keel_mesh::trailers::OnTrailers;
use tonic::body::Body;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// See the module documentation.
#[derive(Clone, Copy, Debug, Default)]
pub struct StatusFixLayer;

impl<S> Layer<S> for StatusFixLayer {
    type Service = StatusFix<S>;

    fn layer(&self, inner: S) -> Self::Service {
        StatusFix { inner }
    }
}

/// See [`StatusFixLayer`].
#[derive(Clone, Debug)]
pub struct StatusFix<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for StatusFix<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = Fixed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let request_id = request.headers().get("x-request-id").cloned();
        Fixed {
            inner: self.inner.call(request),
            request_id,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner service's answer, fixed when it comes (a future of its own, not a boxed one:
    /// nothing allocated per call).
    pub struct Fixed<F> {
        #[pin]
        inner: F,
        request_id: Option<HeaderValue>,
    }
}

impl<F, E> std::future::Future for Fixed<F>
where
    F: std::future::Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(fix(response, this.request_id.take())))
    }
}

/// `response` with its status rewritten where the module says so.
pub fn fix(mut response: Response<Body>, request_id: Option<HeaderValue>) -> Response<Body> {
    if response.headers().contains_key("grpc-status") {
        rewrite(response.headers_mut(), request_id.as_ref());
        return response;
    }
    response.map(|inner| {
        OnTrailers::wrap(inner, move |trailers| {
            if let Some(trailers) = trailers {
                rewrite(trailers, request_id.as_ref());
            }
        })
    })
}

fn rewrite(headers: &mut HeaderMap, request_id: Option<&HeaderValue>) {
    // Most answers are OK or a code passed as it is: read only the code for those.
    let rewritten = [
        Code::OutOfRange,
        Code::Internal,
        Code::Unknown,
        Code::DataLoss,
    ];
    if keel_mesh::status::grpc_status(headers).is_none_or(|code| !rewritten.contains(&code)) {
        return;
    }
    let Some(status) = Status::from_header_map(headers) else {
        return;
    };
    let fixed = match status.code() {
        Code::OutOfRange if status.message().contains("message length too large") => {
            Status::resource_exhausted("request message larger than the server accepts")
        }
        Code::Internal
            if status
                .message()
                .starts_with("failed to decode Protobuf message") =>
        {
            Status::invalid_argument("the request is not a valid message of this method")
        }
        // The client's framing, not the server's failure: a compressed flag without an
        // encoding, a flag that is no flag, a frame cut short, a unary call with no message
        // (also what a call cancelled before its handler read it looks like).
        Code::Internal if malformed_frame(status.message()) => {
            tracing::debug!(detail = %status.message(), "a malformed gRPC frame");
            Status::invalid_argument(
                "the request is not well-formed gRPC (length-prefixed messages)",
            )
        }
        // The client's connection broke while its request was being read (tonic's words for
        // an h2 error without a reason): the client went away, which grpc-go calls CANCELLED —
        // not a failure of the server's, to log as one and count against its error budget.
        Code::Unknown if status.message() == CLIENT_WENT_AWAY => {
            tracing::debug!("the client went away while its request was read");
            Status::cancelled("the client went away")
        }
        Code::Unknown | Code::Internal | Code::DataLoss => {
            let id = request_id
                .and_then(|v| v.to_str().ok())
                .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_owned);
            if status.message() != "internal error" {
                tracing::error!(code = ?status.code(), detail = %status.message(), request_id = %id, "internal failure");
            }
            Status::new(status.code(), format!("internal error (request id {id})"))
        }
        _ => return,
    };
    headers.remove("grpc-message");
    headers.remove("grpc-status-details-bin");
    if fixed.add_header(headers).is_err() {
        headers.insert("grpc-status", HeaderValue::from(fixed.code() as i32));
    }
}

/// What tonic says when the request's body cannot be read because the connection broke.
const CLIENT_WENT_AWAY: &str = "h2 protocol error: error reading a body from connection";

/// Whether tonic's `message` says the request's gRPC framing was malformed.
fn malformed_frame(message: &str) -> bool {
    message.starts_with("protocol error: received message with")
        || message == "Unexpected EOF decoding stream."
        || message == "Missing request message."
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Frame;
    use http_body_util::BodyExt as _;

    fn status_of(response: &Response<Body>) -> Status {
        Status::from_header_map(response.headers()).unwrap()
    }

    #[test]
    fn an_oversized_message_is_resource_exhausted() {
        let response = Status::out_of_range(
            "Error, decoded message length too large: found 9 bytes, the limit is: 4 bytes",
        )
        .into_http::<Body>();
        assert_eq!(
            status_of(&fix(response, None)).code(),
            Code::ResourceExhausted
        );
    }

    #[test]
    fn other_out_of_range_errors_stay() {
        let response = Status::out_of_range("page past the end").into_http::<Body>();
        let status = status_of(&fix(response, None));
        assert_eq!(
            (status.code(), status.message()),
            (Code::OutOfRange, "page past the end")
        );
    }

    #[test]
    fn a_malformed_message_is_invalid_argument() {
        let response = Status::internal("failed to decode Protobuf message: invalid wire type")
            .into_http::<Body>();
        assert_eq!(
            status_of(&fix(response, None)).code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn internal_failures_show_only_the_request_id() {
        let response =
            Status::internal("h2 protocol error: connection to 10.0.0.7:50051 reset").into_http();
        let status = status_of(&fix(response, Some(HeaderValue::from_static("req-1"))));
        assert_eq!(
            (status.code(), status.message()),
            (Code::Internal, "internal error (request id req-1)")
        );
    }

    /// A client that hangs up mid-request (a load generator stopping, a phone going into a
    /// tunnel) is no internal failure: no ERROR log, no `Unknown` in the error-rate alerts.
    #[test]
    fn a_client_gone_while_its_request_was_read_is_cancelled() {
        let response = Status::unknown(CLIENT_WENT_AWAY).into_http::<Body>();
        assert_eq!(status_of(&fix(response, None)).code(), Code::Cancelled);
        let other = Status::unknown("h2 protocol error: stream no longer needed").into_http();
        assert_eq!(status_of(&fix(other, None)).code(), Code::Unknown);
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
        let response = fix(Response::new(Body::new(body)), None);
        let collected = response.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "8");
    }
}
