//! Starts the shared PostgreSQL (with a streaming replica), Redis and Redis Cluster for a whole test run and prints the environment that
//! points the test kit at them: `eval "$(keel-testkit stores $$)"`. They stop when the given
//! process exits.

use keel_testkit::{Postgres, Redis, RedisCluster};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(command), Some(pid)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: keel-testkit stores <pid to outlive>");
    };
    anyhow::ensure!(
        command == "stores",
        "unknown command {command:?}; use `stores`"
    );
    let pid: u32 = pid.parse()?;
    let postgres = Postgres::start(pid)?;
    let replica = postgres.replica(pid, None)?;
    let redis = Redis::start(pid)?;
    let cluster = RedisCluster::start(pid)?;
    println!("export KEEL_TEST_POSTGRES_URL='{}'", postgres.base_url);
    println!(
        "export KEEL_TEST_POSTGRES_REPLICA_URL='{}'",
        replica.base_url
    );
    println!("export KEEL_TEST_REDIS_URL='{}'", redis.url);
    println!("export KEEL_TEST_REDIS_CLUSTER_URL='{}'", cluster.url);
    Ok(())
}
