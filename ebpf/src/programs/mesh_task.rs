//! The routing mesh on the backend's node, on each task's interface of the ingress network
//! (TC on the host side of its veth): a reply to a mesh flow goes back to the node the flow
//! came through (where its translation lives), whatever the task's routing chose.

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

use crate::lib::{
    conntrack,
    parse::{peek, Datagram, ETH_DST, ETH_SRC},
};

/// Towards the task: remembers the overlay MAC of the node each flow came through.
#[classifier]
pub fn shoal_mesh_to_task(ctx: TcContext) -> i32 {
    let Some(packet) = Datagram::from_frame(&ctx) else {
        return TC_ACT_OK;
    };
    let Some(mac) = peek::<[u8; 6]>(&ctx, ETH_SRC) else {
        return TC_ACT_OK;
    };
    conntrack::remember_origin(&conntrack::reply_key(&packet, false), mac);
    TC_ACT_OK
}

/// From the task: a reply to a mesh flow is addressed to the MAC of the node the flow came
/// through.
#[classifier]
pub fn shoal_mesh_from_task(ctx: TcContext) -> i32 {
    let Some(packet) = Datagram::from_frame(&ctx) else {
        return TC_ACT_OK;
    };
    if let Some(mac) = conntrack::origin(&conntrack::reply_key(&packet, true)) {
        let _ = ctx.store(ETH_DST, &mac, 0);
    }
    TC_ACT_OK
}
