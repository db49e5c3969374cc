//! Server-side protection: calls past a service's concurrency limit wait their turn in a line
//! a few times the limit long; past the line a service refuses new calls at once with
//! RESOURCE_EXHAUSTED and a retry pushback, and the calls it accepted still succeed.

use crate::support;

use keel::proto::keel::identity::v1::{LoginRequest, LoginResponse};
use support::{PASSWORD, Stores, TestApp, at_once, clients};
use tonic::{Code, Status};

/// Logins of ada, `n` at once, by `n` clients connected first.
async fn logins(app: &TestApp, n: usize) -> Vec<Result<tonic::Response<LoginResponse>, Status>> {
    let clients = clients(n, || app.identity()).await;
    at_once(clients, |_, mut identity| async move {
        identity
            .login(LoginRequest {
                email: "ada@example.com".into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
    })
    .await
}

/// Two calls in flight at most, and one password hash at a time: logins pile up.
async fn crowded() -> TestApp {
    let app = TestApp::spawn_with(Stores::Embedded, |s| {
        s.limits.max_concurrent_calls = 2;
        s.identity.max_concurrent_hashes = Some(1);
    })
    .await;
    app.register("ada@example.com").await;
    app
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_a_few_times_the_limit_waits_its_turn() {
    // Six logins at once where two fit: four wait in line (room for eight), none is refused.
    let app = crowded().await;
    let answers = logins(&app, 6).await;
    let refused: Vec<_> = answers.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(refused.is_empty(), "{refused:?}");
    let peak = app.peak_in_flight("keel.identity.v1.IdentityService").await;
    assert_eq!(peak, 2.0, "never more than the limit at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_limit_and_its_line_are_shed_with_a_pushback() {
    // Forty logins at once where two fit and eight may wait.
    let app = crowded().await;
    let answers = logins(&app, 40).await;
    let (mut ok, mut shed) = (0, 0);
    for answer in answers {
        match answer {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(
                    status.metadata().get("grpc-retry-pushback-ms").unwrap(),
                    "50"
                );
                shed += 1;
            }
        }
    }
    // However fast the logins: at most ten of forty were ever admitted or in line at once.
    assert!(ok >= 2 && shed >= 1, "ok {ok}, shed {shed}");
    let refused = concat!(
        r#"grpc_server_handled_total{grpc_code="ResourceExhausted",grpc_method="Login","#,
        r#"grpc_service="keel.identity.v1.IdentityService",grpc_type="unary"}"#
    );
    assert_eq!(app.metric(refused).await, f64::from(shed));
    // Health is never shed.
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel().await);
    let check = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(check.into_inner().status, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_when_the_database_dies() {
    let (postgres, url) = keel_testkit::Postgres::dedicated().await;
    let app = TestApp::spawn_with(Stores::Embedded, move |s| {
        s.stores.database_url = Some(url);
        s.stores.database_max_connections = 2;
        s.operations.health_probe_interval = std::time::Duration::from_millis(100);
    })
    .await;
    let readyz = format!("http://{}/readyz", app.admin_addr);
    assert_eq!(keel_testkit::http::get(&readyz).await.unwrap().0, 200);

    postgres.kill();

    keel_testkit::eventually(
        std::time::Duration::from_secs(20),
        "readiness to drop with the database",
        || {
            let readyz = readyz.clone();
            async move { (keel_testkit::http::get(&readyz).await.ok()?.0 == 503).then_some(()) }
        },
    )
    .await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel().await);
    let check = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "keel.identity.v1.IdentityService".into(),
        })
        .await
        .unwrap();
    assert_eq!(check.into_inner().status, 2, "NOT_SERVING");
}
