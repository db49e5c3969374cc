//! What every integration test starts from: a keel process on loopback ports over real stores,
//! typed clients, and ways to look at what was written.

#![allow(dead_code)]

use keel::app::{self, Listeners, Running};
use keel::config::Settings;
use keel::proto::keel::catalog::v1::catalog_service_client::CatalogServiceClient;
use keel::proto::keel::catalog::v1::inventory_service_client::InventoryServiceClient;
use keel::proto::keel::catalog::v1::{CreateProductRequest, GetProductRequest, Product};
use keel::proto::keel::identity::v1::identity_service_client::IdentityServiceClient;
use keel::proto::keel::identity::v1::service_token_service_client::ServiceTokenServiceClient;
use keel::proto::keel::identity::v1::{
    GetUserRequest, LoginRequest, RegisterRequest, RegisterResponse,
};
use keel::proto::keel::payments::v1::GetWalletRequest;
use keel::proto::keel::payments::v1::ledger_service_client::LedgerServiceClient;
use keel::proto::keel::payments::v1::payment_service_client::PaymentServiceClient;
use keel::proto::keel::todos::v1::todo_service_client::TodoServiceClient;
use keel::proto::keel::r#type::v1::Money;
use keel::registry::DOMAINS;
use sea_orm::{ConnectionTrait as _, Database, DatabaseConnection, Statement};
use tonic::transport::Channel;

pub mod manifests;
pub mod process;

/// Which stores a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stores {
    /// SQLite in a temp dir, in-process cache: `cargo run` on a bare machine.
    Embedded,
    /// A fresh PostgreSQL database and Redis key prefix.
    PostgresRedis,
    /// Data beyond one node: a fresh database on PostgreSQL with a streaming replica that
    /// serves the reads that may lag, and a key prefix on the test kit's Redis Cluster (three
    /// primaries), where every command keel sends must keep its keys in one slot.
    Replicated,
}

/// A keel process for one test.
pub struct TestApp {
    pub stores: Stores,
    pub settings: Settings,
    pub grpc_addr: std::net::SocketAddr,
    pub http_addr: std::net::SocketAddr,
    /// `http://addr`, or `https://addr` when the REST port serves TLS.
    pub rest_base: String,
    pub admin_addr: std::net::SocketAddr,
    /// Every replica's gRPC address (one unless `settings.replicas` says more).
    pub replicas: Vec<std::net::SocketAddr>,
    pub data_dir: tempfile::TempDir,
    running: Option<Running>,
}

impl TestApp {
    /// keel with default settings over `stores`.
    pub async fn spawn(stores: Stores) -> Self {
        Self::spawn_with(stores, |_| {}).await
    }

    /// keel in production over PostgreSQL and Redis (a signing key and a service secret
    /// provisioned, as production requires), with settings adjusted by `adjust`.
    pub async fn production(adjust: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_with(Stores::PostgresRedis, |s| {
            keel::identity::SigningKeys::development(&s.stores.data_dir).expect("a signing key");
            let keys = keel::identity::keys::development_dir(&s.stores.data_dir);
            s.operations.environment = keel::config::Environment::Production;
            s.identity.signing_key = Some(keys);
            s.workers.service_secret = Some("a provisioned secret".into());
            adjust(s);
        })
        .await
    }

    /// keel over `stores` with settings adjusted by `adjust`.
    pub async fn spawn_with(stores: Stores, adjust: impl FnOnce(&mut Settings)) -> Self {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut settings = Settings::defaults();
        settings.stores.data_dir = data_dir.path().to_owned();
        settings.identity.max_concurrent_hashes = Some(2);
        // Jobs that fail are tried again soon, and die after three attempts.
        settings.workers.job_backoff = std::time::Duration::from_millis(50);
        settings.workers.job_poll = std::time::Duration::from_millis(20);
        settings.jobs.job_max_attempts = 3;
        if stores == Stores::PostgresRedis {
            settings.stores.database_url = Some(keel_testkit::fresh_database().await);
        }
        if stores == Stores::Replicated {
            let (primary, replica) = keel_testkit::fresh_replicated_database().await;
            settings.stores.database_url = Some(primary);
            settings.stores.database_read_urls = vec![replica];
        }
        if stores != Stores::Embedded {
            settings.stores.database_max_connections = 5;
            let (url, prefix) = keel_testkit::fresh_prefix().await;
            settings.stores.redis_url = Some(url);
            settings.stores.redis_prefix = prefix;
        }
        if stores == Stores::Replicated {
            let cluster = keel_testkit::RedisCluster::running().await;
            settings.stores.redis_url = Some(cluster.url);
        }
        adjust(&mut settings);
        let listeners = Listeners {
            grpc: Some(keel_testkit::loopback_listener().await),
            http: keel_testkit::loopback_listener().await,
            admin: keel_testkit::loopback_listener().await,
        };
        let running = app::start(&settings, DOMAINS, listeners, std::future::pending())
            .await
            .expect("start keel");
        Self {
            stores,
            grpc_addr: running.grpc_addr().expect("a replica"),
            http_addr: running.http_addr,
            rest_base: match settings.edge.http_tls_cert {
                Some(_) => format!("https://{}", running.http_addr),
                None => format!("http://{}", running.http_addr),
            },
            admin_addr: running.admin_addr,
            replicas: running.replicas.iter().map(|r| r.addr).collect(),
            settings,
            data_dir,
            running: Some(running),
        }
    }

    /// A channel to this process.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect to keel")
    }

    /// An identity client.
    pub async fn identity(&self) -> IdentityServiceClient<Channel> {
        IdentityServiceClient::new(self.channel().await)
    }

    /// A todos client.
    pub async fn todos(&self) -> TodoServiceClient<Channel> {
        TodoServiceClient::new(self.channel().await)
    }

    /// A catalog client.
    pub async fn catalog(&self) -> CatalogServiceClient<Channel> {
        CatalogServiceClient::new(self.channel().await)
    }

    /// An inventory client.
    pub async fn inventory(&self) -> InventoryServiceClient<Channel> {
        InventoryServiceClient::new(self.channel().await)
    }

    /// A payments client.
    pub async fn payments(&self) -> PaymentServiceClient<Channel> {
        PaymentServiceClient::new(self.channel().await)
    }

    /// A ledger client.
    pub async fn ledger(&self) -> LedgerServiceClient<Channel> {
        LedgerServiceClient::new(self.channel().await)
    }

    /// Registers an admin (the first user) and two users; returns their access tokens, and a
    /// service token for the internal APIs.
    pub async fn people(&self) -> People {
        let mut admin = self.register("admin@example.com").await.access_token;
        if self.settings.operations.environment == keel::config::Environment::Production {
            // No one becomes an admin by registering first there: the operator names one.
            keel::identity::Directory::new(self.db().await)
                .grant_admin("admin@example.com")
                .await
                .expect("grant admin")
                .expect("the admin is registered");
            admin = self.login("admin@example.com").await.0;
        }
        People {
            admin,
            ada: self.register("ada@example.com").await.access_token,
            bob: self.register("bob@example.com").await.access_token,
            service: self.service_token().await,
        }
    }

    /// A service token for the internal APIs, as keel's own services get it: from identity, for
    /// the deployment's service secret.
    pub async fn service_token(&self) -> String {
        use keel::proto::keel::identity::v1::IssueServiceTokenRequest;
        let secret = keel::credentials::service_secret(&self.settings).expect("service secret");
        ServiceTokenServiceClient::new(self.channel().await)
            .issue_service_token(IssueServiceTokenRequest {
                service: "tests".into(),
                secret,
            })
            .await
            .expect("a service token")
            .into_inner()
            .access_token
    }

    /// Creates a product as `admin`: `price` euro cents a unit, `stock` units.
    pub async fn product(&self, admin: &str, title: &str, price: i64, stock: i64) -> Product {
        create_product(self.channel().await, admin, title, price, stock).await
    }

    /// The stock of `product`.
    pub async fn stock(&self, product: &str) -> i64 {
        let read = GetProductRequest {
            name: product.into(),
        };
        let found = self.catalog().await.get_product(read).await;
        found.expect("the product").into_inner().stock
    }

    /// The balance of the wallet of `token`'s user, in euro cents.
    pub async fn balance(&self, token: &str) -> i64 {
        let read = GetWalletRequest {
            name: "users/me/wallet".into(),
        };
        let wallet = self.payments().await.get_wallet(authed(read, token)).await;
        let wallet = wallet.expect("the wallet").into_inner();
        wallet.balance.unwrap_or_default().units
    }

    /// The resource name (`users/{id}`) of `token`'s user.
    pub async fn user_name(&self, token: &str) -> String {
        let me = GetUserRequest {
            name: "users/me".into(),
        };
        let user = self.identity().await.get_user(authed(me, token)).await;
        user.expect("the caller").into_inner().name
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let (status, body) =
            keel_testkit::http::get(&format!("http://{}/metrics", self.admin_addr))
                .await
                .expect("GET /metrics");
        assert_eq!(status, 200);
        body
    }

    /// One sample of `/metrics`.
    pub async fn metric(&self, series: &str) -> f64 {
        keel_testkit::http::metric(&self.metrics().await, series)
    }

    /// The most calls `service` (fully qualified) ever had in flight at once in this process:
    /// a race test shows with it that its calls overlapped at the server.
    pub async fn peak_in_flight(&self, service: &str) -> f64 {
        self.metric(&format!(
            "keel_server_peak_in_flight{{grpc_service=\"{service}\"}}"
        ))
        .await
    }

    /// A connection to this process's database, to check what was (not) written.
    pub async fn db(&self) -> DatabaseConnection {
        let url = keel::store::database_url(&self.settings.stores).expect("database url");
        Database::connect(url)
            .await
            .expect("connect to the test database")
    }

    /// Rows in `table`.
    pub async fn count(&self, table: &str) -> i64 {
        let db = self.db().await;
        let row = db
            .query_one_raw(Statement::from_string(
                db.get_database_backend(),
                format!("SELECT COUNT(*) AS n FROM {table}"),
            ))
            .await
            .expect("count rows")
            .expect("one row");
        let n: i64 = row.try_get("", "n").expect("count column");
        let _ = db.close().await;
        n
    }

    /// Registers `email` with a good password and returns the response.
    pub async fn register(&self, email: &str) -> RegisterResponse {
        self.identity()
            .await
            .register(RegisterRequest {
                email: email.into(),
                password: PASSWORD.into(),
                display_name: String::new(),
            })
            .await
            .unwrap_or_else(|s| panic!("register {email}: {s:?}"))
            .into_inner()
    }

    /// Logs `email` in with the good password; returns (access, refresh).
    pub async fn login(&self, email: &str) -> (String, String) {
        let r = self
            .identity()
            .await
            .login(LoginRequest {
                email: email.into(),
                password: PASSWORD.into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("login {email}: {s:?}"))
            .into_inner();
        (r.access_token, r.refresh_token)
    }

    /// Replica `k`'s health, as its Watch streams report it.
    pub fn replica_health(&self, k: usize) -> keel_server::Health {
        self.running.as_ref().expect("running").replicas[k]
            .health
            .clone()
    }

    /// Drains replica `k` alone (NOT_SERVING, then finish its calls) and waits until it stopped
    /// accepting.
    pub async fn drain_replica(&self, k: usize) {
        let replica = &self.running.as_ref().expect("running").replicas[k];
        replica.stop().await;
        let addr = replica.addr;
        keel_testkit::eventually(
            std::time::Duration::from_secs(15),
            "the replica to stop accepting",
            || async move { tokio::net::TcpStream::connect(addr).await.err().map(|_| ()) },
        )
        .await;
    }

    /// Drains and stops the process.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.expect("drain");
        }
    }
}

/// A `keel worker` running in the test's process, over a [`TestApp`]'s stores.
pub struct InProcessWorker {
    /// Its `/metrics`.
    pub admin_addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    working: Option<keel::app::Working>,
}

impl InProcessWorker {
    /// Stops claiming, lets the jobs it holds finish, and waits.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(working) = self.working.take() {
            working.wait().await.expect("the worker drained");
        }
    }
}

/// One e-mail as the outbox holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mail {
    pub to: String,
    pub subject: String,
    pub body: String,
}

impl TestApp {
    /// A worker over this app's stores, reaching its services at its gRPC port, with settings
    /// adjusted by `adjust`.
    pub async fn start_worker(&self, adjust: impl FnOnce(&mut Settings)) -> InProcessWorker {
        let mut settings = self.settings.clone();
        for domain in DOMAINS {
            settings.mesh.endpoints.set(
                domain.name,
                keel_mesh::client::Target::Static(vec![self.grpc_addr.to_string()]),
            );
        }
        settings.workers.worker_concurrency = Some(4);
        adjust(&mut settings);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let admin = keel_testkit::loopback_listener().await;
        let admin_addr = admin.local_addr().expect("an admin address");
        let working = app::work(&settings, admin, async move {
            let _ = stopped.await;
        })
        .await
        .expect("start a worker");
        InProcessWorker {
            admin_addr,
            stop: Some(stop),
            working: Some(working),
        }
    }

    /// The code (`kec_…`, a line of its own) in the newest e-mail to `to` whose subject is
    /// `subject`, waiting for it to be sent.
    pub async fn mailed_code(&self, to: &str, subject: &str) -> String {
        let code_in = |m: Mail| {
            let code = m
                .body
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("kec_"));
            code.map(str::to_owned)
        };
        keel_testkit::eventually(
            std::time::Duration::from_secs(30),
            "the mailed code",
            || async {
                let mail = self.mail().into_iter().rev();
                mail.filter(|m| m.to == to && m.subject == subject)
                    .find_map(code_in)
            },
        )
        .await
    }

    /// Every e-mail in the outbox under the data dir.
    pub fn mail(&self) -> Vec<Mail> {
        let dir = keel::mail::outbox(&self.settings.stores.data_dir);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut mail: Vec<Mail> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("an e-mail file");
                let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(name))
                        .map(|v| v.trim().to_owned())
                        .unwrap_or_default()
                };
                Mail {
                    to: header("To:"),
                    subject: header("Subject:"),
                    body: body.to_owned(),
                }
            })
            .collect();
        mail.sort_by(|a, b| (&a.to, &a.subject).cmp(&(&b.to, &b.subject)));
        mail
    }
}

/// Access tokens of an admin and two users.
#[derive(Debug, Clone)]
pub struct People {
    pub admin: String,
    pub ada: String,
    pub bob: String,
    /// Role `service`: the internal APIs accept it alone.
    pub service: String,
}

/// The password every test user has.
pub const PASSWORD: &str = "correct horse battery";

/// `units` euro cents.
pub fn eur(units: i64) -> Option<Money> {
    Some(Money {
        currency_code: "EUR".into(),
        units,
    })
}

/// Creates a product through `channel` as `admin`: `price` euro cents a unit, `stock` units.
pub async fn create_product(
    channel: Channel,
    admin: &str,
    title: &str,
    price: i64,
    stock: i64,
) -> Product {
    let product = Product {
        title: title.into(),
        price: eur(price),
        stock,
        ..Default::default()
    };
    let request = CreateProductRequest {
        product: Some(product),
        request_id: String::new(),
    };
    let created = CatalogServiceClient::new(channel)
        .create_product(authed(request, admin))
        .await;
    created.expect("an admin creates a product").into_inner()
}

/// `message` with `authorization: Bearer token`.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header value"),
    );
    request
}

/// Asserts `result` failed with `code`, and returns the status for more checks.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
) -> tonic::Status {
    match result {
        Ok(value) => panic!("expected {code:?}, got Ok({value:?})"),
        Err(status) => {
            assert_eq!(status.code(), code, "status: {status:?}");
            status
        }
    }
}

/// Asserts that the test kit's Redis Cluster has refused no command for keys that span slots:
/// keel falls back when Redis fails (the database, the table, an admitted request), so a
/// scenario on the cluster passes either way, and only the cluster's own count tells. The
/// cluster is shared by the run: a refusal anywhere fails whichever scenario looks next.
pub async fn nothing_refused_across_slots() {
    let cluster = keel_testkit::RedisCluster::running().await;
    let refused = tokio::task::spawn_blocking(move || cluster.refused_across_slots())
        .await
        .expect("ask the cluster");
    assert_eq!(refused, 0, "commands refused by the cluster (CROSSSLOT)");
}

/// The field named by the first BadRequest violation of an INVALID_ARGUMENT status.
pub fn violated_field(status: &tonic::Status) -> Option<String> {
    use tonic_types::StatusExt as _;
    status
        .get_details_bad_request()
        .and_then(|b| b.field_violations.first().map(|v| v.field.clone()))
}

/// Runs each scenario, an `async fn(TestApp)`, on every store profile: `embedded` (SQLite +
/// in-process cache), `postgres_redis` and `replicated` (a PostgreSQL replica and a Redis
/// Cluster), as the tests `<scenario>::embedded`, `<scenario>::postgres_redis` and
/// `<scenario>::replicated`.
/// `on_every_store!(with adjust; …)` starts each app with the settings `adjust`, an
/// `fn(&mut Settings)` of the calling module, changes.
#[macro_export]
macro_rules! on_every_store {
    (with $adjust:ident; $($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use $crate::support::{Stores, TestApp};

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    let app = TestApp::spawn_with(Stores::Embedded, super::$adjust).await;
                    super::$scenario(app).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_redis() {
                    let app = TestApp::spawn_with(Stores::PostgresRedis, super::$adjust).await;
                    super::$scenario(app).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn replicated() {
                    let app = TestApp::spawn_with(Stores::Replicated, super::$adjust).await;
                    super::$scenario(app).await;
                    $crate::support::nothing_refused_across_slots().await;
                }
            }
        )*
    };
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use $crate::support::{Stores, TestApp};

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$scenario(TestApp::spawn(Stores::Embedded).await).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres_redis() {
                    super::$scenario(TestApp::spawn(Stores::PostgresRedis).await).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn replicated() {
                    super::$scenario(TestApp::spawn(Stores::Replicated).await).await;
                    $crate::support::nothing_refused_across_slots().await;
                }
            }
        )*
    };
}

/// A REST call through the gateway: the status and the JSON body (`null` when empty).
pub async fn rest(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    rest_over(&reqwest::Client::new(), app, method, path, token, body).await
}

/// [`rest`] with `client` (HTTP/2 with prior knowledge, for one).
pub async fn rest_over(
    client: &reqwest::Client,
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut request = client.request(method, format!("{}{path}", app.rest_base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("REST call");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("REST body");
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("a JSON body")
    };
    (status, json)
}

/// A generated message as the proto3 JSON the gateway prints.
pub fn json_of(message: &impl prost::Message, full_name: &str) -> serde_json::Value {
    let pool = prost_reflect::DescriptorPool::decode(keel::proto::FILE_DESCRIPTOR_SET)
        .expect("descriptors");
    let descriptor = pool.get_message_by_name(full_name).expect("known message");
    let dynamic =
        prost_reflect::DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
            .expect("decode");
    serde_json::from_slice(&keel_gateway::transcode::to_json(&dynamic, None).expect("json"))
        .expect("json")
}

/// `n` clients, each on a connection of its own, all connected before any call is made.
pub async fn clients<C, F: std::future::Future<Output = C>>(
    n: usize,
    connect: impl Fn() -> F,
) -> Vec<C> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        clients.push(connect().await);
    }
    clients
}

/// Makes one call per client at once: every client is connected before any call starts, and
/// all start together on a barrier. The answers come back in the clients' order.
pub async fn at_once<C, T, F>(clients: Vec<C>, call: impl Fn(usize, C) -> F) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
    let racers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let (barrier, call) = (barrier.clone(), call(i, client));
            tokio::spawn(async move {
                barrier.wait().await;
                call.await
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(racers.len());
    for racer in racers {
        answers.push(racer.await.expect("a racer panicked"));
    }
    answers
}
