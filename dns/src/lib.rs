//! shoal's embedded DNS: each task resolves cluster names through 127.0.0.11:53 in its own
//! namespace; names the cluster does not own are forwarded to the node's resolvers.
//!
//! The agent keeps one [`DnsServer`] (records snapshot, forwarder, counters) and, per task,
//! opens the sockets with [`bind_in_netns`] and calls [`DnsServer::serve`].

mod forward;
mod netns;
mod query;
mod records;
mod server;
mod stats;
mod upstreams;

pub use forward::{ForwardError, Forwarder, ForwarderConfig};
pub use netns::{bind_in_netns, EMBEDDED_DNS_ADDR};
pub use query::CLUSTER_TTL_SECS;
pub use records::{QueryKind, Records, Resolution, SharedRecords, TaskEndpoint};
pub use server::{DnsServer, ServeHandle, TaskScope};
pub use stats::DnsStats;
pub use upstreams::{
    follow_resolv_conf, parse_resolv_conf, reload, Reload, Upstreams, RESOLV_CONF_POLL,
};
