//! User side of the task device list (`ebpf/src/programs/task_devices.rs`): attached to the
//! tasks' cgroup through a pinned link, as the socket load balancer is, so it holds while no
//! agent runs and a new agent replaces it without a moment when tasks are unrestricted.
//!
//! aya 0.14 loads the program but cannot turn a cgroup device link into the `FdLink` it pins
//! (it can for its other cgroup programs), so the link is made and pinned with the two
//! bpf(2) commands directly.

use std::{
    ffi::CString,
    fs::{self, File},
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{programs::CgroupDevice, Ebpf};
use shoal_common::names;

/// The name of its pinned link.
const LINK_PIN: &str = "task-devices";

/// bpf(2) commands and the attach type (`include/uapi/linux/bpf.h`).
const BPF_OBJ_PIN: libc::c_int = 6;
const BPF_LINK_CREATE: libc::c_int = 28;
const BPF_CGROUP_DEVICE: u32 = 6;

/// The head of `union bpf_attr` for `BPF_LINK_CREATE` (the kernel zeroes the rest).
#[repr(C)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The head of `union bpf_attr` for `BPF_OBJ_PIN`.
#[repr(C)]
struct ObjPin {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

pub fn link_pin(links_dir: &Path) -> PathBuf {
    links_dir.join(LINK_PIN)
}

/// Loads the program and attaches it to `task_cgroup` (every task's parent), in place of
/// the previous agent's.
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
    let create = LinkCreate {
        prog_fd: program.fd()?.as_fd().as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        flags: 0,
    };
    let link = crate::bpf_syscall::bpf(BPF_LINK_CREATE, &create).with_context(|| {
        format!(
            "attaching the task device program to {}",
            task_cgroup.display()
        )
    })?;
    // SAFETY: BPF_LINK_CREATE returned a new descriptor, ours alone.
    let link = unsafe { OwnedFd::from_raw_fd(link) };
    let pin = link_pin(links_dir);
    // Both programs run now; dropping the previous agent's pin detaches its own.
    match fs::remove_file(&pin) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", pin.display())),
    }
    let path = CString::new(pin.as_os_str().as_bytes())?;
    let pinning = ObjPin {
        pathname: path.as_ptr() as u64,
        bpf_fd: link.as_raw_fd() as u32,
        file_flags: 0,
    };
    crate::bpf_syscall::bpf(BPF_OBJ_PIN, &pinning)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}
