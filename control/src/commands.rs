//! The Docker-shaped cluster commands: swarm, node, service, task. Each is a client of the
//! local agent, which answers itself or forwards to the leader.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::unix::process::ExitStatusExt as _,
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use clap::{Args, Subcommand, ValueEnum};

use shoal_api::{
    now, InitRequest, InitResponse, JoinArgs, JoinedResponse, LeaveRequest, Role, Subnet,
    NOT_IN_SWARM,
};
use shoal_cluster::{
    protocol::{
        ControlRequest, ControlResponse, NetworkCreate, NetworkView, NodeView, ServiceChanges,
        ServiceView, TaskView,
    },
    state::{
        Availability, Constraint, EndpointMode, NodeStatus, PlacementPref, PlacementUpdate,
        PortConfig, PublishMode, ServiceMode, ServiceSpec, SourceMode, TaskState,
    },
};

use crate::{
    client::Client,
    output::{json, table, Format},
    server::AgentInfo,
};
use shoal_dataplane::overlay::NetworkDataplane;

#[derive(Subcommand)]
pub enum SwarmCommand {
    /// Create a swarm with this node as its first manager
    Init {
        /// Address (IP[:PORT]) other nodes reach this manager on [default: the agent's]
        #[arg(long)]
        advertise_addr: Option<String>,
        /// On a manager of a swarm that lost its quorum: continue as a one-manager swarm
        /// with this manager's state
        #[arg(long)]
        force_new_cluster: bool,
        /// Address pool overlay subnets come from; it must not overlap this node's networks
        /// [default: 10.0.0.0/8, its subnets taken around the node's addresses and routes]
        #[arg(long)]
        default_addr_pool: Option<Subnet>,
        /// Prefix length of the subnets taken from the pool
        #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u8).range(8..=30))]
        default_addr_pool_mask_length: u8,
        /// UDP port of the VXLAN data path [default: the agent's, 4789]
        #[arg(long)]
        data_path_port: Option<u16>,
        /// This node's source address for VXLAN traffic [default: the agent's data-path
        /// address, else the advertise address]
        #[arg(long)]
        data_path_addr: Option<std::net::Ipv4Addr>,
    },
    /// Join a swarm as a worker or a manager, as the token says
    Join {
        #[arg(long)]
        token: String,
        /// A manager's address, HOST:PORT
        remote: String,
        #[arg(long)]
        advertise_addr: Option<String>,
        /// This node's source address for VXLAN traffic [default: the agent's data-path
        /// address, else the advertise address]
        #[arg(long)]
        data_path_addr: Option<std::net::Ipv4Addr>,
    },
    /// Print the join command (or the token) for workers or managers
    JoinToken {
        #[arg(value_enum)]
        role: RoleArg,
        /// Only the token
        #[arg(short, long)]
        quiet: bool,
        /// Replace the token; the old one stops working at once
        #[arg(long)]
        rotate: bool,
    },
    /// Change swarm-wide settings (on a manager)
    Update {
        /// Add a new gossip encryption key now (the leader also does it every 12 hours)
        #[arg(long)]
        rotate_gossip_key: bool,
    },
    /// Leave the swarm (a manager needs --force)
    Leave {
        #[arg(long)]
        force: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum EndpointModeArg {
    Vip,
    Dnsrr,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Worker,
    Manager,
}

impl From<RoleArg> for Role {
    fn from(role: RoleArg) -> Self {
        match role {
            RoleArg::Worker => Role::Worker,
            RoleArg::Manager => Role::Manager,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AvailabilityArg {
    Active,
    Pause,
    Drain,
}

impl From<AvailabilityArg> for Availability {
    fn from(a: AvailabilityArg) -> Self {
        match a {
            AvailabilityArg::Active => Availability::Active,
            AvailabilityArg::Pause => Availability::Pause,
            AvailabilityArg::Drain => Availability::Drain,
        }
    }
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// List the swarm's nodes
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Details of a node (`self` for this one), as JSON unless --pretty
    Inspect {
        node: String,
        #[command(flatten)]
        format: InspectFormat,
    },
    /// Change a node's availability, labels or role
    Update {
        #[arg(long, value_enum)]
        availability: Option<AvailabilityArg>,
        #[arg(long = "label-add")]
        label_add: Vec<String>,
        #[arg(long = "label-rm")]
        label_rm: Vec<String>,
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        node: String,
    },
    /// Make nodes managers
    Promote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Make managers workers
    Demote {
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Remove nodes from the swarm
    Rm {
        #[arg(long)]
        force: bool,
        #[arg(required = true)]
        nodes: Vec<String>,
    },
    /// Tasks on a node (this one by default)
    Ps {
        #[arg(default_value = "self")]
        node: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

/// `inspect` prints JSON unless asked for a table, as Docker's does; `--pretty` is Docker's
/// name for the table.
#[derive(Args)]
pub struct InspectFormat {
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
    /// The same as --format table
    #[arg(long, conflicts_with = "format")]
    pretty: bool,
}

impl InspectFormat {
    fn get(&self) -> Format {
        if self.pretty {
            Format::Table
        } else {
            self.format
        }
    }
}

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Create an overlay network
    Create {
        /// Only `overlay` exists
        #[arg(long, default_value = "overlay", value_parser = ["overlay"])]
        driver: String,
        /// Subnet in CIDR form [default: the next free one of the swarm's pool]
        #[arg(long)]
        subnet: Option<Subnet>,
        /// Gateway address [default: the subnet's first host]
        #[arg(long)]
        gateway: Option<Ipv4Addr>,
        /// Let standalone processes attach, not only services
        #[arg(long)]
        attachable: bool,
        /// No route out of the swarm
        #[arg(long)]
        internal: bool,
        /// Driver options: mtu=N
        #[arg(long = "opt", short = 'o')]
        opts: Vec<String>,
        name: String,
    },
    /// List networks
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Details of a network and what this node programmed for it, as JSON unless --pretty
    Inspect {
        network: String,
        #[command(flatten)]
        format: InspectFormat,
    },
    /// Remove networks (refused while a service uses one)
    Rm {
        #[arg(required = true)]
        networks: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Create a service
    Create(CreateArgs),
    /// List services
    Ls {
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// A service's tasks, with their history
    Ps {
        service: String,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
    /// Details of a service, as JSON unless --pretty
    Inspect {
        service: String,
        #[command(flatten)]
        format: InspectFormat,
    },
    /// Set replica counts: NAME=N...
    Scale {
        #[arg(required = true)]
        scales: Vec<String>,
        #[arg(short, long)]
        detach: bool,
    },
    /// Change a service; anything but --replicas replaces its tasks in a rolling update
    Update {
        #[arg(long)]
        replicas: Option<u64>,
        #[arg(long = "env-add")]
        env_add: Vec<String>,
        /// Attach the tasks to another network
        #[arg(long = "network-add")]
        network_add: Vec<String>,
        /// Detach the tasks from a network
        #[arg(long = "network-rm")]
        network_rm: Vec<String>,
        /// Publish another port (as `create --publish`)
        #[arg(long = "publish-add", value_parser = PortConfig::parse)]
        publish_add: Vec<PortConfig>,
        /// Stop publishing a port: PUBLISHED or PUBLISHED/udp
        #[arg(long = "publish-rm")]
        publish_rm: Vec<String>,
        /// Add a placement constraint (as `create --constraint`)
        #[arg(long = "constraint-add")]
        constraint_add: Vec<String>,
        /// Remove a placement constraint, written as it was added
        #[arg(long = "constraint-rm")]
        constraint_rm: Vec<String>,
        /// Add a placement preference: spread=node.labels.NAME
        #[arg(long = "placement-pref-add")]
        placement_pref_add: Vec<String>,
        /// Remove a placement preference
        #[arg(long = "placement-pref-rm")]
        placement_pref_rm: Vec<String>,
        /// At most this many tasks on one node (0: no limit)
        #[arg(long)]
        replicas_max_per_node: Option<u64>,
        /// Replace the tasks even if nothing changed
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        containment: crate::containment_args::ContainmentArgs,
        #[command(flatten)]
        health: crate::health_args::HealthArgs,
        #[arg(short, long)]
        detach: bool,
        service: String,
    },
    /// Output of a service's tasks, gathered from the nodes that ran them
    Logs {
        service: String,
        /// Only the last N lines of each task
        #[arg(long)]
        tail: Option<usize>,
    },
    /// Remove services (their tasks stop)
    Rm {
        #[arg(required = true)]
        services: Vec<String>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    #[arg(long)]
    name: String,
    #[arg(long, conflicts_with = "mode")]
    replicas: Option<u64>,
    #[arg(long, value_parser = ["replicated", "global"])]
    mode: Option<String>,
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Where the tasks may run: KEY==VALUE or KEY!=VALUE, KEY being node.id,
    /// node.hostname, node.role, node.platform.os, node.platform.arch or node.labels.NAME
    #[arg(long = "constraint")]
    constraints: Vec<String>,
    /// Spread the tasks evenly over a node label's values first: spread=node.labels.NAME
    #[arg(long = "placement-pref")]
    placement_prefs: Vec<String>,
    /// At most this many of the service's tasks on one node (0: no limit)
    #[arg(long, default_value_t = 0)]
    replicas_max_per_node: u64,
    /// Overlay networks to attach each task to (eth0, eth1, ... in this order)
    #[arg(long = "network")]
    networks: Vec<String>,
    /// `vip`: one virtual IP per network, balanced in eBPF; `dnsrr`: no VIP
    #[arg(long, value_enum, default_value_t = EndpointModeArg::Vip)]
    endpoint_mode: EndpointModeArg,
    /// Publish a port on every node (routing mesh): 8080:80, 53:53/udp, or
    /// published=8080,target=80[,protocol=udp][,mode=host][,source=snat]
    #[arg(long = "publish", short = 'p', value_parser = PortConfig::parse)]
    ports: Vec<PortConfig>,
    #[arg(long, default_value_t = 1)]
    update_parallelism: u64,
    /// Delay between update batches: 10s, 1m, 500ms
    #[arg(long, default_value = "0s")]
    update_delay: String,
    #[command(flatten)]
    containment: crate::containment_args::ContainmentArgs,
    #[command(flatten)]
    health: crate::health_args::HealthArgs,
    /// Return at once instead of waiting for the tasks to run
    #[arg(short, long)]
    detach: bool,
    /// The command each task runs
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub async fn control(client: &Client, request: ControlRequest) -> Result<ControlResponse> {
    client.post("/v1/control", &request).await
}

/// Sends a control request and takes the kind of answer it must have.
macro_rules! ask {
    ($client:expr, $request:expr, $answer:ident) => {
        match control($client, $request).await? {
            ControlResponse::$answer(value) => value,
            other => bail!("unexpected answer from the agent: {other:?}"),
        }
    };
}

pub async fn swarm(client: &Client, command: SwarmCommand) -> Result<()> {
    match command {
        SwarmCommand::Init {
            advertise_addr,
            force_new_cluster,
            default_addr_pool,
            default_addr_pool_mask_length,
            data_path_port,
            data_path_addr,
        } => {
            let request = InitRequest {
                advertise_addr,
                force_new_cluster,
                default_addr_pool,
                default_addr_pool_mask_length: Some(default_addr_pool_mask_length),
                data_path_port,
                data_path_addr,
            };
            let init: InitResponse = client.post("/v1/swarm/init", &request).await?;
            println!(
                "Swarm initialized: current node ({}) is now a manager.\n",
                init.node_id
            );
            println!("To add a worker to this swarm, run the following command:\n");
            println!(
                "    shoal swarm join --token {} {}\n",
                init.worker_token, init.advertise
            );
            println!("To add a manager to this swarm, run 'shoal swarm join-token manager' and follow the instructions.");
        }
        SwarmCommand::Join {
            token,
            remote,
            advertise_addr,
            data_path_addr,
        } => {
            let joined: JoinedResponse = client
                .post(
                    "/v1/swarm/join",
                    &JoinArgs {
                        token,
                        remote,
                        advertise_addr,
                        data_path_addr,
                    },
                )
                .await?;
            println!(
                "This node joined a swarm as a {} ({}).",
                joined.role, joined.node_id
            );
        }
        SwarmCommand::JoinToken {
            role,
            quiet,
            rotate,
        } => {
            let role = Role::from(role);
            let token = ask!(client, ControlRequest::JoinToken { role, rotate }, Token);
            if quiet {
                println!("{token}");
            } else {
                let info: AgentInfo = client.get("/v1/info").await?;
                let advertise = info
                    .swarm
                    .map(|s| s.advertise.to_string())
                    .unwrap_or_default();
                if rotate {
                    println!("Successfully rotated {role} join token.\n");
                }
                println!("To add a {role} to this swarm, run the following command:\n");
                println!("    shoal swarm join --token {token} {advertise}\n");
            }
        }
        SwarmCommand::Update { rotate_gossip_key } => {
            if !rotate_gossip_key {
                bail!("nothing to update: pass --rotate-gossip-key");
            }
            control(client, ControlRequest::RotateGossipKey).await?;
            println!("A new gossip key is being distributed; nodes send with it after the next rotation.");
        }
        SwarmCommand::Leave { force } => {
            let () = client
                .post("/v1/swarm/leave", &LeaveRequest { force })
                .await?;
            println!("Node left the swarm.");
        }
    }
    Ok(())
}

async fn self_id(client: &Client) -> Result<String> {
    let info: AgentInfo = client.get("/v1/info").await?;
    Ok(info.swarm.context(NOT_IN_SWARM)?.node_id)
}

async fn resolve_self(client: &Client, node: String) -> Result<String> {
    if node == "self" {
        self_id(client).await
    } else {
        Ok(node)
    }
}

pub async fn node(client: &Client, command: NodeCommand) -> Result<()> {
    match command {
        NodeCommand::Ls { format } => {
            let nodes = ask!(client, ControlRequest::NodeList, Nodes);
            match format {
                Format::Json => print!("{}", json(&nodes)),
                Format::Table => print!("{}", render_nodes(&nodes, &self_id(client).await?)),
            }
        }
        NodeCommand::Inspect { node, format } => {
            let node = resolve_self(client, node).await?;
            let view = ask!(client, ControlRequest::NodeInspect { node }, Node);
            if format.get() == Format::Table {
                let labels: Vec<String> = view
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!("ID:                 {}", view.id);
                println!("Hostname:           {}", view.hostname);
                println!("Address:            {}", view.addr);
                println!("Role:               {}", view.role);
                println!("Status:             {}", status_label(view.status));
                println!(
                    "Availability:       {}",
                    availability_label(view.availability)
                );
                if !view.manager_status.is_empty() {
                    println!("Manager Status:     {}", view.manager_status);
                }
                println!("Labels:             {}", labels.join(", "));
                if !view.platform.os.is_empty() {
                    println!(
                        "Platform:           {}/{}",
                        view.platform.os, view.platform.arch
                    );
                }
                print!(
                    "{}",
                    crate::containment_args::render_node_resources(&view.resources)
                );
                println!("Created:            {}", ago(view.created_at));
            } else {
                print!("{}", json(&view));
            }
        }
        NodeCommand::Update {
            availability,
            label_add,
            label_rm,
            role,
            node,
        } => {
            let node = resolve_self(client, node).await?;
            control(
                client,
                ControlRequest::NodeUpdate {
                    node: node.clone(),
                    availability: availability.map(Into::into),
                    label_add,
                    label_rm,
                    role: role.map(Into::into),
                },
            )
            .await?;
            println!("{node}");
        }
        NodeCommand::Promote { nodes } => set_roles(client, nodes, Role::Manager).await?,
        NodeCommand::Demote { nodes } => set_roles(client, nodes, Role::Worker).await?,
        NodeCommand::Rm { force, nodes } => {
            for node in nodes {
                control(
                    client,
                    ControlRequest::NodeRemove {
                        node: node.clone(),
                        force,
                    },
                )
                .await?;
                println!("{node}");
            }
        }
        NodeCommand::Ps { node, format } => {
            let node = resolve_self(client, node).await?;
            let tasks = ask!(client, ControlRequest::NodeTasks { node }, Tasks);
            print_tasks(&tasks, format);
        }
    }
    Ok(())
}

async fn set_roles(client: &Client, nodes: Vec<String>, role: Role) -> Result<()> {
    for node in nodes {
        control(
            client,
            ControlRequest::NodeUpdate {
                node: node.clone(),
                availability: None,
                label_add: vec![],
                label_rm: vec![],
                role: Some(role),
            },
        )
        .await?;
        match role {
            Role::Manager => println!("Node {node} promoted to a manager in the swarm."),
            Role::Worker => println!("Manager {node} demoted in the swarm."),
        }
    }
    Ok(())
}

pub async fn network(client: &Client, command: NetworkCommand) -> Result<()> {
    match command {
        NetworkCommand::Create {
            driver: _,
            subnet,
            gateway,
            attachable,
            internal,
            opts,
            name,
        } => {
            let mut mtu = None;
            for opt in opts {
                match opt.split_once('=') {
                    Some(("mtu", value)) => {
                        mtu = Some(
                            value
                                .parse()
                                .with_context(|| format!("--opt {opt}: mtu must be a number"))?,
                        )
                    }
                    _ => bail!("--opt {opt}: the only option is mtu=N"),
                }
            }
            let request = NetworkCreate {
                name,
                subnet,
                gateway,
                attachable,
                internal,
                mtu,
            };
            let view = ask!(client, ControlRequest::NetworkCreate(request), Network);
            println!("{}", view.id);
        }
        NetworkCommand::Ls { format } => {
            let networks = ask!(client, ControlRequest::NetworkList, Networks);
            match format {
                Format::Json => print!("{}", json(&networks)),
                Format::Table => {
                    let rows: Vec<[String; 5]> = networks
                        .iter()
                        .map(|n| {
                            [
                                n.id[..12.min(n.id.len())].to_owned(),
                                n.name.clone(),
                                n.driver.clone(),
                                n.scope.clone(),
                                n.subnet.to_string(),
                            ]
                        })
                        .collect();
                    print!(
                        "{}",
                        table(["NETWORK ID", "NAME", "DRIVER", "SCOPE", "SUBNET"], &rows)
                    );
                }
            }
        }
        NetworkCommand::Inspect { network, format } => {
            // What this node programmed for it: its peers and the FDB and neighbour entries
            // read back from the kernel (null when no local task is on it). A worker only
            // has this part.
            let local: Option<NetworkDataplane> = client
                .get(&format!("/v1/networks/{network}/dataplane"))
                .await?;
            let view = match control(client, ControlRequest::NetworkInspect { network }).await {
                Ok(ControlResponse::Network(view)) => Some(view),
                Ok(other) => bail!("unexpected answer from the agent: {other:?}"),
                Err(_) if local.is_some() => None,
                Err(err) => return Err(err),
            };
            match format.get() {
                Format::Json => {
                    let mut value = match &view {
                        Some(view) => serde_json::to_value(view)?,
                        None => serde_json::json!({}),
                    };
                    value["local"] = serde_json::to_value(local)?;
                    print!("{}", json(&value));
                }
                Format::Table => print!("{}", render_network(view.as_ref(), local.as_ref())),
            }
        }
        NetworkCommand::Rm { networks } => {
            for network in networks {
                control(
                    client,
                    ControlRequest::NetworkRemove {
                        network: network.clone(),
                    },
                )
                .await?;
                println!("{network}");
            }
        }
    }
    Ok(())
}

pub async fn service(client: &Client, command: ServiceCommand) -> Result<()> {
    match command {
        ServiceCommand::Create(args) => {
            let detach = args.detach;
            let spec = service_spec(args)?;
            spec.validate()?;
            let view = ask!(client, ControlRequest::ServiceCreate(spec), Service);
            println!("{}", view.id);
            if !detach {
                wait_converged(client, &view.id).await?;
            }
        }
        ServiceCommand::Ls { format } => {
            let services = ask!(client, ControlRequest::ServiceList, Services);
            match format {
                Format::Json => print!("{}", json(&services)),
                Format::Table => print!("{}", render_services(&services)),
            }
        }
        ServiceCommand::Ps { service, format } => {
            let tasks = ask!(client, ControlRequest::ServiceTasks { service }, Tasks);
            print_tasks(&tasks, format);
        }
        ServiceCommand::Inspect { service, format } => {
            let view = ask!(client, ControlRequest::ServiceInspect { service }, Service);
            if format.get() == Format::Table {
                print!("{}", render_service(&view));
            } else {
                print!("{}", json(&view));
            }
        }
        ServiceCommand::Scale { scales, detach } => {
            let parsed = parse_scales(&scales)?;
            for (name, replicas) in parsed {
                let view = ask!(
                    client,
                    ControlRequest::ServiceUpdate {
                        service: name.clone(),
                        changes: ServiceChanges {
                            replicas: Some(replicas),
                            ..ServiceChanges::default()
                        },
                    },
                    Service
                );
                println!("{name} scaled to {replicas}");
                if !detach {
                    wait_converged(client, &view.id).await?;
                }
            }
        }
        ServiceCommand::Update {
            replicas,
            env_add,
            network_add,
            network_rm,
            publish_add,
            publish_rm,
            constraint_add,
            constraint_rm,
            placement_pref_add,
            placement_pref_rm,
            replicas_max_per_node,
            force,
            containment,
            health,
            detach,
            service,
        } => {
            let placement = PlacementUpdate {
                constraint_add,
                constraint_rm,
                pref_add: placement_pref_add,
                pref_rm: placement_pref_rm,
                max_replicas_per_node: replicas_max_per_node,
            };
            // Refused here already, with the flag named, rather than by the manager.
            placement.check()?;
            let view = ask!(
                client,
                ControlRequest::ServiceUpdate {
                    service,
                    changes: ServiceChanges {
                        replicas,
                        env_add,
                        network_add,
                        network_rm,
                        publish_add,
                        publish_rm,
                        force,
                        containment: containment.update(),
                        placement: Box::new(placement),
                        health: Box::new(health.update()),
                    },
                },
                Service
            );
            println!("{}", view.name);
            if !detach {
                wait_converged(client, &view.id).await?;
            }
        }
        ServiceCommand::Logs { service, tail } => {
            let lines = ask!(client, ControlRequest::ServiceLogs { service, tail }, Logs);
            let width = lines.iter().map(|l| l.source.len()).max().unwrap_or(0);
            for line in lines {
                println!("{:<width$} | {}", line.source, line.line);
            }
        }
        ServiceCommand::Rm { services } => {
            for service in services {
                control(
                    client,
                    ControlRequest::ServiceRemove {
                        service: service.clone(),
                    },
                )
                .await?;
                println!("{service}");
            }
        }
    }
    Ok(())
}

/// The spec `service create` asks for.
fn service_spec(args: CreateArgs) -> Result<ServiceSpec> {
    let mode = match (args.mode.as_deref(), args.replicas) {
        (Some("global"), _) => ServiceMode::Global,
        (_, replicas) => ServiceMode::Replicated {
            replicas: replicas.unwrap_or(1),
        },
    };
    Ok(ServiceSpec {
        name: args.name,
        mode,
        command: args.command,
        env: args.env,
        constraints: args
            .constraints
            .iter()
            .map(|c| Constraint::parse(c))
            .collect::<Result<_>>()?,
        placement_prefs: args
            .placement_prefs
            .iter()
            .map(|p| PlacementPref::parse(p))
            .collect::<Result<_>>()?,
        max_replicas_per_node: args.replicas_max_per_node,
        update_parallelism: args.update_parallelism,
        update_delay_secs: parse_duration_secs(&args.update_delay)?,
        networks: args.networks,
        endpoint_mode: match args.endpoint_mode {
            EndpointModeArg::Vip => EndpointMode::Vip,
            EndpointModeArg::Dnsrr => EndpointMode::Dnsrr,
        },
        ports: args.ports,
        containment: args.containment.containment()?,
        healthcheck: args.health.healthcheck()?,
    })
}

/// `service inspect --pretty`.
fn render_service(view: &ServiceView) -> String {
    let ports: Vec<String> = view.ports.iter().map(ToString::to_string).collect();
    [
        format!("ID:             {}", view.id),
        format!("Name:           {}", view.name),
        format!("Mode:           {}", mode_label(&view.mode)),
        format!("Replicas:       {}/{}", view.running, view.desired),
        format!("Command:        {}", view.command.join(" ")),
        format!("Env:            {}", view.env.join(" ")),
        format!("Constraints:    {}", view.constraints.join(", ")),
        format!("Preferences:    {}", view.placement_prefs.join(", ")),
        format!(
            "Max per node:   {}",
            match view.max_replicas_per_node {
                0 => "unlimited".to_owned(),
                n => n.to_string(),
            }
        ),
        format!("Networks:       {}", view.networks.join(", ")),
        format!("Ports:          {}", ports.join(", ")),
        format!(
            "Update:         parallelism {}, delay {}s",
            view.update_parallelism, view.update_delay_secs
        ),
    ]
    .iter()
    .map(|line| format!("{line}\n"))
    .chain([
        crate::containment_args::render_containment(&view.containment),
        crate::health_args::render_healthcheck(view.healthcheck.as_ref()),
        format!("Version:        {}\n", view.version),
    ])
    .collect()
}

/// `service scale NAME=N...`, all checked before any is asked.
fn parse_scales(scales: &[String]) -> Result<Vec<(String, u64)>> {
    scales
        .iter()
        .map(|scale| {
            let (name, n) = scale
                .split_once('=')
                .with_context(|| format!("{scale:?}: expected SERVICE=REPLICAS"))?;
            let replicas: u64 = n
                .parse()
                .with_context(|| format!("{scale:?}: replicas must be a number"))?;
            Ok((name.to_owned(), replicas))
        })
        .collect()
}

/// Docker-like progress until every task of the current spec runs.
async fn wait_converged(client: &Client, service: &str) -> Result<()> {
    const LIMIT: Duration = Duration::from_secs(120);
    let started = Instant::now();
    let mut last = None;
    loop {
        let view = ask!(
            client,
            ControlRequest::ServiceInspect {
                service: service.to_owned(),
            },
            Service
        );
        let tasks = ask!(
            client,
            ControlRequest::ServiceTasks {
                service: service.to_owned(),
            },
            Tasks
        );
        let current: Vec<&TaskView> = tasks
            .iter()
            .filter(|t| t.desired == TaskState::Running)
            .collect();
        // Done means running the current spec: a rolling update counts replaced tasks.
        let running = current
            .iter()
            .filter(|t| t.state == TaskState::Running && t.service_version == view.version)
            .count() as u64;
        let stale = tasks.iter().any(|t| {
            t.desired != TaskState::Running && !t.state.is_terminal() && !t.node.is_empty()
        });
        let progress = (running, view.desired);
        if last != Some(progress) {
            println!("overall progress: {running} out of {} tasks", view.desired);
            last = Some(progress);
        }
        if running == view.desired && current.len() as u64 == view.desired && !stale {
            println!("verify: Service converged");
            return Ok(());
        }
        if started.elapsed() > LIMIT {
            let errors: Vec<String> = tasks
                .iter()
                .filter(|t| !t.error.is_empty() || t.message.starts_with("no suitable node"))
                .map(|t| {
                    format!(
                        "{}: {}",
                        t.name,
                        if t.error.is_empty() {
                            &t.message
                        } else {
                            &t.error
                        }
                    )
                })
                .collect();
            bail!(
                "service {0} did not converge within {LIMIT:?} ({running}/{1} running){2}; \
                 `shoal service ps {0}` shows where each task stands",
                view.name,
                view.desired,
                if errors.is_empty() {
                    String::new()
                } else {
                    format!(": {}", errors.join("; "))
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `shoal task inspect TASK`: the task as the managers know it, with its health.
pub async fn task_inspect(client: &Client, task: String, format: &InspectFormat) -> Result<()> {
    let tasks = ask!(client, ControlRequest::TaskInspect { task }, Tasks);
    let task = tasks.first().context("the managers answered no task")?;
    match format.get() {
        Format::Table => print!("{}", crate::health_args::render_task(task)),
        Format::Json => print!("{}", json(task)),
    }
    Ok(())
}

/// `shoal task exec TASK -- CMD`: runs CMD in the task's namespaces on this node.
pub async fn task_exec(client: &Client, task: &str, command: &[String]) -> Result<ExitCode> {
    let pid: u32 = client.get(&format!("/v1/tasks/{task}/pid")).await?;
    let mut nsenter = shoal_dataplane::task_exec::command_in_task(
        pid,
        command,
        &std::env::current_exe().context("finding the shoal binary")?,
    )?;
    let status = nsenter.status().context("running nsenter (util-linux)")?;
    // A command killed by a signal exits 128 + the signal, as in a shell.
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(code as u8),
        (None, Some(signal)) => ExitCode::from(128 + signal as u8),
        (None, None) => ExitCode::FAILURE,
    })
}

/// `shoal whoami`: answers HTTP requests with who it is and who asked; echoes other TCP, and
/// UDP on the same port (logging each datagram, so tests can see what reached a task).
pub fn whoami(listen: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("listening on {listen}"))?;
    let udp = std::net::UdpSocket::bind(listener.local_addr()?)
        .with_context(|| format!("listening on {listen}/udp"))?;
    std::thread::spawn(move || whoami_udp(&udp));
    eprintln!(
        "whoami listening on {} (tcp and udp)",
        listener.local_addr()?
    );
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let _ = whoami_connection(stream);
        });
    }
    Ok(())
}

/// Echoes every datagram to its sender, after logging where it came from and what it said.
fn whoami_udp(socket: &std::net::UdpSocket) {
    let mut buf = vec![0u8; 65_536];
    while let Ok((n, peer)) = socket.recv_from(&mut buf) {
        eprintln!(
            "udp from {peer}: {}",
            String::from_utf8_lossy(&buf[..n]).trim_end()
        );
        let _ = socket.send_to(&buf[..n], peer);
    }
}

fn whoami_connection(mut stream: TcpStream) -> Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut buf = vec![0u8; 8192];
    let n = stream.read(&mut buf)?;
    let request = &buf[..n];
    let methods: [&[u8]; 5] = [b"GET ", b"HEAD ", b"POST ", b"PUT ", b"DELETE "];
    if !methods.iter().any(|m| request.starts_with(m)) {
        // TCP echo, bounded by the read timeout.
        stream.write_all(request)?;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            stream.write_all(&buf[..n])?;
        }
    }
    let hostname = nix::unistd::gethostname()?.to_string_lossy().into_owned();
    let mut body = format!("Hostname: {hostname}\n");
    if let Ok(task) = std::env::var("SHOAL_TASK_NAME") {
        body.push_str(&format!("Task: {task}\n"));
    }
    for ifa in nix::ifaddrs::getifaddrs()? {
        if let Some(v4) = ifa.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
            body.push_str(&format!("IP: {}\n", v4.ip()));
        }
    }
    body.push_str(&format!("RemoteAddr: {}\n", stream.peer_addr()?));
    let first_line = String::from_utf8_lossy(request)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    body.push_str(&format!("Request: {first_line}\n"));
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

fn parse_duration_secs(text: &str) -> Result<u64> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .with_context(|| format!("duration {text:?}: expected e.g. 10s, 1m, 500ms"))?;
    Ok(match unit {
        "" | "s" => n,
        "ms" => n.div_ceil(1000),
        "m" => n * 60,
        "h" => n * 3600,
        _ => bail!("duration {text:?}: unit must be ms, s, m or h"),
    })
}

fn status_label(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Ready => "Ready",
        NodeStatus::Down => "Down",
    }
}

fn availability_label(availability: Availability) -> &'static str {
    match availability {
        Availability::Active => "Active",
        Availability::Pause => "Pause",
        Availability::Drain => "Drain",
    }
}

fn mode_label(mode: &ServiceMode) -> &'static str {
    match mode {
        ServiceMode::Replicated { .. } => "replicated",
        ServiceMode::Global => "global",
    }
}

/// "3 minutes ago", as Docker words it.
fn ago(at: u64) -> String {
    let secs = now().saturating_sub(at);
    match secs {
        0..=1 => "Less than a second ago".into(),
        2..=59 => format!("{secs} seconds ago"),
        60..=119 => "About a minute ago".into(),
        120..=3599 => format!("{} minutes ago", secs / 60),
        3600..=7199 => "About an hour ago".into(),
        7200..=172_799 => format!("{} hours ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

fn render_nodes(nodes: &[NodeView], me: &str) -> String {
    let mut rows: Vec<[String; 5]> = nodes
        .iter()
        .map(|n| {
            [
                if n.id == me {
                    format!("{} *", n.id)
                } else {
                    n.id.clone()
                },
                n.hostname.clone(),
                status_label(n.status).into(),
                availability_label(n.availability).into(),
                n.manager_status.clone(),
            ]
        })
        .collect();
    rows.sort_by(|a, b| a[1].cmp(&b[1]));
    table(
        ["ID", "HOSTNAME", "STATUS", "AVAILABILITY", "MANAGER STATUS"],
        &rows,
    )
}

fn render_services(services: &[ServiceView]) -> String {
    let rows: Vec<[String; 6]> = services
        .iter()
        .map(|s| {
            [
                s.id[..12.min(s.id.len())].to_owned(),
                s.name.clone(),
                mode_label(&s.mode).into(),
                format!("{}/{}", s.running, s.desired),
                s.command.join(" "),
                ports_column(&s.ports),
            ]
        })
        .collect();
    table(
        ["ID", "NAME", "MODE", "REPLICAS", "COMMAND", "PORTS"],
        &rows,
    )
}

/// The PORTS column, as Docker writes it (`*:8080->80/tcp`), with the mode when it is not
/// the routing mesh's default.
fn ports_column(ports: &[PortConfig]) -> String {
    ports
        .iter()
        .map(|p| {
            let mut text = format!("*:{}->{}/{}", p.published, p.target, p.protocol.name());
            if p.mode == PublishMode::Host {
                text.push_str(" (host)");
            }
            if p.source == SourceMode::Snat {
                text.push_str(" (snat)");
            }
            text
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `network inspect --pretty`: the managers' view (absent on a worker), then what this node
/// programmed for the network (absent without a local task on it).
fn render_network(view: Option<&NetworkView>, local: Option<&NetworkDataplane>) -> String {
    let mut out = String::new();
    if let Some(n) = view {
        let flags = [
            (n.ingress, "ingress"),
            (n.attachable, "attachable"),
            (n.internal, "internal"),
        ];
        let mut options: Vec<String> = flags
            .iter()
            .filter(|(set, _)| *set)
            .map(|(_, name)| (*name).to_owned())
            .collect();
        options.extend(n.mtu.map(|mtu| format!("mtu={mtu}")));
        let rows = [
            ("ID", n.id.clone()),
            ("Name", n.name.clone()),
            ("Driver", format!("{} ({})", n.driver, n.scope)),
            ("Subnet", n.subnet.to_string()),
            ("Gateway", n.gateway.to_string()),
            ("VNI", n.vni.to_string()),
            ("Options", options.join(", ")),
            ("Services", n.services.join(", ")),
            ("Created", ago(n.created_at)),
        ];
        for (key, value) in rows {
            out.push_str(&format!("{:<20}{value}\n", format!("{key}:")));
        }
    }
    let Some(local) = local else {
        out.push_str("On this node:       nothing programmed (no local task on it)\n");
        return out;
    };
    out.push_str(&format!(
        "On this node:       {} in namespace {}, VNI {}, MTU {}, local VTEP {}:{}\n\n",
        local.vxlan, local.netns, local.vni, local.mtu, local.local, local.port
    ));
    let peers: Vec<[String; 4]> = local
        .peers
        .iter()
        .map(|p| {
            let (ip, vtep) = (p.ip.to_string(), p.vtep.to_string());
            [p.endpoint.clone(), ip, p.mac.clone(), vtep]
        })
        .collect();
    let pairs = |entries: &[(String, String)]| -> Vec<[String; 2]> {
        entries
            .iter()
            .map(|(a, b)| [a.clone(), b.clone()])
            .collect()
    };
    out.push_str(&table(["PEER ENDPOINT", "IP", "MAC", "VTEP"], &peers));
    out.push('\n');
    out.push_str(&table(["FDB MAC", "VTEP"], &pairs(&local.fdb)));
    out.push('\n');
    out.push_str(&table(["NEIGHBOUR IP", "MAC"], &pairs(&local.neighbours)));
    out
}

fn print_tasks(tasks: &[TaskView], format: Format) {
    match format {
        Format::Json => print!("{}", json(&tasks)),
        Format::Table => print!("{}", render_tasks(tasks)),
    }
}

fn render_tasks(tasks: &[TaskView]) -> String {
    // Tasks come grouped by slot, newest first: the first of a slot is its current task.
    let mut seen = BTreeMap::new();
    // Services routing to unhealthy tasks because none is healthy (fail open).
    let running = |t: &&TaskView| t.state == TaskState::Running;
    let failing_open: std::collections::BTreeSet<&str> = tasks
        .iter()
        .filter(running)
        .map(|t| t.service.as_str())
        .filter(|service| {
            tasks
                .iter()
                .filter(running)
                .filter(|t| t.service == *service)
                .all(|t| {
                    t.health
                        .as_ref()
                        .is_some_and(|h| h.status == shoal_cluster::health::HealthStatus::Unhealthy)
                })
        })
        .collect();
    let rows: Vec<[String; 7]> = tasks
        .iter()
        .map(|t| {
            let history = seen
                .insert((t.service.clone(), t.slot, t.node_id.clone()), ())
                .is_some();
            let state = if t.state == TaskState::Pending && t.node.is_empty() {
                format!("Pending {}", ago(t.state_since).to_lowercase())
            } else {
                let health = match t.state {
                    TaskState::Running => crate::health_args::state_suffix(
                        t.health.as_ref(),
                        failing_open.contains(t.service.as_str()),
                    ),
                    _ => String::new(),
                };
                format!(
                    "{}{health} {}",
                    t.state.label(),
                    ago(t.state_since).to_lowercase()
                )
            };
            [
                t.id[..12.min(t.id.len())].to_owned(),
                if history {
                    format!(" \\_ {}", t.name)
                } else {
                    t.name.clone()
                },
                t.node.clone(),
                t.desired.label().into(),
                state,
                if t.error.is_empty() && t.message.starts_with("no suitable node") {
                    t.message.clone()
                } else {
                    t.error.clone()
                },
                ports_column(&t.host_ports),
            ]
        })
        .collect();
    table(
        [
            "ID",
            "NAME",
            "NODE",
            "DESIRED STATE",
            "CURRENT STATE",
            "ERROR",
            "PORTS",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_column_reads_as_dockers_with_non_default_modes_named() {
        let ports: Vec<PortConfig> = [
            "8080:80",
            "published=5353,target=53,protocol=udp,mode=host",
            "published=9090,target=90,source=snat",
        ]
        .iter()
        .map(|p| PortConfig::parse(p).unwrap())
        .collect();
        assert_eq!(
            ports_column(&ports),
            "*:8080->80/tcp, *:5353->53/udp (host), *:9090->90/tcp (snat)"
        );
        assert_eq!(ports_column(&[]), "");
    }

    #[test]
    fn network_inspect_table_shows_the_view_and_what_this_node_programmed() {
        let view = NetworkView {
            id: "k2x7w0qv3m1s8d4n6p9r5t2yb".into(),
            name: "front".into(),
            driver: "overlay".into(),
            scope: "swarm".into(),
            subnet: "10.0.1.0/24".parse().unwrap(),
            gateway: Ipv4Addr::new(10, 0, 1, 1),
            vni: 4097,
            attachable: false,
            internal: true,
            mtu: Some(1400),
            ingress: false,
            services: vec!["web".into()],
            created_at: now(),
        };
        let local = NetworkDataplane {
            netns: "shoal-net-front".into(),
            vxlan: "vx-4097".into(),
            vni: 4097,
            mtu: 1400,
            local: "192.168.77.11".into(),
            port: 4789,
            peers: vec![shoal_dataplane::overlay::ProgrammedPeer {
                endpoint: "task1".into(),
                ip: Ipv4Addr::new(10, 0, 1, 3),
                mac: "02:42:0a:00:01:03".into(),
                vtep: "192.168.77.12".parse().unwrap(),
            }],
            fdb: vec![("02:42:0a:00:01:03".into(), "192.168.77.12".into())],
            neighbours: vec![("10.0.1.3".into(), "02:42:0a:00:01:03".into())],
        };
        let out = render_network(Some(&view), Some(&local));
        assert!(
            out.contains("Options:            internal, mtu=1400\n"),
            "{out}"
        );
        assert!(
            out.contains("VNI 4097, MTU 1400, local VTEP 192.168.77.11:4789"),
            "{out}"
        );
        assert!(out.contains("task1           10.0.1.3"), "{out}");
        assert!(out.contains("NEIGHBOUR IP   MAC\n10.0.1.3"), "{out}");
        // A worker has only its own part; a manager without a local task only the view.
        assert!(render_network(None, Some(&local)).starts_with("On this node:"));
        assert!(render_network(Some(&view), None).ends_with("(no local task on it)\n"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration_secs("10s").unwrap(), 10);
        assert_eq!(parse_duration_secs("2m").unwrap(), 120);
        assert_eq!(parse_duration_secs("1500ms").unwrap(), 2);
        assert_eq!(parse_duration_secs("7").unwrap(), 7);
        assert!(parse_duration_secs("ten").is_err());
        assert!(parse_duration_secs("5d").is_err());
    }
}
