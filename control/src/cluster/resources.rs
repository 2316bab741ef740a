//! Tasks as contained workloads, the cluster's side: what a service's tasks are confined to
//! (`--user`, `--cap-add`, `--cap-drop`) and the resources they may use (`--limit-*`) or
//! need (`--reserve-*`), part of the task template; how a node turns it into a launch; the
//! agent paths a task must not see; and the scheduler's fit on the nodes' capacity.

use std::path::{Path, PathBuf};

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
pub fn agent_paths(config: &crate::config::AgentConfig) -> Vec<PathBuf> {
    let mut paths = vec![
        own_dir_of(&config.socket),
        config.state_dir.clone(),
        config.bpffs_root.clone(),
        own_dir_of(Path::new(crate::config::DEFAULT_CONFIG)),
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
