//! shoal's kernel programs. Built for `bpfel-unknown-none` by `dataplane/build.rs` and
//! embedded in the `shoal` binary.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    macros::{classifier, map},
    maps::{Array, PerCpuArray},
    programs::TcContext,
};
use shoal_common::{Counter, IngressSettings, Verdict};

mod headers;
mod mesh;
mod socket_lb;
mod vip_echo;

#[map(name = "VERDICTS")]
static VERDICTS: PerCpuArray<Counter> = PerCpuArray::pinned(Verdict::COUNT, 0);

#[map(name = "SETTINGS")]
pub(crate) static SETTINGS: Array<IngressSettings> = Array::pinned(1, 0);

use headers::{ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, IPPROTO_TCP, IPPROTO_UDP, IPV6_HLEN};

/// Ingress classifier on the advertise interface: sorts every packet by verdict and counts
/// it; packets to published ports go to the routing mesh.
#[classifier]
pub fn shoal_ingress(ctx: TcContext) -> i32 {
    let (verdict, action) = classify(&ctx);
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
    let (proto, l4) = match ethertype {
        ETH_P_IP => {
            // Untagged only: the mesh answers on the advertise address, never on a VLAN.
            // First, before any other read: a packet the mesh takes passes every check below.
            if l3 == ETH_HLEN {
                if let Some(packet) = mesh::Datagram::parse(ctx, l3) {
                    if let Some(service) = mesh::published(&packet, settings) {
                        return (
                            Verdict::Mesh,
                            mesh::forward(ctx, &packet, settings, &service),
                        );
                    }
                    // Parsed already: no reason to read the headers again.
                    let dport = u16::from_be(packet.dport);
                    return pass(port_verdict(packet.protocol, dport, settings));
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
            // Later fragments carry no transport header: nothing to match on.
            if frag & 0x1fff != 0 {
                return pass(Verdict::Other);
            }
            (proto, l3 + ihl)
        }
        ETH_P_IPV6 => {
            let Some(next) = load_u8(ctx, l3 + 6) else {
                return pass(Verdict::Malformed);
            };
            (next, l3 + IPV6_HLEN)
        }
        _ => return pass(Verdict::Other),
    };
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return pass(Verdict::Other);
    }
    let Some(dport) = load_be16(ctx, l4 + 2) else {
        return pass(Verdict::Malformed);
    };
    pass(port_verdict(proto, dport, settings))
}

/// A TCP or UDP packet's verdict by its destination port (host byte order).
#[inline(always)]
fn port_verdict(proto: u8, dport: u16, settings: &IngressSettings) -> Verdict {
    if proto == IPPROTO_UDP && dport == settings.data_path_port {
        Verdict::Overlay
    } else if dport == settings.gossip_port
        || (proto == IPPROTO_TCP && dport == settings.manager_port)
    {
        Verdict::Control
    } else {
        Verdict::Other
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
