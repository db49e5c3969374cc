//! Who the client is: the socket peer, unless the peer is a proxy the operator trusts
//! (`--trusted-proxies`), in which case `Forwarded` or `X-Forwarded-For` is read from the right,
//! skipping trusted hops, and the first address not trusted is the client. A forged header from
//! an untrusted peer changes nothing.

use std::net::IpAddr;
use std::str::FromStr;

use http::HeaderMap;
use ipnet::IpNet;

/// The networks whose forwarding headers are believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

/// A network as `--trusted-proxies` takes it: a CIDR (`10.0.0.0/8`) or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network(pub IpNet);

impl FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        s.parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map(Network)
            .map_err(|_| format!("{s:?} is not a CIDR such as 10.0.0.0/8 or an IP address"))
    }
}

impl TrustedProxies {
    /// Trusts `networks`.
    pub fn new(networks: impl IntoIterator<Item = Network>) -> Self {
        Self(networks.into_iter().map(|n| n.0).collect())
    }

    /// Whether `ip` is a trusted proxy.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client of a request from `peer` that carried `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = canonical(peer);
        if !self.contains(peer) {
            return peer;
        }
        let hops = forwarded_for(headers);
        let mut client = peer;
        for hop in hops.iter().rev() {
            match hop {
                Some(ip) if self.contains(*ip) => client = *ip,
                Some(ip) => return *ip,
                // A hop we cannot read: the last trusted one vouched for nothing further.
                None => return client,
            }
        }
        client
    }
}

/// IPv4 addresses mapped into IPv6 (`::ffff:1.2.3.4`) as the IPv4 they are.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// The hops a request passed, first to last, from `Forwarded` (RFC 7239) when present, else
/// `X-Forwarded-For`; `None` for a hop that is not an address (`unknown`, an obfuscated id,
/// garbage).
fn forwarded_for(headers: &HeaderMap) -> Vec<Option<IpAddr>> {
    let forwarded: Vec<&str> = headers
        .get_all(http::header::FORWARDED)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !forwarded.is_empty() {
        return forwarded
            .iter()
            .flat_map(|v| v.split(','))
            .map(|element| {
                element
                    .split(';')
                    .filter_map(|pair| pair.split_once('='))
                    .find(|(name, _)| name.trim().eq_ignore_ascii_case("for"))
                    .and_then(|(_, node)| parse_node(node))
            })
            .collect();
    }
    headers
        .get_all("x-forwarded-for")
        .iter()
        .flat_map(|v| match v.to_str() {
            Ok(v) => v.split(',').map(parse_node).collect(),
            Err(_) => vec![None],
        })
        .collect()
}

/// An address out of a node: `1.2.3.4`, `1.2.3.4:80`, `"[2001:db8::1]:443"`, `2001:db8::1`.
fn parse_node(node: &str) -> Option<IpAddr> {
    let node = node.trim().trim_matches('"');
    if let Ok(ip) = node.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = node.strip_prefix('[') {
        return rest
            .split_once(']')
            .and_then(|(ip, _)| ip.parse().ok())
            .map(canonical);
    }
    node.rsplit_once(':')
        .and_then(|(ip, port)| port.parse::<u16>().ok().and(ip.parse().ok()))
        .map(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().unwrap());
        }
        map
    }

    fn trusted(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| n.parse::<Network>().unwrap()))
    }

    #[test]
    fn without_trusted_proxies_the_peer_is_the_client() {
        let forged = headers(&[("x-forwarded-for", "6.6.6.6"), ("forwarded", "for=7.7.7.7")]);
        assert_eq!(
            TrustedProxies::default().client(ip("10.0.0.5"), &forged),
            ip("10.0.0.5")
        );
        assert_eq!(
            trusted(&["192.168.0.0/16"]).client(ip("10.0.0.5"), &forged),
            ip("10.0.0.5"),
            "an untrusted peer's header is not believed"
        );
    }

    #[test]
    fn hops_are_read_from_the_right_skipping_trusted_ones() {
        let proxies = trusted(&["10.0.0.0/8", "127.0.0.1"]);
        let chain = headers(&[("x-forwarded-for", "6.6.6.6, 203.0.113.7, 10.1.2.3")]);
        assert_eq!(
            proxies.client(ip("127.0.0.1"), &chain),
            ip("203.0.113.7"),
            "the client's own claim (6.6.6.6) is left of the first untrusted hop"
        );
        let all_trusted = headers(&[("x-forwarded-for", "10.9.9.9")]);
        assert_eq!(proxies.client(ip("10.0.0.1"), &all_trusted), ip("10.9.9.9"));
        let garbled = headers(&[("x-forwarded-for", "203.0.113.7, nonsense")]);
        assert_eq!(proxies.client(ip("10.0.0.1"), &garbled), ip("10.0.0.1"));
    }

    #[test]
    fn forwarded_is_preferred_and_its_nodes_parsed() {
        let proxies = trusted(&["10.0.0.0/8"]);
        let both = headers(&[
            (
                "forwarded",
                r#"for=198.51.100.1;proto=https, for="[2001:db8::1]:443""#,
            ),
            ("x-forwarded-for", "6.6.6.6"),
        ]);
        assert_eq!(proxies.client(ip("10.0.0.1"), &both), ip("2001:db8::1"));
        let port = headers(&[("forwarded", "for=198.51.100.1:8080")]);
        assert_eq!(proxies.client(ip("10.0.0.1"), &port), ip("198.51.100.1"));
    }

    #[test]
    fn mapped_ipv4_is_ipv4() {
        let proxies = trusted(&["127.0.0.1/32"]);
        let chain = headers(&[("x-forwarded-for", "203.0.113.9")]);
        assert_eq!(
            proxies.client(ip("::ffff:127.0.0.1"), &chain),
            ip("203.0.113.9")
        );
        assert!("not-a-net".parse::<Network>().is_err());
        assert!("10.0.0.0/33".parse::<Network>().is_err());
    }
}
