//! User side of the routing mesh (`ebpf/src/programs/mesh_*.rs`): the published-port table with
//! each service's Maglev row, the node's ingress endpoint in the settings, the programs on the
//! ingress endpoint and on tasks' ingress interfaces, and the flow table (`conntrack ls`, expiry).
//!
//! Maglev rows live in one mmap-able array (`MESH_MAGLEV`, `max_services × table_size` slots
//! of backend addresses; the kernel lays array elements out 8 bytes apart): a change writes
//! only the slots that move, straight into the kernel's memory, with no system call per
//! slot. A slot always holds a valid backend, so a packet racing a change sees the old or the
//! new owner of its slot, never a hole. The published ports (`MESH_PORTS`, a slot per TCP and
//! per UDP port, one word each) are stored the same way.
//!
//! The programs read flow ages off `MESH_CLOCK`, which the agent ticks every second
//! (`MeshClock`): no clock helper call per packet.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use anyhow::{bail, Context as _, Result};
use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{SchedClassifier, TcAttachType},
    Ebpf, EbpfLoader,
};
use serde::{Deserialize, Serialize};
use shoal_common::{
    names, FlowKey, IngressSettings, MeshCounters, MeshFlow, MeshService, ReplyKey,
    FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_RST, MESH_HAS_BACKENDS, MESH_PORT_SLOTS,
    MESH_PUBLISHED, MESH_SNAT,
};

use crate::{
    maglev,
    netlink::TcHook,
    task_hooks::{self, TaskFilter},
    PinnedTcLink,
};

/// Transport protocols the mesh publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            6 => Some(Protocol::Tcp),
            17 => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

impl std::str::FromStr for Protocol {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        match text {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            other => bail!("protocol {other:?}: expected tcp or udp"),
        }
    }
}

/// Sizes of the mesh's kernel tables, fixed when the maps are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeshLimits {
    /// Published ports served at once.
    pub max_services: u32,
    /// Maglev slots per service: a prime; within 1% balance while ≥ 100 × backends.
    pub table_size: u32,
}

impl Default for MeshLimits {
    fn default() -> Self {
        Self {
            max_services: shoal_common::MESH_MAX_SERVICES,
            table_size: shoal_common::MESH_DEFAULT_TABLE_SIZE,
        }
    }
}

impl MeshLimits {
    /// Largest `MESH_MAGLEV` accepted: 256 MiB of kernel memory (8 bytes per slot).
    const MAX_SLOTS: u64 = 32 << 20;

    pub fn validate(&self) -> Result<()> {
        if !maglev::is_valid_table_size(self.table_size) {
            bail!("{}", maglev::MaglevError::InvalidTableSize(self.table_size));
        }
        if self.max_services == 0 {
            bail!("the mesh needs room for at least one published port");
        }
        let slots = u64::from(self.max_services) * u64::from(self.table_size);
        if slots > Self::MAX_SLOTS {
            bail!(
                "{} published ports × {} Maglev slots = {slots} slots: more than the {} allowed (8 bytes each)",
                self.max_services,
                self.table_size,
                Self::MAX_SLOTS
            );
        }
        Ok(())
    }

    pub(crate) fn slots(&self) -> u32 {
        self.max_services * self.table_size
    }
}

/// What the mesh does with one published port on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedService {
    pub target: u16,
    /// Replace the client's address with the node's ingress address.
    pub snat: bool,
    /// Task addresses on the ingress network; order does not matter.
    pub backends: Vec<Ipv4Addr>,
}

/// A published port as the kernel holds it, for `ingress ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshPortStatus {
    pub protocol: Protocol,
    pub published: u16,
    pub target: u16,
    pub snat: bool,
    pub row: u32,
    /// Each backend and the Maglev slots it owns.
    pub backends: Vec<(Ipv4Addr, u32)>,
    pub counters: MeshServiceCounters,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshServiceCounters {
    pub flows: u64,
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Packets left to the kernel: no backend, no free SNAT port, flow tables full.
    pub no_backend: u64,
    pub snat_exhausted: u64,
    pub flow_table_full: u64,
    /// Packets dropped because their rewrite or redirect failed.
    pub rewrite_failed: u64,
}

/// One tracked flow, for `conntrack ls`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackedFlow {
    pub protocol: Protocol,
    pub client: SocketAddrV4,
    /// The node address and published port the client reached.
    pub published: SocketAddrV4,
    pub backend: SocketAddrV4,
    /// The source the backend sees: the client, or the node's ingress address in SNAT mode.
    pub source: SocketAddrV4,
    pub state: String,
    pub idle_secs: u64,
}

/// What `ingress trace` asks: a packet from `source` to `destination`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    pub protocol: Protocol,
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
}

/// What the attached ingress program did with the traced packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceResult {
    /// `redirect` (into the ingress network), `pass` (to the kernel) or `drop`.
    pub verdict: String,
    pub return_code: u32,
    /// The packet as it left the program: `proto src -> dst`.
    pub packet_in: String,
    pub packet_out: String,
    /// The backend the flow goes to, and the source it sees, when redirected.
    pub backend: Option<SocketAddrV4>,
    pub source_seen: Option<SocketAddrV4>,
    /// Whether the flow was already tracked (then the table decided, not Maglev).
    pub tracked: bool,
    /// The classifier's verdict: `mesh`, or why it refused or left the packet (a drop
    /// reason, as `dataplane status` counts them).
    pub reason: String,
    /// The Maglev slot of the flow's hash (when the port is published).
    pub slot: Option<u32>,
}

/// The packet `ingress trace` runs: a TCP SYN (a new connection) or a UDP datagram.
pub fn trace_packet(request: &TraceRequest) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(
            request.source.ip().octets(),
            request.destination.ip().octets(),
            64,
        );
    let mut out = Vec::new();
    let written = match request.protocol {
        Protocol::Tcp => builder
            .tcp(request.source.port(), request.destination.port(), 1, 65_535)
            .syn()
            .write(&mut out, &[]),
        Protocol::Udp => builder
            .udp(request.source.port(), request.destination.port())
            .write(&mut out, b"shoal trace"),
    };
    written.expect("writing to a Vec cannot fail");
    out
}

/// `proto src -> dst` of an Ethernet/IPv4 TCP or UDP frame, or what it is not.
pub fn describe(frame: &[u8]) -> String {
    match etherparse::SlicedPacket::from_ethernet(frame) {
        Ok(packet) => {
            let ips = match &packet.net {
                Some(etherparse::NetSlice::Ipv4(ip)) => {
                    Some((ip.header().source_addr(), ip.header().destination_addr()))
                }
                _ => None,
            };
            let ports = match &packet.transport {
                Some(etherparse::TransportSlice::Tcp(t)) => {
                    Some(("tcp", t.source_port(), t.destination_port()))
                }
                Some(etherparse::TransportSlice::Udp(u)) => {
                    Some(("udp", u.source_port(), u.destination_port()))
                }
                _ => None,
            };
            match (ips, ports) {
                (Some((src, dst)), Some((proto, sport, dport))) => {
                    format!("{proto} {src}:{sport} -> {dst}:{dport}")
                }
                _ => "not IPv4 TCP/UDP".to_owned(),
            }
        }
        Err(err) => format!("unparsable: {err}"),
    }
}

/// How long an idle flow is kept (LRU eviction bounds the table besides). A forgotten flow
/// is not cut: its next packet is balanced again by the same Maglev row, which still gives
/// the same backend unless the backends changed meanwhile.
#[derive(Clone, Copy, Debug)]
pub struct FlowTimeouts {
    /// TCP after RST, or FIN both ways.
    pub closed_secs: u64,
    /// TCP after a FIN one way.
    pub closing_secs: u64,
    /// TCP otherwise.
    pub established_secs: u64,
    pub udp_secs: u64,
}

impl Default for FlowTimeouts {
    fn default() -> Self {
        Self {
            closed_secs: 10,
            closing_secs: 3_600,
            established_secs: 86_400,
            udp_secs: 300,
        }
    }
}

struct Row {
    index: u32,
    service: PublishedService,
}

/// The pinned mesh maps of one agent.
pub struct MeshTable {
    ports: MappedArray,
    settings: Array<MapData, IngressSettings>,
    /// When this table was opened: flows are never older than that for expiry, since the
    /// clock stood still while no agent ticked it.
    opened_ns: u64,
    flows: HashMap<MapData, FlowKey, MeshFlow>,
    replies: HashMap<MapData, ReplyKey, FlowKey>,
    counters: PerCpuArray<MapData, MeshCounters>,
    slots: MappedArray,
    limits: MeshLimits,
    rows: BTreeMap<(Protocol, u16), Row>,
}

impl MeshTable {
    /// Opens the maps an agent's dataplane pinned under `maps_dir`, and takes over the rows
    /// a previous agent left (so its flows keep their backends).
    pub fn open(maps_dir: &Path, limits: MeshLimits) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = maps_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        let mut table = Self {
            ports: MappedArray::map(&maps_dir.join(names::MESH_PORTS), MESH_PORT_SLOTS)?,
            settings: Array::try_from(open(names::INGRESS_SETTINGS)?)?,
            opened_ns: monotonic_ns()?,
            flows: HashMap::try_from(open(names::MESH_FLOWS)?)?,
            replies: HashMap::try_from(open(names::MESH_REPLIES)?)?,
            counters: PerCpuArray::try_from(open(names::MESH_COUNTERS)?)?,
            slots: MappedArray::map(&maps_dir.join(names::MESH_MAGLEV), limits.slots())?,
            limits,
            rows: BTreeMap::new(),
        };
        table.recover()?;
        Ok(table)
    }

    fn recover(&mut self) -> Result<()> {
        for slot in 0..MESH_PORT_SLOTS {
            let entry = MeshService::from_word(self.ports.get(slot));
            if entry.flags & MESH_PUBLISHED == 0 {
                continue;
            }
            if entry.index >= self.limits.max_services {
                // A row this table does not have (maps from other limits): unpublish.
                self.ports.set(slot, 0);
                continue;
            }
            let backends: BTreeSet<Ipv4Addr> = self
                .slots
                .row(entry.index, self.limits.table_size)
                .iter()
                .map(|ip| ip.load(Ordering::Relaxed))
                .filter(|ip| *ip != 0)
                .map(|ip| from_key(ip as u32))
                .collect();
            self.rows.insert(
                slot_port(slot),
                Row {
                    index: entry.index,
                    service: PublishedService {
                        target: u16::from_be(entry.target_port),
                        snat: entry.flags & MESH_SNAT != 0,
                        backends: backends.into_iter().collect(),
                    },
                },
            );
        }
        Ok(())
    }

    /// Where the mesh answers and replies leave: the advertise address and interface.
    pub fn set_advertise(&mut self, ip: Ipv4Addr, ifindex: u32) -> Result<()> {
        let table_size = self.limits.table_size;
        self.update_settings(|settings| {
            settings.advertise_ip = to_key(ip);
            settings.advertise_ifindex = ifindex;
            settings.table_size = table_size;
        })
    }

    /// The node's endpoint on the ingress network: its address (the SNAT source) and the
    /// interface new flows are sent into. Until it is set, published ports are left to the
    /// kernel; a restarted agent keeps the previous one until it sets its own.
    pub fn set_ingress(&mut self, ip: Ipv4Addr, ifindex: u32) -> Result<()> {
        self.update_settings(|settings| {
            settings.ingress_ip = to_key(ip);
            settings.ingress_ifindex = ifindex;
        })
    }

    /// Changes the settings entry, writing it only when it changes: a map update is a copy
    /// a packet on another CPU may read half-done, so an agent that restarts with the same
    /// settings must not rewrite them under live traffic.
    fn update_settings(&mut self, change: impl FnOnce(&mut IngressSettings)) -> Result<()> {
        let current = self.settings.get(&0, 0)?;
        let mut updated = current;
        change(&mut updated);
        if updated != current {
            self.settings.set(0, updated, 0)?;
        }
        Ok(())
    }

    /// Brings the published ports to `wanted`: rows of new ports are written before their
    /// port entry appears, changed rows only where slots move, removed ports disappear
    /// before their row is reused.
    pub fn sync(&mut self, wanted: &BTreeMap<(Protocol, u16), PublishedService>) -> Result<()> {
        let gone: Vec<(Protocol, u16)> = self
            .rows
            .keys()
            .filter(|key| !wanted.contains_key(key))
            .copied()
            .collect();
        for key in gone {
            self.ports.set(port_slot(key), 0);
            self.counters_reset(self.rows[&key].index)?;
            self.rows.remove(&key);
        }
        for (&key, service) in wanted {
            let mut service = service.clone();
            service.backends.sort();
            service.backends.dedup();
            if self
                .rows
                .get(&key)
                .is_some_and(|row| row.service == service)
            {
                continue;
            }
            let index = match self.rows.get(&key) {
                Some(row) => row.index,
                None => self.free_row()?,
            };
            self.write_row(index, &service.backends).with_context(|| {
                format!("building the Maglev row of {}/{}", key.1, key.0.name())
            })?;
            let mut flags = MESH_PUBLISHED;
            if !service.backends.is_empty() {
                flags |= MESH_HAS_BACKENDS;
            }
            if service.snat {
                flags |= MESH_SNAT;
            }
            let entry = MeshService {
                index,
                flags,
                target_port: service.target.to_be(),
            };
            if !self.rows.contains_key(&key) {
                self.counters_reset(index)?;
            }
            self.ports.set(port_slot(key), entry.to_word());
            self.rows.insert(key, Row { index, service });
        }
        Ok(())
    }

    /// The published ports as programmed now.
    pub fn programmed(&self) -> BTreeMap<(Protocol, u16), PublishedService> {
        self.rows
            .iter()
            .map(|(key, row)| (*key, row.service.clone()))
            .collect()
    }

    fn free_row(&self) -> Result<u32> {
        let used: BTreeSet<u32> = self.rows.values().map(|row| row.index).collect();
        (0..self.limits.max_services)
            .find(|index| !used.contains(index))
            .with_context(|| {
                format!(
                    "the mesh serves at most {} published ports (agent setting mesh_max_services)",
                    self.limits.max_services
                )
            })
    }

    fn write_row(&mut self, index: u32, backends: &[Ipv4Addr]) -> Result<()> {
        let size = self.limits.table_size;
        let keys: Vec<[u8; 4]> = backends.iter().map(|ip| ip.octets()).collect();
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_slice()).collect();
        let table = maglev::build_table(&refs, size)?;
        let row = self.slots.row(index, size);
        if backends.is_empty() {
            row.iter().for_each(|slot| slot.store(0, Ordering::Relaxed));
            return Ok(());
        }
        for (slot, owner) in row.iter().zip(table) {
            let ip = u64::from(to_key(backends[usize::from(owner)]));
            if slot.load(Ordering::Relaxed) != ip {
                slot.store(ip, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn counters_reset(&mut self, index: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, err)| err)?;
        let zero = aya::maps::PerCpuValues::try_from(vec![MeshCounters::default(); cpus])?;
        self.counters.set(index, zero, 0)?;
        Ok(())
    }

    /// Every published port, its backends' share of the row and its counters.
    pub fn list(&self) -> Result<Vec<MeshPortStatus>> {
        let mut out = Vec::new();
        for (&(protocol, published), row) in &self.rows {
            let mut owners: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
            for ip in self.slots.row(row.index, self.limits.table_size) {
                let ip = ip.load(Ordering::Relaxed);
                if ip != 0 {
                    *owners.entry(from_key(ip as u32)).or_default() += 1;
                }
            }
            let per_cpu = self.counters.get(&row.index, 0)?;
            let sum = |f: fn(&MeshCounters) -> u64| per_cpu.iter().map(f).sum();
            out.push(MeshPortStatus {
                protocol,
                published,
                target: row.service.target,
                snat: row.service.snat,
                row: row.index,
                backends: owners.into_iter().collect(),
                counters: MeshServiceCounters {
                    flows: sum(|c| c.flows),
                    packets_in: sum(|c| c.packets_in),
                    bytes_in: sum(|c| c.bytes_in),
                    packets_out: sum(|c| c.packets_out),
                    bytes_out: sum(|c| c.bytes_out),
                    no_backend: sum(|c| c.no_backend),
                    snat_exhausted: sum(|c| c.snat_exhausted),
                    flow_table_full: sum(|c| c.flow_table_full),
                    rewrite_failed: sum(|c| c.rewrite_failed),
                },
            });
        }
        Ok(out)
    }

    /// Runs the traced packet through `run` (the attached ingress program, by
    /// BPF_PROG_TEST_RUN against the live maps) and says what happened. A flow the trace
    /// created is removed again, so tracing leaves the table as it was.
    pub fn trace(
        &mut self,
        request: &TraceRequest,
        run: impl FnOnce(&[u8]) -> Result<crate::IngressRun>,
    ) -> Result<TraceResult> {
        let key = FlowKey {
            client_ip: to_key(*request.source.ip()),
            node_ip: to_key(*request.destination.ip()),
            client_port: request.source.port().to_be(),
            published_port: request.destination.port().to_be(),
            protocol: request.protocol.number(),
            _pad: 0,
            _pad2: 0,
        };
        let before = self.flows.get(&key, 0).ok();
        let frame = trace_packet(request);
        let crate::IngressRun {
            code,
            frame: out,
            verdict,
        } = run(&frame)?;
        let after = self.flows.get(&key, 0).ok();
        if before.is_none() {
            if let Some(flow) = after {
                self.forget(&key, &flow);
            }
        }
        let slot = self
            .rows
            .contains_key(&(request.protocol, request.destination.port()))
            .then(|| {
                shoal_common::flow_hash(
                    key.client_ip,
                    key.client_port,
                    key.published_port,
                    key.protocol,
                ) % self.limits.table_size
            });
        let redirected = code == 7;
        Ok(TraceResult {
            verdict: match code {
                0 => "pass",
                2 => "drop",
                7 => "redirect",
                _ => "other",
            }
            .to_owned(),
            return_code: code,
            packet_in: describe(&frame),
            packet_out: describe(&out),
            backend: after
                .filter(|_| redirected)
                .map(|f| socket(f.backend_ip, f.backend_port)),
            source_seen: after
                .filter(|_| redirected)
                .map(|f| socket(f.source_ip, f.source_port)),
            tracked: before.is_some(),
            reason: verdict.name().to_owned(),
            slot,
        })
    }

    fn forget(&mut self, key: &FlowKey, flow: &MeshFlow) {
        let reply = ReplyKey {
            backend_ip: flow.backend_ip,
            peer_ip: flow.source_ip,
            backend_port: flow.backend_port,
            peer_port: flow.source_port,
            protocol: key.protocol,
            _pad: 0,
            _pad2: 0,
        };
        // Either may be gone already (LRU): that is the state we want.
        let _ = self.flows.remove(key);
        let _ = self.replies.remove(&reply);
    }

    /// A flow's last packet for ageing: never before this table opened, as the clock the
    /// programs stamp flows with stood still while no agent ticked it.
    fn last_seen(&self, flow: &MeshFlow) -> u64 {
        flow.last_seen_ns.max(self.opened_ns)
    }

    /// The flows this node translated, newest activity first.
    pub fn flows(&self) -> Result<Vec<TrackedFlow>> {
        let now = monotonic_ns()?;
        let mut out = Vec::new();
        for item in self.flows.iter() {
            let (key, flow) = item?;
            let Some(protocol) = Protocol::from_number(key.protocol) else {
                continue;
            };
            out.push(TrackedFlow {
                protocol,
                client: socket(key.client_ip, key.client_port),
                published: socket(key.node_ip, key.published_port),
                backend: socket(flow.backend_ip, flow.backend_port),
                source: socket(flow.source_ip, flow.source_port),
                state: flow_state(protocol, flow.state).to_owned(),
                idle_secs: now.saturating_sub(self.last_seen(&flow)) / 1_000_000_000,
            });
        }
        out.sort_by_key(|f| f.idle_secs);
        Ok(out)
    }

    /// Removes flows idle for longer than their state allows; returns how many.
    pub fn expire(&mut self, timeouts: &FlowTimeouts) -> Result<usize> {
        let now = monotonic_ns()?;
        let mut expired = Vec::new();
        for item in self.flows.iter() {
            let (key, flow) = item?;
            let limit = if key.protocol == Protocol::Udp.number() {
                timeouts.udp_secs
            } else if flow.state & FLOW_RST != 0
                || flow.state & (FLOW_FIN_CLIENT | FLOW_FIN_BACKEND)
                    == FLOW_FIN_CLIENT | FLOW_FIN_BACKEND
            {
                timeouts.closed_secs
            } else if flow.state != 0 {
                timeouts.closing_secs
            } else {
                timeouts.established_secs
            };
            if now.saturating_sub(self.last_seen(&flow)) > limit * 1_000_000_000 {
                expired.push((key, flow));
            }
        }
        for (key, flow) in &expired {
            self.forget(key, flow);
        }
        Ok(expired.len())
    }
}

fn flow_state(protocol: Protocol, state: u32) -> &'static str {
    if protocol == Protocol::Udp {
        return "udp";
    }
    match (
        state & FLOW_RST != 0,
        state & FLOW_FIN_CLIENT != 0,
        state & FLOW_FIN_BACKEND != 0,
    ) {
        (true, _, _) => "reset",
        (false, true, true) => "closed",
        (false, true, false) => "fin-client",
        (false, false, true) => "fin-backend",
        (false, false, false) => "established",
    }
}

/// Writes `MESH_CLOCK` every `interval` on a thread of its own, from `start` until dropped,
/// whatever else the agent is busy with (flows are stamped with it).
pub struct MeshClock {
    clock: std::sync::Arc<MappedArray>,
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MeshClock {
    pub fn start(maps_dir: &Path, interval: std::time::Duration) -> Result<Self> {
        let clock = std::sync::Arc::new(MappedArray::map(&maps_dir.join(names::MESH_CLOCK), 1)?);
        clock.set(0, monotonic_ns()?);
        let ticking = std::sync::Arc::clone(&clock);
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mesh-clock".into())
            .spawn(move || {
                while stopped.recv_timeout(interval)
                    == Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                {
                    if let Ok(now) = monotonic_ns() {
                        ticking.set(0, now);
                    }
                }
            })
            .context("starting the mesh clock thread")?;
        Ok(Self {
            clock,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Writes the time now, between two ticks.
    pub fn tick(&self) -> Result<()> {
        self.clock.set(0, monotonic_ns()?);
        Ok(())
    }
}

impl Drop for MeshClock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A BPF_F_MMAPABLE array map of 8-byte values (`MESH_MAGLEV`, `MESH_PORTS`, `MESH_CLOCK`;
/// the kernel lays elements out 8 bytes apart) mapped into the agent's memory, each value
/// as a little-endian word (x86, arm64 and BPF are all little-endian here). Aligned 8-byte
/// stores and loads are single-copy atomic, for the agent and for the programs alike.
struct MappedArray {
    base: NonNull<AtomicU64>,
    len: usize,
}

// SAFETY: the mapping is owned by this value; its words are atomics.
unsafe impl Send for MappedArray {}
unsafe impl Sync for MappedArray {}

impl MappedArray {
    fn map(pin: &Path, entries: u32) -> Result<Self> {
        let data = MapData::from_pin(pin)
            .with_context(|| format!("opening pinned map {}", pin.display()))?;
        let max = data.info()?.max_entries();
        if max != entries {
            bail!(
                "{} holds {max} entries, the agent's settings want {entries}: run `shoal dataplane cleanup` after changing mesh limits",
                pin.display()
            );
        }
        let len = entries as usize;
        let bytes = (len * 8).next_multiple_of(page_size());
        // SAFETY: mapping a BPF_F_MMAPABLE array by its fd, shared, for its whole size.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping {}", pin.display()));
        }
        Ok(Self {
            base: NonNull::new(base.cast()).context("mmap returned null")?,
            len,
        })
    }

    fn words(&self) -> &[AtomicU64] {
        // SAFETY: the mapping holds `len` aligned words and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }

    /// `size` consecutive entries from `index × size` (a Maglev row).
    fn row(&self, index: u32, size: u32) -> &[AtomicU64] {
        let start = index as usize * size as usize;
        &self.words()[start..start + size as usize]
    }

    fn get(&self, index: u32) -> u64 {
        self.words()[index as usize].load(Ordering::Acquire)
    }

    fn set(&self, index: u32, value: u64) {
        self.words()[index as usize].store(value, Ordering::Release);
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe {
            libc::munmap(
                self.base.as_ptr().cast(),
                (self.len * 8).next_multiple_of(page_size()),
            );
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096)
}

/// The mesh's per-packet programs, loaded once: the reply program's link is pinned, the task
/// programs are filters the kernel keeps (see `task_hooks`).
pub struct MeshPrograms {
    ebpf: Ebpf,
}

impl MeshPrograms {
    pub fn load(maps_dir: &Path) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(maps_dir)
            .load(crate::EBPF_OBJECT)
            .context("loading shoal's eBPF object")?;
        for name in [
            names::MESH_REPLY,
            names::MESH_TO_TASK,
            names::MESH_FROM_TASK,
        ] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("{name} missing from the eBPF object"))?
                .try_into()?;
            program
                .load()
                .with_context(|| format!("loading {name} into the kernel (verifier)"))?;
        }
        Ok(Self { ebpf })
    }

    /// Runs one of the mesh programs (`names::MESH_*`) on a frame with BPF_PROG_TEST_RUN
    /// against the live maps: its return code and the frame it left.
    pub fn test_run(&self, program: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
        crate::test_run(&self.ebpf, program, frame).map(|run| (run.code, run.frame))
    }

    /// The reply program on the node's ingress endpoint (in the agent's namespace), through
    /// a link pinned in `links_dir` (see `PinnedTcLink`): replies of flows this node
    /// translated keep being translated back while the agent restarts.
    pub fn attach_reply(&mut self, interface: &str, links_dir: &Path) -> Result<PinnedTcLink> {
        PinnedTcLink::attach(
            &mut self.ebpf,
            names::MESH_REPLY,
            None,
            (interface, TcAttachType::Ingress),
            links_dir.join(format!("mesh-reply-{interface}")),
        )
    }

    /// The origin-tracking pair for a task's ingress-network veth (see `task_hooks`): towards
    /// the task on egress, from it on ingress after the VIP echo.
    pub fn task_filters(&self) -> Result<[TaskFilter; 2]> {
        Ok([
            TaskFilter::new(
                &self.ebpf,
                names::MESH_TO_TASK,
                TcHook::Egress,
                task_hooks::MESH_TO_TASK_PRIORITY,
            )?,
            TaskFilter::new(
                &self.ebpf,
                names::MESH_FROM_TASK,
                TcHook::Ingress,
                task_hooks::MESH_FROM_TASK_PRIORITY,
            )?,
        ])
    }
}

/// A published port's `MESH_PORTS` slot.
fn port_slot((protocol, port): (Protocol, u16)) -> u32 {
    // Every `Protocol` has a slot.
    shoal_common::mesh_port_slot(protocol.number(), port).unwrap_or_default()
}

/// The port of a `MESH_PORTS` slot (the inverse of `port_slot`).
fn slot_port(slot: u32) -> (Protocol, u16) {
    if slot < 65_536 {
        (Protocol::Tcp, slot as u16)
    } else {
        (Protocol::Udp, (slot - 65_536) as u16)
    }
}

/// Addresses as the programs compare them: network byte order in memory.
fn to_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

fn socket(ip: u32, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(from_key(ip), u16::from_be(port))
}

/// CLOCK_MONOTONIC, the clock the agent writes into `MESH_CLOCK`.
fn monotonic_ns() -> Result<u64> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64)
}
