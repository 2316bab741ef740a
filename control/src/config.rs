//! The agent's configuration: `/etc/shoal/agent.toml`, overridden by flags.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use shoal_cluster::config::NodeConfig;

pub const DEFAULT_CONFIG: &str = "/etc/shoal/agent.toml";
pub const DEFAULT_SOCKET: &str = "/run/shoal/shoal.sock";
/// Loopback only: metrics and health are for the node's own scraper and systemd; Docker's
/// `metrics-addr` examples use the same port.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9323";

/// Settings of `shoal agent`; each is also a key of the config file (same name, snake_case).
#[derive(Args, Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentSettings {
    /// Node name shown in listings [default: the host name]
    #[arg(long)]
    pub hostname: Option<String>,
    /// Directory for the agent's state [default: /var/lib/shoal]
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Unix socket of the local API; on the command line it is the global `--socket`
    #[arg(skip)]
    pub socket: Option<PathBuf>,
    /// Address other nodes reach this one on [default: the advertise interface's first IPv4]
    #[arg(long)]
    pub advertise_addr: Option<IpAddr>,
    /// Interface the ingress programs attach to [default: the one holding the advertise
    /// address, else the default route's]
    #[arg(long)]
    pub advertise_interface: Option<String>,
    /// Manager API port, TCP [default: 2377]
    #[arg(long)]
    pub manager_port: Option<u16>,
    /// Gossip port, TCP and UDP [default: 7946]
    #[arg(long)]
    pub gossip_port: Option<u16>,
    /// VXLAN data-path port, UDP [default: 4789]
    #[arg(long)]
    pub data_path_port: Option<u16>,
    /// Directory on bpffs for pinned programs, links and maps [default: /sys/fs/bpf/shoal]
    #[arg(long)]
    pub bpffs_root: Option<PathBuf>,
    /// cgroup v2 directory for tasks [default: <cgroup2 mount>/shoal]
    #[arg(long)]
    pub cgroup_root: Option<PathBuf>,
    /// Log filter, as RUST_LOG [default: info]
    #[arg(long)]
    pub log_level: Option<String>,
    /// Seconds a node may be down before managers reschedule its tasks [default: 10]
    #[arg(long)]
    pub reschedule_grace: Option<u64>,
    /// Source address of VXLAN traffic, an IPv4 of this host [default: the advertise address]
    #[arg(long)]
    pub data_path_addr: Option<IpAddr>,
    /// Prefix of the network namespaces made for overlay networks [default: shoal-]
    #[arg(long)]
    pub netns_prefix: Option<String>,
    /// Node-local subnet of the gateway bridge that gives tasks a way out [default:
    /// 172.18.0.0/16]
    #[arg(long)]
    pub gateway_subnet: Option<String>,
    /// Maglev slots per published port, a prime; balance stays within 1% up to
    /// slots/100 replicas [default: 4093]
    #[arg(long)]
    pub mesh_table_size: Option<u32>,
    /// Published ports the routing mesh serves at once [default: 256]
    #[arg(long)]
    pub mesh_max_services: Option<u32>,
    /// Resolvers the embedded DNS forwards names outside the cluster to, as IP:PORT;
    /// repeatable [default: the nameservers of /etc/resolv.conf]
    #[arg(long = "dns-upstream")]
    pub dns_upstreams: Option<Vec<SocketAddr>>,
    /// Listen address of the Prometheus metrics and health endpoints (HTTP), or `off`
    /// [default: 127.0.0.1:9323]
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// `auto`: raise the kernel's neighbour table limits (net.ipv4.neigh.default.gc_thresh*)
    /// to what this node's overlays need, never lowering them; `off`: leave them alone
    /// [default: auto]
    #[arg(long)]
    pub neighbour_table: Option<NeighbourTableSizing>,
    /// CPUs this node offers tasks' reservations, a decimal [default: the CPUs it has]
    #[arg(long)]
    pub node_cpus: Option<String>,
    /// Memory this node offers tasks' reservations (16G, 512M) [default: its MemTotal]
    #[arg(long)]
    pub node_memory: Option<String>,
    /// Unix socket of the Docker Engine API (the `docker` CLI's swarm commands), or `off`
    /// [default: docker.sock next to the API socket, /run/shoal/docker.sock]
    #[arg(long)]
    pub docker_socket: Option<String>,
}

/// Whether the agent sizes the kernel's neighbour (ARP) table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NeighbourTableSizing {
    #[default]
    Auto,
    Off,
}

impl AgentSettings {
    /// Reads a config file. `required` is false for the default path, which may be absent.
    pub fn from_file(path: &Path, required: bool) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if !required && err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::default())
            }
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }

    /// Values set in `self` win over `base`.
    pub fn over(self, base: Self) -> Self {
        Self {
            hostname: self.hostname.or(base.hostname),
            state_dir: self.state_dir.or(base.state_dir),
            socket: self.socket.or(base.socket),
            advertise_addr: self.advertise_addr.or(base.advertise_addr),
            advertise_interface: self.advertise_interface.or(base.advertise_interface),
            manager_port: self.manager_port.or(base.manager_port),
            gossip_port: self.gossip_port.or(base.gossip_port),
            data_path_port: self.data_path_port.or(base.data_path_port),
            bpffs_root: self.bpffs_root.or(base.bpffs_root),
            cgroup_root: self.cgroup_root.or(base.cgroup_root),
            log_level: self.log_level.or(base.log_level),
            reschedule_grace: self.reschedule_grace.or(base.reschedule_grace),
            data_path_addr: self.data_path_addr.or(base.data_path_addr),
            netns_prefix: self.netns_prefix.or(base.netns_prefix),
            gateway_subnet: self.gateway_subnet.or(base.gateway_subnet),
            mesh_table_size: self.mesh_table_size.or(base.mesh_table_size),
            mesh_max_services: self.mesh_max_services.or(base.mesh_max_services),
            dns_upstreams: self.dns_upstreams.or(base.dns_upstreams),
            metrics_addr: self.metrics_addr.or(base.metrics_addr),
            neighbour_table: self.neighbour_table.or(base.neighbour_table),
            node_cpus: self.node_cpus.or(base.node_cpus),
            node_memory: self.node_memory.or(base.node_memory),
            docker_socket: self.docker_socket.or(base.docker_socket),
        }
    }
}

/// Every setting decided, defaults and host look-ups applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AgentConfig {
    pub hostname: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub advertise_addr: IpAddr,
    pub advertise_interface: String,
    pub manager_port: u16,
    pub gossip_port: u16,
    pub data_path_port: u16,
    pub bpffs_root: PathBuf,
    pub cgroup_root: PathBuf,
    pub log_level: String,
    pub reschedule_grace: u64,
    pub data_path_addr: std::net::Ipv4Addr,
    pub netns_prefix: String,
    pub gateway_subnet: (std::net::Ipv4Addr, u8),
    pub mesh_table_size: u32,
    pub mesh_max_services: u32,
    /// `None`: the nameservers of /etc/resolv.conf, read when the agent starts.
    pub dns_upstreams: Option<Vec<SocketAddr>>,
    /// None when turned off.
    pub metrics_addr: Option<SocketAddr>,
    pub neighbour_table: NeighbourTableSizing,
    /// CPUs and memory the node reports (for reservations).
    #[serde(default)]
    pub node_resources: shoal_dataplane::limits::Resources,
    /// The Docker Engine API's socket; None when turned off.
    #[serde(default)]
    pub docker_socket: Option<PathBuf>,
}

impl AgentConfig {
    /// Where the embedded DNS forwards names outside the cluster: the configured resolvers, else
    /// the nameservers of /etc/resolv.conf (loopback ones skipped: tasks cannot reach them).
    pub fn dns_resolvers(&self) -> Vec<SocketAddr> {
        shoal_cluster::config::dns_resolvers(self.dns_upstreams.as_deref())
    }

    /// What the cluster takes of this config.
    pub fn node_config(&self) -> NodeConfig {
        NodeConfig {
            hostname: self.hostname.clone(),
            state_dir: self.state_dir.clone(),
            advertise_addr: self.advertise_addr,
            manager_port: self.manager_port,
            advertise_interface: self.advertise_interface.clone(),
            gossip_port: self.gossip_port,
            data_path_port: self.data_path_port,
            data_path_addr: self.data_path_addr,
            bpffs_root: self.bpffs_root.clone(),
            cgroup_root: self.cgroup_root.clone(),
            netns_prefix: self.netns_prefix.clone(),
            gateway_subnet: self.gateway_subnet,
            mesh_limits: self.mesh_limits(),
            dns_upstreams: self.dns_upstreams.clone(),
            exposed_metrics_port: self.exposed_metrics_port(),
            node_resources: self.node_resources,
            hidden_paths: shoal_cluster::resources::agent_paths(
                &self.socket,
                &self.state_dir,
                &self.bpffs_root,
                Path::new(DEFAULT_CONFIG),
            ),
        }
    }

    /// The metrics listener's port when the node network can reach it (not on loopback):
    /// then no service may publish it.
    pub fn exposed_metrics_port(&self) -> Option<u16> {
        self.metrics_addr
            .filter(|addr| !addr.ip().is_loopback())
            .map(|addr| addr.port())
    }

    pub fn mesh_limits(&self) -> shoal_dataplane::mesh::MeshLimits {
        shoal_dataplane::mesh::MeshLimits {
            max_services: self.mesh_max_services,
            table_size: self.mesh_table_size,
        }
    }
}

/// What the host offers to resolve defaults from; a trait so the logic is testable.
pub trait Host {
    fn hostname(&self) -> Result<String>;
    /// (interface, address) pairs of the host.
    fn addresses(&self) -> Result<Vec<(String, IpAddr)>>;
    fn default_route_interface(&self) -> Result<Option<String>>;
    fn cgroup2_mount(&self) -> Result<PathBuf>;
}

impl AgentConfig {
    pub fn resolve(settings: AgentSettings, host: &dyn Host) -> Result<Self> {
        let ports = [
            ("manager", settings.manager_port.unwrap_or(2377)),
            ("gossip", settings.gossip_port.unwrap_or(7946)),
            ("data-path", settings.data_path_port.unwrap_or(4789)),
        ];
        for (i, (name, port)) in ports.iter().enumerate() {
            if *port == 0 {
                bail!("{name} port must not be 0");
            }
            if let Some((other, _)) = ports[..i].iter().find(|(_, p)| p == port) {
                bail!("{name} port {port} is also the {other} port; each needs its own");
            }
        }
        let metrics_addr = match settings.metrics_addr.as_deref() {
            Some("off") => None,
            text => {
                let text = text.unwrap_or(DEFAULT_METRICS_ADDR);
                let addr: SocketAddr = text.parse().with_context(|| {
                    format!("metrics address {text:?} is not IP:PORT (or `off`)")
                })?;
                if let Some((name, _)) = ports.iter().find(|(_, p)| *p == addr.port()) {
                    bail!(
                        "metrics port {} is also the {name} port; each needs its own",
                        addr.port()
                    );
                }
                Some(addr)
            }
        };
        let socket: PathBuf = settings.socket.unwrap_or_else(|| DEFAULT_SOCKET.into());
        let docker_socket = match settings.docker_socket.as_deref() {
            Some("off") => None,
            Some(path) => Some(PathBuf::from(path)),
            None => Some(socket.with_file_name("docker.sock")),
        };
        if docker_socket.as_ref() == Some(&socket) {
            bail!("the Docker API socket must not be the agent's API socket");
        }
        let (advertise_interface, advertise_addr) =
            resolve_advertise(settings.advertise_addr, settings.advertise_interface, host)?;
        Ok(Self {
            hostname: match settings.hostname {
                Some(name) => name,
                None => host.hostname()?,
            },
            state_dir: settings
                .state_dir
                .unwrap_or_else(|| "/var/lib/shoal".into()),
            socket,
            docker_socket,
            advertise_addr,
            advertise_interface,
            manager_port: ports[0].1,
            gossip_port: ports[1].1,
            data_path_port: ports[2].1,
            bpffs_root: settings
                .bpffs_root
                .unwrap_or_else(|| "/sys/fs/bpf/shoal".into()),
            cgroup_root: match settings.cgroup_root {
                Some(dir) => dir,
                None => host.cgroup2_mount()?.join("shoal"),
            },
            log_level: settings.log_level.unwrap_or_else(|| "info".into()),
            reschedule_grace: settings.reschedule_grace.unwrap_or(10),
            data_path_addr: match settings.data_path_addr.unwrap_or(advertise_addr) {
                IpAddr::V4(addr) => addr,
                IpAddr::V6(addr) => {
                    bail!("the data path needs an IPv4 address, not {addr}; pass --data-path-addr")
                }
            },
            netns_prefix: settings.netns_prefix.unwrap_or_else(|| "shoal-".into()),
            gateway_subnet: parse_subnet(
                settings
                    .gateway_subnet
                    .as_deref()
                    .unwrap_or("172.18.0.0/16"),
            )?,
            mesh_table_size: settings
                .mesh_table_size
                .unwrap_or(shoal_common::MESH_DEFAULT_TABLE_SIZE),
            mesh_max_services: settings
                .mesh_max_services
                .unwrap_or(shoal_common::MESH_MAX_SERVICES),
            dns_upstreams: settings.dns_upstreams,
            metrics_addr,
            neighbour_table: settings.neighbour_table.unwrap_or_default(),
            node_resources: shoal_cluster::resources::node_resources(
                settings.node_cpus.as_deref(),
                settings.node_memory.as_deref(),
            )?,
        })
    }
}

/// `A.B.C.D/N` with room for a gateway and tasks (N at most 30), the base address aligned.
fn parse_subnet(text: &str) -> Result<(std::net::Ipv4Addr, u8)> {
    let bad = || format!("gateway subnet {text:?} is not A.B.C.D/N with N from 8 to 30");
    let (addr, prefix) = text.split_once('/').with_context(bad)?;
    let addr: std::net::Ipv4Addr = addr.parse().with_context(bad)?;
    let prefix: u8 = prefix.parse().with_context(bad)?;
    if !(8..=30).contains(&prefix) {
        bail!(bad());
    }
    let mask = u32::MAX << (32 - prefix);
    Ok((std::net::Ipv4Addr::from(u32::from(addr) & mask), prefix))
}

fn resolve_advertise(
    addr: Option<IpAddr>,
    interface: Option<String>,
    host: &dyn Host,
) -> Result<(String, IpAddr)> {
    let addresses = host.addresses()?;
    match (addr, interface) {
        (Some(addr), Some(interface)) => {
            if !addresses.iter().any(|(i, a)| *i == interface && *a == addr) {
                bail!("advertise address {addr} is not on interface {interface}");
            }
            Ok((interface, addr))
        }
        (Some(addr), None) => addresses
            .into_iter()
            .find(|(_, a)| *a == addr)
            .with_context(|| format!("no interface of this host has the advertise address {addr}")),
        (None, interface) => {
            let interface = match interface {
                Some(interface) => interface,
                None => host.default_route_interface()?.context(
                    "cannot choose an advertise address: no default route; pass --advertise-addr",
                )?,
            };
            addresses
                .into_iter()
                .find(|(i, a)| *i == interface && a.is_ipv4())
                .with_context(|| {
                    format!("interface {interface} has no IPv4 address; pass --advertise-addr")
                })
        }
    }
}

/// The real host, through getifaddrs, netlink (the default route) and mountinfo.
pub struct SystemHost;

impl Host for SystemHost {
    fn hostname(&self) -> Result<String> {
        Ok(nix::unistd::gethostname()?.to_string_lossy().into_owned())
    }

    fn addresses(&self) -> Result<Vec<(String, IpAddr)>> {
        let mut out = Vec::new();
        for ifa in nix::ifaddrs::getifaddrs()? {
            let Some(address) = ifa.address else { continue };
            let ip = if let Some(v4) = address.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = address.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            out.push((ifa.interface_name, ip));
        }
        Ok(out)
    }

    fn default_route_interface(&self) -> Result<Option<String>> {
        let mut netlink = shoal_dataplane::netlink::Netlink::open()?;
        let Some(oif) = netlink.default_route()?.and_then(|route| route.oif) else {
            return Ok(None);
        };
        Ok(netlink
            .links()?
            .into_iter()
            .find(|link| link.index == oif)
            .map(|link| link.name))
    }

    fn cgroup2_mount(&self) -> Result<PathBuf> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        cgroup2_from_mountinfo(&mountinfo).context("no cgroup v2 hierarchy is mounted")
    }
}

pub use shoal_dataplane::process::cgroup2_from_mountinfo;

#[cfg(test)]
mod tests {
    use super::*;

    struct FakeHost;

    impl Host for FakeHost {
        fn hostname(&self) -> Result<String> {
            Ok("box".into())
        }
        fn addresses(&self) -> Result<Vec<(String, IpAddr)>> {
            Ok(vec![
                ("lo".into(), "127.0.0.1".parse()?),
                ("eth0".into(), "fe80::1".parse()?),
                ("eth0".into(), "10.1.0.5".parse()?),
                ("eth1".into(), "192.168.77.11".parse()?),
            ])
        }
        fn default_route_interface(&self) -> Result<Option<String>> {
            Ok(Some("eth0".into()))
        }
        fn cgroup2_mount(&self) -> Result<PathBuf> {
            Ok("/sys/fs/cgroup".into())
        }
    }

    fn resolve(toml_text: &str) -> Result<AgentConfig> {
        AgentConfig::resolve(toml::from_str(toml_text)?, &FakeHost)
    }

    #[test]
    fn defaults_follow_the_default_route() {
        let config = resolve("").unwrap();
        assert_eq!(config.hostname, "box");
        assert_eq!(config.advertise_interface, "eth0");
        assert_eq!(config.advertise_addr.to_string(), "10.1.0.5");
        assert_eq!(
            (
                config.manager_port,
                config.gossip_port,
                config.data_path_port
            ),
            (2377, 7946, 4789)
        );
        assert_eq!(config.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(config.cgroup_root, PathBuf::from("/sys/fs/cgroup/shoal"));
        assert_eq!(config.bpffs_root, PathBuf::from("/sys/fs/bpf/shoal"));
        assert_eq!(config.dns_upstreams, None);
    }

    #[test]
    fn dns_upstreams_replace_resolv_conf() {
        let config = resolve(r#"dns_upstreams = ["192.0.2.53:53", "192.0.2.54:5353"]"#).unwrap();
        let expected: Vec<SocketAddr> = vec![
            "192.0.2.53:53".parse().unwrap(),
            "192.0.2.54:5353".parse().unwrap(),
        ];
        assert_eq!(config.dns_resolvers(), expected);
        assert_eq!(config.metrics_addr, Some("127.0.0.1:9323".parse().unwrap()));
    }

    #[test]
    fn metrics_can_move_or_be_turned_off() {
        let config = resolve(r#"metrics_addr = "0.0.0.0:9100""#).unwrap();
        assert_eq!(config.metrics_addr, Some("0.0.0.0:9100".parse().unwrap()));
        assert_eq!(
            resolve(r#"metrics_addr = "off""#).unwrap().metrics_addr,
            None
        );
        let err = resolve(r#"metrics_addr = "9323""#).unwrap_err();
        assert!(err.to_string().contains("is not IP:PORT"), "{err}");
        let err = resolve(r#"metrics_addr = "127.0.0.1:7946""#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "metrics port 7946 is also the gossip port; each needs its own"
        );
    }

    #[test]
    fn neighbour_table_sizing_is_on_unless_turned_off() {
        assert_eq!(
            resolve("").unwrap().neighbour_table,
            NeighbourTableSizing::Auto
        );
        assert_eq!(
            resolve(r#"neighbour_table = "off""#)
                .unwrap()
                .neighbour_table,
            NeighbourTableSizing::Off
        );
        assert!(resolve(r#"neighbour_table = "big""#).is_err());
    }

    #[test]
    fn advertise_address_picks_its_interface() {
        let config = resolve(r#"advertise_addr = "192.168.77.11""#).unwrap();
        assert_eq!(config.advertise_interface, "eth1");
        let config = resolve(r#"advertise_interface = "eth1""#).unwrap();
        assert_eq!(config.advertise_addr.to_string(), "192.168.77.11");
    }

    #[test]
    fn inconsistent_or_unknown_settings_are_refused_clearly() {
        let err = resolve("advertise_addr = \"192.168.77.11\"\nadvertise_interface = \"eth0\"")
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "advertise address 192.168.77.11 is not on interface eth0"
        );
        let err = resolve(r#"advertise_addr = "10.9.9.9""#).unwrap_err();
        assert!(
            err.to_string().contains("no interface of this host"),
            "{err}"
        );
        let err = resolve("gossip_port = 4789").unwrap_err();
        assert_eq!(
            err.to_string(),
            "data-path port 4789 is also the gossip port; each needs its own"
        );
        let err = resolve("advertise_port = 1").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `advertise_port`"),
            "{err}"
        );
        let err = resolve("manager_port = 70000").unwrap_err();
        assert!(err.to_string().contains("manager_port"), "{err}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let file: AgentSettings = toml::from_str("hostname = \"a\"\ngossip_port = 8000").unwrap();
        let flags = AgentSettings {
            hostname: Some("b".into()),
            ..Default::default()
        };
        let merged = flags.over(file);
        assert_eq!(merged.hostname.as_deref(), Some("b"));
        assert_eq!(merged.gossip_port, Some(8000));
    }

    #[test]
    fn missing_default_file_is_fine_but_a_named_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("agent.toml");
        assert_eq!(
            AgentSettings::from_file(&absent, false).unwrap(),
            AgentSettings::default()
        );
        let err = AgentSettings::from_file(&absent, true).unwrap_err();
        assert!(format!("{err:#}").contains("No such file"), "{err:#}");
    }

    #[test]
    fn reads_proc_files() {
        let mountinfo = "24 1 0:21 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
                         30 24 0:26 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_from_mountinfo(mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }
}
