//! Where a peer service lives: a static list of `host:port`, or `dns:///name:port` (a Kubernetes
//! headless Service), resolved to socket addresses.

use std::net::SocketAddr;
use std::str::FromStr;

use async_trait::async_trait;

/// Something that says where the endpoints are now.
#[async_trait]
pub trait Resolver: Send + Sync + 'static {
    /// The endpoints' addresses.
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>>;
}

/// A parsed endpoints setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Fixed `host:port` entries (hosts are still looked up on every resolution).
    Static(Vec<String>),
    /// One name whose A/AAAA records are the endpoints.
    Dns(String),
}

/// Why an endpoints setting was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("endpoints {0:?}: use host:port,host:port or dns:///name:port")]
pub struct TargetError(pub String);

fn host_port(entry: &str) -> bool {
    entry.rsplit_once(':').is_some_and(|(host, port)| {
        !host.is_empty() && !host.contains(['/', ' ', ',']) && port.parse::<u16>().is_ok()
    })
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || TargetError(s.to_owned());
        if let Some(name) = s.strip_prefix("dns:///") {
            return host_port(name)
                .then(|| Target::Dns(name.to_owned()))
                .ok_or_else(invalid);
        }
        let entries: Vec<String> = s
            .split(',')
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if entries.is_empty() || !entries.iter().all(|e| host_port(e)) {
            return Err(invalid());
        }
        Ok(Target::Static(entries))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Static(entries) => f.write_str(&entries.join(",")),
            Target::Dns(name) => write!(f, "dns:///{name}"),
        }
    }
}

/// Lookups take turns, process-wide. `getaddrinfo` runs whatever NSS modules the host
/// configures, and not every one may be entered from several threads at once (nss_wrapper
/// 1.1.12's hosts lookup, in the compose-like test, crashed a process that resolved its six
/// peers together). A turn ends with its lookup, or after [`TURN`]: a lookup still waiting for
/// a DNS server then goes on outside the turn. The turn is therefore best effort: it keeps
/// lookups apart only while each ends within a second, as a lookup in a hosts file does.
static LOOKUPS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The longest a lookup holds the turn. Held for as long as discovery waited (up to 16 s), one
/// name whose answer was lost held back every other peer's lookups, each of which then ran out
/// of its own patience waiting for the turn: in the compose walkthrough, a gateway whose six
/// peers had all started found none of them for a minute.
const TURN: std::time::Duration = std::time::Duration::from_secs(1);

/// The addresses `name` (`host:port`) resolves to; an address needs no lookup, nor a turn.
async fn lookup(name: &str) -> std::io::Result<Vec<SocketAddr>> {
    if let Ok(addr) = name.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    let addrs = in_turn(&LOOKUPS, tokio::net::lookup_host(name)).await?;
    Ok(addrs.collect())
}

/// `lookup` in a turn of `turns`: the turn is given back when it ends or after [`TURN`],
/// whichever comes first, and the lookup goes on.
async fn in_turn<T>(turns: &tokio::sync::Mutex<()>, lookup: impl Future<Output = T>) -> T {
    let turn = turns.lock().await;
    let mut lookup = std::pin::pin!(lookup);
    if let Ok(done) = tokio::time::timeout(TURN, lookup.as_mut()).await {
        return done;
    }
    drop(turn);
    lookup.await
}

#[async_trait]
impl Resolver for Target {
    async fn resolve(&self) -> std::io::Result<Vec<SocketAddr>> {
        let names: &[String] = match self {
            Target::Static(entries) => entries,
            Target::Dns(name) => std::slice::from_ref(name),
        };
        let mut addrs = Vec::new();
        for name in names {
            for addr in lookup(name).await? {
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
        }
        Ok(addrs)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Lookups in turns of `turns`, each recording when it ends in `ended`.
    async fn lookups_in_turn(first: impl Future<Output = ()>) -> Vec<&'static str> {
        let (turns, ended) = (tokio::sync::Mutex::new(()), Mutex::new(Vec::new()));
        let first = async {
            in_turn(&turns, first).await;
            ended.lock().unwrap().push("first");
        };
        let second = async {
            // Asks for its turn once the first holds it.
            tokio::task::yield_now().await;
            in_turn(&turns, async {}).await;
            ended.lock().unwrap().push("second");
        };
        let both = async { tokio::join!(first, second) };
        // The first never ending is not waited for past a minute.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(60), both).await;
        ended.into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_that_ends_within_its_turn_keeps_the_next_one_waiting() {
        let quick = tokio::time::sleep(TURN / 2);
        assert_eq!(lookups_in_turn(quick).await, ["first", "second"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_that_never_ends_gives_its_turn_back() {
        let stuck = std::future::pending::<()>();
        assert_eq!(lookups_in_turn(stuck).await, ["second"]);
    }

    #[test]
    fn targets_parse() {
        assert_eq!(
            "127.0.0.1:1,127.0.0.1:2".parse::<Target>().unwrap(),
            Target::Static(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()])
        );
        assert_eq!(
            "dns:///catalog:50051".parse::<Target>().unwrap(),
            Target::Dns("catalog:50051".into())
        );
        for bad in ["", "catalog", "dns:///catalog", "a:b", ":80", "dns://x:1"] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    /// A `dns:///` name resolves to its addresses with the port given. (That every resolution
    /// asks again, with no cache in between, is not shown here: it would need a name whose
    /// answer changes under the test.)
    #[tokio::test]
    async fn dns_names_resolve_to_their_addresses_with_the_port() {
        let addrs = "dns:///localhost:50051"
            .parse::<Target>()
            .unwrap()
            .resolve()
            .await
            .unwrap();
        assert!(
            !addrs.is_empty()
                && addrs
                    .iter()
                    .all(|a| a.ip().is_loopback() && a.port() == 50051)
        );
    }
}
