//! The replicated cluster state and the commands that change it. Raft orders the commands;
//! `ClusterState::apply` is the deterministic state machine every manager runs.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use shoal_api::ApiError;

use super::{
    ipam::Subnet,
    pki::{JoinToken, Role, RootCa},
};

/// Seconds since the Unix epoch, as the leader saw it when it proposed the command.
pub type Timestamp = u64;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ClusterState {
    pub cluster_id: String,
    pub ca: Option<RootCa>,
    pub worker_secret: String,
    pub manager_secret: String,
    pub nodes: BTreeMap<String, Node>,
    pub services: BTreeMap<String, Service>,
    pub tasks: BTreeMap<String, Task>,
    pub networks: BTreeMap<String, Network>,
    pub settings: ClusterSettings,
    /// Raft node ids are small integers; node IDs are strings.
    pub next_raft_id: u64,
    /// AES-256 keys of gossip encryption (hex), newest last, at most `GOSSIP_KEYS`.
    #[serde(default)]
    pub gossip_keys: Vec<String>,
    /// When the newest gossip key was added.
    #[serde(default)]
    pub gossip_key_added_at: Timestamp,
}

/// Gossip keys kept: the one in use, the one before it (still accepted), and the newest,
/// which is only handed out until the next rotation makes it the one in use.
pub const GOSSIP_KEYS: usize = 3;

/// Swarm-wide settings chosen at `swarm init`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClusterSettings {
    /// Where overlay subnets come from unless `--subnet` is given.
    pub default_pool: Subnet,
    /// Prefix length of those subnets.
    pub pool_prefix: u8,
    /// UDP port of the VXLAN data path.
    pub data_path_port: u16,
}

impl Default for ClusterSettings {
    fn default() -> Self {
        Self {
            default_pool: Subnet::new(Ipv4Addr::new(10, 0, 0, 0), 8).expect("valid"),
            pool_prefix: 24,
            data_path_port: 4789,
        }
    }
}

/// The first VXLAN network identifier given to an overlay network.
pub const FIRST_VNI: u32 = 4096;

/// An overlay network: one VXLAN segment with one subnet.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub subnet: Subnet,
    pub gateway: Ipv4Addr,
    pub vni: u32,
    /// Standalone processes (not only services' tasks) may attach.
    pub attachable: bool,
    /// No route out of the swarm.
    pub internal: bool,
    /// None: the underlay MTU minus the VXLAN overhead (50 bytes).
    pub mtu: Option<u32>,
    /// The routing-mesh network made at `swarm init`.
    pub ingress: bool,
    pub created_at: Timestamp,
}

impl Network {
    /// What a node needs to build the network in its kernel.
    pub fn dataplane_spec(&self, data_path_port: u16) -> shoal_dataplane::overlay::NetworkSpec {
        shoal_dataplane::overlay::NetworkSpec {
            id: self.id.clone(),
            name: self.name.clone(),
            vni: self.vni,
            port: data_path_port,
            subnet: (self.subnet.base, self.subnet.prefix),
            mtu: self.mtu,
            internal: self.internal,
            ingress: self.ingress,
        }
    }
}

/// A task's address on one network.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub network_id: String,
    pub address: Ipv4Addr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Availability {
    Active,
    Pause,
    Drain,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    Ready,
    Down,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Node {
    pub id: String,
    pub raft_id: u64,
    pub hostname: String,
    pub addr: IpAddr,
    /// Manager API port of this node (2377 unless configured).
    pub port: u16,
    pub role: Role,
    pub availability: Availability,
    pub status: NodeStatus,
    pub labels: BTreeMap<String, String>,
    pub created_at: Timestamp,
    /// When `status` last changed.
    pub status_since: Timestamp,
    /// The node's own endpoint on the ingress network, where the routing mesh sends flows
    /// from and receives replies; set by the orchestrator (`SetNodeIngress`).
    #[serde(default)]
    pub ingress_address: Option<Ipv4Addr>,
    /// Gossip port of this node, TCP and UDP (7946 unless configured); recorded at join.
    #[serde(default = "default_gossip_port")]
    pub gossip_port: u16,
    /// Port of the agent's metrics listener when it listens beyond loopback (then the node
    /// network can reach it); recorded at join.
    #[serde(default)]
    pub exposed_metrics_port: Option<u16>,
    /// Set when the node said it leaves (`swarm leave`): from then on it is Down and gets no
    /// task, whatever its last heartbeats say.
    #[serde(default)]
    pub left: bool,
    /// CPUs and memory it offers reservations (reported at join and in heartbeats; 0:
    /// unknown, not limited).
    #[serde(default)]
    pub resources: shoal_dataplane::limits::Resources,
    /// Its OS and architecture (reported at join; empty for nodes that joined before).
    #[serde(default)]
    pub platform: Platform,
}

/// Manager API port of a node unless configured (TCP; every node serves it).
pub const DEFAULT_MANAGER_PORT: u16 = 2377;
/// Gossip port of a node unless configured (TCP and UDP).
pub const DEFAULT_GOSSIP_PORT: u16 = 7946;

fn default_gossip_port() -> u16 {
    DEFAULT_GOSSIP_PORT
}

/// A port shoal itself listens on (`ClusterState::reserved_ports`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReservedPort {
    pub protocol: shoal_dataplane::mesh::Protocol,
    pub port: u16,
    /// What listens there, as a refusal names it.
    pub listener: &'static str,
    /// `every node`, or `node NAME` for one node's own setting.
    pub on: String,
}

const MANAGER_LISTENER: &str = "shoal's manager API (joins, heartbeats, Raft)";
const GOSSIP_LISTENER: &str = "shoal's gossip (membership and overlay state)";
const DATA_PATH_LISTENER: &str = "the swarm's VXLAN data path";
const METRICS_LISTENER: &str = "the agent's metrics and health endpoint";

impl Node {
    pub fn endpoint(&self) -> String {
        std::net::SocketAddr::new(self.addr, self.port).to_string()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", tag = "mode")]
pub enum ServiceMode {
    Replicated { replicas: u64 },
    Global,
}

/// What a constraint looks at on a node (Swarm's `node.*` attributes).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConstraintKey {
    /// `node.id`
    NodeId,
    /// `node.hostname`
    Hostname,
    /// `node.role` (`manager` or `worker`)
    Role,
    /// `node.platform.os` (`linux`)
    PlatformOs,
    /// `node.platform.arch` (`x86_64`, `aarch64`)
    PlatformArch,
    /// `node.labels.KEY`: the label's name is `Constraint::label`. The default, as every
    /// constraint was a label one before the other keys came (stored specs lack `key`).
    #[default]
    Label,
}

const CONSTRAINT_KEYS: &str =
    "node.id, node.hostname, node.role, node.platform.os, node.platform.arch or node.labels.KEY";

/// `KEY==VALUE` or `KEY!=VALUE` over a node attribute; several are ANDed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Constraint {
    /// For `node.labels.KEY`, the label's name; empty for the other keys.
    pub label: String,
    pub value: String,
    pub equal: bool,
    #[serde(default)]
    pub key: ConstraintKey,
}

impl Constraint {
    pub fn parse(text: &str) -> Result<Self> {
        let (key, value, equal) = if let Some((k, v)) = text.split_once("==") {
            (k, v, true)
        } else if let Some((k, v)) = text.split_once("!=") {
            (k, v, false)
        } else {
            bail!("--constraint {text:?}: expected KEY==VALUE or KEY!=VALUE, KEY being {CONSTRAINT_KEYS}");
        };
        let (key, value) = (key.trim(), value.trim());
        if value.is_empty() {
            bail!("--constraint {text:?}: no value after the operator");
        }
        if value.contains("==") || value.contains("!=") {
            bail!("--constraint {text:?}: one operator per constraint (== or !=)");
        }
        let mut label = String::new();
        let key = match key.to_ascii_lowercase().as_str() {
            "node.id" => ConstraintKey::NodeId,
            "node.hostname" => ConstraintKey::Hostname,
            "node.role" => {
                if !["manager", "worker"].contains(&value.to_ascii_lowercase().as_str()) {
                    bail!("--constraint {text:?}: node.role is manager or worker");
                }
                ConstraintKey::Role
            }
            "node.platform.os" => ConstraintKey::PlatformOs,
            "node.platform.arch" => ConstraintKey::PlatformArch,
            lower => {
                let Some(name) = lower
                    .starts_with("node.labels.")
                    .then(|| &key["node.labels.".len()..])
                else {
                    bail!("--constraint {text:?}: unknown key {key:?}; expected {CONSTRAINT_KEYS}");
                };
                if name.is_empty() {
                    bail!("--constraint {text:?}: empty label name after node.labels.");
                }
                label = name.to_owned();
                ConstraintKey::Label
            }
        };
        Ok(Self {
            label,
            value: value.to_owned(),
            equal,
            key,
        })
    }

    /// Swarm compares values without regard to case. A node that did not report its
    /// platform (it joined before nodes did) matches no `==` on it.
    pub fn matches(&self, node: &Node) -> bool {
        let role;
        let actual: Option<&str> = match self.key {
            ConstraintKey::NodeId => Some(&node.id),
            ConstraintKey::Hostname => Some(&node.hostname),
            ConstraintKey::Role => {
                role = node.role.to_string();
                Some(&role)
            }
            ConstraintKey::PlatformOs => Some(node.platform.os.as_str()).filter(|s| !s.is_empty()),
            ConstraintKey::PlatformArch => {
                Some(node.platform.arch.as_str()).filter(|s| !s.is_empty())
            }
            ConstraintKey::Label => node.labels.get(&self.label).map(String::as_str),
        };
        actual.is_some_and(|a| a.eq_ignore_ascii_case(&self.value)) == self.equal
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.equal { "==" } else { "!=" };
        match self.key {
            ConstraintKey::NodeId => write!(f, "node.id"),
            ConstraintKey::Hostname => write!(f, "node.hostname"),
            ConstraintKey::Role => write!(f, "node.role"),
            ConstraintKey::PlatformOs => write!(f, "node.platform.os"),
            ConstraintKey::PlatformArch => write!(f, "node.platform.arch"),
            ConstraintKey::Label => write!(f, "node.labels.{}", self.label),
        }?;
        write!(f, "{op}{}", self.value)
    }
}

/// `--placement-pref spread=node.labels.KEY`: tasks spread evenly over the label's values
/// first (nodes without the label make one group of their own).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlacementPref {
    /// The label's name.
    pub spread: String,
}

impl PlacementPref {
    pub fn parse(text: &str) -> Result<Self> {
        let Some((strategy, target)) = text.split_once('=') else {
            bail!("--placement-pref {text:?}: expected spread=node.labels.KEY");
        };
        if !strategy.trim().eq_ignore_ascii_case("spread") {
            bail!(
                "--placement-pref {text:?}: unknown strategy {:?}; only spread=node.labels.KEY is supported",
                strategy.trim()
            );
        }
        let target = target.trim();
        let Some(label) = target
            .to_ascii_lowercase()
            .starts_with("node.labels.")
            .then(|| &target["node.labels.".len()..])
        else {
            bail!("--placement-pref {text:?}: spread over node.labels.KEY only (got {target:?})");
        };
        if label.is_empty() {
            bail!("--placement-pref {text:?}: empty label name after node.labels.");
        }
        Ok(Self {
            spread: label.to_owned(),
        })
    }
}

impl fmt::Display for PlacementPref {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spread=node.labels.{}", self.spread)
    }
}

/// `service update --constraint-add/-rm, --placement-pref-add/-rm, --replicas-max-per-node`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PlacementUpdate {
    #[serde(default)]
    pub constraint_add: Vec<String>,
    /// Removes the constraints written the same way (`node.labels.zone==a`).
    #[serde(default)]
    pub constraint_rm: Vec<String>,
    #[serde(default)]
    pub pref_add: Vec<String>,
    #[serde(default)]
    pub pref_rm: Vec<String>,
    #[serde(default)]
    pub max_replicas_per_node: Option<u64>,
}

impl PlacementUpdate {
    /// Whether every value parses, each error naming its flag.
    pub fn check(&self) -> Result<()> {
        let flagged = |flag: &str, from: &str, e: anyhow::Error| {
            anyhow::anyhow!("{}", format!("{e:#}").replacen(from, flag, 1))
        };
        for (flag, list) in [
            ("--constraint-add", &self.constraint_add),
            ("--constraint-rm", &self.constraint_rm),
        ] {
            for text in list {
                Constraint::parse(text).map_err(|e| flagged(flag, "--constraint", e))?;
            }
        }
        for (flag, list) in [
            ("--placement-pref-add", &self.pref_add),
            ("--placement-pref-rm", &self.pref_rm),
        ] {
            for text in list {
                PlacementPref::parse(text).map_err(|e| flagged(flag, "--placement-pref", e))?;
            }
        }
        Ok(())
    }

    /// Applies the changes to `spec`; true when its placement changed (the tasks roll, as
    /// Swarm re-places them on such an update).
    pub fn apply(&self, spec: &mut ServiceSpec) -> Result<bool> {
        self.check()?;
        let before = (
            spec.constraints.clone(),
            spec.placement_prefs.clone(),
            spec.max_replicas_per_node,
        );
        edit_list(
            &mut spec.constraints,
            (&self.constraint_add, &self.constraint_rm),
            Constraint::parse,
            ("--constraint-rm", &spec.name, "constraint"),
        )?;
        edit_list(
            &mut spec.placement_prefs,
            (&self.pref_add, &self.pref_rm),
            PlacementPref::parse,
            ("--placement-pref-rm", &spec.name, "preference"),
        )?;
        if let Some(max) = self.max_replicas_per_node {
            spec.max_replicas_per_node = max;
        }
        Ok(before
            != (
                spec.constraints.clone(),
                spec.placement_prefs.clone(),
                spec.max_replicas_per_node,
            ))
    }
}

/// Removes the parsed `rm` entries from `list` (each must be there: `what` names the flag, the
/// service and the kind of entry for the error), then appends the `add` ones not there yet.
fn edit_list<T: PartialEq>(
    list: &mut Vec<T>,
    (add, rm): (&[String], &[String]),
    parse: impl Fn(&str) -> Result<T>,
    (flag, service, kind): (&str, &str, &str),
) -> Result<()> {
    for text in rm {
        let gone = parse(text)?;
        if !list.contains(&gone) {
            bail!("{flag} {text:?}: service {service} has no such {kind}");
        }
        list.retain(|entry| *entry != gone);
    }
    for text in add {
        let entry = parse(text)?;
        if !list.contains(&entry) {
            list.push(entry);
        }
    }
    Ok(())
}

/// A node's operating system and architecture, as Docker names them (`linux`, `x86_64`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
}

impl Platform {
    /// This machine's.
    pub fn local() -> Self {
        Self {
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(flatten)]
    pub mode: ServiceMode,
    pub command: Vec<String>,
    pub env: Vec<String>,
    pub constraints: Vec<Constraint>,
    pub update_parallelism: u64,
    pub update_delay_secs: u64,
    /// Overlay networks (IDs) each task is attached to, in interface order.
    #[serde(default)]
    pub networks: Vec<String>,
    /// How the service's name resolves: one virtual IP per network, or every task's IP.
    #[serde(default)]
    pub endpoint_mode: EndpointMode,
    /// Published ports (`--publish`).
    #[serde(default)]
    pub ports: Vec<PortConfig>,
    /// User, capabilities, limits and reservations of its tasks.
    #[serde(default)]
    pub containment: super::resources::Containment,
    /// `--placement-pref spread=node.labels.KEY`, applied in order.
    #[serde(default)]
    pub placement_prefs: Vec<PlacementPref>,
    /// `--replicas-max-per-node`: at most this many of its tasks on one node (0: no limit).
    #[serde(default)]
    pub max_replicas_per_node: u64,
    /// `--restart-*`: what happens when a task ends.
    #[serde(default)]
    pub restart: crate::update::RestartPolicy,
    /// `--update-*` besides parallelism and delay (`update_config` has all of it).
    #[serde(default)]
    pub update_control: crate::update::UpdateControl,
    /// `--rollback-*`.
    #[serde(default)]
    pub rollback_config: crate::update::UpdateConfig,
    /// `--health-*`: probed on each task's node; routing waits for and follows it. Boxed:
    /// a spec travels in requests whose size clippy weighs.
    #[serde(default)]
    pub healthcheck: Option<Box<super::health::HealthCheck>>,
}

/// A published port, as `--publish published=P,target=T,protocol=tcp|udp,mode=ingress|host,
/// source=client|snat` or `P:T[/udp]` says.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PortConfig {
    pub protocol: shoal_dataplane::mesh::Protocol,
    pub published: u16,
    pub target: u16,
    pub mode: PublishMode,
    /// The source address backends see: the client's (default) or the node's (SNAT).
    pub source: SourceMode,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishMode {
    /// Open on every node, balanced over every task (the routing mesh).
    #[default]
    Ingress,
    /// Open only on nodes running a task, to their own tasks.
    Host,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceMode {
    #[default]
    Client,
    Snat,
}

impl PortConfig {
    pub fn parse(text: &str) -> Result<Self> {
        let mut port = PortConfig {
            protocol: shoal_dataplane::mesh::Protocol::Tcp,
            published: 0,
            target: 0,
            mode: PublishMode::Ingress,
            source: SourceMode::Client,
        };
        let number = |field: &str, value: &str| -> Result<u16> {
            match value.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => bail!("--publish {text:?}: {field} {value:?} is not a port (1-65535)"),
            }
        };
        if text.contains('=') {
            for part in text.split(',') {
                let Some((key, value)) = part.split_once('=') else {
                    bail!("--publish {text:?}: {part:?} is not KEY=VALUE");
                };
                match key.trim() {
                    "published" => port.published = number("published", value)?,
                    "target" => port.target = number("target", value)?,
                    "protocol" => port.protocol = value.parse()?,
                    "mode" => {
                        port.mode = match value {
                            "ingress" => PublishMode::Ingress,
                            "host" => PublishMode::Host,
                            _ => bail!("--publish {text:?}: mode is ingress or host"),
                        }
                    }
                    "source" => {
                        port.source = match value {
                            "client" => SourceMode::Client,
                            "snat" => SourceMode::Snat,
                            _ => bail!("--publish {text:?}: source is client or snat"),
                        }
                    }
                    other => bail!(
                        "--publish {text:?}: unknown field {other:?} (published, target, protocol, mode, source)"
                    ),
                }
            }
        } else {
            let (ports, protocol) = match text.split_once('/') {
                Some((ports, protocol)) => (ports, protocol.parse()?),
                None => (text, shoal_dataplane::mesh::Protocol::Tcp),
            };
            port.protocol = protocol;
            let Some((published, target)) = ports.split_once(':') else {
                bail!("--publish {text:?}: expected PUBLISHED:TARGET[/udp] (e.g. 8080:80) or published=P,target=T,...");
            };
            port.published = number("published", published)?;
            port.target = number("target", target)?;
        }
        if port.published == 0 || port.target == 0 {
            bail!("--publish {text:?}: both published and target ports are needed");
        }
        Ok(port)
    }
}

impl fmt::Display for PortConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.published,
            self.target,
            self.protocol.name()
        )?;
        if self.mode == PublishMode::Host {
            write!(f, ",host")?;
        }
        if self.source == SourceMode::Snat {
            write!(f, ",snat")?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EndpointMode {
    /// A virtual IP per network, balanced over the running tasks in eBPF.
    #[default]
    Vip,
    /// DNS round robin: no virtual IP.
    Dnsrr,
}

impl ServiceSpec {
    /// A spec with Swarm's defaults for everything but its name, mode and command.
    pub fn new(name: &str, mode: ServiceMode, command: Vec<String>) -> Self {
        Self {
            name: name.into(),
            mode,
            command,
            env: vec![],
            constraints: vec![],
            update_parallelism: 1,
            update_delay_secs: 0,
            networks: vec![],
            endpoint_mode: EndpointMode::Vip,
            ports: vec![],
            containment: Default::default(),
            placement_prefs: vec![],
            max_replicas_per_node: 0,
            restart: Default::default(),
            update_control: Default::default(),
            rollback_config: Default::default(),
            healthcheck: None,
        }
    }

    /// `--update-*` as one config.
    pub fn update_config(&self) -> crate::update::UpdateConfig {
        crate::update::UpdateConfig {
            parallelism: self.update_parallelism,
            delay_secs: self.update_delay_secs,
            control: self.update_control.clone(),
        }
    }

    pub fn set_update_config(&mut self, config: crate::update::UpdateConfig) {
        self.update_parallelism = config.parallelism;
        self.update_delay_secs = config.delay_secs;
        self.update_control = config.control;
    }

    pub fn validate(&self) -> Result<()> {
        crate::update::validate(self)?;
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 63
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && self.name.as_bytes()[0].is_ascii_alphanumeric();
        if !name_ok {
            bail!(
                "invalid service name {:?}: 1-63 characters of letters, digits, - and _, starting with a letter or digit",
                self.name
            );
        }
        if self.command.is_empty() || self.command[0].is_empty() {
            bail!(
                "service {}: a command to run is required (after --)",
                self.name
            );
        }
        if let Some(check) = &self.healthcheck {
            check.validate(self.ports.first().map(|p| p.target))?;
        }
        if let ServiceMode::Replicated { replicas } = self.mode {
            if replicas > 10_000 {
                bail!("service {}: at most 10000 replicas", self.name);
            }
        }
        for (i, port) in self.ports.iter().enumerate() {
            if self.ports[..i]
                .iter()
                .any(|p| p.protocol == port.protocol && p.published == port.published)
            {
                bail!(
                    "service {}: port {}/{} is published twice",
                    self.name,
                    port.published,
                    port.protocol.name()
                );
            }
        }
        for env in &self.env {
            if !env.contains('=') || env.starts_with('=') {
                bail!(
                    "service {}: environment entry {env:?} is not KEY=VALUE",
                    self.name
                );
            }
        }
        for c in &self.constraints {
            let bad = match c.key {
                ConstraintKey::Label => c.label.is_empty(),
                ConstraintKey::Role => !["manager", "worker"]
                    .iter()
                    .any(|r| r.eq_ignore_ascii_case(&c.value)),
                _ => false,
            } || c.value.is_empty();
            if bad {
                bail!("service {}: --constraint {c} is not valid", self.name);
            }
        }
        if self.max_replicas_per_node > 0 && self.mode == ServiceMode::Global {
            bail!(
                "service {}: --replicas-max-per-node applies to replicated services only",
                self.name
            );
        }
        for pref in &self.placement_prefs {
            if pref.spread.is_empty() {
                bail!(
                    "service {}: --placement-pref needs a label name (spread=node.labels.KEY)",
                    self.name
                );
            }
        }
        self.containment
            .validate()
            .map_err(|err| anyhow::anyhow!("service {}: {err:#}", self.name))?;
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Service {
    pub id: String,
    pub spec: ServiceSpec,
    /// Bumped by every spec change; tasks remember the version they run.
    pub version: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Virtual IPs, one per network in `vip` mode; set only by the orchestrator
    /// (`SetServiceVips`), so a spec update never changes them.
    #[serde(default)]
    pub vips: Vec<Attachment>,
    /// The spec before the last update, and the version its tasks run: what a rollback
    /// returns to (`update::roll_back`).
    #[serde(default)]
    pub previous_spec: Option<Box<ServiceSpec>>,
    #[serde(default)]
    pub previous_version: u64,
    /// Where the last rollout stands (None: never updated).
    #[serde(default)]
    pub update_status: Option<crate::update::UpdateStatus>,
}

/// Swarm's task states, in the only order a task may move through them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    New,
    Pending,
    Assigned,
    Accepted,
    Preparing,
    Starting,
    Running,
    Complete,
    Shutdown,
    Failed,
    Rejected,
    Remove,
    Orphaned,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        self >= TaskState::Complete
    }

    pub fn label(self) -> &'static str {
        match self {
            TaskState::New => "New",
            TaskState::Pending => "Pending",
            TaskState::Assigned => "Assigned",
            TaskState::Accepted => "Accepted",
            TaskState::Preparing => "Preparing",
            TaskState::Starting => "Starting",
            TaskState::Running => "Running",
            TaskState::Complete => "Complete",
            TaskState::Shutdown => "Shutdown",
            TaskState::Failed => "Failed",
            TaskState::Rejected => "Rejected",
            TaskState::Remove => "Remove",
            TaskState::Orphaned => "Orphaned",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Task {
    pub id: String,
    pub service_id: String,
    /// Replica number (1-based) of replicated services; 0 for global ones.
    pub slot: u64,
    pub node_id: Option<String>,
    pub service_version: u64,
    pub desired: TaskState,
    pub state: TaskState,
    pub message: String,
    pub error: String,
    pub created_at: Timestamp,
    /// When `state` last changed.
    pub state_since: Timestamp,
    /// One address per network of the service, allocated with the task.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// While it runs with a health check: its health as its node last reported a change.
    #[serde(default)]
    pub health: Option<super::health::TaskHealth>,
}

impl Task {
    /// Running, and healthy if its service checks health: ready to take its share of traffic
    /// (the new task a start-first update waits for).
    pub fn is_ready(&self) -> bool {
        self.state == TaskState::Running
            && self
                .health
                .as_ref()
                .is_none_or(|h| h.status == super::health::HealthStatus::Healthy)
    }
}

impl Task {
    /// It stopped by itself (exit, or it could not start), not because it was told to or
    /// its node was lost: what the restart policy and the update monitor judge.
    pub fn ended_on_its_own(&self) -> bool {
        matches!(
            self.state,
            TaskState::Complete | TaskState::Failed | TaskState::Rejected
        )
    }
}

/// A worker's report on one of its tasks.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TaskReport {
    pub task_id: String,
    pub state: TaskState,
    pub error: String,
    /// Its health, when its service checks it.
    #[serde(default)]
    pub health: Option<super::health::TaskHealth>,
}

impl TaskReport {
    /// Whether the report changes what the managers know of `task`: its state moves forward,
    /// or its health moved while it runs.
    pub fn moves(&self, task: &Task) -> bool {
        self.state > task.state
            || (self.state == TaskState::Running
                && task.state == TaskState::Running
                && self
                    .health
                    .as_ref()
                    .is_some_and(|h| h.moved_from(task.health.as_ref())))
    }
}

/// Everything that changes the replicated state.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub enum Command {
    /// The first entry of a new cluster.
    Init {
        cluster_id: String,
        ca: RootCa,
        worker_secret: String,
        manager_secret: String,
        first: Node,
        settings: ClusterSettings,
        ingress: Network,
    },
    /// A joining node; its Raft ID is assigned when the command is applied.
    AddNode(Node),
    UpdateNode(Node),
    /// Liveness, as the leader sees it; only these two fields, so a concurrent update of the
    /// node's spec (role, availability, labels) is never undone.
    SetNodeStatus {
        id: String,
        status: NodeStatus,
        since: Timestamp,
    },
    RemoveNode {
        id: String,
    },
    /// The node is leaving the swarm (`NodeStatus::Down` and `Node::left` from `at` on).
    NodeLeaving {
        id: String,
        at: Timestamp,
    },
    RotateToken {
        role: Role,
        secret: String,
    },
    /// A new gossip key; the oldest beyond `GOSSIP_KEYS` is dropped.
    AddGossipKey {
        key: String,
        at: Timestamp,
    },
    PutService(Service),
    SetServiceVips {
        id: String,
        vips: Vec<Attachment>,
    },
    /// A node's address on the ingress network (None: given back).
    SetNodeIngress {
        id: String,
        address: Option<Ipv4Addr>,
    },
    RemoveService {
        id: String,
    },
    PutNetwork(Network),
    RemoveNetwork {
        id: String,
    },
    /// The orchestrator's decisions: new tasks, placements, desired-state changes.
    PutTasks(Vec<Task>),
    /// Workers' observations; a report never moves a task backwards.
    ReportTasks {
        node_id: String,
        reports: Vec<TaskReport>,
        at: Timestamp,
    },
    /// Drops tasks (oldest history beyond the retention limit, or of removed services).
    DeleteTasks(Vec<String>),
    /// The orchestrator moves a rollout on (and rolls the service back when it failed), if
    /// the service is still at `version`: a `service update` in between wins.
    SetUpdateStatus {
        id: String,
        version: u64,
        status: crate::update::UpdateStatus,
        roll_back: bool,
    },
    /// The first entry of a cluster rebuilt by `swarm init --force-new-cluster`: the state
    /// a surviving manager had.
    Restore(Box<ClusterState>),
}

impl ClusterState {
    /// The routing mesh's network, made at `swarm init`.
    pub fn ingress_network(&self) -> Option<&Network> {
        self.networks.values().find(|n| n.ingress)
    }

    /// The networks a service's tasks attach to, in interface order: its own, then the
    /// ingress network when it publishes a port.
    pub fn task_networks(&self, spec: &ServiceSpec) -> Vec<String> {
        let mut networks = spec.networks.clone();
        if !spec.ports.is_empty() {
            if let Some(ingress) = self.ingress_network() {
                networks.push(ingress.id.clone());
            }
        }
        networks
    }

    /// Every port shoal listens on from the node network, which no service may publish:
    /// the mesh would hand the cluster's own traffic to its tasks. The defaults and the
    /// swarm's data-path port are reserved on every node, and each node's own manager,
    /// gossip and (when not on loopback) metrics ports besides.
    pub fn reserved_ports(&self) -> Vec<ReservedPort> {
        use shoal_dataplane::mesh::Protocol::{Tcp, Udp};
        let mut reserved = Vec::new();
        let mut reserve = |protocol, port, listener, on: &str| {
            if !reserved
                .iter()
                .any(|r: &ReservedPort| r.protocol == protocol && r.port == port)
            {
                reserved.push(ReservedPort {
                    protocol,
                    port,
                    listener,
                    on: on.to_owned(),
                });
            }
        };
        let every = "every node";
        reserve(Tcp, DEFAULT_MANAGER_PORT, MANAGER_LISTENER, every);
        reserve(Tcp, DEFAULT_GOSSIP_PORT, GOSSIP_LISTENER, every);
        reserve(Udp, DEFAULT_GOSSIP_PORT, GOSSIP_LISTENER, every);
        reserve(Udp, self.settings.data_path_port, DATA_PATH_LISTENER, every);
        for node in self.nodes.values() {
            let on = format!("node {}", node.hostname);
            reserve(Tcp, node.port, MANAGER_LISTENER, &on);
            reserve(Tcp, node.gossip_port, GOSSIP_LISTENER, &on);
            reserve(Udp, node.gossip_port, GOSSIP_LISTENER, &on);
            if let Some(port) = node.exposed_metrics_port {
                reserve(Tcp, port, METRICS_LISTENER, &on);
            }
        }
        reserved
    }

    /// Refuses a service publishing a reserved port, or one another service publishes:
    /// every node answers on a published port, so it has one owner in the whole swarm.
    /// `apply` decides (in log order); the manager also asks up front for a quick answer.
    pub fn check_published_ports(&self, service: &Service) -> Result<()> {
        let reserved = self.reserved_ports();
        for port in &service.spec.ports {
            let (number, protocol) = (port.published, port.protocol.name());
            if let Some(taken) = reserved
                .iter()
                .find(|r| r.port == number && r.protocol == port.protocol)
            {
                bail!(ApiError::conflict(format!(
                    "port {number}/{protocol} is reserved: {} listens there on {}; \
                     publish another port",
                    taken.listener, taken.on
                )));
            }
            let holder = self.services.values().find(|s| {
                s.id != service.id
                    && s.spec
                        .ports
                        .iter()
                        .any(|p| p.published == number && p.protocol == port.protocol)
            });
            if let Some(holder) = holder {
                bail!(ApiError::conflict(format!(
                    "port {number}/{protocol} is already published by service {0}: choose \
                     another, or free it with `shoal service update --publish-rm \
                     {number}/{protocol} {0}`",
                    holder.spec.name,
                )));
            }
        }
        Ok(())
    }

    /// Refuses an overlay subnet holding a node's address: the network's tasks would look
    /// for that node on the overlay.
    pub fn check_clear_of_nodes(&self, subnet: Subnet) -> Result<()> {
        for node in self.nodes.values() {
            if let IpAddr::V4(addr) = node.addr {
                if subnet.contains(addr) {
                    bail!(ApiError::conflict(format!(
                        "subnet {subnet} holds the address {addr} of node {}: the network's \
                         tasks could not reach that node; choose another --subnet, or leave it \
                         out",
                        node.hostname
                    )));
                }
            }
        }
        Ok(())
    }

    pub fn apply(&mut self, command: Command) -> Result<()> {
        match command {
            Command::Init {
                cluster_id,
                ca,
                worker_secret,
                manager_secret,
                first,
                settings,
                ingress,
            } => {
                if !self.cluster_id.is_empty() {
                    bail!(ApiError::conflict("cluster already initialized"));
                }
                self.settings = settings;
                self.networks.insert(ingress.id.clone(), ingress);
                self.cluster_id = cluster_id;
                self.ca = Some(ca);
                self.worker_secret = worker_secret;
                self.manager_secret = manager_secret;
                self.next_raft_id = first.raft_id + 1;
                self.nodes.insert(first.id.clone(), first);
            }
            Command::Restore(state) => {
                if !self.cluster_id.is_empty() {
                    bail!(ApiError::conflict("cluster already initialized"));
                }
                *self = *state;
            }
            Command::AddNode(mut node) => {
                if self.nodes.contains_key(&node.id) {
                    bail!(ApiError::conflict(format!(
                        "node {} already exists",
                        node.id
                    )));
                }
                // Assigned here, in log order, so concurrent joins never share an ID.
                node.raft_id = self.next_raft_id;
                self.next_raft_id += 1;
                self.nodes.insert(node.id.clone(), node);
            }
            Command::SetNodeStatus { id, status, since } => {
                let node = self
                    .nodes
                    .get_mut(&id)
                    .ok_or_else(|| ApiError::not_found(format!("node {id} not found")))?;
                node.status = status;
                node.status_since = since;
            }
            Command::UpdateNode(node) => {
                if !self.nodes.contains_key(&node.id) {
                    bail!(ApiError::not_found(format!("node {} not found", node.id)));
                }
                self.nodes.insert(node.id.clone(), node);
            }
            Command::RemoveNode { id } => {
                self.nodes.remove(&id);
            }
            Command::NodeLeaving { id, at } => {
                let node = self
                    .nodes
                    .get_mut(&id)
                    .ok_or_else(|| ApiError::not_found(format!("node {id} not found")))?;
                node.left = true;
                if node.status != NodeStatus::Down {
                    node.status = NodeStatus::Down;
                    node.status_since = at;
                }
            }
            Command::AddGossipKey { key, at } => {
                self.gossip_keys.push(key);
                let extra = self.gossip_keys.len().saturating_sub(GOSSIP_KEYS);
                self.gossip_keys.drain(..extra);
                self.gossip_key_added_at = at;
            }
            Command::RotateToken { role, secret } => match role {
                Role::Worker => self.worker_secret = secret,
                Role::Manager => self.manager_secret = secret,
            },
            Command::PutService(service) => self.put_service(service)?,
            Command::SetNodeIngress { id, address } => {
                if let Some(node) = self.nodes.get_mut(&id) {
                    node.ingress_address = address;
                }
            }
            Command::SetServiceVips { id, vips } => {
                if let Some(service) = self.services.get_mut(&id) {
                    service.vips = vips;
                }
            }
            Command::RemoveService { id } => {
                self.services.remove(&id);
            }
            Command::SetUpdateStatus {
                id,
                version,
                status,
                roll_back,
            } => {
                if let Some(service) = self.services.get_mut(&id) {
                    if service.version == version {
                        if roll_back {
                            crate::update::roll_back(service)?;
                        }
                        service.update_status = Some(status);
                    }
                }
            }
            Command::PutNetwork(network) => self.put_network(network)?,
            Command::RemoveNetwork { id } => self.remove_network(&id)?,
            Command::PutTasks(tasks) => self.put_tasks(tasks),
            Command::ReportTasks {
                node_id,
                reports,
                at,
            } => self.report_tasks(&node_id, reports, at),
            Command::DeleteTasks(ids) => {
                for id in ids {
                    self.tasks.remove(&id);
                }
            }
        }
        Ok(())
    }

    /// A new or changed service: its name unique, its ports free, its VIPs kept.
    fn put_service(&mut self, service: Service) -> Result<()> {
        if let Some(other) = self
            .services
            .values()
            .find(|s| s.spec.name == service.spec.name && s.id != service.id)
        {
            bail!(ApiError::conflict(format!(
                "a service named {0} already exists ({1}): choose another --name, or \
                 change it with `shoal service update {0}`",
                service.spec.name, other.id
            )));
        }
        self.check_published_ports(&service)?;
        let mut service = service;
        if let Some(existing) = self.services.get(&service.id) {
            service.vips = existing.vips.clone();
        }
        self.services.insert(service.id.clone(), service);

        Ok(())
    }

    /// A new network: its name, VNI and subnet its own, clear of the nodes' addresses.
    fn put_network(&mut self, network: Network) -> Result<()> {
        self.check_clear_of_nodes(network.subnet)?;
        for other in self.networks.values().filter(|n| n.id != network.id) {
            if other.name == network.name {
                bail!(ApiError::conflict(format!(
                    "a network named {0} already exists: choose another name, or use it \
                     (`shoal network inspect {0}`)",
                    network.name
                )));
            }
            if other.vni == network.vni {
                bail!(ApiError::conflict(format!(
                    "VNI {} is already used by network {}",
                    network.vni, other.name
                )));
            }
            if other.subnet.overlaps(network.subnet) {
                bail!(ApiError::conflict(format!(
                    "subnet {} overlaps {} of network {}: choose another --subnet \
                     (`shoal network ls` shows those in use), or leave it out",
                    network.subnet, other.subnet, other.name
                )));
            }
        }
        self.networks.insert(network.id.clone(), network);

        Ok(())
    }

    /// A network no service uses, never the ingress network.
    fn remove_network(&mut self, id: &str) -> Result<()> {
        // Made by `swarm init` and used by every published port, named or not.
        if self.networks.get(id).is_some_and(|n| n.ingress) {
            bail!(ApiError::invalid(
                "the ingress network carries the routing mesh and cannot be removed; \
                 to stop publishing a port: `shoal service update --publish-rm PORT SERVICE`"
            ));
        }
        if let Some(service) = self
            .services
            .values()
            .find(|s| s.spec.networks.iter().any(|n| n == id))
        {
            let network = self.networks.get(id).map_or(id, |n| &n.name);
            bail!(ApiError::conflict(format!(
                "network {network} is in use by service {0}: remove the service \
                 (`shoal service rm {0}`) or detach it (`shoal service update \
                 --network-rm {network} {0}`) first",
                service.spec.name
            )));
        }
        self.networks.remove(id);

        Ok(())
    }

    /// The orchestrator's tasks, their states never moved back.
    fn put_tasks(&mut self, tasks: Vec<Task>) {
        for mut task in tasks {
            // The orchestrator's copy may predate a worker's report: states only move
            // forward, so the further one wins.
            if let Some(current) = self.tasks.get(&task.id) {
                if current.state > task.state {
                    task.state = current.state;
                    task.state_since = current.state_since;
                    task.error = current.error.clone();
                }
            }
            self.tasks.insert(task.id.clone(), task);
        }
    }

    /// What a node says of its tasks: only of its own, only forward.
    fn report_tasks(&mut self, node_id: &str, reports: Vec<TaskReport>, at: Timestamp) {
        for report in reports {
            let Some(task) = self.tasks.get_mut(&report.task_id) else {
                continue;
            };
            // Only the node a task was given to reports on it, and only forward.
            if task.node_id.as_deref() != Some(node_id) || !report.moves(task) {
                continue;
            }
            if report.health.is_some() {
                task.health = report.health;
            }
            if report.state == task.state {
                continue;
            }
            task.state = report.state;
            task.state_since = at;
            if !report.error.is_empty() {
                task.error = report.error;
            }
        }
    }

    pub fn token(&self, role: Role) -> Result<JoinToken> {
        let ca = self
            .ca
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("cluster has no CA"))?;
        Ok(JoinToken {
            ca_digest: ca.digest()?,
            secret: match role {
                Role::Worker => self.worker_secret.clone(),
                Role::Manager => self.manager_secret.clone(),
            },
        })
    }

    /// A node by ID, ID prefix or hostname, as Docker resolves them.
    pub fn find_node(&self, key: &str) -> Result<&Node> {
        if let Some(node) = self.nodes.get(key) {
            return Ok(node);
        }
        let matches = self
            .nodes
            .values()
            .filter(|n| n.hostname == key || n.id.starts_with(key));
        the_one("node", key, matches.collect())
    }

    /// A service by ID, ID prefix or name.
    pub fn find_service(&self, key: &str) -> Result<&Service> {
        if let Some(service) = self.services.values().find(|s| s.spec.name == key) {
            return Ok(service);
        }
        let matches = self.services.values().filter(|s| s.id.starts_with(key));
        the_one("service", key, matches.collect())
    }

    /// A network by ID, ID prefix or name.
    pub fn find_network(&self, key: &str) -> Result<&Network> {
        if let Some(network) = self.networks.values().find(|n| n.name == key) {
            return Ok(network);
        }
        let matches = self.networks.values().filter(|n| n.id.starts_with(key));
        the_one("network", key, matches.collect())
    }

    /// The lowest VNI no network uses.
    pub fn free_vni(&self) -> u32 {
        (FIRST_VNI..)
            .find(|vni| !self.networks.values().any(|n| n.vni == *vni))
            .expect("VNIs are plenty")
    }

    pub fn managers(&self) -> impl Iterator<Item = &Node> {
        self.nodes.values().filter(|n| n.role == Role::Manager)
    }
}

/// The one `what` (node, service, network) that `key` matched, or why not.
fn the_one<'a, T>(what: &str, key: &str, matches: Vec<&'a T>) -> Result<&'a T> {
    match matches.as_slice() {
        [one] => Ok(one),
        [] => bail!(ApiError::not_found(format!(
            "{what} {key} not found: `shoal {what} ls` lists them (by name, ID or ID prefix)"
        ))),
        _ => bail!(ApiError::invalid(format!(
            "{what} {key} is ambiguous ({} matches): give its name or more of its ID",
            matches.len()
        ))),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn node(id: &str, raft_id: u64, role: Role) -> Node {
        Node {
            id: id.into(),
            raft_id,
            hostname: id.into(),
            addr: "10.0.0.1".parse().unwrap(),
            port: 2377,
            role,
            availability: Availability::Active,
            status: NodeStatus::Ready,
            labels: BTreeMap::new(),
            created_at: 0,
            status_since: 0,
            ingress_address: None,
            gossip_port: DEFAULT_GOSSIP_PORT,
            exposed_metrics_port: None,
            left: false,
            resources: Default::default(),
            platform: Platform::local(),
        }
    }

    pub(crate) fn network(name: &str, subnet: &str, vni: u32) -> Network {
        let subnet: Subnet = subnet.parse().unwrap();
        Network {
            id: format!("id-{name}"),
            name: name.into(),
            subnet,
            gateway: subnet.first_host(),
            vni,
            attachable: false,
            internal: false,
            mtu: None,
            ingress: false,
            created_at: 0,
        }
    }

    #[test]
    fn networks_are_unique_and_not_removed_while_in_use() {
        let mut state = ClusterState::default();
        state
            .apply(Command::PutNetwork(network("a", "10.0.1.0/24", 4097)))
            .unwrap();
        let twin = Network {
            id: "other".into(),
            ..network("a", "10.0.2.0/24", 4098)
        };
        let err = state.apply(Command::PutNetwork(twin)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a network named a already exists: choose another name, or use it \
             (`shoal network inspect a`)"
        );
        let err = state
            .apply(Command::PutNetwork(network("b", "10.0.1.128/25", 4098)))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("subnet 10.0.1.128/25 overlaps 10.0.1.0/24 of network a: choose"),
            "{err}"
        );
        let err = state
            .apply(Command::PutNetwork(network("b", "10.0.2.0/24", 4097)))
            .unwrap_err();
        assert!(
            err.to_string().starts_with("VNI 4097 is already used"),
            "{err}"
        );
        state
            .apply(Command::PutNetwork(network("b", "10.0.2.0/24", 4098)))
            .unwrap();
        assert_eq!(state.free_vni(), FIRST_VNI);
        assert_eq!(state.find_network("b").unwrap().vni, 4098);

        let mut spec_with_a = ServiceSpec::new(
            "web",
            ServiceMode::Replicated { replicas: 1 },
            vec!["true".into()],
        );
        spec_with_a.networks = vec!["id-a".into()];
        state
            .apply(Command::PutService(Service {
                id: "s".into(),
                spec: spec_with_a,
                version: 1,
                created_at: 0,
                updated_at: 0,
                vips: vec![],
                previous_spec: None,
                previous_version: 0,
                update_status: None,
            }))
            .unwrap();
        let err = state
            .apply(Command::RemoveNetwork { id: "id-a".into() })
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "network a is in use by service web: remove the service (`shoal service rm web`) \
             or detach it (`shoal service update --network-rm a web`) first"
        );
        state
            .apply(Command::RemoveNetwork { id: "id-b".into() })
            .unwrap();
        assert!(state.find_network("b").is_err());
        let mut ingress = network("ingress", "10.0.9.0/24", FIRST_VNI + 9);
        ingress.ingress = true;
        let ingress_id = ingress.id.clone();
        state.apply(Command::PutNetwork(ingress)).unwrap();
        let err = state
            .apply(Command::RemoveNetwork { id: ingress_id })
            .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("the ingress network carries the routing mesh"));
        assert!(state.find_network("ingress").is_ok());
    }

    /// A replicated service `name` (ID `id-NAME`) publishing `ports`.
    pub(crate) fn publishing(name: &str, ports: &[&str]) -> Service {
        Service {
            id: format!("id-{name}"),
            spec: ServiceSpec {
                ports: ports
                    .iter()
                    .map(|p| PortConfig::parse(p).unwrap())
                    .collect(),
                ..ServiceSpec::new(
                    name,
                    ServiceMode::Replicated { replicas: 1 },
                    vec!["true".into()],
                )
            },
            version: 1,
            created_at: 0,
            updated_at: 0,
            vips: vec![],
            previous_spec: None,
            previous_version: 0,
            update_status: None,
        }
    }

    /// A swarm on data-path port 4790 whose node `b` moved its manager and gossip ports and
    /// opened its metrics listener beyond loopback.
    fn swarm_with_custom_ports() -> ClusterState {
        let mut state = ClusterState::default();
        state.settings.data_path_port = 4790;
        state
            .apply(Command::AddNode(node("a", 1, Role::Manager)))
            .unwrap();
        let mut b = node("b", 2, Role::Worker);
        b.port = 2378;
        b.gossip_port = 7947;
        b.exposed_metrics_port = Some(9100);
        state.apply(Command::AddNode(b)).unwrap();
        state
    }

    #[test]
    fn reserved_ports_are_refused_on_create_and_update() {
        let mut state = swarm_with_custom_ports();
        for (publish, port, listener, on) in [
            ("2377:80", "2377/tcp", "manager API", "every node"),
            ("2378:80", "2378/tcp", "manager API", "node b"),
            ("7946:80", "7946/tcp", "gossip", "every node"),
            ("7946:80/udp", "7946/udp", "gossip", "every node"),
            ("7947:80", "7947/tcp", "gossip", "node b"),
            ("7947:80/udp", "7947/udp", "gossip", "node b"),
            ("4790:80/udp", "4790/udp", "VXLAN data path", "every node"),
            ("9100:80", "9100/tcp", "metrics", "node b"),
            (
                "published=7946,target=80,protocol=udp,mode=host",
                "7946/udp",
                "gossip",
                "every node",
            ),
        ] {
            let err = state
                .apply(Command::PutService(publishing("web", &[publish])))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("port {port} is reserved: "))
                    && err.contains(listener)
                    && err.ends_with(&format!("listens there on {on}; publish another port")),
                "{publish}: {err}"
            );
        }
        assert!(state.services.is_empty());
        // The same numbers where nothing of shoal listens are anyone's.
        for free in [
            "2377:80/udp",
            "4789:80/udp",
            "4790:80",
            "9323:80",
            "9100:80/udp",
        ] {
            state
                .apply(Command::PutService(publishing("free", &[free])))
                .unwrap();
            state.services.clear();
        }

        // An update adding a reserved port is refused and changes nothing.
        state
            .apply(Command::PutService(publishing("web", &["8080:80"])))
            .unwrap();
        let err = state
            .apply(Command::PutService(publishing(
                "web",
                &["8080:80", "7946:80/udp"],
            )))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "port 7946/udp is reserved: shoal's gossip (membership and overlay state) listens \
             there on every node; publish another port"
        );
        assert_eq!(state.services["id-web"].spec.ports.len(), 1);
    }

    #[test]
    fn published_port_conflicts_are_decided_in_apply() {
        let mut state = ClusterState::default();
        state
            .apply(Command::PutService(publishing("a", &["8080:80"])))
            .unwrap();
        let err = state
            .apply(Command::PutService(publishing("b", &["8080:81"])))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "port 8080/tcp is already published by service a: choose another, or free it with \
             `shoal service update --publish-rm 8080/tcp a`"
        );
        assert!(!state.services.contains_key("id-b"));
        // Another protocol is another port; a service keeps its own port across updates.
        state
            .apply(Command::PutService(publishing("b", &["8080:80/udp"])))
            .unwrap();
        state
            .apply(Command::PutService(publishing(
                "a",
                &["8080:80", "9090:90"],
            )))
            .unwrap();
        let err = state
            .apply(Command::PutService(publishing(
                "b",
                &["8080:80/udp", "9090:90"],
            )))
            .unwrap_err();
        assert!(err
            .to_string()
            .starts_with("port 9090/tcp is already published by service a"));
    }

    #[test]
    fn overlay_subnets_keep_clear_of_node_addresses() {
        let mut state = ClusterState::default();
        let mut node1 = node("n1", 1, Role::Manager);
        node1.hostname = "node1".into();
        node1.addr = "192.168.77.11".parse().unwrap();
        state.apply(Command::AddNode(node1)).unwrap();
        let err = state
            .apply(Command::PutNetwork(network("x", "192.168.77.0/24", 4097)))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "subnet 192.168.77.0/24 holds the address 192.168.77.11 of node node1: the \
             network's tasks could not reach that node; choose another --subnet, or leave it out"
        );
        assert!(state.networks.is_empty());
        state
            .apply(Command::PutNetwork(network("x", "192.168.78.0/24", 4097)))
            .unwrap();
    }

    #[test]
    fn nodes_recorded_before_their_ports_were_get_the_defaults() {
        let mut json = serde_json::to_value(node("a", 1, Role::Worker)).unwrap();
        let fields = json.as_object_mut().unwrap();
        fields.remove("gossip_port");
        fields.remove("exposed_metrics_port");
        let old: Node = serde_json::from_value(json).unwrap();
        assert_eq!((old.gossip_port, old.exposed_metrics_port), (7946, None));
    }

    pub(crate) fn task(id: &str, node: &str, state: TaskState) -> Task {
        Task {
            id: id.into(),
            service_id: "s".into(),
            slot: 1,
            node_id: Some(node.into()),
            service_version: 1,
            desired: TaskState::Running,
            state,
            message: String::new(),
            error: String::new(),
            created_at: 0,
            state_since: 0,
            attachments: vec![],
            health: None,
        }
    }

    #[test]
    fn health_reports_of_a_running_task_are_kept_and_decide_readiness() {
        use crate::health::{HealthStatus, TaskHealth};
        let mut state = ClusterState::default();
        state
            .apply(Command::PutTasks(vec![task("t", "n1", TaskState::Running)]))
            .unwrap();
        let report = |status| Command::ReportTasks {
            node_id: "n1".into(),
            reports: vec![TaskReport {
                task_id: "t".into(),
                state: TaskState::Running,
                error: String::new(),
                health: Some(TaskHealth {
                    status,
                    failing_streak: 0,
                    log: vec![],
                }),
            }],
            at: 5,
        };
        state.apply(report(HealthStatus::Starting)).unwrap();
        assert!(!state.tasks["t"].is_ready(), "starting is not ready");
        state.apply(report(HealthStatus::Healthy)).unwrap();
        assert!(state.tasks["t"].is_ready());
        state.apply(report(HealthStatus::Unhealthy)).unwrap();
        let task = &state.tasks["t"];
        assert!(!task.is_ready());
        assert_eq!(task.state_since, 0, "health is not a state change");
    }

    #[test]
    fn task_reports_only_move_forward_and_only_from_the_owner() {
        let mut state = ClusterState::default();
        state
            .apply(Command::PutTasks(vec![task(
                "t",
                "n1",
                TaskState::Assigned,
            )]))
            .unwrap();
        let report = |node: &str, s: TaskState| Command::ReportTasks {
            node_id: node.into(),
            reports: vec![TaskReport {
                task_id: "t".into(),
                state: s,
                error: String::new(),
                health: None,
            }],
            at: 5,
        };
        state.apply(report("n1", TaskState::Running)).unwrap();
        assert_eq!(state.tasks["t"].state, TaskState::Running);
        state.apply(report("n1", TaskState::Starting)).unwrap();
        assert_eq!(state.tasks["t"].state, TaskState::Running, "no going back");
        state.apply(report("n2", TaskState::Failed)).unwrap();
        assert_eq!(state.tasks["t"].state, TaskState::Running, "not n2's task");
        state.apply(report("n1", TaskState::Failed)).unwrap();
        assert_eq!(state.tasks["t"].state, TaskState::Failed);
        assert_eq!(state.tasks["t"].state_since, 5);
        // An orchestrator decision made from an older copy does not undo the report.
        let mut stale = task("t", "n1", TaskState::Running);
        stale.desired = TaskState::Shutdown;
        state.apply(Command::PutTasks(vec![stale])).unwrap();
        assert_eq!(
            (state.tasks["t"].state, state.tasks["t"].desired),
            (TaskState::Failed, TaskState::Shutdown)
        );
    }

    #[test]
    fn published_ports_parse_in_both_forms_and_refuse_nonsense() {
        use shoal_dataplane::mesh::Protocol;
        let short = PortConfig::parse("8080:80").unwrap();
        assert_eq!(
            (short.published, short.target, short.protocol),
            (8080, 80, Protocol::Tcp)
        );
        assert_eq!(
            PortConfig::parse("53:53/udp").unwrap().protocol,
            Protocol::Udp
        );
        let long = PortConfig::parse("published=9090,target=80,protocol=udp,mode=host,source=snat")
            .unwrap();
        assert_eq!(long.mode, PublishMode::Host);
        assert_eq!(long.source, SourceMode::Snat);
        assert_eq!(long.to_string(), "9090:80/udp,host,snat");
        for bad in [
            "8080",
            "0:80",
            "8080:70000",
            "8080:80/sctp",
            "published=8080",
            "published=8080,target=80,mode=mesh",
            "published=8080,target=80,colour=red",
        ] {
            assert!(PortConfig::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn init_once_and_unique_names() {
        let mut state = ClusterState::default();
        let init = Command::Init {
            cluster_id: "c".into(),
            ca: RootCa {
                cert_pem: String::new(),
                key_pem: String::new(),
            },
            worker_secret: "w".into(),
            manager_secret: "m".into(),
            first: node("a", 1, Role::Manager),
            settings: ClusterSettings::default(),
            ingress: network("ingress", "10.0.0.0/24", FIRST_VNI),
        };
        state.apply(init.clone()).unwrap();
        assert_eq!(state.next_raft_id, 2);
        assert!(state.apply(init).is_err());
        assert!(state
            .apply(Command::AddNode(node("a", 2, Role::Worker)))
            .is_err());
        assert_eq!(state.find_node("a").unwrap().raft_id, 1);
        assert!(state.find_node("zz").is_err());
    }

    #[test]
    fn specs_and_constraints_are_checked() {
        let spec = |name: &str, cmd: &[&str]| {
            ServiceSpec::new(
                name,
                ServiceMode::Replicated { replicas: 1 },
                cmd.iter().map(|s| s.to_string()).collect(),
            )
        };
        assert!(spec("web", &["sleep", "1"]).validate().is_ok());
        assert!(spec("-web", &["x"]).validate().is_err());
        assert!(spec("web/1", &["x"]).validate().is_err());
        assert!(spec("web", &[]).validate().is_err());
        let mut bad_env = spec("web", &["x"]);
        bad_env.env = vec!["NOVALUE".into()];
        assert!(bad_env.validate().is_err());

        let c = Constraint::parse("node.labels.zone==a").unwrap();
        let mut n = node("n", 1, Role::Worker);
        assert!(!c.matches(&n));
        n.labels.insert("zone".into(), "a".into());
        assert!(c.matches(&n));
        assert!(!Constraint::parse("node.labels.zone!=a")
            .unwrap()
            .matches(&n));
        assert!(Constraint::parse("zone").is_err());
        assert_eq!(c.to_string(), "node.labels.zone==a");
    }

    #[test]
    fn constraints_on_every_node_attribute() {
        let mut n = node("abc123", 1, Role::Manager);
        n.hostname = "node2".into();
        n.platform = Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
        };
        let holds = |text: &str| Constraint::parse(text).unwrap().matches(&n);
        for yes in [
            "node.id==abc123",
            "node.hostname==node2",
            "node.hostname == NODE2",
            "node.hostname!=node1",
            "node.role==manager",
            "node.role!=worker",
            "node.platform.os==linux",
            "node.platform.arch==x86_64",
            "node.labels.zone!=a",
        ] {
            assert!(holds(yes), "{yes}");
        }
        for no in [
            "node.id==other",
            "node.hostname==node1",
            "node.role==worker",
            "node.platform.os!=linux",
            "node.platform.arch==aarch64",
            "node.labels.zone==a",
        ] {
            assert!(!holds(no), "{no}");
        }
        // Shown as written, and the same again when parsed from that.
        for text in [
            "node.role==worker",
            "node.platform.arch!=aarch64",
            "node.id==x",
        ] {
            let c = Constraint::parse(text).unwrap();
            assert_eq!(c.to_string(), text);
            assert_eq!(Constraint::parse(&c.to_string()).unwrap(), c);
        }
        // A node that joined before nodes reported their platform matches no `==` on it.
        n.platform = Platform::default();
        let holds = |text: &str| Constraint::parse(text).unwrap().matches(&n);
        assert!(!holds("node.platform.os==linux"));
        assert!(holds("node.platform.os!=windows"));
        for (bad, says) in [
            ("node.foo==x", "unknown key"),
            ("node.labels.==x", "empty label name"),
            ("node.role==boss", "manager or worker"),
            ("node.hostname=node1", "expected KEY==VALUE"),
            ("node.hostname==", "no value"),
            ("engine.labels.a==b", "unknown key"),
        ] {
            let err = Constraint::parse(bad).unwrap_err().to_string();
            assert!(
                err.contains(says) && err.contains("--constraint"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn label_constraints_stored_before_other_keys_still_read() {
        let old = r#"{"label":"zone","value":"a","equal":false}"#;
        let c: Constraint = serde_json::from_str(old).unwrap();
        assert_eq!(c, Constraint::parse("node.labels.zone!=a").unwrap());
        let mut spec = serde_json::to_value(ServiceSpec {
            constraints: vec![c],
            ..ServiceSpec::new(
                "web",
                ServiceMode::Replicated { replicas: 1 },
                vec!["x".into()],
            )
        })
        .unwrap();
        let fields = spec.as_object_mut().unwrap();
        fields.remove("placement_prefs");
        fields.remove("max_replicas_per_node");
        fields.remove("healthcheck");
        let read: ServiceSpec = serde_json::from_value(spec).unwrap();
        assert_eq!((read.max_replicas_per_node, read.healthcheck), (0, None));
        let mut old_task = serde_json::to_value(task("t", "n", TaskState::Running)).unwrap();
        old_task.as_object_mut().unwrap().remove("health");
        let old_task: Task = serde_json::from_value(old_task).unwrap();
        assert!(old_task.health.is_none() && old_task.is_ready());
        let mut n = serde_json::to_value(node("n", 1, Role::Worker)).unwrap();
        n.as_object_mut().unwrap().remove("platform");
        let n: Node = serde_json::from_value(n).unwrap();
        assert_eq!(n.platform, Platform::default());
    }

    #[test]
    fn placement_preferences_and_limits_are_checked() {
        assert_eq!(
            PlacementPref::parse("spread=node.labels.zone").unwrap(),
            PlacementPref {
                spread: "zone".into()
            }
        );
        for bad in [
            "binpack=node.labels.zone",
            "spread=node.hostname",
            "spread=node.labels.",
            "spread",
        ] {
            let err = PlacementPref::parse(bad).unwrap_err().to_string();
            assert!(err.contains("--placement-pref"), "{bad}: {err}");
        }
        let err = PlacementUpdate {
            pref_rm: vec!["zone".into()],
            ..Default::default()
        }
        .check()
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("--placement-pref-rm"), "{err}");
        let mut global = serde_json::from_value::<ServiceSpec>(serde_json::json!({
            "name": "g", "mode": "global", "command": ["x"], "env": [], "constraints": [],
            "update_parallelism": 1, "update_delay_secs": 0, "max_replicas_per_node": 1,
        }))
        .unwrap();
        assert!(global
            .validate()
            .unwrap_err()
            .to_string()
            .contains("--replicas-max-per-node"));
        global.max_replicas_per_node = 0;
        global.validate().unwrap();
    }
}
