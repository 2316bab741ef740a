//! `shoal lab`: several nodes on one machine. Each node is a network namespace on an underlay
//! bridge (itself in a namespace of its own, so nothing touches the host's network), running a
//! real `shoal agent` with its own state dir, socket, bpffs root and cgroup. A `client`
//! namespace sits on the same underlay.
//!
//! Everything the lab makes is named after the lab, so `lab down` finds it by name (not from a
//! record that a crash could leave stale): namespaces `shoal-<lab>-*`, the cgroup
//! `shoal-<lab>`, the pin dir `/sys/fs/bpf/shoal-<lab>` and the run dir
//! `/run/shoal-lab/<lab>`.

use std::{
    fs::{self, File, OpenOptions},
    io,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use nix::{sys::signal::Signal, unistd::Pid};
use serde::{Deserialize, Serialize};
use shoal_dataplane::process::cgroup_gone;

use shoal_cluster::protocol::NodeView;

use crate::{
    client::Client,
    config::{cgroup2_from_mountinfo, AgentSettings},
    server::AgentInfo,
};

const NETNS_DIR: &str = "/run/netns";
const RUN_ROOT: &str = "/run/shoal-lab";
const UNDERLAY: &str = "underlay";
const CLIENT: &str = "client";
pub const MAX_NODES: u8 = 50;
const AGENT_READY_TIMEOUT: Duration = Duration::from_secs(30);
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Workers joining the swarm at once in `lab up`.
const PARALLEL_JOINS: usize = 8;
/// How long `lab up` waits for its managers to show Reachable after they joined.
const MANAGERS_REACHABLE_TIMEOUT: Duration = Duration::from_secs(30);

/// One lab, by name; every path and name derives from it.
pub struct Lab {
    name: String,
}

/// A node or the client, as `lab status` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Member {
    pub name: String,
    pub address: String,
    pub netns: String,
    /// Unset for the client, which runs no agent.
    pub socket: Option<PathBuf>,
    pub agent_pid: Option<u32>,
    pub agent_up: bool,
    /// manager or worker, once the node is in the swarm.
    pub role: Option<String>,
}

/// How `lab stop` takes a node down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM to the agent.
    Agent,
    /// SIGKILL to the agent, as in a crash.
    KillAgent,
    /// The whole node, as a power-off: its underlay link down (its kernel answers nothing any
    /// more), then SIGKILL to every process of it, tasks included.
    PowerOff,
}

/// Settings `lab up` gives every agent.
#[derive(Debug, Default)]
pub struct AgentOptions {
    /// Replace the host's resolvers, when given.
    pub dns_upstreams: Vec<std::net::SocketAddr>,
    /// Seconds a node may be Down before the managers move its tasks (the agent's default
    /// when unset).
    pub reschedule_grace: Option<u64>,
    /// CPUs and memory each node reports (the agent settings `node_cpus`, `node_memory`):
    /// the lab's nodes share one host, so tests of reservations set them.
    pub node_cpus: Option<String>,
    pub node_memory: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct LabRecord {
    nodes: u8,
}

pub fn node_name(index: u8) -> String {
    format!("node{index}")
}

/// Underlay address: nodes at .11, .12, …; the client at .100.
fn underlay_address(member: &str) -> Result<String> {
    let host = match member {
        CLIENT => 100,
        _ => {
            let index: u8 = member
                .strip_prefix("node")
                .and_then(|n| n.parse().ok())
                .filter(|n| (1..=MAX_NODES).contains(n))
                .with_context(|| format!("no lab member named {member:?} (nodeN or client)"))?;
            10 + index
        }
    };
    Ok(format!("192.168.77.{host}"))
}

impl Lab {
    pub fn new(name: &str) -> Result<Self> {
        let valid = !name.is_empty()
            && name.len() <= 16
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            bail!("lab name {name:?} must be 1-16 characters of a-z, 0-9 and -");
        }
        Ok(Self {
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn netns(&self, member: &str) -> String {
        format!("shoal-{}-{member}", self.name)
    }

    fn run_dir(&self) -> PathBuf {
        Path::new(RUN_ROOT).join(&self.name)
    }

    fn node_dir(&self, node: &str) -> PathBuf {
        self.run_dir().join(node)
    }

    pub fn socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("shoal.sock")
    }

    fn bpffs_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/shoal-{}", self.name))
    }

    fn cgroup_dir(&self) -> Result<PathBuf> {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo")?;
        let mount = cgroup2_from_mountinfo(&mountinfo).context("no cgroup v2 hierarchy mounted")?;
        Ok(mount.join(format!("shoal-{}", self.name)))
    }

    /// Whether a namespace is one of this lab's members: exactly, so that lab "a" does not
    /// claim the namespaces of lab "a-b".
    fn owns_netns(&self, name: &str) -> bool {
        name.strip_prefix(&self.netns("")).is_some_and(|member| {
            // A node agent's overlay namespaces are `<node namespace>.ov-<network>`.
            let member = member.split_once('.').map_or(member, |(node, _)| node);
            member == UNDERLAY
                || member == CLIENT
                || member
                    .strip_prefix("node")
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    }

    /// Lab namespaces that exist now.
    fn namespaces(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        match fs::read_dir(NETNS_DIR) {
            Ok(entries) => {
                for entry in entries {
                    let name = entry?.file_name().to_string_lossy().into_owned();
                    if self.owns_netns(&name) {
                        found.push(name);
                    }
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).context("listing network namespaces"),
        }
        found.sort();
        Ok(found)
    }

    pub fn exists(&self) -> Result<bool> {
        Ok(self.run_dir().exists()
            || self.bpffs_dir().exists()
            || self.cgroup_dir()?.exists()
            || !self.namespaces()?.is_empty())
    }

    pub fn down_hint(&self) -> String {
        match self.name.as_str() {
            "lab" => "shoal lab down".to_owned(),
            name => format!("shoal lab --name {name} down"),
        }
    }

    fn node_count(&self) -> Result<u8> {
        let path = self.run_dir().join("lab.json");
        let text = fs::read_to_string(&path)
            .with_context(|| format!("lab {:?} is not up (no {})", self.name, path.display()))?;
        let record: LabRecord =
            serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))?;
        Ok(record.nodes)
    }

    fn check_node(&self, node: &str) -> Result<()> {
        let nodes = self.node_count()?;
        if !(1..=nodes).map(node_name).any(|n| n == node) {
            bail!(
                "lab {:?} has no node {node:?} (node1..node{nodes})",
                self.name
            );
        }
        Ok(())
    }

    /// Builds the lab, every agent set up with `agents`.
    pub fn up(&self, nodes: u8, managers: u8, agents: &AgentOptions) -> Result<Vec<Member>> {
        if !(1..=MAX_NODES).contains(&nodes) {
            bail!("--nodes must be between 1 and {MAX_NODES}");
        }
        if !(1..=nodes).contains(&managers) {
            bail!("--managers must be between 1 and the number of nodes ({nodes})");
        }
        if self.exists()? {
            bail!(
                "lab {:?} already exists (or a crashed one left pieces); remove it with `{}`",
                self.name,
                self.down_hint()
            );
        }
        fs::create_dir_all(self.run_dir())?;
        fs::write(
            self.run_dir().join("lab.json"),
            serde_json::to_string(&LabRecord { nodes })?,
        )?;
        if let Err(err) = self
            .build(nodes, agents)
            .and_then(|()| self.form_swarm(nodes, managers))
        {
            eprintln!("lab up failed; removing what it made");
            if let Err(cleanup) = self.down() {
                eprintln!("cleanup also failed: {cleanup:#}");
            }
            return Err(err);
        }
        self.status()
    }

    fn build(&self, nodes: u8, options: &AgentOptions) -> Result<()> {
        let underlay = self.netns(UNDERLAY);
        ip(&["netns", "add", &underlay])?;
        ip(&["-n", &underlay, "link", "set", "lo", "up"])?;
        ip(&["-n", &underlay, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &underlay, "link", "set", "br0", "up"])?;
        let names: Vec<String> = (1..=nodes).map(node_name).collect();
        for member in names.iter().map(String::as_str).chain([CLIENT]) {
            self.add_member(member)?;
        }

        let cgroup = self.cgroup_dir()?;
        let mut agents = Vec::new();
        for node in &names {
            let dir = self.node_dir(node);
            fs::create_dir_all(&dir)?;
            for sub in ["agent", "tasks"] {
                fs::create_dir_all(cgroup.join(node).join(sub))?;
            }
            let settings = AgentSettings {
                hostname: Some(node.clone()),
                state_dir: Some(dir.join("state")),
                socket: Some(self.socket(node)),
                advertise_addr: Some(underlay_address(node)?.parse()?),
                advertise_interface: Some("eth0".into()),
                bpffs_root: Some(self.bpffs_dir().join(node)),
                cgroup_root: Some(cgroup.join(node).join("tasks")),
                netns_prefix: Some(format!("{}.", self.netns(node))),
                dns_upstreams: (!options.dns_upstreams.is_empty())
                    .then(|| options.dns_upstreams.clone()),
                reschedule_grace: options.reschedule_grace,
                node_cpus: options.node_cpus.clone(),
                node_memory: options.node_memory.clone(),
                ..Default::default()
            };
            fs::write(dir.join("agent.toml"), toml::to_string(&settings)?)?;
            agents.push((node, self.spawn_agent(node)?));
        }
        for (node, child) in &mut agents {
            self.wait_ready(node, child)?;
        }
        Ok(())
    }

    /// node1 inits the swarm; the next `managers - 1` nodes join as managers, the rest as
    /// workers, each through node1, with the tokens node1 hands out.
    fn form_swarm(&self, nodes: u8, managers: u8) -> Result<()> {
        self.shoal_on("node1", &["swarm", "init"])?;
        let token = |role: &str| -> Result<String> {
            Ok(self
                .shoal_on("node1", &["swarm", "join-token", "-q", role])?
                .trim()
                .to_owned())
        };
        let (manager_token, worker_token) = (token("manager")?, token("worker")?);
        let remote = format!("{}:2377", underlay_address("node1")?);
        let join = |index: u8, token: &str| {
            self.shoal_on(
                &node_name(index),
                &["swarm", "join", "--token", token, &remote],
            )
            .map(drop)
        };
        // Managers one at a time (each changes the Raft membership); workers a batch at a
        // time, which the leader's log takes together.
        for index in 2..=managers {
            join(index, &manager_token)?;
        }
        let workers: Vec<u8> = (managers.max(1) + 1..=nodes).collect();
        for batch in workers.chunks(PARALLEL_JOINS) {
            thread::scope(|scope| {
                let joins: Vec<_> = batch
                    .iter()
                    .map(|index| scope.spawn(|| join(*index, &worker_token)))
                    .collect();
                joins
                    .into_iter()
                    .try_for_each(|j| j.join().expect("a join thread panicked"))
            })?;
        }
        self.wait_managers_reachable(managers)
    }

    /// Waits until `node ls` shows each of the first `managers` nodes as Leader or Reachable:
    /// only then does the swarm survive losing any one of them.
    fn wait_managers_reachable(&self, managers: u8) -> Result<()> {
        let deadline = Instant::now() + MANAGERS_REACHABLE_TIMEOUT;
        loop {
            let missing = match self.managers_not_reachable(managers) {
                Ok(missing) if missing.is_empty() => return Ok(()),
                Ok(missing) => missing.join(", "),
                Err(err) => format!("`node ls` failed: {err:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "managers not Reachable in `node ls` after {} s: {missing}; their agents \
                     log why in {}",
                    MANAGERS_REACHABLE_TIMEOUT.as_secs(),
                    self.node_dir("NODE").join("agent.log").display()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Which of node1..node`managers` `node ls` on node1 does not show as a voting manager.
    fn managers_not_reachable(&self, managers: u8) -> Result<Vec<String>> {
        let listing = self.shoal_on("node1", &["node", "ls", "--format", "json"])?;
        let nodes: Vec<NodeView> = serde_json::from_str(&listing)?;
        let voting = |name: &str| {
            nodes.iter().any(|n| {
                n.hostname == name && matches!(n.manager_status.as_str(), "Leader" | "Reachable")
            })
        };
        Ok((1..=managers)
            .map(node_name)
            .filter(|name| !voting(name))
            .collect())
    }

    /// Runs this `shoal` binary as a client of a node's agent; its stdout.
    fn shoal_on(&self, node: &str, args: &[&str]) -> Result<String> {
        let output = Command::new(std::env::current_exe()?)
            .args(args)
            .env("SHOAL_SOCKET", self.socket(node))
            .output()?;
        if !output.status.success() {
            bail!(
                "shoal {} on {node}: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn add_member(&self, member: &str) -> Result<()> {
        let underlay = self.netns(UNDERLAY);
        let netns = self.netns(member);
        ip(&["netns", "add", &netns])?;
        ip(&[
            "-n", &underlay, "link", "add", member, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ])?;
        ip(&[
            "-n", &underlay, "link", "set", member, "master", "br0", "up",
        ])?;
        let address = format!("{}/24", underlay_address(member)?);
        ip(&["-n", &netns, "addr", "add", &address, "dev", "eth0"])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &netns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Starts `shoal agent` in the node's namespace and cgroup, detached from this process.
    fn spawn_agent(&self, node: &str) -> Result<Child> {
        let dir = self.node_dir(node);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))?;
        let mut command = Command::new(std::env::current_exe()?);
        command
            .arg("agent")
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        enter_netns(&mut command, &self.netns(node))?;
        shoal_dataplane::process::detach_into_cgroup(
            &mut command,
            &self.cgroup_dir()?.join(node).join("agent"),
        )?;
        let child = command
            .spawn()
            .with_context(|| format!("starting the agent of {node}"))?;
        fs::write(dir.join("agent.pid"), child.id().to_string())?;
        Ok(child)
    }

    fn wait_ready(&self, node: &str, child: &mut Child) -> Result<()> {
        let client = Client::new(self.socket(node));
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + AGENT_READY_TIMEOUT;
        loop {
            if runtime
                .block_on(client.get::<AgentInfo>("/v1/info"))
                .is_ok()
            {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "the agent of {node} exited ({status}); its log ends with:\n{}",
                    self.log_tail(node)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent of {node} did not answer within {AGENT_READY_TIMEOUT:?}; its log ends with:\n{}",
                    self.log_tail(node)
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Processes of the tasks a node's agent runs now.
    pub fn task_pids(&self, node: &str) -> Result<Vec<i32>> {
        self.check_node(node)?;
        cgroup_pids(&self.cgroup_dir()?.join(node).join("tasks"))
    }

    fn log_tail(&self, node: &str) -> String {
        let log = fs::read_to_string(self.node_dir(node).join("agent.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }

    fn agent_pid(&self, node: &str) -> Option<u32> {
        let pid: u32 = fs::read_to_string(self.node_dir(node).join("agent.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        // A pid file can outlive its process, and the pid can be reused: check it is our agent.
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let config = self.node_dir(node).join("agent.toml");
        cmdline
            .split(|b| *b == 0)
            .any(|arg| arg == config.as_os_str().as_encoded_bytes())
            .then_some(pid)
    }

    pub fn status(&self) -> Result<Vec<Member>> {
        let nodes = self.node_count()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut members = Vec::new();
        for node in (1..=nodes).map(node_name) {
            let socket = self.socket(&node);
            let info = runtime
                .block_on(Client::new(socket.clone()).get::<AgentInfo>("/v1/info"))
                .ok();
            let agent_up = info.is_some();
            let role = info
                .and_then(|i| i.swarm)
                .map(|s| if s.manager { "manager" } else { "worker" }.to_owned());
            members.push(Member {
                role,
                address: underlay_address(&node)?,
                netns: self.netns(&node),
                socket: Some(socket),
                agent_pid: self.agent_pid(&node),
                agent_up,
                name: node,
            });
        }
        members.push(Member {
            name: CLIENT.into(),
            address: underlay_address(CLIENT)?,
            netns: self.netns(CLIENT),
            socket: None,
            agent_pid: None,
            agent_up: false,
            role: None,
        });
        Ok(members)
    }

    /// Runs a command in a member's namespace, with SHOAL_SOCKET set to a node's agent.
    pub fn exec(&self, member: &str, argv: &[String]) -> Result<ExitStatus> {
        let Some((program, args)) = argv.split_first() else {
            bail!("nothing to run: give a command after --");
        };
        if member == CLIENT {
            self.node_count()?;
        } else {
            self.check_node(member)?;
        }
        let mut command = Command::new(program);
        command.args(args);
        // `shoal` inside the lab is this very binary, installed or not.
        let exe_dir = std::env::current_exe()?
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let path = std::env::var_os("PATH").unwrap_or_default();
        command.env(
            "PATH",
            std::env::join_paths(std::iter::once(exe_dir).chain(std::env::split_paths(&path)))?,
        );
        if member != CLIENT {
            command.env("SHOAL_SOCKET", self.socket(member));
        }
        enter_netns(&mut command, &self.netns(member))?;
        command
            .status()
            .with_context(|| format!("running {program} in {member}"))
    }

    /// Takes a node's agent, or the whole node, down and waits for it to go.
    pub fn stop(&self, node: &str, how: Stop) -> Result<()> {
        self.check_node(node)?;
        match how {
            Stop::Agent => self.stop_agent(node, Signal::SIGTERM),
            Stop::KillAgent => self.stop_agent(node, Signal::SIGKILL),
            Stop::PowerOff => self.power_off(node),
        }
    }

    fn stop_agent(&self, node: &str, signal: Signal) -> Result<()> {
        let pid = self
            .agent_pid(node)
            .with_context(|| format!("the agent of {node} is not running"))?;
        nix::sys::signal::kill(Pid::from_raw(pid as i32), signal)?;
        let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
        while Path::new(&format!("/proc/{pid}")).exists() && !is_zombie(pid) {
            if Instant::now() > deadline {
                bail!("the agent of {node} (pid {pid}) did not stop within {AGENT_STOP_TIMEOUT:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Unplugs the node from the underlay first, so that nothing it does while dying is
    /// seen, then kills everything it runs: its cgroup (agent and tasks) and anything else in
    /// its namespaces (`lab exec`).
    fn power_off(&self, node: &str) -> Result<()> {
        ip(&["-n", &self.netns(UNDERLAY), "link", "set", node, "down"])?;
        kill_cgroup(&self.cgroup_dir()?.join(node))?;
        let own = self.netns(node);
        let namespaces: Vec<String> = self
            .namespaces()?
            .into_iter()
            .filter(|ns| ns == &own || ns.starts_with(&format!("{own}.")))
            .collect();
        kill_processes_in(&namespaces)?;
        Ok(())
    }

    /// Starts a node's agent again; after a power-off, plugs the node back in first.
    pub fn start(&self, node: &str) -> Result<()> {
        self.check_node(node)?;
        if let Some(pid) = self.agent_pid(node) {
            bail!("the agent of {node} is already running (pid {pid})");
        }
        ip(&["-n", &self.netns(UNDERLAY), "link", "set", node, "up"])?;
        let mut child = self.spawn_agent(node)?;
        self.wait_ready(node, &mut child)
    }

    /// Removes everything the lab made, whatever state a crash left it in. Returns what it
    /// removed, for the user.
    pub fn down(&self) -> Result<Vec<String>> {
        let mut removed = Vec::new();
        let cgroup = self.cgroup_dir()?;

        // 1. Processes: politely, then by force; agents and tasks live in the lab's cgroup,
        //    anything else (a `lab exec` left running) is found by its network namespace.
        //    Agents remove overlay namespaces as their tasks end, so namespaces are listed
        //    once they are all stopped.
        let stopped = stop_cgroup(&cgroup)?;
        let namespaces = self.namespaces()?;
        let stray = kill_processes_in(&namespaces)?;
        if stopped + stray > 0 {
            removed.push(format!("{} processes", stopped + stray));
        }
        // 2. Namespaces: their links go with them.
        for netns in &namespaces {
            if let Err(err) = ip(&["netns", "del", netns]) {
                if Path::new(NETNS_DIR).join(netns).exists() {
                    return Err(err);
                }
            }
        }
        if !namespaces.is_empty() {
            removed.push(format!("{} namespaces", namespaces.len()));
        }
        // 3. Pins: unpinning the links detaches the programs; maps go with their last user.
        if self.bpffs_dir().exists() {
            shoal_dataplane::remove_pins(&self.bpffs_dir())?;
            removed.push(format!("pins under {}", self.bpffs_dir().display()));
        }
        // 4. cgroups, deepest first.
        // On a hybrid host, task limits also made cgroups in the v1 hierarchies.
        for mirror in shoal_dataplane::limits::v1_mirrors(&cgroup) {
            remove_cgroup_tree(&mirror)?;
        }
        if cgroup.exists() {
            remove_cgroup_tree(&cgroup)?;
            removed.push(format!("cgroup {}", cgroup.display()));
        }
        // 5. State, sockets and logs.
        if self.run_dir().exists() {
            fs::remove_dir_all(self.run_dir())?;
            removed.push(format!("state under {}", self.run_dir().display()));
        }
        // The shared parent goes with the last lab (fails harmlessly while others remain).
        let _ = fs::remove_dir(RUN_ROOT);
        Ok(removed)
    }
}

/// Makes `command` run in the named network namespace. The namespace is opened here, before
/// the fork, so the child only calls setns.
fn enter_netns(command: &mut Command, netns: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(netns);
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns is async-signal-safe; the fd stays open in the closure until exec, and it
    // is close-on-exec so the command does not inherit it.
    unsafe {
        command.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2); run scripts/setup.sh")?;
    if !output.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Every pid in a cgroup subtree. Cgroups may vanish while we walk (an agent removing a
/// finished task's): those are skipped, also while they are half gone (ENODEV).
fn cgroup_pids(dir: &Path) -> Result<Vec<i32>> {
    let mut pids = Vec::new();
    let procs = match fs::read_to_string(dir.join("cgroup.procs")) {
        Ok(procs) => procs,
        Err(err) if cgroup_gone(&err) => return Ok(pids),
        Err(err) => return Err(err).with_context(|| format!("reading {}", dir.display())),
    };
    pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    for entry in read_dir_if_present(dir)? {
        if entry.file_type()?.is_dir() {
            pids.extend(cgroup_pids(&entry.path())?);
        }
    }
    Ok(pids)
}

/// Directory entries, or none if the directory is already gone.
fn read_dir_if_present(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut present = Vec::new();
            for entry in entries {
                match entry {
                    Ok(entry) => present.push(entry),
                    Err(err) if cgroup_gone(&err) => break,
                    Err(err) => {
                        return Err(err).with_context(|| format!("listing {}", dir.display()))
                    }
                }
            }
            Ok(present)
        }
        Err(err) if cgroup_gone(&err) => Ok(Vec::new()),
        Err(err) => Err(err).with_context(|| format!("listing {}", dir.display())),
    }
}

/// SIGTERM to every process in the subtree, SIGKILL to what is left after a grace period.
/// Returns how many processes there were.
fn stop_cgroup(dir: &Path) -> Result<usize> {
    let pids = cgroup_pids(dir)?;
    for pid in &pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cgroup_pids(dir)?.is_empty() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    kill_cgroup(dir)?;
    Ok(pids.len())
}

/// SIGKILL to every process in the subtree until none is left (a process may fork while it
/// is being killed).
fn kill_cgroup(dir: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = cgroup_pids(dir)?;
        if pids.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes in {} survived SIGKILL", dir.display());
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// SIGKILLs processes (outside the lab's cgroup) whose network namespace is one of the lab's.
fn kill_processes_in(namespaces: &[String]) -> Result<usize> {
    use std::os::unix::fs::MetadataExt as _;
    let mut inodes = Vec::new();
    for netns in namespaces {
        match fs::metadata(Path::new(NETNS_DIR).join(netns)) {
            Ok(meta) => inodes.push(format!("net:[{}]", meta.ino())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("reading namespace {netns}")),
        }
    }
    let mut killed = 0;
    for entry in fs::read_dir("/proc")? {
        let name = entry?.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        if pid == std::process::id() as i32 {
            continue;
        }
        let Ok(link) = fs::read_link(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if inodes.iter().any(|i| link.as_os_str() == i.as_str()) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed += 1;
        }
    }
    Ok(killed)
}

fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    for entry in read_dir_if_present(dir)? {
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(err) if cgroup_gone(&err) => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing cgroup {}", dir.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_the_spec() {
        assert_eq!(underlay_address("node1").unwrap(), "192.168.77.11");
        assert_eq!(underlay_address("node12").unwrap(), "192.168.77.22");
        assert_eq!(underlay_address("client").unwrap(), "192.168.77.100");
        assert!(underlay_address("node0").is_err());
        assert!(underlay_address("node51").is_err());
        assert!(underlay_address("web").is_err());
    }

    #[test]
    fn lab_names_are_checked() {
        assert!(Lab::new("lab").is_ok());
        assert!(Lab::new("t-42").is_ok());
        for bad in ["", "Lab", "a/b", "a b", "seventeen-chars-x"] {
            assert!(Lab::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Lab::new("lab").unwrap().netns("node1"), "shoal-lab-node1");
    }

    #[test]
    fn a_lab_owns_only_its_own_namespaces() {
        let a = Lab::new("a").unwrap();
        for ours in [
            "shoal-a-node1",
            "shoal-a-node12",
            "shoal-a-client",
            "shoal-a-underlay",
            "shoal-a-node2.ov-4j2k9x",
        ] {
            assert!(a.owns_netns(ours), "{ours}");
        }
        for theirs in [
            "shoal-a-b-node1",
            "shoal-a-b-client",
            "shoal-a-node",
            "shoal-a-nodex",
            "shoal-ab-node1",
            "other",
        ] {
            assert!(!a.owns_netns(theirs), "{theirs}");
        }
    }
}
