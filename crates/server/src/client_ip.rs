//! The client address behind the per-IP rate limit.
//!
//! `X-Forwarded-For` is believed only from configured trusted proxies (LESSONS:
//! "Security"): anyone can send the header, so from an untrusted peer it is ignored and
//! the peer's own address counts. Behind a chain of trusted proxies the header is read
//! from the right, skipping trusted hops; the first untrusted address is the client.

use std::net::IpAddr;

use axum::http::HeaderMap;
use ipnet::IpNet;

/// Parses `[limits] trusted_proxies` (addresses or CIDR ranges).
///
/// Errors: the first entry that is neither, named.
pub fn parse_proxies(entries: &[String]) -> Result<Vec<IpNet>, String> {
    entries
        .iter()
        .map(|e| {
            e.parse::<IpNet>()
                .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!("limits.trusted_proxies: {e:?} is not an IP address or CIDR range")
                })
        })
        .collect()
}

/// The client's address: the peer's, unless the peer is a trusted proxy, in which case
/// the rightmost untrusted `X-Forwarded-For` entry. `None` without a peer (in-process
/// requests in tests).
pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let mut hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    while let Some(ip) = hops.pop() {
        if !is_trusted(&ip) {
            return Some(ip);
        }
    }
    Some(peer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert("x-forwarded-for", v.parse().unwrap());
        m
    }

    #[test]
    fn header_only_from_trusted_proxies() {
        let trusted = parse_proxies(&["10.0.0.0/8".into(), "192.168.1.1".into()]).unwrap();
        let client: IpAddr = "203.0.113.7".parse().unwrap();
        let proxy: IpAddr = "10.1.2.3".parse().unwrap();
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_ip(Some(client), &h("1.2.3.4"), &trusted),
            Some(client)
        );
        // A trusted proxy: the rightmost untrusted hop.
        assert_eq!(
            client_ip(Some(proxy), &h("1.2.3.4, 203.0.113.7, 10.9.9.9"), &trusted),
            Some(client)
        );
        // A trusted proxy without the header: the proxy itself.
        assert_eq!(
            client_ip(Some(proxy), &HeaderMap::new(), &trusted),
            Some(proxy)
        );
        assert!(parse_proxies(&["nonsense".into()]).is_err());
        assert_eq!(client_ip(None, &h("1.2.3.4"), &trusted), None);
    }
}
