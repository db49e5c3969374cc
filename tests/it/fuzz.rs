//! The gateway under generated input: paths, query strings, headers and bodies that a careless or
//! hostile client sends, written byte for byte over TCP to a running keel. Whatever arrives, the
//! answer is never a 5xx, the process never panics, and every refusal is a JSON
//! `google.rpc.Status`. Bounded in count, not in time.

use crate::support;

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::Value;
use support::{Stores, TestApp};

/// One raw HTTP/1.1 request.
#[derive(Debug, Clone)]
struct Raw {
    method: &'static str,
    path: String,
    query: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// A response as read off the socket.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

fn send(addr: SocketAddr, request: &Raw) -> Answer {
    let mut stream = TcpStream::connect(addr).expect("connect to keel");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut bytes = Vec::new();
    let target = match &request.query {
        Some(query) => format!("{}?{query}", request.path),
        None => request.path.clone(),
    };
    write!(
        bytes,
        "{} {target} HTTP/1.1\r\nhost: keel\r\nconnection: close\r\n",
        request.method
    )
    .unwrap();
    for (name, value) in &request.headers {
        bytes.extend_from_slice(name.as_bytes());
        bytes.extend_from_slice(b": ");
        bytes.extend_from_slice(value);
        bytes.extend_from_slice(b"\r\n");
    }
    write!(bytes, "content-length: {}\r\n\r\n", request.body.len()).unwrap();
    bytes.extend_from_slice(&request.body);
    stream.write_all(&bytes).expect("send the request");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("read the answer");
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {:?}", String::from_utf8_lossy(&response)));
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head}"));
    let mut body = response[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Answer { status, head, body }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(String::from_utf8_lossy(&raw[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[eol + 4 + size..];
    }
    out
}

/// Checks what any answer must be: below 500, and a `google.rpc.Status` when it refuses.
fn check(request: &Raw, answer: &Answer) -> Result<(), String> {
    if answer.status >= 500 {
        return Err(format!(
            "{} for {request:?}: {}",
            answer.status,
            String::from_utf8_lossy(&answer.body)
        ));
    }
    if answer.status >= 400 {
        let status: Value = serde_json::from_slice(&answer.body).map_err(|e| {
            format!(
                "{} without a JSON body ({e}) for {request:?}: {}\n{}",
                answer.status,
                answer.head,
                String::from_utf8_lossy(&answer.body)
            )
        })?;
        let shaped = status["code"].is_i64()
            && status["message"].is_string()
            && status["details"].is_array();
        if !shaped {
            return Err(format!("not a google.rpc.Status: {status} for {request:?}"));
        }
    }
    Ok(())
}

/// Path segments: the API's own words, ids, and what a client might make up, percent escapes
/// (some of them not UTF-8) included.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "users",
            "me",
            "todos",
            "products",
            "wallet",
            "transactions",
            "orders",
            "jobs",
            "auth:login",
            "auth:register",
            "auth:refresh",
            "wallet:topUp",
            "products:batchGet",
            "auth",
            "jwks",
            ":cancel",
            "%61uth:login",
            "auth%3Alogin",
            "%ff",
            "%c3%28",
            "..",
            "0191f6c2-7a9e-7c3e-9b3a-5a1d2c3b4e5f",
        ])
        .prop_map(str::to_owned),
        "[A-Za-z0-9._~:@!$&'()*+,;=-]{0,16}",
        "(%[0-9A-Fa-f]{2}){1,6}",
    ]
}

fn query() -> impl Strategy<Value = Option<String>> {
    let key = prop_oneof![
        prop::sample::select(vec![
            "pageSize",
            "pageToken",
            "filter",
            "orderBy",
            "updateMask",
            "names",
            "requestId",
            "title",
            "price.units",
            "todo.title",
            "product.price.currencyCode",
            "$alt",
        ])
        .prop_map(str::to_owned),
        "[a-zA-Z_.]{1,24}",
        (1usize..40).prop_map(|depth| vec!["a"; depth].join(".")),
    ];
    let key = prop_oneof![4 => key.clone(), 1 => key];
    let value = prop_oneof![
        6 => "[A-Za-z0-9._~%:=-]{0,24}",
        3 => "-?[0-9]{1,25}",
        1 => (1usize..12_000).prop_map(|n| "x".repeat(n)),
    ];
    prop::option::of(prop::collection::vec((key, value), 0..6).prop_map(|pairs| {
        pairs
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("&")
    }))
}

/// Header values: printable, tabs, bytes that are not ASCII, and now and then a huge one.
fn header_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => prop::collection::vec(prop_oneof![Just(b'\t'), 0x20u8..0x7f, 0x80u8..=0xff], 0..64),
        3 => "Bearer [A-Za-z0-9._-]{0,64}".prop_map(String::into_bytes),
        1 => (1usize..70_000).prop_map(|n| vec![b'a'; n]),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let name = prop_oneof![
        prop::sample::select(vec![
            "authorization",
            "content-type",
            "content-encoding",
            "accept",
            "grpc-timeout",
            "x-timeout",
            "x-request-id",
            "x-forwarded-for",
            "forwarded",
            "traceparent",
            "grpc-metadata-tenant",
            "grpc-metadata-x-forwarded-for",
            "origin",
        ])
        .prop_map(str::to_owned),
        "x-[a-z0-9-]{1,12}",
    ];
    let content_type = prop::sample::select(vec![
        "application/json",
        "text/xml",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin1",
        "",
    ])
    .prop_map(|v| ("content-type".to_owned(), v.as_bytes().to_vec()));
    (
        prop::collection::vec((name, header_value()), 0..4),
        prop::option::of(content_type),
    )
        .prop_map(|(mut headers, content_type)| {
            headers.extend(content_type);
            headers
        })
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "[ -~]{0,24}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    prop::sample::select(vec![
                        "email",
                        "password",
                        "title",
                        "price",
                        "units",
                        "currencyCode",
                        "stock",
                        "completed",
                        "requestId",
                        "amount",
                        "name",
                        "lineItems",
                        "quantity",
                        "createTime",
                        "refreshToken",
                        "@type",
                    ])
                    .prop_map(str::to_owned),
                    "[a-zA-Z]{1,10}",
                ],
                inner,
                0..6
            )
            .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(Vec::new()),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        prop::collection::vec(any::<u8>(), 0..256),
        (1usize..200)
            .prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()),
    ]
}

/// Paths of the API itself (so that most requests reach a transcoder and a service), and paths
/// made of words, ids and escapes.
fn path() -> impl Strategy<Value = String> {
    let id = "0191f6c2-7a9e-7c3e-9b3a-5a1d2c3b4e5f";
    prop_oneof![
        3 => prop::sample::select(vec![
            "/v1/users/me".to_owned(),
            "/v1/users".to_owned(),
            "/v1/users/me/todos".to_owned(),
            format!("/v1/users/me/todos/{id}"),
            "/v1/products".to_owned(),
            format!("/v1/products/{id}"),
            "/v1/products:batchGet".to_owned(),
            "/v1/auth:login".to_owned(),
            "/v1/auth:register".to_owned(),
            "/v1/auth:refresh".to_owned(),
            "/v1/auth:logout".to_owned(),
            "/v1/users/me/wallet".to_owned(),
            "/v1/users/me/wallet:topUp".to_owned(),
            "/v1/users/me/wallet/transactions".to_owned(),
            "/v1/users/me/orders".to_owned(),
            format!("/v1/users/me/orders/{id}"),
            format!("/v1/users/me/orders/{id}:cancel"),
            format!("/v1/users/me/orders/{id}:watch"),
            "/v1/jobs".to_owned(),
            format!("/v1/jobs/{id}"),
            format!("/v1/jobs/{id}:retry"),
        ]),
        2 => prop::collection::vec(segment(), 0..5)
            .prop_map(|segments| format!("/v1/{}", segments.join("/"))),
    ]
}

fn request() -> impl Strategy<Value = Raw> {
    (
        prop::sample::select(vec!["GET", "POST", "PUT", "PATCH", "DELETE"]),
        path(),
        query(),
        headers(),
        body(),
    )
        .prop_map(|(method, path, query, headers, body)| Raw {
            method,
            path,
            query,
            headers,
            body,
        })
}

#[test]
fn generated_requests_get_4xx_status_bodies_never_5xx() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = runtime.block_on(TestApp::spawn_with(Stores::Embedded, |s| {
        // Every request should reach the checks under test, not the rate limiter.
        s.edge.rate_limit = keel::config::RateLimit(None);
    }));
    let admin = runtime
        .block_on(app.register("admin@example.com"))
        .access_token;
    let addr = app.http_addr;
    let config = Config {
        cases: 300,
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let with_admin = prop::bool::weighted(0.3);
    runner
        .run(&(request(), with_admin), |(mut request, as_admin)| {
            if as_admin {
                let bearer = format!("Bearer {admin}").into_bytes();
                request.headers.push(("authorization".into(), bearer));
            }
            let answer = send(addr, &request);
            check(&request, &answer).map_err(TestCaseError::fail)
        })
        .unwrap();
    runtime.block_on(app.stop());
}

#[test]
fn a_sixty_kilobyte_authorization_header_is_431() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = runtime.block_on(TestApp::spawn(Stores::Embedded));
    let request = Raw {
        method: "GET",
        path: "/v1/users/me".into(),
        query: None,
        headers: vec![(
            "authorization".into(),
            format!("Bearer {}", "x".repeat(60 * 1024)).into_bytes(),
        )],
        body: Vec::new(),
    };
    let answer = send(app.http_addr, &request);
    assert_eq!(answer.status, 431, "{}", answer.head);
    check(&request, &answer).unwrap();
    let status: Value = serde_json::from_slice(&answer.body).unwrap();
    assert!(
        !status["message"].as_str().unwrap().contains("grpc-status"),
        "no internal detail: {status}"
    );
    runtime.block_on(app.stop());
}
