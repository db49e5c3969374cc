//! keel through its own mesh: replicas of every service behind the balancer in one process
//! (`--replicas`), and separate `keel serve` processes found by `--<service>-endpoints`, with
//! the REST gateway alone in front. A replica that drains or dies costs REST clients nothing.

use crate::support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel::config::RateLimit;
use support::process::{KeelProcess, register_over_rest, shared_stores};
use support::{Stores, TestApp};

/// Attempts the gateway's mesh client made on `endpoint` of `peer`, from `/metrics` text.
fn attempts_on(metrics: &str, peer: &str, endpoint: SocketAddr) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("keel_mesh_endpoint_attempts_total{")
                && line.contains(&format!("peer=\"{peer}\""))
                && line.contains(&format!(
                    "endpoint=\"{}\"",
                    keel_mesh::client::endpoint_digest(endpoint)
                ))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn metrics_of(admin: SocketAddr) -> String {
    let (status, body) = keel_testkit::http::get(&format!("http://{admin}/metrics"))
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    body
}

/// REST load: GETs of `url` with `token`, `in_flight` at a time; once `start_during_after` are
/// done, `during` runs, and the load goes on until it has finished and `total` were made.
/// Returns the statuses that were not 200.
async fn rest_load<F: std::future::Future<Output = ()>>(
    url: &str,
    token: &str,
    total: usize,
    in_flight: usize,
    start_during_after: usize,
    during: F,
) -> Vec<u16> {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (client, next, done, finished, failures) = (
                client.clone(),
                next.clone(),
                done.clone(),
                finished.clone(),
                failures.clone(),
            );
            let (url, token) = (url.to_owned(), token.to_owned());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < total
                    || !finished.load(Ordering::SeqCst)
                {
                    let status = match client.get(&url).bearer_auth(&token).send().await {
                        Ok(response) => response.status().as_u16(),
                        Err(_) => 0,
                    };
                    if status != 200 {
                        failures.lock().unwrap().push(status);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let progress = done.clone();
    keel_testkit::eventually(
        std::time::Duration::from_secs(60),
        "the load to get going",
        || {
            let progress = progress.clone();
            async move { (progress.load(Ordering::SeqCst) >= start_during_after).then_some(()) }
        },
    )
    .await;
    during.await;
    finished.store(true, Ordering::SeqCst);
    for worker in workers {
        worker.await.unwrap();
    }
    Arc::try_unwrap(failures).unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_in_one_process_share_the_load_and_one_draining_costs_no_rest_call() {
    let app = TestApp::spawn_with(Stores::PostgresRedis, |s| {
        s.mesh.replicas = 3;
        s.edge.rate_limit = RateLimit(None);
    })
    .await;
    assert_eq!(app.replicas.len(), 3, "three replicas on their own ports");
    assert_eq!(
        app.replicas[0], app.grpc_addr,
        "the first on the gRPC address"
    );
    let token = app.register("ada@example.com").await.access_token;
    let url = format!("http://{}/v1/users/me", app.http_addr);

    let failed = rest_load(&url, &token, 1500, 16, 500, app.drain_replica(1)).await;
    assert!(failed.is_empty(), "REST calls failed: {failed:?}");

    let metrics = metrics_of(app.admin_addr).await;
    for replica in &app.replicas {
        assert!(
            attempts_on(&metrics, "identity", *replica) > 0.0,
            "{replica} received calls through the gateway's mesh client:\n{metrics}"
        );
    }
    // The drained replica takes no more: later calls all land on the other two.
    let on_drained = attempts_on(&metrics, "identity", app.replicas[1]);
    let failed = rest_load(&url, &token, 200, 8, 0, async {}).await;
    assert!(failed.is_empty(), "REST calls failed: {failed:?}");
    let metrics = metrics_of(app.admin_addr).await;
    assert_eq!(
        attempts_on(&metrics, "identity", app.replicas[1]),
        on_drained
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_replica_the_gateway_calls_its_own_services_in_process() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.rate_limit = RateLimit(None);
    })
    .await;
    let token = app.register("ada@example.com").await.access_token;
    let get_user_ok = concat!(
        r#"grpc_server_handled_total{grpc_code="OK",grpc_method="GetUser","#,
        r#"grpc_service="keel.identity.v1.IdentityService",grpc_type="unary"}"#
    );
    let before = app.metric(get_user_ok).await;

    let url = format!("http://{}/v1/users/me", app.http_addr);
    let failed = rest_load(&url, &token, 200, 8, 0, async {}).await;
    assert!(failed.is_empty(), "REST calls failed: {failed:?}");

    let metrics = app.metrics().await;
    assert!(
        keel_testkit::http::metric(&metrics, get_user_ok) >= before + 200.0,
        "the calls went through the server's layers (metrics, shedding, auth):\n{metrics}"
    );
    assert_eq!(
        attempts_on(&metrics, "identity", app.grpc_addr),
        0.0,
        "and none through the mesh client to its own port"
    );
}

/// Identity endpoints the gateway's mesh client admits, from `/metrics` text.
fn admitted(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("keel_mesh_endpoints{")
                && line.contains("peer=\"identity\"")
                && line.contains("state=\"admitted\"")
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until the gateway's mesh client admits `count` identity endpoints.
async fn until_admitted(admin: SocketAddr, count: f64) {
    keel_testkit::eventually(
        std::time::Duration::from_secs(10),
        "the gateway's identity endpoints to settle",
        || async move { (admitted(&metrics_of(admin).await) == count).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_replica_gets_no_call_once_its_health_stream_delivered_not_serving() {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.mesh.replicas = 3;
        s.edge.rate_limit = RateLimit(None);
    })
    .await;
    let token = app.register("ada@example.com").await.access_token;
    let url = format!("http://{}/v1/users/me", app.http_addr);
    until_admitted(app.admin_addr, 3.0).await;
    let failed = rest_load(&url, &token, 300, 8, 0, async {}).await;
    assert!(failed.is_empty(), "REST calls failed: {failed:?}");

    app.replica_health(2).not_serving().await;
    until_admitted(app.admin_addr, 2.0).await;
    let settled = attempts_on(
        &metrics_of(app.admin_addr).await,
        "identity",
        app.replicas[2],
    );
    let failed = rest_load(&url, &token, 500, 8, 0, async {}).await;
    assert!(failed.is_empty(), "REST calls failed: {failed:?}");
    assert_eq!(
        attempts_on(
            &metrics_of(app.admin_addr).await,
            "identity",
            app.replicas[2]
        ),
        settled,
        "no call reached the NOT_SERVING replica"
    );
}

/// Three `keel serve identity` processes over one database, signing with one key, as
/// `KEEL_IDENTITY_ENDPOINTS` names them.
struct IdentityReplicas {
    processes: Vec<KeelProcess>,
    env: Vec<(String, String)>,
    /// Holds the shared signing key, whichever replicas come and go.
    _keys: tempfile::TempDir,
}

impl IdentityReplicas {
    async fn start(stores: &[(String, String)]) -> Self {
        let first = KeelProcess::start_with_env(&["serve", "identity"], stores).await;
        // The replicas sign with one key: the first one's development key, kept apart.
        let keys = tempfile::tempdir().unwrap();
        let key = keys.path().join("signing-key.pem");
        let dev_keys = keel::identity::keys::development_dir(first.data_dir.path());
        std::fs::copy(dev_keys.join("0-initial.pem"), &key).unwrap();
        let mut env = stores.to_vec();
        env.push(("KEEL_SIGNING_KEY".into(), key.to_str().unwrap().to_owned()));
        let mut replicas = Self {
            processes: vec![first],
            env,
            _keys: keys,
        };
        for _ in 0..2 {
            let next = replicas.spawn(&["serve", "identity"]).await;
            replicas.processes.push(next);
        }
        replicas
    }

    async fn spawn(&self, args: &[&str]) -> KeelProcess {
        KeelProcess::start_with_env(args, &self.env).await
    }

    fn endpoints(&self) -> String {
        let addrs: Vec<String> = self
            .processes
            .iter()
            .map(|p| p.grpc_addr().to_string())
            .collect();
        addrs.join(",")
    }
}

/// `keel serve gateway` in front of `peers` (flag and endpoints), with no rate limits.
async fn gateway_alone(peers: &[(&str, &str)], stores: &[(String, String)]) -> KeelProcess {
    let mut args = vec![
        "serve",
        "gateway",
        "--rate-limit",
        "off",
        "--auth-rate-limit",
        "off",
    ];
    for (flag, endpoints) in peers {
        args.extend([*flag, *endpoints]);
    }
    let gateway = KeelProcess::start_with_env(&args, stores).await;
    assert!(gateway.grpc.is_none(), "the gateway alone serves no gRPC");
    gateway
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_identity_processes_under_load_fails_no_rest_call() {
    let stores = shared_stores().await;
    let mut identity = IdentityReplicas::start(&stores).await;
    let gateway = gateway_alone(&[("--identity-endpoints", &identity.endpoints())], &stores).await;
    let token = register_over_rest(gateway.http_addr, "ada@example.com").await;

    // Each replica in turn: SIGTERM (drain), exit, the same address again, taking calls.
    let restarts = async {
        for k in 0..identity.processes.len() {
            let addr = identity.processes[k].grpc_addr();
            identity.processes[k].terminate();
            let status = identity.processes[k].child.wait().await.unwrap();
            assert!(status.success(), "replica {k} drained and exited 0");
            let restarted = identity
                .spawn(&["serve", "identity", "--grpc-addr", &addr.to_string()])
                .await;
            assert_eq!(restarted.grpc_addr(), addr);
            identity.processes[k] = restarted;
            let before = attempts_on(&metrics_of(gateway.admin_addr).await, "identity", addr);
            keel_testkit::eventually(
                std::time::Duration::from_secs(30),
                "the restarted replica to take calls again",
                || async move {
                    let now = attempts_on(&metrics_of(gateway.admin_addr).await, "identity", addr);
                    (now > before).then_some(())
                },
            )
            .await;
        }
    };
    let url = format!("http://{}/v1/users/me", gateway.http_addr);
    let failed = rest_load(&url, &token, 500, 16, 100, restarts).await;
    assert!(failed.is_empty(), "REST calls failed: {failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_identity_replicas_behind_the_gateway_alone_survive_a_crash() {
    let stores = shared_stores().await;
    let replicas = IdentityReplicas::start(&stores).await;
    let endpoints = replicas.endpoints();
    let mut identity = replicas.processes;

    // todos in a process of its own, with no signing key: it verifies tokens with the key set
    // it fetches from identity over the mesh.
    let todos = KeelProcess::start_with_env(
        &["serve", "todos", "--identity-endpoints", &endpoints],
        &stores,
    )
    .await;
    let gateway = gateway_alone(
        &[
            ("--identity-endpoints", &endpoints),
            ("--todos-endpoints", &todos.grpc_addr().to_string()),
        ],
        &stores,
    )
    .await;
    let token = register_over_rest(gateway.http_addr, "ada@example.com").await;
    let base = format!("http://{}", gateway.http_addr);
    let url = format!("{base}/v1/users/me/todos");
    let (status, body) = post(
        &url,
        &token,
        serde_json::json!({"title": "through the mesh"}),
    )
    .await;
    assert_eq!(status, 200, "todos accepted identity's token: {body}");

    // One identity replica dies mid-load: no REST call fails.
    let url = format!("{base}/v1/users/me");
    let victim = identity.remove(1);
    let mut victim_child = victim.child;
    let failed = rest_load(&url, &token, 2000, 32, 500, async {
        victim_child.start_kill().expect("SIGKILL");
        let _ = victim_child.wait().await;
    })
    .await;
    assert!(failed.is_empty(), "REST calls failed: {failed:?}");
    let metrics = metrics_of(gateway.admin_addr).await;
    for survivor in &identity {
        assert!(attempts_on(&metrics, "identity", survivor.grpc_addr()) > 0.0);
    }

    // With no identity left, the gateway answers 503 at once instead of waiting out the
    // deadline (504).
    for mut survivor in identity {
        survivor.child.start_kill().expect("SIGKILL");
        let _ = survivor.child.wait().await;
    }
    let down = reqwest::Client::new()
        .get(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(down.status(), 503);
    let body: serde_json::Value = down.json().await.unwrap();
    assert_eq!(body["code"], 14, "UNAVAILABLE: {body}");
}

/// `/readyz` of the process whose admin port is `admin`: its status.
async fn readyz(admin: SocketAddr) -> u16 {
    let url = format!("http://{admin}/readyz");
    keel_testkit::http::get(&url).await.expect("GET /readyz").0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_verifying_with_identitys_key_set_is_ready_only_once_it_holds_it() {
    let stores = shared_stores().await;
    // identity's address with nothing there yet, as right after `compose up`.
    let identity_addr = format!("127.0.0.1:{}", keel_testkit::free_port());
    let todos = KeelProcess::start_with_env(
        &["serve", "todos", "--identity-endpoints", &identity_addr],
        &stores,
    )
    .await;
    assert_eq!(
        readyz(todos.admin_addr).await,
        503,
        "todos cannot verify a token yet, so it is not ready for one"
    );

    let identity = KeelProcess::start_with_env(
        &["serve", "identity", "--grpc-addr", &identity_addr],
        &stores,
    )
    .await;
    keel_testkit::eventually(
        std::time::Duration::from_secs(30),
        "todos to be ready once identity publishes its key set",
        || async { (readyz(todos.admin_addr).await == 200).then_some(()) },
    )
    .await;
    let token = register_over_rest(identity.http_addr, "ada@example.com").await;
    let url = format!("http://{}/v1/users/me/todos", todos.http_addr);
    let title = serde_json::json!({"title": "the first token it sees"});
    let (status, body) = post(&url, &token, title).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_identity_a_process_is_ready_after_its_key_set_wait_and_serves_public_reads() {
    let stores = shared_stores().await;
    let nowhere = format!("127.0.0.1:{}", keel_testkit::free_port());
    let catalog = KeelProcess::start_with_env(
        &[
            "serve",
            "catalog",
            "--identity-endpoints",
            &nowhere,
            "--key-set-wait",
            "300ms",
        ],
        &stores,
    )
    .await;
    keel_testkit::eventually(
        std::time::Duration::from_secs(30),
        "catalog to be ready once its key set wait is over",
        || async { (readyz(catalog.admin_addr).await == 200).then_some(()) },
    )
    .await;
    assert!(
        catalog
            .logs()
            .contains("no token key set from identity yet"),
        "{}",
        catalog.logs()
    );
    let url = format!("http://{}/v1/products", catalog.http_addr);
    let (status, body) = keel_testkit::http::get(&url).await.unwrap();
    assert_eq!(status, 200, "a public read needs no key: {body}");

    // identity comes late: catalog fetches its key set before any token asks for it.
    let identity =
        KeelProcess::start_with_env(&["serve", "identity", "--grpc-addr", &nowhere], &stores).await;
    keel_testkit::eventually(
        std::time::Duration::from_secs(30),
        "catalog to fetch the key set once identity is up",
        || async {
            let logs = catalog.logs();
            logs.contains("token key set from identity fetched, after the wait")
                .then_some(())
        },
    )
    .await;
    let token = register_over_rest(identity.http_addr, "ada@example.com").await;
    let url = format!("http://{}/v1/products", catalog.http_addr);
    let lamp = serde_json::json!({"title": "Lamp", "price": {"currencyCode": "EUR", "units": 5}});
    let (status, body) = post(&url, &token, lamp).await;
    assert_eq!(
        status, 200,
        "the first user (an admin, in development) is verified: {body}"
    );
}

/// POSTs `body` to `url` as `token`: the status and the answer's text.
async fn post(url: &str, token: &str, body: serde_json::Value) -> (u16, String) {
    let answer = reqwest::Client::new()
        .post(url)
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .expect("POST");
    let status = answer.status().as_u16();
    (status, answer.text().await.expect("the answer's text"))
}

/// `path` through the gateway as `token`: the status and the body's bytes.
async fn rest_bytes(app: &TestApp, path: &str, token: &str) -> (u16, Vec<u8>) {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", app.rest_base))
        .bearer_auth(token)
        .send()
        .await
        .expect("REST call");
    let status = response.status().as_u16();
    (status, response.bytes().await.expect("REST body").to_vec())
}

/// `message` as the gateway's dynamic serializer writes it: what the gateway wrote before the
/// lane, from the answer's bytes over gRPC.
fn dynamic_json(message: &impl prost::Message, full_name: &str) -> String {
    let pool = prost_reflect::DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET).unwrap();
    let descriptor = pool.get_message_by_name(full_name).unwrap();
    let bytes = message.encode_to_vec();
    let dynamic = prost_reflect::DynamicMessage::decode(descriptor, bytes.as_slice()).unwrap();
    String::from_utf8(keel_gateway::transcode::to_json(&dynamic, None).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_the_in_process_lane_a_rest_answer_is_the_grpc_answer_byte_for_byte() {
    use keel::proto::keel::catalog::v1::GetProductRequest;
    use keel::proto::keel::identity::v1::GetUserRequest;
    use keel::proto::keel::todos::v1::{CreateTodoRequest, ListTodosRequest, Todo};
    use support::authed;

    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.edge.rate_limit = RateLimit(None);
    })
    .await;
    let people = app.people().await;
    let product = app
        .product(&people.admin, "Tea \"green\" 🍵", 450, 10)
        .await;
    let mut todos = app.todos().await;
    for i in 0..3 {
        let todo = Todo {
            title: format!("todo {i}"),
            ..Todo::default()
        };
        let create = CreateTodoRequest {
            parent: "users/me".into(),
            todo: Some(todo),
            ..CreateTodoRequest::default()
        };
        todos
            .create_todo(authed(create, &people.ada))
            .await
            .unwrap();
    }

    let grpc = app
        .catalog()
        .await
        .get_product(GetProductRequest {
            name: product.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (status, rest) = rest_bytes(&app, &format!("/v1/{}", product.name), &people.ada).await;
    assert_eq!(status, 200);
    let product_json = dynamic_json(&grpc, "keel.catalog.v1.Product");
    assert_eq!(String::from_utf8(rest).unwrap(), product_json);

    let get_user = GetUserRequest {
        name: "users/me".into(),
    };
    let grpc = app.identity().await;
    let me = grpc.clone().get_user(authed(get_user, &people.ada)).await;
    let (status, rest) = rest_bytes(&app, "/v1/users/me", &people.ada).await;
    assert_eq!(status, 200);
    let user_json = dynamic_json(&me.unwrap().into_inner(), "keel.identity.v1.User");
    assert_eq!(String::from_utf8(rest).unwrap(), user_json);

    let list = ListTodosRequest {
        parent: "users/me".into(),
        ..ListTodosRequest::default()
    };
    let page = todos.list_todos(authed(list, &people.ada)).await.unwrap();
    let (status, rest) = rest_bytes(&app, "/v1/users/me/todos", &people.ada).await;
    assert_eq!(status, 200);
    let page_json = dynamic_json(&page.into_inner(), "keel.todos.v1.ListTodosResponse");
    assert_eq!(String::from_utf8(rest).unwrap(), page_json);

    // A refusal on the lane keeps its code and words: bob may not read ada's todos.
    let ada = app.user_name(&people.ada).await;
    let theirs = ListTodosRequest {
        parent: ada.clone(),
        ..ListTodosRequest::default()
    };
    let refused = todos
        .list_todos(authed(theirs, &people.bob))
        .await
        .unwrap_err();
    let (status, rest) = rest_bytes(&app, &format!("/v1/{ada}/todos"), &people.bob).await;
    let rest: serde_json::Value = serde_json::from_slice(&rest).unwrap();
    assert_eq!(status, 403, "{rest}");
    assert_eq!(rest["code"], refused.code() as i32);
    assert_eq!(rest["message"], refused.message());

    let metrics = app.metrics().await;
    assert_eq!(
        attempts_on(&metrics, "catalog", app.grpc_addr)
            + attempts_on(&metrics, "identity", app.grpc_addr)
            + attempts_on(&metrics, "todos", app.grpc_addr),
        0.0,
        "the REST calls went on the lane, not through the mesh client"
    );
}
