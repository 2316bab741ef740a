//! The eBPF classifiers on a task's interfaces (the network side of each task veth, in the
//! network's namespace): `cls_bpf` filters in direct-action mode on the interface's `clsact`
//! qdisc, put there over our own netlink socket ([`crate::netlink`]).
//!
//! Why not TCX links, as on the advertise interface: creating a TCX link waits for an RCU
//! grace period (`tcx_entry_sync()` calls `synchronize_rcu()`), about 14 ms here, once per
//! program per task interface, and the task's command waits for them; a filter takes
//! 0.1-0.25 ms. A filter is no `bpf_link` and cannot be pinned, but it needs no pin: the
//! kernel keeps it (and its program) on the interface while no agent runs, and a new agent
//! takes it over by putting its own program on the same priority and handle (a replace,
//! swapped under RCU: the hook is never without a program). It goes with the veth, which the
//! agent deletes when the task ends.
//!
//! Why not aya's netlink attach (`TcAttachOptions::Netlink`): aya detaches a filter when its
//! link is dropped (and drops every link left in a program when the `Ebpf` goes, i.e. when the
//! agent exits), has no create-or-replace (only create-exclusive, or change one it holds a
//! link for), resolves the interface name in the calling thread's namespace and opens a socket
//! per call. Our netlink layer has the one message we need and a socket in the network's
//! namespace.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    programs::{ProgramFd, SchedClassifier},
    Ebpf,
};

use crate::{
    netlink::{BpfFilter, Netlink, TcHook},
    netns,
};

/// Every task filter's handle; the priority tells them apart on a hook.
const FILTER_HANDLE: u32 = 1;

/// Filter priorities (lower runs first). On ingress the VIP echo answers ARP and pings first
/// and passes the rest on (`TC_ACT_UNSPEC`); the mesh's origin tracking comes after it.
pub(crate) const VIP_ECHO_PRIORITY: u16 = 1;
pub(crate) const MESH_FROM_TASK_PRIORITY: u16 = 2;
pub(crate) const MESH_TO_TASK_PRIORITY: u16 = 1;

/// A loaded classifier and where it goes on a task interface.
#[derive(Debug)]
pub struct TaskFilter {
    /// Our own descriptor of the program: filters are put without locking its loader.
    program: ProgramFd,
    name: &'static str,
    hook: TcHook,
    priority: u16,
}

impl TaskFilter {
    /// The loaded classifier `name` of `ebpf`, for `hook` at `priority`.
    pub(crate) fn new(
        ebpf: &Ebpf,
        name: &'static str,
        hook: TcHook,
        priority: u16,
    ) -> Result<Self> {
        let program: &SchedClassifier = ebpf
            .program(name)
            .with_context(|| format!("{name} missing from the eBPF object"))?
            .try_into()?;
        let program = program
            .fd()
            .with_context(|| format!("{name} is not loaded"))?
            .try_clone()
            .with_context(|| format!("duplicating the descriptor of {name}"))?;
        Ok(Self {
            program,
            name,
            hook,
            priority,
        })
    }
}

/// Puts `filters` on `interface` in the namespace at `netns` (adding its `clsact` qdisc when it
/// has none), replacing in place the programs of filters there already: for a task a previous
/// agent connected.
pub fn install(netns: &Path, interface: &str, filters: &[&TaskFilter]) -> Result<()> {
    let file = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    let mut netlink = netns::run_in_file(&file, || Ok(Netlink::open()?))
        .with_context(|| format!("in {}", netns.display()))?;
    let index = netlink.index_of(interface)?;
    install_on(&mut netlink, index, filters)
}

/// Puts `filters` on device `index` of `netlink`'s namespace, as [`install`]. A new task's
/// interface gets them while it is down: adding the `clsact` qdisc to a device that is up
/// deactivates its queues, which waits for an RCU grace period.
pub fn install_on(netlink: &mut Netlink, index: u32, filters: &[&TaskFilter]) -> Result<()> {
    match netlink.add_clsact(index) {
        Err(err) if !err.is_exists() => return Err(err.into()),
        _ => {}
    }
    for filter in filters {
        netlink.replace_bpf_filter(
            index,
            &BpfFilter {
                hook: filter.hook,
                priority: filter.priority,
                handle: FILTER_HANDLE,
                program: filter.program.as_fd(),
                name: filter.name,
            },
        )?;
    }
    Ok(())
}
