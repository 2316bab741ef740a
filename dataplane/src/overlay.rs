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
    netlink::{LinkChange, Netlink, PeerNs, Route, Rule, Veth, Vxlan, MAIN_TABLE},
    netns::{self, Netns, NETNS_DIR},
    nft,
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

/// What `Overlay::attach` runs on each new task interface before it is up, with a netlink
/// socket in the interface's namespace and its index there. It runs under the overlay's
/// state lock: it must not call back into the `Overlay`.
pub type PrepareInterface<'a> = dyn Fn(&mut Netlink, u32, &TaskInterface) -> Result<()> + 'a;

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
    /// A socket in the network's namespace, kept for its life.
    netlink: Netlink,
    bridge_index: u32,
    vxlan_index: u32,
    /// Built by a previous agent: the kernel may hold entries of peers gone since, removed
    /// by `prune_stale_peers` once gossip has been heard.
    adopted: bool,
}

#[derive(Default)]
struct State {
    networks: HashMap<String, NetworkSandbox>,
    /// Gateway-bridge addresses in use, by task ID.
    gateway_leases: BTreeMap<String, Ipv4Addr>,
    /// The host ends of each task's veths on its networks' bridges: (network ID, name).
    task_links: HashMap<String, Vec<(String, String)>>,
    /// Tasks being attached or adopted now, and (true) whether they were detached meanwhile:
    /// a task stopped while starting is detached while its attach still runs on a blocking
    /// thread, which then undoes what it made.
    attaching: HashMap<String, bool>,
    /// This node's address on the ingress network, once its endpoint exists.
    ingress_endpoint: Option<Ipv4Addr>,
}

pub struct Overlay {
    config: OverlayConfig,
    underlay_mtu: u32,
    /// A socket in the node's namespace.
    node: Mutex<Netlink>,
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
        let mut node = Netlink::open_in(&config.node_netns)
            .with_context(|| format!("opening a netlink socket in {}", config.node_netns))?;
        let underlay_mtu = mtu_of_address(&mut node, config.data_addr)?;
        let overlay = Self {
            config,
            underlay_mtu,
            node: Mutex::new(node),
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

    fn node(&self) -> std::sync::MutexGuard<'_, Netlink> {
        self.node.lock().expect("node netlink socket")
    }

    /// The gateway bridge's MAC: fixed, locally administered, derived from its address. Left
    /// to itself the kernel gives a bridge the lowest MAC of its ports, which changes as
    /// tasks' veths come and go, and the tasks' ARP caches then point at an address the bridge
    /// no longer has until they expire (up to a minute and more of lost traffic out).
    fn gateway_mac(&self) -> [u8; 6] {
        let [a, b, c, d] = self.gateway().octets();
        [0x02, 0x53, a, b, c, d]
    }

    fn setup_gateway(&self) -> Result<()> {
        let node = &self.config.node_netns;
        let (base, prefix) = self.config.gateway_subnet;
        let mac = self.gateway_mac();
        {
            let mut netlink = self.node();
            let index = match netlink.link(GATEWAY_BRIDGE)? {
                Some(link) => {
                    // A previous agent's bridge may have the kernel's changing MAC.
                    if link.mac != Some(mac) {
                        netlink.set_link(
                            link.index,
                            &LinkChange {
                                mac: Some(mac),
                                ..LinkChange::default()
                            },
                        )?;
                    }
                    link.index
                }
                None => {
                    netlink.add_bridge(GATEWAY_BRIDGE, None, Some(mac))?;
                    netlink.index_of(GATEWAY_BRIDGE)?
                }
            };
            netlink.replace_address(index, self.gateway(), prefix)?;
            netlink.set_link(
                index,
                &LinkChange {
                    up: Some(true),
                    ..LinkChange::default()
                },
            )?;
        }
        netns::sysctl(node, "net/ipv4/ip_forward", "1")?;
        // One transaction: the chains are replaced whole (a new agent's rules take effect),
        // the set of overlay subnets and the counter are kept (adopted networks stay in it).
        nft::apply(
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
        let out = nft::output(
            &self.config.node_netns,
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

    /// Deletes every network namespace of this agent, the gateway bridge and its rules,
    /// carrying on past a failure and reporting them all.
    pub fn remove_all(&self) -> Result<()> {
        let mut errors = ErrorList::default();
        // The node's links first: deleting a namespace removes the peer of `shoal_ing`, and
        // the kernel then deletes `shoal_ing` itself asynchronously, racing a check-then-delete.
        {
            let mut netlink = self.node();
            for link in [GATEWAY_BRIDGE, INGRESS_ENDPOINT] {
                match netlink.link(link) {
                    Ok(Some(found)) => match netlink.del_link(found.index) {
                        Err(err) if !err.is_not_found() => errors.push(err.into()),
                        _ => {}
                    },
                    Ok(None) => {}
                    Err(err) => errors.push(err.into()),
                }
            }
        }
        let prefix = format!("{}ov-", self.config.netns_prefix);
        match netns::named() {
            Ok(names) => {
                for name in names.iter().filter(|n| n.starts_with(&prefix)) {
                    errors.note(netns::delete_named(name));
                }
            }
            Err(err) => errors.push(err),
        }
        {
            let mut state = self.state.lock().expect("overlay state");
            state.networks.clear();
            state.ingress_endpoint = None;
        }
        errors.note(
            self.endpoints
                .lock()
                .expect("overlay endpoints")
                .retain(|_, _| false),
        );
        errors.note(nft::apply(
            &self.config.node_netns,
            &format!("add table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n"),
        ));
        errors.into_result("removing the overlay")
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
        let mut netlink = Netlink::open_in(&Netns::Named(netns.clone()))?;
        let bridge_index = netlink.index_of("br0")?;
        let vxlan_index = netlink.index_of(&vxlan_name(spec.vni))?;
        let (base, prefix) = spec.subnet;
        nft::apply(
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
                netlink,
                bridge_index,
                vxlan_index,
                adopted,
            },
        );
        Ok(())
    }

    /// Whether a previous agent left this network's namespace with its VXLAN device (a
    /// namespace without it is half-built: rebuilt).
    fn left_by_previous_agent(&self, spec: &NetworkSpec, netns: &str) -> Result<bool> {
        if !netns::named()?.iter().any(|n| n == netns) {
            return Ok(false);
        }
        Ok(Netlink::open_in(&Netns::Named(netns.to_owned()))?
            .link(&vxlan_name(spec.vni))?
            .is_some())
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
        let macs: HashSet<[u8; 6]> = sandbox.peers.peers().map(|(_, peer)| peer.mac).collect();
        let ips: HashSet<Ipv4Addr> = sandbox.peers.peers().map(|(_, peer)| peer.ip).collect();
        let vxlan = sandbox.vxlan_index;
        let mut errors = ErrorList::default();
        let mut removed = 0;
        for entry in sandbox.netlink.fdb(vxlan)? {
            let Some(dst) = entry.dst.filter(|_| !macs.contains(&entry.mac)) else {
                continue;
            };
            match sandbox.netlink.fdb_del(vxlan, entry.mac, dst) {
                Ok(()) => removed += 1,
                Err(err) => errors.push(err.into()),
            }
        }
        for entry in sandbox.netlink.neighbours(vxlan)? {
            if ips.contains(&entry.ip) {
                continue;
            }
            match sandbox.netlink.neighbour_del(vxlan, entry.ip) {
                Ok(()) => removed += 1,
                Err(err) => errors.push(err.into()),
            }
        }
        errors.into_result("pruning stale peers")?;
        let vni = sandbox.spec.vni;
        let answers = self
            .endpoints
            .lock()
            .expect("overlay endpoints")
            .retain(|ip, of| of != vni || ips.contains(&ip))?;
        Ok(removed + answers)
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
        let mut errors = ErrorList::default();
        for name in netns::named()? {
            if name.starts_with(&prefix) && !ours.contains(&name) {
                match netns::delete_named(&name) {
                    Ok(()) => removed.push(name),
                    Err(err) => errors.push(err),
                }
            }
        }
        errors.note(
            self.endpoints
                .lock()
                .expect("overlay endpoints")
                .retain(|_, vni| vnis.contains(&vni)),
        );
        let mut rules = format!("flush set ip {NFT_TABLE} overlay_subnets\n");
        for (base, prefix) in subnets {
            rules.push_str(&format!(
                "add element ip {NFT_TABLE} overlay_subnets {{ {base}/{prefix} }}\n"
            ));
        }
        errors.note(nft::apply(&self.config.node_netns, &rules));
        errors.into_result("removing unused networks")?;
        Ok(removed)
    }

    fn build_network(&self, spec: &NetworkSpec, netns: &str, mtu: u32) -> Result<()> {
        if netns::named()?.iter().any(|n| n == netns) {
            netns::delete_named(netns)?;
        }
        netns::create_named(netns)?;
        let inside = Netns::Named(netns.to_owned());
        // Bridged overlay traffic need not walk the host's netfilter hooks (10-20% faster).
        if let Err(err) = netns::sysctl(&inside, "net/bridge/bridge-nf-call-iptables", "0") {
            tracing::debug!(error = %format!("{err:#}"), "bridge-nf-call-iptables stays on");
        }
        let vxlan = vxlan_name(spec.vni);
        let netns_file = open_named(netns)?;
        {
            // Made in the node's namespace, so its UDP socket is there; then moved.
            let mut node = self.node();
            if let Some(stale) = node.link(&vxlan)? {
                node.del_link(stale.index)?;
            }
            node.add_vxlan(&Vxlan {
                name: &vxlan,
                vni: spec.vni,
                local: self.config.data_addr,
                port: spec.port,
                mtu,
            })?;
            let index = node.index_of(&vxlan)?;
            node.set_link(
                index,
                &LinkChange {
                    netns: Some(&netns_file),
                    ..LinkChange::default()
                },
            )?;
        }
        let mut netlink = Netlink::open_in(&inside)?;
        let lo = netlink.index_of("lo")?;
        netlink.set_link(
            lo,
            &LinkChange {
                up: Some(true),
                ..LinkChange::default()
            },
        )?;
        netlink.add_bridge("br0", Some(mtu), None)?;
        let bridge = netlink.index_of("br0")?;
        let index = netlink.index_of(&vxlan)?;
        netlink.set_link(
            index,
            &LinkChange {
                up: Some(true),
                controller: Some(bridge),
                ..LinkChange::default()
            },
        )?;
        Ok(())
    }

    /// Connects the node itself to the ingress network (built already): a veth `shoal_ing`
    /// in the node's namespace. Returns its interface index.
    pub fn attach_node(&self, network_id: &str, ip: Ipv4Addr) -> Result<u32> {
        let mut state = self.state.lock().expect("overlay state");
        let sandbox = state
            .networks
            .get_mut(network_id)
            .with_context(|| format!("network {network_id} is not set up here"))?;
        let mut node = self.node();
        if let Some(existing) = node.link(INGRESS_ENDPOINT)? {
            let holds = node
                .addresses()?
                .iter()
                .any(|a| a.index == existing.index && a.ip == ip);
            if holds {
                // A previous agent's, still carrying flows: kept as it is.
                state.ingress_endpoint = Some(ip);
                return Ok(existing.index);
            }
            node.del_link(existing.index)?;
        }
        let netns_file = open_named(&sandbox.netns)?;
        node.add_veth(&Veth {
            name: INGRESS_ENDPOINT,
            mtu: Some(sandbox.mtu),
            mac: Some(mac_for(ip)),
            controller: None,
            peer: INGRESS_ENDPOINT_PEER,
            peer_ns: PeerNs::Fd(&netns_file),
            peer_mac: None,
            up: true,
        })?;
        let index = node.index_of(INGRESS_ENDPOINT)?;
        node.add_address(index, ip, sandbox.spec.subnet.1)?;
        let peer = sandbox.netlink.index_of(INGRESS_ENDPOINT_PEER)?;
        let bridge = sandbox.bridge_index;
        sandbox.netlink.set_link(
            peer,
            &LinkChange {
                up: Some(true),
                controller: Some(bridge),
                ..LinkChange::default()
            },
        )?;
        state.ingress_endpoint = Some(ip);
        Ok(index)
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
        self.unless_detached(task_id, || self.adopt_interfaces(task_id, pid, networks))
    }

    fn adopt_interfaces(
        &self,
        task_id: &str,
        pid: u32,
        networks: &[(String, Ipv4Addr)],
    ) -> Result<Vec<TaskInterface>> {
        let names = TaskLinkNames::of(task_id);
        let mut task = Netlink::open_in(&Netns::Process(pid))?;
        let links = task.links()?;
        let addresses = task.addresses()?;
        let address_of = |ifname: &str| -> Option<Ipv4Addr> {
            let link = links.iter().find(|link| link.name == ifname)?;
            Some(addresses.iter().find(|a| a.index == link.index)?.ip)
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
                host_side: names.network(index),
                netns: sandbox.netns.clone(),
                network_id: network_id.clone(),
                ip: *ip,
                mac: mac_for(*ip),
            });
        }
        if let Some(gateway) = address_of(&format!("eth{}", networks.len())) {
            state.gateway_leases.insert(task_id.to_owned(), gateway);
        }
        state
            .task_links
            .insert(task_id.to_owned(), host_sides(&interfaces));
        Ok(interfaces)
    }

    /// Removes a network this node no longer has tasks on.
    pub fn remove_network(&self, network_id: &str) -> Result<()> {
        let mut state = self.state.lock().expect("overlay state");
        let Some(sandbox) = state.networks.remove(network_id) else {
            return Ok(());
        };
        let (base, prefix) = sandbox.spec.subnet;
        let mut errors = ErrorList::default();
        errors.note(netns::delete_named(&sandbox.netns));
        errors.note(
            self.endpoints
                .lock()
                .expect("overlay endpoints")
                .retain(|_, vni| vni != sandbox.spec.vni),
        );
        errors.note(nft::apply(
            &self.config.node_netns,
            &format!("delete element ip {NFT_TABLE} overlay_subnets {{ {base}/{prefix} }}\n"),
        ));
        errors.into_result(&format!("removing network {}", sandbox.spec.name))
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
    /// `prepare` is given each network interface (its netlink socket and index) before it
    /// is up: where its filters go.
    ///
    /// The order avoids every RCU grace period the kernel can be spared (each one a few
    /// hundred microseconds on a busy node, in the task's start): a task's veth is made down,
    /// with one queue each way; its task end is looked up (which runs the link event pending
    /// from its creation while it is down, so no queue deactivation) and brought up; its
    /// filters go on the network end while that is down; that end comes up last, turning the
    /// carrier on for both at once.
    pub fn attach(
        &self,
        task_id: &str,
        pid: u32,
        networks: &[(String, Ipv4Addr)],
        prepare: &PrepareInterface<'_>,
    ) -> Result<Vec<TaskInterface>> {
        self.unless_detached(task_id, || {
            self.attach_interfaces(task_id, pid, networks, prepare)
        })
    }

    /// Runs an attach or adoption of `task_id`; if the task is detached meanwhile (it was
    /// stopped while starting), undoes what it made once it is done.
    fn unless_detached(
        &self,
        task_id: &str,
        attach: impl FnOnce() -> Result<Vec<TaskInterface>>,
    ) -> Result<Vec<TaskInterface>> {
        let state = || self.state.lock().expect("overlay state");
        state().attaching.insert(task_id.to_owned(), false);
        let attached = attach();
        if state().attaching.remove(task_id) == Some(true) {
            self.detach(task_id)?;
            bail!("task {task_id} was stopped while its interfaces were being made");
        }
        attached
    }

    fn attach_interfaces(
        &self,
        task_id: &str,
        pid: u32,
        networks: &[(String, Ipv4Addr)],
        prepare: &PrepareInterface<'_>,
    ) -> Result<Vec<TaskInterface>> {
        let names = TaskLinkNames::of(task_id);
        let mut interfaces = Vec::new();
        // One socket inside the task's namespace; the veths are made from the other side,
        // their task ends created there already named and addressed, and brought up from it.
        let mut task = netns::run_in(&Netns::Process(pid), || {
            without_ipv6_on_new_interfaces()?;
            Ok(Netlink::open()?)
        })
        .with_context(|| format!("entering the namespace of task {task_id}"))?;
        let up = LinkChange {
            up: Some(true),
            ..LinkChange::default()
        };
        let lo = task.index_of("lo")?;
        task.set_link(lo, &up)?;
        let mut wants_gateway = false;
        {
            let mut guard = self.state.lock().expect("overlay state");
            let state = &mut *guard;
            let ingress_endpoint = state.ingress_endpoint;
            for (index, (network_id, ip)) in networks.iter().enumerate() {
                let sandbox = state
                    .networks
                    .get_mut(network_id)
                    .with_context(|| format!("network {network_id} is not set up here"))?;
                wants_gateway |= !sandbox.spec.internal;
                let ifname = format!("eth{index}");
                let host_side = names.network(index);
                let mac = mac_for(*ip);
                let bridge = sandbox.bridge_index;
                sandbox.netlink.add_veth(&Veth {
                    name: &host_side,
                    mtu: Some(sandbox.mtu),
                    mac: None,
                    controller: Some(bridge),
                    peer: &ifname,
                    peer_ns: PeerNs::Pid(pid),
                    peer_mac: Some(mac),
                    up: false,
                })?;
                // Recorded at once, so that `detach` removes it even if the attach fails.
                state
                    .task_links
                    .entry(task_id.to_owned())
                    .or_default()
                    .push((network_id.clone(), host_side.clone()));
                let eth = task.index_of(&ifname)?;
                task.set_link(eth, &up)?;
                task.add_address(eth, *ip, sandbox.spec.subnet.1)?;
                if sandbox.spec.ingress {
                    let via = ingress_endpoint.context("this node has no ingress endpoint yet")?;
                    let (base, prefix) = sandbox.spec.subnet;
                    let table = INGRESS_ROUTE_TABLE;
                    task.add_rule(&Rule {
                        from: *ip,
                        prefix: 32,
                        table,
                        priority: table,
                    })?;
                    task.add_route(&Route {
                        destination: base,
                        prefix,
                        gateway: None,
                        oif: Some(eth),
                        table,
                    })?;
                    task.add_route(&Route {
                        destination: Ipv4Addr::UNSPECIFIED,
                        prefix: 0,
                        gateway: Some(via),
                        oif: Some(eth),
                        table,
                    })?;
                }
                let interface = TaskInterface {
                    ifname,
                    host_side,
                    netns: sandbox.netns.clone(),
                    network_id: network_id.clone(),
                    ip: *ip,
                    mac,
                };
                let host = sandbox.netlink.index_of(&interface.host_side)?;
                prepare(&mut sandbox.netlink, host, &interface)?;
                sandbox.netlink.set_link(host, &up)?;
                interfaces.push(interface);
            }
        }
        if wants_gateway {
            let ifname = format!("eth{}", networks.len());
            let host_side = names.gateway();
            let address = self.lease_gateway_address(task_id)?;
            {
                let mut node = self.node();
                let bridge = node.index_of(GATEWAY_BRIDGE)?;
                node.add_veth(&Veth {
                    name: &host_side,
                    mtu: None,
                    mac: None,
                    controller: Some(bridge),
                    peer: &ifname,
                    peer_ns: PeerNs::Pid(pid),
                    peer_mac: None,
                    up: false,
                })?;
                // Tasks on the gateway bridge never talk to each other through it.
                let port = node.index_of(&host_side)?;
                node.set_port_isolated(port, true)?;
                let eth = task.index_of(&ifname)?;
                task.set_link(eth, &up)?;
                task.add_address(eth, address, self.config.gateway_subnet.1)?;
                node.set_link(port, &up)?;
            }
            task.add_route(&Route {
                destination: Ipv4Addr::UNSPECIFIED,
                prefix: 0,
                gateway: Some(self.gateway()),
                oif: None,
                table: MAIN_TABLE,
            })?;
        }
        Ok(interfaces)
    }

    /// Removes an ended task's veths (their task ends go with them) and frees its gateway
    /// address. Its namespace, and the veths with it, can outlive the task (a socket still
    /// closing, a handle someone holds): a veth left on a bridge keeps answering for the
    /// task's address, which a new task on another node may have been given by then.
    /// Without a record of its veths (an adoption that failed), they are looked for by name
    /// on every network here.
    pub fn detach(&self, task_id: &str) -> Result<()> {
        let names = TaskLinkNames::of(task_id);
        let mut errors = ErrorList::default();
        {
            let mut guard = self.state.lock().expect("overlay state");
            let state = &mut *guard;
            if let Some(detached) = state.attaching.get_mut(task_id) {
                *detached = true;
            }
            match state.task_links.remove(task_id) {
                Some(links) => {
                    for (network_id, name) in links {
                        if let Some(sandbox) = state.networks.get_mut(&network_id) {
                            errors.note(delete_link(&mut sandbox.netlink, &name));
                        }
                    }
                }
                None => {
                    for sandbox in state.networks.values_mut() {
                        errors.note(delete_task_links(&mut sandbox.netlink, &names));
                    }
                }
            }
            state.gateway_leases.remove(task_id);
        }
        errors.note(delete_link(&mut self.node(), &names.gateway()));
        errors.into_result(&format!("removing the interfaces of task {task_id}"))
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
        let vxlan = sandbox.vxlan_index;
        let mut arp = Vec::new();
        for op in ops {
            match op {
                PeerOp::SetFdb { mac, vtep } => sandbox.netlink.fdb_replace(vxlan, mac, vtep)?,
                PeerOp::DelFdb { mac, vtep } => match sandbox.netlink.fdb_del(vxlan, mac, vtep) {
                    Err(err) if !err.is_not_found() => return Err(err.into()),
                    _ => {}
                },
                PeerOp::SetNeigh { ip, .. } => arp.push((ip, true)),
                PeerOp::DelNeigh { ip, .. } => arp.push((ip, false)),
            }
        }
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
        let mut state = self.state.lock().expect("overlay state");
        let Some(sandbox) = state.networks.get_mut(network_id) else {
            return Ok(None);
        };
        let vxlan = vxlan_name(sandbox.spec.vni);
        let fdb = sandbox
            .netlink
            .fdb(sandbox.vxlan_index)?
            .into_iter()
            .filter_map(|e| Some((format_mac(&e.mac), e.dst?.to_string())))
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

/// The MTU of the interface holding `addr`.
fn mtu_of_address(netlink: &mut Netlink, addr: Ipv4Addr) -> Result<u32> {
    let index = netlink
        .addresses()?
        .into_iter()
        .find(|a| a.ip == addr)
        .map(|a| a.index)
        .with_context(|| format!("no interface holds the data-path address {addr}"))?;
    netlink
        .links()?
        .into_iter()
        .find(|link| link.index == index)
        .map(|link| link.mtu)
        .with_context(|| format!("reading the MTU of the interface holding {addr}"))
}

fn open_named(name: &str) -> Result<std::fs::File> {
    let path = std::path::Path::new(NETNS_DIR).join(name);
    std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))
}

/// Deletes a link by name, if it is there (gone with its namespace already is fine).
fn delete_link(netlink: &mut Netlink, name: &str) -> Result<()> {
    let Some(link) = netlink.link(name)? else {
        return Ok(());
    };
    delete_index(netlink, link.index, name)
}

fn delete_index(netlink: &mut Netlink, index: u32, name: &str) -> Result<()> {
    match netlink.del_link(index) {
        Err(err) if err.is_not_found() => Ok(()),
        deleted => deleted.with_context(|| format!("deleting {name}")),
    }
}

/// The names of a task's veths on the network side: `v<network index><short ID>` in each
/// network's namespace, `g<short ID>` on the gateway bridge (15 bytes at most, the kernel's
/// limit).
struct TaskLinkNames {
    short: String,
}

impl TaskLinkNames {
    fn of(task_id: &str) -> Self {
        Self {
            short: task_id.chars().take(10).collect(),
        }
    }

    fn network(&self, index: usize) -> String {
        format!("v{index}{}", self.short)
    }

    fn gateway(&self) -> String {
        format!("g{}", self.short)
    }

    /// Whether `name` is one of this task's network-side veths.
    fn is_network(&self, name: &str) -> bool {
        name.strip_prefix('v')
            .and_then(|rest| rest.strip_suffix(self.short.as_str()))
            .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// Deletes a task's veths in a network's namespace, found by name (see [`TaskLinkNames`]).
fn delete_task_links(netlink: &mut Netlink, names: &TaskLinkNames) -> Result<()> {
    for link in netlink
        .links()?
        .into_iter()
        .filter(|l| names.is_network(&l.name))
    {
        delete_index(netlink, link.index, &link.name)?;
    }
    Ok(())
}

/// The host ends of a task's interfaces, as `task_links` keeps them.
fn host_sides(interfaces: &[TaskInterface]) -> Vec<(String, String)> {
    interfaces
        .iter()
        .map(|i| (i.network_id.clone(), i.host_side.clone()))
        .collect()
}

/// Every error of a teardown that carried on past them (netavark's `NetavarkErrorList`).
#[derive(Default)]
struct ErrorList(Vec<anyhow::Error>);

impl ErrorList {
    fn push(&mut self, err: anyhow::Error) {
        self.0.push(err);
    }

    fn note<T>(&mut self, result: Result<T>) {
        if let Err(err) = result {
            self.push(err);
        }
    }

    fn into_result(self, what: &str) -> Result<()> {
        match self.0.as_slice() {
            [] => Ok(()),
            [one] => Err(anyhow::anyhow!("{what}: {one:#}")),
            many => {
                let list: Vec<String> = many.iter().map(|e| format!("{e:#}")).collect();
                bail!("{what}: {} errors: {}", many.len(), list.join("; "))
            }
        }
    }
}

/// In the calling thread's network namespace: interfaces made from now on get no IPv6. The
/// overlays carry IPv4 only, so a task's interfaces need no link-local address, and send no
/// router solicitation, MLD report or duplicate-address probe into them (Docker does the same
/// for a container on IPv4-only networks); `lo` keeps `::1`. A kernel without IPv6 has
/// nothing to turn off.
fn without_ipv6_on_new_interfaces() -> Result<()> {
    match std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1") {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).context("turning IPv6 off for the task's interfaces")
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::TaskLinkNames;

    #[test]
    fn a_tasks_veths_are_named_and_found_by_its_short_id() {
        let names = TaskLinkNames::of("abcdefghij0123456789");
        assert_eq!(names.network(0), "v0abcdefghij");
        assert_eq!(names.network(12), "v12abcdefghij");
        assert_eq!(names.gateway(), "gabcdefghij");
        assert!(names.network(15).len() <= 15, "the kernel's name limit");
        assert!(names.is_network("v0abcdefghij") && names.is_network("v12abcdefghij"));
        for other in [
            "vabcdefghij",
            "gabcdefghij",
            "v0abcdefghik",
            "v0xabcdefghij",
            "eth0",
        ] {
            assert!(!names.is_network(other), "{other}");
        }
    }
}
