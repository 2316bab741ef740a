//! Tasks as contained workloads: Docker's default capabilities, no_new_privs and seccomp
//! for the command and for `task exec`; `--cap-add`, `--cap-drop`, `--user`; the agent's
//! socket and state out of reach; memory, CPU and pids limits with OOM kills reported; CPU and
//! memory reservations that leave a task Pending until capacity frees. Needs root.

use std::time::Duration;

use serde_json::Value;
use shoal_tests::{wait_for, RunningTask, TestLab};

/// Docker's default capability set.
const DEFAULT_CAPS: &str = "00000000a80425fb";

/// The lines of a service's logs once one contains `marker` (30 s at most).
fn logs_with(lab: &TestLab, service: &str, marker: &str) -> String {
    wait_for(
        &format!("{marker} in the logs of {service}"),
        Duration::from_secs(30),
        || {
            let out = lab.run(&["exec", "node1", "--", "shoal", "service", "logs", service]);
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.contains(marker).then_some(text)
        },
    )
}

/// The value of a `/proc/PID/status` field in a status text (or logs of one).
fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|line| {
            let (_, rest) = line.split_once(&format!("{name}:"))?;
            Some(rest.trim())
        })
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

const SHOW_STATUS: &str =
    "grep -E '^(Uid|Gid|CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; exec sleep 100000";

fn tasks(lab: &TestLab, service: &str) -> Vec<Value> {
    lab.node_json("node1", &["service", "ps", service])
        .as_array()
        .expect("tasks")
        .clone()
}

#[test]
fn tasks_run_with_least_privilege_and_cannot_reach_the_agent() {
    let lab = TestLab::up("cf-priv", 1);
    let socket = lab.run_dir().join("node1/shoal.sock");
    let socket = socket.to_str().expect("path");

    // The command itself: Docker's defaults.
    lab.create_service("plain", &[], &["sh", "-c", SHOW_STATUS]);
    let status = logs_with(&lab, "plain", "Seccomp");
    assert_eq!(field(&status, "CapEff"), DEFAULT_CAPS, "{status}");
    assert_eq!(field(&status, "CapBnd"), DEFAULT_CAPS, "{status}");
    assert_eq!(field(&status, "NoNewPrivs"), "1", "{status}");
    assert_eq!(field(&status, "Seccomp"), "2", "{status}");

    // `task exec` joins the same confinement.
    let task = &lab.running_tasks("plain", 1)[0];
    let exec = |task: &RunningTask, command: &[&str]| {
        let out = lab.in_task(task, command);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (_, status) = exec(task, &["cat", "/proc/self/status"]);
    assert_eq!(field(&status, "CapEff"), DEFAULT_CAPS, "{status}");
    assert_eq!(field(&status, "CapBnd"), DEFAULT_CAPS, "{status}");
    assert_eq!(field(&status, "NoNewPrivs"), "1", "{status}");
    assert_eq!(field(&status, "Seccomp"), "2", "{status}");

    // The agent is out of reach: its socket is not there, so no swarm command works.
    let (ok, out) = exec(task, &["test", "-e", socket]);
    assert!(!ok, "the agent's socket is visible in a task: {out}");
    let (ok, out) = exec(task, &["shoal", "--socket", socket, "node", "ls"]);
    assert!(!ok, "a task drove the swarm: {out}");
    let state = lab.run_dir().join("node1/state");
    let (ok, out) = exec(
        task,
        &["sh", "-c", &format!("ls -A {} | grep .", state.display())],
    );
    assert!(!ok, "the agent's state is visible in a task: {out}");
    // Kernel settings and namespaces are out of reach too.
    let (ok, out) = exec(
        task,
        &["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"],
    );
    assert!(!ok && out.contains("Read-only"), "{out}");
    let (ok, out) = exec(task, &["unshare", "--net", "true"]);
    assert!(!ok, "unshare worked: {out}");
    // What the walkthrough needs still works: raw sockets (ping) and ports below 1024.
    let (ok, out) = exec(task, &["ping", "-c", "1", "-W", "2", "127.0.0.1"]);
    assert!(ok, "ping (NET_RAW) failed: {out}");

    // Devices: Docker's list. The node's /dev is there, but only listed devices open, even
    // among those the task makes itself (mknod is allowed, as in Docker). Major 42 ("demo/
    // sample use") has no driver: unlisted, the open is refused (EPERM) before the kernel
    // looks for the device (which would say ENXIO).
    let (ok, out) = exec(
        task,
        &[
            "sh",
            "-c",
            "echo x > /dev/null && head -c 8 /dev/urandom | wc -c",
        ],
    );
    assert!(ok && out.trim() == "8", "{out}");
    let nodes = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a directory");
    for kind in ["c", "b"] {
        let node = nodes.path().join(format!("{kind}42"));
        let node = node.to_str().expect("path");
        let (ok, out) = exec(
            task,
            &[
                "sh",
                "-c",
                &format!("mknod {node} {kind} 42 0 && cat {node}"),
            ],
        );
        assert!(
            !ok && out.contains("Operation not permitted"),
            "a {kind} device not on the list: {out}"
        );
    }

    // --cap-drop ALL leaves none; --cap-add adds one.
    lab.create_service("none", &["--cap-drop", "ALL"], &["sh", "-c", SHOW_STATUS]);
    lab.create_service(
        "admin",
        &["--cap-add", "net_admin"],
        &["sh", "-c", SHOW_STATUS],
    );
    let status = logs_with(&lab, "none", "Seccomp");
    assert_eq!(field(&status, "CapEff"), "0000000000000000", "{status}");
    assert_eq!(field(&status, "CapBnd"), "0000000000000000", "{status}");
    let status = logs_with(&lab, "admin", "Seccomp");
    assert_eq!(field(&status, "CapEff"), "00000000a80435fb", "{status}");

    // --user 65534 runs as nobody, without capabilities.
    lab.create_service("nobody", &["--user", "65534"], &["sh", "-c", SHOW_STATUS]);
    let status = logs_with(&lab, "nobody", "Seccomp");
    assert!(
        field(&status, "Uid").starts_with("65534\t65534"),
        "{status}"
    );
    assert_eq!(field(&status, "CapEff"), "0000000000000000", "{status}");
    let task = &lab.running_tasks("nobody", 1)[0];
    let (_, status) = exec(task, &["cat", "/proc/self/status"]);
    assert!(
        field(&status, "Uid").starts_with("65534\t65534"),
        "{status}"
    );

    // A user the node does not know: Rejected, saying so.
    lab.create_service("ghost", &["--user", "no-such-user"], &["sleep", "100000"]);
    let rejected = wait_for("the task to be rejected", Duration::from_secs(30), || {
        tasks(&lab, "ghost")
            .into_iter()
            .find(|t| t["state"] == "rejected")
    });
    assert!(
        rejected["error"]
            .as_str()
            .unwrap_or_default()
            .contains("no user \"no-such-user\" on this node"),
        "{rejected}"
    );

    // Bad input is refused up front, naming the flag, and nothing is created.
    for (flags, says) in [
        (&["--cap-add", "FLY"][..], "unknown capability"),
        (&["--limit-memory", "0"][..], "--limit-memory"),
        (&["--limit-cpu=-1"][..], "--limit-cpu"),
        (&["--limit-pids", "0"][..], "--limit-pids"),
        (
            &["--cap-add", "NET_RAW", "--cap-drop", "net_raw"][..],
            "both added",
        ),
    ] {
        let mut args = vec![
            "exec", "node1", "--", "shoal", "service", "create", "--name", "bad",
        ];
        args.extend_from_slice(flags);
        args.extend_from_slice(&["--", "true"]);
        let out = lab.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(says),
            "{flags:?}: {stderr}"
        );
    }
    let services = lab.node_json("node1", &["service", "ls"]);
    assert!(
        !services
            .as_array()
            .expect("services")
            .iter()
            .any(|s| s["name"] == "bad"),
        "{services}"
    );
    lab.down_clean();
}

/// The file of a task's cgroup with `name`, wherever the host keeps that controller (the v2
/// tree, or a v1 hierarchy on a hybrid host).
fn cgroup_file(task_id: &str, names: &[&str]) -> Option<(String, String)> {
    let out = std::process::Command::new("find")
        .args(["/sys/fs/cgroup", "-path", &format!("*/{task_id}/*")])
        .output()
        .ok()?;
    let listing = String::from_utf8_lossy(&out.stdout);
    listing.lines().find_map(|path| {
        let file = path.rsplit('/').next()?;
        names.contains(&file).then(|| {
            (
                file.to_owned(),
                std::fs::read_to_string(path)
                    .unwrap_or_default()
                    .trim()
                    .to_owned(),
            )
        })
    })
}

#[test]
fn limits_are_applied_and_an_oom_kill_is_reported_and_replaced() {
    let lab = TestLab::up("cf-limits", 1);

    lab.create_service(
        "capped",
        &[
            "--limit-cpu",
            "0.5",
            "--limit-pids",
            "64",
            "--limit-memory",
            "128M",
        ],
        &["sleep", "100000"],
    );
    lab.running_tasks("capped", 1);
    let id = tasks(&lab, "capped")[0]["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let (file, quota) =
        cgroup_file(&id, &["cpu.max", "cpu.cfs_quota_us"]).expect("the task's CPU limit");
    match file.as_str() {
        "cpu.max" => assert_eq!(quota, "50000 100000"),
        _ => assert_eq!(quota, "50000"),
    }
    let (_, pids) = cgroup_file(&id, &["pids.max"]).expect("the task's pids limit");
    assert_eq!(pids, "64");
    // `task exec` joins the task's cgroups, limits included (v1 ones on a hybrid host).
    let task = &lab.running_tasks("capped", 1)[0];
    let out = lab.in_task(task, &["cat", "/proc/self/cgroup"]);
    let cgroups = String::from_utf8_lossy(&out.stdout);
    for line in cgroups.lines() {
        let controllers = line.split(':').nth(1).unwrap_or_default();
        if ["", "cpu", "memory", "pids"].contains(&controllers) {
            assert!(
                line.contains(&id),
                "task exec outside the task's cgroups: {cgroups}"
            );
        }
    }

    // A task that allocates past its limit is killed, reported as such, and replaced.
    lab.create_service(
        "hog",
        &["--limit-memory", "64M"],
        &[
            "python3",
            "-c",
            "import time\nx = []\nfor _ in range(64):\n    x.append(bytearray(16 << 20))\n    time.sleep(0.02)\ntime.sleep(100000)",
        ],
    );
    let failed = wait_for("the hog to be OOM-killed", Duration::from_secs(30), || {
        tasks(&lab, "hog")
            .into_iter()
            .find(|t| t["state"] == "failed")
    });
    assert_eq!(
        failed["error"], "out of memory: killed at its 64MiB limit (--limit-memory)",
        "{failed}"
    );
    let table = lab.exec("node1", &["shoal", "service", "ps", "hog"]);
    assert!(table.contains("out of memory"), "{table}");
    wait_for("a replacement task", Duration::from_secs(30), || {
        (tasks(&lab, "hog").len() >= 2).then_some(())
    });
    lab.down_clean();
}

#[test]
fn reservations_wait_for_capacity_with_swarms_reason_and_updates_roll() {
    let lab = TestLab::up_with(
        "cf-reserve",
        2,
        &["--node-cpus", "1", "--node-memory", "1G"],
    );
    let node = lab.node_json("node1", &["node", "inspect", "self"]);
    assert_eq!(node["resources"]["nano_cpus"], 1_000_000_000u64, "{node}");
    assert_eq!(node["resources"]["memory_bytes"], 1u64 << 30, "{node}");
    let pretty = lab.exec("node1", &["shoal", "node", "inspect", "self", "--pretty"]);
    assert!(pretty.contains("CPUs:              1"), "{pretty}");
    assert!(pretty.contains("Memory:            1GiB"), "{pretty}");

    // A reservation no node could hold is refused at once.
    let out = lab.run(&[
        "exec",
        "node1",
        "--",
        "shoal",
        "service",
        "create",
        "--name",
        "huge",
        "--reserve-cpu",
        "2",
        "--",
        "sleep",
        "100000",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("no node can hold its reservation"),
        "{stderr}"
    );

    // 0.6 CPUs each: one task per node, whatever the spread would say.
    lab.create_service(
        "big",
        &["--replicas", "2", "--reserve-cpu", "0.6"],
        &["sleep", "100000"],
    );
    let placed = lab.running_tasks("big", 2);
    assert_ne!(placed[0].node, placed[1].node, "{placed:?}");

    // Nothing has 0.6 CPUs left: Pending, with Swarm's reason.
    lab.create_service("more", &["--reserve-cpu", "0.6"], &["sleep", "100000"]);
    let pending = wait_for(
        "a pending task with the reason",
        Duration::from_secs(30),
        || {
            tasks(&lab, "more").into_iter().find(|t| {
                t["state"] == "pending"
                    && t["message"] == "no suitable node (insufficient resources on 2 nodes)"
            })
        },
    );
    assert!(
        pending["node"].as_str().unwrap_or_default().is_empty(),
        "{pending}"
    );
    let table = lab.exec("node1", &["shoal", "service", "ps", "more"]);
    assert!(
        table.contains("insufficient resources on 2 nodes"),
        "{table}"
    );

    // Capacity frees: it starts.
    lab.exec("node1", &["shoal", "service", "rm", "big"]);
    lab.running_tasks("more", 1);

    // Limits and reservations are part of the task template: an update rolls the tasks.
    lab.exec(
        "node1",
        &[
            "shoal",
            "service",
            "update",
            "--limit-memory",
            "256M",
            "more",
        ],
    );
    let view = lab.node_json("node1", &["service", "inspect", "more"]);
    assert_eq!(view["version"], 2, "{view}");
    assert_eq!(
        view["containment"]["limits"]["memory_bytes"],
        256u64 << 20,
        "{view}"
    );
    assert_eq!(
        view["containment"]["reservations"]["nano_cpus"], 600_000_000u64,
        "{view}"
    );
    wait_for("the updated task running", Duration::from_secs(30), || {
        tasks(&lab, "more")
            .into_iter()
            .find(|t| t["state"] == "running" && t["service_version"] == 2)
    });
    let pretty = lab.exec(
        "node1",
        &["shoal", "service", "inspect", "more", "--pretty"],
    );
    assert!(pretty.contains("Limits:         memory 256MiB"), "{pretty}");
    assert!(pretty.contains("Reservations:   CPUs 0.6"), "{pretty}");
    lab.down_clean();
}
