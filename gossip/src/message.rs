//! The plaintext inside sealed packets (postcard-encoded).

use serde::{Deserialize, Serialize};

use crate::identity::NodeIdentity;
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

/// A full-state sync message, request or response: the SWIM members the sender holds up,
/// the whole membership table and the tables of the networks the two nodes share.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SyncState {
    /// Alive or Suspect members with their incarnations, the sender included (memberlist's
    /// push-pull): a joiner learns the whole cluster at once, and a member one missed
    /// (gossip is probabilistic) is learned at the next sync. Failures are left to SWIM.
    pub members: Vec<(NodeIdentity, u16)>,
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
