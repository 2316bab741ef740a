//! Load-balancer selection: which service a published port is, which backend its Maglev row
//! gives a flow (or a node's own `connect()`), and which backend a service VIP gives a task's
//! socket.
//!
//! The agent rewrites `MESH_PORTS` and `MESH_MAGLEV` in place through memory mappings while
//! packets read them: every entry is read with one volatile load (the kernel's `READ_ONCE`),
//! so a packet sees the old or the new entry, never a mix, and a slot checked non-zero is the
//! slot used.

use core::ptr::read_volatile;

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap},
};
use shoal_common::{
    BackendSlot, IngressSettings, MeshService, ReverseKey, VipService, LB_MAX_BACKEND_SLOTS,
    LB_MAX_REVERSE, LB_MAX_VIPS, MESH_DEFAULT_TABLE_SIZE, MESH_HAS_BACKENDS, MESH_MAX_SERVICES,
    MESH_PORT_SLOTS, MESH_PUBLISHED,
};

use crate::lib::parse::Datagram;

/// The service published on each port (`shoal_common::mesh_port_slot`), one word each,
/// stored in place by the agent through a memory mapping.
#[map(name = "MESH_PORTS")]
static MESH_PORTS: Array<MeshService> = Array::pinned(MESH_PORT_SLOTS, BPF_F_MMAPABLE);

/// The published port's service, if `packet` is addressed to one on this node.
#[inline(always)]
pub fn published(packet: &Datagram, settings: &IngressSettings) -> Option<MeshService> {
    if settings.ingress_ifindex == 0 || packet.daddr != settings.advertise_ip {
        return None;
    }
    port_service(packet.protocol, u16::from_be(packet.dport))
}

/// Whether `port` (host byte order) is published, whatever the address.
#[inline(always)]
pub fn is_published(protocol: u8, port: u16) -> bool {
    port_service(protocol, port).is_some()
}

/// The service published on `port` (host byte order), read as the one word the agent
/// stores.
#[inline(always)]
pub fn port_service(protocol: u8, port: u16) -> Option<MeshService> {
    let slot = shoal_common::mesh_port_slot(protocol, port)?;
    let entry = MESH_PORTS.get_ptr(slot)?.cast::<u64>();
    // SAFETY: an array value of one aligned word, valid while the program runs; a single
    // 8-byte load, never split.
    let service = MeshService::from_word(unsafe { read_volatile(entry) });
    (service.flags & MESH_PUBLISHED != 0).then_some(service)
}

/// One row of `table size` backend addresses per service; the agent sizes it at load time
/// and writes it through a memory mapping.
#[map(name = "MESH_MAGLEV")]
static MESH_MAGLEV: Array<u32> =
    Array::pinned(MESH_MAX_SERVICES * MESH_DEFAULT_TABLE_SIZE, BPF_F_MMAPABLE);

/// The backend in slot `pick` (below the table size) of the service's Maglev row; None when
/// the row holds none.
#[inline(always)]
pub fn maglev_backend(service: &MeshService, settings: &IngressSettings, pick: u32) -> Option<u32> {
    if service.flags & MESH_HAS_BACKENDS == 0 {
        return None;
    }
    let slot = service
        .index
        .wrapping_mul(settings.table_size)
        .wrapping_add(pick);
    let entry = MESH_MAGLEV.get_ptr(slot)?;
    // SAFETY: an array value of one aligned word, valid while the program runs.
    let backend = unsafe { read_volatile(entry) };
    (backend != 0).then_some(backend)
}

/// The flow's backend by its hash (`shoal_common::flow_hash`): the same on every node.
#[inline(always)]
pub fn maglev_flow_backend(
    service: &MeshService,
    settings: &IngressSettings,
    hash: u32,
) -> Option<u32> {
    if settings.table_size == 0 {
        return None;
    }
    maglev_backend(service, settings, hash % settings.table_size)
}

/// Service VIPs (network byte order) and their current backend generation.
#[map(name = "LB_SERVICES")]
static LB_SERVICES: HashMap<u32, VipService> = HashMap::pinned(LB_MAX_VIPS, 0);

/// The backends of each VIP's generations, slot by slot.
#[map(name = "LB_BACKENDS")]
static LB_BACKENDS: HashMap<BackendSlot, u32> = HashMap::pinned(LB_MAX_BACKEND_SLOTS, 0);

/// A backend of the VIP (network byte order) for a task's socket: the VIP's service if it
/// is one, and a backend of its current generation picked by `random` (None when the slot
/// is gone: a generation being replaced).
#[inline(always)]
pub fn vip_backend(vip: u32, random: impl FnOnce() -> u32) -> Option<VipChoice> {
    // SAFETY: a plain lookup; the value is copied out at once.
    let service = (unsafe { LB_SERVICES.get(vip) }).copied()?;
    if service.count == 0 {
        return Some(VipChoice::NoBackend);
    }
    let slot = BackendSlot {
        service: service.id,
        generation: service.generation,
        slot: random() % service.count,
    };
    // SAFETY: as above.
    (unsafe { LB_BACKENDS.get(slot) })
        .copied()
        .map(VipChoice::Backend)
}

/// What a VIP gives a socket.
pub enum VipChoice {
    /// A running task's address (network byte order).
    Backend(u32),
    /// The VIP's service has no running task.
    NoBackend,
}

/// Whether `ip` (network byte order) is a VIP with at least one running task.
#[inline(always)]
pub fn is_live_vip(ip: u32) -> bool {
    // SAFETY: a plain lookup; the value is copied out at once.
    (unsafe { LB_SERVICES.get(ip) }).is_some_and(|service| service.count != 0)
}

/// Whether `ip` (network byte order) is a VIP, with tasks or not.
#[inline(always)]
pub fn is_vip(ip: u32) -> bool {
    // SAFETY: a plain lookup; only its presence is used.
    unsafe { LB_SERVICES.get(ip) }.is_some()
}

/// The VIP a UDP socket sent to, by the backend it was given, so replies read as coming from
/// the VIP.
#[map(name = "LB_REVERSE")]
static LB_REVERSE: LruHashMap<ReverseKey, u32> = LruHashMap::pinned(LB_MAX_REVERSE, 0);

/// Remembers that the socket of `key` was given `key.ip` for `vip` (a full LRU evicts the
/// oldest entry; failure only costs the reply's VIP source).
#[inline(always)]
pub fn remember_vip(key: &ReverseKey, vip: u32) {
    let _ = LB_REVERSE.insert(key, vip, 0);
}

/// The VIP a reply from `key.ip` to the socket of `key` answers for, if it was one.
#[inline(always)]
pub fn vip_of(key: &ReverseKey) -> Option<u32> {
    // SAFETY: a plain lookup; the value is copied out at once.
    unsafe { LB_REVERSE.get(key) }.copied()
}
