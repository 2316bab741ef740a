//! `shoal_mesh_reply`, TCX ingress on the node's endpoint of the ingress network
//! (`shoal_ing`): a backend's reply to a flow this node translated goes back to the client,
//! from the published port, out of the advertise interface.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use shoal_common::FLOW_FIN_BACKEND;

use crate::lib::{
    config, conntrack, counters,
    nat::{self, End},
    parse::Datagram,
};

#[classifier]
pub fn shoal_mesh_reply(ctx: TcContext) -> i32 {
    let Some(packet) = Datagram::from_frame(&ctx) else {
        return TC_ACT_OK;
    };
    let Some(flow_key) = conntrack::reply_flow(&conntrack::reply_key(&packet, true)) else {
        return TC_ACT_OK;
    };
    let Some(settings) = config::settings() else {
        return TC_ACT_OK;
    };
    let index = conntrack::lookup(&flow_key).map(|flow| {
        conntrack::touch(flow, &packet, FLOW_FIN_BACKEND, conntrack::now_ns()).service_index
    });
    let counters = index.and_then(counters::mesh_service);
    let translated = nat::rewrite(
        &ctx,
        &packet,
        End::Source,
        flow_key.node_ip,
        flow_key.published_port,
    )
    .and_then(|()| {
        nat::rewrite(
            &ctx,
            &packet,
            End::Destination,
            flow_key.client_ip,
            flow_key.client_port,
        )
    });
    if translated.is_none() {
        counters::bump(counters, |c| c.rewrite_failed += 1);
        return TC_ACT_SHOT;
    }
    let bytes = u64::from(ctx.len());
    counters::bump(counters, |c| {
        c.packets_out += 1;
        c.bytes_out += bytes;
    });
    nat::redirect(settings.advertise_ifindex)
}
