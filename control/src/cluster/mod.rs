//! The cluster: trust, replicated state, membership and orchestration.

pub mod orchestrator;
pub mod pki;
pub mod protocol;
pub mod state;
pub mod transport;
pub mod worker;
