//! identity under load, against the release `keel` binary on loopback (the load generator shares
//! the machine): GetUser cache hits, RSS, and logins beside reads.
//!
//!     cargo bench --bench identity
//!
//! Prints a Markdown section for benches/RESULTS.md.

mod load;

use std::process::Stdio;
use std::time::Duration;

use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use keel::proto::keel::identity::v1::{GetUserRequest, LoginRequest, RegisterRequest};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tonic::transport::Channel;

const PASSWORD: &str = "correct horse battery";
const READERS: usize = 50;
const CONNECTIONS: usize = 2;
const LOGINS_IN_FLIGHT: usize = 8;
const WARMUP: Duration = Duration::from_secs(2);
const RUN: Duration = Duration::from_secs(10);

fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::main]
async fn main() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args([
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--log",
            "warn",
        ])
        .arg("--data-dir")
        .arg(data_dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn keel");
    let pid = child.id().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addr = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        if let Some(a) = line.trim().strip_prefix("gRPC") {
            addr = Some(a.trim().to_owned());
            break;
        }
    }
    let endpoint = format!("http://{}", addr.expect("banner"));
    let mut channels: Vec<Channel> = Vec::new();
    for _ in 0..CONNECTIONS {
        let channel = Channel::from_shared(endpoint.clone()).unwrap();
        channels.push(channel.connect().await.expect("connect"));
    }

    let mut identity = IdentityServiceClient::new(channels[0].clone());
    let registered = identity
        .register(RegisterRequest {
            email: "bench@example.com".into(),
            password: PASSWORD.into(),
            display_name: "Bench".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let token = registered.access_token;
    identity
        .get_user(authed(
            GetUserRequest {
                name: "users/me".into(),
            },
            &token,
        ))
        .await
        .unwrap();
    let rss_idle = load::rss_mib(pid);

    let reads = {
        let (channels, token) = (channels.clone(), token.clone());
        move |worker: usize| {
            let mut client = IdentityServiceClient::new(channels[worker % CONNECTIONS].clone());
            let request = authed(
                GetUserRequest {
                    name: "users/me".into(),
                },
                &token,
            );
            async move { client.get_user(request).await.is_ok() }
        }
    };

    // Phase 1: cache-hit reads alone, sampling RSS half-way.
    let sampler = tokio::spawn(async move {
        tokio::time::sleep(WARMUP + RUN / 2).await;
        load::rss_mib(pid)
    });
    let alone = load::run(READERS, WARMUP, RUN, reads.clone()).await;
    let rss_loaded = sampler.await.unwrap();

    // Phase 2: the same reads while logins hash passwords as fast as the bound allows.
    let logins = {
        let channels = channels.clone();
        move |worker: usize| {
            let mut client = IdentityServiceClient::new(channels[worker % CONNECTIONS].clone());
            async move {
                client
                    .login(LoginRequest {
                        email: "bench@example.com".into(),
                        password: PASSWORD.into(),
                    })
                    .await
                    .is_ok()
            }
        }
    };
    let login_run = tokio::spawn(load::run(LOGINS_IN_FLIGHT, WARMUP, RUN, logins));
    let beside = load::run(READERS, WARMUP, RUN, reads).await;
    let login_run = login_run.await.unwrap();

    let _ = child.kill().await;

    println!("### identity (cargo bench --bench identity)\n");
    println!("| scenario | calls/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|");
    println!(
        "| GetUser cache hit, {READERS} in flight over {CONNECTIONS} connections | {:.0} | {:.2} | {:.2} | {} |",
        alone.per_second(),
        alone.percentile_ms(50.0),
        alone.percentile_ms(99.0),
        alone.errors
    );
    println!(
        "| Login, {LOGINS_IN_FLIGHT} in flight (argon2id, bound = CPU count) | {:.1} | {:.1} | {:.1} | {} |",
        login_run.per_second(),
        login_run.percentile_ms(50.0),
        login_run.percentile_ms(99.0),
        login_run.errors
    );
    println!(
        "| GetUser cache hit while those logins run | {:.0} | {:.2} | {:.2} | {} |",
        beside.per_second(),
        beside.percentile_ms(50.0),
        beside.percentile_ms(99.0),
        beside.errors
    );
    println!("\nRSS: {rss_idle:.1} MiB idle, {rss_loaded:.1} MiB under the GetUser load.");
}
