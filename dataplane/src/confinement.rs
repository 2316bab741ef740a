//! Least privilege for tasks, as Docker gives its containers by default: a small capability
//! set (bounding set too), `no_new_privs`, a seccomp filter equivalent to Docker's default
//! profile, an optional user, and masked paths (the agent's socket, state and config, and
//! Docker's masked and read-only `/proc` and `/sys` paths).
//!
//! `task-init` (the task's PID 1) masks the paths in the task's private mount namespace while
//! it is still privileged, then, in the child it forks for the command, applies the rest just
//! before `execvp`: bounding set, user, capabilities, `no_new_privs`, seccomp. `shoal
//! task-confine` (what `task exec` runs inside the task) applies the same steps, read from
//! task-init's own arguments, so an exec joins the task's confinement instead of escaping it.
//!
//! Capabilities are set with raw `prctl`/`capset` (a handful of calls, no crate needed); the
//! seccomp filter is compiled with `seccompiler` (rust-vmm, the Firecracker team's pure-Rust
//! BPF compiler: no C library on the node, masked-equality argument conditions).

use std::{
    collections::BTreeMap,
    ffi::CString,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Capability names by number (`capability.h`), without the `CAP_` prefix.
pub const CAPABILITY_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Every capability this build knows.
pub const ALL_CAPS: u64 = (1 << CAPABILITY_NAMES.len()) - 1;

/// Docker's default set: CHOWN, DAC_OVERRIDE, FSETID, FOWNER, MKNOD, NET_RAW, SETGID, SETUID,
/// SETFCAP, SETPCAP, NET_BIND_SERVICE, SYS_CHROOT, KILL, AUDIT_WRITE.
pub const DEFAULT_CAPS: u64 = 0xa804_25fb;

fn cap_bit(name: &str) -> Option<u64> {
    let position = CAPABILITY_NAMES.iter().position(|n| *n == name)?;
    Some(1 << position)
}

/// A capability name as `--cap-add`/`--cap-drop` take it (any case, `CAP_` prefix or not,
/// `ALL`), in its canonical form (`NET_ADMIN`, `ALL`).
pub fn canonical_capability(text: &str) -> Result<String> {
    let upper = text.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if name == "ALL" || cap_bit(name).is_some() {
        Ok(name.to_owned())
    } else {
        bail!(
            "unknown capability {text:?}: expected a name such as NET_ADMIN or CAP_NET_ADMIN, \
             or ALL (`man 7 capabilities` lists them)"
        )
    }
}

/// The capability set of a task: Docker's default, `ALL` or each name of `add` added, `ALL`
/// or each name of `drop` taken away. A name both added and dropped is refused.
pub fn capability_set(add: &[String], drop: &[String]) -> Result<u64> {
    let add: Vec<String> = add
        .iter()
        .map(|c| canonical_capability(c))
        .collect::<Result<_>>()?;
    let drop: Vec<String> = drop
        .iter()
        .map(|c| canonical_capability(c))
        .collect::<Result<_>>()?;
    if let Some(both) = add.iter().find(|c| drop.contains(c)) {
        bail!("capability {both} is both added (--cap-add) and dropped (--cap-drop)");
    }
    let mut set = DEFAULT_CAPS;
    if add.iter().any(|c| c == "ALL") {
        set = ALL_CAPS;
    }
    if drop.iter().any(|c| c == "ALL") {
        set = 0;
    }
    for name in &drop {
        set &= !cap_bit(name).unwrap_or(0);
    }
    for name in &add {
        set |= cap_bit(name).unwrap_or(0);
    }
    Ok(set)
}

/// Names of the capabilities in `set`, in number order.
pub fn capability_names(set: u64) -> Vec<&'static str> {
    CAPABILITY_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| set & (1 << i) != 0)
        .map(|(_, name)| *name)
        .collect()
}

/// The user a task runs as, resolved on its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's groups in /etc/group).
    pub groups: Vec<u32>,
}

/// Checks the shape of `--user`: `USER[:GROUP]`, each a name or a number.
pub fn check_user_syntax(text: &str) -> Result<()> {
    let (user, group) = match text.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (text, None),
    };
    let ok = |part: &str| {
        !part.is_empty()
            && part.len() <= 32
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.$".contains(&b))
    };
    if !ok(user) || group.is_some_and(|g| !ok(g)) {
        bail!("--user {text:?}: expected USER[:GROUP], each a name or a number (e.g. 65534, nobody, 1000:1000)");
    }
    Ok(())
}

impl TaskUser {
    /// Resolves `USER[:GROUP]` on this node, as Docker does: names through the node's user
    /// and group databases (an unknown name is an error), a number as it is; the group
    /// defaults to the user's primary group (0 for a number /etc/passwd does not know).
    pub fn resolve(text: &str) -> Result<Self> {
        use nix::unistd::{Gid, Group, Uid, User};
        check_user_syntax(text)?;
        let (user, group) = match text.split_once(':') {
            Some((user, group)) => (user, Some(group)),
            None => (text, None),
        };
        let entry = match user.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)).ok().flatten(),
            Err(_) => Some(
                User::from_name(user)
                    .with_context(|| format!("looking up user {user:?}"))?
                    .with_context(|| format!("--user {text:?}: no user {user:?} on this node"))?,
            ),
        };
        let uid = match &entry {
            Some(entry) => entry.uid.as_raw(),
            None => user.parse::<u32>().unwrap_or_default(),
        };
        let gid = match group {
            Some(group) => match group.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => Group::from_name(group)
                    .with_context(|| format!("looking up group {group:?}"))?
                    .with_context(|| format!("--user {text:?}: no group {group:?} on this node"))?
                    .gid
                    .as_raw(),
            },
            None => entry.as_ref().map_or(0, |e| e.gid.as_raw()),
        };
        let mut groups = Vec::new();
        if let Some(entry) = &entry {
            if let Ok(name) = CString::new(entry.name.as_bytes()) {
                if let Ok(list) = nix::unistd::getgrouplist(&name, Gid::from_raw(gid)) {
                    groups = list.into_iter().map(Gid::as_raw).collect();
                }
            }
        }
        groups.retain(|g| *g != gid);
        groups.sort_unstable();
        groups.dedup();
        Ok(Self { uid, gid, groups })
    }

    /// `UID:GID[:G1,G2...]`, as task-init takes it.
    pub fn to_arg(&self) -> String {
        let mut arg = format!("{}:{}", self.uid, self.gid);
        if !self.groups.is_empty() {
            let groups: Vec<String> = self.groups.iter().map(u32::to_string).collect();
            arg.push(':');
            arg.push_str(&groups.join(","));
        }
        arg
    }

    pub fn from_arg(text: &str) -> Result<Self> {
        let bad = || format!("bad user argument {text:?}: expected UID:GID[:G1,G2...]");
        let mut parts = text.splitn(3, ':');
        let uid = parts.next().with_context(bad)?.parse().with_context(bad)?;
        let gid = parts.next().with_context(bad)?.parse().with_context(bad)?;
        let groups = match parts.next() {
            Some(list) if !list.is_empty() => list
                .split(',')
                .map(|g| g.parse::<u32>())
                .collect::<Result<_, _>>()
                .with_context(bad)?,
            _ => Vec::new(),
        };
        Ok(Self { uid, gid, groups })
    }
}

/// What a task's command is confined to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Confinement {
    /// Capability set: bounding, and effective/permitted for root.
    pub caps: u64,
    pub user: Option<TaskUser>,
}

impl Default for Confinement {
    fn default() -> Self {
        Self {
            caps: DEFAULT_CAPS,
            user: None,
        }
    }
}

impl Confinement {
    /// The arguments task-init and task-confine take for it.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec!["--caps".to_owned(), format!("{:x}", self.caps)];
        if let Some(user) = &self.user {
            args.push("--user".into());
            args.push(user.to_arg());
        }
        args
    }

    /// From the values of `--caps` and `--user`.
    pub fn from_args(caps: &str, user: Option<&str>) -> Result<Self> {
        Ok(Self {
            caps: u64::from_str_radix(caps, 16)
                .with_context(|| format!("bad capability mask {caps:?}"))?,
            user: user.map(TaskUser::from_arg).transpose()?,
        })
    }

    /// The confinement task-init was started with, read from its command line (`task
    /// exec`); None when the task runs unconfined.
    pub fn of_task_init(cmdline: &[String]) -> Result<Option<Self>> {
        let value = |flag: &str| {
            cmdline
                .iter()
                .take_while(|a| *a != "--")
                .position(|a| a == flag)
                .and_then(|i| cmdline.get(i + 1))
        };
        match value("--caps") {
            Some(caps) => Self::from_args(caps, value("--user").map(String::as_str)).map(Some),
            None => Ok(None),
        }
    }

    /// Compiles what is applied in the command's process (the seccomp filters), before the
    /// fork: the child only installs them.
    pub fn prepare(&self) -> Result<Prepared> {
        Ok(Prepared {
            caps: self.caps,
            user: self.user.clone(),
            filters: seccomp_filters(self.caps)?,
        })
    }
}

/// A confinement ready to apply.
pub struct Prepared {
    caps: u64,
    user: Option<TaskUser>,
    filters: Vec<BpfProgram>,
}

impl Prepared {
    /// Applies the confinement to the calling (single-threaded) process, which then execs
    /// the command: bounding set, user, capabilities, no_new_privs, seccomp.
    pub fn apply(&self) -> Result<()> {
        drop_bounding_set(self.caps)?;
        if let Some(user) = &self.user {
            use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
            let groups: Vec<Gid> = user.groups.iter().map(|g| Gid::from_raw(*g)).collect();
            setgroups(&groups).context("setgroups")?;
            let gid = Gid::from_raw(user.gid);
            setresgid(gid, gid, gid).context("setting the task's group")?;
            let uid = Uid::from_raw(user.uid);
            setresuid(uid, uid, uid).context("setting the task's user")?;
        }
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
        }
        // A user other than root ends with no capabilities (setuid cleared them), as in
        // Docker; root keeps the set as effective and permitted, none inheritable.
        let kept = if self.user.as_ref().is_some_and(|u| u.uid != 0) {
            0
        } else {
            self.caps
        };
        set_capabilities(kept).context("capset")?;
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(std::io::Error::last_os_error()).context("setting no_new_privs");
        }
        for filter in &self.filters {
            seccompiler::apply_filter(filter).context("installing the seccomp filter")?;
        }
        Ok(())
    }
}

fn drop_bounding_set(keep: u64) -> Result<()> {
    for cap in 0..64u32 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            let err = std::io::Error::last_os_error();
            // Past the kernel's last capability.
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err)
                .with_context(|| format!("dropping capability {cap} from the bounding set"));
        }
    }
    Ok(())
}

fn set_capabilities(set: u64) -> std::io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let data = [
        Data {
            effective: set as u32,
            permitted: set as u32,
            inheritable: 0,
        },
        Data {
            effective: (set >> 32) as u32,
            permitted: (set >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset(2) reads a v3 header and two data structs, which we pass.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Paths Docker masks in every container (`/proc` ones are of the task's own /proc).
pub const DOCKER_MASKED_PATHS: [&str; 11] = [
    "/proc/asound",
    "/proc/acpi",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths Docker makes read-only in every container.
pub const DOCKER_READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// In the task's private mount namespace (task-init, before it forks the command): puts an
/// empty read-only tmpfs over each directory of `masked` and `/dev/null` over each file
/// (missing paths skipped), Docker's masked paths likewise, makes Docker's read-only paths
/// and the whole of `/sys` read-only (the task cannot raise its cgroup limits or write
/// kernel settings through it).
pub fn mask_paths(masked: &[PathBuf]) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let docker = DOCKER_MASKED_PATHS.iter().map(Path::new);
    for path in masked.iter().map(PathBuf::as_path).chain(docker) {
        let Ok(meta) = std::fs::metadata(path) else {
            continue;
        };
        let result = if meta.is_dir() {
            mount(
                Some("tmpfs"),
                path,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0,mode=0755"),
            )
        } else {
            mount(
                Some("/dev/null"),
                path,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
        };
        result.with_context(|| format!("masking {}", path.display()))?;
    }
    for path in DOCKER_READONLY_PATHS.iter().map(Path::new) {
        if path.exists() {
            read_only(path, false)
                .with_context(|| format!("making {} read-only", path.display()))?;
        }
    }
    read_only(Path::new("/sys"), true).context("making /sys read-only")?;
    Ok(())
}

/// Bind-mounts `path` on itself read-only; with `recursive`, every mount below it too.
fn read_only(path: &Path, recursive: bool) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    if recursive {
        // mount_setattr(2) (5.12+) turns a whole tree read-only in one call.
        #[repr(C)]
        struct MountAttr {
            attr_set: u64,
            attr_clr: u64,
            propagation: u64,
            userns_fd: u64,
        }
        const MOUNT_ATTR_RDONLY: u64 = 1;
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        let c_path = CString::new(path.as_os_str().as_encoded_bytes())?;
        // SAFETY: mount_setattr(2) reads a path and a mount_attr of the given size.
        let result = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                c_path.as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if result == 0 {
            return Ok(());
        }
        // An older kernel: the top mount only.
    }
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    )?;
    Ok(())
}

/// AF_VSOCK: the one socket family Docker's profile refuses.
const AF_VSOCK: u64 = 40;
/// Namespace flags `clone` may not take without CAP_SYS_ADMIN (Docker's 0x7E020000).
const CLONE_NAMESPACE_FLAGS: u64 = 0x7E02_0000;
const CAP_SYS_ADMIN: u64 = 1 << 21;

/// Docker's default seccomp profile (moby `profiles/seccomp/default.json`) for the task's
/// capability set: every syscall outside the allowlist fails with EPERM; `clone3` fails with
/// ENOSYS (so libc falls back to `clone`) unless the task has CAP_SYS_ADMIN. Two filters,
/// the second only for that ENOSYS: a seccomp filter has one answer for a mismatch, and of
/// two ERRNO answers the newest filter's wins.
pub fn seccomp_filters(caps: u64) -> Result<Vec<BpfProgram>> {
    let arch = target_arch();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for nr in ALLOWED.iter().chain(ALLOWED_ARCH) {
        rules.insert(*nr, Vec::new());
    }
    for (cap, syscalls) in by_capability() {
        if caps & cap_bit(cap).unwrap_or(0) != 0 {
            for nr in syscalls {
                rules.insert(nr, Vec::new());
            }
        }
    }
    let dword = |arg: u8, op: SeccompCmpOp, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
    };
    rules.insert(
        libc::SYS_socket,
        vec![dword(0, SeccompCmpOp::Ne, AF_VSOCK)?],
    );
    rules.insert(
        libc::SYS_personality,
        [0u64, 8, 0x20000, 0x20008, 0xffff_ffff]
            .into_iter()
            .map(|p| dword(0, SeccompCmpOp::Eq, p))
            .collect::<Result<_, _>>()?,
    );
    let has_admin = caps & CAP_SYS_ADMIN != 0;
    if has_admin {
        rules.insert(libc::SYS_clone, Vec::new());
    } else {
        rules.insert(
            libc::SYS_clone,
            vec![SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(CLONE_NAMESPACE_FLAGS),
                0,
            )?])?],
        );
    }
    let allowlist: BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        arch,
    )?
    .try_into()?;
    let mut filters = vec![allowlist];
    if !has_admin {
        let clone3: BpfProgram = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )?
        .try_into()?;
        filters.push(clone3);
    }
    Ok(filters)
}

#[cfg(target_arch = "x86_64")]
fn target_arch() -> TargetArch {
    TargetArch::x86_64
}

#[cfg(target_arch = "aarch64")]
fn target_arch() -> TargetArch {
    TargetArch::aarch64
}

/// The unconditional allowlist (names that exist on both x86_64 and aarch64).
static ALLOWED: &[i64] = &[
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_adjtimex,
    libc::SYS_bind,
    libc::SYS_brk,
    libc::SYS_capget,
    libc::SYS_capset,
    libc::SYS_chdir,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_getres,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_close,
    libc::SYS_close_range,
    libc::SYS_connect,
    libc::SYS_copy_file_range,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_fadvise64,
    libc::SYS_fallocate,
    libc::SYS_fanotify_mark,
    libc::SYS_fchdir,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchown,
    libc::SYS_fchownat,
    libc::SYS_fcntl,
    libc::SYS_fdatasync,
    libc::SYS_fgetxattr,
    libc::SYS_flistxattr,
    libc::SYS_flock,
    libc::SYS_fremovexattr,
    libc::SYS_fsetxattr,
    libc::SYS_fstat,
    libc::SYS_fstatfs,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_futex,
    libc::SYS_futex_waitv,
    libc::SYS_getcpu,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_getegid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getgroups,
    libc::SYS_getitimer,
    libc::SYS_getpeername,
    libc::SYS_getpgid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getpriority,
    libc::SYS_getrandom,
    libc::SYS_getresgid,
    libc::SYS_getresuid,
    libc::SYS_get_robust_list,
    libc::SYS_getrusage,
    libc::SYS_getsid,
    libc::SYS_getsockname,
    libc::SYS_getsockopt,
    libc::SYS_gettid,
    libc::SYS_gettimeofday,
    libc::SYS_getuid,
    libc::SYS_getxattr,
    libc::SYS_inotify_add_watch,
    libc::SYS_inotify_init1,
    libc::SYS_inotify_rm_watch,
    libc::SYS_io_cancel,
    libc::SYS_ioctl,
    libc::SYS_io_destroy,
    libc::SYS_io_getevents,
    libc::SYS_ioprio_get,
    libc::SYS_ioprio_set,
    libc::SYS_io_setup,
    libc::SYS_io_submit,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_io_uring_setup,
    libc::SYS_kill,
    libc::SYS_landlock_add_rule,
    libc::SYS_landlock_create_ruleset,
    libc::SYS_landlock_restrict_self,
    libc::SYS_lgetxattr,
    libc::SYS_linkat,
    libc::SYS_listen,
    libc::SYS_listxattr,
    libc::SYS_llistxattr,
    libc::SYS_lremovexattr,
    libc::SYS_lseek,
    libc::SYS_lsetxattr,
    libc::SYS_madvise,
    libc::SYS_membarrier,
    libc::SYS_memfd_create,
    libc::SYS_memfd_secret,
    libc::SYS_mincore,
    libc::SYS_mkdirat,
    libc::SYS_mknodat,
    libc::SYS_mlock,
    libc::SYS_mlock2,
    libc::SYS_mlockall,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mq_getsetattr,
    libc::SYS_mq_notify,
    libc::SYS_mq_open,
    libc::SYS_mq_timedreceive,
    libc::SYS_mq_timedsend,
    libc::SYS_mq_unlink,
    libc::SYS_mremap,
    libc::SYS_msgctl,
    libc::SYS_msgget,
    libc::SYS_msgrcv,
    libc::SYS_msgsnd,
    libc::SYS_msync,
    libc::SYS_munlock,
    libc::SYS_munlockall,
    libc::SYS_munmap,
    libc::SYS_name_to_handle_at,
    libc::SYS_nanosleep,
    libc::SYS_newfstatat,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_send_signal,
    libc::SYS_pipe2,
    libc::SYS_pkey_alloc,
    libc::SYS_pkey_free,
    libc::SYS_pkey_mprotect,
    libc::SYS_ppoll,
    libc::SYS_prctl,
    libc::SYS_pread64,
    libc::SYS_preadv,
    libc::SYS_preadv2,
    libc::SYS_prlimit64,
    libc::SYS_process_mrelease,
    libc::SYS_pselect6,
    libc::SYS_pwrite64,
    libc::SYS_pwritev,
    libc::SYS_pwritev2,
    libc::SYS_read,
    libc::SYS_readahead,
    libc::SYS_readlinkat,
    libc::SYS_readv,
    libc::SYS_recvfrom,
    libc::SYS_recvmmsg,
    libc::SYS_recvmsg,
    libc::SYS_remap_file_pages,
    libc::SYS_removexattr,
    libc::SYS_renameat2,
    libc::SYS_restart_syscall,
    libc::SYS_rseq,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigpending,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigsuspend,
    libc::SYS_rt_sigtimedwait,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_getattr,
    libc::SYS_sched_getparam,
    libc::SYS_sched_get_priority_max,
    libc::SYS_sched_get_priority_min,
    libc::SYS_sched_getscheduler,
    libc::SYS_sched_rr_get_interval,
    libc::SYS_sched_setaffinity,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_yield,
    libc::SYS_seccomp,
    libc::SYS_semctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_sendfile,
    libc::SYS_sendmmsg,
    libc::SYS_sendmsg,
    libc::SYS_sendto,
    libc::SYS_setfsgid,
    libc::SYS_setfsuid,
    libc::SYS_setgid,
    libc::SYS_setgroups,
    libc::SYS_setitimer,
    libc::SYS_setpgid,
    libc::SYS_setpriority,
    libc::SYS_setregid,
    libc::SYS_setresgid,
    libc::SYS_setresuid,
    libc::SYS_setreuid,
    libc::SYS_set_robust_list,
    libc::SYS_setsid,
    libc::SYS_setsockopt,
    libc::SYS_set_tid_address,
    libc::SYS_setuid,
    libc::SYS_setxattr,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_shmdt,
    libc::SYS_shmget,
    libc::SYS_shutdown,
    libc::SYS_sigaltstack,
    libc::SYS_signalfd4,
    libc::SYS_socketpair,
    libc::SYS_splice,
    libc::SYS_statfs,
    libc::SYS_statx,
    libc::SYS_symlinkat,
    libc::SYS_sync,
    libc::SYS_syncfs,
    libc::SYS_sysinfo,
    libc::SYS_tee,
    libc::SYS_tgkill,
    libc::SYS_timer_create,
    libc::SYS_timer_delete,
    libc::SYS_timer_getoverrun,
    libc::SYS_timer_gettime,
    libc::SYS_timer_settime,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_gettime,
    libc::SYS_timerfd_settime,
    libc::SYS_times,
    libc::SYS_tkill,
    libc::SYS_truncate,
    libc::SYS_umask,
    libc::SYS_uname,
    libc::SYS_unlinkat,
    libc::SYS_utimensat,
    libc::SYS_vmsplice,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_ptrace,
];

/// The allowlist's names that exist on x86_64 only.
#[cfg(target_arch = "x86_64")]
static ALLOWED_ARCH: &[i64] = &[
    libc::SYS_access,
    libc::SYS_alarm,
    libc::SYS_chmod,
    libc::SYS_chown,
    libc::SYS_creat,
    libc::SYS_dup2,
    libc::SYS_epoll_create,
    libc::SYS_epoll_ctl_old,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_wait_old,
    libc::SYS_eventfd,
    libc::SYS_fork,
    libc::SYS_futimesat,
    libc::SYS_getdents,
    libc::SYS_getpgrp,
    libc::SYS_getrlimit,
    libc::SYS_get_thread_area,
    libc::SYS_inotify_init,
    libc::SYS_lchown,
    libc::SYS_link,
    libc::SYS_lstat,
    libc::SYS_mkdir,
    libc::SYS_mknod,
    libc::SYS_open,
    libc::SYS_pause,
    libc::SYS_pipe,
    libc::SYS_poll,
    libc::SYS_readlink,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_rmdir,
    libc::SYS_select,
    libc::SYS_setrlimit,
    libc::SYS_set_thread_area,
    libc::SYS_signalfd,
    libc::SYS_stat,
    libc::SYS_symlink,
    libc::SYS_sync_file_range,
    libc::SYS_time,
    libc::SYS_unlink,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_vfork,
    libc::SYS_arch_prctl,
    libc::SYS_modify_ldt,
    // Not in libc's table.
    333, // io_pgetevents
];
#[cfg(target_arch = "aarch64")]
static ALLOWED_ARCH: &[i64] = &[
    292, // io_pgetevents
    38,  // renameat
    163, // getrlimit
    164, // setrlimit
    84,  // sync_file_range
];

/// Syscalls allowed only with a capability, as Docker's profile lists them.
fn by_capability() -> Vec<(&'static str, Vec<i64>)> {
    vec![
        (
            "SYS_ADMIN",
            vec![
                libc::SYS_bpf,
                libc::SYS_clone3,
                libc::SYS_fanotify_init,
                libc::SYS_fsconfig,
                libc::SYS_fsmount,
                libc::SYS_fsopen,
                libc::SYS_fspick,
                libc::SYS_lookup_dcookie,
                libc::SYS_mount,
                libc::SYS_mount_setattr,
                libc::SYS_move_mount,
                libc::SYS_open_tree,
                libc::SYS_perf_event_open,
                libc::SYS_quotactl,
                libc::SYS_quotactl_fd,
                libc::SYS_setdomainname,
                libc::SYS_sethostname,
                libc::SYS_setns,
                libc::SYS_syslog,
                libc::SYS_umount2,
                libc::SYS_unshare,
            ],
        ),
        ("DAC_READ_SEARCH", vec![libc::SYS_open_by_handle_at]),
        ("SYS_BOOT", vec![libc::SYS_reboot]),
        ("SYS_CHROOT", vec![libc::SYS_chroot]),
        (
            "SYS_MODULE",
            vec![
                libc::SYS_delete_module,
                libc::SYS_init_module,
                libc::SYS_finit_module,
            ],
        ),
        ("SYS_PACCT", vec![libc::SYS_acct]),
        (
            "SYS_PTRACE",
            vec![
                libc::SYS_kcmp,
                libc::SYS_pidfd_getfd,
                libc::SYS_process_madvise,
                libc::SYS_process_vm_readv,
                libc::SYS_process_vm_writev,
                libc::SYS_ptrace,
            ],
        ),
        ("SYS_RAWIO", {
            #[allow(unused_mut)]
            let mut list = vec![];
            #[cfg(target_arch = "x86_64")]
            list.extend([libc::SYS_iopl, libc::SYS_ioperm]);
            list
        }),
        (
            "SYS_TIME",
            vec![libc::SYS_settimeofday, libc::SYS_clock_settime],
        ),
        ("SYS_TTY_CONFIG", vec![libc::SYS_vhangup]),
        (
            "SYS_NICE",
            vec![
                libc::SYS_get_mempolicy,
                libc::SYS_mbind,
                libc::SYS_set_mempolicy,
                libc::SYS_set_mempolicy_home_node,
            ],
        ),
        ("SYSLOG", vec![libc::SYS_syslog]),
        ("BPF", vec![libc::SYS_bpf]),
        ("PERFMON", vec![libc::SYS_perf_event_open]),
    ]
}

/// `shoal task-confine`: applies `confinement` to this process and execs `command` (what
/// `task exec` runs once inside the task's namespaces). Returns only on an error.
pub fn exec_confined(confinement: Option<Confinement>, command: &[String]) -> anyhow::Error {
    let run = || -> Result<std::convert::Infallible> {
        let argv: Vec<CString> = command
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()?;
        let program = argv.first().context("no command")?;
        if let Some(confinement) = confinement {
            confinement.prepare()?.apply()?;
        }
        nix::unistd::execvp(program, &argv).with_context(|| format!("executing {}", command[0]))
    };
    match run() {
        Ok(never) => match never {},
        Err(err) => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_names_and_sets_follow_docker() {
        assert_eq!(canonical_capability("cap_net_admin").unwrap(), "NET_ADMIN");
        assert_eq!(canonical_capability("Net_Raw").unwrap(), "NET_RAW");
        assert_eq!(canonical_capability("all").unwrap(), "ALL");
        assert!(canonical_capability("CAP_FLY").is_err());
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(capability_set(&[], &[]).unwrap(), DEFAULT_CAPS);
        assert_eq!(capability_set(&[], &names(&["ALL"])).unwrap(), 0);
        assert_eq!(
            capability_set(&names(&["NET_BIND_SERVICE"]), &names(&["ALL"])).unwrap(),
            1 << 10
        );
        assert_eq!(capability_set(&names(&["ALL"]), &[]).unwrap(), ALL_CAPS);
        assert_eq!(
            capability_set(&names(&["NET_ADMIN"]), &names(&["NET_RAW"])).unwrap(),
            (DEFAULT_CAPS | 1 << 12) & !(1 << 13)
        );
        assert!(capability_set(&names(&["NET_RAW"]), &names(&["cap_net_raw"])).is_err());
        assert_eq!(capability_names(DEFAULT_CAPS).len(), 14);
    }

    #[test]
    fn task_init_arguments_carry_the_confinement() {
        let confinement = Confinement {
            caps: DEFAULT_CAPS,
            user: Some(TaskUser {
                uid: 1000,
                gid: 100,
                groups: vec![27, 44],
            }),
        };
        let mut cmdline: Vec<String> = ["shoal", "task-init", "--gate-fd", "3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        cmdline.extend(confinement.args());
        cmdline.extend(["--".into(), "--caps".into(), "0".into()]);
        assert_eq!(
            Confinement::of_task_init(&cmdline).unwrap(),
            Some(confinement)
        );
        assert_eq!(
            Confinement::of_task_init(&["shoal".into(), "--".into(), "--caps".into()]).unwrap(),
            None
        );
        assert!(TaskUser::from_arg("x:1").is_err());
        assert_eq!(TaskUser::from_arg("0:0").unwrap().groups, Vec::<u32>::new());
        assert!(check_user_syntax("nobody:nogroup").is_ok());
        assert!(check_user_syntax("a b").is_err());
        assert!(check_user_syntax(":1").is_err());
    }

    /// In a forked child: the default profile refuses namespaces, AF_VSOCK and odd
    /// personalities with EPERM, answers clone3 with ENOSYS, and lets ordinary calls through.
    #[test]
    fn the_default_filter_denies_what_dockers_profile_denies() {
        let filters = seccomp_filters(DEFAULT_CAPS).unwrap();
        // SAFETY: the child makes raw syscalls only and leaves with _exit.
        match unsafe { libc::fork() } {
            0 => {
                let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                // SAFETY: raw syscalls with plain integer arguments; the child then exits.
                let code = unsafe {
                    libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                    for filter in &filters {
                        if seccompiler::apply_filter(filter).is_err() {
                            libc::_exit(10);
                        }
                    }
                    let checks = [
                        libc::unshare(libc::CLONE_NEWNET) == -1 && errno() == libc::EPERM,
                        libc::syscall(libc::SYS_clone3, 0, 0) == -1 && errno() == libc::ENOSYS,
                        libc::socket(40, libc::SOCK_STREAM, 0) == -1 && errno() == libc::EPERM,
                        libc::personality(0x0400_0000) == -1 && errno() == libc::EPERM,
                        libc::syscall(libc::SYS_bpf, 0, 0, 0) == -1 && errno() == libc::EPERM,
                        libc::getpid() > 0,
                        libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) >= 0,
                    ];
                    match checks.iter().position(|ok| !ok) {
                        None => 0,
                        Some(i) => 20 + i as i32,
                    }
                };
                // SAFETY: leaving the forked child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            -1 => panic!("fork: {}", std::io::Error::last_os_error()),
            child => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(child, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "status {status}");
                assert_eq!(
                    libc::WEXITSTATUS(status),
                    0,
                    "check that failed: 20 + index"
                );
            }
        }
        // With CAP_SYS_ADMIN, no clone3 filter and namespaced clone is allowed.
        assert_eq!(
            seccomp_filters(DEFAULT_CAPS | CAP_SYS_ADMIN).unwrap().len(),
            1
        );
    }
}
