//! The agent's settings: its ports, the node's addresses and interfaces, the Maglev table
//! size. Written by the agent before the programs are attached, read by every packet path
//! that needs them.

use aya_ebpf::{macros::map, maps::Array};
use shoal_common::IngressSettings;

#[map(name = "SETTINGS")]
static SETTINGS: Array<IngressSettings> = Array::pinned(1, 0);

/// The settings (None only if the map were empty, which the agent never leaves it).
#[inline(always)]
pub fn settings() -> Option<&'static IngressSettings> {
    SETTINGS.get(0)
}
