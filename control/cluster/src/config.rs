//! What the cluster needs to know of the agent that runs it: its name, paths, ports and
//! addresses. The `shoal` binary resolves these from its config file and flags; the cluster
//! never sees the binary's own configuration.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use shoal_dataplane::mesh::MeshLimits;

#[derive(Clone, Debug, PartialEq)]
pub struct NodeConfig {
    pub hostname: String,
    /// The cluster keeps its membership, Raft log and task files under `<state_dir>/cluster`
    /// and the task runtime's under `state_dir`.
    pub state_dir: PathBuf,
    /// The manager API's address and port when `swarm init`/`join` name none.
    pub advertise_addr: IpAddr,
    pub manager_port: u16,
    /// Where the routing mesh's ingress program attaches.
    pub advertise_interface: String,
    pub gossip_port: u16,
    /// The VXLAN port `swarm init` gives the swarm unless told otherwise.
    pub data_path_port: u16,
    /// The VXLAN source address unless `init`/`join` name one.
    pub data_path_addr: Ipv4Addr,
    pub bpffs_root: PathBuf,
    pub cgroup_root: PathBuf,
    /// Prefix of the network namespaces the node makes (several agents share one host).
    pub netns_prefix: String,
    /// The node-local gateway bridge's subnet (tasks' way out of the cluster).
    pub gateway_subnet: (Ipv4Addr, u8),
    pub mesh_limits: MeshLimits,
    /// Where the embedded DNS forwards names outside the cluster; `None`: the nameservers of
    /// /etc/resolv.conf, read when the node starts its networking.
    pub dns_upstreams: Option<Vec<SocketAddr>>,
    /// The agent's metrics port when the node network reaches it: no service may publish it.
    pub exposed_metrics_port: Option<u16>,
    /// The CPUs and memory the node reports (the host's, or the `node_cpus`/`node_memory`
    /// settings).
    pub node_resources: shoal_dataplane::limits::Resources,
    /// The agent's own paths (`resources::agent_paths`) no task may see.
    pub hidden_paths: Vec<PathBuf>,
}

impl NodeConfig {
    pub fn dns_resolvers(&self) -> Vec<SocketAddr> {
        dns_resolvers(self.dns_upstreams.as_deref())
    }
}

/// The configured resolvers, else the nameservers of /etc/resolv.conf (loopback ones
/// skipped: tasks cannot reach them).
pub fn dns_resolvers(configured: Option<&[SocketAddr]>) -> Vec<SocketAddr> {
    configured.map(<[SocketAddr]>::to_vec).unwrap_or_else(|| {
        let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        shoal_dns::parse_resolv_conf(&text).servers
    })
}
