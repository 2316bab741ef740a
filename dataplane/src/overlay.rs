//! Overlay networks in the kernel. Each network gets its own namespace (`<prefix>ov-<id>`)
//! holding a bridge `br0` and a VXLAN device: the VXLAN device is created in the node's
//! namespace (so its UDP socket, bound to the data-path address, lives there) and then moved
//! into the network's namespace. Learning is off, and nothing is flooded: remote endpoints
//! exist only as the FDB entries the peer database programs from gossip, and as entries of
//! `OVERLAY_ENDPOINTS`, from which the VIP echo program answers the tasks' ARP for them (no
//! permanent neighbour entries: the kernel has one neighbour table for all namespaces). The
//! device has `proxy` on without a neighbour entry, so no ARP leaves the node either.
//!
//! A task gets one veth per network (`eth0`, `eth1`, ... in its namespace, the other end on
//! that network's bridge) and, unless all its networks are internal, one more to the node's
//! gateway bridge `shoal_gw`, which is its default route out (masqueraded). Ports on the
//! gateway bridge are isolated from each other, and forwarding from it into any overlay
//! subnet is dropped, so the only way between tasks is their shared overlay networks.
//! Nothing opens a connection into a task through the gateway bridge either: forwarded
//! packets reach it only as part of connections the task opened (counted when refused);
//! tasks are reached from outside through the routing mesh or a host-mode port.
//!
//! ```text
//!  task netns              network netns (<prefix>ov-<id>)        node netns
//!  eth0 10.0.1.3 ──veth── br0 ── vx4096 (vni 4096) ═══ UDP 4789 from the data-path addr
//!  eth1 172.18.0.5 ──veth────────────────────────────── shoal_gw 172.18.0.1 ── masquerade
//! ```

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::{
    iproute::{self, Netns},
    overlay_endpoints::OverlayEndpoints,
    peerdb::{format_mac, mac_for, Peer, PeerDb, PeerOp},
};

/// VXLAN over IPv4 UDP adds 50 bytes to every frame.
pub const VXLAN_OVERHEAD: u32 = 50;
pub const GATEWAY_BRIDGE: &str = "shoal_gw";
/// The node's own endpoint on the ingress network (routing mesh), and its peer on the
/// network's bridge.
pub const INGRESS_ENDPOINT: &str = "shoal_ing";
pub const INGRESS_ENDPOINT_PEER: &str = "ving0";
/// Routing table in a task for what its ingress address sends: replies to mesh clients go
/// back through the node's ingress endpoint, not out of the task's default route.
const INGRESS_ROUTE_TABLE: u32 = 2000;
const NFT_TABLE: &str = "shoal_overlay";
/// Counts connections from outside refused at the gateway bridge (tasks are reached only
/// through the mesh or a host-mode port).
const GATEWAY_INBOUND_COUNTER: &str = "gateway_inbound";

#[derive(Clone, Debug)]
pub struct OverlayConfig {
    /// Prefix of the namespaces made for networks, so several agents can share a machine.
    pub netns_prefix: String,
    /// The namespace this node's links live in (the agent's own outside tests).
    pub node_netns: Netns,
    /// Source address of VXLAN packets.
    pub data_addr: Ipv4Addr,
    /// Node-local subnet of the gateway bridge; its first address is the bridge's.
    pub gateway_subnet: (Ipv4Addr, u8),
}

/// An overlay network as the managers defined it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSpec {
    pub id: String,
    pub name: String,
    pub vni: u32,
    /// UDP port of the swarm's VXLAN data path.
    pub port: u16,
    pub subnet: (Ipv4Addr, u8),
    /// None: underlay MTU minus the VXLAN overhead.
    pub mtu: Option<u32>,
    /// No route out of the swarm for tasks that are only on internal networks.
    pub internal: bool,
    /// The routing mesh's network.
    #[serde(default)]
    pub ingress: bool,
}

/// One of a task's interfaces on an overlay network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInterface {
    pub ifname: String,
    /// The other end of the veth, on the network's bridge, and the namespace it is in.
    pub host_side: String,
    pub netns: String,
    pub network_id: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

/// What `network inspect` shows of a network on this node, read back from the kernel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NetworkDataplane {
    pub netns: String,
    pub vxlan: String,
    pub vni: u32,
    pub mtu: u32,
    pub local: String,
    pub port: u16,
    /// Remote endpoints the peer database holds (key -> peer).
    pub peers: Vec<ProgrammedPeer>,
    /// Static FDB entries on the VXLAN device: (MAC, remote VTEP).
    pub fdb: Vec<(String, String)>,
    /// Remote endpoints whose ARP the node answers (from `OVERLAY_ENDPOINTS`): (IP, MAC).
    pub neighbours: Vec<(String, String)>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProgrammedPeer {
    pub endpoint: String,
    pub ip: Ipv4Addr,
    pub mac: String,
    pub vtep: IpAddr,
}

struct NetworkSandbox {
    spec: NetworkSpec,
    netns: String,
    mtu: u32,
    peers: PeerDb,
    /// Built by a previous agent: the kernel may hold entries of peers gone since, removed
    /// by `prune_stale_peers` once gossip has been heard.
    adopted: bool,
}

#[derive(Default)]
struct State {
    networks: HashMap<String, NetworkSandbox>,
    /// Gateway-bridge addresses in use, by task ID.
    gateway_leases: BTreeMap<String, Ipv4Addr>,
    /// This node's address on the ingress network, once its endpoint exists.
    ingress_endpoint: Option<Ipv4Addr>,
}

pub struct Overlay {
    config: OverlayConfig,
    underlay_mtu: u32,
    state: Mutex<State>,
    /// The remote endpoints whose ARP is answered, of every network here.
    endpoints: Mutex<OverlayEndpoints>,
}

impl Overlay {
    /// Sets up the gateway bridge and its rules, keeping what a previous agent built: its
    /// networks' namespaces keep forwarding for the tasks that outlived it, and are adopted
    /// as the new agent meets them again (`ensure_network`, `adopt`); the rest goes with
    /// `remove_unused`.
    pub fn start(config: OverlayConfig, endpoints: OverlayEndpoints) -> Result<Self> {
        let underlay_mtu = mtu_of_address(&config.node_netns, config.data_addr)?;
        let overlay = Self {
            config,
            underlay_mtu,
            state: Mutex::default(),
            endpoints: Mutex::new(endpoints),
        };
        overlay.setup_gateway()?;
        Ok(overlay)
    }

    pub fn underlay_mtu(&self) -> u32 {
        self.underlay_mtu
    }

    fn netns_name(&self, network_id: &str) -> String {
        let short: String = network_id.chars().take(12).collect();
        format!("{}ov-{short}", self.config.netns_prefix)
    }

    fn gateway(&self) -> Ipv4Addr {
        let (base, _) = self.config.gateway_subnet;
        Ipv4Addr::from(u32::from(base) + 1)
    }

    fn setup_gateway(&self) -> Result<()> {
        let node = &self.config.node_netns;
        let (base, prefix) = self.config.gateway_subnet;
        if !link_exists(node, GATEWAY_BRIDGE)? {
            iproute::batch(
                node,
                "ip",
                &[format!("link add {GATEWAY_BRIDGE} type bridge")],
            )?;
        }
        iproute::batch(
            node,
            "ip",
            &[
                format!(
                    "addr replace {}/{prefix} dev {GATEWAY_BRIDGE}",
                    self.gateway()
                ),
                format!("link set {GATEWAY_BRIDGE} up"),
            ],
        )?;
        iproute::sysctl(node, "net.ipv4.ip_forward", "1")?;
        // One transaction: the chains are replaced whole (a new agent's rules take effect),
        // the set of overlay subnets and the counter are kept (adopted networks stay in it).
        iproute::nft(
            node,
            &format!(
                "add table ip {NFT_TABLE}\n\
                 add set ip {NFT_TABLE} overlay_subnets {{ type ipv4_addr; flags interval; }}\n\
                 add counter ip {NFT_TABLE} {GATEWAY_INBOUND_COUNTER}\n\
                 add chain ip {NFT_TABLE} forward {{ type filter hook forward priority filter; policy accept; }}\n\
                 flush chain ip {NFT_TABLE} forward\n\
                 add rule ip {NFT_TABLE} forward oifname \"{GATEWAY_BRIDGE}\" ct state != {{ established, related }} counter name {GATEWAY_INBOUND_COUNTER} drop\n\
                 add rule ip {NFT_TABLE} forward iifname \"{GATEWAY_BRIDGE}\" ip daddr @overlay_subnets drop\n\
                 add rule ip {NFT_TABLE} forward iifname \"{INGRESS_ENDPOINT}\" drop\n\
                 add rule ip {NFT_TABLE} forward oifname \"{INGRESS_ENDPOINT}\" drop\n\
                 add chain ip {NFT_TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
                 flush chain ip {NFT_TABLE} postrouting\n\
                 add rule ip {NFT_TABLE} postrouting ip saddr {base}/{prefix} oifname != \"{GATEWAY_BRIDGE}\" masquerade\n"
            ),
        )
        .context("installing the gateway rules (is nftables installed?)")
    }

    /// Packets of new connections from outside refused at the gateway bridge so far, as a
    /// verdict of its own beside the ingress classifier's.
    pub fn gateway_refusals(&self) -> Result<crate::CounterStatus> {
        let out = iproute::output(
            &self.config.node_netns,
            "nft",
            &[
                "-j",
                "list",
                "counter",
                "ip",
                NFT_TABLE,
                GATEWAY_INBOUND_COUNTER,
            ],
        )?;
        let listing: serde_json::Value =
            serde_json::from_str(&out).context("reading nft's JSON counter listing")?;
        let counter = listing["nftables"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|item| item["counter"].is_object())
            .map(|item| &item["counter"])
            .context("nft listed no gateway counter")?;
        Ok(crate::CounterStatus {
            verdict: GATEWAY_INBOUND_COUNTER.to_owned(),
            packets: counter["packets"].as_u64().unwrap_or_default(),
            bytes: counter["bytes"].as_u64().unwrap_or_default(),
            refusal: true,
            dropped: true,
        })
    }

    /// Deletes every network namespace of this agent, the gateway bridge and its rules.
    pub fn remove_all(&self) -> Result<()> {
        // The node's links first: deleting a namespace removes the peer of `shoal_ing`, and
        // the kernel then deletes `shoal_ing` itself asynchronously, racing a check-then-delete.
        let node = &self.config.node_netns;
        for link in [GATEWAY_BRIDGE, INGRESS_ENDPOINT] {
            if link_exists(node, link)? {
                iproute::batch(node, "ip", &[format!("link del {link}")])?;
            }
        }
        let prefix = format!("{}ov-", self.config.netns_prefix);
        for name in named_namespaces()? {
            if name.starts_with(&prefix) {
                delete_netns(&name)?;
            }
        }
        {
            let mut state = self.state.lock().expect("overlay state");
            state.networks.clear();
            state.ingress_endpoint = None;
        }
        self.endpoints
            .lock()
            .expect("overlay endpoints")
            .retain(|_, _| false)?;
        iproute::nft(
            node,
            &format!("add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"),
        )
    }

    /// Makes the network's namespace, bridge and VXLAN device unless they exist; a network a
    /// previous agent built (its namespace holds the VNI's device) is adopted as it is, its
    /// tasks' traffic never interrupted.
    pub fn ensure_network(&self, spec: &NetworkSpec) -> Result<()> {
        let mut state = self.state.lock().expect("overlay state");
        if let Some(existing) = state.networks.get(&spec.id) {
            if existing.spec == *spec {
                return Ok(());
            }
            bail!("network {} changed under its running tasks", spec.name);
        }
        let netns = self.netns_name(&spec.id);
        let mtu = spec
            .mtu
            .unwrap_or(self.underlay_mtu.saturating_sub(VXLAN_OVERHEAD));
        let adopted = self.left_by_previous_agent(spec, &netns)?;
        if adopted {
            tracing::info!(network = %spec.name, "adopted the network a previous agent built");
        } else {
            self.build_network(spec, &netns, mtu)
                .with_context(|| format!("setting up network {}", spec.name))?;
        }
        let (base, prefix) = spec.subnet;
        iproute::nft(
            &self.config.node_netns,
            &format!("add element ip {NFT_TABLE} overlay_subnets {{ {base}/{prefix} }}\n"),
        )?;
        state.networks.insert(
            spec.id.clone(),
            NetworkSandbox {
                spec: spec.clone(),
                netns,
                mtu,
                peers: PeerDb::default(),
                adopted,
            },
        );
        Ok(())
    }

    /// Whether a previous agent left this network's namespace with its VXLAN device (a
    /// namespace without it is half-built: rebuilt).
    fn left_by_previous_agent(&self, spec: &NetworkSpec, netns: &str) -> Result<bool> {
        if !named_namespaces()?.iter().any(|n| n == netns) {
            return Ok(false);
        }
        link_exists(&Netns::Named(netns.to_owned()), &vxlan_name(spec.vni))
    }

    /// Deletes the kernel's FDB entries and ARP answers of an adopted network that gossip no
    /// longer lists (peers that left while no agent ran), and such neighbour entries as an
    /// older agent programmed; a no-op for networks built here.
    pub fn prune_stale_peers(&self, network_id: &str) -> Result<usize> {
        let mut state = self.state.lock().expect("overlay state");
        let Some(sandbox) = state.networks.get_mut(network_id) else {
            return Ok(0);
        };
        if !std::mem::take(&mut sandbox.adopted) {
            return Ok(0);
        }
        let macs: HashSet<String> = sandbox
            .peers
            .peers()
            .map(|(_, peer)| format_mac(&peer.mac))
            .collect();
        let ips: HashSet<Ipv4Addr> = sandbox.peers.peers().map(|(_, peer)| peer.ip).collect();
        let inside = Netns::Named(sandbox.netns.clone());
        let vxlan = vxlan_name(sandbox.spec.vni);
        let fdb: Vec<String> =
            iproute::read_json(&inside, "bridge", &["-j", "fdb", "show", "dev", &vxlan])?
                .iter()
                .filter(|e| e["dst"].is_string() && !macs.contains(&text(&e["mac"])))
                .map(|e| {
                    format!(
                        "fdb del {} dev {vxlan} dst {} self",
                        text(&e["mac"]),
                        text(&e["dst"])
                    )
                })
                .collect();
        let neigh: Vec<String> =
            iproute::read_json(&inside, "ip", &["-j", "neigh", "show", "dev", &vxlan])?
                .iter()
                .filter(|e| {
                    text(&e["dst"])
                        .parse::<Ipv4Addr>()
                        .is_ok_and(|ip| !ips.contains(&ip))
                })
                .map(|e| format!("neigh del {} dev {vxlan}", text(&e["dst"])))
                .collect();
        iproute::batch(&inside, "bridge", &fdb)?;
        iproute::batch(&inside, "ip", &neigh)?;
        let vni = sandbox.spec.vni;
        let answers = self
            .endpoints
            .lock()
            .expect("overlay endpoints")
            .retain(|ip, of| of != vni || ips.contains(&ip))?;
        Ok(fdb.len() + neigh.len() + answers)
    }

    /// Removes the networks a previous agent left that no task here uses (not adopted by
    /// now), and their subnets from the gateway rules.
    pub fn remove_unused(&self) -> Result<Vec<String>> {
        let (ours, subnets, vnis): (HashSet<String>, Vec<(Ipv4Addr, u8)>, HashSet<u32>) = {
            let state = self.state.lock().expect("overlay state");
            (
                state.networks.values().map(|n| n.netns.clone()).collect(),
                state.networks.values().map(|n| n.spec.subnet).collect(),
                state.networks.values().map(|n| n.spec.vni).collect(),
            )
        };
        let prefix = format!("{}ov-", self.config.netns_prefix);
        let mut removed = Vec::new();
        for name in named_namespaces()? {
            if name.starts_with(&prefix) && !ours.contains(&name) {
                delete_netns(&name)?;
                removed.push(name);
            }
        }
        self.endpoints
            .lock()
            .expect("overlay endpoints")
            .retain(|_, vni| vnis.contains(&vni))?;
        let mut rules = format!("flush set ip {NFT_TABLE} overlay_subnets\n");
        for (base, prefix) in subnets {
            rules.push_str(&format!(
                "add element ip {NFT_TABLE} overlay_subnets {{ {base}/{prefix} }}\n"
            ));
        }
        iproute::nft(&self.config.node_netns, &rules)?;
        Ok(removed)
    }

    fn build_network(&self, spec: &NetworkSpec, netns: &str, mtu: u32) -> Result<()> {
        if named_namespaces()?.iter().any(|n| n == netns) {
            delete_netns(netns)?;
        }
        let status = std::process::Command::new("ip")
            .args(["netns", "add", netns])
            .status()?;
        if !status.success() {
            bail!("ip netns add {netns} failed");
        }
        let inside = Netns::Named(netns.to_owned());
        // Bridged overlay traffic need not walk the host's netfilter hooks (10-20% faster).
        if let Err(err) = iproute::sysctl(&inside, "net.bridge.bridge-nf-call-iptables", "0") {
            tracing::debug!(error = %format!("{err:#}"), "bridge-nf-call-iptables stays on");
        }
        let vxlan = vxlan_name(spec.vni);
        let node = &self.config.node_netns;
        if link_exists(node, &vxlan)? {
            iproute::batch(node, "ip", &[format!("link del {vxlan}")])?;
        }
        iproute::batch(
            node,
            "ip",
            &[
                format!(
                    "link add {vxlan} mtu {mtu} type vxlan id {} local {} dstport {} nolearning proxy",
                    spec.vni, self.config.data_addr, spec.port
                ),
                format!("link set {vxlan} netns {netns}"),
            ],
        )?;
        iproute::batch(
            &inside,
            "ip",
            &[
                "link set lo up".into(),
                format!("link add br0 mtu {mtu} type bridge"),
                format!("link set {vxlan} master br0"),
                format!("link set {vxlan} up"),
                "link set br0 up".into(),
            ],
        )
    }

    /// Connects the node itself to the ingress network (built already) with `ip`: a veth
    /// `shoal_ing` in the node's namespace. Returns its interface index.
    pub fn attach_node(&self, network_id: &str, ip: Ipv4Addr) -> Result<u32> {
        let mut state = self.state.lock().expect("overlay state");
        let sandbox = state
            .networks
            .get(network_id)
            .with_context(|| format!("network {network_id} is not set up here"))?;
        let node = &self.config.node_netns;
        if let Some(index) = self.ingress_endpoint_with(ip)? {
            // A previous agent's, still carrying flows: kept as it is.
            state.ingress_endpoint = Some(ip);
            return Ok(index);
        }
        if link_exists(node, INGRESS_ENDPOINT)? {
            iproute::batch(node, "ip", &[format!("link del {INGRESS_ENDPOINT}")])?;
        }
        let mtu = sandbox.mtu;
        iproute::batch(
            node,
            "ip",
            &[
                format!(
                    "link add {INGRESS_ENDPOINT} mtu {mtu} type veth peer name {INGRESS_ENDPOINT_PEER} netns {}",
                    sandbox.netns
                ),
                format!(
                    "link set {INGRESS_ENDPOINT} address {}",
                    format_mac(&mac_for(ip))
                ),
                format!("addr add {ip}/{} dev {INGRESS_ENDPOINT}", sandbox.spec.subnet.1),
                format!("link set {INGRESS_ENDPOINT} up"),
            ],
        )?;
        iproute::batch(
            &Netns::Named(sandbox.netns.clone()),
            "ip",
            &[format!("link set {INGRESS_ENDPOINT_PEER} master br0 up")],
        )?;
        state.ingress_endpoint = Some(ip);
        let index = iproute::read_json(node, "ip", &["-j", "link", "show", INGRESS_ENDPOINT])?
            .first()
            .and_then(|link| link["ifindex"].as_u64())
            .context("reading the ingress endpoint's interface index")?;
        Ok(index as u32)
    }

    /// The interface index of the node's ingress endpoint if it exists with address `ip`.
    fn ingress_endpoint_with(&self, ip: Ipv4Addr) -> Result<Option<u32>> {
        let wanted = ip.to_string();
        let links = iproute::read_json(
            &self.config.node_netns,
            "ip",
            &["-j", "-4", "addr", "show", "dev", INGRESS_ENDPOINT],
        )
        .unwrap_or_default();
        Ok(links
            .iter()
            .find(|link| {
                link["addr_info"]
                    .as_array()
                    .is_some_and(|infos| infos.iter().any(|i| i["local"] == wanted.as_str()))
            })
            .and_then(|link| link["ifindex"].as_u64())
            .map(|index| index as u32))
    }

    /// Takes over a task a previous agent connected (its process `pid` still runs): its
    /// interfaces are there already, named as `attach` names them; its gateway-bridge
    /// address is leased again so no new task gets it. The networks must be ensured.
    pub fn adopt(
        &self,
        task_id: &str,
        pid: u32,
        networks: &[(String, Ipv4Addr)],
    ) -> Result<Vec<TaskInterface>> {
        let task_ns = Netns::Process(pid);
        let short: String = task_id.chars().take(10).collect();
        let addresses = iproute::read_json(&task_ns, "ip", &["-j", "-4", "addr", "show"])?;
        let address_of = |ifname: &str| -> Option<Ipv4Addr> {
            addresses.iter().find(|link| link["ifname"] == ifname)?["addr_info"]
                .as_array()?
                .iter()
                .find_map(|info| info["local"].as_str()?.parse().ok())
        };
        let mut interfaces = Vec::new();
        let mut state = self.state.lock().expect("overlay state");
        for (index, (network_id, ip)) in networks.iter().enumerate() {
            let sandbox = state
                .networks
                .get(network_id)
                .with_context(|| format!("network {network_id} is not set up here"))?;
            let ifname = format!("eth{index}");
            if address_of(&ifname) != Some(*ip) {
                bail!("task {task_id} has no {ifname} with {ip}: it cannot be adopted");
            }
            interfaces.push(TaskInterface {
                ifname,
                host_side: format!("v{index}{short}"),
                netns: sandbox.netns.clone(),
                network_id: network_id.clone(),
                ip: *ip,
                mac: mac_for(*ip),
            });
        }
        if let Some(gateway) = address_of(&format!("eth{}", networks.len())) {
            state.gateway_leases.insert(task_id.to_owned(), gateway);
        }
        Ok(interfaces)
    }

    /// Removes a network this node no longer has tasks on.
    pub fn remove_network(&self, network_id: &str) -> Result<()> {
        let mut state = self.state.lock().expect("overlay state");
        let Some(sandbox) = state.networks.remove(network_id) else {
            return Ok(());
        };
        let (base, prefix) = sandbox.spec.subnet;
        delete_netns(&sandbox.netns)?;
        self.endpoints
            .lock()
            .expect("overlay endpoints")
            .retain(|_, vni| vni != sandbox.spec.vni)?;
        iproute::nft(
            &self.config.node_netns,
            &format!("delete element ip {NFT_TABLE} overlay_subnets {{ {base}/{prefix} }}\n"),
        )
    }

    /// A network built here, by ID, unique ID prefix or name.
    pub fn find(&self, key: &str) -> Option<NetworkSpec> {
        let state = self.state.lock().expect("overlay state");
        let matches: Vec<&NetworkSpec> = state
            .networks
            .values()
            .map(|n| &n.spec)
            .filter(|spec| spec.id == key || spec.name == key || spec.id.starts_with(key))
            .collect();
        match matches.as_slice() {
            [one] => Some((*one).clone()),
            _ => matches
                .iter()
                .find(|s| s.id == key || s.name == key)
                .map(|s| (*s).clone()),
        }
    }

    pub fn networks(&self) -> Vec<String> {
        let state = self.state.lock().expect("overlay state");
        state.networks.keys().cloned().collect()
    }

    /// Connects a started task (its PID 1 is `pid`) to its networks, in order, plus the
    /// gateway bridge unless every network is internal. The networks must exist.
    pub fn attach(
        &self,
        task_id: &str,
        pid: u32,
        networks: &[(String, Ipv4Addr)],
    ) -> Result<Vec<TaskInterface>> {
        let task_ns = Netns::Process(pid);
        let short: String = task_id.chars().take(10).collect();
        let mut interfaces = Vec::new();
        let mut inside = vec!["link set lo up".to_owned()];
        let mut wants_gateway = false;
        {
            let state = self.state.lock().expect("overlay state");
            for (index, (network_id, ip)) in networks.iter().enumerate() {
                let sandbox = state
                    .networks
                    .get(network_id)
                    .with_context(|| format!("network {network_id} is not set up here"))?;
                wants_gateway |= !sandbox.spec.internal;
                let ifname = format!("eth{index}");
                let host_side = format!("v{index}{short}");
                let mac = mac_for(*ip);
                let mtu = sandbox.mtu;
                iproute::batch(
                    &Netns::Named(sandbox.netns.clone()),
                    "ip",
                    &[
                        format!(
                            "link add {host_side} mtu {mtu} type veth peer name {ifname} netns {pid}"
                        ),
                        format!("link set {host_side} master br0 up"),
                    ],
                )?;
                inside.extend([
                    format!(
                        "link set {ifname} address {} mtu {mtu} up",
                        format_mac(&mac)
                    ),
                    format!("addr add {ip}/{} dev {ifname}", sandbox.spec.subnet.1),
                ]);
                if sandbox.spec.ingress {
                    let via = state
                        .ingress_endpoint
                        .context("this node has no ingress endpoint yet")?;
                    let (base, prefix) = sandbox.spec.subnet;
                    let table = INGRESS_ROUTE_TABLE;
                    inside.extend([
                        format!("rule add from {ip} lookup {table} pref {table}"),
                        format!("route add {base}/{prefix} dev {ifname} table {table}"),
                        format!("route add default via {via} dev {ifname} table {table}"),
                    ]);
                }
                interfaces.push(TaskInterface {
                    ifname,
                    host_side,
                    netns: sandbox.netns.clone(),
                    network_id: network_id.clone(),
                    ip: *ip,
                    mac,
                });
            }
        }
        if wants_gateway {
            let ifname = format!("eth{}", networks.len());
            let host_side = format!("g{short}");
            let address = self.lease_gateway_address(task_id)?;
            let node = &self.config.node_netns;
            iproute::batch(
                node,
                "ip",
                &[
                    format!("link add {host_side} type veth peer name {ifname} netns {pid}"),
                    format!("link set {host_side} master {GATEWAY_BRIDGE} up"),
                ],
            )?;
            // Tasks on the gateway bridge never talk to each other through it.
            iproute::batch(
                node,
                "bridge",
                &[format!("link set dev {host_side} isolated on")],
            )?;
            inside.extend([
                format!("link set {ifname} up"),
                format!(
                    "addr add {address}/{} dev {ifname}",
                    self.config.gateway_subnet.1
                ),
                format!("route add default via {}", self.gateway()),
            ]);
        }
        iproute::batch(&task_ns, "ip", &inside)
            .with_context(|| format!("configuring the interfaces of task {task_id}"))?;
        Ok(interfaces)
    }

    /// Forgets a task's gateway address (its veths went with its namespace).
    pub fn detach(&self, task_id: &str) {
        let mut state = self.state.lock().expect("overlay state");
        state.gateway_leases.remove(task_id);
    }

    fn lease_gateway_address(&self, task_id: &str) -> Result<Ipv4Addr> {
        let mut state = self.state.lock().expect("overlay state");
        let (base, prefix) = self.config.gateway_subnet;
        let size = 1u32 << (32 - u32::from(prefix));
        let used: std::collections::HashSet<Ipv4Addr> =
            state.gateway_leases.values().copied().collect();
        // .0 is the network, .1 the bridge, the last one broadcast.
        let free = (2..size - 1)
            .map(|offset| Ipv4Addr::from(u32::from(base) + offset))
            .find(|a| !used.contains(a))
            .context("the gateway subnet is full")?;
        state.gateway_leases.insert(task_id.to_owned(), free);
        Ok(free)
    }

    /// Programs the remote endpoints of a network (all endpoints not on this node).
    pub fn program_peers(&self, network_id: &str, desired: &BTreeMap<String, Peer>) -> Result<()> {
        let mut state = self.state.lock().expect("overlay state");
        let Some(sandbox) = state.networks.get_mut(network_id) else {
            return Ok(());
        };
        let ops = sandbox.peers.sync(desired);
        let vxlan = vxlan_name(sandbox.spec.vni);
        let mut fdb = Vec::new();
        let mut arp = Vec::new();
        for op in ops {
            match op {
                PeerOp::SetFdb { mac, vtep } => fdb.push(format!(
                    "fdb replace {} dev {vxlan} dst {vtep} self permanent",
                    format_mac(&mac)
                )),
                PeerOp::DelFdb { mac, vtep } => fdb.push(format!(
                    "fdb del {} dev {vxlan} dst {vtep} self",
                    format_mac(&mac)
                )),
                PeerOp::SetNeigh { ip, .. } => arp.push((ip, true)),
                PeerOp::DelNeigh { ip, .. } => arp.push((ip, false)),
            }
        }
        let inside = Netns::Named(sandbox.netns.clone());
        iproute::batch(&inside, "bridge", &fdb)?;
        // After the FDB: an endpoint is answered for once frames to it can leave.
        let mut endpoints = self.endpoints.lock().expect("overlay endpoints");
        for (ip, answered) in arp {
            if answered {
                endpoints.set(ip, sandbox.spec.vni)?;
            } else {
                endpoints.remove(ip)?;
            }
        }
        Ok(())
    }

    /// Where a network's namespace is (whether or not it is built here).
    pub fn netns_path(&self, network_id: &str) -> std::path::PathBuf {
        std::path::Path::new(NETNS_DIR).join(self.netns_name(network_id))
    }

    /// How many remote endpoints of a network are programmed here.
    pub fn remote_endpoints(&self, network_id: &str) -> usize {
        let state = self.state.lock().expect("overlay state");
        state
            .networks
            .get(network_id)
            .map_or(0, |sandbox| sandbox.peers.peers().count())
    }

    /// The network as programmed in the kernel now.
    pub fn inspect(&self, network_id: &str) -> Result<Option<NetworkDataplane>> {
        let state = self.state.lock().expect("overlay state");
        let Some(sandbox) = state.networks.get(network_id) else {
            return Ok(None);
        };
        let inside = Netns::Named(sandbox.netns.clone());
        let vxlan = vxlan_name(sandbox.spec.vni);
        let fdb = iproute::read_json(&inside, "bridge", &["-j", "fdb", "show", "dev", &vxlan])?
            .iter()
            .filter(|e| e["dst"].is_string())
            .map(|e| (text(&e["mac"]), text(&e["dst"])))
            .collect();
        let neighbours = self
            .endpoints
            .lock()
            .expect("overlay endpoints")
            .of_network(sandbox.spec.vni)?
            .into_iter()
            .map(|ip| (ip.to_string(), format_mac(&mac_for(ip))))
            .collect();
        Ok(Some(NetworkDataplane {
            netns: sandbox.netns.clone(),
            vxlan,
            vni: sandbox.spec.vni,
            mtu: sandbox.mtu,
            local: self.config.data_addr.to_string(),
            port: sandbox.spec.port,
            peers: sandbox
                .peers
                .peers()
                .map(|(key, peer)| ProgrammedPeer {
                    endpoint: key.to_owned(),
                    ip: peer.ip,
                    mac: format_mac(&peer.mac),
                    vtep: peer.vtep,
                })
                .collect(),
            fdb,
            neighbours,
        }))
    }
}

fn vxlan_name(vni: u32) -> String {
    format!("vx{vni}")
}

fn text(value: &serde_json::Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

fn link_exists(netns: &Netns, name: &str) -> Result<bool> {
    Ok(iproute::read_json(netns, "ip", &["-j", "link", "show"])?
        .iter()
        .any(|l| l["ifname"] == name))
}

/// The MTU of the interface holding `addr` in `netns`.
fn mtu_of_address(netns: &Netns, addr: Ipv4Addr) -> Result<u32> {
    let wanted = addr.to_string();
    iproute::read_json(netns, "ip", &["-j", "-4", "addr", "show"])?
        .iter()
        .find(|link| {
            link["addr_info"]
                .as_array()
                .is_some_and(|infos| infos.iter().any(|i| i["local"] == wanted.as_str()))
        })
        .and_then(|link| link["mtu"].as_u64())
        .map(|mtu| mtu as u32)
        .with_context(|| format!("no interface holds the data-path address {addr}"))
}

const NETNS_DIR: &str = "/run/netns";

fn named_namespaces() -> Result<Vec<String>> {
    match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => Ok(entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(err) => Err(err).context("listing network namespaces"),
    }
}

fn delete_netns(name: &str) -> Result<()> {
    let out = std::process::Command::new("ip")
        .args(["netns", "del", name])
        .output()?;
    if !out.status.success() && std::path::Path::new(NETNS_DIR).join(name).exists() {
        bail!(
            "ip netns del {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
