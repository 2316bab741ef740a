//! shoal's kernel programs. Built for `bpfel-unknown-none` by `dataplane/build.rs` and
//! embedded in the `shoal` binary.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray},
    programs::TcContext,
};
use shoal_common::{Counter, IngressSettings, Verdict, VxlanPeer, VXLAN_MAX_PEERS};

mod headers;
mod mesh;
mod socket_lb;
mod vip_echo;

#[map(name = "VERDICTS")]
static VERDICTS: PerCpuArray<Counter> = PerCpuArray::pinned(Verdict::COUNT, 0);

#[map(name = "SETTINGS")]
pub(crate) static SETTINGS: Array<IngressSettings> = Array::pinned(1, 0);

/// The nodes each VNI accepts VXLAN from, kept by the agent from gossip.
#[map(name = "VXLAN_PEERS")]
static VXLAN_PEERS: HashMap<VxlanPeer, u32> = HashMap::pinned(VXLAN_MAX_PEERS, 0);

/// The VNI's offset in a VXLAN header (flags, 3 reserved bytes, then the VNI's 3 bytes).
const VXLAN_VNI: usize = 4;
const UDP_HLEN: usize = 8;
const IPV4_SRC: usize = 12;

use headers::{ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_HLEN};

/// Ingress classifier on the advertise interface: sorts every packet by verdict and counts
/// it; packets to published ports go to the routing mesh, VXLAN from anyone but a member of
/// its VNI is dropped.
#[classifier]
pub fn shoal_ingress(mut ctx: TcContext) -> i32 {
    let (verdict, action) = classify(&ctx);
    // Scratch space of the TC layer, which the stack reinitialises after this hook: where a
    // test run (`ingress trace`) reads why the packet went as it did.
    ctx.cb_mut()[0] = verdict as u32;
    if let Some(counter) = VERDICTS.get_ptr_mut(verdict as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += u64::from(ctx.len());
        }
    }
    action
}

fn classify(ctx: &TcContext) -> (Verdict, i32) {
    let pass = |verdict| (verdict, TC_ACT_OK);
    let Some(mut ethertype) = mesh::peek::<u16>(ctx, 12).map(u16::from_be) else {
        return pass(Verdict::Malformed);
    };
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q {
        let Some(inner) = load_be16(ctx, 16) else {
            return pass(Verdict::Malformed);
        };
        ethertype = inner;
        l3 += 4;
    }
    let Some(settings) = SETTINGS.get(0) else {
        return pass(Verdict::Other);
    };
    let (proto, l4, fragment) = match ethertype {
        ETH_P_IP => {
            // Untagged only: the mesh answers on the advertise address, never on a VLAN.
            // First, before any other read: a packet the mesh takes passes every check below.
            if l3 == ETH_HLEN {
                if let Some(packet) = mesh::Datagram::parse(ctx, l3) {
                    let dport = u16::from_be(packet.dport);
                    if let Some(service) = mesh::published(&packet, settings) {
                        if !settings.is_reserved(packet.protocol, dport) {
                            return mesh::forward(ctx, &packet, settings, &service);
                        }
                        // Never translated, whatever the map says: VXLAN is still checked
                        // for membership, the rest counted as the misconfiguration it is.
                        let at = (packet.l4, || Some(packet.saddr));
                        return match port_verdict(ctx, packet.protocol, at, dport, settings) {
                            overlay @ (Verdict::Overlay | Verdict::OverlayNotMember, _) => overlay,
                            _ => pass(Verdict::ReservedPort),
                        };
                    }
                    // Parsed already: no reason to read the headers again.
                    let at = (packet.l4, || Some(packet.saddr));
                    return port_verdict(ctx, packet.protocol, at, dport, settings);
                }
            }
            let Some(vihl) = load_u8(ctx, l3) else {
                return pass(Verdict::Malformed);
            };
            let ihl = usize::from(vihl & 0x0f) * 4;
            if vihl >> 4 != 4 || ihl < 20 {
                return pass(Verdict::Malformed);
            }
            let (Some(frag), Some(proto)) = (load_be16(ctx, l3 + 6), load_u8(ctx, l3 + 9)) else {
                return pass(Verdict::Malformed);
            };
            // Later fragments carry no transport header: nothing to match on. A first one
            // does, and is sorted by it (a VXLAN one from a non-member is dropped, so its
            // datagram can never be reassembled).
            if frag & 0x1fff != 0 {
                return pass(Verdict::Fragment);
            }
            (proto, l3 + ihl, frag & 0x2000 != 0)
        }
        ETH_P_IPV6 => {
            let Some(next) = load_u8(ctx, l3 + 6) else {
                return pass(Verdict::Malformed);
            };
            (next, l3 + IPV6_HLEN, false)
        }
        _ => return pass(Verdict::Other),
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return pass(Verdict::Other);
    }
    let Some(dport) = load_be16(ctx, l4 + 2) else {
        return pass(Verdict::Malformed);
    };
    if ethertype == ETH_P_IPV6 {
        // The data path is IPv4 only: no VXLAN socket takes IPv6.
        return pass(control_verdict(proto, dport, settings));
    }
    let source = || ctx.load::<u32>(l3 + IPV4_SRC).ok();
    let (verdict, action) = port_verdict(ctx, proto, (l4, source), dport, settings);
    if fragment && verdict == Verdict::Other && l3 == ETH_HLEN && mesh::is_published(proto, dport) {
        return pass(Verdict::Fragment);
    }
    (verdict, action)
}

/// An IPv4 TCP or UDP packet's verdict by its destination port (host byte order): VXLAN is
/// checked against the VNI's members, the rest only sorted. `source` gives the sender's
/// address (network byte order), read only for VXLAN.
#[inline(always)]
fn port_verdict(
    ctx: &TcContext,
    proto: u8,
    (l4, source): (usize, impl FnOnce() -> Option<u32>),
    dport: u16,
    settings: &IngressSettings,
) -> (Verdict, i32) {
    if proto == IPPROTO_UDP && dport == settings.data_path_port {
        return overlay_verdict(ctx, l4, source());
    }
    (control_verdict(proto, dport, settings), TC_ACT_OK)
}

#[inline(always)]
fn control_verdict(proto: u8, dport: u16, settings: &IngressSettings) -> Verdict {
    if dport == settings.gossip_port || (proto == IPPROTO_TCP && dport == settings.manager_port) {
        Verdict::Control
    } else {
        Verdict::Other
    }
}

/// VXLAN passes only from a node the agent knows is on the VNI; anything else, including a
/// datagram too short to name a VNI, is dropped before the kernel's VXLAN device sees it.
#[inline(always)]
fn overlay_verdict(ctx: &TcContext, l4: usize, source: Option<u32>) -> (Verdict, i32) {
    /// Where the VNI sits behind an IPv4 header without options: read in place.
    const PLAIN_VNI: usize = ETH_HLEN + 20 + UDP_HLEN + VXLAN_VNI;
    let refused = (Verdict::OverlayNotMember, TC_ACT_SHOT);
    let vni = if l4 + UDP_HLEN + VXLAN_VNI == PLAIN_VNI {
        mesh::peek::<u32>(ctx, PLAIN_VNI)
    } else {
        ctx.load::<u32>(l4 + UDP_HLEN + VXLAN_VNI).ok()
    };
    let (Some(vni), Some(vtep)) = (vni, source) else {
        return refused;
    };
    let peer = VxlanPeer {
        vni: u32::from_be(vni) >> 8,
        vtep,
    };
    // SAFETY: a plain lookup; only its presence is used.
    if unsafe { VXLAN_PEERS.get(peer) }.is_some() {
        (Verdict::Overlay, TC_ACT_OK)
    } else {
        refused
    }
}

#[inline(always)]
fn load_be16(ctx: &TcContext, offset: usize) -> Option<u16> {
    ctx.load::<u16>(offset).ok().map(u16::from_be)
}

#[inline(always)]
fn load_u8(ctx: &TcContext, offset: usize) -> Option<u8> {
    ctx.load::<u8>(offset).ok()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
