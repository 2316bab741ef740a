//! `shoal lab demo`: the Swarm walkthrough, played end to end on a fresh lab and narrated for a
//! newcomer. Each step says in one line what it shows, prints the command as a user would type
//! it, runs exactly that (this binary, through `shoal lab exec`), prints its output, and checks
//! that it behaved: parsed output and JSON listings, polled with bounded waits. The first step
//! that does not behave ends the demo with an error naming it. The lab stays up at the end.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Read as _,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use nix::{sys::signal::Signal, unistd::Pid};
use serde::de::DeserializeOwned;

use shoal_cluster::{
    protocol::{NetworkView, NodeView, ServiceView, TaskView},
    state::{Availability, NodeStatus, TaskState},
};

use crate::lab::{node_name, Lab};

const NODES: u8 = 3;
const CLIENT_IP: &str = "192.168.77.100";
/// What one command may take, unless its step says otherwise.
const COMMAND_LIMIT: Duration = Duration::from_secs(60);
/// How long a step waits for the swarm to get where it should be.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
const POLL_EVERY: Duration = Duration::from_millis(250);

/// One run of a command: how it ended and what it printed.
struct Ran {
    success: bool,
    /// The exit code (128 + N when a signal N ended the command, as a shell says).
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// What the steps learn and later steps use.
#[derive(Default)]
struct Found {
    /// Full task names (`web.1.<id>`) of the running replicas, with their node.
    tasks: BTreeMap<String, String>,
    vip: String,
}

type Step<'a> = fn(&mut Demo<'a>) -> Result<()>;

pub struct Demo<'a> {
    lab: &'a Lab,
    exe: PathBuf,
    found: Found,
}

impl<'a> Demo<'a> {
    pub fn new(lab: &'a Lab) -> Result<Self> {
        Ok(Self {
            lab,
            exe: std::env::current_exe()?,
            found: Found::default(),
        })
    }

    /// Plays every step; the lab stays up, whatever happens.
    pub fn run(mut self) -> Result<()> {
        let started = Instant::now();
        let steps: [(&str, &str, Step<'a>); 12] = [
            (
                "lab up",
                "Build a lab: 3 nodes (network namespaces on one bridge, a shoal agent in each) and a client at 192.168.77.100.",
                Demo::lab_up,
            ),
            (
                "join tokens",
                "`lab up` ran `shoal swarm init` on node1, then on node2 and node3 the join command node1 prints here:",
                Demo::join_token,
            ),
            (
                "node ls",
                "The swarm's nodes as its manager sees them: node1 leads, node2 and node3 are workers.",
                Demo::node_ls,
            ),
            (
                "network create",
                "An overlay network: a VXLAN segment across the nodes, its subnet taken from the swarm's pool.",
                Demo::network_create,
            ),
            (
                "service create",
                "A service: 3 replicas of a small HTTP server on `front`, port 8080 published on every node (the routing mesh).",
                Demo::service_create,
            ),
            (
                "routing mesh",
                "Port 8080 answers on every node, balanced over all replicas, and the server sees the client's own address.",
                Demo::routing_mesh,
            ),
            (
                "DNS",
                "Inside a task, the embedded DNS (127.0.0.11) answers `web` with the service's virtual IP, `tasks.web` with every replica.",
                Demo::dns,
            ),
            (
                "ping the VIP",
                "The virtual IP is balanced per connection in eBPF, and still answers ping, as in Swarm.",
                Demo::ping_vip,
            ),
            (
                "service scale",
                "Scale to 5 replicas: the new tasks spread over the nodes.",
                Demo::scale,
            ),
            (
                "kill a task",
                "Kill -9 a task's process (its `shoal whoami`): the task fails and the orchestrator starts a replacement.",
                Demo::kill_task,
            ),
            (
                "drain node2",
                "Drain node2: its tasks stop and are started again on the other nodes.",
                Demo::drain,
            ),
            (
                "service rm",
                "Remove the service: its tasks stop on every node and port 8080 closes.",
                Demo::service_rm,
            ),
        ];
        println!(
            "The Swarm walkthrough on lab {:?}. `shoal` below is {}.",
            self.lab.name(),
            self.exe.display()
        );
        let total = steps.len();
        for (index, (name, explanation, step)) in steps.into_iter().enumerate() {
            let number = index + 1;
            println!("\n[{number}/{total}] {explanation}");
            step(&mut self)
                .with_context(|| format!("demo step {number}/{total} ({name}) did not behave"))?;
        }
        println!(
            "\nDemo done in {} s, every step checked. The lab stays up for exploring; remove it with `{}`.",
            started.elapsed().as_secs(),
            self.lab.down_hint()
        );
        Ok(())
    }

    // The steps.

    fn lab_up(&mut self) -> Result<()> {
        if self.lab.exists()? {
            let removed = self.lab.down()?;
            println!(
                "(removed the previous lab {:?} first: {})",
                self.lab.name(),
                removed.join(", ")
            );
        }
        let nodes = NODES.to_string();
        let ran = self.show(&["up", "--nodes", &nodes], Duration::from_secs(120))?;
        ensure!(ran.success, "`lab up` failed: {}", ran.stderr.trim());
        let members = self.lab.status()?;
        for member in members.iter().filter(|m| m.socket.is_some()) {
            ensure!(member.agent_up, "the agent of {} is not up", member.name);
            let role = if member.name == "node1" {
                "manager"
            } else {
                "worker"
            };
            ensure!(
                member.role.as_deref() == Some(role),
                "{} should be a {role}, is {:?}",
                member.name,
                member.role
            );
        }
        note(
            "node1 initialised the swarm and is its manager; node2 and node3 joined it as workers.",
        );
        Ok(())
    }

    fn join_token(&mut self) -> Result<()> {
        let ran = self.show(
            &[
                "exec",
                "node1",
                "--",
                "shoal",
                "swarm",
                "join-token",
                "worker",
            ],
            COMMAND_LIMIT,
        )?;
        ensure!(ran.success, "join-token failed: {}", ran.stderr.trim());
        let command = ran
            .stdout
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("shoal swarm join --token SWMTKN-1-"))
            .context("no `shoal swarm join --token SWMTKN-1-…` line")?;
        ensure!(
            command.ends_with(" 192.168.77.11:2377"),
            "the join command does not name node1's address: {command}"
        );
        note("node2 and node3 ran exactly this. The token carries a digest of the swarm's CA, so a joining node checks whom it joins; all manager traffic is mutual TLS from then on.");
        Ok(())
    }

    fn node_ls(&mut self) -> Result<()> {
        self.show_until(
            &["exec", "node1", "--", "shoal", "node", "ls"],
            SETTLE_LIMIT,
            "three Ready and Active nodes, node1 the Leader",
            |demo, _| {
                let nodes: Vec<NodeView> = demo.json("node1", &["node", "ls"])?;
                let ok = nodes.len() == usize::from(NODES)
                    && nodes.iter().all(|n| {
                        n.status == NodeStatus::Ready
                            && n.availability == Availability::Active
                            && (n.manager_status == "Leader") == (n.hostname == "node1")
                    });
                Ok(ok.then_some(()))
            },
        )?;
        note("Three Ready nodes; the * marks the node the command ran on.");
        Ok(())
    }

    fn network_create(&mut self) -> Result<()> {
        let ran = self.show(
            &["exec", "node1", "--", "shoal", "network", "create", "front"],
            COMMAND_LIMIT,
        )?;
        ensure!(ran.success, "network create failed: {}", ran.stderr.trim());
        let networks: Vec<NetworkView> = self.json("node1", &["network", "ls"])?;
        let front = networks
            .iter()
            .find(|n| n.name == "front")
            .context("front is not in `network ls`")?;
        ensure!(
            ran.stdout.trim() == front.id,
            "network create printed {:?}, not the network's ID {}",
            ran.stdout.trim(),
            front.id
        );
        note(&format!(
            "front: subnet {}, VXLAN VNI {}. Nodes set it up when a task of theirs joins it.",
            front.subnet, front.vni
        ));
        Ok(())
    }

    fn service_create(&mut self) -> Result<()> {
        let ran = self.show(
            &[
                "exec",
                "node1",
                "--",
                "shoal",
                "service",
                "create",
                "--name",
                "web",
                "--replicas",
                "3",
                "--network",
                "front",
                "--publish",
                "8080:80",
                "--",
                "shoal",
                "whoami",
                "--listen",
                "0.0.0.0:80",
            ],
            Duration::from_secs(150),
        )?;
        ensure!(
            ran.success && ran.stdout.contains("verify: Service converged"),
            "the service did not converge: {}",
            ran.stderr.trim()
        );
        self.found.tasks = self.show_until(
            &["exec", "node1", "--", "shoal", "service", "ps", "web"],
            SETTLE_LIMIT,
            "3 running tasks, one on each node",
            |demo, _| {
                let running = demo.running_tasks()?;
                let nodes: BTreeSet<&String> = running.values().collect();
                Ok((running.len() == 3 && nodes.len() == 3).then_some(running))
            },
        )?;
        let service: ServiceView = self.json("node1", &["service", "inspect", "web"])?;
        self.found.vip = service
            .vips
            .iter()
            .find(|(network, _)| network == "front")
            .map(|(_, vip)| vip.to_string())
            .context("web has no virtual IP on front")?;
        note(&format!(
            "One replica per node; web's virtual IP on front is {}.",
            self.found.vip
        ));
        Ok(())
    }

    fn routing_mesh(&mut self) -> Result<()> {
        let replicas: BTreeSet<String> = self.found.tasks.keys().cloned().collect();
        for index in 1..=NODES {
            let url = format!("http://192.168.77.{}:8080/", 10 + index);
            self.show_until(
                &[
                    "exec",
                    "client",
                    "--",
                    "curl",
                    "-s",
                    "--max-time",
                    "2",
                    &url,
                ],
                SETTLE_LIMIT,
                &format!("an answer from a replica through {url}, to {CLIENT_IP}"),
                |_, ran| {
                    let host = field(&ran.stdout, "Hostname:");
                    let remote = field(&ran.stdout, "RemoteAddr:");
                    Ok((host.len() == 1
                        && replicas.contains(&host[0])
                        && remote.len() == 1
                        && remote[0].starts_with(&format!("{CLIENT_IP}:")))
                    .then_some(()))
                },
            )?;
        }
        let script = "for i in $(seq 10); do for n in 11 12 13; do curl -s --max-time 2 http://192.168.77.$n:8080/; done; done | grep Hostname | sort | uniq -c";
        self.show_until(
            &["exec", "client", "--", "sh", "-c", script],
            SETTLE_LIMIT,
            "30 answers from all 3 replicas",
            |_, ran| {
                let mut seen = BTreeSet::new();
                let mut answers = 0;
                for line in ran.stdout.lines() {
                    if let Some((count, host)) = line.trim().split_once(" Hostname: ") {
                        answers += count.trim().parse::<usize>().unwrap_or(0);
                        seen.insert(host.trim().to_owned());
                    }
                }
                Ok((answers == 30 && seen == replicas).then_some(()))
            },
        )?;
        note(&format!(
            "Every node answers, whichever node the replica runs on, and each replica saw RemoteAddr {CLIENT_IP}: the client's real address, not a node's."
        ));
        Ok(())
    }

    fn dns(&mut self) -> Result<()> {
        let (task, node) = self.a_task()?;
        let vip = BTreeSet::from([self.found.vip.clone()]);
        self.show_until(
            &[
                "exec", &node, "--", "shoal", "task", "exec", &task, "--", "dig", "+short", "web",
            ],
            SETTLE_LIMIT,
            &format!("web to resolve to the VIP {}", self.found.vip),
            |_, ran| Ok((lines(&ran.stdout) == vip).then_some(())),
        )?;
        let addresses = self.task_addresses()?;
        self.show_until(
            &[
                "exec",
                &node,
                "--",
                "shoal",
                "task",
                "exec",
                &task,
                "--",
                "dig",
                "+short",
                "tasks.web",
            ],
            SETTLE_LIMIT,
            &format!("tasks.web to resolve to the replicas' addresses {addresses:?}"),
            |_, ran| Ok((lines(&ran.stdout) == addresses).then_some(())),
        )?;
        note("Clients use the one stable name; `tasks.web` is for those that want every replica.");
        Ok(())
    }

    fn ping_vip(&mut self) -> Result<()> {
        let (task, node) = self.a_task()?;
        self.show_until(
            &[
                "exec", &node, "--", "shoal", "task", "exec", &task, "--", "ping", "-c", "2", "web",
            ],
            SETTLE_LIMIT,
            "2 replies from the VIP",
            |_, ran| {
                Ok(
                    (ran.success && ran.stdout.contains("2 packets transmitted, 2 received"))
                        .then_some(()),
                )
            },
        )?;
        note(&format!(
            "{} answered, though no interface holds it: an eBPF program on the task's interface replies for the service.",
            self.found.vip
        ));
        Ok(())
    }

    fn scale(&mut self) -> Result<()> {
        let ran = self.show(
            &["exec", "node1", "--", "shoal", "service", "scale", "web=5"],
            Duration::from_secs(150),
        )?;
        ensure!(
            ran.success && ran.stdout.contains("verify: Service converged"),
            "the service did not converge at 5: {}",
            ran.stderr.trim()
        );
        let running = self.show_until(
            &["exec", "node1", "--", "shoal", "service", "ps", "web"],
            SETTLE_LIMIT,
            "5 running tasks on the 3 nodes",
            |demo, _| {
                let running = demo.running_tasks()?;
                let nodes: BTreeSet<&String> = running.values().collect();
                Ok((running.len() == 5 && nodes.len() == 3).then_some(running))
            },
        )?;
        note(&format!("5 running: {}.", per_node(&running)));
        self.found.tasks = running;
        Ok(())
    }

    fn kill_task(&mut self) -> Result<()> {
        let (victim, node) = self
            .found
            .tasks
            .iter()
            .find(|(_, node)| node.as_str() == "node3")
            .map(|(t, n)| (t.clone(), n.clone()))
            .context("no web task on node3")?;
        let ran = self.show(
            &[
                "exec", &node, "--", "shoal", "task", "exec", &victim, "--", "pkill", "-9", "-x",
                "shoal",
            ],
            COMMAND_LIMIT,
        )?;
        // pkill runs in the task's PID namespace: killing its init may kill pkill too (137).
        ensure!(
            ran.success || ran.code == Some(137),
            "pkill found nothing to kill in {victim}"
        );
        let victim_id = victim.rsplit('.').next().unwrap_or_default().to_owned();
        let running = self.show_until(
            &["exec", "node1", "--", "shoal", "service", "ps", "web"],
            SETTLE_LIMIT,
            &format!("{victim} failed with exit 137 and 5 tasks running again"),
            |demo, _| {
                let tasks: Vec<TaskView> = demo.json("node1", &["service", "ps", "web"])?;
                let failed = tasks.iter().any(|t| {
                    t.id == victim_id
                        && t.state == TaskState::Failed
                        && t.error.contains("exit (137)")
                });
                let running = demo.running_tasks()?;
                Ok(
                    (failed && running.len() == 5 && !running.contains_key(&victim))
                        .then_some(running),
                )
            },
        )?;
        let replacement = running
            .iter()
            .find(|(t, _)| !self.found.tasks.contains_key(*t))
            .map(|(t, n)| format!("{t} on {n}"))
            .unwrap_or_default();
        note(&format!(
            "{victim} failed (exit 137: SIGKILL) and stays in the history (\\_); {replacement} replaced it."
        ));
        self.found.tasks = running;
        Ok(())
    }

    fn drain(&mut self) -> Result<()> {
        let ran = self.show(
            &[
                "exec",
                "node1",
                "--",
                "shoal",
                "node",
                "update",
                "--availability",
                "drain",
                "node2",
            ],
            COMMAND_LIMIT,
        )?;
        ensure!(
            ran.success && ran.stdout.trim() == "node2",
            "node update failed: {}",
            ran.stderr.trim()
        );
        let running = self.show_until(
            &["exec", "node1", "--", "shoal", "service", "ps", "web"],
            SETTLE_LIMIT,
            "5 running tasks, none on node2, and no task process left on node2",
            |demo, _| {
                let running = demo.running_tasks()?;
                let moved = running.len() == 5 && running.values().all(|n| n != "node2");
                Ok((moved && demo.lab.task_pids("node2")?.is_empty()).then_some(running))
            },
        )?;
        note(&format!(
            "node2 runs nothing now; 5 running: {}. (`node update --availability active node2` takes it back.)",
            per_node(&running)
        ));
        self.found.tasks = running;
        Ok(())
    }

    fn service_rm(&mut self) -> Result<()> {
        let ran = self.show(
            &["exec", "node1", "--", "shoal", "service", "rm", "web"],
            COMMAND_LIMIT,
        )?;
        ensure!(
            ran.success && ran.stdout.trim() == "web",
            "service rm failed: {}",
            ran.stderr.trim()
        );
        self.show_until(
            &[
                "exec",
                "client",
                "--",
                "curl",
                "-sS",
                "--max-time",
                "2",
                "http://192.168.77.11:8080/",
            ],
            SETTLE_LIMIT,
            "port 8080 closed and no task process left on any node",
            |demo, ran| {
                let services: Vec<ServiceView> = demo.json("node1", &["service", "ls"])?;
                let mut idle = services.is_empty() && !ran.success;
                for node in (1..=NODES).map(node_name) {
                    idle = idle && demo.lab.task_pids(&node)?.is_empty();
                }
                Ok(idle.then_some(()))
            },
        )?;
        note("No service, no task, nothing listening on 8080.");
        Ok(())
    }

    // Running commands.

    /// The command as a user types it: `shoal lab [--name NAME] ARGS`, quoted for a shell.
    fn typed(&self, args: &[&str]) -> String {
        let mut words = vec!["shoal".to_owned(), "lab".to_owned()];
        if self.lab.name() != "lab" {
            words.extend(["--name".to_owned(), self.lab.name().to_owned()]);
        }
        words.extend(args.iter().map(|a| shell_quote(a)));
        words.join(" ")
    }

    /// Runs `shoal lab --name NAME ARGS` (this binary), killed with its children at `limit`.
    fn execute(&self, args: &[&str], limit: Duration) -> Result<Ran> {
        let mut child = Command::new(&self.exe)
            .args(["lab", "--name", self.lab.name()])
            .args(args)
            .env_remove("SHOAL_SOCKET")
            .env_remove("SHOAL_LAB")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so that a timeout ends whatever it started too.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting `{}`", self.typed(args)))?;
        let pid = child.id();
        let (mut stdout, mut stderr) = (child.stdout.take(), child.stderr.take());
        let (done, finished) = mpsc::channel();
        thread::spawn(move || {
            let mut err = String::new();
            let reader = thread::spawn(move || {
                if let Some(stderr) = stderr.as_mut() {
                    let _ = stderr.read_to_string(&mut err);
                }
                err
            });
            let mut out = String::new();
            if let Some(stdout) = stdout.as_mut() {
                let _ = stdout.read_to_string(&mut out);
            }
            let err = reader.join().unwrap_or_default();
            let status = child.wait();
            let _ = done.send((status, out, err));
        });
        match finished.recv_timeout(limit) {
            Ok((status, stdout, stderr)) => {
                let status = status?;
                Ok(Ran {
                    success: status.success(),
                    code: status.code(),
                    stdout,
                    stderr,
                })
            }
            Err(_) => {
                let _ = nix::sys::signal::killpg(Pid::from_raw(pid as i32), Signal::SIGKILL);
                bail!("`{}` did not finish within {limit:?}", self.typed(args))
            }
        }
    }

    /// Prints the command, runs it and prints its output.
    fn show(&self, args: &[&str], limit: Duration) -> Result<Ran> {
        println!("$ {}", self.typed(args));
        let ran = self.execute(args, limit)?;
        print_output(&ran);
        Ok(ran)
    }

    /// Runs the command until `check` (given the run) says the swarm got there, then prints it
    /// with the output of that run: the reader sees the state the step is about, not the
    /// moments before. Gives up after `limit`, printing the last run.
    fn show_until<T>(
        &self,
        args: &[&str],
        limit: Duration,
        what: &str,
        mut check: impl FnMut(&Self, &Ran) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + limit;
        loop {
            let ran = self.execute(args, COMMAND_LIMIT.min(limit))?;
            let outcome = check(self, &ran);
            if let Ok(Some(value)) = outcome {
                println!("$ {}", self.typed(args));
                print_output(&ran);
                return Ok(value);
            }
            if Instant::now() > deadline {
                println!("$ {}", self.typed(args));
                print_output(&ran);
                let why = match outcome {
                    Err(err) => format!(" ({err:#})"),
                    Ok(_) => String::new(),
                };
                bail!("waited {limit:?} for {what}{why}");
            }
            thread::sleep(POLL_EVERY);
        }
    }

    /// `shoal ARGS --format json` on a node, unnarrated: how steps check what they show.
    fn json<T: DeserializeOwned>(&self, node: &str, args: &[&str]) -> Result<T> {
        let mut all = vec!["exec", node, "--", "shoal"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--format", "json"]);
        let ran = self.execute(&all, COMMAND_LIMIT)?;
        ensure!(
            ran.success,
            "`shoal {}` on {node} failed: {}",
            args.join(" "),
            ran.stderr.trim()
        );
        serde_json::from_str(&ran.stdout)
            .with_context(|| format!("parsing `shoal {}` on {node}", args.join(" ")))
    }

    /// web's running tasks: full name -> node.
    fn running_tasks(&self) -> Result<BTreeMap<String, String>> {
        let tasks: Vec<TaskView> = self.json("node1", &["service", "ps", "web"])?;
        Ok(tasks
            .into_iter()
            .filter(|t| t.desired == TaskState::Running && t.state == TaskState::Running)
            .map(|t| (format!("{}.{}", t.name, t.id), t.node))
            .collect())
    }

    /// The front addresses of web's running tasks.
    fn task_addresses(&self) -> Result<BTreeSet<String>> {
        let tasks: Vec<TaskView> = self.json("node1", &["service", "ps", "web"])?;
        Ok(tasks
            .iter()
            .filter(|t| t.desired == TaskState::Running && t.state == TaskState::Running)
            .flat_map(|t| &t.addresses)
            .filter(|(network, _)| network == "front")
            .map(|(_, address)| address.to_string())
            .collect())
    }

    /// A running task to look from (on node2, to show it is not node1's privilege).
    fn a_task(&self) -> Result<(String, String)> {
        self.found
            .tasks
            .iter()
            .find(|(_, node)| node.as_str() == "node2")
            .or_else(|| self.found.tasks.iter().next())
            .map(|(t, n)| (t.clone(), n.clone()))
            .context("no running task of web")
    }
}

fn note(text: &str) {
    println!("=> {text}");
}

fn print_output(ran: &Ran) {
    print!("{}", ran.stdout);
    if !ran.stdout.is_empty() && !ran.stdout.ends_with('\n') {
        println!();
    }
    if !ran.stderr.trim().is_empty() {
        println!("{}", ran.stderr.trim_end());
    }
}

/// Values of a `Name: value` field in whoami's answers.
fn field(text: &str, name: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .map(|v| v.trim().to_owned())
        .collect()
}

fn lines(text: &str) -> BTreeSet<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// "node1 ×2, node3 ×3".
fn per_node(tasks: &BTreeMap<String, String>) -> String {
    let mut counts = BTreeMap::new();
    for node in tasks.values() {
        *counts.entry(node.as_str()).or_insert(0) += 1;
    }
    counts
        .iter()
        .map(|(node, n)| format!("{node} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A word as a POSIX shell needs it: bare when safe, else in single quotes.
fn shell_quote(word: &str) -> String {
    let safe = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@+,%".contains(&b));
    if safe {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_quoted_as_typed() {
        assert_eq!(shell_quote("web=5"), "web=5");
        assert_eq!(shell_quote("0.0.0.0:80"), "0.0.0.0:80");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn uniq_counts_are_read() {
        let tasks = BTreeMap::from([
            ("web.1.a".to_owned(), "node1".to_owned()),
            ("web.2.b".to_owned(), "node1".to_owned()),
            ("web.3.c".to_owned(), "node3".to_owned()),
        ]);
        assert_eq!(per_node(&tasks), "node1 x2, node3 x1");
        assert_eq!(
            field("Hostname: web.1.a\nIP: 1.2.3.4\n", "Hostname:"),
            ["web.1.a"]
        );
    }
}
