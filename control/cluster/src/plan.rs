//! What a control request (`shoal node|service|network ...` on a manager) does: a pure
//! function from the state and the request to the commands to write and the answer to give,
//! as `orchestrator::reconcile` is for tasks. The manager gathers the inputs (clock, fresh IDs,
//! the leader's host addresses), writes the commands through Raft and renders the answer;
//! every decision and refusal is here, and each refusal says what kind it is.

use std::net::IpAddr;

use anyhow::{bail, Result};
use shoal_api::{ApiError, ErrorKind, Kind as _, Role, Subnet};
use shoal_dataplane::mesh::Protocol;

use crate::{
    ipam::{self, HostClaim},
    protocol::{ControlRequest, ControlResponse, LogCursor, NetworkCreate, ServiceChanges},
    state::{
        Availability, ClusterState, Command, Network, Node, NodeStatus, Service, ServiceMode,
        Timestamp,
    },
    update::{self, UpdateStatus},
    views::{network_view, service_view, task_views},
};

/// What a request needs from outside the state.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub at: Timestamp,
    /// The ID of anything the request makes (a service, a network, a token's secret).
    pub fresh_id: String,
    /// A new gossip key (hex), for `RotateGossipKey`.
    pub gossip_key: String,
    /// What the leader's kernel addresses or routes; read only for `NetworkCreate`.
    pub host_claims: Vec<HostClaim>,
    /// The leader's hostname, for messages.
    pub leader: String,
}

/// The commands to write, in order (the first refused stops the rest), then what to answer.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub commands: Vec<Command>,
    /// A demoted manager whose Raft vote is removed once the commands are written.
    pub remove_voter: Option<Node>,
    pub answer: Answer,
}

/// An answer, or what to make it from once the commands are written.
#[derive(Clone, Debug, PartialEq)]
pub enum Answer {
    Ready(ControlResponse),
    /// Node views: their manager status is Raft's, read when answering.
    Nodes(Vec<Node>),
    Node(Node),
    /// Shown as the state holds it after the commands.
    Service(Service),
    Network(Network),
    Token(Role),
    /// Gathered from the nodes that ran the service's tasks.
    Logs {
        service_id: String,
        tail: Option<usize>,
        after: Option<LogCursor>,
    },
}

impl Plan {
    fn answer(answer: Answer) -> Self {
        Self::write(Vec::new(), answer)
    }

    fn write(commands: Vec<Command>, answer: Answer) -> Self {
        Self {
            commands,
            remove_voter: None,
            answer,
        }
    }
}

/// The plan for `request` on `state`: the commands that carry it out, or why it is refused.
pub fn plan(state: &ClusterState, request: ControlRequest, inputs: &Inputs) -> Result<Plan> {
    Ok(match request {
        ControlRequest::NodeList => {
            Plan::answer(Answer::Nodes(state.nodes.values().cloned().collect()))
        }
        ControlRequest::NodeInspect { node } => {
            Plan::answer(Answer::Node(state.find_node(&node)?.clone()))
        }
        ControlRequest::NodeUpdate {
            node,
            availability,
            label_add,
            label_rm,
            role,
        } => update_node(
            state,
            state.find_node(&node)?,
            NodeChanges {
                availability,
                label_add,
                label_rm,
                role,
            },
        )?,
        ControlRequest::NodeRemove { node, force } => remove_node(state.find_node(&node)?, force)?,
        ControlRequest::NodeTasks { node } => {
            let node = state.find_node(&node)?;
            Plan::answer(Answer::Ready(ControlResponse::Tasks(task_views(
                state,
                |t| t.node_id.as_deref() == Some(&node.id),
            ))))
        }
        ControlRequest::RotateGossipKey => Plan::write(
            vec![Command::AddGossipKey {
                key: inputs.gossip_key.clone(),
                at: inputs.at,
            }],
            Answer::Ready(ControlResponse::Done),
        ),
        ControlRequest::JoinToken { role, rotate } => {
            let rotation = rotate.then(|| Command::RotateToken {
                role,
                secret: inputs.fresh_id.clone(),
            });
            Plan::write(rotation.into_iter().collect(), Answer::Token(role))
        }
        ControlRequest::ServiceCreate(spec) => {
            let mut spec = *spec;
            spec.networks = resolve_networks(state, &spec.networks)?;
            spec.validate().kind(ErrorKind::Invalid)?;
            crate::resources::check_reservation_fits(state, &spec).kind(ErrorKind::Invalid)?;
            let service = Service {
                id: inputs.fresh_id.clone(),
                spec,
                version: 1,
                created_at: inputs.at,
                updated_at: inputs.at,
                vips: vec![],
                previous_spec: None,
                previous_version: 0,
                update_status: None,
            };
            state.check_published_ports(&service)?;
            Plan::write(
                vec![Command::PutService(service.clone())],
                Answer::Service(service),
            )
        }
        ControlRequest::ServiceList => Plan::answer(Answer::Ready(ControlResponse::Services(
            state
                .services
                .values()
                .map(|s| service_view(state, s))
                .collect(),
        ))),
        ControlRequest::ServiceInspect { service } => Plan::answer(Answer::Ready(
            ControlResponse::Service(service_view(state, state.find_service(&service)?)),
        )),
        ControlRequest::ServiceTasks { service } => {
            let service = state.find_service(&service)?;
            Plan::answer(Answer::Ready(ControlResponse::Tasks(task_views(
                state,
                |t| t.service_id == service.id,
            ))))
        }
        ControlRequest::TaskInspect { task } => {
            Plan::answer(Answer::Ready(ControlResponse::Tasks(vec![
                crate::views::find_task_view(state, &task)?,
            ])))
        }
        ControlRequest::ServiceUpdate { service, changes } => {
            let updated =
                update_service(state, state.find_service(&service)?, *changes, inputs.at)?;
            Plan::write(
                vec![Command::PutService(updated.clone())],
                Answer::Service(updated),
            )
        }
        ControlRequest::ServiceRemove { service } => Plan::write(
            vec![Command::RemoveService {
                id: state.find_service(&service)?.id.clone(),
            }],
            Answer::Ready(ControlResponse::Done),
        ),
        ControlRequest::ServiceLogs {
            service,
            tail,
            after,
        } => Plan::answer(Answer::Logs {
            service_id: state.find_service(&service)?.id.clone(),
            tail,
            after,
        }),
        ControlRequest::NetworkCreate(request) => {
            let network = new_network(state, request, inputs)?;
            Plan::write(
                vec![Command::PutNetwork(network.clone())],
                Answer::Network(network),
            )
        }
        ControlRequest::NetworkList => Plan::answer(Answer::Ready(ControlResponse::Networks(
            state
                .networks
                .values()
                .map(|n| network_view(state, n))
                .collect(),
        ))),
        ControlRequest::NetworkInspect { network } => Plan::answer(Answer::Ready(
            ControlResponse::Network(network_view(state, state.find_network(&network)?)),
        )),
        ControlRequest::NetworkRemove { network } => Plan::write(
            vec![Command::RemoveNetwork {
                id: state.find_network(&network)?.id.clone(),
            }],
            Answer::Ready(ControlResponse::Done),
        ),
    })
}

/// `node update` / `promote` / `demote`, past the node's lookup.
struct NodeChanges {
    availability: Option<Availability>,
    label_add: Vec<String>,
    label_rm: Vec<String>,
    role: Option<Role>,
}

fn update_node(state: &ClusterState, node: &Node, changes: NodeChanges) -> Result<Plan> {
    let mut updated = node.clone();
    if let Some(availability) = changes.availability {
        updated.availability = availability;
    }
    for label in changes.label_add {
        let (key, value) = label.split_once('=').unwrap_or((&label, ""));
        if key.is_empty() {
            bail!(ApiError::invalid(format!("label {label:?}: empty key")));
        }
        updated.labels.insert(key.to_owned(), value.to_owned());
    }
    for key in changes.label_rm {
        if updated.labels.remove(&key).is_none() {
            bail!(ApiError::not_found(format!(
                "node {} has no label {key}",
                updated.hostname
            )));
        }
    }
    let demoted = changes.role == Some(Role::Worker) && updated.role == Role::Manager;
    if demoted && state.managers().count() <= 1 {
        bail!(ApiError::conflict(format!(
            "node {} is the last manager of the swarm and cannot be demoted: \
             promote another node first (`shoal node promote NODE`)",
            updated.hostname
        )));
    }
    if let Some(role) = changes.role {
        updated.role = role;
    }
    // The role is written first: the leader loop then adds a promoted node to Raft, and never
    // re-adds a demoted one while its voter is removed after.
    Ok(Plan {
        commands: vec![Command::UpdateNode(updated.clone())],
        remove_voter: demoted.then(|| updated.clone()),
        answer: Answer::Node(updated),
    })
}

fn remove_node(node: &Node, force: bool) -> Result<Plan> {
    if node.role == Role::Manager {
        bail!(ApiError::conflict(format!(
            "node {} is a manager: demote it first (`shoal node demote {}`)",
            node.hostname, node.hostname
        )));
    }
    if node.status == NodeStatus::Ready && !force {
        bail!(ApiError::conflict(format!(
            "node {} is not down and can't be removed: stop its agent (or `shoal swarm leave` on it) first, or use --force",
            node.hostname
        )));
    }
    Ok(Plan::write(
        vec![Command::RemoveNode {
            id: node.id.clone(),
        }],
        Answer::Ready(ControlResponse::Done),
    ))
}

fn update_service(
    state: &ClusterState,
    service: &Service,
    changes: ServiceChanges,
    at: Timestamp,
) -> Result<Service> {
    if changes.rollback {
        return roll_back_service(state, service, changes, at);
    }
    let mut updated = service.clone();
    if let Some(replicas) = changes.replicas {
        match &mut updated.spec.mode {
            ServiceMode::Replicated { replicas: r } => *r = replicas,
            ServiceMode::Global => bail!(ApiError::invalid(format!(
                "service {} is global: it cannot be scaled",
                updated.spec.name
            ))),
        }
    }
    // Anything but the replica count restarts tasks (a rolling update).
    let restart = changes.force
        || !changes.env_add.is_empty()
        || !changes.network_add.is_empty()
        || !changes.network_rm.is_empty()
        || !changes.publish_add.is_empty()
        || !changes.publish_rm.is_empty();
    for key in changes.publish_rm {
        unpublish(&mut updated, &key)?;
    }
    for port in changes.publish_add {
        updated
            .spec
            .ports
            .retain(|p| !(p.published == port.published && p.protocol == port.protocol));
        updated.spec.ports.push(port);
    }
    for key in changes.network_rm {
        let id = state.find_network(&key)?.id.clone();
        if !updated.spec.networks.contains(&id) {
            bail!(ApiError::not_found(format!(
                "service {} is not attached to network {key}",
                updated.spec.name
            )));
        }
        updated.spec.networks.retain(|n| *n != id);
    }
    let mut networks = updated.spec.networks.clone();
    networks.extend(changes.network_add);
    updated.spec.networks = resolve_networks(state, &networks)?;
    for entry in changes.env_add {
        let key = entry
            .split_once('=')
            .map(|(k, _)| k.to_owned())
            .unwrap_or_default();
        updated
            .spec
            .env
            .retain(|e| !e.starts_with(&format!("{key}=")));
        updated.spec.env.push(entry);
    }
    let restart = changes
        .containment
        .apply(&mut updated.spec.containment)
        .kind(ErrorKind::Invalid)?
        || restart;
    let restart = changes
        .placement
        .apply(&mut updated.spec)
        .kind(ErrorKind::Invalid)?
        || restart;
    changes.policy.apply(&mut updated.spec);
    let restart = changes
        .health
        .apply(&mut updated.spec.healthcheck)
        .kind(ErrorKind::Invalid)?
        || restart;
    updated.spec.validate().kind(ErrorKind::Invalid)?;
    crate::resources::check_reservation_fits(state, &updated.spec).kind(ErrorKind::Invalid)?;
    state.check_published_ports(&updated)?;
    // As Swarm: every update keeps the spec it replaces, for a rollback.
    updated.previous_spec = Some(Box::new(service.spec.clone()));
    updated.previous_version = service.version;
    if restart {
        // Past both versions: a rollback swaps them, and a task's version names one spec.
        updated.version = service.version.max(service.previous_version) + 1;
        // A paused rollout resumes with the new spec.
        updated.update_status = Some(UpdateStatus::updating(at));
    }
    updated.updated_at = at;
    Ok(updated)
}

/// `service rollback` / `service update --rollback`: the previous spec, rolled out with the
/// rollback config; the tasks still running it stay.
fn roll_back_service(
    state: &ClusterState,
    service: &Service,
    changes: ServiceChanges,
    at: Timestamp,
) -> Result<Service> {
    let others = update_service(
        state,
        service,
        ServiceChanges {
            rollback: false,
            ..changes
        },
        at,
    )?;
    if others.spec != service.spec || others.version != service.version {
        bail!(ApiError::invalid(
            "--rollback returns to the previous spec: it takes no other change"
        ));
    }
    let mut rolled = service.clone();
    update::roll_back(&mut rolled).kind(ErrorKind::Conflict)?;
    rolled.update_status = Some(UpdateStatus::manual_rollback(at));
    rolled.updated_at = at;
    state.check_published_ports(&rolled)?;
    Ok(rolled)
}

/// `--publish-rm PORT[/udp]`: the port must be one the service publishes.
fn unpublish(service: &mut Service, key: &str) -> Result<()> {
    let (port, protocol) = match key.split_once('/') {
        Some((port, protocol)) => (port, protocol.parse::<Protocol>().kind(ErrorKind::Invalid)?),
        None => (key, Protocol::Tcp),
    };
    let port: u16 = port.parse().map_err(|_| {
        ApiError::invalid(format!("--publish-rm {key:?}: expected PORT or PORT/udp"))
    })?;
    let before = service.spec.ports.len();
    service
        .spec
        .ports
        .retain(|p| !(p.published == port && p.protocol == protocol));
    if service.spec.ports.len() == before {
        bail!(ApiError::not_found(format!(
            "service {0} does not publish {key}: \
             `shoal service inspect {0} --pretty` lists its ports",
            service.spec.name
        )));
    }
    Ok(())
}

/// Network names (or IDs) of a service spec, as IDs; the ingress network is the mesh's own.
fn resolve_networks(state: &ClusterState, keys: &[String]) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for key in keys {
        let network = state.find_network(key)?;
        if network.ingress {
            bail!(ApiError::invalid(
                "the ingress network cannot be attached explicitly: publish a port instead"
            ));
        }
        if ids.contains(&network.id) {
            bail!(ApiError::invalid(format!(
                "network {} is given twice",
                network.name
            )));
        }
        ids.push(network.id.clone());
    }
    Ok(ids)
}

/// A network as `request` asks, its subnet clear of the networks, the nodes' addresses and
/// what the leader's kernel addresses or routes (`claims`; other nodes check theirs when a
/// task comes).
fn new_network(state: &ClusterState, request: NetworkCreate, inputs: &Inputs) -> Result<Network> {
    let (claims, leader) = (&inputs.host_claims, &inputs.leader);
    let name_ok = !request.name.is_empty()
        && request.name.len() <= 63
        && request
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !name_ok {
        bail!(ApiError::invalid(format!(
            "invalid network name {:?}: 1-63 characters of letters, digits, -, _ and .",
            request.name
        )));
    }
    let subnet = match request.subnet {
        Some(subnet) => {
            if subnet.prefix > 30 {
                bail!(ApiError::invalid(format!(
                    "subnet {subnet} is too small (at most /30)"
                )));
            }
            if let Some(claim) = ipam::first_overlap(subnet, claims) {
                bail!(ApiError::conflict(format!(
                    "subnet {subnet} overlaps {claim} on node {leader}, the leader: the \
                     network's tasks could not reach those addresses; choose another --subnet, \
                     or leave it out"
                )));
            }
            subnet
        }
        None => {
            let node_addresses = state.nodes.values().filter_map(|n| match n.addr {
                IpAddr::V4(addr) => Subnet::new(addr, 32).ok(),
                IpAddr::V6(_) => None,
            });
            let used: Vec<_> = state
                .networks
                .values()
                .map(|n| n.subnet)
                .chain(claims.iter().map(|c| c.subnet))
                .chain(node_addresses)
                .collect();
            ipam::allocate_subnet(
                state.settings.default_pool,
                state.settings.pool_prefix,
                &used,
            )
            .kind(ErrorKind::Conflict)?
        }
    };
    let gateway = request.gateway.unwrap_or_else(|| subnet.first_host());
    if !subnet.hosts().any(|host| host == gateway) {
        bail!(ApiError::invalid(format!(
            "gateway {gateway} is not a host address of {subnet}"
        )));
    }
    if let Some(mtu) = request.mtu {
        if !(576..=9000).contains(&mtu) {
            bail!(ApiError::invalid(format!(
                "mtu {mtu} is out of range (576-9000)"
            )));
        }
    }
    Ok(Network {
        id: inputs.fresh_id.clone(),
        name: request.name,
        subnet,
        gateway,
        vni: state.free_vni(),
        attachable: request.attachable,
        internal: request.internal,
        mtu: request.mtu,
        ingress: false,
        created_at: inputs.at,
    })
}

#[cfg(test)]
mod tests {
    use shoal_api::ErrorKind;

    use super::*;
    use crate::state::{
        tests::{network, node, publishing, task},
        Availability, TaskState,
    };

    fn inputs() -> Inputs {
        Inputs {
            at: 1_000,
            fresh_id: "fresh".into(),
            gossip_key: "ab".repeat(32),
            host_claims: vec![],
            leader: "m".into(),
        }
    }

    /// A manager `m`, a worker `w` (down), the ingress network, an overlay `back`, and a
    /// service `web` on `back` publishing 8080 with one task on `w`.
    fn swarm() -> ClusterState {
        let mut state = ClusterState::default();
        state.settings.default_pool = "10.0.0.0/8".parse().unwrap();
        state.settings.pool_prefix = 24;
        state.nodes.insert("m".into(), node("m", 1, Role::Manager));
        let mut w = node("w", 2, Role::Worker);
        w.status = NodeStatus::Down;
        w.labels.insert("zone".into(), "a".into());
        state.nodes.insert("w".into(), w);
        let mut ingress = network("ingress", "10.0.0.0/24", 4096);
        ingress.ingress = true;
        state.networks.insert(ingress.id.clone(), ingress);
        let back = network("back", "10.0.1.0/24", 4097);
        state.networks.insert(back.id.clone(), back);
        let mut web = publishing("web", &["8080:80"]);
        web.spec.networks = vec!["id-back".into()];
        state.services.insert(web.id.clone(), web);
        let mut t = task("t1", "w", TaskState::Running);
        t.service_id = "id-web".into();
        state.tasks.insert(t.id.clone(), t);
        state
    }

    fn plan_of(state: &ClusterState, request: ControlRequest) -> Result<Plan> {
        plan(state, request, &inputs())
    }

    fn refusal(state: &ClusterState, request: ControlRequest) -> (ErrorKind, String) {
        let err = plan_of(state, request).expect_err("refused");
        (ApiError::kind_of(&err), format!("{err:#}"))
    }

    fn written(plan: &Plan) -> &[Command] {
        &plan.commands
    }

    #[test]
    fn node_list_and_inspect_read_only() {
        let state = swarm();
        let plan = plan_of(&state, ControlRequest::NodeList).unwrap();
        assert!(written(&plan).is_empty());
        assert_eq!(
            plan.answer,
            Answer::Nodes(state.nodes.values().cloned().collect())
        );
        let plan = plan_of(&state, ControlRequest::NodeInspect { node: "w".into() }).unwrap();
        assert_eq!(plan.answer, Answer::Node(state.nodes["w"].clone()));
        let (kind, message) = refusal(&state, ControlRequest::NodeInspect { node: "x".into() });
        assert_eq!(kind, ErrorKind::NotFound);
        assert!(message.starts_with("node x not found"), "{message}");
    }

    fn node_update(node: &str) -> ControlRequest {
        ControlRequest::NodeUpdate {
            node: node.into(),
            availability: None,
            label_add: vec![],
            label_rm: vec![],
            role: None,
        }
    }

    #[test]
    fn node_update_writes_the_node_and_demotion_removes_the_vote() {
        let mut state = swarm();
        let request = ControlRequest::NodeUpdate {
            node: "w".into(),
            availability: Some(Availability::Drain),
            label_add: vec!["disk=ssd".into()],
            label_rm: vec!["zone".into()],
            role: None,
        };
        let plan = plan_of(&state, request).unwrap();
        let mut expected = state.nodes["w"].clone();
        expected.availability = Availability::Drain;
        expected.labels = [("disk".to_owned(), "ssd".to_owned())].into();
        assert_eq!(written(&plan), [Command::UpdateNode(expected.clone())]);
        assert_eq!(plan.remove_voter, None);
        assert_eq!(plan.answer, Answer::Node(expected));

        // The last manager stays one; with a second, the demoted one's vote goes.
        let demote = |node: &str| ControlRequest::NodeUpdate {
            node: node.into(),
            availability: None,
            label_add: vec![],
            label_rm: vec![],
            role: Some(Role::Worker),
        };
        let (kind, message) = refusal(&state, demote("m"));
        assert_eq!(kind, ErrorKind::Conflict);
        assert!(message.contains("last manager"), "{message}");
        state
            .nodes
            .insert("m2".into(), node("m2", 3, Role::Manager));
        let plan = plan_of(&state, demote("m")).unwrap();
        let mut demoted = state.nodes["m"].clone();
        demoted.role = Role::Worker;
        assert_eq!(written(&plan), [Command::UpdateNode(demoted.clone())]);
        assert_eq!(plan.remove_voter, Some(demoted));

        let with_labels = |add: &[&str], rm: &[&str]| ControlRequest::NodeUpdate {
            node: "w".into(),
            availability: None,
            label_add: add.iter().map(|l| l.to_string()).collect(),
            label_rm: rm.iter().map(|l| l.to_string()).collect(),
            role: None,
        };
        assert_eq!(
            refusal(&state, with_labels(&["=x"], &[])).0,
            ErrorKind::Invalid
        );
        assert_eq!(
            refusal(&state, with_labels(&[], &["nope"])).0,
            ErrorKind::NotFound
        );
        assert_eq!(refusal(&state, node_update("x")).0, ErrorKind::NotFound);
    }

    #[test]
    fn node_remove_takes_only_a_down_worker_unless_forced() {
        let mut state = swarm();
        let remove = |node: &str, force| ControlRequest::NodeRemove {
            node: node.into(),
            force,
        };
        let plan = plan_of(&state, remove("w", false)).unwrap();
        assert_eq!(written(&plan), [Command::RemoveNode { id: "w".into() }]);
        assert_eq!(plan.answer, Answer::Ready(ControlResponse::Done));
        let (kind, message) = refusal(&state, remove("m", true));
        assert_eq!(kind, ErrorKind::Conflict);
        assert!(message.contains("demote it first"), "{message}");
        state.nodes.get_mut("w").unwrap().status = NodeStatus::Ready;
        assert_eq!(refusal(&state, remove("w", false)).0, ErrorKind::Conflict);
        assert!(plan_of(&state, remove("w", true)).is_ok());
    }

    #[test]
    fn node_tasks_lists_the_nodes_tasks() {
        let state = swarm();
        let plan = plan_of(&state, ControlRequest::NodeTasks { node: "w".into() }).unwrap();
        let Answer::Ready(ControlResponse::Tasks(tasks)) = plan.answer else {
            panic!("{:?}", plan.answer)
        };
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].name, "web.1");
        let plan = plan_of(&state, ControlRequest::NodeTasks { node: "m".into() }).unwrap();
        assert_eq!(plan.answer, Answer::Ready(ControlResponse::Tasks(vec![])));
    }

    #[test]
    fn gossip_key_rotation_writes_the_fresh_key() {
        let plan = plan_of(&swarm(), ControlRequest::RotateGossipKey).unwrap();
        assert_eq!(
            written(&plan),
            [Command::AddGossipKey {
                key: "ab".repeat(32),
                at: 1_000
            }]
        );
    }

    #[test]
    fn join_token_rotates_only_when_asked() {
        let state = swarm();
        let plan = plan_of(
            &state,
            ControlRequest::JoinToken {
                role: Role::Worker,
                rotate: false,
            },
        )
        .unwrap();
        assert!(written(&plan).is_empty());
        assert_eq!(plan.answer, Answer::Token(Role::Worker));
        let plan = plan_of(
            &state,
            ControlRequest::JoinToken {
                role: Role::Manager,
                rotate: true,
            },
        )
        .unwrap();
        assert_eq!(
            written(&plan),
            [Command::RotateToken {
                role: Role::Manager,
                secret: "fresh".into()
            }]
        );
        assert_eq!(plan.answer, Answer::Token(Role::Manager));
    }

    #[test]
    fn service_create_resolves_networks_and_checks_ports_up_front() {
        let state = swarm();
        let mut spec = publishing("api", &["9090:80"]).spec;
        spec.networks = vec!["back".into()];
        let plan = plan_of(
            &state,
            ControlRequest::ServiceCreate(Box::new(spec.clone())),
        )
        .unwrap();
        let [Command::PutService(service)] = written(&plan) else {
            panic!("{:?}", plan.commands)
        };
        assert_eq!(service.id, "fresh");
        assert_eq!(service.spec.networks, ["id-back"]);
        assert_eq!((service.version, service.created_at), (1, 1_000));
        assert_eq!(plan.answer, Answer::Service(service.clone()));

        let mut taken = spec.clone();
        taken.ports = publishing("x", &["8080:80"]).spec.ports;
        assert_eq!(
            refusal(&state, ControlRequest::ServiceCreate(Box::new(taken))).0,
            ErrorKind::Conflict
        );
        let mut ingress = spec.clone();
        ingress.networks = vec!["ingress".into()];
        assert_eq!(
            refusal(&state, ControlRequest::ServiceCreate(Box::new(ingress))).0,
            ErrorKind::Invalid
        );
        let mut unknown = spec.clone();
        unknown.networks = vec!["nope".into()];
        assert_eq!(
            refusal(&state, ControlRequest::ServiceCreate(Box::new(unknown))).0,
            ErrorKind::NotFound
        );
        let mut empty = spec;
        empty.command = vec![];
        assert_eq!(
            refusal(&state, ControlRequest::ServiceCreate(Box::new(empty))).0,
            ErrorKind::Invalid
        );
    }

    #[test]
    fn service_list_inspect_and_tasks_read_only() {
        let state = swarm();
        let plan = plan_of(&state, ControlRequest::ServiceList).unwrap();
        assert!(written(&plan).is_empty());
        assert_eq!(
            plan.answer,
            Answer::Ready(ControlResponse::Services(vec![service_view(
                &state,
                &state.services["id-web"]
            )]))
        );
        let plan = plan_of(
            &state,
            ControlRequest::ServiceInspect {
                service: "web".into(),
            },
        )
        .unwrap();
        assert_eq!(
            plan.answer,
            Answer::Ready(ControlResponse::Service(service_view(
                &state,
                &state.services["id-web"]
            )))
        );
        let plan = plan_of(
            &state,
            ControlRequest::ServiceTasks {
                service: "web".into(),
            },
        )
        .unwrap();
        let Answer::Ready(ControlResponse::Tasks(tasks)) = plan.answer else {
            panic!("{:?}", plan.answer)
        };
        assert_eq!(tasks.len(), 1);
        for request in [
            ControlRequest::ServiceInspect {
                service: "nope".into(),
            },
            ControlRequest::ServiceTasks {
                service: "nope".into(),
            },
        ] {
            assert_eq!(refusal(&state, request).0, ErrorKind::NotFound);
        }
    }

    fn no_changes() -> ServiceChanges {
        ServiceChanges::default()
    }

    fn update_request(service: &str, changes: ServiceChanges) -> ControlRequest {
        ControlRequest::ServiceUpdate {
            service: service.into(),
            changes: Box::new(changes),
        }
    }

    /// The service a written plan puts.
    fn put_service(plan: &Plan) -> Service {
        match written(plan) {
            [Command::PutService(service)] => service.clone(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn updates_keep_the_previous_spec_and_rollback_swaps_back() {
        use crate::update::{FailureAction, UpdateState};
        let mut state = swarm();
        let env = ServiceChanges {
            env_add: vec!["V=2".into()],
            ..no_changes()
        };
        let (kind, message) = refusal(&state, update_request("web", rollback()));
        assert_eq!(kind, ErrorKind::Conflict);
        assert!(message.contains("no previous spec"), "{message}");

        let updated = put_service(&plan_of(&state, update_request("web", env)).unwrap());
        assert_eq!((updated.version, updated.previous_version), (2, 1));
        assert_eq!(
            updated.update_status.as_ref().unwrap().state,
            UpdateState::Updating
        );
        assert_eq!(
            updated.previous_spec.as_deref(),
            Some(&state.services["id-web"].spec)
        );
        state.services.insert(updated.id.clone(), updated.clone());

        // Policies change no task: no new version, no new rollout.
        let mut policy = crate::update::PolicyUpdate::default();
        policy.update.failure_action = Some(FailureAction::Rollback);
        let tuned = ServiceChanges {
            policy: Box::new(policy),
            ..no_changes()
        };
        let tuned = put_service(&plan_of(&state, update_request("web", tuned)).unwrap());
        assert_eq!(tuned.version, 2);
        assert_eq!(
            tuned.spec.update_control.failure_action,
            FailureAction::Rollback
        );

        let back = put_service(&plan_of(&state, update_request("web", rollback())).unwrap());
        assert_eq!((back.version, back.previous_version), (1, 2));
        assert!(!back.spec.env.contains(&"V=2".to_owned()));
        assert_eq!(
            back.update_status.as_ref().unwrap().message,
            "manually requested rollback"
        );
        // A later update takes a version past both.
        state.services.insert(back.id.clone(), back);
        let again = ServiceChanges {
            force: true,
            ..no_changes()
        };
        assert_eq!(
            put_service(&plan_of(&state, update_request("web", again)).unwrap()).version,
            3
        );
        // --rollback takes no other change.
        let mixed = ServiceChanges {
            env_add: vec!["V=3".into()],
            ..rollback()
        };
        assert_eq!(
            refusal(&state, update_request("web", mixed)).0,
            ErrorKind::Invalid
        );
    }

    fn rollback() -> ServiceChanges {
        ServiceChanges {
            rollback: true,
            ..no_changes()
        }
    }

    #[test]
    fn service_update_changes_placement_and_rolls_the_tasks() {
        let state = swarm();
        let placement = |p: crate::state::PlacementUpdate| ServiceChanges {
            placement: Box::new(p),
            ..no_changes()
        };
        let plan = plan_of(
            &state,
            update_request(
                "web",
                placement(crate::state::PlacementUpdate {
                    constraint_add: vec!["node.hostname==w".into(), "node.role!=manager".into()],
                    pref_add: vec!["spread=node.labels.zone".into()],
                    max_replicas_per_node: Some(2),
                    ..Default::default()
                }),
            ),
        )
        .unwrap();
        let [Command::PutService(service)] = written(&plan) else {
            panic!("{:?}", plan.commands)
        };
        assert_eq!(service.version, 2, "a placement change rolls the tasks");
        let shown: Vec<String> = service
            .spec
            .constraints
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(shown, ["node.hostname==w", "node.role!=manager"]);
        assert_eq!(
            service.spec.placement_prefs[0].to_string(),
            "spread=node.labels.zone"
        );
        assert_eq!(service.spec.max_replicas_per_node, 2);

        let mut state = state.clone();
        state.services.insert(service.id.clone(), service.clone());
        let plan = plan_of(
            &state,
            update_request(
                "web",
                placement(crate::state::PlacementUpdate {
                    constraint_rm: vec!["node.hostname==w".into()],
                    pref_rm: vec!["spread=node.labels.zone".into()],
                    max_replicas_per_node: Some(0),
                    ..Default::default()
                }),
            ),
        )
        .unwrap();
        let [Command::PutService(service)] = written(&plan) else {
            panic!("{:?}", plan.commands)
        };
        assert_eq!(service.spec.constraints.len(), 1);
        assert!(service.spec.placement_prefs.is_empty());
        assert_eq!(service.spec.max_replicas_per_node, 0);

        for (bad, says) in [
            (
                crate::state::PlacementUpdate {
                    constraint_add: vec!["node.foo==x".into()],
                    ..Default::default()
                },
                "--constraint-add",
            ),
            (
                crate::state::PlacementUpdate {
                    constraint_rm: vec!["node.labels.zone==q".into()],
                    ..Default::default()
                },
                "no such constraint",
            ),
            (
                crate::state::PlacementUpdate {
                    pref_add: vec!["binpack=node.labels.zone".into()],
                    ..Default::default()
                },
                "--placement-pref-add",
            ),
        ] {
            let (kind, message) = refusal(&state, update_request("web", placement(bad)));
            assert_eq!(kind, ErrorKind::Invalid);
            assert!(message.contains(says), "{message}");
        }
    }

    #[test]
    fn service_update_scales_in_place_and_restarts_for_the_rest() {
        let state = swarm();
        let scaled = plan_of(
            &state,
            update_request(
                "web",
                ServiceChanges {
                    replicas: Some(3),
                    ..no_changes()
                },
            ),
        )
        .unwrap();
        let [Command::PutService(service)] = written(&scaled) else {
            panic!("{:?}", scaled.commands)
        };
        assert_eq!(service.spec.mode, ServiceMode::Replicated { replicas: 3 });
        assert_eq!(service.version, 1, "scaling is no rolling update");
        assert_eq!(service.updated_at, 1_000);

        let changed = plan_of(
            &state,
            update_request(
                "web",
                ServiceChanges {
                    env_add: vec!["A=1".into()],
                    network_rm: vec!["back".into()],
                    publish_rm: vec!["8080".into()],
                    publish_add: vec![crate::state::PortConfig::parse("8081:80").unwrap()],
                    ..no_changes()
                },
            ),
        )
        .unwrap();
        let [Command::PutService(service)] = written(&changed) else {
            panic!("{:?}", changed.commands)
        };
        assert_eq!(service.version, 2);
        assert_eq!(service.spec.env, ["A=1"]);
        assert!(service.spec.networks.is_empty());
        assert_eq!(service.spec.ports[0].published, 8081);

        let publish_rm = |key: &str| ServiceChanges {
            publish_rm: vec![key.into()],
            ..no_changes()
        };
        let networks = |add: &str, rm: &str| ServiceChanges {
            network_add: [add]
                .iter()
                .filter(|n| !n.is_empty())
                .map(|n| n.to_string())
                .collect(),
            network_rm: [rm]
                .iter()
                .filter(|n| !n.is_empty())
                .map(|n| n.to_string())
                .collect(),
            ..no_changes()
        };
        for (changes, kind, why) in [
            (
                publish_rm("9999"),
                ErrorKind::NotFound,
                "a port it does not publish",
            ),
            (
                publish_rm("80/sctp"),
                ErrorKind::Invalid,
                "no such protocol",
            ),
            (publish_rm("port"), ErrorKind::Invalid, "not a port"),
            (networks("", "ingress"), ErrorKind::NotFound, "not attached"),
            (networks("back", ""), ErrorKind::Invalid, "attached twice"),
        ] {
            let refused = refusal(&state, update_request("web", changes)).0;
            assert_eq!(refused, kind, "{why}");
        }
        assert_eq!(
            refusal(&state, update_request("nope", no_changes())).0,
            ErrorKind::NotFound
        );
        let mut global = swarm();
        global.services.get_mut("id-web").unwrap().spec.mode = ServiceMode::Global;
        assert_eq!(
            refusal(
                &global,
                update_request(
                    "web",
                    ServiceChanges {
                        replicas: Some(2),
                        ..no_changes()
                    }
                )
            )
            .0,
            ErrorKind::Invalid
        );
    }

    #[test]
    fn service_remove_and_logs_name_the_service() {
        let state = swarm();
        let plan = plan_of(
            &state,
            ControlRequest::ServiceRemove {
                service: "web".into(),
            },
        )
        .unwrap();
        assert_eq!(
            written(&plan),
            [Command::RemoveService {
                id: "id-web".into()
            }]
        );
        let plan = plan_of(
            &state,
            ControlRequest::ServiceLogs {
                service: "id-w".into(),
                tail: Some(5),
                after: None,
            },
        )
        .unwrap();
        assert!(written(&plan).is_empty());
        assert_eq!(
            plan.answer,
            Answer::Logs {
                service_id: "id-web".into(),
                tail: Some(5),
                after: None,
            }
        );
        for request in [
            ControlRequest::ServiceRemove {
                service: "nope".into(),
            },
            ControlRequest::ServiceLogs {
                service: "nope".into(),
                tail: None,
                after: None,
            },
        ] {
            assert_eq!(refusal(&state, request).0, ErrorKind::NotFound);
        }
    }

    fn network_create(name: &str, subnet: Option<&str>) -> ControlRequest {
        ControlRequest::NetworkCreate(NetworkCreate {
            name: name.into(),
            subnet: subnet.map(|s| s.parse().unwrap()),
            gateway: None,
            attachable: false,
            internal: false,
            mtu: None,
        })
    }

    #[test]
    fn network_create_allocates_clear_of_networks_and_the_leaders_host() {
        let state = swarm();
        let plan = plan_of(&state, network_create("front", None)).unwrap();
        let [Command::PutNetwork(network)] = written(&plan) else {
            panic!("{:?}", plan.commands)
        };
        assert_eq!(network.id, "fresh");
        assert_eq!(network.subnet.to_string(), "10.0.2.0/24");
        assert_eq!(network.vni, 4098);
        assert_eq!(plan.answer, Answer::Network(network.clone()));

        let claims = Inputs {
            host_claims: vec![HostClaim {
                subnet: "10.0.2.0/24".parse().unwrap(),
                connected: true,
                source: "address 10.0.2.5/24 on eth0".into(),
            }],
            ..inputs()
        };
        let around = super::plan(&state, network_create("front", None), &claims).unwrap();
        let [Command::PutNetwork(network)] = written(&around) else {
            panic!("{:?}", around.commands)
        };
        assert_eq!(network.subnet.to_string(), "10.0.3.0/24");
        let err = super::plan(
            &state,
            network_create("front", Some("10.0.2.0/24")),
            &claims,
        )
        .expect_err("overlaps the leader's address");
        assert_eq!(ApiError::kind_of(&err), ErrorKind::Conflict);
        assert!(
            format!("{err:#}").contains("on node m, the leader"),
            "{err:#}"
        );
        assert_eq!(
            refusal(&state, network_create("bad name", None)).0,
            ErrorKind::Invalid
        );
        assert_eq!(
            refusal(&state, network_create("tiny", Some("10.9.0.0/31"))).0,
            ErrorKind::Invalid
        );
    }

    #[test]
    fn network_list_inspect_and_remove() {
        let state = swarm();
        let plan = plan_of(&state, ControlRequest::NetworkList).unwrap();
        let Answer::Ready(ControlResponse::Networks(networks)) = plan.answer else {
            panic!("{:?}", plan.answer)
        };
        assert_eq!(networks.len(), 2);
        let plan = plan_of(
            &state,
            ControlRequest::NetworkInspect {
                network: "back".into(),
            },
        )
        .unwrap();
        let Answer::Ready(ControlResponse::Network(view)) = plan.answer else {
            panic!("{:?}", plan.answer)
        };
        assert_eq!(view.services, ["web"]);
        let plan = plan_of(
            &state,
            ControlRequest::NetworkRemove {
                network: "back".into(),
            },
        )
        .unwrap();
        assert_eq!(
            written(&plan),
            [Command::RemoveNetwork {
                id: "id-back".into()
            }],
            "whether it is in use is decided in apply, in log order"
        );
        for request in [
            ControlRequest::NetworkInspect {
                network: "nope".into(),
            },
            ControlRequest::NetworkRemove {
                network: "nope".into(),
            },
        ] {
            assert_eq!(refusal(&state, request).0, ErrorKind::NotFound);
        }
    }
}
