//! identity under load, against the release `keel` binary on loopback (the load generator shares
//! the machine): GetUser cache hits, RSS, logins beside reads, and a login flood beside reads
//! with the hashing queue unbounded (as before 2026-11-28) and bounded (the default since).
//!
//!     cargo bench --bench identity
//!
//! Prints a Markdown section for benches/RESULTS.md.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

mod load;

use std::time::Duration;

use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use keel::proto::keel::identity::v1::{GetUserRequest, LoginRequest};
use load::{Keel, authed, row};

/// The password `load::register` gives.
const PASSWORD: &str = "correct horse battery";
const READERS: usize = 50;
const CONNECTIONS: usize = 2;
const LOGINS_IN_FLIGHT: usize = 8;
/// A flood: far more logins at once than hashing slots and queue.
const FLOOD_IN_FLIGHT: usize = 64;
const WARMUP: Duration = Duration::from_secs(2);
const RUN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() {
    println!("### identity (cargo bench --bench identity)\n");
    println!("| scenario | calls/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|");
    // The default bound (half the cores) and the CPU count, to show what the bound buys.
    // Sign-in limits off: one load generator is one address, and the flood is the point.
    let open = ["--auth-rate-limit", "off", "--login-failures", "off"];
    for (bound, label) in [
        (None, "default: half the cores"),
        (Some("2"), "2 = every core"),
    ] {
        let mut args = open.to_vec();
        if let Some(b) = bound {
            args.extend(["--max-concurrent-hashes", b]);
        }
        run(&args, label, LOGINS_IN_FLIGHT).await;
    }
    for (queue, label) in [
        (Some("1000000"), "queue unbounded"),
        (None, "queue bounded (default)"),
    ] {
        let mut args = open.to_vec();
        if let Some(q) = queue {
            args.extend(["--max-queued-hashes", q]);
        }
        run(&args, label, FLOOD_IN_FLIGHT).await;
    }
}

async fn run(args: &[&str], bound: &str, logins_in_flight: usize) {
    let keel = Keel::start(args, &[]).await;
    let channels = keel.connections(CONNECTIONS).await;
    let token = load::register(channels[0].clone(), "bench@example.com").await;
    let mut identity = IdentityServiceClient::new(channels[0].clone());
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
                        ..Default::default()
                    })
                    .await
                    .is_ok()
            }
        }
    };
    let login_run = tokio::spawn(load::run(logins_in_flight, WARMUP, RUN, logins));
    let beside = load::run(READERS, WARMUP, RUN, reads).await;
    let login_run = login_run.await.unwrap();

    println!(
        "{}",
        row(
            &format!(
                "GetUser cache hit, {READERS} in flight over {CONNECTIONS} connections ({bound})"
            ),
            &alone
        )
    );
    println!(
        "{}",
        row(
            &format!("Login, {logins_in_flight} in flight (argon2id, {bound}; errors = refused)"),
            &login_run
        )
    );
    println!(
        "{}",
        row(
            &format!("GetUser cache hit while those logins run ({bound})"),
            &beside
        )
    );
    println!(
        "| RSS ({bound}) | {rss_idle:.1} MiB idle | {rss_loaded:.1} MiB under GetUser load | | |"
    );
}
