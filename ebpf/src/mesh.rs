//! The routing mesh. A packet to a published port on the node's advertise address is given a
//! backend (a task's address on the `ingress` overlay) by the service's Maglev row, its flow
//! is remembered, and it is rewritten to the backend and sent into the ingress network,
//! keeping the client's address as its source (or, in SNAT mode, the node's ingress address).
//!
//! Replies must come back through the node that translated the flow:
//! - on the backend's node, `shoal_mesh_to_task` remembers which node's overlay MAC each
//!   flow arrived from, and `shoal_mesh_from_task` sends the task's replies to that MAC;
//! - on the node the client reached, `shoal_mesh_reply` undoes the translation and sends the
//!   reply out of the advertise interface.
//!
//! Everything else passes untouched: only whole IPv4 TCP/UDP datagrams are ever rewritten
//! (fragments carry no or partial transport headers), and a packet is either rewritten
//! completely or not at all.

use aya_ebpf::{
    bindings::{
        BPF_F_MARK_MANGLED_0, BPF_F_MMAPABLE, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_redirect_neigh},
    macros::{cgroup_sock_addr, classifier, map},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::{SockAddrContext, TcContext},
    EbpfContext as _,
};
use shoal_common::{
    FlowKey, IngressSettings, MeshCounters, MeshFlow, MeshService, Origin, ReplyKey, Verdict,
    FLOW_FIN_BACKEND, FLOW_FIN_CLIENT, FLOW_RST, MESH_DEFAULT_TABLE_SIZE, MESH_HAS_BACKENDS,
    MESH_MAX_FLOWS, MESH_MAX_SERVICES, MESH_PORT_SLOTS, MESH_PUBLISHED, MESH_SNAT,
};

use crate::headers::{ETH_HLEN, ETH_P_IP, IPPROTO_TCP, IPPROTO_UDP};

/// The service published on each port (`shoal_common::mesh_port_slot`), one word each,
/// stored in place by the agent through a memory mapping.
#[map(name = "MESH_PORTS")]
static MESH_PORTS: Array<MeshService> = Array::pinned(MESH_PORT_SLOTS, BPF_F_MMAPABLE);

/// CLOCK_MONOTONIC in ns as the agent last wrote it (every second, through a memory
/// mapping): flow ages without a helper call per packet (a call costs about as much as the
/// rest of a tracked flow's decision on this project's VMs).
#[map(name = "MESH_CLOCK")]
static MESH_CLOCK: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// One row of `table size` backend addresses per service; the agent sizes it at load time
/// and writes it through a memory mapping.
#[map(name = "MESH_MAGLEV")]
static MESH_MAGLEV: Array<u32> =
    Array::pinned(MESH_MAX_SERVICES * MESH_DEFAULT_TABLE_SIZE, BPF_F_MMAPABLE);

#[map(name = "MESH_FLOWS")]
static MESH_FLOWS: LruHashMap<FlowKey, MeshFlow> = LruHashMap::pinned(MESH_MAX_FLOWS, 0);

#[map(name = "MESH_REPLIES")]
static MESH_REPLIES: LruHashMap<ReplyKey, FlowKey> = LruHashMap::pinned(MESH_MAX_FLOWS, 0);

#[map(name = "MESH_ORIGINS")]
static MESH_ORIGINS: LruHashMap<ReplyKey, Origin> = LruHashMap::pinned(MESH_MAX_FLOWS, 0);

#[map(name = "MESH_COUNTERS")]
static MESH_COUNTERS: PerCpuArray<MeshCounters> = PerCpuArray::pinned(MESH_MAX_SERVICES, 0);

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const IP_CSUM: usize = 10;
const IP_SRC: usize = 12;
const IP_DST: usize = 16;
/// SNAT ports are drawn from here, away from the usual ephemeral range of the node's own
/// sockets on its ingress address (it has none, but a neighbour might).
const SNAT_PORT_BASE: u32 = 1_024;
const SNAT_PORTS: u32 = 65_536 - SNAT_PORT_BASE;
/// Candidate ports tried for a new SNAT flow. Closed flows hold their port until expiry, so
/// under many short connections a good share of the space is taken: with 4 candidates, 6-9
/// of ~30,000 `Connection: close` requests in 5 s from one client found none and were reset
/// (the mesh bench); 16 make that vanishingly rare, and cost nothing unless ports collide.
const SNAT_ATTEMPTS: u32 = 16;

/// An IPv4 TCP or UDP datagram's addresses and ports (network byte order) and where its
/// headers are.
#[derive(Clone, Copy)]
pub(crate) struct Datagram {
    pub l3: usize,
    pub l4: usize,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
}

impl Datagram {
    /// Parses the IPv4 header at `l3` and the TCP/UDP header after it. None for anything
    /// else: other protocols, fragments, and headers shorter than they claim.
    #[inline(always)]
    pub(crate) fn parse(ctx: &TcContext, l3: usize) -> Option<Self> {
        match Self::parse_direct(ctx, l3) {
            Some(parsed) => parsed,
            None => Self::parse_loaded(ctx, l3),
        }
    }

    /// `parse` without a helper call for the common case: an IPv4 header without options
    /// right after the Ethernet header, in the packet's linear part, read in place at
    /// constant offsets (the verifier bounds those; a `bpf_skb_load_bytes` per field was
    /// most of the mesh's per-packet cost). None when the case does not apply: then
    /// `parse_loaded` decides, with the same answers.
    #[inline(always)]
    fn parse_direct(ctx: &TcContext, l3: usize) -> Option<Option<Self>> {
        const L4: usize = ETH_HLEN + 20;
        let start = ctx.data();
        let end = ctx.data_end();
        if l3 != ETH_HLEN || start + L4 > end {
            return None;
        }
        // SAFETY (every read below): within [data, data_end), checked before the read.
        let byte = |at: usize| unsafe { *((start + at) as *const u8) };
        let be16 = |at: usize| u16::from_be_bytes([byte(at), byte(at + 1)]);
        let ne32 =
            |at: usize| u32::from_ne_bytes([byte(at), byte(at + 1), byte(at + 2), byte(at + 3)]);
        if byte(ETH_HLEN) != 0x45 {
            return None;
        }
        let protocol = byte(ETH_HLEN + 9);
        let frag = be16(ETH_HLEN + 6);
        if frag & 0x3fff != 0 {
            return Some(None);
        }
        let tcp_flags = match protocol {
            IPPROTO_TCP => {
                if start + L4 + 20 > end {
                    return None;
                }
                byte(L4 + 13)
            }
            IPPROTO_UDP => {
                if start + L4 + 8 > end {
                    return None;
                }
                0
            }
            _ => return Some(None),
        };
        Some(Some(Self {
            l3,
            l4: L4,
            protocol,
            tcp_flags,
            saddr: ne32(ETH_HLEN + IP_SRC),
            daddr: ne32(ETH_HLEN + IP_DST),
            sport: u16::from_ne_bytes([byte(L4), byte(L4 + 1)]),
            dport: u16::from_ne_bytes([byte(L4 + 2), byte(L4 + 3)]),
        }))
    }

    /// `parse` for any case, one `bpf_skb_load_bytes` per field.
    #[inline(always)]
    fn parse_loaded(ctx: &TcContext, l3: usize) -> Option<Self> {
        let vihl: u8 = ctx.load(l3).ok()?;
        let ihl = usize::from(vihl & 0x0f) * 4;
        let frag = u16::from_be(ctx.load::<u16>(l3 + 6).ok()?);
        let protocol: u8 = ctx.load(l3 + 9).ok()?;
        if vihl >> 4 != 4 || ihl < 20 || frag & 0x3fff != 0 {
            return None;
        }
        let l4 = l3 + ihl;
        // The whole transport header must be there: it is rewritten in place.
        let tcp_flags = match protocol {
            IPPROTO_TCP => {
                ctx.load::<[u8; 20]>(l4).ok()?;
                ctx.load::<u8>(l4 + 13).ok()?
            }
            IPPROTO_UDP => {
                ctx.load::<[u8; 8]>(l4).ok()?;
                0
            }
            _ => return None,
        };
        Some(Self {
            l3,
            l4,
            protocol,
            tcp_flags,
            saddr: ctx.load(l3 + IP_SRC).ok()?,
            daddr: ctx.load(l3 + IP_DST).ok()?,
            sport: ctx.load(l4).ok()?,
            dport: ctx.load(l4 + 2).ok()?,
        })
    }

    /// An untagged Ethernet frame's IPv4 TCP/UDP datagram (what the ingress network carries).
    #[inline(always)]
    fn from_frame(ctx: &TcContext) -> Option<Self> {
        if peek::<u16>(ctx, 12).map(u16::from_be) != Some(ETH_P_IP) {
            return None;
        }
        Self::parse(ctx, ETH_HLEN)
    }

    /// The flow key of `MESH_REPLIES` / `MESH_ORIGINS` for this datagram: sent by the backend
    /// (`from_backend`) or to it.
    fn reply_key(&self, from_backend: bool) -> ReplyKey {
        let (backend_ip, backend_port, peer_ip, peer_port) = if from_backend {
            (self.saddr, self.sport, self.daddr, self.dport)
        } else {
            (self.daddr, self.dport, self.saddr, self.sport)
        };
        ReplyKey {
            backend_ip,
            peer_ip,
            backend_port,
            peer_port,
            protocol: self.protocol,
            _pad: 0,
            _pad2: 0,
        }
    }

    fn checksum_offset(&self) -> usize {
        if self.protocol == IPPROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }

    fn l4_flags(&self) -> u64 {
        // A UDP checksum of 0 means "none" and must stay so.
        if self.protocol == IPPROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }

    /// Replaces the source (`source`) or destination address and port, with checksums.
    #[inline(always)]
    fn rewrite(&self, ctx: &TcContext, source: bool, ip: u32, port: u16) -> Option<()> {
        let (old_ip, old_port) = if source {
            (self.saddr, self.sport)
        } else {
            (self.daddr, self.dport)
        };
        if old_ip == ip && old_port == port {
            return Some(());
        }
        if self.write_in_place(ctx, source, ip, port).is_none() {
            self.write_stored(ctx, source, ip, port)?;
        }
        // The transport checksum by the kernel's helper: only it knows whether the packet
        // carries a full checksum or a partial one the NIC completes (a locally sent packet).
        let csum = self.checksum_offset();
        if old_ip != ip {
            ctx.l4_csum_replace(
                csum,
                u64::from(old_ip),
                u64::from(ip),
                u64::from(BPF_F_PSEUDO_HDR) | self.l4_flags() | 4,
            )
            .ok()?;
        }
        if old_port != port {
            ctx.l4_csum_replace(
                csum,
                u64::from(old_port),
                u64::from(port),
                self.l4_flags() | 2,
            )
            .ok()?;
        }
        Some(())
    }

    /// The address, port and IP checksum written straight into the packet, for headers where
    /// `parse_direct` found them (constant offsets the verifier bounds). None when they are
    /// elsewhere: nothing was written.
    #[inline(always)]
    fn write_in_place(&self, ctx: &TcContext, source: bool, ip: u32, port: u16) -> Option<()> {
        const L4: usize = ETH_HLEN + 20;
        let start = ctx.data();
        if self.l3 != ETH_HLEN || self.l4 != L4 || start + L4 + 4 > ctx.data_end() {
            return None;
        }
        let (ip_at, port_at) = if source {
            (ETH_HLEN + IP_SRC, L4)
        } else {
            (ETH_HLEN + IP_DST, L4 + 2)
        };
        // SAFETY: every offset is below L4 + 4, within [data, data_end) as checked above;
        // the program only writes packets the kernel made writable for it.
        unsafe {
            let check = (start + ETH_HLEN + IP_CSUM) as *mut u16;
            let old_ip = core::ptr::read_unaligned((start + ip_at) as *const u32);
            check.write_unaligned(shoal_common::csum_replace4(
                check.read_unaligned(),
                old_ip,
                ip,
            ));
            core::ptr::write_unaligned((start + ip_at) as *mut u32, ip);
            core::ptr::write_unaligned((start + port_at) as *mut u16, port);
        }
        Some(())
    }

    /// `write_in_place` for any header layout, with the kernel's store and checksum helpers.
    fn write_stored(&self, ctx: &TcContext, source: bool, ip: u32, port: u16) -> Option<()> {
        let (old_ip, ip_at, port_at) = if source {
            (self.saddr, self.l3 + IP_SRC, self.l4)
        } else {
            (self.daddr, self.l3 + IP_DST, self.l4 + 2)
        };
        ctx.store(ip_at, &ip, 0).ok()?;
        ctx.l3_csum_replace(self.l3 + IP_CSUM, u64::from(old_ip), u64::from(ip), 4)
            .ok()?;
        ctx.store(port_at, &port, 0).ok()
    }

    fn tcp_state_bits(&self, fin: u32) -> u32 {
        let mut bits = 0;
        if self.tcp_flags & TCP_FIN != 0 {
            bits |= fin;
        }
        if self.tcp_flags & TCP_RST != 0 {
            bits |= FLOW_RST;
        }
        bits
    }
}

/// The published port's service, if `packet` is addressed to one on this node.
#[inline(always)]
pub(crate) fn published(packet: &Datagram, settings: &IngressSettings) -> Option<MeshService> {
    if settings.ingress_ifindex == 0 || packet.daddr != settings.advertise_ip {
        return None;
    }
    port_service(packet.protocol, u16::from_be(packet.dport))
}

/// The service published on `port` (host byte order), read as the one word the agent
/// stores.
#[inline(always)]
fn port_service(protocol: u8, port: u16) -> Option<MeshService> {
    let slot = shoal_common::mesh_port_slot(protocol, port)?;
    let entry = MESH_PORTS.get_ptr(slot)?.cast::<u64>();
    // SAFETY: an array value of one aligned word, valid while the program runs; a single
    // 8-byte load, never split.
    let service = MeshService::from_word(unsafe { core::ptr::read_volatile(entry) });
    (service.flags & MESH_PUBLISHED != 0).then_some(service)
}

/// Whether `port` (host byte order) is published, whatever the address.
#[inline(always)]
pub(crate) fn is_published(protocol: u8, port: u16) -> bool {
    port_service(protocol, port).is_some()
}

/// Sends a packet for a published port to its flow's backend (choosing one for a new flow).
/// A packet the mesh cannot place is left to the kernel, with the reason as its verdict.
pub(crate) fn forward(
    ctx: &TcContext,
    packet: &Datagram,
    settings: &IngressSettings,
    service: &MeshService,
) -> (Verdict, i32) {
    let counters = MESH_COUNTERS.get_ptr_mut(service.index);
    let key = FlowKey {
        client_ip: packet.saddr,
        node_ip: packet.daddr,
        client_port: packet.sport,
        published_port: packet.dport,
        protocol: packet.protocol,
        _pad: 0,
        _pad2: 0,
    };
    let now = now_ns();
    // A SYN starts a new connection: it is balanced afresh even if the tuple was seen before.
    let opening = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let tracked = if opening {
        None
    } else {
        MESH_FLOWS.get_ptr_mut(key)
    };
    let flow = match tracked {
        Some(flow) => {
            // SAFETY: the entry stays valid for the program's run (RCU); racing updates
            // of the age and state bits are benign.
            unsafe {
                (*flow).last_seen_ns = now;
                (*flow).state |= packet.tcp_state_bits(FLOW_FIN_CLIENT);
                *flow
            }
        }
        None => match new_flow(packet, &key, settings, service, now) {
            Ok(flow) => {
                if let Some(c) = counters {
                    // SAFETY: per-CPU slot.
                    unsafe { (*c).flows += 1 };
                }
                flow
            }
            Err(reason) => {
                if let Some(c) = counters {
                    // SAFETY: per-CPU slot.
                    unsafe {
                        match reason {
                            Verdict::SnatExhausted => (*c).snat_exhausted += 1,
                            Verdict::FlowTableFull => (*c).flow_table_full += 1,
                            _ => (*c).no_backend += 1,
                        }
                    }
                }
                return (reason, TC_ACT_OK);
            }
        },
    };
    let translated = packet
        .rewrite(ctx, false, flow.backend_ip, flow.backend_port)
        .and_then(|()| packet.rewrite(ctx, true, flow.source_ip, flow.source_port));
    if let Some(c) = counters {
        // SAFETY: per-CPU slot.
        unsafe {
            if translated.is_some() {
                (*c).packets_in += 1;
                (*c).bytes_in += u64::from(ctx.len());
            } else {
                (*c).rewrite_failed += 1;
            }
        }
    }
    match translated {
        Some(()) => (Verdict::Mesh, redirect(settings.ingress_ifindex)),
        None => (Verdict::RewriteFailed, TC_ACT_SHOT),
    }
}

/// Picks the flow's backend from the service's Maglev row and records the flow both ways;
/// the reason (as a verdict) when it cannot.
fn new_flow(
    packet: &Datagram,
    key: &FlowKey,
    settings: &IngressSettings,
    service: &MeshService,
    now: u64,
) -> Result<MeshFlow, Verdict> {
    if service.flags & MESH_HAS_BACKENDS == 0 || settings.table_size == 0 {
        return Err(Verdict::NoBackend);
    }
    let hash = shoal_common::flow_hash(packet.saddr, packet.sport, packet.dport, packet.protocol);
    let slot = service
        .index
        .wrapping_mul(settings.table_size)
        .wrapping_add(hash % settings.table_size);
    let backend_ip = match MESH_MAGLEV.get(slot) {
        Some(ip) if *ip != 0 => *ip,
        _ => return Err(Verdict::NoBackend),
    };
    let mut flow = MeshFlow {
        backend_ip,
        source_ip: packet.saddr,
        backend_port: service.target_port,
        source_port: packet.sport,
        service_index: service.index,
        state: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    let mut reply = ReplyKey {
        backend_ip,
        peer_ip: packet.saddr,
        backend_port: service.target_port,
        peer_port: packet.sport,
        protocol: packet.protocol,
        _pad: 0,
        _pad2: 0,
    };
    if service.flags & MESH_SNAT != 0 {
        flow.source_ip = settings.ingress_ip;
        reply.peer_ip = settings.ingress_ip;
        flow.source_port = snat_port(&mut reply, key, hash).ok_or(Verdict::SnatExhausted)?;
    } else {
        // A full LRU drops its oldest entry to make room.
        MESH_REPLIES
            .insert(reply, *key, 0)
            .map_err(|_| Verdict::FlowTableFull)?;
    }
    MESH_FLOWS
        .insert(key, flow, 0)
        .map_err(|_| Verdict::FlowTableFull)?;
    Ok(flow)
}

/// Claims a source port on the node's ingress address for a SNAT flow: derived from the
/// flow's hash, so a retransmitted SYN gets the same port back; a port another flow holds
/// is skipped.
fn snat_port(reply: &mut ReplyKey, key: &FlowKey, hash: u32) -> Option<u16> {
    let mut attempt = 0;
    while attempt < SNAT_ATTEMPTS {
        let port =
            ((SNAT_PORT_BASE + shoal_common::mix(hash ^ attempt) % SNAT_PORTS) as u16).to_be();
        reply.peer_port = port;
        // SAFETY: a plain lookup; the value is copied out at once.
        let ours = match unsafe { MESH_REPLIES.get(*reply) } {
            Some(owner) => *owner == *key,
            None => MESH_REPLIES
                .insert(*reply, *key, u64::from(BPF_NOEXIST))
                .is_ok(),
        };
        if ours {
            return Some(port);
        }
        attempt += 1;
    }
    None
}

/// A backend's reply arriving at this node's ingress endpoint: back to the client, from the
/// published port, out of the advertise interface.
#[classifier]
pub fn shoal_mesh_reply(ctx: TcContext) -> i32 {
    let Some(packet) = Datagram::from_frame(&ctx) else {
        return TC_ACT_OK;
    };
    let key = packet.reply_key(true);
    // SAFETY: a plain lookup; the value is copied out at once.
    let Some(flow_key) = (unsafe { MESH_REPLIES.get(key) }).copied() else {
        return TC_ACT_OK;
    };
    let Some(settings) = crate::SETTINGS.get(0) else {
        return TC_ACT_OK;
    };
    let mut index = None;
    if let Some(flow) = MESH_FLOWS.get_ptr_mut(flow_key) {
        // SAFETY: as in `forward`.
        unsafe {
            (*flow).last_seen_ns = now_ns();
            (*flow).state |= packet.tcp_state_bits(FLOW_FIN_BACKEND);
            index = Some((*flow).service_index);
        }
    }
    let counters = index.and_then(|i| MESH_COUNTERS.get_ptr_mut(i));
    let translated = packet
        .rewrite(&ctx, true, flow_key.node_ip, flow_key.published_port)
        .and_then(|()| packet.rewrite(&ctx, false, flow_key.client_ip, flow_key.client_port));
    if translated.is_none() {
        if let Some(c) = counters {
            // SAFETY: per-CPU slot.
            unsafe { (*c).rewrite_failed += 1 };
        }
        return TC_ACT_SHOT;
    }
    if let Some(c) = counters {
        // SAFETY: per-CPU slot.
        unsafe {
            (*c).packets_out += 1;
            (*c).bytes_out += u64::from(ctx.len());
        }
    }
    redirect(settings.advertise_ifindex)
}

/// On a task's ingress interface, towards the task: remembers the overlay MAC of the node
/// each flow came through.
#[classifier]
pub fn shoal_mesh_to_task(ctx: TcContext) -> i32 {
    let Some(packet) = Datagram::from_frame(&ctx) else {
        return TC_ACT_OK;
    };
    let Some(mac) = peek::<[u8; 6]>(&ctx, 6) else {
        return TC_ACT_OK;
    };
    let key = packet.reply_key(false);
    // SAFETY: a plain lookup; the value is copied out at once.
    let known = unsafe { MESH_ORIGINS.get(key) }.is_some_and(|origin| origin.mac == mac);
    if !known {
        let _ = MESH_ORIGINS.insert(key, Origin { mac, _pad: [0; 2] }, 0);
    }
    TC_ACT_OK
}

/// On a task's ingress interface, from the task: a reply to a mesh flow goes to the node
/// the flow came through, whatever the task's routing chose.
#[classifier]
pub fn shoal_mesh_from_task(ctx: TcContext) -> i32 {
    let Some(packet) = Datagram::from_frame(&ctx) else {
        return TC_ACT_OK;
    };
    let key = packet.reply_key(true);
    // SAFETY: a plain lookup; the value is copied out at once.
    if let Some(origin) = unsafe { MESH_ORIGINS.get(key) }.copied() {
        let _ = ctx.store(0, &origin.mac, 0);
    }
    TC_ACT_OK
}

/// The node's own processes reach published ports too: a `connect()` in the node's
/// namespace to its advertise address or 127.0.0.1 on a published port is sent straight to
/// a backend (chosen at random from the service's Maglev row), before any packet exists.
/// Attached to the node's root cgroup; other namespaces' sockets are left alone.
#[cgroup_sock_addr(connect4)]
pub fn shoal_mesh_node_connect4(ctx: SockAddrContext) -> i32 {
    const ALLOW: i32 = 1;
    const SOCK_STREAM: u32 = 1;
    const LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
    let Some(settings) = crate::SETTINGS.get(0) else {
        return ALLOW;
    };
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    if settings.ingress_ifindex == 0
        || settings.table_size == 0
        || (addr.user_ip4 != settings.advertise_ip && addr.user_ip4 != LOCALHOST)
        // SAFETY: the helper only reads the socket's namespace.
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != settings.netns_cookie
    {
        return ALLOW;
    }
    let protocol = if addr.type_ == SOCK_STREAM {
        IPPROTO_TCP
    } else {
        IPPROTO_UDP
    };
    // `user_port` holds the port in network byte order in its low half.
    let port = u16::from_be(addr.user_port as u16);
    if settings.is_reserved(protocol, port) {
        return ALLOW;
    }
    let Some(service) = port_service(protocol, port) else {
        return ALLOW;
    };
    // SAFETY: helper without side effects.
    let pick = unsafe { bpf_get_prandom_u32() } % settings.table_size;
    let slot = service
        .index
        .wrapping_mul(settings.table_size)
        .wrapping_add(pick);
    match MESH_MAGLEV.get(slot) {
        Some(backend) if service.flags & MESH_HAS_BACKENDS != 0 && *backend != 0 => {
            addr.user_ip4 = *backend;
            addr.user_port = u32::from(service.target_port);
        }
        _ => {}
    }
    ALLOW
}

/// Reads a `T` at a constant `offset` of the packet: straight from its linear part when it is
/// there (no helper call), else with `bpf_skb_load_bytes` (the same answer, slower). Only for
/// offsets the compiler sees as constants: the verifier cannot bound a variable one here.
#[inline(always)]
pub(crate) fn peek<T: Copy>(ctx: &TcContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return ctx.load(offset).ok();
    }
    // SAFETY: within [data, data_end), checked just above (and by the verifier).
    Some(unsafe { core::ptr::read_unaligned((start + offset) as *const T) })
}

/// The time for flow ages: the agent's clock in `MESH_CLOCK`, read inline (a second's
/// resolution is plenty for timeouts counted in seconds).
#[inline(always)]
fn now_ns() -> u64 {
    MESH_CLOCK.get(0).copied().unwrap_or(0)
}

/// Out of `ifindex` with the MACs of the next hop the kernel's FIB and neighbour table
/// give; a missing interface drops the packet rather than let it through untranslated.
fn redirect(ifindex: u32) -> i32 {
    if ifindex == 0 {
        return TC_ACT_SHOT;
    }
    // SAFETY: no parameters: the helper does its own FIB lookup.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
