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
    let procs = open_procs(cgroup)?;
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

/// Makes `command` join the cgroup at `cgroup` between fork and exec (`task exec`: the
/// command is then part of the task, its limits and its socket load balancing).
pub fn join_cgroup(command: &mut Command, cgroup: &Path) -> Result<()> {
    let procs = open_procs(cgroup)?;
    // SAFETY: only write(2) between fork and exec; `procs` is close-on-exec.
    unsafe {
        command.pre_exec(move || {
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn open_procs(cgroup: &Path) -> Result<std::fs::File> {
    let procs = cgroup.join("cgroup.procs");
    OpenOptions::new()
        .write(true)
        .open(&procs)
        .with_context(|| format!("opening {}", procs.display()))
}

/// The cgroup (v2) a process is in, as a path under the cgroup2 mount.
pub fn cgroup_of(pid: u32) -> Result<std::path::PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mount = cgroup2_from_mountinfo(&mountinfo).context("no cgroup v2 hierarchy is mounted")?;
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .with_context(|| format!("reading the cgroup of process {pid}"))?;
    let relative = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .with_context(|| format!("process {pid} is in no cgroup v2"))?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

/// Mount point of the cgroup2 filesystem in /proc/self/mountinfo.
pub fn cgroup2_from_mountinfo(mountinfo: &str) -> Option<std::path::PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next() == Some("cgroup2")).then(|| {
            mount
                .split_whitespace()
                .nth(4)
                .map(std::path::PathBuf::from)
        })?
    })
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

/// Whether a cgroup file operation failed because the cgroup is gone: removed (ENOENT), or
/// being removed, when its files still open but answer ENODEV.
pub fn cgroup_gone(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::NotFound || err.raw_os_error() == Some(libc::ENODEV)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cgroup_removed_or_being_removed_is_gone() {
        assert!(cgroup_gone(&io::Error::from(io::ErrorKind::NotFound)));
        assert!(cgroup_gone(&io::Error::from_raw_os_error(libc::ENODEV)));
        assert!(!cgroup_gone(&io::Error::from_raw_os_error(libc::EBUSY)));
        assert!(!cgroup_gone(&io::Error::from(
            io::ErrorKind::PermissionDenied
        )));
    }
}
