//! shoal's gossip (port 7946): SWIM membership with suspicion (foca), a cluster-wide table
//! of which node is on which network, and one endpoint table per network that only the
//! nodes on that network receive. Entries are Lamport-versioned with tombstones; writes are
//! pushed at once and retransmitted a bounded number of times; a periodic TCP full-state
//! sync repairs what was missed. Every packet is sealed with AES-256-GCM and checked
//! against replays (see `wire`).
//!
//! `Gossip` is sans-IO (time and packets are passed in); `sim` drives many of them over a
//! simulated network and `net` drives one over real UDP and TCP sockets.

mod core;
mod identity;
mod message;
pub mod net;
mod queue;
mod record;
pub mod sim;
mod table;
pub mod wire;

pub use crate::core::{
    Error, Gossip, GossipConfig, GossipStats, MemberInfo, MemberState, Output, SwimConfig,
};
pub use record::{EndpointHealth, EndpointRecord, PublishedPort};
pub use table::{Entry, LamportClock, Table, Version};
pub use wire::{DropReason, Keyring, KeyringError};
