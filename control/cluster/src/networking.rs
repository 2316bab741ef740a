//! A node's overlay networking: the kernel side (`shoal_dataplane::overlay`) driven by what
//! gossip says. A task's networks are built when its first task arrives and removed with
//! the last; its endpoints are announced on gossip while it runs; every change gossip
//! reports about a network reprograms that network's remote peers.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::{Context as _, Result};
use shoal_dataplane::{
    mesh::{
        FlowTimeouts, MeshClock, MeshLimits, MeshPortStatus, MeshPrograms, MeshTable, Protocol,
        PublishedService, TraceRequest, TraceResult, TrackedFlow,
    },
    netlink::Netlink,
    overlay::{
        NetworkDataplane, Overlay, OverlayConfig, TaskInterface, INGRESS_ENDPOINT,
        INGRESS_ENDPOINT_PEER,
    },
    overlay_endpoints::OverlayEndpoints,
    peerdb::{mac_for, Peer},
    socket_lb::{VipEntry, VipTable},
    task::DnsSockets,
    task_hooks::{self, TaskFilter},
    vip_echo::VipEcho,
    vxlan_peers::VxlanPeers,
    PinnedTcLink,
};
use shoal_dns::{
    DnsServer, DnsStats, Forwarder, ForwarderConfig, QueryKind, Records, Resolution, ServeHandle,
    SharedRecords, TaskEndpoint, TaskScope,
};
use shoal_gossip::{
    net::{now_ms, Change, GossipHandle, GossipService},
    EndpointHealth, EndpointRecord, Gossip, GossipConfig, Keyring, PublishedPort,
};
use tokio::sync::watch;

mod neighbour_demand;
mod routable;

use super::{
    protocol::{AssignedNetwork, Assignment},
    state::{PublishMode, SourceMode},
};

/// How a task comes to its networks: started by this agent, which opened its DNS sockets, or
/// adopted from a previous one, whose task-init holds them.
#[derive(Clone, Copy)]
enum Joining<'a> {
    Started(&'a DnsSockets),
    Adopted,
}

/// One published port as `ingress ls` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct IngressPort {
    pub service: String,
    #[serde(flatten)]
    pub status: MeshPortStatus,
}

/// `ingress trace`: what the program did, and where the backend runs.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct IngressTrace {
    #[serde(flatten)]
    pub result: TraceResult,
    pub backend_task: Option<BackendTask>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BackendTask {
    pub task: String,
    pub node_id: String,
    pub node_address: IpAddr,
}

/// A new task joins its published ports once it accepts connections: probed this often,
/// for at most this long.
const READINESS_PROBE: std::time::Duration = std::time::Duration::from_millis(50);
const READINESS_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// After an agent restart, the mesh only grows for this long: gossip is still catching up,
/// and a partial view must not take published ports or backends away from live flows.
const MESH_RESTART_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// How often idle flows are looked for.
const FLOW_EXPIRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
/// How often the mesh's flow clock (`MESH_CLOCK`) is written: flow ages have this resolution.
const MESH_CLOCK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// The node's endpoint on the ingress network.
#[derive(Clone, Debug, PartialEq)]
struct IngressEndpoint {
    network_id: String,
    address: Ipv4Addr,
}

/// One VIP as `lb ls` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct LoadBalancer {
    pub service: String,
    pub network: String,
    #[serde(flatten)]
    pub entry: VipEntry,
    /// No task of the service is healthy: its backends are its unhealthy tasks.
    #[serde(default)]
    pub fail_open: bool,
}

/// `shoal dns lookup`: a task's view of a name.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DnsLookup {
    pub name: String,
    /// The networks whose names the task sees.
    pub networks: Vec<String>,
    pub answer: DnsAnswer,
    /// The node's DNS counters by outcome.
    pub stats: DnsStats,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DnsAnswer {
    /// From the cluster's records, in the order one answer would give them.
    Addresses(Vec<Ipv4Addr>),
    Pointer(String),
    /// A cluster name without records of this type.
    NoData,
    /// In the cluster's namespace but unknown to the task's networks.
    NxDomain,
    /// Not a cluster name: sent to these upstream resolvers.
    Forwarded(Vec<String>),
}

pub struct NodeNetworks {
    node_id: String,
    /// Service VIP -> backends, read by the socket load balancer.
    vips: Mutex<VipTable>,
    /// Answers pings to VIPs, and ARP for VIPs and remote endpoints, on the node's ingress
    /// endpoint (and, through `task_filters`, on every task interface).
    vip_echo: Mutex<VipEcho>,
    /// The programs put on every task interface as filters (see `task_hooks`).
    task_filters: Arc<TaskFilters>,
    /// Where the ingress endpoint's links are pinned: they outlive the agent.
    links_dir: PathBuf,
    /// The embedded DNS: one node-wide server answering in every task's namespace.
    dns: DnsServer,
    dns_records: SharedRecords,
    /// Per local task: its DNS server and the networks it sees names of.
    dns_tasks: Mutex<HashMap<String, (ServeHandle, TaskScope)>>,
    /// The VIPs programmed per network with their backends: unchanged ones are not
    /// rewritten, and those whose service is gone are removed.
    vips_by_network: Mutex<HashMap<String, BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>>>,
    /// Each network's gossip view as last programmed: the names served come from it.
    views: Mutex<HashMap<String, Vec<(String, EndpointRecord)>>>,
    vtep: IpAddr,
    gossip_addr: SocketAddr,
    overlay: Arc<Overlay>,
    /// Started with the first keyring the managers hand out.
    gossip: Mutex<Option<GossipHandle>>,
    /// Network ID -> local tasks attached to it.
    users: Mutex<HashMap<String, HashSet<String>>>,
    /// Task ID -> networks it announced an endpoint on.
    announced: Mutex<HashMap<String, Vec<String>>>,
    /// Task ID -> health, for local tasks whose service checks it: every announcement of
    /// the task carries it.
    health: Mutex<HashMap<String, EndpointHealth>>,
    /// Held across reading and rewriting a local task's records, so a health change and the
    /// publication of its ports do not undo each other.
    publishing: tokio::sync::Mutex<()>,
    /// The routing mesh: published ports and flows in the kernel, its per-packet programs,
    /// and this node's endpoint on the ingress network (with its reply program's link).
    mesh: Mutex<MeshTable>,
    /// Stamps the time flows are aged by, every second, for as long as the agent runs.
    _mesh_clock: MeshClock,
    mesh_programs: Mutex<MeshPrograms>,
    /// With the links of the mesh's reply program and of the ARP answers on its bridge side.
    ingress: Mutex<Option<(IngressEndpoint, Vec<PinnedTcLink>)>>,
    /// The nodes each network accepts VXLAN from (the ingress classifier drops the rest).
    vxlan_peers: Mutex<VxlanPeers>,
    /// Until then the mesh and the VXLAN peers keep what a previous agent programmed (see
    /// `MESH_RESTART_GRACE`).
    mesh_grace_until: tokio::time::Instant,
}

/// The programs every task interface gets, as filters: the VIP echo on all of them, and on
/// the ingress network the mesh's origin tracking too.
struct TaskFilters {
    vip_echo: TaskFilter,
    mesh: [TaskFilter; 2],
}

impl TaskFilters {
    /// The programs of a task interface, on the ingress network or another.
    fn for_interface(&self, ingress: bool) -> Vec<&TaskFilter> {
        let mut filters = vec![&self.vip_echo];
        if ingress {
            filters.extend(&self.mesh);
        }
        filters
    }

    /// Puts the programs on a new task's interface (device `index` of `netlink`).
    fn install(&self, netlink: &mut Netlink, index: u32, ingress: bool) -> Result<()> {
        task_hooks::install_on(netlink, index, &self.for_interface(ingress))
    }

    /// Replaces in place the programs of an adopted task's interface.
    fn replace(&self, interface: &TaskInterface, ingress: bool) -> Result<()> {
        let netns = Path::new(shoal_dataplane::netns::NETNS_DIR).join(&interface.netns);
        task_hooks::install(&netns, &interface.host_side, &self.for_interface(ingress))
    }
}

impl NodeNetworks {
    /// Cleans up after a previous agent and builds the gateway bridge.
    pub fn start(
        node_id: &str,
        config: OverlayConfig,
        gossip_addr: SocketAddr,
        bpffs_root: &Path,
        (advertise_interface, mesh_limits): (&str, MeshLimits),
        (dns_upstreams, follow_resolv_conf): (Vec<SocketAddr>, bool),
    ) -> Result<Self> {
        let vtep = IpAddr::V4(config.data_addr);
        let IpAddr::V4(advertise_ip) = gossip_addr.ip() else {
            anyhow::bail!("the routing mesh needs an IPv4 advertise address");
        };
        let maps_dir = &shoal_dataplane::maps_dir(bpffs_root);
        let links_dir = shoal_dataplane::task_links_dir(bpffs_root);
        std::fs::create_dir_all(&links_dir)
            .with_context(|| format!("creating {}", links_dir.display()))?;
        let mut mesh = MeshTable::open(maps_dir, mesh_limits)?;
        mesh.set_advertise(
            advertise_ip,
            nix::net::if_::if_nametoindex(advertise_interface)
                .with_context(|| format!("no interface {advertise_interface}"))?,
        )?;
        let overlay = Overlay::start(config, OverlayEndpoints::open(maps_dir)?)
            .context("setting up overlay networking")?;
        if dns_upstreams.is_empty() {
            tracing::warn!("no upstream resolvers: tasks resolve cluster names only");
        }
        let forwarder = Forwarder::new(ForwarderConfig {
            upstreams: dns_upstreams,
            ..ForwarderConfig::default()
        });
        if follow_resolv_conf {
            tokio::spawn(shoal_dns::follow_resolv_conf(
                forwarder.clone(),
                "/etc/resolv.conf".into(),
                shoal_dns::RESOLV_CONF_POLL,
            ));
        }
        let dns_records = SharedRecords::new(Records::default());
        let vip_echo = VipEcho::load(maps_dir)?;
        let mesh_programs = MeshPrograms::load(maps_dir)?;
        let task_filters = Arc::new(TaskFilters {
            vip_echo: vip_echo.task_filter()?,
            mesh: mesh_programs.task_filters()?,
        });
        Ok(Self {
            node_id: node_id.to_owned(),
            vips: Mutex::new(VipTable::open(maps_dir)?),
            vip_echo: Mutex::new(vip_echo),
            task_filters,
            links_dir,
            dns: DnsServer::new(dns_records.clone(), forwarder)
                .context("starting the embedded DNS thread")?,
            dns_records,
            dns_tasks: Mutex::default(),
            vips_by_network: Mutex::default(),
            views: Mutex::default(),
            vtep,
            gossip_addr,
            overlay: Arc::new(overlay),
            gossip: Mutex::default(),
            users: Mutex::default(),
            announced: Mutex::default(),
            health: Mutex::default(),
            publishing: tokio::sync::Mutex::default(),
            mesh: Mutex::new(mesh),
            _mesh_clock: MeshClock::start(maps_dir, MESH_CLOCK_INTERVAL)?,
            mesh_programs: Mutex::new(mesh_programs),
            ingress: Mutex::default(),
            vxlan_peers: Mutex::new(VxlanPeers::open(maps_dir)?),
            mesh_grace_until: tokio::time::Instant::now() + MESH_RESTART_GRACE,
        })
    }

    fn ingress_network(&self) -> Option<String> {
        self.ingress
            .lock()
            .expect("ingress")
            .as_ref()
            .map(|(endpoint, _)| endpoint.network_id.clone())
    }

    /// Connects this node to the ingress network with the address the managers gave it,
    /// announces that endpoint, and turns the routing mesh on. Idempotent.
    pub async fn ensure_ingress(&self, assigned: &AssignedNetwork) -> Result<()> {
        let wanted = IngressEndpoint {
            network_id: assigned.spec.id.clone(),
            address: assigned.address,
        };
        if self
            .ingress
            .lock()
            .expect("ingress")
            .as_ref()
            .is_some_and(|(endpoint, _)| *endpoint == wanted)
        {
            return Ok(());
        }
        let gossip = self
            .gossip()
            .context("gossip has not started yet (no keyring from the managers)")?;
        let overlay = Arc::clone(&self.overlay);
        let spec = assigned.spec.clone();
        let address = assigned.address;
        let ifindex = tokio::task::spawn_blocking(move || {
            overlay.ensure_network(&spec)?;
            overlay.attach_node(&spec.id, address)
        })
        .await??;
        let reply = self
            .mesh_programs
            .lock()
            .expect("mesh programs")
            .attach_reply(INGRESS_ENDPOINT, &self.links_dir)?;
        let arp = self
            .vip_echo
            .lock()
            .expect("vip echo")
            .attach_node_endpoint(
                &self.overlay.netns_path(&wanted.network_id),
                INGRESS_ENDPOINT_PEER,
                &self.links_dir,
            )?;
        self.mesh
            .lock()
            .expect("mesh")
            .set_ingress(address, ifindex)?;
        // The node itself keeps the ingress network up, with or without tasks on it.
        self.users
            .lock()
            .expect("users")
            .entry(wanted.network_id.clone())
            .or_default()
            .insert(node_endpoint_key(&self.node_id));
        gossip.join_network(&wanted.network_id).await?;
        let record = EndpointRecord {
            task_id: node_endpoint_key(&self.node_id),
            task_name: String::new(),
            service_id: String::new(),
            service_name: String::new(),
            node_id: self.node_id.clone(),
            ip: address,
            mac: mac_for(address),
            vtep: self.vtep,
            vip: None,
            ports: vec![],
            health: None,
        };
        gossip
            .publish(&wanted.network_id, &record.task_id, record.clone())
            .await?;
        let network_id = wanted.network_id.clone();
        *self.ingress.lock().expect("ingress") = Some((wanted, vec![reply, arp]));
        self.reprogram(&gossip, &network_id).await;
        tracing::info!(address = %address, "routing mesh endpoint up");
        Ok(())
    }

    /// Points every published port at the running tasks gossip lists for it that take new
    /// flows (`routable`). A flow the mesh tracks keeps its backend.
    fn program_mesh(&self, view: &[(String, EndpointRecord)]) {
        let mut wanted: BTreeMap<(Protocol, u16), PublishedService> = BTreeMap::new();
        let routable = routable::routable(view);
        for (_, record) in &routable {
            for port in &record.ports {
                let Ok(protocol) = port.protocol.parse::<Protocol>() else {
                    continue;
                };
                if port.host_mode && record.node_id != self.node_id {
                    continue;
                }
                wanted
                    .entry((protocol, port.published))
                    .or_insert_with(|| PublishedService {
                        target: port.target,
                        snat: port.snat,
                        backends: vec![],
                    })
                    .backends
                    .push(record.ip);
            }
        }
        let mut mesh = self.mesh.lock().expect("mesh");
        if tokio::time::Instant::now() < self.mesh_grace_until {
            // Gossip may not list a backend yet; one it lists as not serving (starting or
            // unhealthy) is known to be out.
            let routed: HashSet<&str> = routable.iter().map(|(key, _)| key.as_str()).collect();
            let out: HashSet<Ipv4Addr> = view
                .iter()
                .filter(|(key, _)| !routed.contains(key.as_str()))
                .map(|(_, record)| record.ip)
                .collect();
            for (key, mut kept) in mesh.programmed() {
                kept.backends.retain(|ip| !out.contains(ip));
                let entry = wanted.entry(key).or_insert_with(|| kept.clone());
                entry.backends.extend(kept.backends);
            }
        }
        if let Err(err) = mesh.sync(&wanted) {
            tracing::warn!(error = %format!("{err:#}"), "programming the routing mesh");
        }
    }

    /// Published ports with their backends and counters, read from the kernel, named by
    /// service.
    pub async fn ingress_ports(&self) -> Result<Vec<IngressPort>> {
        let ports = self.mesh.lock().expect("mesh").list()?;
        let mut names: HashMap<(String, u16), String> = HashMap::new();
        if let (Some(gossip), Some(net)) = (self.gossip(), self.ingress_network()) {
            for (_, record) in gossip.view(&net).await? {
                for port in &record.ports {
                    names.insert(
                        (port.protocol.clone(), port.published),
                        record.service_name.clone(),
                    );
                }
            }
        }
        Ok(ports
            .into_iter()
            .map(|status| IngressPort {
                service: names
                    .remove(&(status.protocol.name().to_owned(), status.published))
                    .unwrap_or_default(),
                status,
            })
            .collect())
    }

    /// `ingress trace`: runs a packet through the attached ingress program (`run`) against
    /// the live maps.
    pub fn trace(
        &self,
        request: &TraceRequest,
        run: impl FnOnce(&[u8]) -> Result<shoal_dataplane::IngressRun>,
    ) -> Result<TraceResult> {
        self.mesh.lock().expect("mesh").trace(request, run)
    }

    /// A trace with the task behind its backend, from the ingress network's gossip view.
    pub async fn name_backend(&self, result: TraceResult) -> Result<IngressTrace> {
        let mut backend_task = None;
        if let (Some(backend), Some(gossip), Some(net)) =
            (result.backend, self.gossip(), self.ingress_network())
        {
            backend_task = gossip
                .view(&net)
                .await?
                .into_iter()
                .find(|(_, record)| record.ip == *backend.ip())
                .map(|(_, record)| BackendTask {
                    task: record.task_name,
                    node_id: record.node_id,
                    node_address: record.vtep,
                });
        }
        Ok(IngressTrace {
            result,
            backend_task,
        })
    }

    /// New connections from outside refused at the gateway bridge (nftables counts them).
    pub fn gateway_refusals(&self) -> Result<shoal_dataplane::CounterStatus> {
        self.overlay.gateway_refusals()
    }

    /// The mesh flows this node translated.
    pub fn flows(&self) -> Result<Vec<TrackedFlow>> {
        self.mesh.lock().expect("mesh").flows()
    }

    pub fn gossip(&self) -> Option<GossipHandle> {
        self.gossip.lock().expect("gossip").clone()
    }

    /// Applies the managers' keyring: starts gossip the first time (joining through `seeds`,
    /// the managers and other nodes as `IP:PORT` of their manager API; gossip uses the same
    /// port everywhere), hands later keyrings to it.
    pub async fn set_keyring(
        self: &Arc<Self>,
        keys: &[String],
        seeds: &[String],
        shutdown: watch::Receiver<bool>,
    ) -> Result<()> {
        let keyring = parse_keyring(keys)?;
        let seeds: Vec<SocketAddr> = seeds
            .iter()
            .filter_map(|m| m.parse::<SocketAddr>().ok())
            .map(|m| SocketAddr::new(m.ip(), self.gossip_addr.port()))
            .collect();
        if let Some(gossip) = self.gossip() {
            return Ok(gossip.set_keyring(keyring).await?);
        }
        let config = GossipConfig::new(&self.node_id, self.gossip_addr, rand::random());
        let core = Gossip::new(config, keyring, now_ms())?;
        let handle = GossipService::start(core, self.gossip_addr)
            .await
            .with_context(|| format!("starting gossip on {}", self.gossip_addr))?;
        handle.join(seeds).await?;
        *self.gossip.lock().expect("gossip") = Some(handle.clone());
        tokio::spawn(Arc::clone(self).follow(handle, shutdown));
        Ok(())
    }

    /// Reprograms a network's peers whenever gossip reports it changed.
    async fn follow(self: Arc<Self>, gossip: GossipHandle, mut shutdown: watch::Receiver<bool>) {
        let mut changes = gossip.subscribe();
        let mut expiry = tokio::time::interval(FLOW_EXPIRY_INTERVAL);
        let grace_over = tokio::time::sleep_until(self.mesh_grace_until);
        tokio::pin!(grace_over);
        let mut grace_pending = true;
        loop {
            tokio::select! {
                () = &mut grace_over, if grace_pending => {
                    grace_pending = false;
                    self.end_restart_grace(&gossip).await;
                }
                _ = expiry.tick() => {
                    match self.mesh.lock().expect("mesh").expire(&FlowTimeouts::default()) {
                        Ok(0) => {}
                        Ok(n) => tracing::debug!(flows = n, "idle mesh flows expired"),
                        Err(err) => tracing::warn!(error = %format!("{err:#}"), "expiring mesh flows"),
                    }
                }
                changed = changes.recv() => match changed {
                    Ok(Change::Network(net)) => {
                        self.reprogram(&gossip, &net).await;
                        self.refresh_dns();
                    }
                    Ok(Change::Members) => {}
                    // Missed notifications: every network may have changed.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        for net in self.overlay.networks() {
                            self.reprogram(&gossip, &net).await;
                        }
                        self.refresh_dns();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                },
                _ = shutdown.changed() => {
                    gossip.shutdown().await;
                    return;
                }
            }
        }
    }

    /// Once gossip has had time to catch up after a start: what a previous agent left and
    /// nobody uses or lists any more goes (networks without adopted tasks, peers gone
    /// meanwhile, VXLAN peers of other networks).
    async fn end_restart_grace(&self, gossip: &GossipHandle) {
        for net in self.overlay.networks() {
            self.reprogram(gossip, &net).await;
            match self.overlay.prune_stale_peers(&net) {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(network = %net, entries = n, "removed peers that left while the agent was away")
                }
                Err(err) => {
                    tracing::warn!(network = %net, error = %format!("{err:#}"), "pruning stale peers")
                }
            }
        }
        let overlay = Arc::clone(&self.overlay);
        match tokio::task::spawn_blocking(move || overlay.remove_unused()).await {
            Ok(Ok(removed)) if !removed.is_empty() => {
                tracing::info!(namespaces = ?removed, "removed networks no task uses any more")
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::warn!(error = %format!("{err:#}"), "removing unused networks"),
            Err(err) => tracing::warn!(error = %err, "removing unused networks"),
        }
        self.forget_vxlan_peers_of_other_networks();
    }

    /// Rebuilds the DNS records from the views of every network on this node, as last
    /// programmed (`reprogram`, which every change of a view goes through first).
    fn refresh_dns(&self) {
        let mut endpoints = Vec::new();
        let networks = self.overlay.networks();
        let mut views = self.views.lock().expect("views");
        // Whichever way a network left the node, its view goes with it.
        views.retain(|net, _| networks.contains(net));
        for net in networks {
            // Names are not served on the ingress network, as in Swarm.
            let Some(spec) = self.overlay.find(&net).filter(|spec| !spec.ingress) else {
                continue;
            };
            let Some(view) = views.get(&net) else {
                continue;
            };
            let serving: HashSet<String> = routable::routable(view)
                .into_iter()
                .map(|(key, _)| key)
                .collect();
            endpoints.extend(view.iter().map(|(key, record)| TaskEndpoint {
                serving: serving.contains(key),
                network: spec.name.clone(),
                task_name: record.task_name.clone(),
                service_name: record.service_name.clone(),
                ip: record.ip,
                vip: record.vip,
            }));
        }
        drop(views);
        self.dns_records
            .replace(Records::from_endpoints(&endpoints));
    }

    /// The embedded DNS's counters by outcome, all tasks of this node together, monotonic
    /// since the agent joined the swarm (for metrics and `shoal dns stats`).
    pub fn dns_stats(&self) -> DnsStats {
        self.dns.stats()
    }

    /// What a local task asking for `name` (type A, or PTR for a reverse name) would get
    /// from the embedded DNS, and from where.
    pub fn dns_lookup(&self, task_id: &str, name: &str) -> Result<DnsLookup> {
        let networks = self
            .dns_tasks
            .lock()
            .expect("dns tasks")
            .get(task_id)
            .map(|(_, scope)| scope.networks.clone())
            .context("this task has no embedded DNS (it is on no overlay network)")?;
        let kind = if name.trim_end_matches('.').ends_with(".in-addr.arpa") {
            QueryKind::Ptr
        } else {
            QueryKind::A
        };
        let answer = match self.dns_records.load().resolve(&networks, name, kind) {
            Resolution::Addresses(ips) => DnsAnswer::Addresses(ips),
            Resolution::Pointer(name) => DnsAnswer::Pointer(name),
            Resolution::NoData => DnsAnswer::NoData,
            Resolution::NxDomain => DnsAnswer::NxDomain,
            Resolution::NotOurs => DnsAnswer::Forwarded(
                self.dns
                    .upstreams()
                    .iter()
                    .map(ToString::to_string)
                    .collect(),
            ),
        };
        Ok(DnsLookup {
            name: name.to_owned(),
            networks,
            answer,
            stats: self.dns.stats(),
        })
    }

    /// Programs what gossip lists on a network: its peers first, then the VIPs or published
    /// ports that route to them, so no new flow picks a backend frames cannot reach yet.
    async fn reprogram(&self, gossip: &GossipHandle, net: &str) {
        let view = match gossip.view(net).await {
            Ok(view) => view,
            Err(err) => {
                tracing::warn!(network = %net, error = %err, "reading the gossip view");
                return;
            }
        };
        let desired: BTreeMap<String, Peer> = view
            .iter()
            .filter(|(_, record)| record.node_id != self.node_id)
            .map(|(key, record)| {
                (
                    key.clone(),
                    Peer {
                        ip: record.ip,
                        mac: record.mac,
                        vtep: record.vtep,
                    },
                )
            })
            .collect();
        // Accepted before the FDB points at them: a peer's first frames are not dropped.
        self.accept_vxlan_from(net, &desired);
        // On this thread (its core handed to the other tasks meanwhile): a change is a few
        // netlink messages, and waking a blocking-pool thread for them costs more than they
        // do on a busy node.
        let programmed = tokio::task::block_in_place(|| self.overlay.program_peers(net, &desired));
        if let Err(err) = programmed {
            tracing::warn!(network = %net, error = %format!("{err:#}"), "programming peers failed");
        }
        if self.ingress_network().as_deref() == Some(net) {
            self.program_mesh(&view);
        } else {
            self.program_vips(net, &view);
        }
        self.views
            .lock()
            .expect("views")
            .insert(net.to_owned(), view);
    }

    /// Makes the network's VNI accept VXLAN from exactly the nodes of `peers` (only more of
    /// them during the restart grace).
    fn accept_vxlan_from(&self, net: &str, peers: &BTreeMap<String, Peer>) {
        let Some(spec) = self.overlay.find(net) else {
            return;
        };
        let vteps: BTreeSet<Ipv4Addr> = peers
            .values()
            .filter_map(|peer| match peer.vtep {
                IpAddr::V4(vtep) => Some(vtep),
                IpAddr::V6(_) => None,
            })
            .collect();
        let only_add = tokio::time::Instant::now() < self.mesh_grace_until;
        let result = self
            .vxlan_peers
            .lock()
            .expect("vxlan peers")
            .sync(spec.vni, &vteps, only_add);
        match result {
            Ok((0, 0)) => {}
            Ok((added, removed)) => {
                tracing::debug!(network = %net, vni = spec.vni, added, removed, "VXLAN peers")
            }
            Err(err) => {
                tracing::warn!(network = %net, error = %format!("{err:#}"), "programming VXLAN peers")
            }
        }
    }

    /// Refuses VXLAN on every VNI this node has no network for (left by a previous agent, or
    /// a network just removed here).
    fn forget_vxlan_peers_of_other_networks(&self) {
        let ours: BTreeSet<u32> = self
            .overlay
            .networks()
            .iter()
            .filter_map(|net| self.overlay.find(net).map(|spec| spec.vni))
            .collect();
        let mut peers = self.vxlan_peers.lock().expect("vxlan peers");
        let stale: Vec<u32> = peers
            .programmed()
            .keys()
            .filter(|vni| !ours.contains(vni))
            .copied()
            .collect();
        for vni in stale {
            if let Err(err) = peers.sync(vni, &BTreeSet::new(), false) {
                tracing::warn!(vni, error = %format!("{err:#}"), "removing VXLAN peers");
            }
        }
    }

    /// Points each VIP of the network at the running tasks gossip lists behind it that take
    /// new flows (`routable`), and drops VIPs no endpoint names any more. A VIP whose tasks
    /// are all starting stays, with no backend: it refuses connections until one is healthy.
    fn program_vips(&self, net: &str, view: &[(String, EndpointRecord)]) {
        let mut wanted: BTreeMap<Ipv4Addr, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for (_, record) in view {
            if let Some(vip) = record.vip {
                wanted.entry(vip).or_default();
            }
        }
        for (_, record) in &routable::routable(view) {
            if let Some(vip) = record.vip {
                wanted.entry(vip).or_default().insert(record.ip);
            }
        }
        let wanted: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>> = wanted
            .into_iter()
            .map(|(vip, ips)| (vip, ips.into_iter().collect()))
            .collect();
        self.apply_vips(net, wanted);
    }

    /// Brings the kernel's VIPs of one network to `wanted`. Only what the kernel took is
    /// remembered, so a failed write is retried at the next change.
    fn apply_vips(&self, net: &str, wanted: BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>) {
        let mut table = self.vips.lock().expect("vip table");
        let mut by_network = self.vips_by_network.lock().expect("vips by network");
        let programmed = by_network.entry(net.to_owned()).or_default();
        programmed.retain(|vip, _| {
            if wanted.contains_key(vip) {
                return true;
            }
            match table.remove(*vip) {
                Ok(()) => false,
                Err(err) => {
                    tracing::warn!(vip = %vip, error = %format!("{err:#}"), "removing a VIP");
                    true
                }
            }
        });
        for (vip, ips) in wanted {
            if programmed.get(&vip) == Some(&ips) {
                continue;
            }
            match table.set(vip, &ips) {
                Ok(()) => {
                    programmed.insert(vip, ips);
                }
                Err(err) => {
                    tracing::warn!(vip = %vip, error = %format!("{err:#}"), "programming a VIP")
                }
            }
        }
        if programmed.is_empty() {
            by_network.remove(net);
        }
    }

    /// The VIPs and backends the socket load balancer uses now, read from the kernel, with
    /// the service and network gossip names for each.
    pub async fn load_balancers(&self) -> Result<Vec<LoadBalancer>> {
        let entries = self.vips.lock().expect("vip table").list()?;
        let mut names: HashMap<Ipv4Addr, (String, String)> = HashMap::new();
        let mut open_vips = HashSet::new();
        if let Some(gossip) = self.gossip() {
            for net in self.overlay.networks() {
                let network = self
                    .overlay
                    .find(&net)
                    .map_or(net.clone(), |spec| spec.name);
                let view = gossip.view(&net).await?;
                let failing_open = routable::failing_open(&view);
                for (_, record) in view {
                    if let Some(vip) = record.vip {
                        if failing_open.contains(&record.service_id) {
                            open_vips.insert(vip);
                        }
                        names.insert(vip, (record.service_name, network.clone()));
                    }
                }
            }
        }
        Ok(entries
            .into_iter()
            .map(|entry| {
                let (service, network) = names.remove(&entry.vip).unwrap_or_default();
                LoadBalancer {
                    service,
                    network,
                    fail_open: open_vips.contains(&entry.vip),
                    entry,
                }
            })
            .collect())
    }

    /// Builds the task's networks (when it is the first here), connects the task's
    /// namespace (`pid`) to them and announces its endpoints.
    /// `dns`: the task's DNS sockets, which the agent opened in its namespace. `ready` (the
    /// start gate) is called once the task's own network and DNS are ready (its interfaces,
    /// the peers and VIPs known so far, its DNS served), before its endpoints are announced:
    /// its command starts while gossip carries them.
    pub async fn connect(
        self: &Arc<Self>,
        task: &Assignment,
        pid: u32,
        dns: &DnsSockets,
        ready: impl FnOnce() -> Result<()> + Send,
    ) -> Result<()> {
        self.join(task, pid, Joining::Started(dns), ready).await
    }

    /// Takes over a task a previous agent connected, whose interfaces are still there:
    /// its networks are adopted (or built), its interfaces' filters given this agent's
    /// programs in place,
    /// its endpoints announced again and its DNS served again.
    pub async fn readopt(self: &Arc<Self>, task: &Assignment, pid: u32) -> Result<()> {
        self.join(task, pid, Joining::Adopted, || Ok(())).await
    }

    async fn join(
        self: &Arc<Self>,
        task: &Assignment,
        pid: u32,
        joining: Joining<'_>,
        ready: impl FnOnce() -> Result<()> + Send,
    ) -> Result<()> {
        let adopt = matches!(joining, Joining::Adopted);
        if task.networks.is_empty() {
            return ready();
        }
        let gossip = self
            .gossip()
            .context("gossip has not started yet (no keyring from the managers)")?;
        // The networks this task brings to the node: none of its tasks used them before.
        let mut joined = Vec::new();
        for network in &task.networks {
            // Kernel work on this thread, as below: a start waits for no other thread.
            tokio::task::block_in_place(|| self.overlay.ensure_network(&network.spec))?;
            let first = {
                let mut users = self.users.lock().expect("users");
                let users = users.entry(network.spec.id.clone()).or_default();
                users.insert(task.task_id.clone());
                users.len() == 1
            };
            if first {
                joined.push(network.spec.id.clone());
            }
            gossip.join_network(&network.spec.id).await?;
        }
        let task_id = &task.task_id;
        let wanted: Vec<_> = task
            .networks
            .iter()
            .map(|n| (n.spec.id.clone(), n.address))
            .collect();
        // From the task's own networks, not from whether this node's endpoint is up yet.
        let ingress_networks: HashSet<&str> = task
            .networks
            .iter()
            .filter(|n| n.spec.ingress)
            .map(|n| n.spec.id.as_str())
            .collect();
        let on_ingress =
            |interface: &TaskInterface| ingress_networks.contains(interface.network_id.as_str());
        let (overlay, filters) = (&self.overlay, &self.task_filters);
        let interfaces = tokio::task::block_in_place(|| {
            let interfaces = if adopt {
                let interfaces = overlay.adopt(task_id, pid, &wanted)?;
                for interface in &interfaces {
                    filters.replace(interface, on_ingress(interface))?;
                }
                interfaces
            } else {
                overlay.attach(task_id, pid, &wanted, &|netlink, index, interface| {
                    filters.install(netlink, index, on_ingress(interface))
                })?
            };
            if adopt {
                // Links an agent before task filters pinned for it: its filters run now.
                shoal_dataplane::release_task_links(&self.links_dir, &|task| task != task_id)?;
            }
            anyhow::Ok(interfaces)
        })?;
        // A checked task takes no new flow before its first passing probe; an adopted one
        // was serving, and keeps serving until a probe says otherwise.
        let health = task.healthcheck.as_ref().map(|_| match adopt {
            true => EndpointHealth::Healthy,
            false => EndpointHealth::Starting,
        });
        if let Some(health) = health {
            self.health
                .lock()
                .expect("health")
                .insert(task.task_id.clone(), health);
        }
        if !adopt {
            // Peers, VIPs and names learned before this node joined a network are programmed
            // before the command runs (on a network the node was on, `follow` keeps them);
            // its own records follow once it runs.
            for network in &joined {
                self.reprogram(&gossip, network).await;
            }
            if !joined.is_empty() {
                self.refresh_dns();
            }
            self.serve_dns(task, pid, joining).await?;
            ready()?;
        }
        let mut ready_ports = Vec::new();
        let ingress = self.ingress_network();
        for interface in &interfaces {
            let vip = task
                .networks
                .iter()
                .find(|n| n.spec.id == interface.network_id)
                .and_then(|n| n.vip);
            let mut record = EndpointRecord {
                task_id: task.task_id.clone(),
                task_name: task.name.clone(),
                service_id: task.service_id.clone(),
                service_name: task.service_name.clone(),
                node_id: self.node_id.clone(),
                ip: interface.ip,
                mac: interface.mac,
                vtep: self.vtep,
                vip,
                ports: vec![],
                health,
            };
            let published: Vec<PublishedPort> =
                if ingress.as_deref() == Some(interface.network_id.as_str()) {
                    task.ports
                        .iter()
                        .map(|p| PublishedPort {
                            protocol: p.protocol.name().to_owned(),
                            published: p.published,
                            target: p.target,
                            host_mode: p.mode == PublishMode::Host,
                            snat: p.source == SourceMode::Snat,
                        })
                        .collect()
                } else {
                    vec![]
                };
            if adopt {
                // Serving already: announced with its ports at once, so no node takes it out
                // of its Maglev rows (moving new flows) while the new agent probes it again.
                record.ports = published;
            } else if !published.is_empty() {
                ready_ports.push((interface.network_id.clone(), record.clone(), published));
            }
            gossip
                .publish(&interface.network_id, &task.task_id, record)
                .await?;
            // A new record is a change gossip reports: `follow` programs it (here, and on
            // every node) with its names. An adopted task's may be the one gossip has already
            // (no change): the peers learned before this agent joined the network, and its
            // own VIP backends, are programmed now.
            if adopt {
                self.reprogram(&gossip, &interface.network_id).await;
            }
        }
        self.announced.lock().expect("announced").insert(
            task.task_id.clone(),
            interfaces.into_iter().map(|i| i.network_id).collect(),
        );
        if adopt {
            self.refresh_dns();
        }
        for (network, record, ports) in ready_ports {
            tokio::spawn(Arc::clone(self).publish_when_listening(network, record, ports));
        }
        if adopt {
            // It runs already: `ready` (nothing to open) is for a started task.
            self.serve_dns(task, pid, joining).await?;
        }
        Ok(())
    }

    /// Adds a task to its published ports' backends once it accepts connections on their
    /// TCP target ports (UDP ones cannot be probed), so no new flow reaches a task that is
    /// still starting: a rolling update has no refused connections. Gives up (the task
    /// stays out of the mesh, with a warning) after `READINESS_LIMIT`.
    async fn publish_when_listening(
        self: Arc<Self>,
        network: String,
        mut record: EndpointRecord,
        ports: Vec<PublishedPort>,
    ) {
        let started = tokio::time::Instant::now();
        for port in ports.iter().filter(|p| p.protocol == "tcp") {
            let target = SocketAddr::new(IpAddr::V4(record.ip), port.target);
            loop {
                let attempt =
                    tokio::time::timeout(READINESS_PROBE, tokio::net::TcpStream::connect(target));
                if matches!(attempt.await, Ok(Ok(_))) {
                    break;
                }
                if started.elapsed() > READINESS_LIMIT {
                    tracing::warn!(task = %record.task_name, port = port.target, "not listening: left out of the routing mesh");
                    return;
                }
                tokio::time::sleep(READINESS_PROBE).await;
            }
        }
        let still_running = self
            .announced
            .lock()
            .expect("announced")
            .contains_key(&record.task_id);
        let Some(gossip) = self.gossip().filter(|_| still_running) else {
            return;
        };
        let _publishing = self.publishing.lock().await;
        record.ports = ports;
        record.health = self.health_of(&record.task_id);
        let key = record.task_id.clone();
        if let Err(err) = gossip.publish(&network, &key, record).await {
            tracing::warn!(task = %key, error = %format!("{err:#}"), "publishing a task's ports");
        }
    }

    fn health_of(&self, task_id: &str) -> Option<EndpointHealth> {
        self.health.lock().expect("health").get(task_id).copied()
    }

    /// A local task's health changed: its records say so at once, here and, as gossip
    /// carries them, on every node, which route by it (`routable`) without waiting for the
    /// managers.
    pub async fn set_health(&self, task_id: &str, health: EndpointHealth) {
        let _publishing = self.publishing.lock().await;
        {
            let mut known = self.health.lock().expect("health");
            match known.get_mut(task_id) {
                Some(current) => *current = health,
                // Withdrawn meanwhile: nothing to say.
                None => return,
            }
        }
        let networks = self
            .announced
            .lock()
            .expect("announced")
            .get(task_id)
            .cloned()
            .unwrap_or_default();
        let Some(gossip) = self.gossip() else {
            return;
        };
        for net in networks {
            let current = match gossip.view(&net).await {
                Ok(view) => view.into_iter().find(|(key, _)| key == task_id),
                Err(err) => {
                    tracing::warn!(task = %task_id, error = %err, "reading a task's endpoint");
                    None
                }
            };
            let Some((_, mut record)) = current else {
                continue;
            };
            record.health = Some(health);
            if let Err(err) = gossip.publish(&net, task_id, record).await {
                tracing::warn!(task = %task_id, error = %format!("{err:#}"), "announcing a task's health");
            }
        }
    }

    /// Answers on the task's DNS sockets (127.0.0.11:53, UDP and TCP) for the task's networks.
    async fn serve_dns(&self, task: &Assignment, pid: u32, joining: Joining<'_>) -> Result<()> {
        // task-init holds them too, so they outlive this agent: queries wait for the next one.
        let DnsSockets { udp, tcp } = match joining {
            Joining::Started(dns) => dns.try_clone()?,
            Joining::Adopted => shoal_dataplane::task::take_dns_sockets(pid)
                .await
                .context("taking the task's DNS sockets at 127.0.0.11:53")?,
        };
        // Shared with task-init's copies, which it never reads.
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let scope = TaskScope {
            networks: task
                .networks
                .iter()
                .filter(|n| !n.spec.ingress)
                .map(|n| n.spec.name.clone())
                .collect(),
        };
        let handle = self.dns.serve(udp, tcp, scope.clone())?;
        self.dns_tasks
            .lock()
            .expect("dns tasks")
            .insert(task.task_id.clone(), (handle, scope));
        Ok(())
    }

    /// Unpins the links an earlier agent pinned for tasks not in `adopted` (they ended, or
    /// the managers no longer want them): one pass over the pins (see
    /// `shoal_dataplane::release_task_links`).
    pub fn release_task_links_except(&self, adopted: &HashSet<String>) {
        let keep = |task: &str| adopted.contains(task);
        if let Err(err) = shoal_dataplane::release_task_links(&self.links_dir, &keep) {
            tracing::warn!(error = %format!("{err:#}"), "unpinning the links of ended tasks");
        }
    }

    /// Withdraws a task's endpoints (VIPs stop choosing it, here at once and elsewhere as
    /// gossip carries it), leaving its interfaces in place so its connections can finish.
    pub async fn withdraw(&self, task_id: &str) {
        let _publishing = self.publishing.lock().await;
        self.health.lock().expect("health").remove(task_id);
        let announced = self
            .announced
            .lock()
            .expect("announced")
            .remove(task_id)
            .unwrap_or_default();
        let Some(gossip) = self.gossip() else {
            return;
        };
        for net in &announced {
            if let Err(err) = gossip.withdraw(net, task_id).await {
                tracing::warn!(task = %task_id, error = %format!("{err:#}"), "withdrawing an endpoint");
            }
        }
    }

    /// Removes what is left of the interfaces of a task a previous agent started and that
    /// ended while no agent ran (its namespace may outlive it): the gateway veth, and veths
    /// on the networks built here so far.
    pub fn forget_leftover(&self, task_id: &str) {
        if let Err(err) = self.overlay.detach(task_id) {
            tracing::warn!(task = %task_id, error = %format!("{err:#}"), "removing a leftover task's interfaces");
        }
    }

    /// Withdraws a finished task's endpoints and removes networks no local task uses.
    pub async fn disconnect(&self, task_id: &str) {
        let gossip = self.gossip();
        self.withdraw(task_id).await;
        self.dns_tasks.lock().expect("dns tasks").remove(task_id);
        // Its filters go with its veths.
        let overlay = Arc::clone(&self.overlay);
        let id = task_id.to_owned();
        let detached = tokio::task::spawn_blocking(move || overlay.detach(&id)).await;
        if let Err(err) = detached.map_err(anyhow::Error::from).and_then(|r| r) {
            tracing::warn!(task = %task_id, error = %format!("{err:#}"), "detaching a task");
        }
        let unused: Vec<String> = {
            let mut users = self.users.lock().expect("users");
            for tasks in users.values_mut() {
                tasks.remove(task_id);
            }
            let unused = users
                .iter()
                .filter(|(_, tasks)| tasks.is_empty())
                .map(|(net, _)| net.clone())
                .collect();
            users.retain(|_, tasks| !tasks.is_empty());
            unused
        };
        let removed_any = !unused.is_empty();
        for net in unused {
            if let Some(gossip) = &gossip {
                let _ = gossip.leave_network(&net).await;
            }
            // No local task can use the network's VIPs any more.
            self.apply_vips(&net, BTreeMap::new());
            let overlay = Arc::clone(&self.overlay);
            let id = net.clone();
            let removed = tokio::task::spawn_blocking(move || overlay.remove_network(&id)).await;
            if let Err(err) = removed.map_err(anyhow::Error::from).and_then(|r| r) {
                tracing::warn!(network = %net, error = %format!("{err:#}"), "removing a network");
            }
        }
        if removed_any {
            self.forget_vxlan_peers_of_other_networks();
        }
    }

    /// The network as programmed on this node (by ID or name), if it is here.
    pub fn inspect(&self, network: &str) -> Result<Option<NetworkDataplane>> {
        match self.overlay.find(network) {
            Some(spec) => self.overlay.inspect(&spec.id),
            None => Ok(None),
        }
    }

    /// A network's ID from its name or ID, for networks this node is on.
    pub fn local_id(&self, network: &str) -> Option<String> {
        self.overlay.find(network).map(|spec| spec.id)
    }

    /// Removes every network, the gateway bridge and its rules (leaving the swarm).
    pub async fn remove_all(&self) -> Result<()> {
        let gossip = self.gossip.lock().expect("gossip").take();
        if let Some(gossip) = gossip {
            gossip.shutdown().await;
        }
        let overlay = Arc::clone(&self.overlay);
        tokio::task::spawn_blocking(move || overlay.remove_all()).await??;
        self.forget_vxlan_peers_of_other_networks();
        if let Some((_, links)) = self.ingress.lock().expect("ingress").take() {
            for link in links {
                link.release()?;
            }
        }
        shoal_dataplane::release_task_links(&self.links_dir, &|_| false)?;
        Ok(())
    }
}

/// The gossip key of a node's own ingress endpoint (task IDs never contain `/`).
fn node_endpoint_key(node_id: &str) -> String {
    format!("node/{node_id}")
}

fn parse_keyring(keys: &[String]) -> Result<Keyring> {
    let keys = keys
        .iter()
        .map(|hex| {
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
                .collect::<Result<Vec<u8>, _>>()
                .context("a gossip key is not hex")?;
            <[u8; 32]>::try_from(bytes).map_err(|_| anyhow::anyhow!("a gossip key is not 32 bytes"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Keyring::new(keys)?)
}
