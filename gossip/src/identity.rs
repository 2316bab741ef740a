//! The identity foca gossips for a node: its id, its gossip address, and a bump that grows
//! on every rejoin so a restarted node (same id, same address) replaces its old self.

use std::net::SocketAddr;

use foca::Identity;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeIdentity {
    pub node_id: String,
    pub addr: SocketAddr,
    /// Starts at the boot time in ms, so a restart always beats the previous run.
    pub bump: u64,
}

impl NodeIdentity {
    /// Stands for a seed whose node id is not known yet: foca accepts announces addressed
    /// to any identity with the receiver's address.
    pub fn seed(addr: SocketAddr) -> NodeIdentity {
        NodeIdentity {
            node_id: String::new(),
            addr,
            bump: 0,
        }
    }
}

impl Identity for NodeIdentity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(NodeIdentity {
            bump: self.bump.checked_add(1)?,
            ..self.clone()
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.bump > adversary.bump
    }
}
