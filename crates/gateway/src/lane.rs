//! The in-process lane: a unary call the gateway hands a service of its own process as the
//! request message (typed, when generated code built it from the JSON, else its bytes) and
//! takes back as the typed response, with no gRPC framing either way.
//!
//! The call still passes every layer a socket's call passes (they read the head, not the
//! body): the request is an `http::Request` whose [`Message`] extension holds the message, and
//! the answer a trailers-only response (`grpc-status` in its headers) whose [`Typed`]
//! extension holds the handler's response message, for [`crate::transcode::Render::typed`]
//! to write as JSON. Only code in the process can attach either: a request read from a socket
//! has no extensions, and [`Lane`] hands those to the tonic routes as before.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tower::ServiceExt as _;

use crate::Backend;

/// A request message the gateway built: the body of a call on the lane.
#[derive(Clone)]
pub enum Message {
    /// Its encoding (built by the dynamic deserializer).
    Encoded(Bytes),
    /// The message itself (built by generated code), its type the method's input.
    Typed(Arc<dyn Built>),
}

/// A prost message as the gateway built it: what the lane weighs, and its encoding for a call
/// that leaves the process.
pub trait Built: Any + Send + Sync {
    /// Its length encoded, which the message-size limit weighs.
    fn size(&self) -> usize;
    /// Its encoding.
    fn bytes(&self) -> Vec<u8>;
}

impl<M: prost::Message + 'static> Built for M {
    fn size(&self) -> usize {
        self.encoded_len()
    }

    fn bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}

impl Message {
    /// `message`, built by generated code.
    pub fn typed(message: impl Built) -> Self {
        Self::Typed(Arc::new(message))
    }

    /// Its length encoded.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Encoded(bytes) => bytes.len(),
            Self::Typed(message) => message.size(),
        }
    }

    /// Its encoding, for a call that leaves the process.
    pub fn into_bytes(self) -> Bytes {
        match self {
            Self::Encoded(bytes) => bytes,
            Self::Typed(message) => message.bytes().into(),
        }
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Encoded(bytes) => write!(f, "Encoded({} bytes)", bytes.len()),
            Self::Typed(_) => f.write_str("Typed(..)"),
        }
    }
}

/// A response's message as its handler answered it: the body of an answer on the lane.
#[derive(Clone)]
pub struct Typed(pub Arc<dyn Any + Send + Sync>);

impl std::fmt::Debug for Typed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Typed(..)")
    }
}

type Answer = Result<Response<Arc<dyn Any + Send + Sync>>, Status>;
type Handler =
    Arc<dyn Fn(Request<Message>) -> Pin<Box<dyn Future<Output = Answer> + Send>> + Send + Sync>;

/// One unary method a service answers on the lane.
#[derive(Clone)]
pub struct Method {
    path: &'static str,
    handler: Handler,
}

impl std::fmt::Debug for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path)
    }
}

impl Method {
    /// The method at `path` (`/package.Service/Method`): `call` on `service` with the request
    /// message (decoded, or as the gateway built it), as the generated tonic server would call
    /// it.
    pub fn unary<S, Req, Res, F, Fut>(path: &'static str, service: &Arc<S>, call: F) -> Self
    where
        S: Send + Sync + 'static,
        Req: prost::Message + Default + Clone + 'static,
        Res: Send + Sync + 'static,
        F: Fn(Arc<S>, Request<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Response<Res>, Status>> + Send + 'static,
    {
        let service = service.clone();
        let handler: Handler = Arc::new(move |request: Request<Message>| {
            let (metadata, extensions, message) = request.into_parts();
            let message = match message {
                // tonic's words, which the server's status fix knows for a client's fault.
                Message::Encoded(bytes) => Req::decode(bytes).map_err(|e| {
                    Status::internal(format!("failed to decode Protobuf message: {e}"))
                }),
                Message::Typed(built) => {
                    let built: Arc<dyn Any + Send + Sync> = built;
                    built
                        .downcast::<Req>()
                        .map(Arc::unwrap_or_clone)
                        .map_err(|_| {
                            Status::internal("the gateway built another message for this method")
                        })
                }
            };
            let answer = message.map(|message| {
                call(
                    service.clone(),
                    Request::from_parts(metadata, extensions, message),
                )
            });
            Box::pin(async move {
                let response = answer?.await?;
                let (metadata, message, extensions) = response.into_parts();
                let message: Arc<dyn Any + Send + Sync> = Arc::new(message);
                Ok(Response::from_parts(metadata, message, extensions))
            })
        });
        Self { path, handler }
    }

    /// Its path.
    pub fn path(&self) -> &'static str {
        self.path
    }
}

/// A process's services as one tower service: a call on the lane goes to its typed handler,
/// any other (read from a socket, or a stream) to `routes`.
#[derive(Clone)]
pub struct Lane<R> {
    methods: Arc<HashMap<&'static str, Handler>>,
    routes: R,
    max_message_bytes: usize,
}

impl<R> Lane<R> {
    /// `methods` on the lane, everything else to `routes`; a request message is taken up to
    /// `max_message_bytes` encoded, as the routes' servers take one.
    pub fn new(
        methods: impl IntoIterator<Item = Method>,
        routes: R,
        max_message_bytes: usize,
    ) -> Self {
        let methods = methods.into_iter().map(|m| (m.path, m.handler)).collect();
        Self {
            methods: Arc::new(methods),
            routes,
            max_message_bytes,
        }
    }
}

impl<R> tower::Service<http::Request<Body>> for Lane<R>
where
    R: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    R::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = R::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.routes.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let Some(message) = request.extensions_mut().remove::<Message>() else {
            return Box::pin(self.routes.call(request));
        };
        let Some(handler) = self.methods.get(request.uri().path()).cloned() else {
            let status = Status::unimplemented("no such method on the in-process lane");
            return Box::pin(async move { Ok(status.into_http()) });
        };
        let len = message.encoded_len();
        if len > self.max_message_bytes {
            // tonic's words, which the server's status fix knows for a client's fault.
            let status = Status::out_of_range(format!(
                "Error, decoded message length too large: found {len} bytes, the limit is: {} bytes",
                self.max_message_bytes
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let (head, _) = request.into_parts();
        let metadata = MetadataMap::from_headers(head.headers);
        let call = handler(Request::from_parts(metadata, head.extensions, message));
        Box::pin(async move {
            Ok(match call.await {
                Ok(response) => answered(response),
                Err(status) => status.into_http(),
            })
        })
    }
}

/// A handler's response as a trailers-only answer, OK, its message in [`Typed`].
fn answered(response: Response<Arc<dyn Any + Send + Sync>>) -> http::Response<Body> {
    let (metadata, message, extensions) = response.into_parts();
    let mut http = http::Response::new(Body::empty());
    *http.headers_mut() = metadata.into_headers();
    http.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    http.headers_mut()
        .insert("grpc-status", HeaderValue::from_static("0"));
    *http.extensions_mut() = extensions;
    http.extensions_mut().insert(Typed(message));
    http
}

/// A unary call of `grpc_path` on `backend`, a [`Lane`] of this process.
pub async fn unary(
    backend: Backend,
    grpc_path: &str,
    request: Request<Message>,
) -> Result<Response<Typed>, Status> {
    let (metadata, mut extensions, message) = request.into_parts();
    extensions.insert(message);
    let mut http = http::Request::new(Body::empty());
    *http.method_mut() = http::Method::POST;
    *http.version_mut() = http::Version::HTTP_2;
    *http.uri_mut() = http::Uri::try_from(grpc_path)
        .map_err(|e| Status::internal(format!("bad gRPC path: {e}")))?;
    *http.headers_mut() = metadata.into_headers();
    http.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    *http.extensions_mut() = extensions;
    let response = backend
        .oneshot(http)
        .await
        .map_err(|e| Status::unavailable(format!("no backend: {e}")))?;
    let (mut head, _) = response.into_parts();
    match Status::from_header_map(&head.headers) {
        Some(status) if status.code() != tonic::Code::Ok => return Err(status),
        _ => {}
    }
    let message = head
        .extensions
        .remove::<Typed>()
        .ok_or_else(|| Status::internal("the in-process lane answered no message"))?;
    Ok(Response::from_parts(
        MetadataMap::from_headers(head.headers),
        message,
        head.extensions,
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use prost::Message as _;
    use prost_types::{Duration, Timestamp};
    use tonic::Code;

    use super::*;
    use crate::Backends;

    /// Answers a Duration with a Timestamp of as many seconds, echoing its `who` metadata and
    /// the `Tag` its caller attached; refuses a negative one with details.
    struct Clock;

    #[derive(Debug, Clone, PartialEq)]
    struct Tag(&'static str);

    impl Clock {
        async fn at(&self, request: Request<Duration>) -> Result<Response<Timestamp>, Status> {
            let tag = request.extensions().get::<Tag>().cloned();
            let who = request.metadata().get("who").cloned();
            let seconds = request.into_inner().seconds;
            if seconds < 0 {
                return Err(Status::with_details(
                    Code::InvalidArgument,
                    "seconds must not be negative",
                    Bytes::from_static(b"details"),
                ));
            }
            let mut response = Response::new(Timestamp { seconds, nanos: 0 });
            if let Some(who) = who {
                response.metadata_mut().insert("who", who);
            }
            if let Some(tag) = tag {
                response.extensions_mut().insert(tag);
            }
            Ok(response)
        }
    }

    const AT: &str = "/test.Clock/At";

    /// A lane with `Clock` on it, in front of routes that count the calls they get.
    fn lane() -> (Backend, Arc<AtomicUsize>) {
        lane_taking(64)
    }

    /// [`lane`], taking request messages up to `max_message_bytes` encoded.
    fn lane_taking(max_message_bytes: usize) -> (Backend, Arc<AtomicUsize>) {
        let clock = Arc::new(Clock);
        let method = Method::unary(AT, &clock, |c: Arc<Clock>, r| async move { c.at(r).await });
        let routed = Arc::new(AtomicUsize::new(0));
        let counter = routed.clone();
        let routes = tower::service_fn(move |_: http::Request<Body>| {
            counter.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(Status::unimplemented("routes").into_http()) }
        });
        let lane = Lane::new([method], routes, max_message_bytes);
        let backends = Backends::default().on_lane("test.Clock", lane);
        (backends.get("test.Clock").cloned().unwrap(), routed)
    }

    fn call(seconds: i64) -> Request<Message> {
        let encoded = Bytes::from(Duration { seconds, nanos: 0 }.encode_to_vec());
        with_who(Request::new(Message::Encoded(encoded)))
    }

    fn with_who(mut request: Request<Message>) -> Request<Message> {
        request.metadata_mut().insert("who", "ada".parse().unwrap());
        request.extensions_mut().insert(Tag("vouched"));
        request
    }

    #[tokio::test]
    async fn a_call_on_the_lane_reaches_its_handler_and_its_answer_comes_back_typed() {
        let (backend, routed) = lane();
        let response = unary(backend, AT, call(42)).await.unwrap();
        assert_eq!(response.metadata().get("who").unwrap(), "ada");
        assert_eq!(response.extensions().get::<Tag>(), Some(&Tag("vouched")));
        let message = response.get_ref().0.downcast_ref::<Timestamp>().unwrap();
        assert_eq!(message.seconds, 42);
        assert_eq!(routed.load(Ordering::SeqCst), 0, "the routes saw no call");
    }

    #[tokio::test]
    async fn a_refusal_on_the_lane_keeps_its_code_message_and_details() {
        let (backend, _) = lane();
        let status = unary(backend, AT, call(-1)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "seconds must not be negative");
        assert_eq!(status.details(), b"details");
    }

    #[tokio::test]
    async fn a_method_not_on_the_lane_is_unimplemented_and_a_call_without_its_message_is_routed() {
        let (backend, routed) = lane();
        let status = unary(backend.clone(), "/test.Clock/Other", call(1))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
        assert_eq!(routed.load(Ordering::SeqCst), 0);

        let framed = http::Request::builder()
            .method(http::Method::POST)
            .uri(AT)
            .body(Body::empty())
            .unwrap();
        let response = backend.oneshot(framed).await.unwrap();
        assert_eq!(
            routed.load(Ordering::SeqCst),
            1,
            "a call read from a socket"
        );
        assert!(response.extensions().get::<Typed>().is_none());
    }

    #[tokio::test]
    async fn a_message_past_the_limit_is_refused_in_the_words_tonic_uses() {
        let (backend, _) = lane();
        let request = Request::new(Message::Encoded(Bytes::from(vec![0; 65])));
        let status = unary(backend, AT, request).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange);
        assert_eq!(
            status.message(),
            "Error, decoded message length too large: found 65 bytes, the limit is: 64 bytes"
        );
    }

    #[tokio::test]
    async fn garbage_on_the_lane_is_an_internal_error_not_a_panic() {
        let (backend, _) = lane();
        let request = Request::new(Message::Encoded(Bytes::from_static(&[0xff, 0xff, 0xff])));
        let status = unary(backend, AT, request).await.unwrap_err();
        assert_eq!(status.code(), Code::Internal);
    }

    #[tokio::test]
    async fn a_typed_request_reaches_its_handler_as_built_and_is_weighed_by_its_encoding() {
        let (backend, routed) = lane();
        let built = Message::typed(Duration {
            seconds: 7,
            nanos: 0,
        });
        let response = unary(backend.clone(), AT, with_who(Request::new(built)))
            .await
            .unwrap();
        let message = response.get_ref().0.downcast_ref::<Timestamp>().unwrap();
        assert_eq!(message.seconds, 7);
        assert_eq!(response.metadata().get("who").unwrap(), "ada");
        assert_eq!(routed.load(Ordering::SeqCst), 0);

        // Eleven bytes once encoded (a negative varint takes ten), past a lane taking ten.
        let (backend, _) = lane_taking(10);
        let large = Message::typed(Duration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(large.encoded_len(), 11);
        let status = unary(backend, AT, Request::new(large)).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange);
    }

    #[tokio::test]
    async fn a_typed_request_of_another_message_is_an_internal_error_not_a_panic() {
        let (backend, _) = lane();
        let other = Message::typed(Timestamp::default());
        let status = unary(backend, AT, Request::new(other)).await.unwrap_err();
        assert_eq!(status.code(), Code::Internal);
    }

    #[test]
    fn a_typed_request_leaving_the_process_is_its_encoding() {
        let duration = Duration {
            seconds: 3,
            nanos: 5,
        };
        let typed = Message::typed(duration);
        assert_eq!(typed.encoded_len(), duration.encoded_len());
        assert_eq!(typed.into_bytes(), duration.encode_to_vec());
    }
}
