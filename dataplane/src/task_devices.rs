//! User side of the task device list (`ebpf/src/programs/task_devices.rs`): attached to the
//! tasks' cgroup through a pinned link, as the socket load balancer is, so it holds while no
//! agent runs and a new agent replaces it without a moment when tasks are unrestricted.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    programs::{links::FdLink, CgroupAttachMode, CgroupDevice},
    Ebpf,
};
use shoal_common::names;

/// The name of its pinned link.
const LINK_PIN: &str = "task-devices";

pub fn link_pin(links_dir: &Path) -> PathBuf {
    links_dir.join(LINK_PIN)
}

/// Loads the program and attaches it to `task_cgroup` (every task's parent).
pub fn attach(ebpf: &mut Ebpf, task_cgroup: &Path, links_dir: &Path) -> Result<()> {
    let cgroup = File::open(task_cgroup)
        .with_context(|| format!("opening cgroup {}", task_cgroup.display()))?;
    let program: &mut CgroupDevice = ebpf
        .program_mut(names::TASK_DEVICES)
        .context("the task device program is missing from the eBPF object")?
        .try_into()?;
    program
        .load()
        .context("loading the task device program into the kernel (verifier)")?;
    let id = program
        .attach(&cgroup, CgroupAttachMode::Single)
        .with_context(|| format!("attaching the task device program to {}", task_cgroup.display()))?;
    let link: FdLink = program.take_link(id)?.try_into()?;
    crate::socket_lb::repin(link, &link_pin(links_dir))
}
