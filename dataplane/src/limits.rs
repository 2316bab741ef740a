//! Resource limits of tasks: `--limit-cpu` (cgroup `cpu.max`), `--limit-memory`
//! (`memory.max`, no swap beyond it: `memory.swap.max` 0), `--limit-pids` (`pids.max`),
//! written into the task's cgroup before its command starts; and whether the kernel's OOM
//! killer ended a task (`memory.events` `oom_kill`).
//!
//! The task cgroups live on the cgroup v2 hierarchy. On a hybrid host (systemd's hybrid mode:
//! cpu, memory and pids still bound to cgroup v1 hierarchies, so the v2 tree cannot have
//! them), each controller the v2 tree lacks is taken from its v1 hierarchy instead: the task
//! gets a cgroup there too (`cpu.cfs_quota_us`, `memory.limit_in_bytes` and
//! `memory.memsw.limit_in_bytes`, `pids.max`; OOM kills from `memory.oom_control`), below the
//! agent's own v1 cgroup, at the same relative path as on v2.

use std::{
    fs,
    io::{self, Write as _},
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

/// cgroup `cpu.max` period, µs (Docker's and the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// Smallest CPU limit: the kernel's smallest quota (1 ms per 100 ms period).
pub const MIN_NANO_CPUS: u64 = 10_000_000;
/// Smallest memory limit (Docker's minimum is 6 MiB).
pub const MIN_MEMORY_BYTES: u64 = 6 * 1024 * 1024;

/// CPUs, memory and process counts, as Swarm's Resources: 0 means unset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPUs in billionths (1.5 CPUs = 1_500_000_000), as Swarm's NanoCPUs.
    #[serde(default)]
    pub nano_cpus: u64,
    #[serde(default)]
    pub memory_bytes: u64,
    /// Limits only.
    #[serde(default)]
    pub pids: u64,
}

impl Resources {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// `--limit-cpu 1.5`, `0.25`: decimal CPUs (at most 9 decimals) in NanoCPUs.
pub fn parse_cpus(text: &str) -> Result<u64> {
    let bad = || format!("{text:?} is not a number of CPUs greater than 0 (e.g. 1.5 or 0.25)");
    let text = text.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    if (whole.is_empty() && fraction.is_empty())
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !fraction.bytes().all(|b| b.is_ascii_digit())
        || fraction.len() > 9
    {
        bail!(bad());
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().with_context(bad)?
    };
    let fraction: u64 = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}").parse().with_context(bad)?
    };
    let nanos = whole
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(fraction))
        .with_context(bad)?;
    if nanos == 0 {
        bail!(bad());
    }
    Ok(nanos)
}

/// `--limit-memory 512M`, `1.5G`, `1048576`: bytes, with Docker's units (b, k, m, g, t, any
/// case, an optional trailing `b`/`ib`: binary multiples).
pub fn parse_memory(text: &str) -> Result<u64> {
    let bad =
        || format!("{text:?} is not an amount of memory greater than 0 (e.g. 512M, 1.5G, 1048576)");
    let lower = text.trim().to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(digits_end);
    let unit = unit.trim();
    let unit = unit
        .strip_suffix("ib")
        .or_else(|| unit.strip_suffix('b').filter(|u| !u.is_empty()))
        .unwrap_or(unit);
    let multiplier: u64 = match unit {
        "" | "b" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => bail!(bad()),
    };
    if number.is_empty() || number.matches('.').count() > 1 || number == "." {
        bail!(bad());
    }
    let bytes = if number.contains('.') {
        let value: f64 = number.parse().with_context(bad)?;
        let bytes = value * multiplier as f64;
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            bail!(bad());
        }
        bytes as u64
    } else {
        number
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(multiplier))
            .with_context(bad)?
    };
    if bytes == 0 {
        bail!(bad());
    }
    Ok(bytes)
}

/// Memory as people read it: `64MiB`, `1.5GiB`, `512B`.
pub fn format_memory(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            let value = bytes as f64 / size as f64;
            return if bytes.is_multiple_of(size) {
                format!("{}{unit}", bytes / size)
            } else {
                format!("{}{unit}", trim_decimals(value))
            };
        }
    }
    format!("{bytes}B")
}

/// NanoCPUs as a decimal: `1.5`, `0.25`, `2`.
pub fn format_cpus(nano_cpus: u64) -> String {
    let whole = nano_cpus / 1_000_000_000;
    let fraction = nano_cpus % 1_000_000_000;
    if fraction == 0 {
        whole.to_string()
    } else {
        let fraction = format!("{fraction:09}");
        format!("{whole}.{}", fraction.trim_end_matches('0'))
    }
}

fn trim_decimals(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The limits' checks (errors name the flag).
pub fn check_limits(limits: &Resources) -> Result<()> {
    if limits.nano_cpus != 0 && limits.nano_cpus < MIN_NANO_CPUS {
        bail!(
            "--limit-cpu {}: at least 0.01 CPUs (the kernel's smallest quota)",
            format_cpus(limits.nano_cpus)
        );
    }
    if limits.memory_bytes != 0 && limits.memory_bytes < MIN_MEMORY_BYTES {
        bail!(
            "--limit-memory {}: at least 6MiB",
            format_memory(limits.memory_bytes)
        );
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Controller {
    Cpu,
    Memory,
    Pids,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Cpu, Controller::Memory, Controller::Pids];

    fn name(self) -> &'static str {
        match self {
            Controller::Cpu => "cpu",
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }

    fn flag(self) -> &'static str {
        match self {
            Controller::Cpu => "--limit-cpu",
            Controller::Memory => "--limit-memory",
            Controller::Pids => "--limit-pids",
        }
    }

    fn wanted(self, limits: &Resources) -> bool {
        match self {
            Controller::Cpu => limits.nano_cpus != 0,
            Controller::Memory => limits.memory_bytes != 0,
            Controller::Pids => limits.pids != 0,
        }
    }
}

/// Where each controller is for the tasks under one cgroup root.
#[derive(Clone, Debug)]
enum Place {
    /// In the task's own (v2) cgroup.
    V2,
    /// In a cgroup per task below this v1 directory.
    V1(PathBuf),
    Missing,
}

/// The controllers tasks get, found once when the runtime starts.
#[derive(Clone, Debug)]
pub struct CgroupControllers {
    places: Vec<(Controller, Place)>,
}

impl CgroupControllers {
    /// Enables cpu, memory and pids for the task cgroups under `cgroup_root` (in every
    /// ancestor's `cgroup.subtree_control`, where the v2 hierarchy has them), and finds the
    /// v1 hierarchy of each one it lacks.
    pub fn detect(cgroup_root: &Path) -> Self {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let v2_mount = crate::process::cgroup2_from_mountinfo(&mountinfo);
        if let Some(mount) = &v2_mount {
            enable_v2(mount, cgroup_root);
        }
        let enabled =
            fs::read_to_string(cgroup_root.join("cgroup.subtree_control")).unwrap_or_default();
        let own_v1 = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let relative = v2_mount
            .as_deref()
            .and_then(|m| cgroup_root.strip_prefix(m).ok())
            .map(v1_relative)
            .unwrap_or_else(|| PathBuf::from("shoal"));
        let places = Controller::ALL
            .into_iter()
            .map(|controller| {
                let place = if enabled.split_whitespace().any(|c| c == controller.name()) {
                    Place::V2
                } else {
                    match v1_dir(&mountinfo, &own_v1, controller.name()) {
                        Some(dir) => Place::V1(dir.join(&relative)),
                        None => Place::Missing,
                    }
                };
                (controller, place)
            })
            .collect();
        Self { places }
    }

    fn place(&self, controller: Controller) -> &Place {
        self.places
            .iter()
            .find(|(c, _)| *c == controller)
            .map(|(_, p)| p)
            .unwrap_or(&Place::Missing)
    }

    /// The v1 cgroups of task `id` (made or not).
    fn v1_dirs(&self, id: &str) -> Vec<(Controller, PathBuf)> {
        self.places
            .iter()
            .filter_map(|(controller, place)| match place {
                Place::V1(base) => Some((*controller, base.join(id))),
                _ => None,
            })
            .collect()
    }

    /// Writes `limits` for task `id` whose v2 cgroup is `cgroup` (made already), making its v1
    /// cgroups where needed, and makes `command` join those between fork and exec.
    pub fn apply(
        &self,
        id: &str,
        cgroup: &Path,
        limits: &Resources,
        command: &mut Command,
    ) -> Result<()> {
        let mut join = Vec::new();
        for controller in Controller::ALL {
            if !controller.wanted(limits) {
                continue;
            }
            let dir = match self.place(controller) {
                Place::V2 => cgroup.to_path_buf(),
                Place::V1(base) => {
                    let dir = base.join(id);
                    fs::create_dir_all(&dir)
                        .with_context(|| format!("creating cgroup {}", dir.display()))?;
                    join.push(dir.clone());
                    dir
                }
                Place::Missing => bail!(
                    "{}: this node's kernel offers no {} cgroup controller to the agent",
                    controller.flag(),
                    controller.name()
                ),
            };
            let v1 = matches!(self.place(controller), Place::V1(_));
            write_limit(controller, &dir, limits, v1).with_context(|| {
                format!(
                    "{}: writing the limit into {}",
                    controller.flag(),
                    dir.display()
                )
            })?;
        }
        if !join.is_empty() {
            let procs: Vec<fs::File> = join
                .iter()
                .map(|dir| {
                    fs::OpenOptions::new()
                        .write(true)
                        .open(dir.join("cgroup.procs"))
                        .with_context(|| format!("opening {}/cgroup.procs", dir.display()))
                })
                .collect::<Result<_>>()?;
            // SAFETY: only write(2) between fork and exec; the files are close-on-exec.
            unsafe {
                command.pre_exec(move || {
                    for file in &procs {
                        if libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        Ok(())
    }

    /// How many times the kernel's OOM killer killed a process of task `id` (v2 cgroup
    /// `cgroup`); read before the cgroup is removed.
    pub fn oom_kills(&self, id: &str, cgroup: &Path) -> u64 {
        let (file, dir) = match self.place(Controller::Memory) {
            Place::V1(base) => ("memory.oom_control", base.join(id)),
            _ => ("memory.events", cgroup.to_path_buf()),
        };
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Removes the v1 cgroups of task `id` (once its processes are gone).
    pub fn remove(&self, id: &str) {
        for (_, dir) in self.v1_dirs(id) {
            for _ in 0..100 {
                match fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(err) if crate::process::cgroup_gone(&err) => break,
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

fn write_limit(controller: Controller, dir: &Path, limits: &Resources, v1: bool) -> Result<()> {
    let write = |file: &str, value: String| -> Result<()> {
        let path = dir.join(file);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        f.write_all(value.as_bytes())
            .with_context(|| format!("writing {value:?} to {}", path.display()))
    };
    match (controller, v1) {
        (Controller::Cpu, false) => write("cpu.max", cpu_max(limits.nano_cpus)),
        (Controller::Cpu, true) => {
            write("cpu.cfs_period_us", CPU_PERIOD_US.to_string())?;
            write("cpu.cfs_quota_us", cpu_quota(limits.nano_cpus).to_string())
        }
        (Controller::Memory, false) => {
            write("memory.max", limits.memory_bytes.to_string())?;
            // No swap beyond the limit (where the kernel accounts swap).
            if dir.join("memory.swap.max").exists() {
                write("memory.swap.max", "0".into())?;
            }
            Ok(())
        }
        (Controller::Memory, true) => {
            write("memory.limit_in_bytes", limits.memory_bytes.to_string())?;
            if dir.join("memory.memsw.limit_in_bytes").exists() {
                write(
                    "memory.memsw.limit_in_bytes",
                    limits.memory_bytes.to_string(),
                )?;
            }
            Ok(())
        }
        (Controller::Pids, _) => write("pids.max", limits.pids.to_string()),
    }
}

/// The quota, µs per `CPU_PERIOD_US`, of `nano_cpus`.
pub fn cpu_quota(nano_cpus: u64) -> u64 {
    (nano_cpus as u128 * CPU_PERIOD_US as u128 / 1_000_000_000).max(1000) as u64
}

/// `cpu.max` for `nano_cpus`: "QUOTA PERIOD".
pub fn cpu_max(nano_cpus: u64) -> String {
    format!("{} {CPU_PERIOD_US}", cpu_quota(nano_cpus))
}

/// Turns on the wanted controllers from the v2 mount down to `cgroup_root` (each ancestor's
/// `cgroup.subtree_control`, then the root's own, for its children), where offered. Best
/// effort: a controller that cannot be had is found missing by `detect`.
fn enable_v2(mount: &Path, cgroup_root: &Path) {
    let Ok(relative) = cgroup_root.strip_prefix(mount) else {
        return;
    };
    let mut dir = mount.to_path_buf();
    let mut chain = vec![dir.clone()];
    for part in relative.components() {
        dir.push(part);
        chain.push(dir.clone());
    }
    for dir in chain {
        let offered = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        for controller in Controller::ALL {
            let name = controller.name();
            let has = |text: &str| text.split_whitespace().any(|c| c == name);
            if has(&offered) && !has(&enabled) {
                if let Err(err) = fs::write(dir.join("cgroup.subtree_control"), format!("+{name}"))
                {
                    tracing::debug!(dir = %dir.display(), controller = name, error = %err, "enabling a cgroup controller");
                }
            }
        }
    }
}

/// Where the v1 hierarchies mirror the v2 cgroup `v2_dir` (for tasks under it on a hybrid
/// host): what to remove with it (`lab down`).
pub fn v1_mirrors(v2_dir: &Path) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own_v1 = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(relative) = crate::process::cgroup2_from_mountinfo(&mountinfo)
        .and_then(|m| v2_dir.strip_prefix(m).ok().map(v1_relative))
    else {
        return Vec::new();
    };
    Controller::ALL
        .into_iter()
        .filter_map(|c| v1_dir(&mountinfo, &own_v1, c.name()))
        .map(|dir| dir.join(&relative))
        .filter(|dir| dir.exists())
        .collect()
}

/// The v1 cgroups (cpu, memory, pids) process `pid` is in that this process is not: where a
/// `task exec` joins a task's limits on a hybrid host.
pub fn v1_cgroups_of(pid: u32) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let theirs = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    Controller::ALL
        .into_iter()
        .filter_map(|c| {
            let dir = v1_dir(&mountinfo, &theirs, c.name())?;
            (Some(&dir) != v1_dir(&mountinfo, &own, c.name()).as_ref()).then_some(dir)
        })
        .collect()
}

/// The v2 path of the task cgroups as a v1 path: a v1 cgroup has a file named `tasks`, so a
/// directory of that name is called `tasks.d` there.
fn v1_relative(relative: &Path) -> PathBuf {
    relative
        .components()
        .map(|c| match c.as_os_str().to_str() {
            Some("tasks") => std::ffi::OsStr::new("tasks.d"),
            _ => c.as_os_str(),
        })
        .collect()
}

/// The agent's own cgroup in the v1 hierarchy of `controller`, if one is mounted.
fn v1_dir(mountinfo: &str, own: &str, controller: &str) -> Option<PathBuf> {
    let mount = mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let mut fs = fs.split_whitespace();
        if fs.next() != Some("cgroup") {
            return None;
        }
        let options = fs.nth(1)?;
        options
            .split(',')
            .any(|o| o == controller)
            .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))?
    })?;
    let path = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _ = parts.next()?;
        let controllers = parts.next()?;
        let path = parts.next()?;
        controllers
            .split(',')
            .any(|c| c == controller)
            .then(|| path.trim_start_matches('/').to_owned())
    })?;
    Some(mount.join(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpus_are_decimals_in_nano_cpus() {
        assert_eq!(parse_cpus("1.5").unwrap(), 1_500_000_000);
        assert_eq!(parse_cpus("0.25").unwrap(), 250_000_000);
        assert_eq!(parse_cpus(".5").unwrap(), 500_000_000);
        assert_eq!(parse_cpus("2").unwrap(), 2_000_000_000);
        for bad in ["0", "0.0", "-1", "abc", "1.2.3", "", "1.0000000001", "1e3"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
        assert_eq!(format_cpus(1_500_000_000), "1.5");
        assert_eq!(format_cpus(250_000_000), "0.25");
        assert_eq!(format_cpus(2_000_000_000), "2");
        assert_eq!(cpu_max(1_500_000_000), "150000 100000");
        assert_eq!(cpu_max(250_000_000), "25000 100000");
        assert_eq!(cpu_max(1), "1000 100000");
    }

    #[test]
    fn memory_takes_dockers_units() {
        assert_eq!(parse_memory("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory("512m").unwrap(), 512 << 20);
        assert_eq!(parse_memory("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_memory("1G").unwrap(), 1 << 30);
        assert_eq!(parse_memory("1.5g").unwrap(), 3 << 29);
        assert_eq!(parse_memory("64k").unwrap(), 64 << 10);
        assert_eq!(parse_memory("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_memory("100b").unwrap(), 100);
        for bad in ["0", "-5M", "M", "12X", "1.2.3G", "", "0.0G"] {
            assert!(parse_memory(bad).is_err(), "{bad}");
        }
        assert_eq!(format_memory(64 << 20), "64MiB");
        assert_eq!(format_memory(3 << 29), "1.5GiB");
        assert_eq!(format_memory(100), "100B");
    }

    #[test]
    fn limits_below_what_the_kernel_takes_are_refused() {
        let limits = |nano_cpus, memory_bytes| Resources {
            nano_cpus,
            memory_bytes,
            pids: 0,
        };
        assert!(check_limits(&limits(5_000_000, 0)).is_err());
        assert!(check_limits(&limits(0, 1 << 20)).is_err());
        assert!(check_limits(&limits(10_000_000, 6 << 20)).is_ok());
        assert!(check_limits(&Resources::default()).is_ok());
    }

    #[test]
    fn v1_hierarchies_are_found_with_the_agents_own_cgroup() {
        let mountinfo =
            "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                         32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                         41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let own = "4:memory:/sandbox/abc\n1:cpu:/\n0::/\n";
        assert_eq!(
            v1_dir(mountinfo, own, "memory"),
            Some(PathBuf::from("/sys/fs/cgroup/memory/sandbox/abc"))
        );
        assert_eq!(
            v1_dir(mountinfo, own, "cpu"),
            Some(PathBuf::from("/sys/fs/cgroup/cpu"))
        );
        assert_eq!(v1_dir(mountinfo, own, "pids"), None);
        assert_eq!(
            v1_relative(Path::new("shoal-lab/node1/tasks")),
            PathBuf::from("shoal-lab/node1/tasks.d")
        );
    }
}
