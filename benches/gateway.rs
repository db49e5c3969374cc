//! The gateway's cost: GET /v1/users/me through the REST gateway against GetUser over gRPC
//! directly, on the same release `keel` process, 50 calls in flight each.
//!
//!     cargo bench --bench gateway
//!
//! Prints a Markdown section for benches/RESULTS.md.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

mod load;

use std::time::Duration;

use keel::proto::keel::identity::v1::GetUserRequest;
use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use load::{Keel, authed, row};

const IN_FLIGHT: usize = 50;
const WARMUP: Duration = Duration::from_secs(2);
const RUN: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() {
    let keel = Keel::start(&["--rate-limit", "off"], &[]).await;
    let channels = keel.connections(2).await;
    let token = load::register(channels[0].clone(), "bench@example.com").await;

    let grpc = load::run(IN_FLIGHT, WARMUP, RUN, {
        let (channels, token) = (channels.clone(), token.clone());
        move |w| {
            let mut client = IdentityServiceClient::new(channels[w % 2].clone());
            let request = authed(
                GetUserRequest {
                    name: "users/me".into(),
                },
                &token,
            );
            async move { client.get_user(request).await.is_ok() }
        }
    })
    .await;

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(IN_FLIGHT)
        .build()
        .unwrap();
    let url = format!("{}/v1/users/me", keel.rest_endpoint());
    let rest = load::run(IN_FLIGHT, WARMUP, RUN, {
        let (http, url, token) = (http.clone(), url.clone(), token.clone());
        move |_| {
            let request = http.get(&url).bearer_auth(&token);
            async move { request.send().await.is_ok_and(|r| r.status().is_success()) }
        }
    })
    .await;

    println!("### gateway (cargo bench --bench gateway)\n");
    println!("| scenario | calls/s | p50 ms | p99 ms | errors |");
    println!("|---|---|---|---|---|");
    println!(
        "{}",
        row(
            &format!("GetUser over gRPC, {IN_FLIGHT} in flight over 2 HTTP/2 connections"),
            &grpc
        )
    );
    println!(
        "{}",
        row(
            &format!("GET /v1/users/me through the gateway, {IN_FLIGHT} HTTP/1.1 connections"),
            &rest
        )
    );
    println!(
        "\nAdded by the gateway at p50: {:.2} ms (the gateway shares the 2 cores with keel's gRPC side and the load generator).",
        rest.percentile_ms(50.0) - grpc.percentile_ms(50.0)
    );
}
