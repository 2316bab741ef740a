//! VIPs answer ping, as in Swarm. ICMP is not a socket the socket load balancer can steer,
//! so this program runs per packet on the network side of each task's overlay interface and
//! turns an echo request to a VIP into the echo reply, sent straight back to the task.
//!
//! It also answers ARP, for VIPs (nothing else owns a VIP's address) and for the endpoints
//! on other nodes (`OVERLAY_ENDPOINTS`), with the MAC derived as for every endpoint: 02:42 +
//! the address. So the kernel holds no permanent neighbour entry per remote endpoint: a task
//! caches only the peers it talks to. It runs on the node's ingress endpoint too (the mesh
//! resolves its backends), first on the hook: what it does not answer goes on to the next
//! program (`TC_ACT_UNSPEC`).

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::bpf_redirect,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use shoal_common::OVERLAY_MAX_ENDPOINTS;

use crate::{
    headers::{ETH_HLEN, ETH_P_ARP, ETH_P_IP, IPPROTO_ICMP},
    socket_lb::LB_SERVICES,
};

/// Endpoints of this node's networks that live on other nodes: IPv4 -> VNI.
#[map(name = "OVERLAY_ENDPOINTS")]
static OVERLAY_ENDPOINTS: HashMap<u32, u32> = HashMap::pinned(OVERLAY_MAX_ENDPOINTS, 0);

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;

#[classifier]
pub fn shoal_vip_echo(ctx: TcContext) -> i32 {
    let reply = match ctx.load::<u16>(12).map(u16::from_be) {
        Ok(ETH_P_IP) => reflect_echo_to_vip(&ctx),
        Ok(ETH_P_ARP) => answer_arp(&ctx),
        _ => None,
    };
    match reply {
        // SAFETY: the skb pointer is valid for the program's run; the reply goes back out
        // the interface the request came in on.
        Some(()) => unsafe { bpf_redirect((*ctx.skb.skb).ifindex, 0) as i32 },
        None => TC_ACT_UNSPEC,
    }
}

/// An ARP request (Ethernet/IPv4) for a VIP or a remote endpoint becomes the reply, in
/// place.
fn answer_arp(ctx: &TcContext) -> Option<()> {
    // htype 1, ptype IPv4, hlen 6, plen 4, opcode.
    let header: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
    if header[..6] != [0, 1, 8, 0, 6, 4]
        || u16::from_be_bytes([header[6], header[7]]) != ARP_REQUEST
    {
        return None;
    }
    let sender_mac: [u8; 6] = ctx.load(ETH_HLEN + 8).ok()?;
    let sender_ip: u32 = ctx.load(ETH_HLEN + 14).ok()?;
    let target_ip: u32 = ctx.load(ETH_HLEN + 24).ok()?;
    // SAFETY: plain lookups; nothing is kept.
    let known = unsafe {
        LB_SERVICES.get(target_ip).is_some() || OVERLAY_ENDPOINTS.get(target_ip).is_some()
    };
    if !known {
        return None;
    }
    let octets = target_ip.to_ne_bytes();
    let target_mac = [0x02, 0x42, octets[0], octets[1], octets[2], octets[3]];
    ctx.store(0, &sender_mac, 0).ok()?;
    ctx.store(6, &target_mac, 0).ok()?;
    ctx.store(ETH_HLEN + 6, &ARP_REPLY.to_be(), 0).ok()?;
    ctx.store(ETH_HLEN + 8, &target_mac, 0).ok()?;
    ctx.store(ETH_HLEN + 14, &target_ip, 0).ok()?;
    ctx.store(ETH_HLEN + 18, &sender_mac, 0).ok()?;
    ctx.store(ETH_HLEN + 24, &sender_ip, 0).ok()?;
    Some(())
}

/// The reply in place of the request: MACs and addresses swapped (the IP checksum does not
/// change), type 8 -> 0 with the ICMP checksum adjusted, and out the way it came.
fn reflect_echo_to_vip(ctx: &TcContext) -> Option<()> {
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?);
    // Only whole datagrams: a fragment carries no (or part of an) ICMP header.
    if vihl >> 4 != 4 || ihl < 20 || proto != IPPROTO_ICMP || frag & 0x3fff != 0 {
        return None;
    }
    let source: u32 = ctx.load(ETH_HLEN + 12).ok()?;
    let destination: u32 = ctx.load(ETH_HLEN + 16).ok()?;
    // SAFETY: a plain lookup; the value is copied out at once.
    let service = (unsafe { LB_SERVICES.get(destination) }).copied()?;
    let icmp = ETH_HLEN + ihl;
    let kind: [u8; 2] = ctx.load(icmp).ok()?;
    if service.count == 0 || kind[0] != ICMP_ECHO_REQUEST {
        return None;
    }
    // The whole ICMP header must be there before anything is rewritten: a truncated request
    // is passed on untouched, never half turned into a reply.
    ctx.load::<[u8; 8]>(icmp).ok()?;
    let dst_mac: [u8; 6] = ctx.load(0).ok()?;
    let src_mac: [u8; 6] = ctx.load(6).ok()?;
    ctx.store(0, &src_mac, 0).ok()?;
    ctx.store(6, &dst_mac, 0).ok()?;
    ctx.store(ETH_HLEN + 12, &destination, 0).ok()?;
    ctx.store(ETH_HLEN + 16, &source, 0).ok()?;
    let reply = [ICMP_ECHO_REPLY, kind[1]];
    ctx.store(icmp, &reply, 0).ok()?;
    ctx.l4_csum_replace(
        icmp + 2,
        u64::from(u16::from_ne_bytes(kind)),
        u64::from(u16::from_ne_bytes(reply)),
        2,
    )
    .ok()?;
    Some(())
}
