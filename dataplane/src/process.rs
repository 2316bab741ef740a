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
