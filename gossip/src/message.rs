//! The plaintext inside sealed packets (postcard-encoded).

use serde::{Deserialize, Serialize};

use crate::record::EndpointRecord;
use crate::table::Entry;

/// A datagram's payload.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Message {
    /// A foca (SWIM) packet.
    Swim(Vec<u8>),
    /// Table writes being disseminated.
    Updates(Vec<Update>),
}

/// One table write.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Update {
    /// The cluster-wide table of which node is on which network (key `net/node`).
    Membership { key: String, entry: Entry<()> },
    /// A write to one network's endpoint table.
    Endpoint {
        net: String,
        key: String,
        entry: Entry<EndpointRecord>,
    },
}

/// One network's table as a sync carries it: every entry, tombstones included.
pub type TableDump = Vec<(String, Entry<EndpointRecord>)>;

/// A full-state sync message, request or response: the whole membership table and the
/// tables of the networks the two nodes share.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncState {
    pub membership: Vec<(String, Entry<()>)>,
    pub networks: Vec<(String, TableDump)>,
}

/// The membership table key for a node on a network. Network names hold no `/`.
pub fn membership_key(net: &str, node: &str) -> String {
    format!("{net}/{node}")
}

/// Splits a membership key into network and node.
pub fn split_membership_key(key: &str) -> Option<(&str, &str)> {
    key.split_once('/')
}
