//! Opening the embedded DNS sockets inside a task's network namespace. A socket stays in the
//! namespace it was created in, so only the binding needs to happen there; serving runs on the
//! agent's runtime threads, which never change namespace.

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// Where tasks find the embedded DNS, as in Docker.
pub const EMBEDDED_DNS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 53);

/// Binds UDP and TCP on 127.0.0.11:53 in the network namespace at `netns_path` (for example
/// `/proc/PID/ns/net`) and returns both sockets, non-blocking.
///
/// The namespace's `lo` must be up (the agent brings it up when it creates the task's
/// namespace): with `lo` down the bind still succeeds, but queries to it fail with "Network is
/// unreachable". Needs CAP_SYS_ADMIN (setns) and CAP_NET_BIND_SERVICE (port 53).
pub fn bind_in_netns(netns_path: &Path) -> io::Result<(UdpSocket, TcpListener)> {
    let netns = File::open(netns_path)?;
    // A short-lived thread enters the namespace and ends there: no other thread of the agent,
    // and no tokio worker, ever changes namespace.
    std::thread::Builder::new()
        .name("dns-netns-bind".into())
        .spawn(move || {
            setns(&netns, CloneFlags::CLONE_NEWNET)?;
            bind_embedded_dns(EMBEDDED_DNS_ADDR)
        })?
        .join()
        .map_err(|_| io::Error::other("the namespace binding thread panicked"))?
}

fn bind_embedded_dns(addr: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    let udp = UdpSocket::bind(addr)?;
    udp.set_nonblocking(true)?;
    let tcp = TcpListener::bind(addr)?;
    tcp.set_nonblocking(true)?;
    Ok((udp, tcp))
}
