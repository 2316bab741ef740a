//! The agent programs the kernel over netlink, in process: while a 30-replica service on an
//! overlay network with a published port is created, scaled to 60 and removed on a 2-node lab,
//! no agent spawns `ip`, `bridge`, `sysctl` or `nsenter` (traced with `strace -f`), and the
//! gateway bridge keeps one MAC while task veths come and go. Needs root and strace.

use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use shoal_tests::{require_tools, wait_for, TestLab};

/// `strace -f` on one agent, writing every execve of its process tree to a file.
struct Tracer {
    child: Child,
    output: PathBuf,
}

impl Tracer {
    fn attach(pid: u32, output: PathBuf) -> Self {
        let child = Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-e",
                "trace=execve",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&output)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("strace");
        // Traced once the kernel shows a tracer on the agent's main thread.
        wait_for("strace to attach", Duration::from_secs(10), || {
            let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            status
                .lines()
                .find(|l| l.starts_with("TracerPid:"))
                .filter(|l| l.split_whitespace().nth(1) != Some("0"))
                .map(drop)
        });
        Self { child, output }
    }

    /// Stops tracing and counts the programs executed, by file name.
    fn finish(mut self) -> BTreeMap<String, usize> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        let mut counts = BTreeMap::new();
        // `1234  execve("/usr/sbin/ip", ["ip", ...], ...) = 0`; with several processes at once
        // strace splits a call into `... <unfinished ...>` and `<... execve resumed>) = 0`.
        // Successful execs only: a PATH search fails on every directory before the right one.
        let mut pending: BTreeMap<String, String> = BTreeMap::new();
        for line in fs::read_to_string(&self.output).unwrap().lines() {
            let pid = line
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            let succeeded = line.trim_end().ends_with("= 0");
            let program = if let Some(rest) = line.split("execve(\"").nth(1) {
                let path = rest.split('"').next().unwrap_or_default();
                let name = path.rsplit('/').next().unwrap_or(path).to_owned();
                if line.contains("<unfinished ...>") {
                    pending.insert(pid, name);
                    continue;
                }
                Some(name)
            } else if line.contains("<... execve resumed>") {
                pending.remove(&pid)
            } else {
                None
            };
            if let (Some(program), true) = (program, succeeded) {
                *counts.entry(program).or_default() += 1;
            }
        }
        counts
    }
}

fn agent_pid(lab: &TestLab, node: &str) -> u32 {
    fs::read_to_string(lab.run_dir().join(node).join("agent.pid"))
        .expect("agent.pid")
        .trim()
        .parse()
        .expect("a PID")
}

/// The gateway bridge's MAC on a node, as the kernel has it now.
fn gateway_mac(lab: &TestLab, node: &str) -> String {
    let out = lab.exec(node, &["ip", "-j", "link", "show", "shoal_gw"]);
    let links: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    links[0]["address"].as_str().expect("a MAC").to_owned()
}

/// Task veths on a node's gateway bridge now (one per task with a way out).
fn gateway_ports(lab: &TestLab, node: &str) -> usize {
    let out = lab.exec(node, &["ip", "-j", "link", "show", "master", "shoal_gw"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn no_iproute_process_and_a_fixed_gateway_mac_through_a_service_lifecycle() {
    require_tools(&["strace"]);
    let lab = TestLab::up("netlink", 2);
    let dir = tempfile::tempdir().unwrap();
    let tracers: Vec<(String, Tracer)> = ["node1", "node2"]
        .into_iter()
        .map(|node| {
            let trace = dir.path().join(format!("{node}.trace"));
            (
                node.to_owned(),
                Tracer::attach(agent_pid(&lab, node), trace),
            )
        })
        .collect();

    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.create_service(
        "web",
        &[
            "--replicas",
            "30",
            "--network",
            "front",
            "--publish",
            "8080:80",
        ],
        &["shoal", "whoami", "--listen", "0.0.0.0:80"],
    );
    lab.running_tasks_within("web", 30, Duration::from_secs(120));
    let mut macs: Vec<(&str, String)> = vec![("30 tasks", gateway_mac(&lab, "node1"))];
    lab.exec(
        "node1",
        &["shoal", "service", "scale", "web=60", "--detach"],
    );
    lab.running_tasks_within("web", 60, Duration::from_secs(180));
    macs.push(("60 tasks", gateway_mac(&lab, "node1")));
    lab.exec("node1", &["shoal", "service", "scale", "web=5", "--detach"]);
    lab.running_tasks_within("web", 5, Duration::from_secs(120));
    macs.push(("5 tasks", gateway_mac(&lab, "node1")));
    lab.exec("node1", &["shoal", "service", "rm", "web"]);
    for node in ["node1", "node2"] {
        wait_for(
            &format!("{node} to detach every task"),
            Duration::from_secs(120),
            || (gateway_ports(&lab, node) == 0).then_some(()),
        );
    }
    macs.push(("no task", gateway_mac(&lab, "node1")));
    lab.exec("node1", &["shoal", "network", "rm", "front"]);

    let mut spawned = Vec::new();
    for (node, tracer) in tracers {
        let counts = tracer.finish();
        eprintln!("{node}'s agent executed: {counts:?}");
        for tool in ["ip", "bridge", "sysctl", "nsenter"] {
            if let Some(n) = counts.get(tool) {
                spawned.push(format!("{node}: {n} × {tool}"));
            }
        }
    }
    eprintln!("node1's gateway bridge MAC: {macs:?}");
    let mac_fixed = macs.iter().all(|(_, mac)| *mac == macs[0].1);
    assert!(
        spawned.is_empty() && mac_fixed,
        "the agents spawned iproute-family processes: {spawned:?}; \
         the gateway bridge's MAC as tasks came and went: {macs:?}"
    );
    lab.down_clean();
}
