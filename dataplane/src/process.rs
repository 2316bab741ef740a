//! Starting processes the way shoal supervises them.

use std::{
    fs::OpenOptions,
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::Command,
};

use anyhow::{Context as _, Result};

/// Makes `command`, between fork and exec, start a session of its own (signals to the
/// spawner's process group do not reach it) and move into the cgroup at `cgroup`, so it and
/// every descendant can be found and killed through the cgroup.
pub fn detach_into_cgroup(command: &mut Command, cgroup: &Path) -> Result<()> {
    let procs = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("opening {}", procs.display()))?;
    // SAFETY: only async-signal-safe calls between fork and exec; the closure owns `procs`,
    // which is close-on-exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" moves the writing process itself into the cgroup.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Makes `fd` (close-on-exec in the spawner) available to the child as `target`; `fd` is
/// closed in the spawner when `command` is dropped.
pub fn pass_fd(command: &mut Command, fd: std::os::fd::OwnedFd, target: i32) {
    // SAFETY: dup2 is async-signal-safe; the new descriptor does not inherit close-on-exec.
    unsafe {
        command.pre_exec(move || {
            let fd = fd.as_raw_fd();
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let result = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if result < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
