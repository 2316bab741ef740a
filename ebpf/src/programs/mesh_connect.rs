//! `shoal_mesh_node_connect4`, cgroup `connect4` on the node's root cgroup: the node's own
//! processes reach published ports too. A `connect()` in the node's namespace to its
//! advertise address or 127.0.0.1 on a published port is sent straight to a backend (chosen
//! at random from the service's Maglev row), before any packet exists. Other namespaces'
//! sockets are left alone.

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
};

use crate::lib::{
    config, lb,
    parse::{IPPROTO_TCP, IPPROTO_UDP},
};

#[cgroup_sock_addr(connect4)]
pub fn shoal_mesh_node_connect4(ctx: SockAddrContext) -> i32 {
    const ALLOW: i32 = 1;
    const SOCK_STREAM: u32 = 1;
    const LOCALHOST: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
    let Some(settings) = config::settings() else {
        return ALLOW;
    };
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    if settings.ingress_ifindex == 0
        || settings.table_size == 0
        || (addr.user_ip4 != settings.advertise_ip && addr.user_ip4 != LOCALHOST)
        // SAFETY: the helper only reads the socket's namespace.
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != settings.netns_cookie
    {
        return ALLOW;
    }
    let protocol = if addr.type_ == SOCK_STREAM {
        IPPROTO_TCP
    } else {
        IPPROTO_UDP
    };
    // `user_port` holds the port in network byte order in its low half.
    let port = u16::from_be(addr.user_port as u16);
    if settings.is_reserved(protocol, port) {
        return ALLOW;
    }
    let Some(service) = lb::port_service(protocol, port) else {
        return ALLOW;
    };
    // SAFETY: helper without side effects.
    let pick = unsafe { bpf_get_prandom_u32() } % settings.table_size;
    if let Some(backend) = lb::maglev_backend(&service, settings, pick) {
        addr.user_ip4 = backend;
        addr.user_port = u32::from(service.target_port);
    }
    ALLOW
}
