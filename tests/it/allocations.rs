//! Allocations per call on the hot path: a GetProduct that hits the cache, over gRPC and over
//! REST, costs the server at most the bound written here. This binary's global allocator counts
//! every allocation of the process (stats_alloc); the client is h2load, another process, so what
//! is counted is the server's work (plus a background task's now and then: a few over many calls).

use std::process::Command;

use prost::Message as _;
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

use keel::proto::keel::catalog::v1::GetProductRequest;

use crate::support::{Stores, TestApp};

#[global_allocator]
static ALLOCATOR: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

/// Calls measured, after as many unmeasured ones (caches filled, series made, pools warm).
const CALLS: usize = 1000;

/// The bounds (allocations and reallocations a call). Measured 2026-12-05 in a debug build:
/// gRPC 64.6 and REST 182.3 before the router built path values only for the route it chose,
/// the server's metrics resolved their series once and the status fix stopped parsing OK
/// statuses and boxing its future; about 57 and 152 after. REST 143 once the gateway rendered
/// responses with generated code instead of the dynamic serializer; 133 without a CORS layer
/// when no origin is allowed, about 128 with the security headers set by a plain tower layer
/// instead of `middleware::from_fn` (a boxed future and a cloned inner service a request).
/// About 99 once the gateway handed its own process's services the request's bytes and took
/// the typed answer back (the in-process lane: no gRPC framing, no tonic client or server
/// codec, no decode of the answer before rendering it); 95.9 once generated code built the
/// request message from its JSON on the lane (no dynamic message, no encoding to decode again).
const GRPC_GET_PRODUCT: f64 = 62.0;
const REST_GET_PRODUCT: f64 = 97.0;

/// h2load's arguments for one protocol; `body` is a file to POST.
struct Load {
    url: String,
    args: Vec<String>,
}

/// Runs `load` for [`CALLS`] calls, one at a time on one connection, and checks that every one
/// was answered 2xx.
async fn h2load(load: &Load) {
    let mut command = Command::new(crate::support::manifests::tool("h2load", "bin"));
    command
        .args(["-n", &CALLS.to_string(), "-c", "1", "-m", "1"])
        .args(&load.args)
        .arg(&load.url);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("h2load ran")
        .expect("h2load is installed (scripts/test installs nghttp2-client)");
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        report.contains(&format!("status codes: {CALLS} 2xx")),
        "every call answered 2xx:\n{report}"
    );
}

/// The server's allocations per call of `load`, after a first unmeasured round.
async fn per_call(load: &Load) -> f64 {
    h2load(load).await;
    let region = Region::new(ALLOCATOR);
    h2load(load).await;
    let change = region.change();
    (change.allocations + change.reallocations) as f64 / CALLS as f64
}

/// keel on embedded stores (the REST rate limit off: h2load is one client calling fast) with a
/// product in its catalog: the product's name.
async fn shop() -> (TestApp, String) {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.rate_limit = keel::config::RateLimit(None);
        // The workers look for jobs as often as they do by default, not as often as the
        // suite's other tests make them (each look allocates, and is counted).
        s.workers.job_poll = keel::config::Settings::defaults().workers.job_poll;
    })
    .await;
    let people = app.people().await;
    let product = app.product(&people.admin, "Tea", 450, 10).await;
    (app, product.name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_get_product_from_the_cache_allocates_within_its_bound() {
    let (app, product) = shop().await;
    let message = GetProductRequest { name: product }.encode_to_vec();
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let body = app.data_dir.path().join("get-product.grpc");
    std::fs::write(&body, frame).expect("write the request");
    let load = Load {
        url: format!(
            "http://{}/keel.catalog.v1.CatalogService/GetProduct",
            app.grpc_addr
        ),
        args: [
            "-d",
            body.to_str().expect("a UTF-8 path"),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
        ]
        .map(String::from)
        .to_vec(),
    };
    let ok = "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"GetProduct\",\
              grpc_service=\"keel.catalog.v1.CatalogService\",grpc_type=\"unary\"}";
    let before = app.metric(ok).await;
    let allocations = per_call(&load).await;
    assert_eq!(
        app.metric(ok).await - before,
        2.0 * CALLS as f64,
        "every call answered OK"
    );
    eprintln!("gRPC GetProduct: {allocations:.1} allocations a call on the server");
    assert!(
        allocations <= GRPC_GET_PRODUCT,
        "gRPC GetProduct allocates {allocations:.1} times a call; the bound is {GRPC_GET_PRODUCT}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rest_get_product_from_the_cache_allocates_within_its_bound() {
    let (app, product) = shop().await;
    let load = Load {
        url: format!("{}/v1/{product}", app.rest_base),
        args: vec!["--h1".into()],
    };
    let allocations = per_call(&load).await;
    eprintln!("REST GetProduct: {allocations:.1} allocations a call on the server");
    assert!(
        allocations <= REST_GET_PRODUCT,
        "REST GetProduct allocates {allocations:.1} times a call; the bound is {REST_GET_PRODUCT}"
    );
}
