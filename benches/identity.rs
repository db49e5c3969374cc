//! identity under load, against the release `keel` binary on loopback (the load generator shares
//! the machine): GetUser cache hits, RSS, and logins beside reads.
//!
//!     cargo bench --bench identity
//!
//! Prints a Markdown section for benches/RESULTS.md.

mod load;

use std::time::Duration;

use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use keel::proto::keel::identity::v1::{GetUserRequest, LoginRequest, RegisterRequest};
use load::{Keel, authed, row};

const PASSWORD: &str = "correct horse battery";
const READERS: usize = 50;
const CONNECTIONS: usize = 2;
const LOGINS_IN_FLIGHT: usize = 8;
const WARMUP: Duration = Duration::from_secs(2);
const RUN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() {
    println!("### identity (cargo bench --bench identity)\n");
    println!("| scenario | calls/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|");
    // The default bound (half the cores) and the CPU count, to show what the bound buys.
    for (bound, label) in [
        (None, "default: half the cores"),
        (Some("2"), "2 = every core"),
    ] {
        let args: Vec<&str> = bound
            .map(|b| vec!["--max-concurrent-hashes", b])
            .unwrap_or_default();
        run(&args, label).await;
    }
}

async fn run(args: &[&str], bound: &str) {
    let keel = Keel::start(args, &[]).await;
    let channels = keel.connections(CONNECTIONS).await;
    let mut identity = IdentityServiceClient::new(channels[0].clone());
    let token = identity
        .register(RegisterRequest {
            email: "bench@example.com".into(),
            password: PASSWORD.into(),
            display_name: "Bench".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    identity
        .get_user(authed(
            GetUserRequest {
                name: "users/me".into(),
            },
            &token,
        ))
        .await
        .unwrap();
    let rss_idle = load::rss_mib(keel.pid);

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
    let pid = keel.pid;
    let sampler = tokio::spawn(async move {
        tokio::time::sleep(WARMUP + RUN / 2).await;
        load::rss_mib(pid)
    });
    let alone = load::run(READERS, WARMUP, RUN, reads.clone()).await;
    let rss_loaded = sampler.await.unwrap();

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

    println!(
        "{}",
        row(
            &format!(
                "GetUser cache hit, {READERS} in flight over {CONNECTIONS} connections (hash bound {bound})"
            ),
            &alone
        )
    );
    println!(
        "{}",
        row(
            &format!("Login, {LOGINS_IN_FLIGHT} in flight (argon2id, hash bound {bound})"),
            &login_run
        )
    );
    println!(
        "{}",
        row(
            &format!("GetUser cache hit while those logins run (hash bound {bound})"),
            &beside
        )
    );
    println!(
        "| RSS (hash bound {bound}) | {rss_idle:.1} MiB idle | {rss_loaded:.1} MiB under GetUser load | | |"
    );
}
