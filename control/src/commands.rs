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
        ControlRequest, ControlResponse, LogLine, NetworkCreate, NetworkView, NodeView,
        ServiceChanges, ServiceView, TaskView, UnreadableNode,
    },
    state::{
        Availability, Constraint, EndpointMode, NodeStatus, PlacementPref, PlacementUpdate,
        PortConfig, PublishMode, ServiceMode, ServiceSpec, SourceMode, TaskState,
    },
};

use shoal_docker::rows;

use crate::{
    client::Client,
    log_follower::LogFollower,
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
        #[command(flatten)]
        format: ListFormat,
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
        #[command(flatten)]
        format: ListFormat,
    },
}

/// `inspect` prints Docker's document (the Engine API's) unless asked otherwise, as Docker's
/// does; `--pretty` is Docker's name for the table.
#[derive(Args)]
pub struct InspectFormat {
    /// `table`, `json` (shoal's own object, as the agent's API answers it), or a Go template
    /// over Docker's document: `{{json .Endpoint.Spec.Ports}}` [default: Docker's document]
    #[arg(long, value_parser = crate::output::TemplateFormat)]
    format: Option<String>,
    /// The same as --format table
    #[arg(long, conflicts_with = "format")]
    pretty: bool,
}

/// What `inspect` prints.
#[derive(PartialEq)]
pub enum Inspect {
    Docker,
    Table,
    Json,
    Template(String),
}

impl InspectFormat {
    pub fn get(&self) -> Inspect {
        match (self.pretty, self.format.as_deref()) {
            (true, _) | (false, Some("table")) => Inspect::Table,
            (false, None) => Inspect::Docker,
            (false, Some("json")) => Inspect::Json,
            (false, Some(template)) => Inspect::Template(template.to_owned()),
        }
    }

    /// Docker's documents, as `docker X inspect` prints them (or through the template).
    pub fn print_docker<T: serde::Serialize>(&self, documents: &[T]) -> Result<()> {
        match self.get() {
            Inspect::Template(template) => {
                let format = shoal_docker::template::Format::parse(&template, "")?;
                for document in documents {
                    println!("{}", format.render_one(document)?);
                }
            }
            _ => print!("{}", docker_json(documents)?),
        }
        Ok(())
    }
}

/// Docker's indentation (four spaces).
pub fn docker_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    let mut out = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    value.serialize(&mut serde_json::Serializer::with_formatter(
        &mut out, formatter,
    ))?;
    Ok(String::from_utf8(out)? + "\n")
}

/// `ls`/`ps`: a table for people, `json` (the API's objects), or a Go template over Docker's
/// row fields (`{{.Name}}`), `table` in front for a header and aligned columns.
#[derive(Args)]
pub struct ListFormat {
    /// `table`, `json`, or a Go template: `{{.Name}}`, `table {{.ID}}\t{{.Name}}`
    #[arg(long, default_value = "table", value_parser = crate::output::TemplateFormat)]
    format: String,
}

impl ListFormat {
    fn get(&self) -> Format {
        match self.format.as_str() {
            "json" => Format::Json,
            _ => Format::Table,
        }
    }

    /// The template, unless the format is plain `table` or `json`.
    fn template(&self) -> Option<&str> {
        (!["table", "json"].contains(&self.format.as_str())).then_some(self.format.as_str())
    }

    /// Rows through the template; false when there is none (the caller prints).
    fn print_rows<T: serde::Serialize>(
        &self,
        rows: impl FnOnce() -> Vec<T>,
        (headers, columns): (&[(&str, &str)], &str),
    ) -> Result<bool> {
        let Some(template) = self.template() else {
            return Ok(false);
        };
        let format = shoal_docker::template::Format::parse(template, columns)?;
        print!("{}", format.render(&rows(), headers)?);
        Ok(true)
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
        #[command(flatten)]
        format: ListFormat,
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
        #[command(flatten)]
        format: ListFormat,
    },
    /// A service's tasks, with their history
    Ps {
        service: String,
        #[command(flatten)]
        format: ListFormat,
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
        policies: crate::update_args::UpdateArgs,
        #[command(flatten)]
        health: crate::health_args::HealthArgs,
        /// Go back to the previous spec (as `service rollback`)
        #[arg(long)]
        rollback: bool,
        /// Return at once instead of following the update
        #[arg(short, long)]
        detach: bool,
        service: String,
    },
    /// Go back to the spec before the last update, with the rollback config
    Rollback {
        /// Return at once instead of following the rollback
        #[arg(short, long)]
        detach: bool,
        service: String,
    },
    /// Output of a service's tasks, gathered from the nodes that ran them
    Logs {
        service: String,
        /// Only the last N lines of each task
        #[arg(short = 'n', long)]
        tail: Option<usize>,
        /// Keep printing what the tasks write (new tasks too) until interrupted or the
        /// service is removed
        #[arg(short, long)]
        follow: bool,
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
    #[command(flatten)]
    containment: crate::containment_args::ContainmentArgs,
    #[command(flatten)]
    policies: crate::update_args::UpdateArgs,
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
            let me = self_id(client).await?;
            let headers = (rows::NODE_HEADERS, rows::NODE_COLUMNS);
            if format.print_rows(|| node_rows(&nodes, &me), headers)? {
                return Ok(());
            }
            match format.get() {
                Format::Json => print!("{}", json(&nodes)),
                Format::Table => print!("{}", render_nodes(&nodes, &me)),
            }
        }
        NodeCommand::Inspect { node, format } => {
            let node = resolve_self(client, node).await?;
            if !matches!(format.get(), Inspect::Table | Inspect::Json) {
                return format.print_docker(&[shoal_docker::node(client, &node).await?]);
            }
            let view = ask!(client, ControlRequest::NodeInspect { node }, Node);
            if format.get() == Inspect::Table {
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
            print_tasks(client, &tasks, &format).await?;
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
            let headers = (rows::NETWORK_HEADERS, rows::NETWORK_COLUMNS);
            if format.print_rows(|| network_rows(&networks), headers)? {
                return Ok(());
            }
            match format.get() {
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
        NetworkCommand::Inspect { network, format }
            if !matches!(format.get(), Inspect::Table | Inspect::Json) =>
        {
            format.print_docker(&[shoal_docker::network(client, &network).await?])?;
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
                Inspect::Json => {
                    let mut value = match &view {
                        Some(view) => serde_json::to_value(view)?,
                        None => serde_json::json!({}),
                    };
                    value["local"] = serde_json::to_value(local)?;
                    print!("{}", json(&value));
                }
                _ => print!("{}", render_network(view.as_ref(), local.as_ref())),
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
            let view = ask!(
                client,
                ControlRequest::ServiceCreate(Box::new(spec)),
                Service
            );
            println!("{}", view.id);
            if !detach {
                follow_rollout(client, &view.id).await?;
            }
        }
        ServiceCommand::Ls { format } => {
            let services = ask!(client, ControlRequest::ServiceList, Services);
            let headers = (rows::SERVICE_HEADERS, rows::SERVICE_COLUMNS);
            if format.print_rows(|| service_rows(&services), headers)? {
                return Ok(());
            }
            match format.get() {
                Format::Json => print!("{}", json(&services)),
                Format::Table => print!("{}", render_services(&services)),
            }
        }
        ServiceCommand::Ps { service, format } => {
            let tasks = ask!(client, ControlRequest::ServiceTasks { service }, Tasks);
            print_tasks(client, &tasks, &format).await?;
        }
        ServiceCommand::Inspect { service, format } => match format.get() {
            Inspect::Table | Inspect::Json => {
                let view = ask!(client, ControlRequest::ServiceInspect { service }, Service);
                if format.get() == Inspect::Table {
                    print!("{}", render_service(&view));
                } else {
                    print!("{}", json(&view));
                }
            }
            _ => format.print_docker(&[shoal_docker::service(client, &service).await?])?,
        },
        ServiceCommand::Scale { scales, detach } => {
            let parsed = parse_scales(&scales)?;
            for (name, replicas) in parsed {
                let view = ask!(
                    client,
                    ControlRequest::ServiceUpdate {
                        service: name.clone(),
                        changes: Box::new(ServiceChanges {
                            replicas: Some(replicas),
                            ..ServiceChanges::default()
                        }),
                    },
                    Service
                );
                println!("{name} scaled to {replicas}");
                if !detach {
                    follow_rollout(client, &view.id).await?;
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
            policies,
            health,
            rollback,
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
                    changes: Box::new(ServiceChanges {
                        replicas,
                        env_add,
                        network_add,
                        network_rm,
                        publish_add,
                        publish_rm,
                        force,
                        containment: containment.update(),
                        placement: Box::new(placement),
                        policy: Box::new(policies.update()),
                        rollback,
                        health: Box::new(health.update()),
                    }),
                },
                Service
            );
            println!("{}", view.name);
            if !detach {
                follow_rollout(client, &view.id).await?;
            }
        }
        ServiceCommand::Rollback { detach, service } => {
            let view = ask!(
                client,
                ControlRequest::ServiceUpdate {
                    service,
                    changes: Box::new(ServiceChanges {
                        rollback: true,
                        ..ServiceChanges::default()
                    }),
                },
                Service
            );
            println!("{}", view.name);
            if !detach {
                follow_rollout(client, &view.id).await?;
            }
        }
        ServiceCommand::Logs {
            service,
            tail,
            follow: false,
        } => {
            let request = ControlRequest::ServiceLogs {
                service,
                tail,
                after: None,
            };
            let logs = ask!(client, request, Logs);
            print_log_lines(&logs.lines, &mut 0);
            if !logs.unreadable.is_empty() {
                let nodes: Vec<String> = logs.unreadable.iter().map(unreadable).collect();
                bail!("incomplete logs: {}", nodes.join("; "));
            }
        }
        ServiceCommand::Logs {
            service,
            tail,
            follow: true,
        } => follow_logs(client, &service, tail).await?,
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
    let mut spec = ServiceSpec {
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
        update_parallelism: 1,
        update_delay_secs: 0,
        networks: args.networks,
        endpoint_mode: match args.endpoint_mode {
            EndpointModeArg::Vip => EndpointMode::Vip,
            EndpointModeArg::Dnsrr => EndpointMode::Dnsrr,
        },
        ports: args.ports,
        containment: args.containment.containment()?,
        restart: Default::default(),
        update_control: Default::default(),
        rollback_config: Default::default(),
        healthcheck: args.health.healthcheck()?,
    };
    args.policies.apply_to(&mut spec);
    Ok(spec)
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
    ]
    .iter()
    .map(|line| format!("{line}\n"))
    .chain([
        crate::update_args::render_policies(
            &view.restart_policy,
            &view.update_config,
            &view.rollback_config,
        ),
        render_update_status(view),
        crate::containment_args::render_containment(&view.containment),
        crate::health_args::render_healthcheck(view.healthcheck.as_deref()),
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

/// `UpdateStatus:` of `service inspect --pretty`, when the service was ever updated.
fn render_update_status(view: &ServiceView) -> String {
    let Some(status) = &view.update_status else {
        return String::new();
    };
    let mut text = format!(
        "UpdateStatus:\n State:         {}\n Started:       {}\n",
        status.state,
        ago(status.started_at)
    );
    if let Some(at) = status.completed_at {
        text.push_str(&format!(" Completed:     {}\n", ago(at)));
    }
    text.push_str(&format!(" Message:       {}\n", status.message));
    text
}

/// Follows `service create/update/scale/rollback` until the service converged (and a rollout
/// in progress completed), as Docker's progress does: the overall count, each slot's state
/// (`1/3: running`, a failed task's error), the rollout's turns. One line per change, so a
/// pipe or a log reads it as well as a terminal. A paused rollout, or an update that rolled
/// back, is an error with the reason.
async fn follow_rollout(client: &Client, service: &str) -> Result<()> {
    const LIMIT: Duration = Duration::from_secs(120);
    let started = Instant::now();
    let mut last_overall = None;
    let mut slots: BTreeMap<String, String> = BTreeMap::new();
    let mut last_status: Option<String> = None;
    let mut rolled_back = None;
    let mut versions = std::collections::BTreeSet::new();
    let mut failed = std::collections::BTreeSet::new();
    // A rollout is followed when one is in progress as the command returns (not one a
    // `create` or `scale` finds completed long ago).
    let mut follow = None;
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
        for (slot, line) in slot_lines(&view, &tasks) {
            if slots.get(&slot) != Some(&line) {
                println!("{slot}: {line}");
                slots.insert(slot, line);
            }
        }
        // Failures of this rollout's tasks, once each, also of a spec rolled back since.
        versions.insert(view.version);
        for task in tasks
            .iter()
            .filter(|t| !t.error.is_empty() && versions.contains(&t.service_version))
        {
            if failed.insert(task.id.clone()) {
                let state = task.state.label().to_lowercase();
                println!("{}: {state}: {}", slot_name(&view, task), task.error);
            }
        }
        let progress = rollout_progress(&view, &tasks);
        if last_overall != Some(progress.running) {
            println!(
                "overall progress: {} out of {} tasks",
                progress.running, view.desired
            );
            last_overall = Some(progress.running);
        }
        // The rollout's own turns: paused, rolled back, completed.
        let status = view.update_status.as_ref();
        let follow = *follow.get_or_insert(status.is_some_and(|s| s.in_progress()));
        let rollout = status.filter(|_| follow);
        if let Some(status) = rollout {
            let line = format!("{}: {}", status.state, status.message);
            if last_status.as_ref() != Some(&line) {
                if status.is_rollback() {
                    println!("rollback: {}", status.message);
                }
                if status.message.starts_with("update rolled back") {
                    rolled_back = Some(status.message.clone());
                }
                last_status = Some(line);
            }
            if !status.in_progress() && status.completed_at.is_none() {
                bail!("{}", status.message);
            }
        }
        let rollout_done = rollout.is_none_or(|s| s.completed_at.is_some());
        if progress.converged && rollout_done {
            println!("verify: Service converged");
            if let Some(why) = rolled_back {
                bail!("service {} rolled back: {why}", view.name);
            }
            return Ok(());
        }
        if started.elapsed() > LIMIT {
            bail!(
                "service {0} did not converge within {LIMIT:?} ({1}/{2} running){3}; \
                 `shoal service ps {0}` shows where each task stands",
                view.name,
                progress.running,
                view.desired,
                progress.errors
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

struct Progress {
    /// Tasks running the current spec.
    running: u64,
    /// Exactly the desired tasks run the current spec, and no old one is still stopping.
    converged: bool,
    /// `: web.1: error; ...` of the tasks that failed or wait for a node, or empty.
    errors: String,
}

fn rollout_progress(view: &ServiceView, tasks: &[TaskView]) -> Progress {
    let current: Vec<&TaskView> = tasks
        .iter()
        .filter(|t| t.desired == TaskState::Running)
        .collect();
    let running = current
        .iter()
        .filter(|t| t.state == TaskState::Running && t.service_version == view.version)
        .count() as u64;
    let stale = tasks
        .iter()
        .any(|t| t.desired != TaskState::Running && !t.state.is_terminal() && !t.node.is_empty());
    let errors: Vec<String> = tasks
        .iter()
        .filter(|t| !t.error.is_empty() || t.message.starts_with("no suitable node"))
        .map(|t| {
            let why = if t.error.is_empty() {
                &t.message
            } else {
                &t.error
            };
            format!("{}: {why}", t.name)
        })
        .collect();
    Progress {
        running,
        converged: running == view.desired && current.len() as u64 == view.desired && !stale,
        errors: if errors.is_empty() {
            String::new()
        } else {
            format!(": {}", errors.join("; "))
        },
    }
}

/// `service logs --follow`: prints what each poll brings until the service is removed; a
/// node that cannot be read, or managers that cannot answer for now, are said on stderr
/// once per outage.
async fn follow_logs(client: &Client, service: &str, tail: Option<usize>) -> Result<()> {
    let mut follower = LogFollower::new(service, tail);
    let mut width = 0;
    while let Some(batch) = follower.next(|request| control(client, request)).await? {
        if let Some(why) = &batch.newly_failed {
            eprintln!("no logs for now, trying again: {why}");
        }
        for node in &batch.newly_unreadable {
            eprintln!("{}", unreadable(node));
        }
        print_log_lines(&batch.lines, &mut width);
    }
    Ok(())
}

/// `web.1.<id>@node2 | line`, the sources padded to the widest so far.
fn print_log_lines(lines: &[LogLine], width: &mut usize) {
    *width = lines
        .iter()
        .map(|l| l.source.len())
        .fold(*width, usize::max);
    for line in lines {
        println!("{:<width$} | {}", line.source, line.line, width = *width);
    }
}

fn unreadable(node: &UnreadableNode) -> String {
    format!("logs of {}'s tasks unavailable: {}", node.node, node.error)
}

/// Each slot's newest task of the current spec, as Docker's progress names it: `1/3` by
/// replica, or the node for a global service, and its state.
fn slot_lines(view: &ServiceView, tasks: &[TaskView]) -> Vec<(String, String)> {
    let mut newest: BTreeMap<String, &TaskView> = BTreeMap::new();
    for task in tasks.iter().filter(|t| t.service_version == view.version) {
        match view.mode {
            ServiceMode::Replicated { replicas } if task.slot > replicas => continue,
            ServiceMode::Global if task.node.is_empty() => continue,
            _ => {}
        }
        let entry = newest.entry(slot_name(view, task)).or_insert(task);
        if (task.created_at, task.state_since) > (entry.created_at, entry.state_since) {
            *entry = task;
        }
    }
    newest
        .into_iter()
        .map(|(slot, task)| {
            let mut line = task.state.label().to_lowercase();
            // Docker's progress says when a task waits for its health check.
            if task.state == TaskState::Running {
                line.push_str(&crate::health_args::state_suffix(
                    task.health.as_ref(),
                    false,
                ));
            }
            if task.message.starts_with("no suitable node") {
                line = format!("{line}: {}", task.message);
            }
            (slot, line)
        })
        .collect()
}

/// `1/3` by replica, or the node of a global service's task.
fn slot_name(view: &ServiceView, task: &TaskView) -> String {
    match view.mode {
        ServiceMode::Replicated { replicas } => format!("{}/{replicas}", task.slot),
        ServiceMode::Global => task.node.clone(),
    }
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

async fn print_tasks(client: &Client, tasks: &[TaskView], format: &ListFormat) -> Result<()> {
    if format.template().is_some() {
        // The IMAGE column is the service's program.
        let services = shoal_docker::service_views(client).await?;
        let headers = (rows::TASK_HEADERS, rows::TASK_COLUMNS);
        format.print_rows(|| task_rows(tasks, &services), headers)?;
        return Ok(());
    }
    match format.get() {
        Format::Json => print!("{}", json(&tasks)),
        Format::Table => print!("{}", render_tasks(tasks)),
    }
    Ok(())
}

fn short_id(id: &str) -> String {
    id[..12.min(id.len())].to_owned()
}

fn service_rows(services: &[ServiceView]) -> Vec<rows::Service> {
    services
        .iter()
        .map(|s| rows::Service {
            id: short_id(&s.id),
            name: s.name.clone(),
            mode: mode_label(&s.mode).into(),
            replicas: format!("{}/{}", s.running, s.desired),
            image: s.command.first().cloned().unwrap_or_default(),
            ports: ports_column(&s.ports),
        })
        .collect()
}

fn node_rows(nodes: &[NodeView], me: &str) -> Vec<rows::Node> {
    nodes
        .iter()
        .map(|n| rows::Node {
            id: n.id.clone(),
            hostname: n.hostname.clone(),
            status: status_label(n.status).into(),
            availability: availability_label(n.availability).into(),
            manager_status: n.manager_status.clone(),
            engine_version: env!("CARGO_PKG_VERSION").into(),
            is_self: n.id == me,
        })
        .collect()
}

fn network_rows(networks: &[NetworkView]) -> Vec<rows::Network> {
    networks
        .iter()
        .map(|n| rows::Network {
            id: short_id(&n.id),
            name: n.name.clone(),
            driver: n.driver.clone(),
            scope: n.scope.clone(),
            subnet: n.subnet.to_string(),
            internal: n.internal,
            attachable: n.attachable,
        })
        .collect()
}

fn task_rows(tasks: &[TaskView], services: &[ServiceView]) -> Vec<rows::Task> {
    tasks
        .iter()
        .map(|t| rows::Task {
            id: short_id(&t.id),
            name: t.name.clone(),
            image: services
                .iter()
                .find(|s| s.name == t.service)
                .and_then(|s| s.command.first().cloned())
                .unwrap_or_default(),
            node: t.node.clone(),
            desired_state: t.desired.label().into(),
            current_state: format!("{} {}", t.state.label(), ago(t.state_since).to_lowercase()),
            error: t.error.clone(),
            ports: ports_column(&t.host_ports),
        })
        .collect()
}

/// `shoal task inspect TASK`: Docker's task document (`--pretty`: its main fields).
pub async fn task_inspect(client: &Client, task: &str, format: &InspectFormat) -> Result<()> {
    // shoal's own view (`--format json`, `--pretty`) carries the health and the last probes.
    let own = |task: String| async move {
        let tasks = ask!(client, ControlRequest::TaskInspect { task }, Tasks);
        tasks
            .into_iter()
            .next()
            .context("the managers answered no task")
    };
    match format.get() {
        Inspect::Json => {
            print!("{}", json(&own(task.to_owned()).await?));
            return Ok(());
        }
        Inspect::Table => {}
        Inspect::Docker | Inspect::Template(_) => {
            return format.print_docker(&[shoal_docker::task(client, task).await?]);
        }
    }
    let document = shoal_docker::task(client, task).await?;
    let rows = [
        ("ID", document.id.clone()),
        ("Name", document.name.clone()),
        ("Service", document.service_id.clone()),
        ("Node", document.node_id.clone()),
        ("Desired state", document.desired_state.clone()),
        ("State", document.status.state.clone()),
        ("Since", document.status.timestamp.clone()),
        ("Error", document.status.err.clone()),
        (
            "Addresses",
            document
                .networks_attachments
                .iter()
                .map(|a| format!("{} {}", a.network.spec.name, a.addresses.join(" ")))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    ];
    for (key, value) in rows {
        println!("{:<16}{value}", format!("{key}:"));
    }
    let own = own(task.to_owned()).await?;
    print!("{}", crate::health_args::render_health(own.health.as_ref()));
    Ok(())
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
}
