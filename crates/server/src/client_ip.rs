//! The client address behind the per-IP rate limit.
//!
//! `X-Forwarded-For` is believed only from configured trusted proxies (docs/lessons.md:
//! "Security"): anyone can send the header, so from an untrusted peer it is ignored and
//! the peer's own address counts. Behind a chain of trusted proxies the header is read
//! from the right, hop by hop: a trusted hop passes the walk on to the entry before it;
//! the first untrusted address is the client. An entry that is no address at all
//! (`unknown`, a hidden name, garbage) ends the walk at the last trusted hop: what lies
//! left of it was written by someone no trusted proxy vouches for, so skipping it would
//! let a client pick its own key.

use std::net::{IpAddr, SocketAddr};

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

/// One `X-Forwarded-For` entry as an address: `1.2.3.4`, `2001:db8::1`, and the forms
/// some proxies write with a port or brackets — `1.2.3.4:5678`, `[2001:db8::1]:5678`,
/// `[2001:db8::1]`. `None` for anything else.
fn parse_hop(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(IpAddr::V6)
        })
}

/// The client's address: the peer's, unless the peer is a trusted proxy; then the
/// `X-Forwarded-For` entries are walked from the right: the first untrusted one is the
/// client; an unparsable one stops the walk at the last trusted hop (the peer, or the
/// trusted entry right of it); a chain trusted all the way gives its leftmost entry.
/// `None` without a peer (in-process requests in tests).
pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        // A header value that is not visible ASCII is not an address either.
        .map(|v| v.to_str().unwrap_or("unknown"))
        .flat_map(|v| v.split(','))
        .collect();
    let mut last_trusted = peer;
    for entry in entries.iter().rev() {
        match parse_hop(entry) {
            None => return Some(last_trusted),
            Some(ip) if !is_trusted(&ip) => return Some(ip),
            Some(ip) => last_trusted = ip,
        }
    }
    Some(last_trusted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(values: &[&str]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for v in values {
            m.append("x-forwarded-for", v.parse().unwrap());
        }
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn hops_with_ports_and_brackets_parse() {
        for (entry, want) in [
            ("203.0.113.7", Some("203.0.113.7")),
            (" 203.0.113.7 ", Some("203.0.113.7")),
            ("203.0.113.7:61234", Some("203.0.113.7")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("[2001:db8::1]:443", Some("2001:db8::1")),
            ("unknown", None),
            ("_hidden", None),
            ("", None),
            ("[203.0.113.7]", None),
            ("2001:db8::1:443]", None),
            ("203.0.113.7:port", None),
        ] {
            assert_eq!(parse_hop(entry), want.map(ip), "{entry:?}");
        }
    }

    #[test]
    fn the_walk_from_the_right() {
        let trusted = parse_proxies(&["10.0.0.0/8".into(), "192.168.1.1".into()]).unwrap();
        let client = |peer: &str, values: &[&str]| {
            client_ip(Some(ip(peer)), &h(values), &trusted).map(|a| a.to_string())
        };
        let want = |s: &str| Some(s.to_string());
        for (peer, header, expected) in [
            // An untrusted peer's header is ignored.
            ("203.0.113.7", &["1.2.3.4"][..], "203.0.113.7"),
            // A trusted proxy without the header: the proxy itself.
            ("10.1.2.3", &[][..], "10.1.2.3"),
            // The rightmost untrusted hop.
            (
                "10.1.2.3",
                &["1.2.3.4, 203.0.113.7, 10.9.9.9"][..],
                "203.0.113.7",
            ),
            // Ports and brackets are read, not skipped.
            (
                "10.1.2.3",
                &["1.2.3.4, 203.0.113.7:5000"][..],
                "203.0.113.7",
            ),
            (
                "10.1.2.3",
                &["1.2.3.4, [2001:db8::7]:443, 10.9.9.9:80"][..],
                "2001:db8::7",
            ),
            ("10.1.2.3", &["1.2.3.4, [2001:db8::7]"][..], "2001:db8::7"),
            // An unparsable hop stops the walk at the last trusted hop: the client
            // wrote what lies left of it.
            ("10.1.2.3", &["1.2.3.4, unknown"][..], "10.1.2.3"),
            ("10.1.2.3", &["1.2.3.4, garbage, 10.9.9.9"][..], "10.9.9.9"),
            ("10.1.2.3", &["1.2.3.4, , 10.9.9.9"][..], "10.9.9.9"),
            // Trusted all the way: the leftmost hop.
            ("10.1.2.3", &["10.5.5.5, 192.168.1.1"][..], "10.5.5.5"),
            // Several header lines are one list, in order.
            (
                "10.1.2.3",
                &["1.2.3.4", "203.0.113.9, 10.0.0.1"][..],
                "203.0.113.9",
            ),
            (
                "10.1.2.3",
                &["1.2.3.4", "unknown", "10.0.0.1"][..],
                "10.0.0.1",
            ),
        ] {
            assert_eq!(
                client(peer, header),
                want(expected),
                "peer {peer}, {header:?}"
            );
        }
        assert!(parse_proxies(&["nonsense".into()]).is_err());
        assert_eq!(client_ip(None, &h(&["1.2.3.4"]), &trusted), None);
    }
}
