//! The registry is the one list every command reads: each registered service is migrated by
//! `keel migrate`, served by `keel dev` and alone by `keel serve <name>`, and routed by the
//! gateway. A service that forgets one of those fails here, on the real binary.

use crate::support;

use keel::config::Settings;
use keel::domain::{DOMAINS, Domain};
use prost_reflect::DescriptorPool;
use support::process::{KeelProcess, keel_command};
use tonic::codegen::Bytes;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn pool() -> DescriptorPool {
    DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET).expect("descriptors")
}

/// Checks that `addr` serves every gRPC service of `domain`: health says SERVING, and a unary
/// method answers something other than UNIMPLEMENTED (an empty request may well be refused).
async fn serves(addr: std::net::SocketAddr, domain: &Domain) {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let pool = pool();
    for name in domain.grpc_names {
        let health = HealthClient::new(channel.clone())
            .check(HealthCheckRequest {
                service: (*name).to_owned(),
            })
            .await
            .unwrap_or_else(|s| panic!("{}: health of {name}: {s:?}", domain.name))
            .into_inner();
        assert_eq!(health.status, ServingStatus::Serving as i32, "{name}");
        let service = pool
            .get_service_by_name(name)
            .unwrap_or_else(|| panic!("{name} is in the descriptors"));
        let method = service
            .methods()
            .find(|m| !m.is_client_streaming() && !m.is_server_streaming())
            .unwrap_or_else(|| panic!("{name} has a unary method"));
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let path = format!("/{name}/{}", method.name());
        let answer = grpc
            .unary(
                tonic::Request::new(Bytes::new()),
                path.parse().unwrap(),
                keel_gateway::call::RawCodec,
            )
            .await;
        if let Err(status) = answer {
            assert_ne!(
                status.code(),
                tonic::Code::Unimplemented,
                "{path}: {status:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_migrate_applies_the_migrations_of_every_registered_service() {
    let data_dir = tempfile::tempdir().unwrap();
    let mut settings = Settings::defaults();
    settings.stores.data_dir = data_dir.path().to_owned();
    let db = keel::store::connect_database(&settings.stores)
        .await
        .unwrap();
    for domain in DOMAINS {
        let pending = domain.migrations.pending(&db).await.unwrap();
        assert!(pending > 0, "{} has migrations to apply", domain.name);
    }
    let output = keel_command(data_dir.path())
        .arg("migrate")
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    for domain in DOMAINS {
        let pending = domain.migrations.pending(&db).await.unwrap();
        assert_eq!(pending, 0, "keel migrate left {}'s migrations", domain.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_dev_serves_and_routes_every_registered_service() {
    let keel = KeelProcess::start(&["dev"]).await;
    let grpc = keel.grpc.expect("keel dev serves gRPC");
    for domain in DOMAINS {
        serves(grpc, domain).await;
    }

    // The gateway routes every REST binding of every registered service: its document, made
    // from its own route table, lists each.
    let (status, document) =
        keel_testkit::http::get(&format!("http://{}/openapi.json", keel.http_addr))
            .await
            .unwrap();
    assert_eq!(status, 200);
    let document: serde_json::Value = serde_json::from_str(&document).unwrap();
    let pool = pool();
    let table = keel_gateway::RouteTable::from_pool(&pool).unwrap();
    let served = keel::domain::grpc_names(DOMAINS);
    let mut routed = 0;
    for route in table.routes() {
        let service = route.method.parent_service().full_name().to_owned();
        if !served.contains(&service.as_str()) {
            continue;
        }
        let (path, _) = route.template.openapi();
        let method = route.http_method.as_str().to_ascii_lowercase();
        assert!(
            document["paths"][&path][&method].is_object(),
            "{method} {path} ({service}) is not routed"
        );
        routed += 1;
    }
    assert!(routed > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_serve_runs_each_registered_service_alone() {
    // The peers a service calls (orders calls catalog, payments and identity) live in a
    // `keel dev` beside it.
    let peers = KeelProcess::start(&["dev", "--worker-concurrency", "0"]).await;
    let at = peers.grpc.expect("keel dev serves gRPC").to_string();
    for domain in DOMAINS {
        let mut args = vec!["serve".to_owned(), domain.name.to_owned()];
        for peer in DOMAINS.iter().filter(|d| d.name != domain.name) {
            args.extend([format!("--{}-endpoints", peer.name), at.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let keel = KeelProcess::start(&args).await;
        serves(keel.grpc.expect("a service serves gRPC"), domain).await;
    }
}
