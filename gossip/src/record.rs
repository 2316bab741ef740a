//! What the endpoint tables hold: one record per task attachment to a network.

use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

/// A task's endpoint on one network. Optional fields default so the record can grow; fields
/// added since the first format ride in a trailer (`message::RecordExtensions`) that older
/// agents never read, so records keep decoding both ways.
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
    /// The task's health when its service checks it (None: it does not). Carried in the
    /// extensions trailer, not in the record's own encoding.
    #[serde(skip)]
    pub health: Option<EndpointHealth>,
}

/// A health-checked task's state, as routing needs it: only healthy tasks take new flows
/// (unless none of their service is, see shoal-cluster's routing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndpointHealth {
    Starting,
    Healthy,
    Unhealthy,
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
