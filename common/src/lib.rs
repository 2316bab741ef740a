//! Types shared by shoal's kernel programs (`shoal-ebpf`) and the user-space loader
//! (`shoal-dataplane`). Everything here is `#[repr(C)]` plain data: both halves must agree
//! on the exact layout of every map key and value.
#![no_std]

/// Bumped whenever the layout of a pinned map changes. Pinned maps live under a directory
/// named after it, so a new agent never reuses a map whose layout it does not understand.
pub const MAPS_ABI_VERSION: u32 = 1;

/// Program and map names, as the kernel and bpffs see them.
pub mod names {
    pub const INGRESS_PROGRAM: &str = "shoal_ingress";
    pub const VERDICT_COUNTERS: &str = "VERDICTS";
    pub const INGRESS_SETTINGS: &str = "SETTINGS";
    pub const LB_CONNECT4: &str = "shoal_connect4";
    pub const LB_SENDMSG4: &str = "shoal_sendmsg4";
    pub const LB_RECVMSG4: &str = "shoal_recvmsg4";
    pub const VIP_ECHO: &str = "shoal_vip_echo";
    pub const LB_SERVICES: &str = "LB_SERVICES";
    pub const LB_BACKENDS: &str = "LB_BACKENDS";
    pub const LB_REVERSE: &str = "LB_REVERSE";
}

/// Capacity of the service maps: VIPs, and backend slots over all of them.
pub const LB_MAX_VIPS: u32 = 16_384;
pub const LB_MAX_BACKEND_SLOTS: u32 = 262_144;
/// UDP reverse translations remembered (LRU): one per socket and backend in use.
pub const LB_MAX_REVERSE: u32 = 65_536;

/// A virtual IP's entry (key: the VIP, network byte order). Backends live in `LB_BACKENDS`
/// under (`id`, `generation`, 0..`count`); user space writes a new generation's slots before
/// pointing the VIP at it, so a program never sees half a change.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipService {
    pub id: u32,
    pub count: u32,
    pub generation: u32,
    pub _pad: u32,
}

/// Key of one backend slot of one generation of a VIP's backend list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendSlot {
    pub service: u32,
    pub generation: u32,
    pub slot: u32,
}

/// A UDP socket's view of a backend, so replies read as coming from the VIP (network byte
/// order address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    pub cookie: u64,
    pub ip: u32,
    pub port: u32,
}

/// What the ingress classifier decided for one packet. Every verdict currently passes the
/// packet on unchanged; the verdict says which part of shoal the packet belongs to.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not shoal's traffic: handed to the kernel untouched.
    Other = 0,
    /// VXLAN to the data-path port.
    Overlay = 1,
    /// Gossip or manager traffic to shoal's control ports.
    Control = 2,
    /// Headers shorter than they claim: passed on for the kernel to drop.
    Malformed = 3,
}

impl Verdict {
    pub const COUNT: u32 = 4;
    pub const ALL: [Verdict; Verdict::COUNT as usize] = [
        Verdict::Other,
        Verdict::Overlay,
        Verdict::Control,
        Verdict::Malformed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Other => "other",
            Verdict::Overlay => "overlay",
            Verdict::Control => "control",
            Verdict::Malformed => "malformed",
        }
    }
}

/// One slot of a per-CPU counter array (user space sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// The agent's ports, written by user space before the program is attached. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressSettings {
    pub data_path_port: u16,
    pub gossip_port: u16,
    pub manager_port: u16,
    pub _pad: u16,
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are repr(C) structs of integers with no padding holes left uninitialised.
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::IngressSettings {}
    unsafe impl aya::Pod for super::VipService {}
    unsafe impl aya::Pod for super::BackendSlot {}
    unsafe impl aya::Pod for super::ReverseKey {}
}
