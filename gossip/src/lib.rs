//! shoal's gossip. This crate holds the replicated data every node keeps about the networks
//! it is attached to; membership (SWIM) and the encrypted transport build on it.

mod table;

pub use table::{Entry, LamportClock, Table, Version};
