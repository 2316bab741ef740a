//! Running a command inside a running task, as `docker exec` does: in its PID, network, UTS
//! and mount namespaces (util-linux `nsenter`), its cgroups, its environment and its
//! confinement. `shoal task exec` and the agent's health commands share it.

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result};

use crate::{confinement::Confinement, limits, process};

/// The command to run `command` inside the task whose PID 1 is `pid`; `shoal_exe` is the
/// shoal binary, whose `task-confine` applies the task's confinement.
pub fn command_in_task(pid: u32, command: &[String], shoal_exe: &Path) -> Result<Command> {
    // The command runs with the task's environment.
    let environ =
        std::fs::read(format!("/proc/{pid}/environ")).context("reading the task's environment")?;
    let env = environ.split(|b| *b == 0).filter_map(|entry| {
        let entry = std::str::from_utf8(entry).ok()?;
        entry.split_once('=')
    });
    let mut nsenter = Command::new("nsenter");
    nsenter.args([
        "--target",
        &pid.to_string(),
        "--pid",
        "--net",
        "--uts",
        "--mount",
        "--",
    ]);
    // The command joins the task's confinement (capabilities, user, no_new_privs, seccomp),
    // as task-init applied it to the task's command: its arguments say which. The masked
    // paths come with the task's mount namespace.
    let cmdline =
        std::fs::read(format!("/proc/{pid}/cmdline")).context("reading the task's confinement")?;
    let cmdline: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect();
    if let Some(confinement) = Confinement::of_task_init(&cmdline)? {
        nsenter
            .arg(shoal_exe)
            .arg("task-confine")
            .args(confinement.args())
            .arg("--");
    }
    nsenter.args(command).env_clear().envs(env);
    // In the task's cgroup too: its limits apply, and connections to VIPs are balanced.
    process::join_cgroup(&mut nsenter, &process::cgroup_of(pid)?)?;
    // And its limits' v1 cgroups, on a hybrid host.
    for cgroup in limits::v1_cgroups_of(pid) {
        process::join_cgroup(&mut nsenter, &cgroup)?;
    }
    Ok(nsenter)
}
