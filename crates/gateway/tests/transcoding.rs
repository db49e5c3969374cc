//! Every HttpRule feature against a demo API: routing (bindings, `**`, custom methods, verbs,
//! conflicts), request mapping (path, body, query: nested, repeated, enums, well-known types),
//! response mapping (`response_body`, 64-bit integers), and server streaming as SSE or NDJSON
//! with an error mid-stream.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::Method;
use keel_gateway::routes::Resolved;
use keel_gateway::{GatewayConfig, HttpMetrics, RateLimiter, RouteTable, transcode};
use prost::Message as _;
use prost_reflect::{DescriptorPool, DynamicMessage, Value};

fn descriptors(file: &str) -> Vec<u8> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let includes = [here.join("tests/proto"), here.join("../../proto")];
    let mut compiler = protox::Compiler::new(includes).unwrap();
    compiler.include_imports(true).include_source_info(true);
    compiler.open_file(file).unwrap();
    compiler.encode_file_descriptor_set()
}

fn demo() -> (DescriptorPool, RouteTable) {
    let pool = DescriptorPool::decode(descriptors("demo/v1/demo.proto").as_slice()).unwrap();
    let table = RouteTable::from_pool(&pool).unwrap();
    (pool, table)
}

fn resolve<'a>(
    table: &'a RouteTable,
    method: Method,
    path: &str,
) -> (&'a keel_gateway::routes::Route, Vec<(&'a str, String)>) {
    match table.resolve(&method, path) {
        Resolved::Found(route, vars) => (route, vars),
        other => panic!("{method} {path}: {other:?}"),
    }
}

fn decode(pool: &DescriptorPool, message: &str, bytes: &[u8]) -> DynamicMessage {
    DynamicMessage::decode(pool.get_message_by_name(message).unwrap(), bytes).unwrap()
}

fn text(message: &DynamicMessage, field: &str) -> String {
    match message.get_field_by_name(field).unwrap().into_owned() {
        Value::String(s) => s,
        other => panic!("{field}: {other:?}"),
    }
}

#[test]
fn bindings_wildcards_custom_methods_and_verbs_route() {
    let (_, table) = demo();
    assert_eq!(table.routes().len(), 7);
    let (route, vars) = resolve(&table, Method::GET, "/v1/shelves/s1/things/t1");
    assert_eq!(route.method.name(), "GetThing");
    assert_eq!(vars, vec![("name", "shelves/s1/things/t1".to_owned())]);
    let (route, vars) = resolve(&table, Method::GET, "/v1/things/a/b/c");
    assert_eq!(
        (route.method.name(), vars[0].1.as_str()),
        ("GetThing", "a/b/c")
    );
    let (route, _) = resolve(
        &table,
        Method::from_bytes(b"ARCHIVE").unwrap(),
        "/v1/shelves/s1/things/t1",
    );
    assert_eq!(route.method.name(), "Archive");
    let (route, _) = resolve(&table, Method::GET, "/v1/shelves/s1/things/t1:watch");
    assert_eq!(route.method.name(), "WatchThing");
    let (route, _) = resolve(&table, Method::GET, "/v1/things:search");
    assert_eq!(route.method.name(), "Search");
    assert!(matches!(
        table.resolve(&Method::DELETE, "/v1/shelves/s1/things/t1"),
        Resolved::MethodNotAllowed(_)
    ));
    assert!(matches!(
        table.resolve(&Method::GET, "/v1/shelves/s1"),
        Resolved::NotFound
    ));
}

#[test]
fn conflicting_rules_stop_the_start() {
    let pool = DescriptorPool::decode(descriptors("clash/v1/clash.proto").as_slice()).unwrap();
    let error = RouteTable::from_pool(&pool).unwrap_err().to_string();
    assert!(
        error.contains("clash.v1.ClashService.One") && error.contains("clash.v1.ClashService.Two"),
        "{error}"
    );
}

#[test]
fn a_body_field_takes_the_body_and_the_rest_comes_from_path_and_query() {
    let (pool, table) = demo();
    let (route, vars) = resolve(&table, Method::PATCH, "/v1/shelves/s1/things/t1");
    let body = concat!(
        r#"{"name": "ignored", "colour": "RED", "weight": "9007199254740993", "#,
        r#""tags": ["a", "b"], "inner": {"note": "n"}}"#
    )
    .as_bytes();
    let bytes = transcode::request(route, &vars, Some("updateMask=colour,tags"), body).unwrap();
    let request = decode(&pool, "demo.v1.UpdateThingRequest", &bytes);
    let Value::Message(thing) = request.get_field_by_name("thing").unwrap().into_owned() else {
        panic!()
    };
    assert_eq!(
        text(&thing, "name"),
        "shelves/s1/things/t1",
        "the path wins over the body"
    );
    assert_eq!(
        thing.get_field_by_name("colour").unwrap().as_enum_number(),
        Some(1)
    );
    assert_eq!(
        thing.get_field_by_name("weight").unwrap().as_i64(),
        Some(9_007_199_254_740_993),
        "64-bit precision kept"
    );
    let Value::Message(mask) = request
        .get_field_by_name("update_mask")
        .unwrap()
        .into_owned()
    else {
        panic!()
    };
    assert_eq!(
        mask.get_field_by_name("paths")
            .unwrap()
            .as_list()
            .unwrap()
            .len(),
        2
    );
    let error = transcode::request(route, &vars, Some("thing.colour=RED"), b"{}").unwrap_err();
    assert_eq!(
        error.field, "thing.colour",
        "fields of the body cannot come from the query"
    );
}

#[test]
fn a_star_body_is_the_whole_request() {
    let (pool, table) = demo();
    let (route, vars) = resolve(&table, Method::POST, "/v1/shelves/s1/things");
    let bytes = transcode::request(
        route,
        &vars,
        None,
        br#"{"colour": "BLUE", "made": "2026-11-21T10:00:00Z"}"#,
    )
    .unwrap();
    let thing = decode(&pool, "demo.v1.Thing", &bytes);
    assert_eq!(text(&thing, "name"), "shelves/s1");
    assert_eq!(
        thing.get_field_by_name("colour").unwrap().as_enum_number(),
        Some(2)
    );
    assert!(
        transcode::request(route, &vars, Some("colour=RED"), b"{}").is_err(),
        "no query with body *"
    );
    assert!(transcode::request(route, &vars, None, b"[]").is_err());
}

#[test]
fn query_parameters_fill_nested_repeated_enum_and_well_known_fields() {
    let (pool, table) = demo();
    let (route, vars) = resolve(&table, Method::GET, "/v1/things:search");
    let query = concat!(
        "query=lamp&colours=RED&colours=2&inner.note=n&inner.level=3&page_size=5&exact=true",
        "&since=2026-01-01T00%3A00%3A00Z"
    );
    let bytes = transcode::request(route, &vars, Some(query), b"").unwrap();
    let search = decode(&pool, "demo.v1.SearchRequest", &bytes);
    assert_eq!(text(&search, "query"), "lamp");
    let colours: Vec<i32> = search
        .get_field_by_name("colours")
        .unwrap()
        .as_list()
        .unwrap()
        .iter()
        .filter_map(Value::as_enum_number)
        .collect();
    assert_eq!(colours, vec![1, 2]);
    let Value::Message(inner) = search.get_field_by_name("inner").unwrap().into_owned() else {
        panic!()
    };
    assert_eq!(
        (
            text(&inner, "note"),
            inner.get_field_by_name("level").unwrap().as_i32()
        ),
        ("n".to_owned(), Some(3))
    );
    assert_eq!(
        search.get_field_by_name("page_size").unwrap().as_i32(),
        Some(5)
    );
    assert_eq!(
        search.get_field_by_name("exact").unwrap().as_bool(),
        Some(true)
    );
    assert!(search.has_field_by_name("since"));
    // JSON names work too; wrong types and unknown names name their parameter.
    assert!(transcode::request(route, &vars, Some("pageSize=5"), b"").is_ok());
    for (query, field) in [
        ("pageSize=five", "pageSize"),
        ("exact=maybe", "exact"),
        ("colours=GREEN", "colours"),
        ("size=1", "size"),
        ("inner=x", "inner"),
    ] {
        let error = transcode::request(route, &vars, Some(query), b"").unwrap_err();
        assert_eq!(error.field, field, "{query}: {error:?}");
    }
    assert!(
        transcode::request(route, &vars, None, b"{}").is_err(),
        "a GET takes no body"
    );
}

#[test]
fn response_body_picks_a_field_and_64_bit_integers_are_strings() {
    let (pool, table) = demo();
    let (route, _) = resolve(&table, Method::GET, "/v1/things:search");
    let mut thing = DynamicMessage::new(pool.get_message_by_name("demo.v1.Thing").unwrap());
    thing.set_field_by_name("name", Value::String("t".into()));
    thing.set_field_by_name("weight", Value::I64(5));
    let mut response =
        DynamicMessage::new(pool.get_message_by_name("demo.v1.SearchResponse").unwrap());
    response.set_field_by_name("things", Value::List(vec![Value::Message(thing)]));
    response.set_field_by_name("next_page_token", Value::String("next".into()));
    let json: serde_json::Value =
        serde_json::from_slice(&transcode::response(route, &response.encode_to_vec()).unwrap())
            .unwrap();
    assert_eq!(json, serde_json::json!([{"name": "t", "weight": "5"}]));
    let empty = DynamicMessage::new(pool.get_message_by_name("demo.v1.SearchResponse").unwrap());
    let json: serde_json::Value =
        serde_json::from_slice(&transcode::response(route, &empty.encode_to_vec()).unwrap())
            .unwrap();
    assert_eq!(
        json,
        serde_json::json!([]),
        "an absent list is an empty one"
    );
}

/// A backend whose WatchThing sends two things, then fails.
#[derive(Clone)]
struct Demo(Arc<DescriptorPool>);

impl tonic::server::NamedService for Demo {
    const NAME: &'static str = "demo.v1.DemoService";
}

struct Watch(Arc<DescriptorPool>);

impl tonic::server::ServerStreamingService<Bytes> for Watch {
    type Response = Bytes;
    type ResponseStream = futures::stream::BoxStream<'static, Result<Bytes, tonic::Status>>;
    type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, tonic::Status>>;

    fn call(&mut self, _request: tonic::Request<Bytes>) -> Self::Future {
        let thing = |name: &str| {
            let mut thing =
                DynamicMessage::new(self.0.get_message_by_name("demo.v1.Thing").unwrap());
            thing.set_field_by_name("name", Value::String(name.into()));
            Ok(Bytes::from(thing.encode_to_vec()))
        };
        let items = vec![
            thing("first"),
            thing("second"),
            Err(tonic::Status::unavailable("gone")),
        ];
        std::future::ready(Ok(tonic::Response::new(Box::pin(futures::stream::iter(
            items,
        )))))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Demo {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let pool = self.0.clone();
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(keel_gateway::call::RawCodec);
            Ok(grpc.server_streaming(Watch(pool), request).await)
        })
    }
}

async fn serve_demo() -> std::net::SocketAddr {
    let pool =
        Arc::new(DescriptorPool::decode(descriptors("demo/v1/demo.proto").as_slice()).unwrap());
    let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend_addr = backend.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(Demo(pool))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(backend)),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{backend_addr}"))
        .unwrap()
        .connect_lazy();
    let config = GatewayConfig {
        services: vec!["demo.v1.DemoService".into()],
        max_body_bytes: 1 << 20,
        cors_origins: vec![],
        quota: None,
        proxies: Default::default(),
        hop_secret: None,
        title: "demo".into(),
        version: "1".into(),
        docs: false,
        field_rules: Default::default(),
        max_streams_per_address: 16,
    };
    let metrics = HttpMetrics::register(&prometheus::Registry::new()).unwrap();
    let gateway = Arc::new(
        keel_gateway::Gateway::new(
            &descriptors("demo/v1/demo.proto"),
            keel_gateway::Backends::all(channel),
            RateLimiter::local().into(),
            None,
            metrics,
            config,
        )
        .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = gateway
        .router(axum::Router::new())
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

async fn get(addr: std::net::SocketAddr, accept: Option<&str>) -> (String, String) {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<Bytes>>();
    let mut request = http::Request::get(format!("http://{addr}/v1/shelves/s/things/t:watch"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    let response = client
        .request(request.body(http_body_util::Empty::new()).unwrap())
        .await
        .unwrap();
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (content_type, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn server_streams_are_sse_or_ndjson_and_end_with_their_error() {
    let addr = serve_demo().await;
    let (content_type, body) = get(addr, Some("text/event-stream")).await;
    assert_eq!(content_type, "text/event-stream");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 3, "{body}");
    assert_eq!(events[0], r#"data: {"name":"first"}"#);
    assert_eq!(events[1], r#"data: {"name":"second"}"#);
    assert!(
        events[2].starts_with("event: error\ndata: {") && events[2].contains(r#""code":14"#),
        "{body}"
    );

    let (content_type, body) = get(addr, None).await;
    assert_eq!(content_type, "application/x-ndjson");
    let lines: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["name"], "first");
    assert_eq!(lines[2]["error"]["code"], 14);
}
