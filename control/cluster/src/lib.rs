//! The cluster as a library: trust, replicated state, membership and orchestration, and the
//! node runtime that joins them to the dataplane. The `shoal` binary runs it (`node::ClusterRuntime`)
//! with a `config::NodeConfig` it resolves from its own settings; requests and answers of the
//! local API come from `shoal-api`.

pub mod config;
pub mod failure;
pub mod health;
pub mod ipam;
pub mod manager;
pub mod networking;
pub mod node;
pub mod orchestrator;
pub mod pki;
pub mod plan;
pub mod protocol;
pub mod raft;
pub mod resources;
pub mod state;
pub mod transport;
pub mod update;
pub mod views;
pub mod worker;
