//! Every map of the kernel programs, in one place: the kernel half of the pinned-map ABI
//! (`shoal_common::MAPS_ABI_VERSION`; names in `shoal_common::names`, keys and values in
//! `shoal_common`). The agent pins them all under `<bpffs_root>/maps-v<ABI>/`.

use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use shoal_common::{
    BackendSlot, Counter, FlowKey, IngressSettings, MeshCounters, MeshFlow, MeshService, Origin,
    ReplyKey, ReverseKey, Verdict, VipService, VxlanPeer, LB_MAX_BACKEND_SLOTS, LB_MAX_REVERSE,
    LB_MAX_VIPS, MESH_DEFAULT_TABLE_SIZE, MESH_MAX_FLOWS, MESH_MAX_SERVICES, MESH_PORT_SLOTS,
    OVERLAY_MAX_ENDPOINTS, VXLAN_MAX_PEERS,
};

// The ingress classifier (every packet on the advertise interface).

/// Packets and bytes per verdict, per CPU.
#[map(name = "VERDICTS")]
pub static VERDICTS: PerCpuArray<Counter> = PerCpuArray::pinned(Verdict::COUNT, 0);

/// The agent's ports and addresses, written before the programs are attached.
#[map(name = "SETTINGS")]
pub static SETTINGS: Array<IngressSettings> = Array::pinned(1, 0);

/// The nodes each VNI accepts VXLAN from, kept by the agent from gossip.
#[map(name = "VXLAN_PEERS")]
pub static VXLAN_PEERS: HashMap<VxlanPeer, u32> = HashMap::pinned(VXLAN_MAX_PEERS, 0);

// The routing mesh (published ports).

/// The service published on each port (`shoal_common::mesh_port_slot`), one word each,
/// stored in place by the agent through a memory mapping.
#[map(name = "MESH_PORTS")]
pub static MESH_PORTS: Array<MeshService> = Array::pinned(MESH_PORT_SLOTS, BPF_F_MMAPABLE);

/// CLOCK_MONOTONIC in ns as the agent last wrote it (every second, through a memory
/// mapping): flow ages without a helper call per packet (a call costs about as much as the
/// rest of a tracked flow's decision on this project's VMs).
#[map(name = "MESH_CLOCK")]
pub static MESH_CLOCK: Array<u64> = Array::pinned(1, BPF_F_MMAPABLE);

/// One row of `table size` backend addresses per service; the agent sizes it at load time
/// and writes it through a memory mapping.
#[map(name = "MESH_MAGLEV")]
pub static MESH_MAGLEV: Array<u32> =
    Array::pinned(MESH_MAX_SERVICES * MESH_DEFAULT_TABLE_SIZE, BPF_F_MMAPABLE);

/// Tracked flows on the node the client reached: where each goes.
#[map(name = "MESH_FLOWS")]
pub static MESH_FLOWS: LruHashMap<FlowKey, MeshFlow> = LruHashMap::pinned(MESH_MAX_FLOWS, 0);

/// The same flows seen from the backend's replies, to undo the translation.
#[map(name = "MESH_REPLIES")]
pub static MESH_REPLIES: LruHashMap<ReplyKey, FlowKey> = LruHashMap::pinned(MESH_MAX_FLOWS, 0);

/// On the backend's node: the overlay MAC of the node each flow came through.
#[map(name = "MESH_ORIGINS")]
pub static MESH_ORIGINS: LruHashMap<ReplyKey, Origin> = LruHashMap::pinned(MESH_MAX_FLOWS, 0);

/// Per service (by Maglev row), per CPU.
#[map(name = "MESH_COUNTERS")]
pub static MESH_COUNTERS: PerCpuArray<MeshCounters> = PerCpuArray::pinned(MESH_MAX_SERVICES, 0);

// Service VIPs (task to VIP) and the overlay's ARP.

#[map(name = "LB_SERVICES")]
pub static LB_SERVICES: HashMap<u32, VipService> = HashMap::pinned(LB_MAX_VIPS, 0);

#[map(name = "LB_BACKENDS")]
pub static LB_BACKENDS: HashMap<BackendSlot, u32> = HashMap::pinned(LB_MAX_BACKEND_SLOTS, 0);

#[map(name = "LB_REVERSE")]
pub static LB_REVERSE: LruHashMap<ReverseKey, u32> = LruHashMap::pinned(LB_MAX_REVERSE, 0);

/// Endpoints of this node's networks that live on other nodes: IPv4 -> VNI.
#[map(name = "OVERLAY_ENDPOINTS")]
pub static OVERLAY_ENDPOINTS: HashMap<u32, u32> = HashMap::pinned(OVERLAY_MAX_ENDPOINTS, 0);
