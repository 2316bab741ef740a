//! The cluster: trust, replicated state, membership and orchestration.

pub mod pki;
