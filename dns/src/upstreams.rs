//! The node's upstream resolvers, read from its resolv.conf. Names the cluster does not own are
//! forwarded there; a loopback resolver of the host (systemd-resolved's 127.0.0.53, a local
//! dnsmasq) is unreachable from inside a task's namespace, so it is skipped, as Docker does.

use std::net::{IpAddr, SocketAddr};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upstreams {
    /// Resolvers to forward to, in resolv.conf order, port 53.
    pub servers: Vec<SocketAddr>,
    /// Loopback resolvers that were listed but cannot serve tasks.
    pub skipped_loopback: Vec<IpAddr>,
}

/// Parses resolv.conf text. Unknown lines and malformed `nameserver` entries are ignored, as
/// the libc resolver ignores them.
pub fn parse_resolv_conf(text: &str) -> Upstreams {
    let mut upstreams = Upstreams::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        // Drop an IPv6 zone ("fe80::1%eth0"): it names an interface of the host, not the task.
        let Some(Ok(ip)) = words
            .next()
            .map(|w| w.split('%').next().unwrap_or(w).parse::<IpAddr>())
        else {
            continue;
        };
        if ip.is_loopback() {
            upstreams.skipped_loopback.push(ip);
        } else if !upstreams.servers.iter().any(|s| s.ip() == ip) {
            upstreams.servers.push(SocketAddr::new(ip, 53));
        }
    }
    upstreams
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_skips_loopback_comments_and_garbage() {
        let text = "\
# generated
search example.org
nameserver 192.0.2.1
nameserver 127.0.0.53
nameserver not-an-ip
nameserver 2001:db8::1 ; trailing comment
nameserver fe80::1%eth0
nameserver 192.0.2.1
options ndots:2
";
        let up = parse_resolv_conf(text);
        let servers: Vec<String> = up.servers.iter().map(ToString::to_string).collect();
        assert_eq!(
            servers,
            ["192.0.2.1:53", "[2001:db8::1]:53", "[fe80::1]:53"]
        );
        assert_eq!(
            up.skipped_loopback,
            ["127.0.0.53".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn empty_file_has_no_upstreams() {
        assert_eq!(parse_resolv_conf(""), Upstreams::default());
    }
}
