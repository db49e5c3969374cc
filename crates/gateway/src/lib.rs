//! The REST translator: every `google.api.http` rule of a descriptor set served as HTTP/JSON and
//! transcoded to gRPC, with the errors, metadata, edge protection and OpenAPI document a REST
//! client expects. Generic: it knows descriptors, not users or orders.

#![forbid(unsafe_code)]

mod annotations;
pub mod backends;
pub mod call;
mod docs;
pub mod errors;
pub mod lane;
pub mod openapi;
pub mod routes;
pub mod template;
pub mod tls;
pub mod transcode;

mod edge;
mod limits;
mod metadata;
mod metrics;
mod stream;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use keel_auth::TokenVerifier;
use prost_reflect::DescriptorPool;
use tonic::Code;

pub use backends::{Backend, Backends, Transport};
pub use keel_guard::{Quota, RateLimiter, TrustedProxies};
pub use metrics::HttpMetrics;
pub use routes::{RouteError, RouteTable};

use crate::errors::HttpError;
use crate::routes::Resolved;

/// What the gateway serves and how it protects itself.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Fully-qualified gRPC services whose rules are served; the others are left out.
    pub services: Vec<String>,
    /// Largest request body, in bytes (413 above).
    pub max_body_bytes: usize,
    /// Origins allowed by CORS; empty for none, `*` for any.
    pub cors_origins: Vec<String>,
    /// The limit per client (token subject, else address); `None` for none. (The strict limits
    /// on sign-in are the gRPC server's, so that direct callers meet them too.)
    pub quota: Option<Quota>,
    /// Proxies whose `Forwarded` / `X-Forwarded-For` name the client.
    pub proxies: TrustedProxies,
    /// The secret with which this gateway vouches, to its own process's gRPC servers, for the
    /// client address it forwards.
    pub hop_secret: Option<std::sync::Arc<str>>,
    /// OpenAPI title.
    pub title: String,
    /// OpenAPI version.
    pub version: String,
    /// Whether `/docs` (Swagger UI over `/openapi.json`) is served.
    pub docs: bool,
    /// JSON Schema keywords the deployment's settings add to fields in the OpenAPI document,
    /// by `package.Message.field`.
    pub field_rules: std::collections::BTreeMap<String, serde_json::Value>,
    /// Most server streams (Server-Sent Events, NDJSON) one client address holds open at once.
    pub max_streams_per_address: usize,
}

/// A gateway over the backends of its services.
pub struct Gateway {
    table: RouteTable,
    pool: DescriptorPool,
    backends: Backends,
    limiter: Arc<RateLimiter>,
    verifier: Option<Arc<TokenVerifier>>,
    metrics: HttpMetrics,
    openapi: Bytes,
    config: GatewayConfig,
    streams: Arc<stream::Open>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("routes", &self.table.routes().len())
            .finish_non_exhaustive()
    }
}

/// Why a gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The descriptor set does not decode.
    #[error("descriptor set: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
    /// A rule is malformed or two rules conflict.
    #[error(transparent)]
    Routes(#[from] RouteError),
    /// A served service has nowhere to send its calls.
    #[error("no backend for {0}")]
    NoBackend(String),
}

/// The services of `descriptor_set` with at least one `google.api.http` rule: the ones meant
/// for clients (a service without any is another service's internal API).
pub fn routed_services(
    descriptor_set: &[u8],
) -> Result<std::collections::BTreeSet<String>, GatewayError> {
    let pool = DescriptorPool::decode(descriptor_set)?;
    Ok(RouteTable::from_pool(&pool)?
        .routes()
        .iter()
        .map(|r| r.method.parent_service().full_name().to_owned())
        .collect())
}

impl Gateway {
    /// A gateway for the `google.api.http` rules in `descriptor_set` of the configured services,
    /// calling each service on its backend. Rules are checked here, at start-up.
    pub fn new(
        descriptor_set: &[u8],
        backends: Backends,
        limiter: Arc<RateLimiter>,
        verifier: Option<Arc<TokenVerifier>>,
        metrics: HttpMetrics,
        config: GatewayConfig,
    ) -> Result<Self, GatewayError> {
        let pool = DescriptorPool::decode(descriptor_set)?;
        let table = RouteTable::from_pool(&pool)?.only(&config.services);
        if let Some(route) = table.routes().iter().find(|r| {
            backends
                .get(r.method.parent_service().full_name())
                .is_none()
        }) {
            return Err(GatewayError::NoBackend(
                route.method.parent_service().full_name().to_owned(),
            ));
        }
        let openapi = serde_json::to_vec_pretty(&openapi::document(
            &table,
            &config.title,
            &config.version,
            &config.field_rules,
        ))
        .unwrap_or_default()
        .into();
        Ok(Self {
            table,
            pool,
            backends,
            limiter,
            verifier,
            metrics,
            openapi,
            streams: stream::Open::new(config.max_streams_per_address),
            config,
        })
    }

    /// The same gateway rendering each response message that `renderer` knows (by full name)
    /// with generated code instead of the dynamic serializer.
    #[must_use]
    pub fn rendering_with(mut self, renderer: impl Fn(&str) -> Option<transcode::Render>) -> Self {
        self.table = self.table.rendering_with(renderer);
        self
    }

    /// The same gateway building each request message that `parser` knows (by full name) with
    /// generated code instead of the dynamic deserializer, for a call on the in-process lane.
    #[must_use]
    pub fn parsing_with(mut self, parser: impl Fn(&str) -> Option<transcode::Parse>) -> Self {
        self.table = self.table.parsing_with(parser);
        self
    }

    /// The route table.
    pub fn routes(&self) -> &RouteTable {
        &self.table
    }

    /// The HTTP app: `/openapi.json`, every rule, and `extra` (health, metrics); wrapped in the
    /// edge layers. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`.
    pub fn router(self: Arc<Self>, extra: Router) -> Router {
        // No origins, no CORS layer: it would answer preflights that allow nothing and add
        // `Vary` to every response.
        let origins = &self.config.cors_origins;
        let cors = (!origins.is_empty()).then(|| edge::cors(origins));
        let docs = self
            .config
            .docs
            .then(|| docs::Docs::new(&self.config.title, &self.config.version).router());
        Router::new()
            .route("/openapi.json", axum::routing::get(openapi_json))
            .fallback(transcode_call)
            .with_state(self)
            .merge(docs.unwrap_or_default())
            .merge(extra)
            .layer(tower_http::compression::CompressionLayer::new().compress_when(compressible()))
            .layer(edge::SecurityHeadersLayer)
            .layer(tower::util::option_layer(cors))
    }
}

/// What is worth compressing: bodies past a kilobyte (a smaller one fits one TCP segment
/// either way, and gzip's header and CPU cost more than they save), never gRPC, images or event
/// streams (tower-http's defaults).
fn compressible() -> impl tower_http::compression::Predicate {
    use tower_http::compression::Predicate as _;
    use tower_http::compression::predicate::{NotForContentType, SizeAbove};
    SizeAbove::new(1024)
        .and(NotForContentType::GRPC)
        .and(NotForContentType::IMAGES)
        .and(NotForContentType::SSE)
}

async fn openapi_json(State(gateway): State<Arc<Gateway>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        gateway.openapi.clone(),
    )
        .into_response()
}

fn error_response(error: HttpError, request_id: &HeaderValue) -> Response {
    let mut response = (
        error.status,
        [(header::CONTENT_TYPE, "application/json")],
        error.body,
    )
        .into_response();
    if let Some(seconds) = error.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, errors::retry_after_header(seconds));
    }
    response
        .headers_mut()
        .insert("x-request-id", request_id.clone());
    response
}

async fn transcode_call(
    State(gateway): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let request_id = metadata::request_id(request.headers());
    if let Err(error) = limits::check_head(request.uri(), request.headers()) {
        let response = error_response(error, &request_id);
        let status = response.status().as_u16();
        gateway
            .metrics
            .observe("unmatched", method.as_str(), status, started.elapsed());
        return response;
    }
    let (route_label, response) = match gateway.table.resolve(&method, request.uri().path()) {
        Resolved::NotFound => (
            "unmatched",
            error_response(
                errors::local(
                    Code::NotFound,
                    &format!("no route for {} {}", method, request.uri().path()),
                    None,
                ),
                &request_id,
            ),
        ),
        Resolved::MethodNotAllowed(allowed) => {
            let mut response = error_response(
                errors::local(
                    Code::Unimplemented,
                    &format!("{method} is not allowed here"),
                    None,
                ),
                &request_id,
            );
            *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            let allow: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            if let Ok(value) = HeaderValue::from_str(&allow.join(", ")) {
                response.headers_mut().insert(header::ALLOW, value);
            }
            ("unmatched", response)
        }
        Resolved::Found(route, vars) => {
            let label = route.template.as_str();
            let response = match serve(&gateway, route, vars, peer, request, &request_id).await {
                Ok(response) | Err(response) => response,
            };
            (label, response)
        }
    };
    gateway.metrics.observe(
        route_label,
        method.as_str(),
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// One routed call: admitted at the edge, its body read within the limit, transcoded and
/// dispatched to its backend, and the answer rendered as JSON (or as a stream).
async fn serve(
    gateway: &Gateway,
    route: &routes::Route,
    vars: Vec<(&str, String)>,
    peer: SocketAddr,
    request: Request,
    request_id: &HeaderValue,
) -> Result<Response, Response> {
    let fail = |error: HttpError| error_response(error, request_id);
    let id = String::from_utf8_lossy(request_id.as_bytes()).into_owned();
    let (head, body) = request.into_parts();
    let headers = &head.headers;
    let client = gateway.config.proxies.client(peer.ip(), headers);
    let caller = admit(gateway, headers, client, &id).await.map_err(fail)?;
    let body = read_body(headers, body, gateway.config.max_body_bytes)
        .await
        .map_err(fail)?;
    let bad_request = |e: transcode::BadRequest| {
        fail(errors::local(
            Code::InvalidArgument,
            &e.message,
            Some(&e.field),
        ))
    };
    let json = transcode::assemble(route, &vars, head.uri.query(), &body).map_err(bad_request)?;
    let in_process = on_lane(gateway, route);
    let message = transcode::message(route, json, in_process).map_err(bad_request)?;
    let mut grpc_request = tonic::Request::new(message);
    metadata::forward(headers, request_id, &mut grpc_request)
        .map_err(|e| fail(errors::local(Code::InvalidArgument, &e, None)))?;
    let from_proxy = gateway.config.proxies.contains(peer.ip());
    metadata::forward_criticality(headers, from_proxy, &mut grpc_request);
    let hop_secret = gateway.config.hop_secret.as_deref();
    metadata::forward_client(client, hop_secret, &mut grpc_request);
    // For a backend in this process; a remote one never sees extensions.
    let extensions = grpc_request.extensions_mut();
    extensions.insert(keel_guard::ClientAddr(client));
    if let Some(caller) = caller {
        extensions.insert(caller);
    }
    let backend = gateway
        .backends
        .get(route.method.parent_service().full_name())
        .cloned()
        .ok_or_else(|| {
            fail(errors::local(
                Code::Unavailable,
                "no backend for this service",
                None,
            ))
        })?;
    let answered = |status: tonic::Status| fail(errors::from_status(&status, &gateway.pool, &id));
    if route.server_streaming() {
        let slot = gateway.streams.open(client).ok_or_else(|| {
            let full = "this address holds as many open streams as it may; close one first";
            fail(errors::local(Code::ResourceExhausted, full, None))
        })?;
        let accept_sse = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/event-stream"));
        let grpc_request = grpc_request.map(lane::Message::into_bytes);
        let response = call::server_streaming(backend, &route.grpc_path, grpc_request)
            .await
            .map_err(answered)?;
        let pool = gateway.pool.clone();
        let stream = stream::respond(route.clone(), pool, response, accept_sse, request_id, slot);
        return Ok(stream);
    }
    unary(
        gateway,
        route,
        in_process,
        backend,
        grpc_request,
        request_id,
    )
    .await
    .map_err(fail)
}

/// Whether a call of `route` goes on the in-process lane: a unary call to a service of this
/// process whose whole answer has generated JSON code.
fn on_lane(gateway: &Gateway, route: &routes::Route) -> bool {
    !route.server_streaming()
        && route.render.is_some()
        && route.response_body.is_none()
        && gateway
            .backends
            .is_on_lane(route.method.parent_service().full_name())
}

/// A unary call's answer as JSON: on the in-process lane when [`on_lane`], else through the
/// gRPC client.
async fn unary(
    gateway: &Gateway,
    route: &routes::Route,
    in_process: bool,
    backend: Backend,
    grpc_request: tonic::Request<lane::Message>,
    request_id: &HeaderValue,
) -> Result<Response, HttpError> {
    let id = String::from_utf8_lossy(request_id.as_bytes());
    let answered = |status: tonic::Status| errors::from_status(&status, &gateway.pool, &id);
    if let (true, Some(render)) = (in_process, route.render) {
        let response = lane::unary(backend, &route.grpc_path, grpc_request)
            .await
            .map_err(answered)?;
        let json = (render.typed)(response.get_ref().0.as_ref())
            .unwrap_or_else(|| Err("the handler answered another message type".into()));
        return respond(route, json, response.metadata(), request_id);
    }
    let grpc_request = grpc_request.map(lane::Message::into_bytes);
    let response = call::unary(backend, &route.grpc_path, grpc_request)
        .await
        .map_err(answered)?;
    let json = transcode::response(route, response.get_ref());
    respond(route, json, response.metadata(), request_id)
}

/// Admits a call at the edge: verifies its token once (the edge limit keys on the subject, and
/// a service in this process takes it as is; a token that does not verify is left for the
/// service to refuse in its own words), then the edge limit, per verified subject, else per
/// client address.
async fn admit(
    gateway: &Gateway,
    headers: &http::HeaderMap,
    client: IpAddr,
    id: &str,
) -> Result<Option<keel_auth::Caller>, HttpError> {
    let caller = match (&gateway.verifier, metadata::bearer(headers)) {
        (Some(verifier), Some(token)) => verifier.verify(token).await.ok(),
        _ => None,
    };
    if let Some(quota) = gateway.config.quota
        && let Err(wait) = gateway
            .limiter
            .check(&client_key(caller.as_ref(), client), quota)
            .await
    {
        let status = keel_guard::throttled("rate limit exceeded; retry later", wait);
        return Err(errors::from_status(&status, &gateway.pool, id));
    }
    Ok(caller)
}

/// The request body, at most `limit` bytes (413 past it, before reading when declared).
async fn read_body(
    headers: &http::HeaderMap,
    body: axum::body::Body,
    limit: usize,
) -> Result<Bytes, HttpError> {
    limits::check_body(headers)?;
    let too_large = || {
        let why = format!("request body larger than {limit} bytes");
        let mut error = errors::local(Code::InvalidArgument, &why, Some("body"));
        error.status = StatusCode::PAYLOAD_TOO_LARGE;
        error
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large())
}

/// A unary answer: `json`, its response message rendered, with its metadata as headers.
fn respond(
    route: &routes::Route,
    json: Result<Vec<u8>, String>,
    metadata: &tonic::metadata::MetadataMap,
    request_id: &HeaderValue,
) -> Result<Response, HttpError> {
    let json = json.map_err(|e| {
        tracing::error!(error = %e, route = %route.template, "cannot render a response");
        errors::local(Code::Internal, "the response could not be rendered", None)
    })?;
    let mut http_response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from(json),
    )
        .into_response();
    metadata::backward(metadata, http_response.headers_mut());
    http_response
        .headers_mut()
        .insert("x-request-id", request_id.clone());
    Ok(http_response)
}

/// The rate-limit key: the verified token subject, else the client address.
fn client_key(caller: Option<&keel_auth::Caller>, client: IpAddr) -> String {
    match caller {
        Some(caller) => format!("sub:{}", caller.subject),
        None => format!("ip:{client}"),
    }
}

impl RouteTable {
    /// Only the routes of `services`.
    pub fn only(self, services: &[String]) -> Self {
        self.retain(|route| {
            services
                .iter()
                .any(|s| s == route.method.parent_service().full_name())
        })
    }
}
