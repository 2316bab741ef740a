//! Tasks as contained workloads, the cluster's side: what a service's tasks are confined to
//! (`--user`, `--cap-add`, `--cap-drop`) and the resources they may use (`--limit-*`) or
//! need (`--reserve-*`), part of the task template; how a node turns it into a launch; the
//! agent paths a task must not see; and the scheduler's fit on the nodes' capacity.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use super::state::{ClusterState, Command, Node, ServiceSpec, Task, TaskState};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use shoal_dataplane::{
    confinement::{self, Confinement, TaskUser},
    limits::{self, Resources},
};

/// A service's containment: part of its task template, so changing it rolls the tasks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Containment {
    /// `USER[:GROUP]`, names resolved on the node; unset: root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Canonical capability names (`NET_ADMIN`, `ALL`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    #[serde(default)]
    pub limits: Resources,
    /// CPUs and memory the scheduler sets aside on the task's node (no pids).
    #[serde(default)]
    pub reservations: Resources,
}

impl Containment {
    /// Checks every field; errors name the flag. Capability names come out canonical.
    pub fn validate(&self) -> Result<()> {
        for name in self.cap_add.iter().chain(&self.cap_drop) {
            confinement::canonical_capability(name)?;
        }
        confinement::capability_set(&self.cap_add, &self.cap_drop)?;
        if let Some(user) = &self.user {
            confinement::check_user_syntax(user)?;
        }
        limits::check_limits(&self.limits)?;
        if self.reservations.pids != 0 {
            bail!("only CPUs and memory can be reserved");
        }
        let (limit, reserve) = (&self.limits, &self.reservations);
        if limit.nano_cpus != 0 && reserve.nano_cpus > limit.nano_cpus {
            bail!(
                "--reserve-cpu {} is more than --limit-cpu {}",
                limits::format_cpus(reserve.nano_cpus),
                limits::format_cpus(limit.nano_cpus)
            );
        }
        if limit.memory_bytes != 0 && reserve.memory_bytes > limit.memory_bytes {
            bail!(
                "--reserve-memory {} is more than --limit-memory {}",
                limits::format_memory(reserve.memory_bytes),
                limits::format_memory(limit.memory_bytes)
            );
        }
        Ok(())
    }

    /// With capability names in canonical form (`cap_net_admin` → `NET_ADMIN`).
    pub fn canonical(mut self) -> Result<Self> {
        for list in [&mut self.cap_add, &mut self.cap_drop] {
            for name in list.iter_mut() {
                *name = confinement::canonical_capability(name)?;
            }
        }
        Ok(self)
    }

    /// The task's capability set.
    pub fn capabilities(&self) -> u64 {
        confinement::capability_set(&self.cap_add, &self.cap_drop)
            .unwrap_or(confinement::DEFAULT_CAPS)
    }

    /// What a node starts the task with: its confinement (the user resolved here: an unknown
    /// one is an error, the task is Rejected with it) and its limits.
    pub fn launch_options(&self) -> Result<(Option<Confinement>, Resources)> {
        self.validate()?;
        let user = self.user.as_deref().map(TaskUser::resolve).transpose()?;
        let confinement = confinement_enabled().then(|| Confinement {
            caps: self.capabilities(),
            user,
        });
        Ok((confinement, self.limits))
    }
}

/// A `service update` of the containment: each field given replaces the service's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainmentUpdate {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub cap_add: Option<Vec<String>>,
    #[serde(default)]
    pub cap_drop: Option<Vec<String>>,
    #[serde(default)]
    pub limit_cpu: Option<u64>,
    #[serde(default)]
    pub limit_memory: Option<u64>,
    #[serde(default)]
    pub limit_pids: Option<u64>,
    #[serde(default)]
    pub reserve_cpu: Option<u64>,
    #[serde(default)]
    pub reserve_memory: Option<u64>,
}

impl ContainmentUpdate {
    /// Applies the update; true when the containment changed (then the tasks roll).
    pub fn apply(&self, containment: &mut Containment) -> Result<bool> {
        let before = containment.clone();
        if let Some(user) = &self.user {
            containment.user = Some(user.clone());
        }
        if let Some(caps) = &self.cap_add {
            containment.cap_add = caps.clone();
        }
        if let Some(caps) = &self.cap_drop {
            containment.cap_drop = caps.clone();
        }
        let set = |field: &mut u64, value: Option<u64>| {
            if let Some(value) = value {
                *field = value;
            }
        };
        set(&mut containment.limits.nano_cpus, self.limit_cpu);
        set(&mut containment.limits.memory_bytes, self.limit_memory);
        set(&mut containment.limits.pids, self.limit_pids);
        set(&mut containment.reservations.nano_cpus, self.reserve_cpu);
        set(
            &mut containment.reservations.memory_bytes,
            self.reserve_memory,
        );
        *containment = containment.clone().canonical()?;
        Ok(*containment != before)
    }
}

/// `SHOAL_TASK_CONFINEMENT=off` in the agent's environment starts tasks unconfined: only for
/// measuring what the confinement costs (`--bench cluster`), never for production.
fn confinement_enabled() -> bool {
    std::env::var("SHOAL_TASK_CONFINEMENT").as_deref() != Ok("off")
}

/// The agent's paths no task may see: its API socket, state dir (keys, Raft log, task
/// files), config and pinned eBPF objects. A file whose directory is the agent's own (as
/// `/run/shoal/shoal.sock`, `/etc/shoal/agent.toml`) is hidden with its whole directory, so
/// a socket the agent makes anew after a restart stays hidden too.
pub fn agent_paths(
    socket: &Path,
    state_dir: &Path,
    bpffs_root: &Path,
    default_config: &Path,
) -> Vec<PathBuf> {
    let mut paths = vec![
        own_dir_of(socket),
        state_dir.to_owned(),
        bpffs_root.to_owned(),
        own_dir_of(default_config),
    ];
    // The config file the agent was started with (`--config`).
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--config") {
        if let Some(file) = args.get(i + 1) {
            paths.push(own_dir_of(Path::new(file)));
        }
    }
    paths.sort();
    paths.dedup();
    paths
}

/// The directory of an agent file, unless it is a directory other programs share (then the
/// file itself).
fn own_dir_of(file: &Path) -> PathBuf {
    const SHARED: [&str; 16] = [
        "/", "/run", "/var/run", "/tmp", "/var/tmp", "/etc", "/var", "/var/lib", "/root", "/home",
        "/usr", "/srv", "/opt", "/mnt", "/media", "/dev",
    ];
    match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !SHARED.iter().any(|s| Path::new(s) == dir) => {
            dir.to_path_buf()
        }
        _ => file.to_path_buf(),
    }
}

/// The CPUs and memory a node reports: the settings (`node_cpus`, `node_memory`) when set,
/// else what the host has (its CPUs, MemTotal).
pub fn node_resources(cpus: Option<&str>, memory: Option<&str>) -> Result<Resources> {
    let nano_cpus = match cpus {
        Some(text) => {
            limits::parse_cpus(text).map_err(|err| anyhow::anyhow!("node_cpus: {err:#}"))?
        }
        None => std::thread::available_parallelism().map_or(1, |n| n.get() as u64) * 1_000_000_000,
    };
    let memory_bytes = match memory {
        Some(text) => {
            limits::parse_memory(text).map_err(|err| anyhow::anyhow!("node_memory: {err:#}"))?
        }
        None => std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|info| {
                let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            })
            .unwrap_or(0),
    };
    Ok(Resources {
        nano_cpus,
        memory_bytes,
        pids: 0,
    })
}

static REPORTED: std::sync::OnceLock<Resources> = std::sync::OnceLock::new();

/// What this node's heartbeats report (set once the agent knows its settings).
pub fn set_reported(resources: Resources) {
    let _ = REPORTED.set(resources);
}

pub fn reported() -> Option<Resources> {
    REPORTED.get().copied()
}

/// The command that records a node's new resources, when its heartbeat reports a change.
pub fn node_update(
    state: &ClusterState,
    node_id: &str,
    reported: Option<Resources>,
) -> Option<Command> {
    let reported = reported?;
    let node = state.nodes.get(node_id)?;
    (node.resources != reported).then(|| {
        let mut node = node.clone();
        node.resources = reported;
        Command::UpdateNode(node)
    })
}

/// Refuses a reservation no node could ever hold (larger than every node's capacity).
pub fn check_reservation_fits(state: &ClusterState, spec: &ServiceSpec) -> Result<()> {
    let need = &spec.containment.reservations;
    if need.is_empty() || state.nodes.is_empty() {
        return Ok(());
    }
    let fits_somewhere = state.nodes.values().any(|node| fits(&node.resources, need));
    if !fits_somewhere {
        let largest = |get: fn(&Resources) -> u64| {
            state
                .nodes
                .values()
                .map(|n| get(&n.resources))
                .max()
                .unwrap_or(0)
        };
        bail!(
            "service {}: no node can hold its reservation (--reserve-cpu {}, --reserve-memory \
             {}): the largest node has {} CPUs and {} (`shoal node inspect NODE` shows each \
             node's resources)",
            spec.name,
            limits::format_cpus(need.nano_cpus),
            limits::format_memory(need.memory_bytes),
            limits::format_cpus(largest(|r| r.nano_cpus)),
            limits::format_memory(largest(|r| r.memory_bytes)),
        );
    }
    Ok(())
}

/// Whether `need` fits in `free` (a capacity of 0 is unknown: not limited).
fn fits(free: &Resources, need: &Resources) -> bool {
    (free.nano_cpus == 0 || need.nano_cpus <= free.nano_cpus)
        && (free.memory_bytes == 0 || need.memory_bytes <= free.memory_bytes)
}

/// `no suitable node`, with Swarm's reason when `short` nodes lacked only resources.
pub fn no_suitable_node(short: usize) -> String {
    no_suitable_node_because(0, 0, short)
}

/// Swarm's reason for a task that fits nowhere, from how many nodes each filter turned
/// down (a node counts under the first it fails: constraints, the per-node limit, then
/// resources).
pub fn no_suitable_node_because(constraints: usize, max_per_node: usize, short: usize) -> String {
    let nodes = |n: usize| {
        if n == 1 {
            "1 node".to_owned()
        } else {
            format!("{n} nodes")
        }
    };
    let mut why = Vec::new();
    if constraints > 0 {
        why.push(format!(
            "scheduling constraints not satisfied on {}",
            nodes(constraints)
        ));
    }
    if max_per_node > 0 {
        why.push(format!(
            "max replicas per node limit exceed on {}",
            nodes(max_per_node)
        ));
    }
    if short > 0 {
        why.push(format!("insufficient resources on {}", nodes(short)));
    }
    if why.is_empty() {
        "no suitable node".into()
    } else {
        format!("no suitable node ({})", why.join("; "))
    }
}

/// What each node has left for reservations: its capacity less the reservations of the
/// tasks placed on it that have not finished.
pub struct Capacity {
    /// Node ID -> (CPUs, memory) reserved.
    reserved: HashMap<String, (u64, u64)>,
    capacity: HashMap<String, Resources>,
}

impl Capacity {
    pub fn new<'a>(state: &ClusterState, tasks: impl Iterator<Item = &'a Task>) -> Self {
        let mut reserved: HashMap<String, (u64, u64)> = HashMap::new();
        // A task waiting for resources (Pending) holds none yet.
        for task in tasks.filter(|t| !t.state.is_terminal() && t.state != TaskState::Pending) {
            let (Some(node), Some(service)) =
                (task.node_id.as_ref(), state.services.get(&task.service_id))
            else {
                continue;
            };
            let need = &service.spec.containment.reservations;
            let entry = reserved.entry(node.clone()).or_default();
            entry.0 += need.nano_cpus;
            entry.1 += need.memory_bytes;
        }
        let capacity = state
            .nodes
            .values()
            .map(|n| (n.id.clone(), n.resources))
            .collect();
        Self { reserved, capacity }
    }

    fn free(&self, node_id: &str) -> Resources {
        let capacity = self.capacity.get(node_id).copied().unwrap_or_default();
        let (cpus, memory) = self.reserved.get(node_id).copied().unwrap_or_default();
        let left = |total: u64, used: u64| {
            // 0 stays "unknown"; a full node keeps 1 so it is not taken as unknown.
            if total == 0 {
                0
            } else {
                total.saturating_sub(used).max(1)
            }
        };
        Resources {
            nano_cpus: left(capacity.nano_cpus, cpus),
            memory_bytes: left(capacity.memory_bytes, memory),
            pids: 0,
        }
    }

    pub fn fits(&self, node: &Node, need: &Resources) -> bool {
        need.is_empty() || fits(&self.free(&node.id), need)
    }

    pub fn take(&mut self, node_id: &str, need: &Resources) {
        let entry = self.reserved.entry(node_id.to_owned()).or_default();
        entry.0 += need.nano_cpus;
        entry.1 += need.memory_bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_files_are_hidden_with_their_own_directory_only() {
        assert_eq!(
            own_dir_of(Path::new("/run/shoal/shoal.sock")),
            PathBuf::from("/run/shoal")
        );
        assert_eq!(
            own_dir_of(Path::new("/run/shoal.sock")),
            PathBuf::from("/run/shoal.sock")
        );
        assert_eq!(
            own_dir_of(Path::new("/etc/shoal/agent.toml")),
            PathBuf::from("/etc/shoal")
        );
    }

    #[test]
    fn containment_checks_name_the_flag() {
        let ok = Containment {
            user: Some("65534".into()),
            cap_add: vec!["cap_net_admin".into()],
            cap_drop: vec!["ALL".into()],
            ..Default::default()
        };
        ok.validate().unwrap();
        assert_eq!(
            ok.clone().canonical().unwrap().cap_add,
            vec!["NET_ADMIN".to_owned()]
        );
        assert_eq!(ok.capabilities(), 1 << 12);
        let bad = |c: Containment| format!("{:#}", c.validate().unwrap_err());
        assert!(bad(Containment {
            cap_add: vec!["NET_FOO".into()],
            ..Default::default()
        })
        .contains("unknown capability"));
        assert!(bad(Containment {
            cap_add: vec!["NET_RAW".into()],
            cap_drop: vec!["cap_net_raw".into()],
            ..Default::default()
        })
        .contains("both added"));
        assert!(bad(Containment {
            user: Some("a b".into()),
            ..Default::default()
        })
        .contains("--user"));
        assert!(bad(Containment {
            limits: Resources {
                memory_bytes: 1024,
                ..Default::default()
            },
            ..Default::default()
        })
        .contains("--limit-memory"));
        assert!(bad(Containment {
            limits: Resources {
                nano_cpus: 1_000_000_000,
                ..Default::default()
            },
            reservations: Resources {
                nano_cpus: 2_000_000_000,
                ..Default::default()
            },
            ..Default::default()
        })
        .contains("--reserve-cpu"));
    }

    #[test]
    fn default_capabilities_are_dockers() {
        let caps = Containment::default().capabilities();
        assert_eq!(caps, 0xa80425fb);
        let names = confinement::capability_names(caps);
        for name in [
            "CHOWN",
            "NET_RAW",
            "NET_BIND_SERVICE",
            "AUDIT_WRITE",
            "SETFCAP",
        ] {
            assert!(names.contains(&name), "{name}");
        }
        assert!(!names.contains(&"NET_ADMIN"));
        let all = Containment {
            cap_add: vec!["all".into()],
            cap_drop: vec!["sys_admin".into()],
            ..Default::default()
        };
        assert_eq!(all.capabilities(), confinement::ALL_CAPS & !(1 << 21));
    }
}
