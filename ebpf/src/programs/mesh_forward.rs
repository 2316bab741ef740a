//! The routing mesh, client to backend: the part of `shoal_ingress` that takes a packet to a
//! published port on the node's advertise address. The packet is given a backend (a task's
//! address on the `ingress` overlay) by the service's Maglev row, its flow is remembered, and
//! it is rewritten to the backend and sent into the ingress network, keeping the client's
//! address as its source (or, in SNAT mode, the node's ingress address).
//!
//! Replies come back through the node that translated the flow: `mesh_task` on the backend's
//! node sends them there, `mesh_reply` on this node undoes the translation.
//!
//! Only whole IPv4 TCP/UDP datagrams are ever rewritten (fragments carry no or partial
//! transport headers), and a packet is either rewritten completely or not at all.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use shoal_common::{
    FlowKey, IngressSettings, MeshFlow, MeshService, ReplyKey, Verdict, FLOW_FIN_CLIENT, MESH_SNAT,
};

use crate::lib::{
    conntrack, counters, lb,
    nat::{self, End},
    parse::Datagram,
};

/// Sends a packet for a published port to its flow's backend (choosing one for a new flow).
/// A packet the mesh cannot place is left to the kernel, with the reason as its verdict.
#[inline(always)]
pub fn forward(
    ctx: &TcContext,
    packet: &Datagram,
    settings: &IngressSettings,
    service: &MeshService,
) -> (Verdict, i32) {
    let counters = counters::mesh_service(service.index);
    let key = conntrack::flow_key(packet);
    let now = conntrack::now_ns();
    // A SYN starts a new connection: it is balanced afresh even if the tuple was seen before.
    let tracked = if packet.is_syn() {
        None
    } else {
        conntrack::lookup(&key)
    };
    let flow = match tracked {
        Some(flow) => conntrack::touch(flow, packet, FLOW_FIN_CLIENT, now),
        None => match new_flow(packet, &key, settings, service, now) {
            Ok(flow) => {
                counters::bump(counters, |c| c.flows += 1);
                flow
            }
            Err(reason) => {
                counters::bump(counters, |c| match reason {
                    Verdict::SnatExhausted => c.snat_exhausted += 1,
                    Verdict::FlowTableFull => c.flow_table_full += 1,
                    _ => c.no_backend += 1,
                });
                return (reason, TC_ACT_OK);
            }
        },
    };
    let translated = nat::rewrite(
        ctx,
        packet,
        End::Destination,
        flow.backend_ip,
        flow.backend_port,
    )
    .and_then(|()| nat::rewrite(ctx, packet, End::Source, flow.source_ip, flow.source_port));
    let bytes = u64::from(ctx.len());
    counters::bump(counters, |c| {
        if translated.is_some() {
            c.packets_in += 1;
            c.bytes_in += bytes;
        } else {
            c.rewrite_failed += 1;
        }
    });
    match translated {
        Some(()) => (Verdict::Mesh, nat::redirect(settings.ingress_ifindex)),
        None => (Verdict::RewriteFailed, TC_ACT_SHOT),
    }
}

/// Picks the flow's backend from the service's Maglev row and records the flow both ways;
/// the reason (as a verdict) when it cannot.
#[inline(always)]
fn new_flow(
    packet: &Datagram,
    key: &FlowKey,
    settings: &IngressSettings,
    service: &MeshService,
    now: u64,
) -> Result<MeshFlow, Verdict> {
    let hash = shoal_common::flow_hash(packet.saddr, packet.sport, packet.dport, packet.protocol);
    let backend_ip = lb::maglev_flow_backend(service, settings, hash).ok_or(Verdict::NoBackend)?;
    let mut flow = MeshFlow {
        backend_ip,
        source_ip: packet.saddr,
        backend_port: service.target_port,
        source_port: packet.sport,
        service_index: service.index,
        state: 0,
        _pad: 0,
        last_seen_ns: now,
    };
    let mut reply = ReplyKey {
        backend_ip,
        peer_ip: packet.saddr,
        backend_port: service.target_port,
        peer_port: packet.sport,
        protocol: packet.protocol,
        _pad: 0,
        _pad2: 0,
    };
    if service.flags & MESH_SNAT != 0 {
        flow.source_ip = settings.ingress_ip;
        reply.peer_ip = settings.ingress_ip;
        flow.source_port = nat::snat_port(&mut reply, key, hash).ok_or(Verdict::SnatExhausted)?;
    } else {
        conntrack::record_reply(&reply, key)?;
    }
    conntrack::record_flow(key, &flow)?;
    Ok(flow)
}
