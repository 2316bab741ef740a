//! shoal's kernel programs. Built for `bpfel-unknown-none` by `dataplane/build.rs` and
//! embedded in the `shoal` binary.
//!
//! Laid out like Cilium's `bpf/`: `lib/` holds what the programs share, one concern per
//! module (as `bpf/lib/*.h`), and `programs/` the entry points, one file per packet path
//! (as `bpf/bpf_*.c`). Everything in `lib/` is `#[inline(always)]`: the kernel programs make
//! no BPF-to-BPF calls, each of which costs a `ret` through a return thunk on this project's
//! machines. docs/architecture.md ("The kernel programs") maps each module and program to
//! its packet path.
#![no_std]
#![no_main]

/// What the programs share.
mod lib {
    /// The agent's settings.
    pub mod config;
    /// Connection tracking: the mesh's flows, reply translations and origins, the clock.
    pub mod conntrack;
    /// One helper that bumps per-CPU counters.
    pub mod counters;
    /// Checksum updates: transport by the kernel's helper, IPv4 in place.
    pub mod csum;
    /// Load-balancer selection: published ports, Maglev rows, service VIPs.
    pub mod lb;
    /// Address translation: rewrites, SNAT ports, the redirect after a rewrite.
    pub mod nat;
    /// Header offsets, the IPv4 parser and its fragment predicates, TCP/UDP datagrams.
    pub mod parse;
}

/// The entry points, by packet path.
mod programs {
    /// Every packet on the advertise interface: verdicts, VXLAN membership, control ports.
    pub mod ingress;
    /// Published port, the node's own processes: `connect()` to a backend.
    pub mod mesh_connect;
    /// Published port, client to backend (inside `shoal_ingress`).
    pub mod mesh_forward;
    /// Published port, backend to client, on the node the client reached.
    pub mod mesh_reply;
    /// Published port, on the backend's node: replies back through the origin node.
    pub mod mesh_task;
    /// Task to VIP: the socket load balancer.
    pub mod socket_lb;
    /// Which devices a task may open: Docker's default list.
    pub mod task_devices;
    /// Ping of VIPs, ARP for VIPs and remote endpoints.
    pub mod vip_echo;
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
