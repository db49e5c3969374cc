//! The hot path against its ceilings, in one run: GetUser (token), GetProduct (public) and
//! ListTodos (token, 20 todos) over gRPC, REST on HTTP/1.1 and REST on HTTP/2, on embedded stores
//! and on PostgreSQL + Redis, each as a fraction of a bare tonic server or a bare axum handler
//! answering the same bytes. The closed loop is driven by generators cheaper than the servers
//! (h2load for gRPC and HTTP/2, wrk for HTTP/1.1); the open loop by `load::run_at`. Then reads
//! while writers keep the primary busy, on a PostgreSQL primary alone and with a streaming
//! replica beside.
//!
//!     cargo bench --bench scenarios
//!
//! Appends a dated section to benches/RESULTS.md (and prints it). `KEEL_BENCH_SECONDS` sets the
//! recorded time per row (default 5, after 1 s of warm-up). See benches/README.md.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

mod load;

use std::time::Duration;

use bytes::Bytes;
use keel::proto::keel::catalog::v1::{CreateProductRequest, GetProductRequest, Product};
use keel::proto::keel::identity::v1::GetUserRequest;
use keel::proto::keel::todos::v1::{CreateTodoRequest, ListTodosRequest, Todo};
use keel_gateway::call::RawCodec;
use load::ceiling::{Ceiling, GRPC_PATH};
use load::external::{Closed, Measured};
use load::{Keel, Stores};

/// `message` encoded.
fn encoded(message: &impl prost::Message) -> Bytes {
    message.encode_to_vec().into()
}
const IN_FLIGHT: usize = 50;
const CONNECTIONS: usize = 2;
const TODOS: usize = 20;
const WARMUP: Duration = Duration::from_secs(1);
/// Open-loop rows run at this fraction of the closed-loop peak of the same scenario.
const OPEN_LOOP_SHARE: f64 = 0.5;

/// How a scenario reaches its server.
#[derive(Clone, Copy, PartialEq)]
enum Protocol {
    Grpc,
    Http1,
    Http2,
}

impl Protocol {
    const ALL: [Protocol; 3] = [Protocol::Grpc, Protocol::Http1, Protocol::Http2];

    fn label(self) -> &'static str {
        match self {
            Protocol::Grpc => "gRPC",
            Protocol::Http1 => "REST HTTP/1.1",
            Protocol::Http2 => "REST HTTP/2 (h2c)",
        }
    }
}

/// One call, as both protocols spell it.
#[derive(Clone)]
struct Call {
    name: &'static str,
    grpc_path: &'static str,
    grpc_request: Bytes,
    rest_path: String,
    token: Option<String>,
}

/// A server under load: its addresses and the process whose memory is reported; keel's own
/// metrics count the gRPC calls h2load cannot see fail (it reads HTTP statuses, not
/// `grpc-status`).
struct Target<'a> {
    grpc: &'a str,
    rest: &'a str,
    pid: u32,
    keel: Option<&'a Keel>,
}

/// A measured row.
struct Row {
    scenario: String,
    protocol: Protocol,
    measured: Measured,
    rss_mib: f64,
    /// Calls per second of the open-loop run; `None` when closed loop.
    offered: Option<f64>,
    /// What the failed calls of a gRPC open-loop row were, by keel's own count (its warm-up
    /// included): each code it answered other than OK, and any failures it never answered.
    failures: Vec<(String, f64)>,
}

fn recorded() -> Duration {
    let seconds = std::env::var("KEEL_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    Duration::from_secs(seconds)
}

/// A load generator's call of `call` on `target` over `protocol`: returns whether it answered
/// OK.
async fn generator(
    target: &Target<'_>,
    protocol: Protocol,
    call: &Call,
) -> std::sync::Arc<dyn Fn(usize) -> futures::future::BoxFuture<'static, bool> + Send + Sync> {
    use futures::FutureExt as _;
    use std::sync::Arc;
    match protocol {
        Protocol::Grpc => {
            let mut channels = Vec::new();
            for _ in 0..CONNECTIONS {
                let endpoint = tonic::transport::Endpoint::from_shared(target.grpc.to_owned())
                    .unwrap()
                    .tcp_nodelay(true);
                channels.push(endpoint.connect().await.expect("connect"));
            }
            let call = call.clone();
            Arc::new(move |n| {
                let mut grpc = tonic::client::Grpc::new(channels[n % CONNECTIONS].clone());
                let mut request = tonic::Request::new(call.grpc_request.clone());
                if let Some(token) = &call.token {
                    let value = format!("Bearer {token}").parse().unwrap();
                    request.metadata_mut().insert("authorization", value);
                }
                let path = http::uri::PathAndQuery::from_static(call.grpc_path);
                async move {
                    grpc.ready().await.is_ok() && grpc.unary(request, path, RawCodec).await.is_ok()
                }
                .boxed()
            })
        }
        Protocol::Http1 | Protocol::Http2 => {
            let clients: Vec<reqwest::Client> = (0..CONNECTIONS)
                .map(|_| {
                    // No gzip: the ceiling does not compress either.
                    let builder = reqwest::Client::builder()
                        .pool_max_idle_per_host(IN_FLIGHT)
                        .no_gzip();
                    match protocol {
                        Protocol::Http2 => builder.http2_prior_knowledge(),
                        _ => builder.http1_only(),
                    }
                    .build()
                    .unwrap()
                })
                .collect();
            let url = format!("{}{}", target.rest, call.rest_path);
            let token = call.token.clone();
            // At most IN_FLIGHT requests, so at most that many HTTP/1.1 connections: an open
            // loop would otherwise open one per waiting call (wrk2 keeps its connections fixed
            // too; a call that waits for one is charged the wait).
            let connections = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
            Arc::new(move |n| {
                let mut request = clients[n % CONNECTIONS].get(&url);
                if let Some(token) = &token {
                    request = request.bearer_auth(token);
                }
                let connections = connections.clone();
                async move {
                    let Ok(_connection) = connections.acquire().await else {
                        return false;
                    };
                    match request.send().await {
                        Ok(response) if response.status().is_success() => {
                            response.bytes().await.is_ok()
                        }
                        _ => false,
                    }
                }
                .boxed()
            })
        }
    }
}

/// `call` on `target` over `protocol`, closed loop with [`IN_FLIGHT`] calls at a time, driven
/// by h2load (gRPC, HTTP/2) or wrk (HTTP/1.1).
async fn closed(target: &Target<'_>, protocol: Protocol, call: &Call, scenario: String) -> Row {
    let mut headers = Vec::new();
    if let Some(token) = &call.token {
        headers.push(format!("authorization: Bearer {token}"));
    }
    let url = match protocol {
        Protocol::Grpc => {
            headers.push("content-type: application/grpc".into());
            headers.push("te: trailers".into());
            format!("{}{}", target.grpc, call.grpc_path)
        }
        _ => format!("{}{}", target.rest, call.rest_path),
    };
    let run = Closed {
        url: &url,
        headers: &headers,
        connections: CONNECTIONS,
        in_flight: IN_FLIGHT,
        warmup: WARMUP,
        duration: recorded(),
    };
    let mut measured = match protocol {
        Protocol::Grpc => {
            let (ok, started) = grpc_counts(target, call).await;
            let mut measured = load::external::h2load(&run, Some(&grpc_frame(call))).await;
            let (ok_after, started_after) = grpc_counts(target, call).await;
            measured.errors += ((started_after - started) - (ok_after - ok)).max(0.0) as u64;
            measured
        }
        Protocol::Http2 => load::external::h2load(&run, None).await,
        Protocol::Http1 => load::external::wrk(&run).await,
    };
    if measured.per_second.is_nan() {
        measured.per_second = 0.0;
    }
    Row {
        scenario,
        protocol,
        measured,
        rss_mib: load::rss_mib(target.pid),
        offered: None,
        failures: Vec::new(),
    }
}

/// `call`'s request as one gRPC frame (uncompressed).
fn grpc_frame(call: &Call) -> Vec<u8> {
    let mut frame = vec![0];
    frame.extend_from_slice(&(call.grpc_request.len() as u32).to_be_bytes());
    frame.extend_from_slice(&call.grpc_request);
    frame
}

/// How many calls of `call`'s method keel answered OK or saw cancelled (the calls h2load still
/// had in flight when it stopped), and how many it started (zeros for a ceiling, whose fixed
/// reply is always OK).
async fn grpc_counts(target: &Target<'_>, call: &Call) -> (f64, f64) {
    let Some(keel) = target.keel else {
        return (0.0, 0.0);
    };
    let (service, method) = call.grpc_path[1..].split_once('/').expect("a gRPC path");
    let labels = format!("grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"unary\"");
    let mut answered = 0.0;
    for code in ["OK", "Canceled"] {
        answered += keel
            .metric(&format!(
                "grpc_server_handled_total{{grpc_code=\"{code}\",{labels}}}"
            ))
            .await;
    }
    let started = keel
        .metric(&format!("grpc_server_started_total{{{labels}}}"))
        .await;
    (answered, started)
}

/// `call` on `target` over `protocol`, open loop at `rate` calls per second.
async fn open(target: &Target<'_>, protocol: Protocol, call: &Call, rate: f64) -> Row {
    let generate = generator(target, protocol, call).await;
    let before = grpc_answers(target, call, protocol).await;
    let report = load::run_at(rate, 10_000, WARMUP, recorded(), move |n| generate(n)).await;
    let after = grpc_answers(target, call, protocol).await;
    let measured = Measured::from(&report);
    let mut failures: Vec<(String, f64)> = after
        .iter()
        .filter(|(code, _)| code.as_str() != "OK")
        .map(|(code, n)| (code.clone(), n - before.get(code).copied().unwrap_or(0.0)))
        .filter(|(_, n)| *n > 0.0)
        .collect();
    // keel counts the warm-up's calls too; what it never answered shows only past them.
    let answered_badly: f64 = failures.iter().map(|(_, n)| n).sum();
    if protocol == Protocol::Grpc && measured.errors as f64 > answered_badly {
        failures.push((
            "never answered".into(),
            measured.errors as f64 - answered_badly,
        ));
    }
    Row {
        scenario: format!("{}, open loop", call.name),
        protocol,
        measured,
        rss_mib: load::rss_mib(target.pid),
        offered: Some(rate),
        failures,
    }
}

/// keel's count of `call`'s gRPC method's answers by code (over gRPC only).
async fn grpc_answers(
    target: &Target<'_>,
    call: &Call,
    protocol: Protocol,
) -> std::collections::BTreeMap<String, f64> {
    let mut counts = std::collections::BTreeMap::new();
    let Some(keel) = target.keel.filter(|_| protocol == Protocol::Grpc) else {
        return counts;
    };
    let (service, method) = call.grpc_path[1..].split_once('/').expect("a gRPC path");
    let labels = format!("grpc_method=\"{method}\",grpc_service=\"{service}\"");
    let text = match keel_testkit::http::get(&format!("{}/metrics", keel.admin())).await {
        Ok((200, text)) => text,
        _ => return counts,
    };
    for line in text.lines().filter(|line| line.contains(&labels)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if let Some(code) = series
            .strip_prefix("grpc_server_handled_total{")
            .and_then(|rest| rest.split("grpc_code=\"").nth(1))
            .and_then(|rest| rest.split('"').next())
        {
            *counts.entry(code.to_owned()).or_default() += value.parse().unwrap_or(0.0);
        }
    }
    counts
}

/// The data every scenario reads: an admin (the first user), a product, 20 todos.
async fn fixtures(keel: &Keel) -> Vec<Call> {
    let channel = keel.connections(1).await.remove(0);
    let token = load::register(channel.clone(), "bench@example.com").await;
    let mut catalog =
        keel::proto::keel::catalog::v1::catalog_service_client::CatalogServiceClient::new(
            channel.clone(),
        );
    let product = catalog
        .create_product(load::authed(
            CreateProductRequest {
                product: Some(Product {
                    title: "A product of ordinary size".into(),
                    price: load::eur(1999),
                    stock: 1_000_000,
                    ..Default::default()
                }),
                request_id: String::new(),
            },
            &token,
        ))
        .await
        .expect("create a product")
        .into_inner();
    let mut todos =
        keel::proto::keel::todos::v1::todo_service_client::TodoServiceClient::new(channel);
    for i in 0..TODOS {
        let todo = Todo {
            title: format!("Todo number {i}"),
            ..Default::default()
        };
        let request = CreateTodoRequest {
            parent: "users/me".into(),
            todo: Some(todo),
            request_id: String::new(),
        };
        todos
            .create_todo(load::authed(request, &token))
            .await
            .expect("create a todo");
    }
    vec![
        Call {
            name: "GetUser users/me (token)",
            grpc_path: "/keel.identity.v1.IdentityService/GetUser",
            grpc_request: encoded(&GetUserRequest {
                name: "users/me".into(),
            }),
            rest_path: "/v1/users/me".into(),
            token: Some(token.clone()),
        },
        Call {
            name: "GetProduct (public, cache hit)",
            grpc_path: "/keel.catalog.v1.CatalogService/GetProduct",
            grpc_request: encoded(&GetProductRequest {
                name: product.name.clone(),
            }),
            rest_path: format!("/v1/{}", product.name),
            token: None,
        },
        Call {
            name: "ListTodos users/me, 20 todos (token)",
            grpc_path: "/keel.todos.v1.TodoService/ListTodos",
            grpc_request: encoded(&ListTodosRequest {
                parent: "users/me".into(),
                ..Default::default()
            }),
            rest_path: "/v1/users/me/todos".into(),
            token: Some(token),
        },
    ]
}

/// What GetProduct answers over each protocol: the ceilings answer the same bytes.
async fn replies(keel: &Keel, product: &Call) -> (Bytes, Bytes) {
    let channel = keel.connections(1).await.remove(0);
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(product.grpc_path);
    let request = tonic::Request::new(product.grpc_request.clone());
    let proto = grpc.unary(request, path, RawCodec).await.unwrap();
    let url = format!("{}{}", keel.rest_endpoint(), product.rest_path);
    let json = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    (proto.into_inner(), json)
}

/// Every scenario on `keel`, closed loop, then GetProduct and GetUser open loop at half their
/// peak over gRPC and HTTP/1.1.
async fn scenarios(keel: &Keel, calls: &[Call], stores: &str, rows: &mut Vec<Row>) {
    let target = Target {
        grpc: &keel.endpoint,
        rest: keel.rest_endpoint(),
        pid: keel.pid,
        keel: Some(keel),
    };
    let mut peaks = Vec::new();
    for call in calls {
        for protocol in Protocol::ALL {
            let row = closed(&target, protocol, call, format!("{}, {stores}", call.name)).await;
            eprintln!(
                "{} {}: {:.0}/s",
                row.scenario,
                protocol.label(),
                row.measured.per_second
            );
            peaks.push((call.clone(), protocol, row.measured.per_second));
            rows.push(row);
        }
    }
    for (call, protocol, peak) in peaks {
        if call.name.starts_with("ListTodos") || protocol == Protocol::Http2 {
            continue;
        }
        let mut row = open(&target, protocol, &call, peak * OPEN_LOOP_SHARE).await;
        row.scenario = format!("{}, {stores}", row.scenario);
        rows.push(row);
    }
}

/// How many calls keep the primary busy with writes (wallet top-ups) while reads are measured.
const WRITERS: usize = 16;

/// Reads while writers keep the primary busy: an uncached read (ListProducts, which a replica
/// may serve) and a cached one (GetProduct, served by the cache either way), over gRPC, on a
/// PostgreSQL primary alone and then with a streaming replica of it beside (a PostgreSQL of the
/// bench's own, on the same machine).
async fn replicas(off: &[&str], rows: &mut Vec<Row>) {
    use keel::proto::keel::catalog::v1::ListProductsRequest;
    use sea_orm::ConnectionTrait as _;
    let (primary, _) = keel_testkit::Postgres::dedicated().await;
    let replica = {
        let primary = primary.clone();
        tokio::task::spawn_blocking(move || primary.replica(std::process::id(), None))
            .await
            .unwrap()
            .expect("a replica")
    };
    let (redis, prefix) = keel_testkit::fresh_prefix().await;
    for (n, with_replica) in [false, true].into_iter().enumerate() {
        // A database of its own for each run; the replica has it once CREATE DATABASE replays.
        let name = format!("bench{n}");
        let admin = sea_orm::Database::connect(format!("{}/postgres", primary.base_url))
            .await
            .unwrap();
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let database = format!("{}/{name}", primary.base_url);
        let read_url = format!("{}/{name}", replica.base_url);
        let mut env = vec![
            ("KEEL_DATABASE_URL", database.as_str()),
            ("KEEL_REDIS_URL", redis.as_str()),
            ("KEEL_REDIS_PREFIX", prefix.as_str()),
        ];
        if with_replica {
            keel_testkit::eventually(Duration::from_secs(30), "the replica's database", || {
                let url = read_url.clone();
                async move { sea_orm::Database::connect(url).await.ok().map(|_| ()) }
            })
            .await;
            env.push(("KEEL_DATABASE_READ_URLS", read_url.as_str()));
        }
        let keel = Keel::start(off, &env).await;
        let calls = fixtures(&keel).await;
        let token = calls[0].token.clone().expect("the bench user's token");
        let list = Call {
            name: "ListProducts (public, uncached)",
            grpc_path: "/keel.catalog.v1.CatalogService/ListProducts",
            grpc_request: encoded(&ListProductsRequest::default()),
            rest_path: "/v1/products".into(),
            token: None,
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writes = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut writers = Vec::new();
        for channel in keel.connections(WRITERS).await {
            let (stop, writes, token) = (stop.clone(), writes.clone(), token.clone());
            writers.push(tokio::spawn(async move {
                use keel::proto::keel::payments::v1::TopUpWalletRequest;
                use keel::proto::keel::payments::v1::payment_service_client::PaymentServiceClient;
                let mut payments = PaymentServiceClient::new(channel);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let top_up = TopUpWalletRequest {
                        name: "users/me/wallet".into(),
                        amount: load::eur(1),
                        request_id: uuid::Uuid::new_v4().to_string(),
                    };
                    if payments
                        .top_up_wallet(load::authed(top_up, &token))
                        .await
                        .is_ok()
                    {
                        writes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }));
        }
        let target = Target {
            grpc: &keel.endpoint,
            rest: keel.rest_endpoint(),
            pid: keel.pid,
            keel: Some(&keel),
        };
        let stores = if with_replica {
            "PostgreSQL + one replica + Redis"
        } else {
            "PostgreSQL alone + Redis"
        };
        for call in [&list, &calls[1]] {
            let on_replica = "keel_db_reads_total{reason=\"ok\",target=\"replica\"}";
            let (before, written) = (
                keel.metric(on_replica).await,
                writes.load(std::sync::atomic::Ordering::Relaxed),
            );
            let started = std::time::Instant::now();
            let scenario = format!("{}, {stores}, {WRITERS} writers", call.name);
            let mut row = closed(&target, Protocol::Grpc, call, scenario).await;
            let seconds = started.elapsed().as_secs_f64();
            let replica_reads = keel.metric(on_replica).await - before;
            let writes_per_second =
                (writes.load(std::sync::atomic::Ordering::Relaxed) - written) as f64 / seconds;
            row.scenario = format!(
                "{} ({writes_per_second:.0} writes/s beside; {replica_reads:.0} reads on the replica)",
                row.scenario
            );
            eprintln!("{}: {:.0}/s", row.scenario, row.measured.per_second);
            rows.push(row);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for writer in writers {
            writer.await.unwrap();
        }
        drop(keel);
    }
}

/// The ceilings over every protocol.
async fn ceilings(ceiling: &Ceiling, product: &Call, when: &str, rows: &mut Vec<Row>) {
    let target = Target {
        grpc: &ceiling.grpc,
        rest: &ceiling.rest,
        pid: ceiling.pid,
        keel: None,
    };
    let call = Call {
        grpc_path: GRPC_PATH,
        ..product.clone()
    };
    for protocol in Protocol::ALL {
        let name = match protocol {
            Protocol::Grpc => format!("ceiling: bare tonic, fixed reply ({when})"),
            _ => format!("ceiling: bare axum, fixed JSON ({when})"),
        };
        rows.push(closed(&target, protocol, &call, name).await);
    }
}

fn main() {
    load::ceiling::serve_if_asked();
    let section = tokio::runtime::Runtime::new().unwrap().block_on(measure());
    println!("{section}");
    let results = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/RESULTS.md");
    let mut text = std::fs::read_to_string(results).expect("read RESULTS.md");
    text.push('\n');
    text.push_str(&section);
    std::fs::write(results, text).expect("write RESULTS.md");
    eprintln!("appended to {results}");
}

async fn measure() -> String {
    let mut rows = Vec::new();
    let off = ["--rate-limit", "off", "--auth-rate-limit", "off"];

    let embedded = Keel::start(&off, &[]).await;
    let calls = fixtures(&embedded).await;
    let (proto, json) = replies(&embedded, &calls[1]).await;
    let ceiling = Ceiling::start(&proto, &json).await;
    ceilings(&ceiling, &calls[1], "first", &mut rows).await;
    scenarios(&embedded, &calls, "embedded", &mut rows).await;
    drop(embedded);

    let stores = Stores::fresh().await;
    let shared = Keel::start(&off, &stores.env()).await;
    let calls = fixtures(&shared).await;
    scenarios(&shared, &calls, "PostgreSQL + Redis", &mut rows).await;
    drop(shared);
    replicas(&off, &mut rows).await;
    ceilings(&ceiling, &calls[1], "last", &mut rows).await;

    table(&rows, proto.len(), json.len())
}

/// The Markdown section: every row with its fraction of the mean of its ceiling's two runs.
fn table(rows: &[Row], proto_bytes: usize, json_bytes: usize) -> String {
    let ceiling = |protocol: Protocol| {
        let runs: Vec<f64> = rows
            .iter()
            .filter(|r| r.scenario.starts_with("ceiling") && r.protocol == protocol)
            .map(|r| r.measured.per_second)
            .collect();
        runs.iter().sum::<f64>() / runs.len() as f64
    };
    let mut out = format!(
        "## {} — the hot path against its ceilings\n\n\
         `cargo bench --bench scenarios` (release; keel, the ceilings and the load generators \
         share the 2 cores over loopback). Closed loop: h2load (gRPC, REST on HTTP/2: \
         {CONNECTIONS} connections, {IN_FLIGHT} streams in flight in all) and wrk (REST on \
         HTTP/1.1: {IN_FLIGHT} keep-alive connections), one thread each, {}s recorded after {}s \
         of warm-up; h2load gives no percentiles. Open loop (`load::run_at`): calls due at a \
         fixed rate ({:.0}% of the same row's closed-loop peak), latency from when each was \
         due. The ceilings answer GetProduct's bytes ({proto_bytes} B protobuf, {json_bytes} B \
         JSON); each row's fraction is of the mean of its protocol's ceiling, measured first \
         and last. RSS is the server process's after the row.\n\n\
         | scenario | protocol | generator | calls/s | of ceiling | p50 ms | p99 ms | p99.9 ms | errors | RSS MiB |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        recorded().as_secs(),
        WARMUP.as_secs(),
        OPEN_LOOP_SHARE * 100.0,
    );
    let ms = |value: Option<f64>| value.map_or_else(|| "–".to_owned(), |v| format!("{v:.2}"));
    for row in rows {
        let rate = row.measured.per_second;
        let (calls, generator) = match row.offered {
            Some(offered) => (format!("{rate:.0} (offered {offered:.0})"), "load"),
            None if row.protocol == Protocol::Http1 => (format!("{rate:.0}"), "wrk"),
            None => (format!("{rate:.0}"), "h2load"),
        };
        out.push_str(&format!(
            "| {} | {} | {generator} | {calls} | {:.2} | {} | {} | {} | {} | {:.1} |\n",
            row.scenario,
            row.protocol.label(),
            rate / ceiling(row.protocol),
            ms(row.measured.p50_ms),
            ms(row.measured.p99_ms),
            ms(row.measured.p999_ms),
            row.measured.errors,
            row.rss_mib,
        ));
    }
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.failures.is_empty()).collect();
    if !failed.is_empty() {
        out.push_str("\nThe failed calls of the gRPC open-loop rows, by keel's own count (warm-up included):\n\n");
        for row in failed {
            let codes: Vec<String> = row
                .failures
                .iter()
                .map(|(code, n)| format!("{code} {n:.0}"))
                .collect();
            out.push_str(&format!("- {}: {}\n", row.scenario, codes.join(", ")));
        }
    }
    out
}
