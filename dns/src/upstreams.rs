//! The node's upstream resolvers, read from its resolv.conf. Names the cluster does not own are
//! forwarded there; a loopback resolver of the host (systemd-resolved's 127.0.0.53, a local
//! dnsmasq) is unreachable from inside a task's namespace, so it is skipped, as Docker does.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use crate::forward::Forwarder;

/// How often the node's resolv.conf is looked at. One `stat` a few seconds costs nothing and
/// needs no watcher: inotify on the file misses the common replacement by rename (and the
/// symlink systemd-resolved keeps), so it would have to watch the directory and follow links.
pub const RESOLV_CONF_POLL: Duration = Duration::from_secs(2);

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

/// What a new resolv.conf means for the forwarder's upstreams.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Changed(Vec<SocketAddr>),
    /// Unreadable or without a usable nameserver: the current upstreams stay, since a file
    /// being rewritten or broken is likelier than a node meant to resolve nothing.
    Kept(String),
}

/// Compares a resolv.conf (or the error reading it) with the upstreams in use.
pub fn reload(current: &[SocketAddr], text: std::io::Result<String>) -> Reload {
    let text = match text {
        Ok(text) => text,
        Err(err) => return Reload::Kept(format!("unreadable: {err}")),
    };
    let servers = parse_resolv_conf(&text).servers;
    if servers.is_empty() {
        Reload::Kept("no usable nameserver in it".into())
    } else if servers == current {
        Reload::Unchanged
    } else {
        Reload::Changed(servers)
    }
}

/// Follows the node's resolv.conf (as aardvark-dns does): when it changes, the forwarder asks
/// its new nameservers; a file without any keeps the old ones. Runs until the runtime ends.
pub async fn follow_resolv_conf(forwarder: Forwarder, path: PathBuf, every: Duration) {
    // What identifies a version of the file: its modification time, size and inode (a file
    // replaced within the mtime's resolution still shows as new by the other two).
    let stamp = |path: &PathBuf| -> Option<(SystemTime, u64, u64)> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len(), meta.ino()))
    };
    // Nothing seen yet: the first look compares the file with the upstreams in use, which
    // may have been read from an older version of it.
    let mut seen = None;
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let current = forwarder.upstreams();
        match reload(&current, std::fs::read_to_string(&path)) {
            Reload::Unchanged => {}
            Reload::Changed(servers) => {
                tracing::info!(
                    file = %path.display(),
                    from = ?current,
                    to = ?servers,
                    "the node's resolvers changed: DNS forwards to the new ones"
                );
                forwarder.set_upstreams(servers);
            }
            Reload::Kept(reason) => tracing::warn!(
                file = %path.display(),
                %reason,
                upstreams = ?current,
                "the node's resolv.conf changed but is unusable: keeping the previous resolvers"
            ),
        }
    }
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

    fn servers(text: &str) -> Vec<SocketAddr> {
        parse_resolv_conf(text).servers
    }

    #[test]
    fn a_changed_file_replaces_the_upstreams_and_a_bad_one_keeps_them() {
        let current = servers("nameserver 192.0.2.1\n");
        assert_eq!(
            reload(&current, Ok("nameserver 192.0.2.1\n# comment\n".into())),
            Reload::Unchanged
        );
        assert_eq!(
            reload(&current, Ok("nameserver 192.0.2.9\n".into())),
            Reload::Changed(servers("nameserver 192.0.2.9"))
        );
        assert!(matches!(
            reload(&current, Ok(String::new())),
            Reload::Kept(_)
        ));
        assert!(matches!(
            reload(&current, Ok("nameserver 127.0.0.53\n".into())),
            Reload::Kept(_)
        ));
        let missing = std::io::Error::from(std::io::ErrorKind::NotFound);
        assert!(matches!(reload(&current, Err(missing)), Reload::Kept(_)));
    }

    #[tokio::test(start_paused = false)]
    async fn the_forwarder_follows_the_file() {
        let dir = std::env::temp_dir().join(format!("shoal-resolv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        std::fs::write(&path, "nameserver 192.0.2.1\n").unwrap();
        let forwarder = Forwarder::new(crate::ForwarderConfig {
            upstreams: servers("nameserver 192.0.2.1"),
            ..crate::ForwarderConfig::default()
        });
        let follower = tokio::spawn(follow_resolv_conf(
            forwarder.clone(),
            path.clone(),
            Duration::from_millis(10),
        ));
        let wait_for = |want: Vec<SocketAddr>| {
            let forwarder = forwarder.clone();
            async move {
                for _ in 0..300 {
                    if *forwarder.upstreams() == want {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!(
                    "upstreams stayed {:?}, wanted {want:?}",
                    forwarder.upstreams()
                );
            }
        };
        // Replaced by rename, as resolvconf and NetworkManager do.
        let next = dir.join("resolv.conf.new");
        std::fs::write(&next, "nameserver 192.0.2.7\nnameserver 192.0.2.8\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        wait_for(servers("nameserver 192.0.2.7\nnameserver 192.0.2.8")).await;
        // Emptied: the previous set stays.
        std::fs::write(&path, "").unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            *forwarder.upstreams(),
            servers("nameserver 192.0.2.7\nnameserver 192.0.2.8")
        );
        // Removed, then back with another resolver.
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(&path, "nameserver 192.0.2.3\n").unwrap();
        wait_for(servers("nameserver 192.0.2.3")).await;
        follower.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
