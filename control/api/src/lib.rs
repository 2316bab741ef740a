//! The vocabulary of the agent's local API, shared by the server (the agent), the cluster
//! library that answers most of it, and the clients (every other `shoal` subcommand): the
//! requests and answers of `swarm init`/`join`/`leave`, the error body every failure carries,
//! and the plain values those name (roles, subnets). Serde only: no I/O, no runtime.

use std::{
    fmt,
    net::{Ipv4Addr, SocketAddr},
    str::FromStr,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

mod error;

pub use error::{ApiError, ErrorKind, Kind};

pub const API_VERSION: &str = "v1";

/// Seconds since the Unix epoch: the clock every timestamp of the API is on.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Version {
    pub version: String,
    pub api_version: String,
}

impl Version {
    pub fn current() -> Self {
        Self {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            api_version: API_VERSION.to_owned(),
        }
    }
}

/// A node outside any swarm was asked for what only swarm members hold.
pub const NOT_IN_SWARM: &str =
    "this node is not part of a swarm: run `shoal swarm init` or `shoal swarm join` first";

/// A worker was asked for what only managers hold.
pub const NOT_A_MANAGER: &str = "this node is not a swarm manager: run the command on a manager \
                                 (`shoal info` lists them), or promote this node with \
                                 `shoal node promote NODE` on a manager";
pub const NO_LEADER: &str = "the swarm does not have a leader: too few managers are reachable \
                         to form a quorum (see `shoal node ls` on a manager, docs/operations.md)";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LeaveRequest {
    pub force: bool,
}

/// `dns lookup NAME --task TASK`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DnsLookupQuery {
    pub task: String,
    pub name: String,
}

/// `shoal info`'s view of the swarm.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SwarmInfo {
    pub node_id: String,
    pub cluster_id: String,
    pub manager: bool,
    pub advertise: SocketAddr,
    pub managers: Vec<String>,
    /// For managers: whether this one leads.
    pub leader: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitRequest {
    pub advertise_addr: Option<String>,
    /// Rebuild a single-manager swarm from this manager's state (after losing the quorum).
    pub force_new_cluster: bool,
    /// Address pool for overlay subnets [default: 10.0.0.0/8].
    pub default_addr_pool: Option<Subnet>,
    /// Prefix length of subnets from the pool [default: 24].
    pub default_addr_pool_mask_length: Option<u8>,
    /// VXLAN UDP port of the swarm [default: this agent's data-path port].
    pub data_path_port: Option<u16>,
    #[serde(default)]
    pub data_path_addr: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InitResponse {
    pub node_id: String,
    pub worker_token: String,
    pub advertise: SocketAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinArgs {
    pub token: String,
    pub remote: String,
    pub advertise_addr: Option<String>,
    #[serde(default)]
    pub data_path_addr: Option<Ipv4Addr>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JoinedResponse {
    pub node_id: String,
    pub role: Role,
}

/// Which tokens a manager accepts; the secrets are replicated with the cluster state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Worker,
    Manager,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Worker => "worker",
            Role::Manager => "manager",
        })
    }
}

/// An IPv4 network, `10.0.1.0/24`. Always stored with the host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Result<Self> {
        if prefix > 32 {
            bail!("prefix length /{prefix} is longer than 32");
        }
        let base = Ipv4Addr::from(u32::from(addr) & mask(prefix));
        Ok(Self { base, prefix })
    }

    /// The network address, as a number.
    pub fn start(self) -> u32 {
        u32::from(self.base)
    }

    /// The broadcast address, as a number.
    pub fn end(self) -> u32 {
        self.start() | !mask(self.prefix)
    }

    pub fn contains(self, addr: Ipv4Addr) -> bool {
        (self.start()..=self.end()).contains(&u32::from(addr))
    }

    pub fn overlaps(self, other: Subnet) -> bool {
        self.start() <= other.end() && other.start() <= self.end()
    }

    /// The first usable address, which shoal gives the network's gateway by default.
    pub fn first_host(self) -> Ipv4Addr {
        Ipv4Addr::from(self.start() + 1)
    }

    /// Usable host addresses (network and broadcast addresses excluded).
    pub fn hosts(self) -> impl Iterator<Item = Ipv4Addr> {
        (self.start() + 1..self.end()).map(Ipv4Addr::from)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl FromStr for Subnet {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let (addr, prefix) = text
            .split_once('/')
            .with_context(|| format!("{text:?} is not a CIDR (e.g. 10.0.1.0/24)"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("{text:?}: {addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .with_context(|| format!("{text:?}: bad prefix length"))?;
        Subnet::new(addr, prefix)
    }
}

impl TryFrom<String> for Subnet {
    type Error = anyhow::Error;

    fn try_from(text: String) -> Result<Self> {
        text.parse()
    }
}

impl From<Subnet> for String {
    fn from(subnet: Subnet) -> Self {
        subnet.to_string()
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}
