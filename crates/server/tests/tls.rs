//! mTLS between services: a client presenting a certificate from the development CA gets
//! through the mesh; one without a certificate, one with another CA's, and plaintext are refused.

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

async fn connect(addr: std::net::SocketAddr, tls: Option<ClientTlsConfig>) -> Option<Channel> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    endpoint.connect().await.ok()
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
    if let Some(channel) = connect(addr, Some(anonymous)).await {
        assert!(
            check(channel).await.is_err(),
            "a client without a certificate was served"
        );
    }

    // A certificate from another CA: refused.
    let forged = Identity::from_pem(
        std::fs::read(stranger.join("client.pem")).unwrap(),
        std::fs::read(stranger.join("client-key.pem")).unwrap(),
    );
    let foreign = ClientTlsConfig::new()
        .ca_certificate(ca)
        .identity(forged)
        .domain_name("localhost");
    if let Some(channel) = connect(addr, Some(foreign)).await {
        assert!(
            check(channel).await.is_err(),
            "a certificate from another CA was accepted"
        );
    }

    // Plaintext: refused.
    if let Some(channel) = connect(addr, None).await {
        assert!(
            check(channel).await.is_err(),
            "a plaintext client was served"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(stranger);
}
