//! East-west load balancing at the socket: a task's `connect()` or `sendmsg()` to a service
//! VIP is rewritten to one of the service's running tasks before any packet exists, so there
//! is no per-packet NAT and no conntrack. Attached to the cgroup that holds every task.
//! UDP replies are rewritten back to the VIP on `recvmsg()`.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap},
    programs::SockAddrContext,
    EbpfContext as _,
};
use shoal_common::{
    BackendSlot, ReverseKey, VipService, LB_MAX_BACKEND_SLOTS, LB_MAX_REVERSE, LB_MAX_VIPS,
};

#[map(name = "LB_SERVICES")]
pub(crate) static LB_SERVICES: HashMap<u32, VipService> = HashMap::pinned(LB_MAX_VIPS, 0);

#[map(name = "LB_BACKENDS")]
static LB_BACKENDS: HashMap<BackendSlot, u32> = HashMap::pinned(LB_MAX_BACKEND_SLOTS, 0);

#[map(name = "LB_REVERSE")]
static LB_REVERSE: LruHashMap<ReverseKey, u32> = LruHashMap::pinned(LB_MAX_REVERSE, 0);

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
    // SAFETY: a plain lookup; the value is copied out at once.
    if let Some(vip) = unsafe { LB_REVERSE.get(key) } {
        addr.user_ip4 = *vip;
    }
    ALLOW
}

/// Rewrites a destination VIP to a random backend of its current generation. A VIP with no
/// running task refuses the call rather than sending into the void.
fn pick_backend(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as above.
    let addr = unsafe { &mut *ctx.sock_addr };
    let vip = addr.user_ip4;
    // SAFETY: a plain lookup; the value is copied out at once.
    let Some(service) = (unsafe { LB_SERVICES.get(vip) }).copied() else {
        return ALLOW;
    };
    if service.count == 0 {
        return REFUSE;
    }
    let slot = BackendSlot {
        service: service.id,
        generation: service.generation,
        // SAFETY: helper without side effects.
        slot: unsafe { bpf_get_prandom_u32() } % service.count,
    };
    // SAFETY: as above.
    let Some(backend) = (unsafe { LB_BACKENDS.get(slot) }).copied() else {
        return ALLOW;
    };
    addr.user_ip4 = backend;
    if addr.type_ == SOCK_DGRAM {
        let key = ReverseKey {
            // SAFETY: as above.
            cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
            ip: backend,
            port: addr.user_port,
        };
        // A full LRU evicts the oldest entry; failure only costs the reply's VIP source.
        let _ = LB_REVERSE.insert(key, vip, 0);
    }
    ALLOW
}
