//! keel through its own mesh: replicas of every service behind the balancer in one process
//! (`--replicas`), and separate `keel serve` processes found by `--<service>-endpoints`, with
//! the REST gateway alone in front. A replica that drains or dies costs REST clients nothing.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use keel::config::RateLimit;
use support::process::KeelProcess;
use support::{Stores, TestApp};

/// Attempts the gateway's mesh client made on `endpoint` of `peer`, from `/metrics` text.
fn attempts_on(metrics: &str, peer: &str, endpoint: SocketAddr) -> f64 {
    metrics
        .lines()
        .filter(|line| {
            line.starts_with("keel_mesh_endpoint_attempts_total{")
                && line.contains(&format!("peer=\"{peer}\""))
                && line.contains(&format!("endpoint=\"{endpoint}\""))
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

/// REST load: `total` GETs of `url` with `token`, `in_flight` at a time, while `during` runs
/// once `start_during_after` of them are done. Returns the statuses that were not 200.
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
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..in_flight)
        .map(|_| {
            let (client, next, done, failures) =
                (client.clone(), next.clone(), done.clone(), failures.clone());
            let (url, token) = (url.to_owned(), token.to_owned());
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::SeqCst) < total {
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
    for worker in workers {
        worker.await.unwrap();
    }
    Arc::try_unwrap(failures).unwrap().into_inner().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_in_one_process_share_the_load_and_one_draining_costs_no_rest_call() {
    let app = TestApp::spawn_with(Stores::PostgresRedis, |s| {
        s.replicas = 3;
        s.rate_limit = RateLimit(None);
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
async fn separate_identity_replicas_behind_the_gateway_alone_survive_a_crash() {
    let database = keel_testkit::fresh_database().await;
    let (redis, prefix) = keel_testkit::fresh_prefix().await;
    let stores = [
        ("KEEL_DATABASE_URL", database.as_str()),
        ("KEEL_REDIS_URL", redis.as_str()),
        ("KEEL_REDIS_PREFIX", prefix.as_str()),
    ];
    let first = KeelProcess::start_with_env(&["serve", "identity"], &stores).await;
    // The replicas sign with one key: the first one's development key.
    let key = first.data_dir.path().join("identity-signing-key.pem");
    let key = key.to_str().unwrap();
    let signing = [&stores[..], &[("KEEL_SIGNING_KEY", key)]].concat();
    let mut identity = vec![first];
    for _ in 0..2 {
        identity.push(KeelProcess::start_with_env(&["serve", "identity"], &signing).await);
    }
    let endpoints: Vec<String> = identity.iter().map(|p| p.grpc_addr().to_string()).collect();
    let endpoints = endpoints.join(",");

    // todos in a process of its own, with no signing key: it verifies tokens with the key set
    // it fetches from identity over the mesh.
    let todos = KeelProcess::start_with_env(
        &["serve", "todos", "--identity-endpoints", &endpoints],
        &stores,
    )
    .await;
    let todos_endpoint = todos.grpc_addr().to_string();
    let gateway = KeelProcess::start_with_env(
        &[
            "serve",
            "gateway",
            "--identity-endpoints",
            &endpoints,
            "--todos-endpoints",
            &todos_endpoint,
            "--rate-limit",
            "off",
            "--auth-rate-limit",
            "off",
        ],
        &stores,
    )
    .await;
    assert!(gateway.grpc.is_none(), "the gateway alone serves no gRPC");

    let client = reqwest::Client::new();
    let base = format!("http://{}", gateway.http_addr);
    let registered: serde_json::Value = client
        .post(format!("{base}/v1/auth:register"))
        .json(&serde_json::json!({"email": "ada@example.com", "password": support::PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = registered["accessToken"]
        .as_str()
        .unwrap_or_else(|| panic!("registered: {registered}"))
        .to_owned();
    let created = client
        .post(format!("{base}/v1/users/me/todos"))
        .bearer_auth(&token)
        .json(&serde_json::json!({"title": "through the mesh"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        created.status(),
        200,
        "todos accepted identity's token: {}",
        created.text().await.unwrap()
    );

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
    let down = client.get(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(down.status(), 503);
    let body: serde_json::Value = down.json().await.unwrap();
    assert_eq!(body["code"], 14, "UNAVAILABLE: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_dev_with_replicas_prints_them_and_each_reports_its_health() {
    let keel = KeelProcess::start(&["dev", "--replicas", "2"]).await;
    assert_eq!(keel.replicas.len(), 2, "logs:\n{}", keel.logs());
    for replica in &keel.replicas {
        let channel = tonic::transport::Channel::from_shared(format!("http://{replica}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let status = tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: "keel.catalog.v1.CatalogService".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
}
