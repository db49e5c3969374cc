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
            let port = watchdog::free_port()?;
            // The node's own file of who is in the cluster goes into its directory.
            let options = "--cluster-enabled yes --cluster-config-file nodes.conf \
                           --cluster-node-timeout 2000";
            nodes.push(Redis::start_with(watch_pid, port, options)?);
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

/// Whether the node at `address` says the cluster is up (`cluster_state:ok`: every slot
/// served) and, a replica, that it follows its primary (`master_link_status:up`).
fn serves_every_slot(cli: &std::path::Path, address: &str) -> bool {
    let (host, port) = address.split_once(':').expect("host:port");
    let ask = |what: &[&str]| {
        Command::new(cli)
            .args(["-h", host, "-p", port])
            .args(what)
            .output()
            .map(|out| String::from_utf8_lossy(&out.stdout).into_owned())
            .unwrap_or_default()
    };
    let replication = ask(&["info", "replication"]);
    ask(&["cluster", "info"]).contains("cluster_state:ok")
        && (replication.contains("role:master") || replication.contains("master_link_status:up"))
}
