//! Managers' consensus: openraft 0.9 with the log and the state machine in one redb file
//! per manager, and RPCs carried by the cluster's mutual-TLS transport.

// openraft's storage traits return its (large) StorageError by value; our helpers follow them.
#![allow(clippy::result_large_err)]

mod log_store;
mod network;
mod state_machine;
#[cfg(test)]
mod tests;

use std::{io::Cursor, path::Path, sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};

pub use network::{handle_rpc, Transport};
pub use state_machine::StateMachine;

use super::state::Command;

pub type NodeId = u64;

/// A manager as Raft knows it: where to reach it, and which node it is.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub addr: String,
    pub node_id: String,
}

/// The outcome of applying one command: commands can be refused by the state (a duplicate
/// service name, say) after they are ordered, and the proposer needs to know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied(pub Result<(), shoal_api::ApiError>);

// The macro's default snapshot type is written unqualified: `Cursor` must be in scope.
openraft::declare_raft_types!(
    pub TypeConfig:
        D = Command,
        R = Applied,
        NodeId = NodeId,
        Node = Member,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Timeouts for nodes on one LAN: a leader is replaced within about a second.
pub fn raft_config() -> openraft::Config {
    openraft::Config {
        cluster_name: "shoal".to_owned(),
        heartbeat_interval: 100,
        election_timeout_min: 400,
        election_timeout_max: 800,
        ..Default::default()
    }
}

/// Opens (or creates) the manager's redb file and starts its Raft node.
pub async fn start<T: Transport>(
    id: NodeId,
    path: &Path,
    transport: Arc<T>,
) -> anyhow::Result<(Raft, StateMachine)> {
    let db = Arc::new(redb::Database::create(path)?);
    let log_store = log_store::RedbLogStore::new(db.clone())?;
    let sm = StateMachine::new(db)?;
    let config = Arc::new(raft_config().validate()?);
    let raft = Raft::new(
        id,
        config,
        network::NetworkFactory::new(transport),
        log_store,
        sm.clone(),
    )
    .await?;
    Ok((raft, sm))
}

/// Waits (at most `limit`) until this node's Raft has applied a single (not joint)
/// configuration that makes `id` a voter. Applied means committed: from then on the quorum
/// counts `id`, so a swarm of three survives losing any one manager. A learner, or a voter of
/// a joint configuration only, is not enough.
pub async fn wait_until_voter(raft: &Raft, id: NodeId, limit: Duration) -> anyhow::Result<()> {
    raft.wait(Some(limit))
        .metrics(move |m| is_committed_voter(m, id), "a voter")
        .await
        .map(drop)
        .map_err(|err| match err {
            openraft::metrics::WaitError::Timeout(..) => {
                anyhow::anyhow!("Raft member {id} is not a voter after {limit:?}")
            }
            openraft::metrics::WaitError::ShuttingDown => {
                anyhow::anyhow!("Raft member {id} shut down before it became a voter")
            }
        })
}

fn is_committed_voter(metrics: &openraft::RaftMetrics<NodeId, Member>, id: NodeId) -> bool {
    let stored = &metrics.membership_config;
    let membership = stored.membership();
    membership.get_joint_config().len() == 1
        && membership.voter_ids().any(|voter| voter == id)
        && metrics.last_applied >= *stored.log_id()
}
