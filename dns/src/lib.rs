//! shoal's embedded DNS: each task resolves cluster names through 127.0.0.11:53 in its own
//! namespace; names the cluster does not own are forwarded to the node's resolvers.

mod records;
mod upstreams;

pub use records::{QueryKind, Records, Resolution, SharedRecords, TaskEndpoint};
pub use upstreams::{parse_resolv_conf, Upstreams};
