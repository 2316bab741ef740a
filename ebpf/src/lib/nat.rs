//! Address translation: a datagram's source or destination rewritten with its checksums,
//! the source ports of SNAT flows, and the redirect that sends a translated packet on.
//!
//! A packet is either rewritten completely or not at all: every rewrite is checked before the
//! packet is sent, and a failed one drops it.

use core::mem::size_of;

use aya_ebpf::{bindings::TC_ACT_SHOT, helpers::bpf_redirect_neigh, programs::TcContext};
use shoal_common::{FlowKey, ReplyKey};

use crate::lib::{
    conntrack, csum,
    parse::{Datagram, ETH_HLEN, IPV4_DST, IPV4_SRC, L4_DPORT, L4_SPORT, PLAIN_L4},
};

/// SNAT ports are drawn from here, away from the usual ephemeral range of the node's own
/// sockets on its ingress address (it has none, but a neighbour might).
const SNAT_PORT_BASE: u32 = 1_024;
const SNAT_PORTS: u32 = 65_536 - SNAT_PORT_BASE;
/// Candidate ports tried for a new SNAT flow. Closed flows hold their port until expiry, so
/// under many short connections a good share of the space is taken: with 4 candidates, 6-9
/// of ~30,000 `Connection: close` requests in 5 s from one client found none and were reset
/// (the mesh bench); 16 make that vanishingly rare, and cost nothing unless ports collide.
const SNAT_ATTEMPTS: u32 = 16;

/// Which end of a datagram a rewrite replaces.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Replaces the datagram's source or destination address and port (network byte order),
/// with checksums. None when a write or checksum update failed.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, packet: &Datagram, end: End, ip: u32, port: u16) -> Option<()> {
    let (old_ip, old_port) = match end {
        End::Source => (packet.saddr, packet.sport),
        End::Destination => (packet.daddr, packet.dport),
    };
    if old_ip == ip && old_port == port {
        return Some(());
    }
    if write_in_place(ctx, packet, end, ip, port).is_none() {
        write_stored(ctx, packet, end, ip, port)?;
    }
    if old_ip != ip {
        csum::l4_replace_addr(ctx, packet, old_ip, ip)?;
    }
    if old_port != port {
        csum::l4_replace_port(ctx, packet, old_port, port)?;
    }
    Some(())
}

/// The header offsets (from the start of the IP and the transport header) of `end`.
#[inline(always)]
fn offsets(end: End) -> (usize, usize) {
    match end {
        End::Source => (IPV4_SRC, L4_SPORT),
        End::Destination => (IPV4_DST, L4_DPORT),
    }
}

/// The address, port and IP checksum written straight into the packet, for headers where
/// `Datagram::parse` found them in place (constant offsets the verifier bounds). None when
/// they are elsewhere: nothing was written.
#[inline(always)]
fn write_in_place(ctx: &TcContext, packet: &Datagram, end: End, ip: u32, port: u16) -> Option<()> {
    /// The end of the two ports: the last byte written.
    const PORTS_END: usize = PLAIN_L4 + L4_DPORT + size_of::<u16>();
    let start = ctx.data();
    if packet.l3 != ETH_HLEN || packet.l4 != PLAIN_L4 || start + PORTS_END > ctx.data_end() {
        return None;
    }
    let (ip_at, port_at) = offsets(end);
    // SAFETY: every offset is below PORTS_END, within [data, data_end) as checked above;
    // the program only writes packets the kernel made writable for it.
    unsafe {
        let ip_at = (start + ETH_HLEN + ip_at) as *mut u32;
        csum::ipv4_replace_in_place(start + ETH_HLEN, ip_at.read_unaligned(), ip);
        ip_at.write_unaligned(ip);
        ((start + PLAIN_L4 + port_at) as *mut u16).write_unaligned(port);
    }
    Some(())
}

/// `write_in_place` for any header layout, with the kernel's store and checksum helpers.
#[inline(always)]
fn write_stored(ctx: &TcContext, packet: &Datagram, end: End, ip: u32, port: u16) -> Option<()> {
    let old_ip = match end {
        End::Source => packet.saddr,
        End::Destination => packet.daddr,
    };
    let (ip_at, port_at) = offsets(end);
    ctx.store(packet.l3 + ip_at, &ip, 0).ok()?;
    csum::ipv4_replace(ctx, packet.l3, old_ip, ip)?;
    ctx.store(packet.l4 + port_at, &port, 0).ok()
}

/// Claims a source port on the node's ingress address for a SNAT flow (`reply` names the
/// backend and that address; its port is filled in): derived from the flow's hash, so a
/// retransmitted SYN gets the same port back; a port another flow holds is skipped.
#[inline(always)]
pub fn snat_port(reply: &mut ReplyKey, key: &FlowKey, hash: u32) -> Option<u16> {
    let mut attempt = 0;
    while attempt < SNAT_ATTEMPTS {
        let port =
            ((SNAT_PORT_BASE + shoal_common::mix(hash ^ attempt) % SNAT_PORTS) as u16).to_be();
        reply.peer_port = port;
        if conntrack::claim_reply(reply, key) {
            return Some(port);
        }
        attempt += 1;
    }
    None
}

/// Out of `ifindex` with the MACs of the next hop the kernel's FIB and neighbour table
/// give; a missing interface drops the packet rather than let it through untranslated.
#[inline(always)]
pub fn redirect(ifindex: u32) -> i32 {
    if ifindex == 0 {
        return TC_ACT_SHOT;
    }
    // SAFETY: no parameters: the helper does its own FIB lookup.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
