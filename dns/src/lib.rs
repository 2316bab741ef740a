//! shoal's embedded DNS: each task resolves cluster names through 127.0.0.11:53 in its own
//! namespace; names the cluster does not own are forwarded to the node's resolvers.
//!
//! The agent keeps one [`DnsServer`] (records snapshot, forwarder, counters) and, per task,
//! calls [`DnsServer::serve`] on the task's sockets at [`EMBEDDED_DNS_ADDR`] (opened inside
//! the task's namespace by its PID 1, `shoal task-init`, which holds them across agent
//! restarts).

mod forward;
mod query;
mod records;
mod server;
mod stats;
mod upstreams;

pub use forward::{ForwardError, Forwarder, ForwarderConfig};
pub use query::CLUSTER_TTL_SECS;
pub use records::{QueryKind, Records, Resolution, SharedRecords, TaskEndpoint};
pub use server::{DnsServer, ServeHandle, TaskScope};
pub use stats::DnsStats;

/// Where tasks find the embedded DNS, as in Docker.
pub const EMBEDDED_DNS_ADDR: std::net::SocketAddr = std::net::SocketAddr::new(
    std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 11)),
    53,
);
pub use upstreams::{
    follow_resolv_conf, parse_resolv_conf, reload, Reload, Upstreams, RESOLV_CONF_POLL,
};
