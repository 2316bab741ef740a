//! `shoal_vip_echo`, TC on the network side of each task's overlay interface (and first on
//! the node's ingress endpoint). VIPs answer ping, as in Swarm: ICMP is not a socket the
//! socket load balancer can steer, so an echo request to a VIP is turned into the echo reply
//! here, per packet, and sent straight back to the task.
//!
//! It also answers ARP, for VIPs (nothing else owns a VIP's address) and for the endpoints
//! on other nodes (`OVERLAY_ENDPOINTS`), with the MAC derived as for every endpoint: 02:42 +
//! the address. So the kernel holds no permanent neighbour entry per remote endpoint: a task
//! caches only the peers it talks to (task to task). On the ingress endpoint the mesh
//! resolves its backends through it. What it does not answer goes on to the next program
//! (`TC_ACT_UNSPEC`).

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::bpf_redirect,
    macros::{classifier, map},
    maps::HashMap,
    programs::TcContext,
};
use shoal_common::OVERLAY_MAX_ENDPOINTS;

use crate::lib::{
    csum, lb,
    parse::{
        Ipv4, ARP_HTYPE, ARP_OPER, ARP_SHA, ARP_SPA, ARP_THA, ARP_TPA, ETH_DST, ETH_HLEN,
        ETH_PROTO, ETH_P_ARP, ETH_P_IP, ETH_SRC, ICMP_CSUM, ICMP_HLEN, IPPROTO_ICMP, IPV4_DST,
        IPV4_SRC,
    },
};

/// Endpoints of this node's networks that live on other nodes: IPv4 -> VNI.
#[map(name = "OVERLAY_ENDPOINTS")]
static OVERLAY_ENDPOINTS: HashMap<u32, u32> = HashMap::pinned(OVERLAY_MAX_ENDPOINTS, 0);

const ARP_REQUEST: u16 = 1;
const ARP_REPLY: u16 = 2;
/// What an Ethernet/IPv4 ARP header starts with: hardware type 1, protocol IPv4, address
/// lengths 6 and 4.
const ARP_ETHERNET_IPV4: [u8; 6] = [0, 1, 8, 0, 6, 4];
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;

#[classifier]
pub fn shoal_vip_echo(ctx: TcContext) -> i32 {
    let reply = match ctx.load::<u16>(ETH_PROTO).map(u16::from_be) {
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
#[inline(always)]
fn answer_arp(ctx: &TcContext) -> Option<()> {
    const ARP: usize = ETH_HLEN;
    let header: [u8; ARP_SHA] = ctx.load(ARP + ARP_HTYPE).ok()?;
    if header[..ARP_OPER] != ARP_ETHERNET_IPV4
        || u16::from_be_bytes([header[ARP_OPER], header[ARP_OPER + 1]]) != ARP_REQUEST
    {
        return None;
    }
    let sender_mac: [u8; 6] = ctx.load(ARP + ARP_SHA).ok()?;
    let sender_ip: u32 = ctx.load(ARP + ARP_SPA).ok()?;
    let target_ip: u32 = ctx.load(ARP + ARP_TPA).ok()?;
    // SAFETY: a plain lookup; only its presence is used.
    let known = lb::is_vip(target_ip) || unsafe { OVERLAY_ENDPOINTS.get(target_ip) }.is_some();
    if !known {
        return None;
    }
    let octets = target_ip.to_ne_bytes();
    let target_mac = [0x02, 0x42, octets[0], octets[1], octets[2], octets[3]];
    ctx.store(ETH_DST, &sender_mac, 0).ok()?;
    ctx.store(ETH_SRC, &target_mac, 0).ok()?;
    ctx.store(ARP + ARP_OPER, &ARP_REPLY.to_be(), 0).ok()?;
    ctx.store(ARP + ARP_SHA, &target_mac, 0).ok()?;
    ctx.store(ARP + ARP_SPA, &target_ip, 0).ok()?;
    ctx.store(ARP + ARP_THA, &sender_mac, 0).ok()?;
    ctx.store(ARP + ARP_TPA, &sender_ip, 0).ok()?;
    Some(())
}

/// The reply in place of the request: MACs and addresses swapped (the IP checksum does not
/// change), type 8 -> 0 with the ICMP checksum adjusted, and out the way it came.
#[inline(always)]
fn reflect_echo_to_vip(ctx: &TcContext) -> Option<()> {
    const IP: usize = ETH_HLEN;
    let ip = Ipv4::load(ctx, IP)?;
    // Only whole datagrams: a fragment carries no (or part of an) ICMP header.
    if ip.protocol != IPPROTO_ICMP || ip.is_fragment() {
        return None;
    }
    let source: u32 = ctx.load(IP + IPV4_SRC).ok()?;
    let destination: u32 = ctx.load(IP + IPV4_DST).ok()?;
    if !lb::is_live_vip(destination) {
        return None;
    }
    let icmp = IP + ip.header_len();
    let kind: [u8; 2] = ctx.load(icmp).ok()?;
    if kind[0] != ICMP_ECHO_REQUEST {
        return None;
    }
    // The whole ICMP header must be there before anything is rewritten: a truncated request
    // is passed on untouched, never half turned into a reply.
    ctx.load::<[u8; ICMP_HLEN]>(icmp).ok()?;
    let dst_mac: [u8; 6] = ctx.load(ETH_DST).ok()?;
    let src_mac: [u8; 6] = ctx.load(ETH_SRC).ok()?;
    ctx.store(ETH_DST, &src_mac, 0).ok()?;
    ctx.store(ETH_SRC, &dst_mac, 0).ok()?;
    ctx.store(IP + IPV4_SRC, &destination, 0).ok()?;
    ctx.store(IP + IPV4_DST, &source, 0).ok()?;
    let reply = [ICMP_ECHO_REPLY, kind[1]];
    ctx.store(icmp, &reply, 0).ok()?;
    csum::replace_word(
        ctx,
        icmp + ICMP_CSUM,
        u16::from_ne_bytes(kind),
        u16::from_ne_bytes(reply),
    )
}
