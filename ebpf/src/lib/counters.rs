//! Counters. Every counter lives in a per-CPU map (this target has no 64-bit atomic add), so
//! a program updates its own CPU's copy with plain arithmetic and user space sums the CPUs.

/// Updates the counters in `slot` (a `PerCpuArray` entry of this CPU, as `get_ptr_mut` gives
/// it; nothing when the index was out of range).
#[inline(always)]
pub fn bump<T>(slot: Option<*mut T>, update: impl FnOnce(&mut T)) {
    if let Some(slot) = slot {
        // SAFETY: a per-CPU slot is only touched by programs on its own CPU, and a BPF
        // program is not migrated while it runs, so this reference is the only one for the
        // update's duration. (On a kernel that lets a program be preempted by another that
        // bumps the same slot, the worst case is one lost increment.)
        update(unsafe { &mut *slot });
    }
}
