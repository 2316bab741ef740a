//! The cluster: trust, replicated state, membership and orchestration.

pub mod ipam;
pub mod manager;
pub mod networking;
pub mod node;
pub mod orchestrator;
pub mod pki;
pub mod protocol;
pub mod raft;
pub mod resources;
pub mod state;
pub mod transport;
pub mod worker;
