//! shoal's embedded DNS. For now: which upstream resolvers the node forwards to.

mod upstreams;

pub use upstreams::{parse_resolv_conf, Upstreams};
