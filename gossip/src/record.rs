//! What the endpoint tables hold: one record per task attachment to a network.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// A task's endpoint on one network. Optional fields default so the record can grow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    pub task_id: String,
    pub task_name: String,
    pub service_id: String,
    pub service_name: String,
    pub node_id: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The node's data-path (VXLAN) address.
    pub vtep: IpAddr,
    #[serde(default)]
    pub vip: Option<Ipv4Addr>,
    #[serde(default)]
    pub ports: Vec<PublishedPort>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedPort {
    pub protocol: String,
    pub published: u16,
    pub target: u16,
    /// Only this task's node answers (`mode=host`), to its own tasks.
    #[serde(default)]
    pub host_mode: bool,
    /// Backends see the node's ingress address instead of the client's.
    #[serde(default)]
    pub snat: bool,
}
