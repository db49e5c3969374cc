//! The deployment is part of the product: docker-compose.yml is valid Compose, runs every
//! registered service replicated behind the mesh's DNS names, and sets only settings `keel`
//! accepts, so a renamed flag cannot silently break it; only identity holds the signing keys; the
//! build context holds no secret; CI runs the README's test command. The file is also started
//! for real: scripts/compose-walkthrough, the test command's last step.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

use crate::support;

use support::manifests::{accepted_variables, root, starts_with, strings, yaml, yaml_json};

/// `docker-compose config` of `file` with the example secrets: the file as Compose resolves it
/// (anchors merged, variables filled in), or its complaint.
fn compose_config(file: &Path) -> Result<Value, String> {
    let output = std::process::Command::new("docker-compose")
        .arg("--project-directory")
        .arg(root())
        .arg("--env-file")
        .arg(root().join("deploy/example.env"))
        .arg("-f")
        .arg(file)
        .arg("config")
        .output()
        .expect("docker-compose (the test command installs it)");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(yaml_json(&output.stdout))
}

fn compose() -> Value {
    compose_config(&root().join("docker-compose.yml")).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_compose_file_is_valid_compose_and_a_broken_one_is_refused() {
    let services = &compose()["services"];
    assert!(services.is_object());

    let broken = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    let file = broken.path().join("docker-compose.yml");
    std::fs::write(&file, text.replace("replicas: 3", "replica: 3")).unwrap();
    let refused = compose_config(&file).expect_err("an unknown key is refused");
    assert!(refused.contains("replica"), "{refused}");
}

#[test]
fn every_service_runs_replicated_and_is_found_by_its_dns_name() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    for domain in keel::registry::DOMAINS {
        let service = &services
            .get(domain.name)
            .unwrap_or_else(|| panic!("no compose service for {}", domain.name));
        assert_eq!(
            service["command"],
            serde_json::json!(["serve", domain.name]),
            "{}",
            domain.name
        );
        assert_eq!(service["deploy"]["replicas"], 3, "{}", domain.name);
        assert_eq!(service["read_only"], true, "{}", domain.name);
        let variable = format!("KEEL_{}_ENDPOINTS", domain.name.to_uppercase());
        let expected = format!("dns:///{}:50051", domain.name);
        for (name, other) in services {
            if other["image"] == "keel:latest" && name != "migrate" {
                assert_eq!(
                    other["environment"][&variable], expected,
                    "{name} finds {} by its compose name",
                    domain.name
                );
            }
        }
    }
    assert_eq!(
        services["gateway"]["command"],
        serde_json::json!(["serve", "gateway"])
    );
    assert_eq!(
        services["gateway"]["ports"],
        serde_json::json!([{"published": 8080, "target": 8080}]),
        "only the gateway is published"
    );
    for (name, service) in services {
        let Some(ports) = service.get("ports") else {
            continue;
        };
        if name == "gateway" {
            continue;
        }
        assert_eq!(
            service["profiles"],
            serde_json::json!(["observability"]),
            "{name} publishes a port"
        );
        for port in ports.as_array().unwrap() {
            let local = port.as_str().is_some_and(|p| p.starts_with("127.0.0.1:"))
                || port["host_ip"] == "127.0.0.1";
            assert!(local, "{name}'s UI is for this host only: {port}");
        }
    }
    assert_eq!(services["worker"]["command"], serde_json::json!(["worker"]));
    assert_eq!(
        services["migrate"]["command"],
        serde_json::json!(["migrate"])
    );
    for (name, service) in services {
        if service["image"] == "keel:latest" && name != "migrate" {
            assert_eq!(
                service["depends_on"]["migrate"]["condition"], "service_completed_successfully",
                "{name} starts after the migration"
            );
        }
    }
}

#[test]
fn compose_sets_only_settings_keel_accepts_and_every_role_starts_from_them() {
    let accepted = accepted_variables();
    let compose = compose();
    let mut checked = 0;
    for (name, service) in compose["services"].as_object().unwrap() {
        if service["image"] != "keel:latest" {
            continue;
        }
        let mut environment = BTreeMap::new();
        for (variable, value) in service["environment"].as_object().unwrap() {
            assert!(
                accepted.contains(variable),
                "{name} sets {variable}, which keel does not read"
            );
            environment.insert(variable.clone(), value.as_str().unwrap().to_owned());
            checked += 1;
        }
        let command = strings(&service["command"]);
        if let Err(refused) = starts_with(&command, &environment) {
            panic!("{name} would not start: {refused}");
        }
    }
    assert!(checked > 50, "{checked} settings checked");
}

#[test]
fn ci_runs_the_readme_test_command_with_the_cargo_cache() {
    let workflow = yaml(&root().join(".github/workflows/ci.yml"));
    let job = &workflow["jobs"]["test"];
    assert!(job["timeout-minutes"].as_u64().unwrap() <= 90);
    let steps = job["steps"].as_array().unwrap();
    let runs: Vec<&str> = steps.iter().filter_map(|s| s["run"].as_str()).collect();
    assert_eq!(
        runs,
        ["./scripts/test"],
        "the command the README gives, alone"
    );
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.contains("\n./scripts/test\n"),
        "the README gives that command"
    );
    assert!(
        steps.iter().any(|s| s["uses"]
            .as_str()
            .is_some_and(|u| u.starts_with("Swatinem/rust-cache@"))),
        "cargo's cache"
    );
    // A tag can be moved to other code: every action of every job is pinned by its commit.
    for (name, job) in workflow["jobs"].as_object().unwrap() {
        for step in job["steps"].as_array().unwrap() {
            let Some(action) = step["uses"].as_str() else {
                continue;
            };
            let commit = action.split_once('@').map_or("", |(_, at)| at);
            assert!(
                commit.len() == 40 && commit.bytes().all(|b| b.is_ascii_hexdigit()),
                "{name}: {action} is not pinned by a commit"
            );
        }
    }
    let compose = &workflow["jobs"]["compose"]["steps"];
    assert!(
        compose
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["run"] == "./scripts/compose-walkthrough"),
        "the compose walkthrough runs with real Docker"
    );
}

/// `keel probe`, the image's health check: ready only when a keel answers 200 on `/readyz` at
/// the admin port (an unspecified listen address is asked on loopback); a 503 or nothing
/// listening is exit status 1, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keel_probe_is_ready_only_when_the_admin_port_answers_ready() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let probe = |admin: std::net::SocketAddr| async move {
        let dir = tempfile::tempdir().unwrap();
        support::process::keel_command(dir.path())
            .arg("probe")
            .env("KEEL_ADMIN_ADDR", admin.to_string())
            .output()
            .await
            .unwrap()
    };
    let mut keel = support::process::KeelProcess::start(&[]).await;
    let unspecified = std::net::SocketAddr::from(([0, 0, 0, 0], keel.admin_addr.port()));
    for admin in [keel.admin_addr, unspecified] {
        let ready = probe(admin).await;
        assert!(ready.status.success(), "{admin}: {ready:?}");
    }

    let not_ready = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = not_ready.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = not_ready.accept().await.unwrap();
        let mut request = [0; 256];
        let _ = stream.read(&mut request).await;
        let _ = stream
            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n")
            .await;
    });
    let answered = probe(addr).await;
    assert_eq!(answered.status.code(), Some(1), "{answered:?}");
    assert!(String::from_utf8_lossy(&answered.stderr).contains("not ready (HTTP/1.1 503"));

    keel.child.kill().await.unwrap();
    let nobody = probe(unspecified).await;
    assert_eq!(nobody.status.code(), Some(1), "{nobody:?}");
}

/// The files `docker build -f deploy/Dockerfile` sends from `dir` as its context, by Docker's own
/// reading of the `.dockerignore` there (docker-py's `exclude_paths`), relative to `dir`.
fn build_context(dir: impl AsRef<Path>) -> BTreeSet<String> {
    let dir = dir.as_ref();
    let script = "import sys, docker.utils.build as b\n\
        root = sys.argv[1]\n\
        lines = [l.strip() for l in open(root + '/.dockerignore')]\n\
        patterns = [l for l in lines if l and not l.startswith('#')]\n\
        for path in sorted(b.exclude_paths(root, patterns, 'deploy/Dockerfile')):\n\
        \x20   print(path)\n";
    let output = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(dir)
        .output()
        .expect("python3 with docker-py (the test command installs it)");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .filter(|path| dir.join(path).is_file())
        .map(str::to_owned)
        .collect()
}

/// The build context is an allowlist: a secret put anywhere (compose's `.env`, the signing keys
/// `keel keys rotate` writes, kustomize's `secret.env`, a stray key file beside the code, local
/// data) never enters it, build output and dependencies neither, and what it holds is enough
/// for cargo to read the workspace.
#[test]
fn the_docker_build_context_holds_what_the_build_reads_and_no_secret() {
    let tree = tempfile::tempdir().unwrap();
    let planted = |path: &str| {
        let file = tree.path().join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, "x").unwrap();
    };
    let read_by_the_build = [
        "Cargo.toml",
        "Cargo.lock",
        "build.rs",
        "build/json.rs",
        "src/main.rs",
        "crates/auth/Cargo.toml",
        "crates/auth/src/lib.rs",
        "proto/keel/orders/v1/orders.proto",
        "benches/orders.rs",
        "benches/load/ceiling.rs",
        "deploy/Dockerfile",
        ".dockerignore",
    ];
    let never = [
        ".env",
        "deploy/keys/20261205T000000.000000Z-0a1b2c3d.pem",
        "deploy/k8s/secret.env",
        "deploy/example.env",
        "crates/auth/.env",
        "src/signing.pem",
        "crates/auth/tls.key",
        ".keel/keel.db",
        ".git/config",
        "target/release/keel",
        "crates/auth/target/debug/x",
        "benches/bullmq/node_modules/bullmq/index.js",
        "README.md",
    ];
    for path in read_by_the_build.iter().chain(&never) {
        planted(path);
    }
    std::fs::copy(
        root().join(".dockerignore"),
        tree.path().join(".dockerignore"),
    )
    .unwrap();
    let sent = build_context(tree.path());
    let expected: BTreeSet<String> = read_by_the_build.iter().map(|p| (*p).to_owned()).collect();
    assert_eq!(sent, expected, "the context of a planted tree");

    // This checkout's own context: only from the allowed places, no key or env file, and
    // cargo reads the workspace from it alone.
    let sent = build_context(root());
    assert!(
        sent.contains("Cargo.lock") && sent.contains("src/main.rs"),
        "{sent:?}"
    );
    let copy = tempfile::tempdir().unwrap();
    for path in &sent {
        let top = [
            "Cargo.toml",
            "Cargo.lock",
            "build.rs",
            "deploy/Dockerfile",
            ".dockerignore",
        ];
        let allowed = top.contains(&path.as_str())
            || ["build/", "src/", "crates/", "proto/", "benches/"]
                .iter()
                .any(|dir| path.starts_with(dir));
        assert!(allowed, "{path} is in the build context");
        assert!(
            !path.ends_with(".pem") && !path.ends_with(".env") && !path.ends_with(".key"),
            "{path} is in the build context"
        );
        let file = copy.path().join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::copy(root().join(path), file).unwrap();
    }
    let metadata = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .current_dir(copy.path())
        .output()
        .unwrap();
    assert!(
        metadata.status.success(),
        "cargo cannot read the workspace from the context alone: {}",
        String::from_utf8_lossy(&metadata.stderr)
    );
}

/// What compose gives each process: the private signing keys to identity alone (the only role
/// that signs), trust in forwarding headers only from its own containers (never from the
/// bridge's address, where a published port's clients arrive through the userland proxy), and
/// database pools whose sum at the replicas it runs fits PostgreSQL's `max_connections`.
#[test]
fn compose_gives_the_keys_to_identity_alone_trusts_only_its_containers_and_fits_postgres() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let network = &compose["networks"]["keel"]["ipam"]["config"][0];
    let bridge: std::net::IpAddr = network["gateway"].as_str().unwrap().parse().unwrap();
    let containers: keel_guard::Network = network["ip_range"].as_str().unwrap().parse().unwrap();
    for (name, service) in services {
        if service["image"] != "keel:latest" || name == "migrate" {
            continue;
        }
        let environment = &service["environment"];
        let signs = name == "identity";
        let mounts_keys = service["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|volume| {
                // Compose 1.x writes a bind as "source:target:mode", 2.x as a mapping.
                let short = volume.as_str().and_then(|v| v.split(':').nth(1));
                short.or(volume["target"].as_str()) == Some("/run/keel/keys")
            });
        assert_eq!(mounts_keys, signs, "{name} mounts the private keys");
        assert_eq!(
            environment.get("KEEL_SIGNING_KEY").is_some(),
            signs,
            "{name}"
        );

        let trusted = keel_guard::TrustedProxies::new(
            environment["KEEL_TRUSTED_PROXIES"]
                .as_str()
                .unwrap()
                .split(',')
                .map(|network| network.parse::<keel_guard::Network>().unwrap()),
        );
        assert!(!trusted.contains(bridge), "{name} believes {bridge}");
        for container in [containers.0.network(), containers.0.broadcast()] {
            assert!(trusted.contains(container), "{name} doubts {container}");
        }
    }
    let connections: u64 = pools(&compose).iter().map(|(n, pool)| n * pool).sum();
    let command = services["postgres"]["command"].to_string();
    assert!(
        !command.contains("max_connections"),
        "PostgreSQL keeps its default of 100: {command}"
    );
    // Reserved for superusers (3), and one each for `keel migrate` and an operator.
    assert!(
        connections + 3 + 2 <= 100,
        "{connections} pooled connections"
    );
}

/// The database pool of each keel service that opens one (every one but the gateway and the
/// one-shot migration), by its containers: (containers, connections each).
fn pools(compose: &Value) -> Vec<(u64, u64)> {
    let services = compose["services"].as_object().unwrap();
    let keel = services.iter().filter(|(name, s)| {
        s["image"] == "keel:latest" && *name != "migrate" && *name != "gateway"
    });
    keel.map(|(_, service)| {
        let pool: u64 = service["environment"]
            .get("KEEL_DATABASE_MAX_CONNECTIONS")
            .map_or(20, |n| n.as_str().unwrap().parse().unwrap());
        (service["deploy"]["replicas"].as_u64().unwrap_or(1), pool)
    })
    .collect()
}

/// `--profile scale`: a hot standby cloned from the primary once, that every process's pool and
/// watch fit; a Redis Cluster whose three primaries sit at fixed addresses outside the range
/// compose hands out, made once from exactly those; neither used until .env names them.
#[test]
fn the_scale_profile_adds_a_replica_every_pool_fits_and_a_redis_cluster_at_fixed_addresses() {
    let compose = compose();
    let services = compose["services"].as_object().unwrap();
    let scale = [
        "postgres-replica",
        "redis-1",
        "redis-2",
        "redis-3",
        "redis-cluster",
    ];
    for name in scale {
        assert_eq!(
            services[name]["profiles"],
            serde_json::json!(["scale"]),
            "{name}"
        );
    }

    // The replica: cloned once, whole, through a slot, from a primary that admits it.
    let script =
        std::fs::read_to_string(root().join("deploy/compose/postgres-replica.sh")).unwrap();
    for part in [
        "PG_VERSION",
        "pg_basebackup -h postgres",
        " -R ",
        "-D \"$PGDATA.new\"",
        "mv \"$PGDATA.new\" \"$PGDATA\"",
        "-S compose_replica",
    ] {
        assert!(script.contains(part), "{part} in the replica's script");
    }
    let hba = std::fs::read_to_string(root().join("deploy/compose/pg_hba.conf")).unwrap();
    let rules: Vec<Vec<&str>> = hba
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert!(
        rules.contains(&vec!["host", "replication", "all", "all", "scram-sha-256"]),
        "the primary admits replication by password: {rules:?}"
    );
    // Trust only on the socket and loopback.
    for rule in rules
        .iter()
        .filter(|rule| rule[0] == "host" && rule.last() == Some(&"trust"))
    {
        let address: keel_guard::Network = rule[3]
            .parse()
            .unwrap_or_else(|_| panic!("trust from the network: {rule:?}"));
        let (first, last) = (address.0.network(), address.0.broadcast());
        assert!(
            first.is_loopback() && last.is_loopback(),
            "trust from the network: {rule:?}"
        );
    }
    for name in ["postgres", "postgres-replica"] {
        let command = strings(&services[name]["command"]);
        assert!(
            command.contains(&"hba_file=/etc/keel/pg_hba.conf"),
            "{name}: {command:?}"
        );
    }
    let primary = strings(&services["postgres"]["command"]);
    assert!(
        primary
            .iter()
            .any(|a| a.starts_with("max_slot_wal_keep_size=")),
        "the slot's WAL is bounded: {primary:?}"
    );
    let max_connections: u64 = strings(&services["postgres-replica"]["command"])
        .iter()
        .find_map(|a| a.strip_prefix("max_connections=")?.parse().ok())
        .expect("the replica's max_connections");
    // Each process's pool and the connection its watch looks on; superusers' reserve (3).
    let connections: u64 = pools(&compose).iter().map(|(n, pool)| n * (pool + 1)).sum();
    assert!(
        connections + 3 <= max_connections && max_connections >= 100,
        "{connections} connections to a replica of {max_connections}; the primary's is 100"
    );

    // The cluster's primaries: fixed, inside the subnet, outside the handed-out range.
    let network = &compose["networks"]["keel"]["ipam"]["config"][0];
    let subnet: keel_guard::Network = network["subnet"].as_str().unwrap().parse().unwrap();
    let handed_out: keel_guard::Network = network["ip_range"].as_str().unwrap().parse().unwrap();
    let nodes: Vec<String> = ["redis-1", "redis-2", "redis-3"]
        .iter()
        .map(|name| {
            let address = services[*name]["networks"]["keel"]["ipv4_address"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has a fixed address"));
            let ip: std::net::IpAddr = address.parse().unwrap();
            assert!(
                subnet.0.contains(&ip) && !handed_out.0.contains(&ip),
                "{name}: {ip}"
            );
            let command = strings(&services[*name]["command"]).join(" ");
            assert!(
                command.contains("--cluster-enabled yes"),
                "{name}: {command}"
            );
            format!("{address}:6379")
        })
        .collect();
    assert_eq!(strings(&services["redis-cluster"]["command"]), nodes);

    // keel: on the primary and the single Redis unless .env says otherwise.
    let environment = &services["catalog"]["environment"];
    let example = std::fs::read_to_string(root().join("deploy/example.env")).unwrap();
    let text = std::fs::read_to_string(root().join("docker-compose.yml")).unwrap();
    for (variable, from) in [
        ("KEEL_DATABASE_READ_URLS", "SCALE_DATABASE_READ_URLS"),
        ("KEEL_REDIS_URL", "SCALE_REDIS_URL"),
    ] {
        assert!(environment.get(variable).is_some(), "{variable}");
        assert!(
            text.contains(&format!("{variable}: ${{{from}:-")),
            "{variable} from {from}, a name a shell's KEEL_* cannot override"
        );
        assert!(
            example.lines().any(|l| l == format!("{from}=")),
            "{from} is in example.env, empty"
        );
    }
}

/// The image itself says when a container is healthy (for `docker run` and any orchestrator
/// that reads it), with `keel probe`, since it has no curl.
#[test]
fn the_image_checks_its_health_with_keel_probe() {
    let dockerfile = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let runtime = dockerfile.split("\nFROM ").last().expect("a runtime stage");
    let check = runtime
        .split("\nHEALTHCHECK ")
        .nth(1)
        .expect("the runtime stage has a HEALTHCHECK")
        .replace("\\\n", " ");
    let command = check.lines().next().unwrap();
    assert!(
        command.contains(r#"CMD ["/usr/local/bin/keel", "probe"]"#),
        "{command}"
    );
}
