//! The registry is the one list every command reads: each registered service is migrated by
//! `keel migrate`, served by `keel dev` and alone by `keel serve <name>`, and routed by the
//! gateway. A service that forgets one of those fails here, on the real binary.

use crate::support;

use std::time::Duration;

use keel::config::Settings;
use keel::domain::Domain;
use keel::registry::DOMAINS;
use prost_reflect::DescriptorPool;
use support::process::{KeelProcess, keel_command};
use tonic::codegen::Bytes;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

fn pool() -> DescriptorPool {
    DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET).expect("descriptors")
}

/// Checks that `addr` serves every gRPC service of `domain`: health says SERVING (once the
/// process is ready: the banner comes first, and a service that verifies tokens with identity's
/// key set waits for it), and a unary method answers something other than UNIMPLEMENTED (an
/// empty request may well be refused).
async fn serves(addr: std::net::SocketAddr, domain: &Domain) {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let pool = pool();
    for name in domain.grpc_names {
        keel_testkit::eventually(Duration::from_secs(30), "the service to serve", || {
            let mut health = HealthClient::new(channel.clone());
            let service = (*name).to_owned();
            async move {
                let status = health
                    .check(HealthCheckRequest { service })
                    .await
                    .unwrap_or_else(|s| panic!("{}: health of {name}: {s:?}", domain.name))
                    .into_inner()
                    .status;
                (status == ServingStatus::Serving as i32).then_some(())
            }
        })
        .await;
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

/// The modules `text` (Rust source) names as `crate::<module>` in code (comments aside),
/// grouped imports included.
fn crate_modules(text: &str) -> std::collections::BTreeSet<String> {
    let code: String = text
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .map(|line| format!("{line}\n"))
        .collect();
    let text = code.as_str();
    let mut named = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group[..group.find('}').unwrap_or(0)].split(',').collect(),
            None => vec![rest],
        };
        for name in names {
            let name = name.trim();
            let end = name
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(name.len());
            named.insert(name[..end].to_owned());
        }
    }
    named
}

/// The registry sits at the top: what a service is built from (src/domain.rs) and the settings
/// (src/config/) name no service, neither the process (`app`) nor the command line (`cli`) nor
/// the registry, so that no import circle runs through them. The settings know the services by
/// name alone ([`keel::config::SERVICES`], the registry's names in its order).
#[test]
fn what_services_are_built_from_points_at_no_service() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let services: Vec<&str> = DOMAINS.iter().map(|d| d.name).collect();
    let domain = std::fs::read_to_string(root.join("domain.rs")).unwrap();
    let named = crate_modules(&domain);
    let above: Vec<&str> = services
        .iter()
        .copied()
        .chain(["app", "cli", "registry"])
        .collect();
    for module in &above {
        assert!(
            !named.contains(*module),
            "src/domain.rs names crate::{module}"
        );
    }
    for file in std::fs::read_dir(root.join("config")).unwrap() {
        let path = file.unwrap().path();
        let named = crate_modules(&std::fs::read_to_string(&path).unwrap());
        for module in &above {
            assert!(
                !named.contains(*module),
                "{} names crate::{module}",
                path.display()
            );
        }
    }
    assert_eq!(
        keel::config::SERVICES,
        &services[..],
        "the settings know every service, in order"
    );
}

/// The modules of src/ import one another without a circle: each top-level module (a file or a
/// folder) and the top-level modules it names as `crate::…`, tests aside.
#[test]
fn the_modules_of_src_import_one_another_without_a_circle() {
    use std::collections::{BTreeMap, BTreeSet};
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let relative = path.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let top = top.trim_end_matches(".rs").to_owned();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let named = crate_modules(code);
        let edges = graph.entry(top.clone()).or_default();
        edges.extend(named.into_iter().filter(|m| *m != top && m != "self"));
    }
    // Depth-first, with the path so far: a module met again on its own path closes a circle.
    fn visit<'a>(
        module: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if let Some(at) = path.iter().position(|m| *m == module) {
            panic!(
                "an import circle: {}",
                path[at..].join(" → ") + " → " + module
            );
        }
        if !done.insert(module) {
            return;
        }
        path.push(module);
        for next in graph.get(module).into_iter().flatten() {
            if graph.contains_key(next) {
                visit(next, graph, path, done);
            }
        }
        path.pop();
    }
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        visit(module, &graph, &mut Vec::new(), &mut done);
    }
}
