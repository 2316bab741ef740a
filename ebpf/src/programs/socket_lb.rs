//! Task to VIP, east-west load balancing at the socket: a task's `connect()` or `sendmsg()`
//! to a service VIP is rewritten to one of the service's running tasks before any packet
//! exists, so there is no per-packet NAT and no conntrack. Attached to the cgroup that holds
//! every task. UDP replies are rewritten back to the VIP on `recvmsg()`.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext as _,
};
use shoal_common::ReverseKey;

use crate::lib::lb::{self, VipChoice};

/// Return values of sock_addr programs: carry on, or fail the call with EPERM.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;
const SOCK_DGRAM: u32 = 2;

#[cgroup_sock_addr(connect4)]
pub fn shoal_connect4(ctx: SockAddrContext) -> i32 {
    pick_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn shoal_sendmsg4(ctx: SockAddrContext) -> i32 {
    pick_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn shoal_recvmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands a valid bpf_sock_addr for the program's lifetime.
    let addr = unsafe { &mut *ctx.sock_addr };
    let key = ReverseKey {
        // SAFETY: socket cookies are available to sock_addr programs.
        cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        ip: addr.user_ip4,
        port: addr.user_port,
    };
    if let Some(vip) = lb::vip_of(&key) {
        addr.user_ip4 = vip;
    }
    ALLOW
}

/// Rewrites a destination VIP to a random backend of its current generation. A VIP with no
/// running task refuses the call rather than sending into the void.
#[inline(always)]
fn pick_backend(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    let vip = addr.user_ip4;
    // SAFETY: helper without side effects.
    let random = || unsafe { bpf_get_prandom_u32() };
    let backend = match lb::vip_backend(vip, random) {
        Some(VipChoice::Backend(backend)) => backend,
        Some(VipChoice::NoBackend) => return REFUSE,
        None => return ALLOW,
    };
    addr.user_ip4 = backend;
    if addr.type_ == SOCK_DGRAM {
        let key = ReverseKey {
            // SAFETY: as above.
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            ip: backend,
            port: addr.user_port,
        };
        lb::remember_vip(&key, vip);
    }
    ALLOW
}
