//! keel started the way docker-compose.yml starts it: `keel migrate` once, then a process per
//! service replica, workers apart and a gateway alone, every peer found by one DNS name that
//! resolves to all its replicas on one port; an order goes from placed to CONFIRMED through the
//! gateway while one replica of every service is killed.
//!
//! Compose's DNS gives `catalog` one address per container. Here each service's replicas
//! listen on 127.0.0.1:P and 127.0.0.2:P and a hosts file handed to every keel process through
//! nss_wrapper (`LD_PRELOAD`, the test command installs it) says `catalog` is both: the mesh's
//! ordinary resolver (getaddrinfo) gets two addresses for `dns:///catalog:P`, as in compose.
//! (`dns:///localhost:P` would name one replica only: localhost is one address.)

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support;

use support::process::{KeelProcess, WorkerProcess, keel_command, shared_stores};

/// The addresses every service's replicas listen on, one replica per address.
const REPLICA_ADDRESSES: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(127, 0, 0, 2)];

/// nss_wrapper's library, where Debian and Ubuntu put it.
const NSS_WRAPPER: &str = "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so";

/// A port free on every replica address at once, chosen below the ephemeral range (where the
/// other processes' `:0` ports come from) so that nothing takes it before the replicas bind it.
fn port_free_on_every_replica_address() -> u16 {
    loop {
        let port = 20_000 + rand::random::<u16>() % 12_000;
        let free = REPLICA_ADDRESSES
            .iter()
            .map(|ip| TcpListener::bind((*ip, port)))
            .all(|bound| bound.is_ok());
        if free {
            return port;
        }
    }
}

/// The environment compose gives every keel process: production, the shared stores and
/// secrets, a peer per service at its DNS name, and the hosts file that name resolves in.
struct Deployment {
    env: Vec<(String, String)>,
    ports: Vec<(&'static str, u16)>,
    _files: tempfile::TempDir,
}

impl Deployment {
    async fn new() -> Self {
        let files = tempfile::tempdir().unwrap();
        let keys = support::process::rotated_keys(files.path()).await;

        let mut hosts = String::new();
        let mut ports = Vec::new();
        let mut env = shared_stores().await;
        for domain in keel::registry::DOMAINS {
            let port = port_free_on_every_replica_address();
            for ip in REPLICA_ADDRESSES {
                hosts.push_str(&format!("{ip} {}\n", domain.name));
            }
            ports.push((domain.name, port));
            env.push((
                format!("KEEL_{}_ENDPOINTS", domain.name.to_uppercase()),
                format!("dns:///{}:{port}", domain.name),
            ));
        }
        let hosts_file = files.path().join("hosts");
        std::fs::write(&hosts_file, hosts).unwrap();
        assert!(
            Path::new(NSS_WRAPPER).exists(),
            "{NSS_WRAPPER}: apt-get install libnss-wrapper (the test command does)"
        );
        env.extend([
            ("LD_PRELOAD".into(), NSS_WRAPPER.into()),
            ("NSS_WRAPPER_HOSTS".into(), path(&hosts_file)),
            ("NSS_WRAPPER_PASSWD".into(), "/etc/passwd".into()),
            ("NSS_WRAPPER_GROUP".into(), "/etc/group".into()),
            ("KEEL_ENV".into(), "production".into()),
            ("KEEL_SIGNING_KEY".into(), path(&keys)),
            (
                "KEEL_SERVICE_SECRET".into(),
                "a-long-and-random-test-secret".into(),
            ),
            ("KEEL_RATE_LIMIT".into(), "off".into()),
            ("KEEL_AUTH_RATE_LIMIT".into(), "off".into()),
        ]);
        Self {
            env,
            ports,
            _files: files,
        }
    }

    /// `keel <args>` once, as compose's one-shot `migrate` service runs it.
    async fn once(&self, args: &[&str]) {
        let dir = tempfile::tempdir().unwrap();
        let ran = keel_command(dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .output()
            .await
            .unwrap();
        assert!(ran.status.success(), "keel {args:?}: {ran:?}");
    }

    /// `keel migrate`, as compose's one-shot service runs it before anything else.
    async fn migrate(&self) {
        self.once(&["migrate"]).await;
    }

    /// Every service's replicas, each `keel serve <service>` alone on its address, running no
    /// jobs; in the order of [`REPLICA_ADDRESSES`] for each service.
    async fn services(&self) -> Vec<(&'static str, Vec<KeelProcess>)> {
        let starts = self.ports.iter().map(|(name, port)| async move {
            let replicas = REPLICA_ADDRESSES.iter().map(|ip| {
                let mut env = self.env.clone();
                env.push(("KEEL_GRPC_ADDR".into(), format!("{ip}:{port}")));
                env.push(("KEEL_WORKER_CONCURRENCY".into(), "0".into()));
                async move { KeelProcess::start_with_env(&["serve", name], &env).await }
            });
            (*name, futures::future::join_all(replicas).await)
        });
        futures::future::join_all(starts).await
    }
}

fn path(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// A REST call through the gateway at `http` that must succeed; its JSON body.
async fn ok(http: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Value) -> Value {
    let client = reqwest::Client::new();
    let mut request = client.request(method.parse().unwrap(), format!("http://{http}{path}"));
    if !body.is_null() {
        request = request.json(&body);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{method} {path}: {body}");
    body
}

fn request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Places an order for `quantity` of `product` as `token`'s user; the order's name.
async fn place(http: SocketAddr, token: &str, product: &str, quantity: u32) -> String {
    let path = format!("/v1/users/me/orders?requestId={}", request_id());
    let body = json!({"lineItems": [{"product": product, "quantity": quantity}]});
    let placed = ok(http, "POST", &path, Some(token), body).await;
    placed["name"].as_str().unwrap().to_owned()
}

/// Waits (bounded) until the order `name` is CONFIRMED; fails at once if it settles otherwise.
async fn until_confirmed(http: SocketAddr, token: &str, name: &str) {
    keel_testkit::eventually(
        Duration::from_secs(60),
        "the order to be confirmed",
        || async {
            let order = ok(
                http,
                "GET",
                &format!("/v1/{name}"),
                Some(token),
                Value::Null,
            )
            .await;
            match order["state"].as_str() {
                Some("CONFIRMED") => Some(()),
                Some("PENDING") => None,
                _ => panic!("{name} settled as {order}"),
            }
        },
    )
    .await;
}

/// The sum of the process at `admin`'s series of `metric` whose labels include `labels`.
async fn metric(admin: SocketAddr, metric: &str, labels: &[String]) -> f64 {
    let metrics = keel_testkit::http::get(&format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .1;
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label.as_str())))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Attempts the mesh client of the process at `admin` made to `endpoint` of `service`.
async fn attempts(admin: SocketAddr, service: &str, endpoint: SocketAddr) -> f64 {
    let labels = [
        format!("peer=\"{service}\""),
        format!(
            "endpoint=\"{}\"",
            keel_mesh::client::endpoint_digest(endpoint)
        ),
    ];
    metric(admin, "keel_mesh_endpoint_attempts_total", &labels).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_is_confirmed_through_separate_processes_while_a_replica_of_each_service_dies() {
    let deployment = Deployment::new().await;
    deployment.migrate().await;
    let mut services = deployment.services().await;
    let gateway = KeelProcess::start_with_env(&["serve", "gateway"], &deployment.env).await;
    assert!(gateway.grpc.is_none(), "the gateway serves REST only");
    let http = gateway.http_addr;

    // The gateway resolved every service's one name to both its replicas, and admitted them.
    for (name, replicas) in &services {
        let labels = [format!("peer=\"{name}\""), "state=\"admitted\"".to_owned()];
        let labels = &labels;
        keel_testkit::eventually(
            Duration::from_secs(30),
            "both replicas admitted",
            || async {
                let admitted = metric(gateway.admin_addr, "keel_mesh_endpoints", labels).await;
                (admitted == replicas.len() as f64).then_some(())
            },
        )
        .await;
    }

    // Up to the order, through the gateway: the operator names the admin (in production no one
    // is one by registering first; this deployment mails nothing, so the operator vouches for the
    // unconfirmed address), who signs in again to carry the role.
    let register = |email: &'static str| async move {
        let body = json!({"email": email, "password": support::PASSWORD});
        let registered = ok(http, "POST", "/v1/auth:register", None, body).await;
        let token = registered["accessToken"].as_str().unwrap().to_owned();
        (
            registered["user"]["name"].as_str().unwrap().to_owned(),
            token,
        )
    };
    register("admin@example.com").await;
    deployment
        .once(&["users", "grant-admin", "--unconfirmed", "admin@example.com"])
        .await;
    let login = json!({"email": "admin@example.com", "password": support::PASSWORD});
    let signed_in = ok(http, "POST", "/v1/auth:login", None, login).await;
    let admin = signed_in["accessToken"].as_str().unwrap().to_owned();
    let (ada_name, ada) = register("ada@example.com").await;
    let product = json!({"title": "Lamp", "price": {"currencyCode": "EUR", "units": "2500"},
        "stock": "10"});
    let lamp = ok(http, "POST", "/v1/products", Some(&admin), product).await;
    let lamp = lamp["name"].as_str().unwrap().to_owned();
    let top_up = json!({"amount": {"currencyCode": "EUR", "units": "10000"},
        "requestId": request_id()});
    // In production only an admin tops a wallet up.
    let path = format!("/v1/{ada_name}/wallet:topUp");
    ok(http, "POST", &path, Some(&admin), top_up).await;
    let first = place(http, &ada, &lamp, 2).await;

    // Mid-way, one replica of every service is killed (SIGKILL, no drain).
    for (_, replicas) in &mut services {
        let mut victim = replicas.remove(0);
        victim.child.start_kill().expect("SIGKILL");
        victim.child.wait().await.unwrap();
    }

    // The saga runs only now, in a worker of its own, over the surviving replicas; a second
    // order goes the whole way after the deaths, and every service answers. Nothing fails.
    let worker = WorkerProcess::start(gateway.data_dir.path(), &deployment.env).await;
    until_confirmed(http, &ada, &first).await;
    let second = place(http, &ada, &lamp, 1).await;
    until_confirmed(http, &ada, &second).await;
    let login = json!({"email": "ada@example.com", "password": support::PASSWORD});
    ok(http, "POST", "/v1/auth:login", None, login).await;
    let todo = json!({"title": "after the crash"});
    ok(http, "POST", "/v1/users/me/todos", Some(&ada), todo).await;
    ok(http, "GET", "/v1/jobs", Some(&admin), Value::Null).await;
    let wallet = ok(http, "GET", "/v1/users/me/wallet", Some(&ada), Value::Null).await;
    assert_eq!(
        wallet["balance"]["units"], "2500",
        "three lamps paid for: {wallet}"
    );

    // The survivors, found by the shared name, took those calls.
    for (name, replicas) in &services {
        let survivor = replicas[0].grpc_addr();
        let by_gateway = attempts(gateway.admin_addr, name, survivor).await;
        let by_worker = attempts(worker.admin_addr, name, survivor).await;
        assert!(
            by_gateway + by_worker > 0.0,
            "{name}'s survivor {survivor} got no call"
        );
    }
}
