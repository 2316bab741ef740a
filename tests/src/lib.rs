//! Helpers for end-to-end tests: run the real `shoal` binary, bring labs up and always down,
//! and look for anything a lab left behind.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod scale;

/// The `shoal` binary under test: `SHOAL_BIN`, else the workspace's release build.
pub fn shoal_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("SHOAL_BIN") {
        return bin.into();
    }
    let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/shoal");
    assert!(
        bin.exists(),
        "{} is missing: build it first (scripts/dev.sh test does)",
        bin.display()
    );
    bin
}

/// Where the cgroup v2 hierarchy is mounted (labs and tasks live under it).
pub fn cgroup2_mount() -> PathBuf {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .find(|l| l.contains(" - cgroup2 "))
        .and_then(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .expect("a cgroup2 mount")
}

/// Tests that make namespaces or load eBPF need root. They fail, never skip, without it.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this end-to-end test needs root (namespaces, eBPF): run scripts/dev.sh test as root"
    );
}

/// A benchmark's outside tools must be installed (`scripts/setup.sh bench` does it).
pub fn require_tools(tools: &[&str]) {
    for tool in tools {
        assert!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "{tool} is missing: run scripts/setup.sh bench"
        );
    }
}

/// Runs `shoal ARGS` and returns its output, whatever the exit status.
pub fn shoal(args: &[&str]) -> Output {
    Command::new(shoal_bin())
        .args(args)
        .env_remove("SHOAL_SOCKET")
        .env_remove("SHOAL_LAB")
        .output()
        .expect("running shoal")
}

/// Runs `shoal ARGS`, panicking with its stderr unless it succeeds; returns stdout.
pub fn shoal_ok(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(
        out.status.success(),
        "shoal {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// A running task as `service ps` shows it.
#[derive(Clone, Debug)]
pub struct RunningTask {
    pub node: String,
    /// Full name (`web.1.<id>`), as `task exec` takes it.
    pub name: String,
    /// Network name -> address.
    pub addresses: std::collections::BTreeMap<String, String>,
}

impl RunningTask {
    fn from_json(task: &Value) -> Self {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        Self {
            node: text(&task["node"]),
            name: format!("{}.{}", text(&task["name"]), text(&task["id"])),
            addresses: task["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|a| (text(&a[0]), text(&a[1])))
                .collect(),
        }
    }
}

/// A lab that exists for one test and is removed when the test ends, pass or fail.
pub struct TestLab {
    pub name: String,
}

impl TestLab {
    /// Brings up `nodes` nodes in a lab named after the test (labs of different tests coexist).
    pub fn up(name: &str, nodes: u8) -> Self {
        Self::up_with(name, nodes, &[])
    }

    /// As `up`, with more `lab up` options.
    pub fn up_with(name: &str, nodes: u8, options: &[&str]) -> Self {
        require_root();
        let lab = Self::named(name);
        // A previous run killed mid-way may have left this lab behind.
        lab.run(&["down"]);
        let nodes = nodes.to_string();
        let mut args = vec!["up", "--nodes", &nodes];
        args.extend_from_slice(options);
        lab.ok(&args);
        lab
    }

    /// The path of a member's (`nodeN`, `client`) network namespace.
    pub fn netns_path(&self, member: &str) -> PathBuf {
        PathBuf::from(format!("/run/netns/shoal-{}-{member}", self.name))
    }

    /// A handle on a lab without bringing it up. `SHOAL_LAB_PREFIX` (a few characters) is put
    /// in front of the name, so two checkouts can run their suites on one machine at once.
    pub fn named(name: &str) -> Self {
        let prefix = std::env::var("SHOAL_LAB_PREFIX").unwrap_or_default();
        Self {
            name: format!("{prefix}{name}"),
        }
    }

    fn args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        let mut all = vec!["lab", "--name", &self.name];
        all.extend_from_slice(args);
        all
    }

    pub fn run(&self, args: &[&str]) -> Output {
        shoal(&self.args(args))
    }

    pub fn ok(&self, args: &[&str]) -> String {
        shoal_ok(&self.args(args))
    }

    /// `shoal lab exec MEMBER -- CMD...`, which must succeed; returns stdout.
    pub fn exec(&self, member: &str, command: &[&str]) -> String {
        let mut args = vec!["exec", member, "--"];
        args.extend_from_slice(command);
        self.ok(&args)
    }

    /// `shoal --format json` of a command run on a node against its own agent.
    pub fn node_json(&self, node: &str, command: &[&str]) -> Value {
        let mut args = vec!["shoal"];
        args.extend_from_slice(command);
        args.extend_from_slice(&["--format", "json"]);
        serde_json::from_str(&self.exec(node, &args)).expect("JSON output")
    }

    /// `shoal ARGS --format json` on a node, or None if it fails.
    pub fn try_json(&self, node: &str, command: &[&str]) -> Option<Value> {
        let mut args = vec!["exec", node, "--", "shoal"];
        args.extend_from_slice(command);
        args.extend_from_slice(&["--format", "json"]);
        let out = self.run(&args);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("JSON"))
    }

    /// The running tasks of a service once there are `replicas` of them (30 s at most).
    pub fn running_tasks(&self, service: &str, replicas: usize) -> Vec<RunningTask> {
        self.running_tasks_within(service, replicas, Duration::from_secs(30))
    }

    /// As `running_tasks`, waiting at most `limit`.
    pub fn running_tasks_within(
        &self,
        service: &str,
        replicas: usize,
        limit: Duration,
    ) -> Vec<RunningTask> {
        wait_for(
            &format!("{replicas} running tasks of {service}"),
            limit,
            || {
                let tasks = self.try_json("node1", &["service", "ps", service])?;
                let running: Vec<RunningTask> = tasks
                    .as_array()?
                    .iter()
                    .filter(|t| t["desired"] == "running" && t["state"] == "running")
                    .map(RunningTask::from_json)
                    .collect();
                (running.len() == replicas).then_some(running)
            },
        )
    }

    /// `shoal service create --detach --name NAME [OPTIONS...] -- COMMAND...` on node1.
    pub fn create_service(&self, name: &str, options: &[&str], command: &[&str]) {
        let mut args = vec!["shoal", "service", "create", "--detach", "--name", name];
        args.extend_from_slice(options);
        args.push("--");
        args.extend_from_slice(command);
        self.exec("node1", &args);
    }

    /// `curl -s --max-time SECONDS URL` from the client namespace: the body, if it answered.
    pub fn client_get(&self, url: &str, seconds: u32) -> Option<String> {
        let seconds = seconds.to_string();
        let out = self.run(&[
            "exec",
            "client",
            "--",
            "curl",
            "-s",
            "--max-time",
            &seconds,
            url,
        ]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The backend addresses a node's kernel maps hold for a published port
    /// (`shoal ingress ls`), or None while the node does not publish it.
    pub fn port_backends(&self, node: &str, published: u16) -> Option<Vec<String>> {
        let ports = self.try_json(node, &["ingress", "ls"])?;
        let entry = ports
            .as_array()?
            .iter()
            .find(|p| p["published"] == published)?;
        // Each backend is `[IP, slots]`.
        entry["backends"]
            .as_array()?
            .iter()
            .map(|b| b[0].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits (30 s at most) until every one of `nodes` routes a published port to `count`
    /// backends: the managers' view of running tasks reaches each node a moment later.
    pub fn wait_port_backends(&self, nodes: &[&str], published: u16, count: usize) {
        for node in nodes {
            wait_for(
                &format!("{count} backends of port {published} on {node}"),
                Duration::from_secs(30),
                || (self.port_backends(node, published)?.len() == count).then_some(()),
            );
        }
    }

    /// Runs a command inside a task, through `shoal task exec` on the task's node.
    pub fn in_task(&self, task: &RunningTask, command: &[&str]) -> Output {
        let mut args = vec![
            "exec", &task.node, "--", "shoal", "task", "exec", &task.name, "--",
        ];
        args.extend_from_slice(command);
        self.run(&args)
    }

    pub fn run_dir(&self) -> PathBuf {
        PathBuf::from("/run/shoal-lab").join(&self.name)
    }

    /// Everything of this lab still on the machine: namespaces, pins, cgroups, state and
    /// processes. Empty after a clean `lab down`.
    pub fn leftovers(&self) -> Vec<String> {
        let prefix = format!("shoal-{}-", self.name);
        let mut left: Vec<String> = fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .map(|n| format!("namespace {n}"))
            .collect();
        let cgroup2 = cgroup2_mount();
        for path in [
            PathBuf::from(format!("/sys/fs/bpf/shoal-{}", self.name)),
            cgroup2.join(format!("shoal-{}", self.name)),
            self.run_dir(),
        ] {
            if path.exists() {
                left.push(path.display().to_string());
            }
        }
        let marker = self.run_dir().into_os_string().into_encoded_bytes();
        for entry in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            if cmdline
                .windows(marker.len())
                .any(|w| w == marker.as_slice())
                && !cmdline.starts_with(b"cargo")
            {
                left.push(format!(
                    "process {}: {}",
                    entry.file_name().to_string_lossy(),
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                ));
            }
        }
        left
    }

    /// Takes the lab down and asserts nothing is left.
    pub fn down_clean(&self) {
        self.ok(&["down"]);
        let left = self.leftovers();
        assert!(left.is_empty(), "lab down left behind: {left:#?}");
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let out = self.run(&["down"]);
        if !out.status.success() {
            eprintln!(
                "cleanup of lab {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Packets counted by the node's ingress classifier for one verdict.
pub fn verdict_packets(status: &Value, verdict: &str) -> u64 {
    status["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .find(|c| c["verdict"] == verdict)
        .and_then(|c| c["packets"].as_u64())
        .unwrap_or_else(|| panic!("no {verdict} counter in {status}"))
}

/// Polls `check` every 200 ms until it returns Some, or panics after `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
