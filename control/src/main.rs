//! `shoal`: the agent daemon and its command-line clients.

mod agent;
mod client;
mod commands;
mod config;
mod containment_args;
mod debug;
mod demo;
#[cfg(test)]
mod doc_commands;
mod docker_api;
mod examples;
mod health_args;
mod lab;
mod log_follower;
mod metrics;
mod neighbours;
mod output;
mod server;
mod update_args;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use shoal_dataplane::DataplaneStatus;

use shoal_api::Version;

use crate::{
    client::Client,
    config::{AgentSettings, DEFAULT_SOCKET},
    output::{json, table, Format},
    server::{AgentInfo, DataplaneReport},
};

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Overlay networks, routing mesh and service discovery for a swarm of nodes"
)]
struct Cli {
    /// The local agent's API socket [default: /run/shoal/shoal.sock]
    #[arg(long, global = true, env = "SHOAL_SOCKET")]
    socket: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent (the daemon behind every other command)
    Agent {
        /// Config file [default: /etc/shoal/agent.toml, if present]
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<AgentSettings>,
    },
    /// Show the client's and the agent's versions
    Version {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Show what the local agent runs with
    Info {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Create, join and leave a swarm
    #[command(subcommand)]
    Swarm(commands::SwarmCommand),
    /// Manage the swarm's nodes (on a manager)
    #[command(subcommand)]
    Node(commands::NodeCommand),
    /// Manage services (on a manager)
    #[command(subcommand)]
    Service(Box<commands::ServiceCommand>),
    /// Manage overlay networks (on a manager)
    #[command(subcommand)]
    Network(commands::NetworkCommand),
    /// Work with tasks running on this node
    #[command(subcommand)]
    Task(TaskCommand),
    /// Gossip members and network tables as this node sees them
    #[command(subcommand)]
    Gossip(debug::GossipCommand),
    /// Service VIPs and their backends on this node
    #[command(subcommand)]
    Lb(debug::LbCommand),
    /// The embedded DNS as a task on this node sees it
    #[command(subcommand)]
    Dns(debug::DnsCommand),
    /// Published ports of the routing mesh on this node
    #[command(subcommand)]
    Ingress(debug::IngressCommand),
    /// Flows the routing mesh tracks on this node
    #[command(subcommand)]
    Conntrack(debug::ConntrackCommand),
    /// A tiny HTTP (and TCP and UDP echo) server that says who it is and who asked
    Whoami {
        #[arg(long, default_value = "0.0.0.0:80")]
        listen: String,
    },
    /// Inside a new task's namespaces: set it up and exec its command (used by the agent)
    #[command(hide = true)]
    TaskInit(TaskInitArgs),
    /// Apply a task's confinement to this process and exec the command (`task exec`, inside
    /// the task's namespaces)
    #[command(hide = true)]
    TaskConfine {
        #[command(flatten)]
        confinement: ConfinementArgs,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Inspect the eBPF dataplane
    #[command(subcommand)]
    Dataplane(DataplaneCommand),
    /// Print a shell completion script
    Completion { shell: clap_complete::Shell },
    /// A multi-node lab in network namespaces on this machine
    Lab {
        /// Name of the lab, so several can coexist
        #[arg(long, env = "SHOAL_LAB", default_value = "lab")]
        name: String,
        #[command(subcommand)]
        command: LabCommand,
    },
}

/// `shoal task-init`'s arguments.
#[derive(clap::Args)]
struct TaskInitArgs {
    /// Descriptor of the start gate: the command runs once the agent opens it
    #[arg(long)]
    gate_fd: i32,
    #[arg(long)]
    hostname: String,
    #[arg(long)]
    resolv_conf: PathBuf,
    /// Where the command's exit status is written when it ends
    #[arg(long)]
    exit_file: PathBuf,
    #[command(flatten)]
    confinement: ConfinementArgs,
    /// An agent path to hide from the task (an empty mount over it); repeatable
    #[arg(long = "mask")]
    masks: Vec<PathBuf>,
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// task-init alone, parsed without building the whole command line (every subcommand and its
/// examples): it is on every task's start path, before the task's command can run.
#[derive(Parser)]
#[command(name = "shoal task-init")]
struct TaskInitCli {
    #[command(flatten)]
    args: TaskInitArgs,
}

/// Sets up the task and execs its command; returns only on a set-up error.
fn task_init(args: TaskInitArgs) -> Result<ExitCode> {
    Err(shoal_dataplane::task::exec_init(
        args.gate_fd,
        (&args.hostname, &args.resolv_conf),
        &args.exit_file,
        (args.confinement.get()?, &args.masks),
        &args.command,
    ))
}

/// What a task's command is confined to, as task-init and task-confine take it.
#[derive(clap::Args)]
struct ConfinementArgs {
    /// Capability set of the command, a hex mask; absent: the command runs unconfined
    #[arg(long)]
    caps: Option<String>,
    /// UID:GID[:G1,G2...] the command runs as
    #[arg(long, requires = "caps")]
    user: Option<String>,
}

impl ConfinementArgs {
    fn get(&self) -> Result<Option<shoal_dataplane::confinement::Confinement>> {
        self.caps
            .as_deref()
            .map(|caps| {
                shoal_dataplane::confinement::Confinement::from_args(caps, self.user.as_deref())
            })
            .transpose()
    }
}

#[derive(Subcommand)]
enum TaskCommand {
    /// Run a command inside a task's namespaces (task ID, ID prefix or name)
    Exec {
        task: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Details of a task of any service (ID, ID prefix, or `web.1` for the slot's current
    /// task), as Docker's task document; --pretty adds its health and last probes,
    /// --format json is shoal's own view with them
    Inspect {
        task: String,
        #[command(flatten)]
        format: commands::InspectFormat,
    },
}

#[derive(Subcommand)]
enum DataplaneCommand {
    /// Programs, attach points, maps and counters, as the kernel reports them
    Status {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build the lab: N nodes with an agent each, and a client, on one underlay
    Up {
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=lab::MAX_NODES as i64))]
        nodes: u8,
        /// How many of the nodes are managers (node1 first); they form the swarm, and this
        /// returns once `node ls` shows each of them Reachable
        #[arg(long, default_value_t = 1)]
        managers: u8,
        /// Resolver (IP:PORT) the agents forward names outside the cluster to, instead of the
        /// host's resolv.conf; repeatable (tests point it at a stub in the client)
        #[arg(long = "dns-upstream")]
        dns_upstreams: Vec<std::net::SocketAddr>,
        /// Seconds a node may be Down before the managers move its tasks (the agent setting
        /// `reschedule_grace`)
        #[arg(long)]
        reschedule_grace: Option<u64>,
        /// CPUs each node reports for reservations (the agent setting `node_cpus`)
        #[arg(long)]
        node_cpus: Option<String>,
        /// Memory each node reports for reservations (the agent setting `node_memory`)
        #[arg(long)]
        node_memory: Option<String>,
    },
    /// Remove everything the lab made (works after crashes too)
    Down,
    /// List the lab's nodes, their addresses and agents
    Status {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Run a command in a node's (or the client's) namespace, SHOAL_SOCKET set to its agent
    Exec {
        /// nodeN or client
        member: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Stop a node's agent (SIGTERM; --kill for SIGKILL, as in a crash), or the whole node
    /// (--power-off)
    Stop {
        node: String,
        #[arg(long)]
        kill: bool,
        /// Take the whole node down as a power-off would: its underlay link down, then every
        /// process of it (agent, tasks) killed; `lab start` plugs it back in
        #[arg(long, conflicts_with = "kill")]
        power_off: bool,
    },
    /// Start a node's agent again (after --power-off, with its underlay link back up)
    Start { node: String },
    /// Play the Swarm walkthrough on a fresh lab (replacing one of this name), narrated and
    /// checked step by step; the lab stays up
    Demo,
}

fn main() -> ExitCode {
    let result = if std::env::args_os().nth(1).is_some_and(|a| a == "task-init") {
        default_sigpipe();
        task_init(TaskInitCli::parse_from(std::env::args_os().skip(1)).args)
    } else {
        let matches = examples::with_examples(Cli::command()).get_matches();
        let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|err| err.exit());
        if !matches!(cli.command, Command::Agent { .. }) {
            default_sigpipe();
        }
        run(cli)
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("shoal: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A client piped into `head` ends quietly, as Unix tools do, instead of panicking; and a
/// task's command does not inherit SIGPIPE ignored.
fn default_sigpipe() {
    // SAFETY: restoring a default signal disposition before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

fn run(cli: Cli) -> Result<ExitCode> {
    let client = Client::new(cli.socket.clone().unwrap_or_else(|| DEFAULT_SOCKET.into()));
    match cli.command {
        Command::Agent {
            config,
            mut settings,
        } => {
            settings.socket = cli.socket;
            agent::run(config, *settings)?
        }
        Command::Version { format } => {
            let agent: Version = block_on(client.get("/v1/version"))?;
            match format {
                Format::Json => print!(
                    "{}",
                    json(&serde_json::json!({ "client": Version::current(), "agent": agent }))
                ),
                Format::Table => {
                    let client = Version::current();
                    println!("Client: {} (api {})", client.version, client.api_version);
                    println!("Agent:  {} (api {})", agent.version, agent.api_version);
                }
            }
        }
        Command::Info { format } => {
            let info: AgentInfo = block_on(client.get("/v1/info"))?;
            match format {
                Format::Json => print!("{}", json(&info)),
                Format::Table => print!("{}", render_info(&info)),
            }
        }
        Command::Dataplane(DataplaneCommand::Status { format }) => {
            let report: DataplaneReport = block_on(client.get("/v1/dataplane"))?;
            match format {
                Format::Json => print!("{}", json(&report)),
                Format::Table => print!(
                    "{}\n{}",
                    render_dataplane(&report.dataplane),
                    neighbours::render(report.neighbour_table.as_ref())
                ),
            }
        }
        Command::Lab { name, command } => return run_lab(&lab::Lab::new(&name)?, command),
        Command::Swarm(command) => block_on(commands::swarm(&client, command))?,
        Command::Node(command) => block_on(commands::node(&client, command))?,
        Command::Service(command) => block_on(commands::service(&client, *command))?,
        Command::Network(command) => block_on(commands::network(&client, command))?,
        Command::Gossip(command) => block_on(debug::gossip(&client, command))?,
        Command::Lb(command) => block_on(debug::lb(&client, command))?,
        Command::Ingress(command) => block_on(debug::ingress(&client, command))?,
        Command::Conntrack(command) => block_on(debug::conntrack(&client, command))?,
        Command::Dns(command) => block_on(debug::dns(&client, command))?,
        Command::Task(TaskCommand::Exec { task, command }) => {
            return block_on(commands::task_exec(&client, &task, &command))
        }
        Command::Task(TaskCommand::Inspect { task, format }) => {
            block_on(commands::task_inspect(&client, &task, &format))?
        }
        Command::Whoami { listen } => commands::whoami(&listen)?,
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "shoal", &mut std::io::stdout())
        }
        Command::TaskInit(args) => return task_init(args),
        Command::TaskConfine {
            confinement,
            command,
        } => {
            return Err(shoal_dataplane::confinement::exec_confined(
                confinement.get()?,
                &command,
            ))
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_lab(lab: &lab::Lab, command: LabCommand) -> Result<ExitCode> {
    match command {
        LabCommand::Up {
            nodes,
            managers,
            dns_upstreams,
            reschedule_grace,
            node_cpus,
            node_memory,
        } => {
            let agents = lab::AgentOptions {
                dns_upstreams,
                reschedule_grace,
                node_cpus,
                node_memory,
            };
            let members = lab.up(nodes, managers, &agents)?;
            print!("{}", render_lab(&members));
            println!("\nTry: shoal lab exec node1 -- shoal dataplane status");
        }
        LabCommand::Down => {
            let removed = lab.down()?;
            if removed.is_empty() {
                println!("nothing to remove");
            } else {
                println!("removed {}", removed.join(", "));
            }
        }
        LabCommand::Status { format } => {
            let members = lab.status()?;
            match format {
                Format::Json => print!("{}", json(&members)),
                Format::Table => print!("{}", render_lab(&members)),
            }
        }
        LabCommand::Exec { member, command } => {
            let status = lab.exec(&member, &command)?;
            return Ok(match status.code() {
                Some(code) => ExitCode::from(code as u8),
                None => ExitCode::FAILURE,
            });
        }
        LabCommand::Stop {
            node,
            kill,
            power_off,
        } => {
            let how = match (power_off, kill) {
                (true, _) => lab::Stop::PowerOff,
                (false, true) => lab::Stop::KillAgent,
                (false, false) => lab::Stop::Agent,
            };
            lab.stop(&node, how)?
        }
        LabCommand::Start { node } => lab.start(&node)?,
        LabCommand::Demo => demo::Demo::new(lab)?.run()?,
    }
    Ok(ExitCode::SUCCESS)
}

fn block_on<T>(future: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

fn render_info(info: &AgentInfo) -> String {
    let c = &info.config;
    let rows = [
        ("Node", c.hostname.clone()),
        (
            "Version",
            format!(
                "{} (api {})",
                info.version.version, info.version.api_version
            ),
        ),
        ("Agent pid", info.pid.to_string()),
        ("Uptime", format!("{}s", info.uptime_secs)),
        ("Kernel", info.kernel.clone()),
        ("Advertise address", c.advertise_addr.to_string()),
        ("Advertise interface", c.advertise_interface.clone()),
        (
            "Ports",
            format!(
                "manager {}/tcp, gossip {}/tcp+udp, data path {}/udp",
                c.manager_port, c.gossip_port, c.data_path_port
            ),
        ),
        ("State dir", c.state_dir.display().to_string()),
        ("API socket", c.socket.display().to_string()),
        ("bpffs root", c.bpffs_root.display().to_string()),
        ("cgroup root", c.cgroup_root.display().to_string()),
        ("DNS upstreams", info.dns_upstreams.join(", ")),
        (
            "Metrics",
            c.metrics_addr
                .map_or("off".to_owned(), |a| format!("http://{a}/metrics")),
        ),
        (
            "Swarm",
            match &info.swarm {
                None => "inactive".to_owned(),
                Some(s) => format!(
                    "active, node {} ({}{}), managers {}",
                    s.node_id,
                    if s.manager { "manager" } else { "worker" },
                    match s.leader {
                        Some(true) => ", leader",
                        _ => "",
                    },
                    s.managers.join(", ")
                ),
            },
        ),
    ];
    rows.iter()
        .map(|(k, v)| format!("{:<20} {v}\n", format!("{k}:")))
        .collect()
}

fn render_dataplane(status: &DataplaneStatus) -> String {
    let programs: Vec<[String; 6]> = status
        .programs
        .iter()
        .map(|p| {
            [
                p.program.clone(),
                p.program_type.clone(),
                format!("{} {}", p.attach_point, p.interface),
                if p.attached {
                    "attached"
                } else {
                    "NOT ATTACHED"
                }
                .to_owned(),
                p.program_id.to_string(),
                p.link_pin.display().to_string(),
            ]
        })
        .collect();
    let maps: Vec<[String; 5]> = status
        .maps
        .iter()
        .map(|m| {
            [
                m.name.clone(),
                m.map_type.clone(),
                match m.entries {
                    Some(entries) => format!("{entries}/{}", m.max_entries),
                    None => format!("array of {}", m.max_entries),
                },
                m.map_id.to_string(),
                m.pin.display().to_string(),
            ]
        })
        .collect();
    let counters: Vec<[String; 4]> = status
        .counters
        .iter()
        .map(|c| {
            let kind = match (c.refusal, c.dropped) {
                (false, _) => "sorted",
                (true, true) => "refused: dropped",
                (true, false) => "refused: left to the kernel",
            };
            [
                c.verdict.clone(),
                kind.to_owned(),
                c.packets.to_string(),
                c.bytes.to_string(),
            ]
        })
        .collect();
    format!(
        "{}\n{}\n{}",
        table(
            [
                "PROGRAM",
                "TYPE",
                "ATTACH POINT",
                "STATE",
                "PROG ID",
                "LINK PIN"
            ],
            &programs
        ),
        table(["MAP", "TYPE", "FILL", "MAP ID", "PIN"], &maps),
        table(["VERDICT", "KIND", "PACKETS", "BYTES"], &counters),
    )
}

fn render_lab(members: &[lab::Member]) -> String {
    let rows: Vec<[String; 5]> = members
        .iter()
        .map(|m| {
            let agent = match (m.socket.is_some(), m.agent_up, m.agent_pid) {
                (false, _, _) => "-".to_owned(),
                (true, true, Some(pid)) => format!("up (pid {pid})"),
                (true, true, None) => "up".to_owned(),
                (true, false, _) => "DOWN".to_owned(),
            };
            let role = m.role.clone().unwrap_or_else(|| "-".to_owned());
            [
                m.name.clone(),
                m.address.clone(),
                role,
                agent,
                m.netns.clone(),
            ]
        })
        .collect();
    table(["NAME", "ADDRESS", "ROLE", "AGENT", "NAMESPACE"], &rows)
}
