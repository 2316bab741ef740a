//! Checksums. The transport checksum is always updated by the kernel's helper: only it knows
//! whether a packet carries a full checksum or a partial one the NIC completes (a locally
//! sent packet, which veth delivers as it is). The IPv4 header's checksum has no such case:
//! it is computed in place (`shoal_common::csum_replace4`, RFC 1624) where the header is in
//! the linear part, else with `bpf_l3_csum_replace`.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};

use crate::lib::parse::{Datagram, IPPROTO_TCP, IPPROTO_UDP, IPV4_CSUM, TCP_CSUM, UDP_CSUM};

/// Where the datagram's transport checksum sits.
#[inline(always)]
fn l4_offset(packet: &Datagram) -> usize {
    if packet.protocol == IPPROTO_TCP {
        packet.l4 + TCP_CSUM
    } else {
        packet.l4 + UDP_CSUM
    }
}

/// The size of the field that changed, as the checksum helpers take it in their flags.
const WORD: u64 = size_of::<u16>() as u64;
const DWORD: u64 = size_of::<u32>() as u64;

/// Flags every transport update of this datagram takes.
#[inline(always)]
fn l4_flags(packet: &Datagram) -> u64 {
    // A UDP checksum of 0 means "none" and must stay so.
    if packet.protocol == IPPROTO_UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    }
}

/// The transport checksum updated for an address of the pseudo-header changing from `from`
/// to `to` (network byte order).
#[inline(always)]
pub fn l4_replace_addr(ctx: &TcContext, packet: &Datagram, from: u32, to: u32) -> Option<()> {
    let flags = u64::from(BPF_F_PSEUDO_HDR) | l4_flags(packet) | DWORD;
    ctx.l4_csum_replace(l4_offset(packet), u64::from(from), u64::from(to), flags)
        .ok()
}

/// The transport checksum updated for a port changing from `from` to `to` (network byte
/// order).
#[inline(always)]
pub fn l4_replace_port(ctx: &TcContext, packet: &Datagram, from: u16, to: u16) -> Option<()> {
    let flags = l4_flags(packet) | WORD;
    ctx.l4_csum_replace(l4_offset(packet), u64::from(from), u64::from(to), flags)
        .ok()
}

/// The IPv4 header checksum at `header + IPV4_CSUM` updated in place for an address changing
/// from `from` to `to`.
///
/// # Safety
/// `header` must point at a writable IPv4 header of at least `IPV4_HLEN` bytes in the
/// packet's linear part.
#[inline(always)]
pub unsafe fn ipv4_replace_in_place(header: usize, from: u32, to: u32) {
    let check = (header + IPV4_CSUM) as *mut u16;
    // SAFETY: within the header, as the caller promises.
    unsafe {
        check.write_unaligned(shoal_common::csum_replace4(
            check.read_unaligned(),
            from,
            to,
        ));
    }
}

/// `ipv4_replace_in_place` for a header at any offset (`l3`), with the kernel's helper.
#[inline(always)]
pub fn ipv4_replace(ctx: &TcContext, l3: usize, from: u32, to: u32) -> Option<()> {
    ctx.l3_csum_replace(l3 + IPV4_CSUM, u64::from(from), u64::from(to), DWORD)
        .ok()
}

/// A checksum at `at` updated for one 16-bit word of the data it covers changing from `from`
/// to `to` (both as they sit in the packet): the ICMP checksum when an echo request's type
/// becomes a reply's.
#[inline(always)]
pub fn replace_word(ctx: &TcContext, at: usize, from: u16, to: u16) -> Option<()> {
    ctx.l4_csum_replace(at, u64::from(from), u64::from(to), WORD)
        .ok()
}
