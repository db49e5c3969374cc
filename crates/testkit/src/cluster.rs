//! An ephemeral Redis Cluster on loopback: three primaries without persistence, their slots
//! assigned by `redis-cli --cluster create`, shared by a test run; or one for a test alone, with
//! a replica per primary, whose primaries it may kill to see a failover.

use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::redis::Redis;
use crate::watchdog;

/// How many primaries the cluster has.
const PRIMARIES: usize = 3;

/// A node's options: the node's own file of who is in the cluster goes into its directory; a
/// primary that does not answer for 2 s is failed over.
const NODE_OPTIONS: &str = "--cluster-enabled yes --cluster-config-file nodes.conf \
                            --cluster-node-timeout 2000";

/// A running Redis Cluster.
#[derive(Debug, Clone)]
pub struct RedisCluster {
    /// `redis-cluster://127.0.0.1:<port>?node=127.0.0.1:<port>&…`, fred's form, every node named.
    pub url: String,
    /// Its primaries, each as a server of its own (`redis://127.0.0.1:<port>`).
    pub nodes: Vec<Redis>,
}

static SHARED: OnceLock<Result<RedisCluster, String>> = OnceLock::new();

impl RedisCluster {
    /// The cluster this test run shares: `KEEL_TEST_REDIS_CLUSTER_URL` if set, else one started
    /// (once per process) for this process.
    pub fn shared() -> Result<RedisCluster, String> {
        SHARED
            .get_or_init(|| match std::env::var("KEEL_TEST_REDIS_CLUSTER_URL") {
                Ok(url) => Ok(RedisCluster {
                    url,
                    nodes: Vec::new(),
                }),
                Err(_) => RedisCluster::start(std::process::id()).map_err(|e| format!("{e:#}")),
            })
            .clone()
    }

    /// [`RedisCluster::shared`] from async code (started, the first time, off the runtime).
    pub async fn running() -> RedisCluster {
        tokio::task::spawn_blocking(RedisCluster::shared)
            .await
            .expect("start a Redis Cluster")
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A cluster for one test alone, with `replicas` replicas of each primary, which it may
    /// fail over by killing a primary ([`RedisCluster::primary_of`]).
    pub async fn dedicated(replicas: usize) -> RedisCluster {
        tokio::task::spawn_blocking(move || RedisCluster::start_with(std::process::id(), replicas))
            .await
            .expect("start a Redis Cluster")
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// Starts a cluster whose servers live as long as process `watch_pid`, and waits until
    /// every node reports every slot served.
    pub fn start(watch_pid: u32) -> anyhow::Result<RedisCluster> {
        RedisCluster::start_with(watch_pid, 0)
    }

    /// [`RedisCluster::start`] with `replicas` replicas of each primary.
    fn start_with(watch_pid: u32, replicas: usize) -> anyhow::Result<RedisCluster> {
        let cli = watchdog::find_binary("redis-cli", &[]).ok_or_else(|| {
            anyhow::anyhow!("redis-cli not found on PATH: apt-get install -y redis-tools")
        })?;
        let count = PRIMARIES * (1 + replicas);
        let mut nodes = Vec::with_capacity(count);
        let mut addresses = Vec::with_capacity(count);
        for _ in 0..count {
            let (node, port) = Redis::start_free(watch_pid, NODE_OPTIONS)?;
            nodes.push(node);
            addresses.push(format!("127.0.0.1:{port}"));
        }
        let created = Command::new(&cli)
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()?;
        anyhow::ensure!(
            created.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&created.stdout),
            String::from_utf8_lossy(&created.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !addresses
            .iter()
            .all(|address| serves_every_slot(&cli, address))
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the cluster did not serve every slot within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let (first, others) = addresses.split_first().expect("three primaries");
        let others: Vec<String> = others.iter().map(|a| format!("node={a}")).collect();
        Ok(RedisCluster {
            url: format!("redis-cluster://{first}?{}", others.join("&")),
            nodes,
        })
    }
}

impl RedisCluster {
    /// How many commands the cluster's nodes have refused because their keys span slots
    /// (`CROSSSLOT`), since they started: what keel's fallbacks (the database, the table, an
    /// admitted request) would otherwise hide.
    pub fn refused_across_slots(&self) -> u64 {
        let cli = watchdog::find_binary("redis-cli", &[]).expect("redis-cli on PATH");
        self.addresses()
            .iter()
            .map(|address| {
                let (host, port) = address.split_once(':').expect("host:port");
                let out = Command::new(&cli)
                    .args(["-h", host, "-p", port, "info", "errorstats"])
                    .output()
                    .expect("run redis-cli");
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .find_map(|line| line.strip_prefix("errorstat_CROSSSLOT:count="))
                    .and_then(|count| count.split(',').next()?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// The primary that serves `slot` now (a node this process started).
    pub fn primary_of(&self, slot: u16) -> Option<&Redis> {
        let cli = watchdog::find_binary("redis-cli", &[])?;
        self.nodes.iter().find(|node| {
            let port = node.url.rsplit(':').next().unwrap_or_default();
            let Ok(out) = Command::new(&cli)
                .args(["-p", port, "cluster", "nodes"])
                .output()
            else {
                return false;
            };
            // The node's own line: `<id> <addr> myself,master - … <slot ranges>`.
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|line| line.contains("myself,master"))
                .is_some_and(|line| {
                    line.split_whitespace().skip(8).any(|range| {
                        let (low, high) = range.split_once('-').unwrap_or((range, range));
                        matches!(
                            (low.parse::<u16>(), high.parse::<u16>()),
                            (Ok(low), Ok(high)) if (low..=high).contains(&slot)
                        )
                    })
                })
        })
    }

    /// Starts another primary and joins it to the cluster, serving no slot yet
    /// ([`RedisCluster::move_slot`] gives it one).
    pub async fn add_primary(&mut self) -> Redis {
        let known = self.nodes.len();
        let mut everyone = self.addresses();
        let first = everyone[0].clone();
        let added = tokio::task::spawn_blocking(move || -> anyhow::Result<Redis> {
            let cli = watchdog::find_binary("redis-cli", &[])
                .ok_or_else(|| anyhow::anyhow!("redis-cli not found on PATH"))?;
            let port = watchdog::free_port()?;
            let node = Redis::start_with(std::process::id(), port, NODE_OPTIONS)?;
            let address = format!("127.0.0.1:{port}");
            let joined = Command::new(&cli)
                .args(["--cluster", "add-node", &address, &first])
                .output()?;
            anyhow::ensure!(
                joined.status.success(),
                "redis-cli --cluster add-node failed:\n{}",
                String::from_utf8_lossy(&joined.stdout)
            );
            // Every node must know it before a slot can move there (SETSLOT names it).
            everyone.push(address);
            let deadline = Instant::now() + Duration::from_secs(30);
            let met = format!("cluster_known_nodes:{}", known + 1);
            let knows = |address: &String| {
                let (host, port) = address.split_once(':').expect("host:port");
                redis_cli(&cli, host, port, &["cluster", "info"]).contains(&met)
            };
            while !everyone.iter().all(knows) {
                anyhow::ensure!(Instant::now() < deadline, "the new node was not met");
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(node)
        })
        .await
        .expect("add a primary")
        .unwrap_or_else(|e| panic!("{e:#}"));
        self.nodes.push(added.clone());
        added
    }

    /// Moves `slot` and its keys to the primary `to`, as a reshard does: the slot importing
    /// there and migrating here, its keys `MIGRATE`d, then every primary told its new owner.
    pub fn move_slot(&self, slot: u16, to: &Redis) {
        let cli = watchdog::find_binary("redis-cli", &[]).expect("redis-cli on PATH");
        let from = self.primary_of(slot).expect("the slot's primary");
        let port = |node: &Redis| node.url.rsplit(':').next().unwrap_or_default().to_owned();
        let (from_port, to_port) = (port(from), port(to));
        let ask = |port: &str, args: &[&str]| redis_cli(&cli, "127.0.0.1", port, args);
        let id = |port: &str| ask(port, &["cluster", "myid"]).trim().to_owned();
        let (from_id, to_id) = (id(&from_port), id(&to_port));
        let slot = slot.to_string();
        let set = |port: &str, state: &str, node: &str| {
            let answer = ask(port, &["cluster", "setslot", &slot, state, node]);
            assert_eq!(
                answer.trim(),
                "OK",
                "CLUSTER SETSLOT {slot} {state} at {port}"
            );
        };
        set(&to_port, "importing", &from_id);
        set(&from_port, "migrating", &to_id);
        loop {
            let keys = ask(&from_port, &["cluster", "getkeysinslot", &slot, "100"]);
            let keys: Vec<&str> = keys.lines().filter(|key| !key.is_empty()).collect();
            if keys.is_empty() {
                break;
            }
            let mut migrate = vec!["migrate", "127.0.0.1", &to_port, "", "0", "5000", "keys"];
            migrate.extend(keys);
            ask(&from_port, &migrate);
        }
        for node in std::iter::once(to).chain(self.nodes.iter()) {
            set(&port(node), "node", &to_id);
        }
    }

    /// Every node's `host:port`, as the URL names them.
    fn addresses(&self) -> Vec<String> {
        let rest = self.url.trim_start_matches("redis-cluster://");
        let (first, query) = rest.split_once('?').unwrap_or((rest, ""));
        std::iter::once(first.to_owned())
            .chain(
                query
                    .split('&')
                    .filter_map(|pair| pair.strip_prefix("node="))
                    .map(str::to_owned),
            )
            .collect()
    }
}

/// What redis-cli answers `args` at `host:port` (empty if it cannot be run).
fn redis_cli(cli: &std::path::Path, host: &str, port: &str, args: &[&str]) -> String {
    Command::new(cli)
        .args(["-h", host, "-p", port])
        .args(args)
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
        .unwrap_or_default()
}

/// Whether the node at `address` says the cluster is up (`cluster_state:ok`: every slot
/// served) and, a replica, that it follows its primary (`master_link_status:up`).
fn serves_every_slot(cli: &std::path::Path, address: &str) -> bool {
    let (host, port) = address.split_once(':').expect("host:port");
    let ask = |what: &[&str]| redis_cli(cli, host, port, what);
    let replication = ask(&["info", "replication"]);
    ask(&["cluster", "info"]).contains("cluster_state:ok")
        && (replication.contains("role:master") || replication.contains("master_link_status:up"))
}
