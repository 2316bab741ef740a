//! Connection tracking for the routing mesh: the flow a packet to a published port belongs
//! to (`MESH_FLOWS`), its reply translation (`MESH_REPLIES`), the node each flow came
//! through on the backend's side (`MESH_ORIGINS`), and the clock flows are aged by.
//!
//! A tracked flow's age and state are updated in place by whichever CPU handles a packet of
//! the flow, either way, while others may do the same: those two fields are written with
//! volatile stores (the kernel's `WRITE_ONCE`), each a single store the compiler may not
//! split, merge or drop; everything else of an entry is only ever written whole, by an
//! insert.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_NOEXIST},
    macros::map,
    maps::{Array, LruHashMap},
};
use shoal_common::{FlowKey, MeshFlow, Origin, ReplyKey, Verdict, FLOW_RST, MESH_MAX_FLOWS};

use crate::lib::parse::{Datagram, TCP_FIN, TCP_RST};

/// The key of `MESH_FLOWS` for a packet to a published port, as it reaches the node.
#[inline(always)]
pub fn flow_key(packet: &Datagram) -> FlowKey {
    FlowKey {
        client_ip: packet.saddr,
        node_ip: packet.daddr,
        client_port: packet.sport,
        published_port: packet.dport,
        protocol: packet.protocol,
        _pad: 0,
        _pad2: 0,
    }
}

/// The key of `MESH_REPLIES` / `MESH_ORIGINS` for this datagram: sent by the backend
/// (`from_backend`) or to it.
#[inline(always)]
pub fn reply_key(packet: &Datagram, from_backend: bool) -> ReplyKey {
    let (backend_ip, backend_port, peer_ip, peer_port) = if from_backend {
        (packet.saddr, packet.sport, packet.daddr, packet.dport)
    } else {
        (packet.daddr, packet.dport, packet.saddr, packet.sport)
    };
    ReplyKey {
        backend_ip,
        peer_ip,
        backend_port,
        peer_port,
        protocol: packet.protocol,
        _pad: 0,
        _pad2: 0,
    }
}

/// CLOCK_MONOTONIC in ns as the agent last wrote it (every second, through a memory
/// mapping): flow ages without a helper call per packet (a call costs about as much as the
/// rest of a tracked flow's decision on this project's VMs).
#[map(name = "MESH_CLOCK")]
static MESH_CLOCK: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// The time for flow ages: the agent's clock in `MESH_CLOCK`, read inline (a second's
/// resolution is plenty for timeouts counted in seconds). One load: the agent rewrites it
/// every second through its mapping.
#[inline(always)]
pub fn now_ns() -> u64 {
    match MESH_CLOCK.get_ptr(0) {
        // SAFETY: an array value of one aligned word, valid while the program runs.
        Some(clock) => unsafe { read_volatile(clock) },
        None => 0,
    }
}

/// Tracked flows on the node the client reached: where each goes.
#[map(name = "MESH_FLOWS")]
static MESH_FLOWS: LruHashMap<FlowKey, MeshFlow> = LruHashMap::pinned(MESH_MAX_FLOWS, 0);

/// A live entry of `MESH_FLOWS`: valid for the program's run (RCU), made only by `lookup`.
pub struct Tracked(*mut MeshFlow);

/// The tracked flow of `key`, if any.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<Tracked> {
    MESH_FLOWS.get_ptr_mut(key).map(Tracked)
}

/// Stamps a tracked flow with a packet seen at `now`: its age, and its FIN (as the `fin`
/// bit of the side that sent it) or RST. Returns the flow as it then is.
///
/// Two CPUs may touch one flow at once (a client's packet and the backend's reply). The
/// worst case of that race: the age is the older of two stamps at most a clock tick (1 s)
/// apart, against timeouts of seconds to hours; and of two state bits set at the same
/// moment one may be lost, which leaves the flow looking less closed than it is, so it
/// expires by a longer timeout (never sooner) unless a retransmitted FIN or RST sets it
/// again. A live flow is never cut by it.
#[inline(always)]
pub fn touch(Tracked(flow): Tracked, packet: &Datagram, fin: u32, now: u64) -> MeshFlow {
    let bits = state_bits(packet, fin);
    // SAFETY: `flow` is a live entry of MESH_FLOWS (`Tracked`); the racing writers are the
    // ones described above.
    unsafe {
        let seen = &raw mut (*flow).last_seen_ns;
        // Written only when it moves (once a second at most): a flow's entry is not dirtied
        // in every CPU's cache by every packet.
        if read_volatile(seen) != now {
            write_volatile(seen, now);
        }
        if bits != 0 {
            let state = &raw mut (*flow).state;
            write_volatile(state, read_volatile(state) | bits);
        }
        *flow
    }
}

/// The `FLOW_*` bits a TCP segment sets: `fin` for a FIN (which side's), `FLOW_RST`.
#[inline(always)]
fn state_bits(packet: &Datagram, fin: u32) -> u32 {
    let mut bits = 0;
    if packet.tcp_flags & TCP_FIN != 0 {
        bits |= fin;
    }
    if packet.tcp_flags & TCP_RST != 0 {
        bits |= FLOW_RST;
    }
    bits
}

/// Records a new flow (a full LRU drops its oldest entry to make room).
#[inline(always)]
pub fn record_flow(key: &FlowKey, flow: &MeshFlow) -> Result<(), Verdict> {
    MESH_FLOWS
        .insert(key, flow, 0)
        .map_err(|_| Verdict::FlowTableFull)
}

/// The same flows seen from the backend's replies, to undo the translation.
#[map(name = "MESH_REPLIES")]
static MESH_REPLIES: LruHashMap<ReplyKey, FlowKey> = LruHashMap::pinned(MESH_MAX_FLOWS, 0);

/// Records how a new flow's replies are translated back.
#[inline(always)]
pub fn record_reply(reply: &ReplyKey, key: &FlowKey) -> Result<(), Verdict> {
    MESH_REPLIES
        .insert(reply, key, 0)
        .map_err(|_| Verdict::FlowTableFull)
}

/// Claims `reply` for the flow `key` unless another flow holds it: whether it is `key`'s.
#[inline(always)]
pub fn claim_reply(reply: &ReplyKey, key: &FlowKey) -> bool {
    // SAFETY: a plain lookup; the value is copied out at once.
    match unsafe { MESH_REPLIES.get(reply) } {
        Some(owner) => *owner == *key,
        None => MESH_REPLIES
            .insert(reply, key, u64::from(BPF_NOEXIST))
            .is_ok(),
    }
}

/// The flow a backend's reply belongs to.
#[inline(always)]
pub fn reply_flow(reply: &ReplyKey) -> Option<FlowKey> {
    // SAFETY: a plain lookup; the value is copied out at once.
    unsafe { MESH_REPLIES.get(reply) }.copied()
}

/// On the backend's node: the overlay MAC of the node each flow came through.
#[map(name = "MESH_ORIGINS")]
static MESH_ORIGINS: LruHashMap<ReplyKey, Origin> = LruHashMap::pinned(MESH_MAX_FLOWS, 0);

/// On the backend's node: remembers the overlay MAC a flow to a task came from.
#[inline(always)]
pub fn remember_origin(key: &ReplyKey, mac: [u8; 6]) {
    // SAFETY: a plain lookup; the value is compared at once.
    let known = unsafe { MESH_ORIGINS.get(key) }.is_some_and(|origin| origin.mac == mac);
    if !known {
        let _ = MESH_ORIGINS.insert(key, Origin { mac, _pad: [0; 2] }, 0);
    }
}

/// On the backend's node: the overlay MAC a task's reply must go to.
#[inline(always)]
pub fn origin(key: &ReplyKey) -> Option<[u8; 6]> {
    // SAFETY: a plain lookup; the value is copied out at once.
    unsafe { MESH_ORIGINS.get(key) }.map(|origin| origin.mac)
}
