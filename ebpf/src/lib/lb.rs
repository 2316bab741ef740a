//! Load-balancer selection: which service a published port is, which backend its Maglev row
//! gives a flow (or a node's own `connect()`), and which backend a service VIP gives a task's
//! socket.
//!
//! The agent rewrites `MESH_PORTS` and `MESH_MAGLEV` in place through memory mappings while
//! packets read them: every entry is read with one volatile load (the kernel's `READ_ONCE`),
//! so a packet sees the old or the new entry, never a mix, and a slot checked non-zero is the
//! slot used.

use core::ptr::read_volatile;

use shoal_common::{BackendSlot, IngressSettings, MeshService, MESH_HAS_BACKENDS, MESH_PUBLISHED};

use crate::lib::{
    maps::{LB_BACKENDS, LB_SERVICES, MESH_MAGLEV, MESH_PORTS},
    parse::Datagram,
};

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
