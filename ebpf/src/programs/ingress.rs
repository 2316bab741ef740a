//! `shoal_ingress`, TCX ingress on the advertise interface: every packet that reaches the
//! node. It sorts each by verdict and counts it; packets to published ports go to the
//! routing mesh (`mesh_forward`), VXLAN from anyone but a member of its VNI is dropped,
//! gossip and manager traffic is counted as control, everything else passes untouched.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use shoal_common::{IngressSettings, Verdict, VxlanPeer, VXLAN_MAX_PEERS};

use crate::{
    lib::{
        config, counters, lb,
        parse::{
            load_be16, load_u8, peek, Datagram, Ipv4, ETH_HLEN, ETH_PROTO, ETH_P_8021Q, ETH_P_IP,
            ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV4_SRC, IPV6_HLEN, IPV6_NEXT, L4_DPORT,
            PLAIN_L4, UDP_HLEN, VLAN_HLEN, VLAN_INNER_PROTO, VXLAN_VNI,
        },
    },
    programs::mesh_forward,
};

/// The nodes each VNI accepts VXLAN from, kept by the agent from gossip.
#[map(name = "VXLAN_PEERS")]
static VXLAN_PEERS: HashMap<VxlanPeer, u32> = HashMap::pinned(VXLAN_MAX_PEERS, 0);

#[classifier]
pub fn shoal_ingress(mut ctx: TcContext) -> i32 {
    let (verdict, action) = classify(&ctx);
    // Scratch space of the TC layer, which the stack reinitialises after this hook: where a
    // test run (`ingress trace`) reads why the packet went as it did.
    ctx.cb_mut()[0] = verdict as u32;
    let bytes = u64::from(ctx.len());
    counters::bump(counters::verdict(verdict), |counter| {
        counter.packets += 1;
        counter.bytes += bytes;
    });
    action
}

#[inline(always)]
fn classify(ctx: &TcContext) -> (Verdict, i32) {
    let pass = |verdict| (verdict, TC_ACT_OK);
    let Some(mut ethertype) = peek::<u16>(ctx, ETH_PROTO).map(u16::from_be) else {
        return pass(Verdict::Malformed);
    };
    let mut l3 = ETH_HLEN;
    if ethertype == ETH_P_8021Q {
        let Some(inner) = load_be16(ctx, VLAN_INNER_PROTO) else {
            return pass(Verdict::Malformed);
        };
        ethertype = inner;
        l3 += VLAN_HLEN;
    }
    let Some(settings) = config::settings() else {
        return pass(Verdict::Other);
    };
    let (proto, l4, fragment) = match ethertype {
        ETH_P_IP => {
            // Untagged only: the mesh answers on the advertise address, never on a VLAN.
            // First, before any other read: a packet the mesh takes passes every check below.
            if l3 == ETH_HLEN {
                if let Some(packet) = Datagram::parse(ctx, l3) {
                    let dport = u16::from_be(packet.dport);
                    if let Some(service) = lb::published(&packet, settings) {
                        if !settings.is_reserved(packet.protocol, dport) {
                            return mesh_forward::forward(ctx, &packet, settings, &service);
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
            let Some(ip) = Ipv4::load(ctx, l3) else {
                return pass(Verdict::Malformed);
            };
            // Later fragments carry no transport header: nothing to match on. A first one
            // does, and is sorted by it (a VXLAN one from a non-member is dropped, so its
            // datagram can never be reassembled).
            if ip.is_later_fragment() {
                return pass(Verdict::Fragment);
            }
            (ip.protocol, l3 + ip.header_len(), ip.is_first_fragment())
        }
        ETH_P_IPV6 => {
            let Some(next) = load_u8(ctx, l3 + IPV6_NEXT) else {
                return pass(Verdict::Malformed);
            };
            (next, l3 + IPV6_HLEN, false)
        }
        _ => return pass(Verdict::Other),
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return pass(Verdict::Other);
    }
    let Some(dport) = load_be16(ctx, l4 + L4_DPORT) else {
        return pass(Verdict::Malformed);
    };
    if ethertype == ETH_P_IPV6 {
        // The data path is IPv4 only: no VXLAN socket takes IPv6.
        return pass(control_verdict(proto, dport, settings));
    }
    let source = || ctx.load::<u32>(l3 + IPV4_SRC).ok();
    let (verdict, action) = port_verdict(ctx, proto, (l4, source), dport, settings);
    if fragment && verdict == Verdict::Other && l3 == ETH_HLEN && lb::is_published(proto, dport) {
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
    const PLAIN_VNI: usize = PLAIN_L4 + UDP_HLEN + VXLAN_VNI;
    let refused = (Verdict::OverlayNotMember, TC_ACT_SHOT);
    let vni = if l4 + UDP_HLEN + VXLAN_VNI == PLAIN_VNI {
        peek::<u32>(ctx, PLAIN_VNI)
    } else {
        ctx.load::<u32>(l4 + UDP_HLEN + VXLAN_VNI).ok()
    };
    let (Some(vni), Some(vtep)) = (vni, source) else {
        return refused;
    };
    let peer = VxlanPeer {
        // The VNI is the word's first three bytes; its last is reserved.
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
