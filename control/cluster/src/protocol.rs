//! What nodes say to managers on 2377 (and CLI clients, through their local agent). Every call
//! is a `ClusterRequest`; a manager that is not the leader forwards it to the leader, naming
//! the original caller, so reads and writes are always served by the leader.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use serde::{Deserialize, Serialize};

use super::{
    ipam::Subnet,
    pki::Role,
    state::{
        Availability, EndpointMode, NodeStatus, ServiceMode, ServiceSpec, TaskReport, TaskState,
        Timestamp,
    },
};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope {
    /// Set by a manager passing the request on to the leader; then `origin` names the caller
    /// (None only for a join, whose caller has no certificate yet).
    #[serde(default)]
    pub forwarded: bool,
    pub origin: Option<String>,
    pub request: ClusterRequest,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClusterRequest {
    Join(JoinRequest),
    Heartbeat {
        reports: Vec<TaskReport>,
        /// The node's CPUs and memory, when it knows them (a change updates the node).
        #[serde(default)]
        resources: Option<shoal_dataplane::limits::Resources>,
        /// The `version` of the last answer the node got: while the answer would be the
        /// same and there is nothing to record, the manager holds it until it changes (new
        /// assignments reach the node at once) or `HEARTBEAT_INTERVAL` passes.
        #[serde(default)]
        known: Option<u64>,
    },
    /// The calling node is leaving the swarm (`swarm leave`), before it stops its tasks.
    Leave,
    Control(ControlRequest),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ClusterResponse {
    Joined(JoinResponse),
    Heartbeat(HeartbeatResponse),
    Left,
    Control(ControlResponse),
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinRequest {
    pub secret: String,
    pub csr_pem: String,
    pub hostname: String,
    pub addr: IpAddr,
    pub port: u16,
    /// The joining agent's gossip port (agents that predate it use the default).
    #[serde(default = "default_gossip_port")]
    pub gossip_port: u16,
    /// Its metrics listener's port when that listens beyond loopback.
    #[serde(default)]
    pub exposed_metrics_port: Option<u16>,
    /// CPUs and memory it offers reservations.
    #[serde(default)]
    pub resources: shoal_dataplane::limits::Resources,
    /// Its OS and architecture (`node.platform.*` constraints).
    #[serde(default)]
    pub platform: super::state::Platform,
}

fn default_gossip_port() -> u16 {
    super::state::DEFAULT_GOSSIP_PORT
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinResponse {
    pub cluster_id: String,
    pub node_id: String,
    pub raft_id: u64,
    pub role: Role,
    pub cert_pem: String,
    pub ca_pem: String,
    /// Manager endpoints (addr:port), for heartbeats.
    pub managers: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    /// This node's tasks that are not finished as far as the managers know.
    pub assignments: Vec<Assignment>,
    pub managers: Vec<String>,
    /// The node's role in the state: a change starts or stops its manager part.
    pub role: Role,
    /// Node IDs of the managers: the only callers a node serves its task logs to.
    pub manager_ids: Vec<String>,
    /// The gossip keyring (hex AES-256 keys, newest last).
    #[serde(default)]
    pub gossip_keys: Vec<String>,
    /// Manager API endpoints (`IP:PORT`) of every other node: gossip seeds besides the
    /// managers, so a restarted lone manager finds the workers again.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The ingress network and this node's endpoint on it (the routing mesh), once the
    /// orchestrator gave it an address.
    #[serde(default)]
    pub ingress: Option<AssignedNetwork>,
    /// A digest of the rest of this answer, for the next heartbeat's `known`; 0 from a
    /// manager that does not hold heartbeats (the node then paces its heartbeats itself).
    #[serde(default)]
    pub version: u64,
}

/// A manager asks a node for the output of some of its tasks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LogsRequest {
    pub task_ids: Vec<String>,
    /// Last lines per task; all (up to the cap) when unset.
    pub tail: Option<usize>,
    /// Following: complete lines only, from where each task's last read ended (a task not
    /// in it from its tail, or its start).
    #[serde(default)]
    pub after: Option<LogCursor>,
}

/// Where a follower's reads of each task's log ended: task ID -> byte offset.
pub type LogCursor = std::collections::BTreeMap<String, u64>;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskLog {
    pub task_id: String,
    pub lines: Vec<String>,
    /// The offset after the last line returned.
    #[serde(default)]
    pub end: u64,
}

/// Lines of a service's tasks, and where a follower goes on from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ServiceLogs {
    pub lines: Vec<LogLine>,
    pub cursor: LogCursor,
    /// Nodes with tasks of the service whose output could not be read this time.
    #[serde(default)]
    pub unreadable: Vec<UnreadableNode>,
}

/// A node whose tasks' output could not be read, and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UnreadableNode {
    pub node_id: String,
    /// Its hostname.
    pub node: String,
    pub error: String,
}

/// One line of `service logs`, labelled as Docker does: `web.1.<id>@node2`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    pub source: String,
    pub line: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Assignment {
    pub task_id: String,
    pub name: String,
    pub desired: TaskState,
    pub command: Vec<String>,
    pub env: Vec<String>,
    /// The task's networks in interface order, with its address on each.
    #[serde(default)]
    pub networks: Vec<AssignedNetwork>,
    #[serde(default)]
    pub service_id: String,
    #[serde(default)]
    pub service_name: String,
    /// The service's published ports, announced with the task's ingress endpoint.
    #[serde(default)]
    pub ports: Vec<super::state::PortConfig>,
    /// User, capabilities and limits the task starts with.
    #[serde(default)]
    pub containment: super::resources::Containment,
    /// The service's health check, run by the node while the task runs.
    #[serde(default)]
    pub healthcheck: Option<super::health::HealthCheck>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AssignedNetwork {
    pub spec: shoal_dataplane::overlay::NetworkSpec,
    pub address: std::net::Ipv4Addr,
    /// The service's virtual IP on this network (none in `dnsrr` mode).
    #[serde(default)]
    pub vip: Option<std::net::Ipv4Addr>,
}

/// What `service update` / `scale` changes in a service (every field but the replica count
/// rolls the tasks).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServiceChanges {
    pub replicas: Option<u64>,
    #[serde(default)]
    pub env_add: Vec<String>,
    #[serde(default)]
    pub network_add: Vec<String>,
    #[serde(default)]
    pub network_rm: Vec<String>,
    #[serde(default)]
    pub publish_add: Vec<super::state::PortConfig>,
    /// `PUBLISHED` or `PUBLISHED/udp`.
    #[serde(default)]
    pub publish_rm: Vec<String>,
    #[serde(default)]
    pub force: bool,
    /// `--user`, `--cap-*`, `--limit-*`, `--reserve-*`.
    #[serde(default)]
    pub containment: super::resources::ContainmentUpdate,
    /// Constraints, placement preferences, max replicas per node.
    #[serde(default)]
    pub placement: Box<super::state::PlacementUpdate>,
    /// `--restart-*`, `--update-*`, `--rollback-*` (they roll no task).
    #[serde(default)]
    pub policy: Box<crate::update::PolicyUpdate>,
    /// `service rollback` / `service update --rollback`: back to the previous spec.
    #[serde(default)]
    pub rollback: bool,
    /// `--health-*` / `--no-healthcheck`.
    #[serde(default)]
    pub health: Box<super::health::HealthUpdate>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ControlRequest {
    NodeList,
    NodeInspect {
        node: String,
    },
    NodeUpdate {
        node: String,
        availability: Option<Availability>,
        label_add: Vec<String>,
        label_rm: Vec<String>,
        role: Option<Role>,
    },
    NodeRemove {
        node: String,
        force: bool,
    },
    NodeTasks {
        node: String,
    },
    /// Adds a new gossip key now instead of at the next scheduled rotation.
    RotateGossipKey,
    JoinToken {
        role: Role,
        rotate: bool,
    },
    ServiceCreate(Box<ServiceSpec>),
    ServiceList,
    ServiceInspect {
        service: String,
    },
    ServiceTasks {
        service: String,
    },
    /// One task by ID, ID prefix, `web.1.<id>` or `web.1` (its newest task).
    TaskInspect {
        task: String,
    },
    ServiceUpdate {
        service: String,
        #[serde(flatten)]
        changes: Box<ServiceChanges>,
    },
    ServiceRemove {
        service: String,
    },
    ServiceLogs {
        service: String,
        tail: Option<usize>,
        /// Following (`--follow`): where the last answer's cursor ended.
        #[serde(default)]
        after: Option<LogCursor>,
    },
    NetworkCreate(NetworkCreate),
    NetworkList,
    NetworkInspect {
        network: String,
    },
    NetworkRemove {
        network: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetworkCreate {
    pub name: String,
    pub subnet: Option<Subnet>,
    pub gateway: Option<Ipv4Addr>,
    pub attachable: bool,
    pub internal: bool,
    pub mtu: Option<u32>,
}

/// A network as `network ls` / `network inspect` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NetworkView {
    pub id: String,
    pub name: String,
    pub driver: String,
    pub scope: String,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    pub attachable: bool,
    pub internal: bool,
    pub mtu: Option<u32>,
    pub ingress: bool,
    /// Services attached to it.
    pub services: Vec<String>,
    pub created_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlResponse {
    Nodes(Vec<NodeView>),
    Node(NodeView),
    Token(String),
    Services(Vec<ServiceView>),
    Service(ServiceView),
    Tasks(Vec<TaskView>),
    Logs(ServiceLogs),
    Networks(Vec<NetworkView>),
    Network(NetworkView),
    Done,
}

/// A node as `node ls` / `node inspect` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    pub id: String,
    pub hostname: String,
    pub addr: IpAddr,
    pub role: Role,
    pub status: NodeStatus,
    pub availability: Availability,
    /// Leader, Reachable or Unavailable for managers; empty for workers.
    pub manager_status: String,
    pub labels: BTreeMap<String, String>,
    pub created_at: Timestamp,
    /// CPUs and memory it offers reservations, as Swarm's Description.Resources.
    #[serde(default)]
    pub resources: shoal_dataplane::limits::Resources,
    /// OS and architecture, as `node.platform.*` constraints see them (empty: not reported).
    #[serde(default)]
    pub platform: super::state::Platform,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ServiceView {
    pub id: String,
    pub name: String,
    pub mode: ServiceMode,
    pub running: u64,
    pub desired: u64,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub constraints: Vec<String>,
    /// `spread=node.labels.KEY`, in order.
    #[serde(default)]
    pub placement_prefs: Vec<String>,
    /// 0: no limit.
    #[serde(default)]
    pub max_replicas_per_node: u64,
    pub version: u64,
    pub update_parallelism: u64,
    pub update_delay_secs: u64,
    #[serde(default)]
    pub restart_policy: crate::update::RestartPolicy,
    /// `--update-*`, parallelism and delay included.
    #[serde(default)]
    pub update_config: Box<crate::update::UpdateConfig>,
    #[serde(default)]
    pub rollback_config: Box<crate::update::UpdateConfig>,
    /// Where the last rollout stands (absent: never updated).
    #[serde(default)]
    pub update_status: Option<Box<crate::update::UpdateStatus>>,
    /// The version a rollback returns to (absent: nothing to roll back to).
    #[serde(default)]
    pub previous_version: Option<u64>,
    /// Names of the networks its tasks attach to.
    pub networks: Vec<String>,
    pub endpoint_mode: EndpointMode,
    /// `network name`, `virtual IP` pairs.
    pub vips: Vec<(String, std::net::Ipv4Addr)>,
    #[serde(default)]
    pub ports: Vec<super::state::PortConfig>,
    /// User, capabilities, limits and reservations of its tasks.
    #[serde(default)]
    pub containment: Box<super::resources::Containment>,
    #[serde(default)]
    pub healthcheck: Option<Box<super::health::HealthCheck>>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskView {
    pub id: String,
    /// `web.1` (or `web.<node id>` for global services), as in `service ps`.
    pub name: String,
    pub service: String,
    pub slot: u64,
    /// The service spec version this task runs.
    pub service_version: u64,
    pub node_id: Option<String>,
    pub node: String,
    pub desired: TaskState,
    pub state: TaskState,
    pub state_since: Timestamp,
    pub message: String,
    pub error: String,
    pub created_at: Timestamp,
    /// `network name`, `address` pairs.
    pub addresses: Vec<(String, Ipv4Addr)>,
    /// While it runs, the ports its service publishes in host mode, open on its node
    /// (ingress-mode ports belong to the service: `service ls` shows them).
    #[serde(default)]
    pub host_ports: Vec<super::state::PortConfig>,
    /// Its health while it runs with a health check, with the last probes.
    #[serde(default)]
    pub health: Option<super::health::TaskHealth>,
}
