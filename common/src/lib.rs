//! Types shared by shoal's kernel programs (`shoal-ebpf`) and the user-space loader
//! (`shoal-dataplane`). Everything here is `#[repr(C)]` plain data: both halves must agree
//! on the exact layout of every map key and value.
#![no_std]

/// Bumped whenever the layout of a pinned map changes. Pinned maps live under a directory
/// named after it, so a new agent never reuses a map whose layout it does not understand.
pub const MAPS_ABI_VERSION: u32 = 4;

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
    pub const MESH_REPLY: &str = "shoal_mesh_reply";
    pub const MESH_NODE_CONNECT4: &str = "shoal_mesh_node_connect4";
    pub const TASK_DEVICES: &str = "shoal_task_devices";
    pub const MESH_TO_TASK: &str = "shoal_mesh_to_task";
    pub const MESH_FROM_TASK: &str = "shoal_mesh_from_task";
    pub const MESH_PORTS: &str = "MESH_PORTS";
    pub const MESH_CLOCK: &str = "MESH_CLOCK";
    pub const MESH_MAGLEV: &str = "MESH_MAGLEV";
    pub const MESH_FLOWS: &str = "MESH_FLOWS";
    pub const MESH_REPLIES: &str = "MESH_REPLIES";
    pub const MESH_ORIGINS: &str = "MESH_ORIGINS";
    pub const MESH_COUNTERS: &str = "MESH_COUNTERS";
    pub const VXLAN_PEERS: &str = "VXLAN_PEERS";
    pub const OVERLAY_ENDPOINTS: &str = "OVERLAY_ENDPOINTS";
}

/// Checks a type the kernel and user halves share for its size and alignment at compile
/// time, on both targets (`bpfel-unknown-none` and the host): the two halves cannot disagree
/// on a layout, and a layout that changes fails the build until the change is deliberate
/// (then `MAPS_ABI_VERSION` moves with it). Each size is the sum of the fields, so no key
/// hides a padding hole the kernel would hash.
macro_rules! assert_layout {
    ($ty:ty: $size:literal bytes, align $align:literal) => {
        const _: () = assert!(
            core::mem::size_of::<$ty>() == $size && core::mem::align_of::<$ty>() == $align,
            concat!(
                "the layout of ",
                stringify!($ty),
                " changed: see MAPS_ABI_VERSION"
            ),
        );
    };
}

/// Remote endpoints whose ARP the VIP echo program answers, over all of a node's overlay
/// networks. Key: the endpoint's IPv4 (network byte order; subnets never overlap, so it is
/// unique); value: its network's VNI.
pub const OVERLAY_MAX_ENDPOINTS: u32 = 65_536;

/// VTEPs accepted on the data-path port, over all VNIs: one per node and network.
pub const VXLAN_MAX_PEERS: u32 = 65_536;

/// Key of `VXLAN_PEERS`: a node (its VTEP address, network byte order) that may send on a
/// VNI (host byte order). VXLAN from any other source is dropped by the ingress classifier.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VxlanPeer {
    pub vni: u32,
    pub vtep: u32,
}
assert_layout!(VxlanPeer: 8 bytes, align 4);

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
assert_layout!(VipService: 16 bytes, align 4);

/// Key of one backend slot of one generation of a VIP's backend list.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendSlot {
    pub service: u32,
    pub generation: u32,
    pub slot: u32,
}
assert_layout!(BackendSlot: 12 bytes, align 4);

/// A UDP socket's view of a backend, so replies read as coming from the VIP (network byte
/// order address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReverseKey {
    pub cookie: u64,
    pub ip: u32,
    pub port: u32,
}
assert_layout!(ReverseKey: 16 bytes, align 8);

/// Published ports the mesh serves at once (one Maglev row each); the agent may lower or
/// raise it at load time (`MESH_MAGLEV` holds `services × table size` slots of 8 bytes:
/// 8 MiB by default).
pub const MESH_MAX_SERVICES: u32 = 256;
/// Default Maglev table size (prime): within 1% balance up to 40 backends per service.
pub const MESH_DEFAULT_TABLE_SIZE: u32 = 4_093;
/// Flows tracked (LRU) on the node clients reach, and origins on the node of the backend.
pub const MESH_MAX_FLOWS: u32 = 131_072;

/// `MeshService::flags`: the client address is replaced by the origin node's ingress address.
pub const MESH_SNAT: u16 = 1;
/// `MeshService::flags`: the slot's port is published (an empty slot is all zeroes).
pub const MESH_PUBLISHED: u16 = 2;
/// `MeshService::flags`: its Maglev row holds backends (else the kernel answers: refused).
pub const MESH_HAS_BACKENDS: u16 = 4;
/// `MeshFlow::state` bits, from the TCP flags seen both ways.
pub const FLOW_FIN_CLIENT: u32 = 1;
pub const FLOW_FIN_BACKEND: u32 = 2;
pub const FLOW_RST: u32 = 4;

/// The Maglev hash of a flow (addresses and ports as they sit in the packet). The same on
/// every node, so any node picks the same backend from the same table, and a node that
/// forgot a flow picks it again; `ingress trace` computes it to name the slot.
#[inline(always)]
pub fn flow_hash(client_ip: u32, client_port: u16, published_port: u16, protocol: u8) -> u32 {
    let ports = (u32::from(client_port) << 16) | u32::from(published_port);
    mix(mix(client_ip ^ 0x9e37_79b9) ^ ports ^ (u32::from(protocol) << 24))
}

/// Murmur3's finaliser: every input bit affects every output bit.
#[inline(always)]
pub fn mix(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// An Internet checksum (`check`) updated for a 32-bit field of the data it covers changing
/// from `from` to `to` (RFC 1624, eq. 3). All three as they sit in the packet, read
/// native-endian: the one's-complement sum is the same in either byte order as long as every
/// word is read the same way.
#[inline(always)]
pub fn csum_replace4(check: u16, from: u32, to: u32) -> u16 {
    let sum = u32::from(!check) + (!from & 0xffff) + (!from >> 16) + (to & 0xffff) + (to >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !((sum & 0xffff) + (sum >> 16)) as u16
}

/// Entries of `MESH_PORTS`: an array with a slot per TCP port, then one per UDP port. An
/// array, not a hash: its lookup is a few inlined instructions, a hash lookup three
/// function calls (each costs ~20 ns where return thunks are on, as on this project's VMs).
pub const MESH_PORT_SLOTS: u32 = 2 * 65_536;

/// The `MESH_PORTS` slot of a port (host byte order) of an IP protocol; None for protocols
/// other than TCP and UDP.
#[inline(always)]
pub fn mesh_port_slot(protocol: u8, port: u16) -> Option<u32> {
    match protocol {
        6 => Some(u32::from(port)),
        17 => Some(65_536 + u32::from(port)),
        _ => None,
    }
}

/// A published port's service: its Maglev row (`index`), the tasks' port (network byte
/// order) and how many backends the row holds (0: nothing to pick, the kernel answers).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshService {
    pub index: u32,
    /// `MESH_PUBLISHED` (else the slot is empty), `MESH_HAS_BACKENDS`, `MESH_SNAT`.
    pub flags: u16,
    pub target_port: u16,
}
assert_layout!(MeshService: 8 bytes, align 4);
// `MeshService` is also read and written as one word (`to_word`, `from_word`).
const _: () = assert!(
    core::mem::offset_of!(MeshService, flags) == 4
        && core::mem::offset_of!(MeshService, target_port) == 6
);

impl MeshService {
    /// The entry as the one 8-byte word it is stored as (little-endian, like every target
    /// here): the agent stores it and the programs load it whole, so a packet never sees
    /// half of an old entry and half of a new one.
    #[inline(always)]
    pub fn to_word(&self) -> u64 {
        u64::from(self.index) | u64::from(self.flags) << 32 | u64::from(self.target_port) << 48
    }

    #[inline(always)]
    pub fn from_word(word: u64) -> Self {
        Self {
            index: word as u32,
            flags: (word >> 32) as u16,
            target_port: (word >> 48) as u16,
        }
    }
}

/// A flow as it reaches the node (key of `MESH_FLOWS`), addresses and ports in network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client_ip: u32,
    pub node_ip: u32,
    pub client_port: u16,
    pub published_port: u16,
    pub protocol: u8,
    /// Two fields, not `[u8; 3]`: an odd-sized zeroed array compiles to a memset call in
    /// the kernel programs.
    pub _pad: u8,
    pub _pad2: u16,
}
assert_layout!(FlowKey: 16 bytes, align 4);

/// Where a tracked flow goes: the backend, the source it is given (the client's own, or
/// the node's ingress address and a port in SNAT mode), its service's row, and its age.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshFlow {
    pub backend_ip: u32,
    pub source_ip: u32,
    pub backend_port: u16,
    pub source_port: u16,
    pub service_index: u32,
    /// `FLOW_*` bits.
    pub state: u32,
    pub _pad: u32,
    /// `MESH_CLOCK` (CLOCK_MONOTONIC, as the agent last wrote it) at the last packet either
    /// way.
    pub last_seen_ns: u64,
}
assert_layout!(MeshFlow: 32 bytes, align 8);

/// A reply as it comes back from the backend (key of `MESH_REPLIES` on the node the client
/// reached, and of `MESH_ORIGINS` on the backend's node): the backend's address and port,
/// and the address and port it answers to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReplyKey {
    pub backend_ip: u32,
    pub peer_ip: u32,
    pub backend_port: u16,
    pub peer_port: u16,
    pub protocol: u8,
    /// As in `FlowKey`.
    pub _pad: u8,
    pub _pad2: u16,
}
assert_layout!(ReplyKey: 16 bytes, align 4);

/// The overlay MAC of the node a flow came in through, so the backend's replies go back
/// through it (where the flow's translation lives).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}
assert_layout!(Origin: 8 bytes, align 1);

/// Per service (by row), summed over CPUs by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshCounters {
    /// Flows given a backend by Maglev (new flows, and flows the table had forgotten).
    pub flows: u64,
    /// Packets and bytes sent to backends, and replies sent back to clients.
    pub packets_in: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub bytes_out: u64,
    /// Packets to a published port with no backend: left to the kernel, which refuses them.
    pub no_backend: u64,
    /// New SNAT flows that found no free source port: left to the kernel.
    pub snat_exhausted: u64,
    /// New flows the flow tables refused: left to the kernel.
    pub flow_table_full: u64,
    /// Packets that could not be rewritten or sent (checksum helpers, redirect): dropped.
    pub rewrite_failed: u64,
}
assert_layout!(MeshCounters: 72 bytes, align 8);

/// What the ingress classifier decided for one packet: which part of shoal it belongs to, or
/// why it was refused or left alone. Only `Mesh` packets are rewritten; the `dropped()` ones
/// are dropped; every other verdict passes the packet on unchanged.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Not shoal's traffic: handed to the kernel untouched.
    Other = 0,
    /// VXLAN to the data-path port from a member of its VNI.
    Overlay = 1,
    /// Gossip or manager traffic to shoal's control ports.
    Control = 2,
    /// Headers shorter than they claim: passed on for the kernel to drop.
    Malformed = 3,
    /// To a published port: balanced by the routing mesh.
    Mesh = 4,
    /// VXLAN to the data-path port from an address that is no node of that VNI: dropped.
    OverlayNotMember = 5,
    /// A later IPv4 fragment (no transport header to match), or a fragment to a published
    /// port (the mesh only rewrites whole datagrams): passed on.
    Fragment = 6,
    /// A published-port entry names one of shoal's own ports: never translated, passed on.
    ReservedPort = 7,
    /// To a published port without a backend: passed on (the kernel refuses it).
    NoBackend = 8,
    /// A new SNAT flow found no free source port: passed on (the kernel refuses it).
    SnatExhausted = 9,
    /// The flow tables refused a new flow: passed on (the kernel refuses it).
    FlowTableFull = 10,
    /// The rewrite or redirect of a mesh packet failed: dropped.
    RewriteFailed = 11,
}
assert_layout!(Verdict: 4 bytes, align 4);

impl Verdict {
    pub const COUNT: u32 = 12;
    pub const ALL: [Verdict; Verdict::COUNT as usize] = [
        Verdict::Other,
        Verdict::Overlay,
        Verdict::Control,
        Verdict::Malformed,
        Verdict::Mesh,
        Verdict::OverlayNotMember,
        Verdict::Fragment,
        Verdict::ReservedPort,
        Verdict::NoBackend,
        Verdict::SnatExhausted,
        Verdict::FlowTableFull,
        Verdict::RewriteFailed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Verdict::Other => "other",
            Verdict::Overlay => "overlay",
            Verdict::Control => "control",
            Verdict::Malformed => "malformed",
            Verdict::Mesh => "mesh",
            Verdict::OverlayNotMember => "vxlan_not_member",
            Verdict::Fragment => "fragment",
            Verdict::ReservedPort => "reserved_port",
            Verdict::NoBackend => "no_backend",
            Verdict::SnatExhausted => "snat_exhausted",
            Verdict::FlowTableFull => "flow_table_full",
            Verdict::RewriteFailed => "rewrite_failed",
        }
    }

    /// The verdict counted in slot `index` of `VERDICTS` (the classifier also leaves it in
    /// the packet's `cb[0]`, where `ingress trace` reads it).
    pub fn from_index(index: u32) -> Option<Verdict> {
        Verdict::ALL.get(index as usize).copied()
    }

    /// Whether the classifier drops packets with this verdict.
    pub const fn dropped(self) -> bool {
        matches!(self, Verdict::OverlayNotMember | Verdict::RewriteFailed)
    }

    /// Whether this verdict is a packet shoal refused or could not handle (counted as a
    /// drop reason by `dataplane status` and `/metrics`), as opposed to traffic it sorted.
    pub const fn is_refusal(self) -> bool {
        (self as u32) >= Verdict::OverlayNotMember as u32
    }
}

/// One slot of a per-CPU counter array (user space sums the CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
assert_layout!(Counter: 16 bytes, align 8);

/// The agent's ports, written by user space before the program is attached. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngressSettings {
    pub data_path_port: u16,
    pub gossip_port: u16,
    pub manager_port: u16,
    /// The agent's metrics port when it listens beyond loopback (else 0).
    pub metrics_port: u16,
    /// The mesh answers on this address (network byte order); 0 until the agent has one.
    pub advertise_ip: u32,
    /// Replies leave through this interface (the advertise interface).
    pub advertise_ifindex: u32,
    /// The node's endpoint on the ingress network: its address (network byte order, the
    /// SNAT source) and interface (where new flows are sent). 0: no mesh yet.
    pub ingress_ip: u32,
    pub ingress_ifindex: u32,
    /// Slots per service in `MESH_MAGLEV`.
    pub table_size: u32,
    pub _pad2: u32,
    /// The node's network namespace (SO_NETNS_COOKIE): the node's own processes reach
    /// published ports through the mesh; everyone else's connects are left alone.
    pub netns_cookie: u64,
}
assert_layout!(IngressSettings: 40 bytes, align 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: both are repr(C) structs of integers with no padding holes left uninitialised.
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::IngressSettings {}
    unsafe impl aya::Pod for super::VipService {}
    unsafe impl aya::Pod for super::BackendSlot {}
    unsafe impl aya::Pod for super::ReverseKey {}
    unsafe impl aya::Pod for super::MeshService {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::MeshFlow {}
    unsafe impl aya::Pod for super::ReplyKey {}
    unsafe impl aya::Pod for super::Origin {}
    unsafe impl aya::Pod for super::MeshCounters {}
    unsafe impl aya::Pod for super::VxlanPeer {}
}

impl IngressSettings {
    /// Whether `port` (host byte order) of `protocol` is one of shoal's own on this node:
    /// the mesh never translates a packet to it, whatever the published-port map says.
    #[inline(always)]
    pub fn is_reserved(&self, protocol: u8, port: u16) -> bool {
        match protocol {
            6 => {
                port == self.gossip_port
                    || port == self.manager_port
                    || (self.metrics_port != 0 && port == self.metrics_port)
            }
            17 => port == self.gossip_port || port == self.data_path_port,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shoals_own_ports_are_reserved_by_protocol() {
        let settings = IngressSettings {
            data_path_port: 4789,
            gossip_port: 7946,
            manager_port: 2377,
            metrics_port: 0,
            ..Default::default()
        };
        assert!(settings.is_reserved(6, 2377));
        assert!(settings.is_reserved(6, 7946));
        assert!(settings.is_reserved(17, 7946));
        assert!(settings.is_reserved(17, 4789));
        assert!(!settings.is_reserved(6, 4789), "VXLAN is UDP only");
        assert!(
            !settings.is_reserved(17, 2377),
            "the manager API is TCP only"
        );
        assert!(
            !settings.is_reserved(6, 9323),
            "metrics on loopback are not reachable"
        );
        let exposed = IngressSettings {
            metrics_port: 9323,
            ..settings
        };
        assert!(exposed.is_reserved(6, 9323));
        assert!(!settings.is_reserved(6, 0) && !settings.is_reserved(1, 7946));
    }

    /// The checksum of `words` computed from scratch.
    fn checksum(words: &[u16]) -> u16 {
        let mut sum: u32 = words.iter().map(|w| u32::from(*w)).sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn incremental_checksum_matches_a_full_recompute() {
        // An IPv4 header as ten words, its checksum in word 5, an address in words 8-9.
        let mut seed = 0x2545_f491_u32;
        for _ in 0..100_000 {
            let mut header = [0u16; 10];
            for word in &mut header {
                seed = mix(seed.wrapping_add(1));
                *word = seed as u16;
            }
            header[5] = 0;
            header[5] = checksum(&header);
            let from = u32::from(header[8]) | u32::from(header[9]) << 16;
            seed = mix(seed);
            let to = seed;
            let updated = csum_replace4(header[5], from, to);
            header[8] = to as u16;
            header[9] = (to >> 16) as u16;
            header[5] = 0;
            let full = checksum(&header);
            // 0x0000 and 0xffff are the same one's-complement number.
            assert!(
                updated == full || updated ^ full == 0xffff,
                "{updated:#x} vs {full:#x}"
            );
            header[5] = updated;
            assert_eq!(checksum(&header), 0, "the header verifies");
        }
    }

    #[test]
    fn a_mesh_service_is_one_word_laid_out_as_its_struct() {
        let service = MeshService {
            index: 0x0102_0304,
            flags: MESH_PUBLISHED | MESH_HAS_BACKENDS | MESH_SNAT,
            target_port: 8080u16.to_be(),
        };
        let word = service.to_word();
        assert_eq!(MeshService::from_word(word), service);
        // The word is what a reader of the map's memory sees (the programs read it so).
        // SAFETY: MeshService is repr(C), 8 bytes of integers.
        let read: MeshService = unsafe { core::mem::transmute(word.to_le_bytes()) };
        assert_eq!(read, service);
        assert_eq!(core::mem::size_of::<MeshService>(), 8);
        // An empty slot reads as not published.
        assert_eq!(MeshService::from_word(0).flags & MESH_PUBLISHED, 0);
    }

    #[test]
    fn every_tcp_and_udp_port_has_its_own_slot() {
        assert_eq!(mesh_port_slot(6, 0), Some(0));
        assert_eq!(mesh_port_slot(6, 65_535), Some(65_535));
        assert_eq!(mesh_port_slot(17, 0), Some(65_536));
        assert_eq!(mesh_port_slot(17, 65_535), Some(MESH_PORT_SLOTS - 1));
        assert_eq!(mesh_port_slot(1, 80), None);
    }
}
