//! Counters. Every counter lives in a per-CPU map (this target has no 64-bit atomic add), so
//! a program updates its own CPU's copy with plain arithmetic and user space sums the CPUs.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use shoal_common::{Counter, MeshCounters, Verdict, MESH_MAX_SERVICES};

/// Packets and bytes per ingress verdict.
#[map(name = "VERDICTS")]
static VERDICTS: PerCpuArray<Counter> = PerCpuArray::pinned(Verdict::COUNT, 0);

/// Per published service (by Maglev row).
#[map(name = "MESH_COUNTERS")]
static MESH_COUNTERS: PerCpuArray<MeshCounters> = PerCpuArray::pinned(MESH_MAX_SERVICES, 0);

/// This CPU's slot of a per-CPU counter map: made only here, from the maps above.
#[derive(Clone, Copy)]
pub struct Slot<T>(*mut T);

/// This CPU's counters of a verdict.
#[inline(always)]
pub fn verdict(verdict: Verdict) -> Option<Slot<Counter>> {
    VERDICTS.get_ptr_mut(verdict as u32).map(Slot)
}

/// This CPU's counters of the service in Maglev row `index`.
#[inline(always)]
pub fn mesh_service(index: u32) -> Option<Slot<MeshCounters>> {
    MESH_COUNTERS.get_ptr_mut(index).map(Slot)
}

/// Updates the counters in `slot` (nothing when its index was out of range).
#[inline(always)]
pub fn bump<T>(slot: Option<Slot<T>>, update: impl FnOnce(&mut T)) {
    if let Some(Slot(slot)) = slot {
        // SAFETY: a per-CPU slot is only touched by programs on its own CPU, and a BPF
        // program is not migrated while it runs, so this reference is the only one for the
        // update's duration. (On a kernel that lets a program be preempted by another that
        // bumps the same slot, the worst case is one lost increment.)
        update(unsafe { &mut *slot });
    }
}
