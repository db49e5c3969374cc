//! The REST gateway as REST clients meet it: bad requests are clear 4xx answers that never reach
//! a backend, errors are `google.rpc.Status` JSON, and the edge protects itself. (That every
//! binding answers what gRPC answers is tests/it/parity.rs.)

use crate::support;

use reqwest::Method;
use serde_json::{Value, json};
use support::{PASSWORD, Stores, TestApp, rest};
use tonic::Code;

/// The total of `grpc_server_started_total`: how many calls reached a gRPC service.
async fn backend_calls(app: &TestApp) -> f64 {
    app.metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("grpc_server_started_total{"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

async fn raw(app: &TestApp, method: Method, path: &str, body: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(method, format!("http://{}{path}", app.http_addr))
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_clear_4xx_and_never_reach_a_backend() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| s.limits.max_message_bytes = 1024).await;
    let before = backend_calls(&app).await;
    let cases: Vec<(Method, &str, String, u16, &str)> = vec![
        (
            Method::POST,
            "/v1/auth:login",
            "{not json".into(),
            400,
            "malformed JSON",
        ),
        (
            Method::POST,
            "/v1/auth:login",
            r#"{"email": 42, "password": "x"}"#.into(),
            400,
            "invalid email",
        ),
        (
            Method::POST,
            "/v1/auth:login",
            r#"{"email": "a@b.co", "password": "x", "colour": "red"}"#.into(),
            400,
            "colour",
        ),
        (
            Method::POST,
            "/v1/auth:login",
            "[1, 2]".into(),
            400,
            "JSON object",
        ),
        (
            Method::GET,
            "/v1/users/me/todos?pageSize=ten",
            String::new(),
            400,
            "pageSize",
        ),
        (
            Method::GET,
            "/v1/users/me/todos?shoeSize=10",
            String::new(),
            400,
            "shoeSize",
        ),
        (
            Method::POST,
            "/v1/auth:login?x=1",
            "{}".into(),
            400,
            "query string",
        ),
        (Method::GET, "/v1/users/", String::new(), 404, "no route"),
        (Method::GET, "/v2/nothing", String::new(), 404, "no route"),
        (
            Method::POST,
            "/v1/auth:register",
            format!(r#"{{"email":"{}"}}"#, "x".repeat(2000)),
            413,
            "larger than",
        ),
    ];
    for (method, path, body, status, message) in cases {
        let response = raw(&app, method.clone(), path, &body).await;
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["message"].as_str().unwrap().contains(message),
            "{method} {path}: {body}"
        );
        assert!(
            body["code"].is_i64() && body["details"].is_array(),
            "{body}"
        );
    }
    let response = raw(&app, Method::DELETE, "/v1/auth:login", "").await;
    assert_eq!(response.status().as_u16(), 405);
    assert_eq!(response.headers()["allow"], "POST");
    assert_eq!(
        backend_calls(&app).await,
        before,
        "no call reached a backend"
    );

    // A violation names its field.
    for (method, path, body, field) in [
        (
            Method::GET,
            "/v1/users/me/todos?shoeSize=10",
            "",
            "shoeSize",
        ),
        (
            Method::GET,
            "/v1/users/me/todos?pageSize=ten",
            "",
            "pageSize",
        ),
        (Method::POST, "/v1/auth:login", r#"{"email": 42}"#, "email"),
        (
            Method::POST,
            "/v1/auth:login",
            r#"{"colour": "red"}"#,
            "colour",
        ),
    ] {
        let response = raw(&app, method, path, body).await;
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body["details"][0]["@type"],
            "type.googleapis.com/google.rpc.BadRequest"
        );
        assert_eq!(
            body["details"][0]["fieldViolations"][0]["field"], field,
            "{body}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_keep_their_code_and_details() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let people = app.people().await;
    let (status, body) = rest(
        &app,
        Method::POST,
        "/v1/auth:register",
        None,
        Some(json!({"email": "nope", "password": PASSWORD})),
    )
    .await;
    assert_eq!((status, body["code"].as_i64()), (400, Some(3)));
    assert_eq!(body["details"][0]["fieldViolations"][0]["field"], "email");
    let (status, body) = rest(&app, Method::GET, "/v1/users/me", None, None).await;
    assert_eq!((status, body["code"].as_i64()), (401, Some(16)));
    let (status, body) = rest(&app, Method::GET, "/v1/users", Some(&people.ada), None).await;
    assert_eq!((status, body["code"].as_i64()), (403, Some(7)));
    let (status, body) = rest(
        &app,
        Method::GET,
        &format!("/v1/products/{}", uuid::Uuid::now_v7()),
        None,
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_i64()), (404, Some(5)));
    let (status, body) = rest(&app, Method::GET, "/v1/users/me", Some("garbage"), None).await;
    assert_eq!((status, body["code"].as_i64()), (401, Some(16)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_crosses_and_deadlines_apply() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/v1/auth/jwks", app.http_addr);
    let response = client
        .get(&url)
        .header("x-request-id", "req-42")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-42", "echoed");
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(
        response.headers()["x-request-id"].len(),
        36,
        "generated when absent"
    );

    // A deadline the backend cannot meet.
    let login = format!("http://{}/v1/auth:login", app.http_addr);
    let response = client
        .post(&login)
        .header("grpc-timeout", "1u")
        .json(&json!({"email": "a@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert!(
        matches!(response.status().as_u16(), 504 | 499),
        "{}",
        response.status()
    );
    let response = client
        .post(&login)
        .header("x-timeout", "soon")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_sets_security_headers_cors_and_compression() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.cors_origins = vec!["https://app.example.com".into()]
    })
    .await;
    let client = reqwest::Client::builder().gzip(true).build().unwrap();
    let response = client
        .get(format!("http://{}/openapi.json", app.http_addr))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for (name, value) in [
        ("x-content-type-options", "nosniff"),
        ("x-frame-options", "DENY"),
        ("referrer-policy", "no-referrer"),
    ] {
        assert_eq!(response.headers()[name], value);
    }
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_none(),
        "HSTS only behind TLS"
    );
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");

    // The gateway answers health and metrics on its own port too.
    let ready = client
        .get(format!("http://{}/readyz", app.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    client
        .get(format!("http://{}/v1/auth/jwks", app.http_addr))
        .send()
        .await
        .unwrap();
    let metrics = client
        .get(format!("http://{}/metrics", app.http_addr))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = r#"http_requests_total{method="GET",route="/v1/auth/jwks",status="200"}"#;
    assert_eq!(
        keel_testkit::http::metric(&metrics, series),
        1.0,
        "{metrics}"
    );

    let raw = reqwest::Client::builder().no_gzip().build().unwrap();
    let compressed = raw
        .get(format!("http://{}/openapi.json", app.http_addr))
        .header("accept-encoding", "gzip")
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(compressed.headers()["content-encoding"], "gzip");
    assert!(
        compressed
            .headers()
            .contains_key("strict-transport-security")
    );
    // A body that fits a packet is not worth gzip's header and CPU.
    let small = raw
        .get(format!("http://{}/v1/auth/jwks", app.http_addr))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(small.headers().get("content-encoding").is_none());
    assert!(small.bytes().await.unwrap().len() < 1024);

    let preflight = raw
        .request(
            Method::OPTIONS,
            format!("http://{}/v1/users/me", app.http_addr),
        )
        .header("origin", "https://app.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert_eq!(
        preflight.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let stranger = raw
        .request(
            Method::OPTIONS,
            format!("http://{}/v1/users/me", app.http_addr),
        )
        .header("origin", "https://evil.example.com")
        .header("access-control-request-method", "GET")
        .send()
        .await
        .unwrap();
    assert!(
        stranger
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

/// Ten logins per minute per client IP; the eleventh waits. Another client IP is unaffected.
async fn the_eleventh_login_is_refused(app: &TestApp) {
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let (first, second) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    let login = format!("http://{}/v1/auth:login", app.http_addr);
    // A new e-mail each time: the address is limited here, not the account.
    let body = |k: usize| json!({"email": format!("nobody{k}@example.com"), "password": PASSWORD});
    for k in 0..10 {
        let response = first.post(&login).json(&body(k)).send().await.unwrap();
        assert_eq!(response.status(), 401, "wrong credentials, but admitted");
    }
    let refused = first.post(&login).json(&body(10)).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let retry_after: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=6).contains(&retry_after), "{retry_after}");
    let status: Value = refused.json().await.unwrap();
    assert_eq!(status["code"], Code::ResourceExhausted as i32);
    assert!(
        status["details"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["@type"] == "type.googleapis.com/google.rpc.RetryInfo")
    );
    let other = second.post(&login).json(&body(11)).send().await.unwrap();
    assert_eq!(other.status(), 401, "another client is unaffected");
}

async fn sign_in_is_rate_limited_per_client(app: TestApp) {
    the_eleventh_login_is_refused(&app).await;
}

on_every_store!(sign_in_is_rate_limited_per_client);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_backend_is_a_503_with_a_status_body() {
    let dead = keel_testkit::loopback_listener().await;
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let channel = tonic::transport::Channel::from_shared(format!("http://{dead_addr}"))
        .unwrap()
        .connect_lazy();
    let config = keel_gateway::GatewayConfig {
        services: vec!["keel.identity.v1.IdentityService".into()],
        max_body_bytes: 1 << 20,
        cors_origins: vec![],
        quota: None,
        proxies: Default::default(),
        hop_secret: None,
        title: "t".into(),
        version: "v".into(),
        docs: false,
        field_rules: Default::default(),
        max_streams_per_address: 16,
    };
    let metrics = keel_gateway::HttpMetrics::register(&prometheus::Registry::new()).unwrap();
    let gateway = std::sync::Arc::new(
        keel_gateway::Gateway::new(
            keel::proto::FILE_DESCRIPTOR_SET,
            keel_gateway::Backends::all(channel),
            keel_gateway::RateLimiter::local().into(),
            None,
            metrics,
            config,
        )
        .unwrap(),
    );
    let listener = keel_testkit::loopback_listener().await;
    let addr = listener.local_addr().unwrap();
    let app = gateway
        .router(axum::Router::new())
        .into_make_service_with_connect_info::<std::net::SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let response = reqwest::get(format!("http://{addr}/v1/auth/jwks"))
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], Code::Unavailable as i32);
    // Only the configured services are routed.
    let response = reqwest::get(format!("http://{addr}/v1/products"))
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

/// AIP-134 as grpc-gateway does it: a PATCH without `updateMask` updates the fields its body
/// sends; output-only fields, the identifier and `null` values are not part of that mask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patch_without_a_mask_updates_the_fields_it_sends() {
    let app = TestApp::spawn(Stores::Embedded).await;
    let people = app.people().await;
    let ada = Some(people.ada.as_str());
    let (status, created) = rest(
        &app,
        Method::POST,
        "/v1/users/me/todos",
        ada,
        Some(json!({"title": "Water the plants"})),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let path = format!("/v1/{}", created["name"].as_str().unwrap());

    let sent = json!({
        "completed": true,
        "title": null,
        "createTime": "2000-01-01T00:00:00Z",
        "name": "users/me/todos/ignored",
    });
    let (status, updated) = rest(&app, Method::PATCH, &path, ada, Some(sent)).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["completed"], true);
    assert_eq!(updated["title"], "Water the plants", "null is not sent");
    assert_eq!(updated["createTime"], created["createTime"], "output only");
    assert_eq!(updated["name"], created["name"]);

    // Nothing the caller may set: the mask is empty, and the update is refused.
    let (status, refused) = rest(
        &app,
        Method::PATCH,
        &path,
        ada,
        Some(json!({"updateTime": "2000-01-01T00:00:00Z"})),
    )
    .await;
    assert_eq!(status, 400, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("update_mask"));

    // An explicit mask still rules: only `title` changes.
    let (status, updated) = rest(
        &app,
        Method::PATCH,
        &format!("{path}?updateMask=title"),
        ada,
        Some(json!({"title": "Water the garden", "completed": false})),
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["title"], "Water the garden");
    assert_eq!(updated["completed"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_rest_port_speaks_http2_and_http11_by_alpn() {
    let certs = tempfile::tempdir().unwrap();
    keel_devcerts::write_all(certs.path(), &["gateway"]).unwrap();
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.http_tls_cert = Some(certs.path().join("gateway.pem"));
        s.edge.http_tls_key = Some(certs.path().join("gateway-key.pem"));
    })
    .await;
    let ca = std::fs::read(certs.path().join("ca.pem")).unwrap();
    let client = |http1: bool| {
        let builder = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .resolve("localhost", app.http_addr)
            .https_only(true);
        if http1 { builder.http1_only() } else { builder }
            .build()
            .unwrap()
    };
    let url = format!("https://localhost:{}/v1/auth/jwks", app.http_addr.port());

    let mut bodies = Vec::new();
    for (http1, version) in [
        (false, reqwest::Version::HTTP_2),
        (true, reqwest::Version::HTTP_11),
    ] {
        let response = client(http1).get(&url).send().await.unwrap();
        assert_eq!(response.version(), version, "ALPN chose {version:?}");
        assert_eq!(response.status(), 200);
        assert!(
            response.headers().contains_key("strict-transport-security"),
            "HSTS on a port that is itself HTTPS"
        );
        bodies.push(response.text().await.unwrap());
    }
    assert_eq!(bodies[0], bodies[1]);
    assert!(bodies[0].contains("\"keys\""));

    // Plaintext gets no HTTP answer from the TLS port.
    let plain = reqwest::get(format!("http://{}/v1/auth/jwks", app.http_addr)).await;
    assert!(plain.is_err(), "{plain:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_within_the_limit_whose_message_is_past_it_is_429_and_writes_nothing() {
    // 1 as JSON is two bytes with its comma; as a google.protobuf.Value in a list, about
    // eleven: a body of 900 bytes is a message of about 5,000, past the 1,024 allowed.
    let app = TestApp::spawn_with(Stores::Embedded, |s| s.limits.max_message_bytes = 1024).await;
    let people = app.people().await;
    let ones = vec![1; 440];
    let job = json!({"type": "noop", "payload": {"x": ones}});
    assert!(job.to_string().len() < 1024, "the body is within the limit");
    let jobs = app.count("queue_jobs").await;
    let (status, body) = rest(
        &app,
        Method::POST,
        "/v1/jobs",
        Some(&people.admin),
        Some(job),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], Code::ResourceExhausted as i32);
    assert_eq!(
        body["message"],
        "request message larger than the server accepts"
    );
    assert_eq!(app.count("queue_jobs").await, jobs, "no job written");
}
