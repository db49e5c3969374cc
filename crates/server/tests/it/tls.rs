//! mTLS between services: a client presenting a certificate from the development CA gets
//! through the mesh; one without a certificate, one with another CA's, and plaintext are refused.

#![allow(
    clippy::too_many_lines,
    reason = "a scenario or a bench reads top to bottom, as its specification"
)]

use std::sync::Arc;
use std::time::Duration;

use keel_devcerts::write_all as write_dev_certs;
use keel_mesh::client::{ClientOptions, Target, balanced};
use keel_mesh::tls::dev_files;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::ServingStatus;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn temp_dir() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("keel-tls-{}", uuid::Uuid::new_v4().simple()))
}

async fn check(channel: Channel) -> Result<i32, tonic::Status> {
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
}

fn endpoint(addr: std::net::SocketAddr, tls: Option<ClientTlsConfig>) -> Endpoint {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint
}

/// What a client sees when the server ends the handshake: its alert, or (when the alert loses
/// the race with the client's first request) the connection closing under it; a plaintext
/// client reads the server's TLS record as a malformed HTTP/2 frame.
const HUNG_UP: [&str; 5] = [
    "received fatal alert",
    "connection closed",
    "broken pipe",
    "reset",
    "frame with invalid size",
];

/// Asserts that a health check through `tls` was refused by the server — not answered, and not
/// given up by the client (which would prove nothing about the server) — and says how.
async fn refused(addr: std::net::SocketAddr, tls: Option<ClientTlsConfig>) -> String {
    let why = refusal(addr, tls).await;
    assert!(
        HUNG_UP.iter().any(|h| why.contains(h)),
        "not the server's refusal: {why}"
    );
    why
}

/// Why a health check through `tls` was not answered: the connection's or the call's error,
/// with every source. Panics if it was answered.
async fn refusal(addr: std::net::SocketAddr, tls: Option<ClientTlsConfig>) -> String {
    let chain = |e: &(dyn std::error::Error + 'static)| {
        std::iter::successors(Some(e), |e| e.source())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ")
    };
    match endpoint(addr, tls).connect().await {
        Err(e) => chain(&e),
        Ok(channel) => match check(channel).await {
            Err(status) => format!("{status:?}: {}", chain(&status)),
            Ok(answered) => panic!("served ({answered})"),
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_clients_with_a_certificate_from_the_ca_get_through() {
    let (dir, stranger) = (temp_dir(), temp_dir());
    write_dev_certs(&dir, &["echo", "client"]).unwrap();
    write_dev_certs(&stranger, &["client"]).unwrap();

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_service_status("", ServingStatus::Serving).await;
    let listener = keel_testkit::loopback_listener().await;
    let addr = listener.local_addr().unwrap();
    let server_tls = dev_files(&dir, "echo").server().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(server_tls)
            .unwrap()
            .add_service(health_service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    // Through the mesh, with the client certificate: admitted and answered.
    let client_tls = dev_files(&dir, "client").client("localhost").unwrap();
    let target: Target = addr.to_string().parse().unwrap();
    let mesh = balanced(
        Arc::new(target),
        ClientOptions {
            tls: Some(client_tls),
            ..ClientOptions::default()
        },
    );
    let status = HealthClient::new(mesh)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(status.into_inner().status, ServingStatus::Serving as i32);

    // The CA but no certificate of our own: the handshake is refused.
    let ca = Certificate::from_pem(std::fs::read(dir.join("ca.pem")).unwrap());
    let anonymous = ClientTlsConfig::new()
        .ca_certificate(ca.clone())
        .domain_name("localhost");
    refused(addr, Some(anonymous)).await;

    // A certificate from another CA: refused.
    let forged = Identity::from_pem(
        std::fs::read(stranger.join("client.pem")).unwrap(),
        std::fs::read(stranger.join("client-key.pem")).unwrap(),
    );
    let foreign = ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(forged)
        .domain_name("localhost");
    refused(addr, Some(foreign)).await;

    // Plaintext: refused.
    refused(addr, None).await;
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(stranger);
}
