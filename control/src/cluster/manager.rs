//! A manager: a Raft member holding the cluster state. The leader answers every cluster
//! request (others forward to it), tracks node liveness from heartbeats and runs the
//! orchestrator; followers only replicate.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::sync::watch;

use super::{
    ipam,
    orchestrator::{self, Settings},
    pki::{random_id, secrets_match, Role, TOKEN_HINT},
    protocol::{
        AssignedNetwork, Assignment, ClusterRequest, ClusterResponse, ControlRequest,
        ControlResponse, Envelope, HeartbeatResponse, JoinRequest, JoinResponse, LogLine,
        LogsRequest, NetworkCreate, NetworkView, NodeView, ServiceView, TaskLog, TaskView,
    },
    raft::{self, Member, Raft, StateMachine},
    state::{
        Availability, ClusterState, Command, Network, Node, NodeStatus, PublishMode, Service,
        ServiceMode, Task, TaskState,
    },
    transport::{ClusterClient, Peer},
};

/// A node silent this long is marked Down.
pub const NODE_DOWN_AFTER: Duration = Duration::from_secs(5);
/// Writes that cannot reach a quorum fail after this long instead of hanging.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const LEADER_LOOP_PERIOD: Duration = Duration::from_millis(500);
/// How long adding one manager to Raft (catch-up included) may take before a retry.
const ADD_VOTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a follower keeps trying to reach a leader for a request.
const FORWARD_PATIENCE: Duration = Duration::from_secs(4);

/// How often the leader adds a gossip key (Swarm rotates every 12 hours too).
pub const GOSSIP_KEY_ROTATION: Duration = Duration::from_secs(12 * 3600);

fn new_gossip_key() -> Command {
    use rand::RngCore as _;
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    Command::AddGossipKey {
        key: key.iter().map(|b| format!("{b:02x}")).collect(),
        at: now(),
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

pub struct Manager {
    pub raft: Raft,
    sm: StateMachine,
    raft_id: u64,
    node_id: String,
    client: ClusterClient,
    settings: Settings,
    /// Leader-local: when each node was last heard from (real heartbeats only).
    heartbeats: Mutex<HashMap<String, Instant>>,
    /// When this manager last became the leader: the start of everyone's grace period.
    leader_since: Mutex<Instant>,
    /// The Raft ID being added as a voter, if any.
    adding_voter: Arc<Mutex<Option<u64>>>,
}

/// A worker asked for what only managers hold.
pub const NOT_A_MANAGER: &str = "this node is not a swarm manager: run the command on a manager \
                                 (`shoal info` lists them), or promote this node with \
                                 `shoal node promote NODE` on a manager";
const NO_LEADER: &str = "the swarm does not have a leader: too few managers are reachable \
                         to form a quorum (see `shoal node ls` on a manager, docs/operations.md)";

impl Manager {
    pub fn new(
        raft: Raft,
        sm: StateMachine,
        raft_id: u64,
        node_id: String,
        client: ClusterClient,
        settings: Settings,
    ) -> Self {
        Self {
            raft,
            sm,
            raft_id,
            node_id,
            client,
            settings,
            heartbeats: Mutex::default(),
            leader_since: Mutex::new(Instant::now()),
            adding_voter: Arc::default(),
        }
    }

    /// A copy of the state, for work that spans awaits.
    pub fn state(&self) -> ClusterState {
        self.sm.state()
    }

    /// Reads the state in place: the per-request paths use this instead of copying it.
    fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        self.sm.read(f)
    }

    fn leader_id(&self) -> Option<u64> {
        self.raft.metrics().borrow().current_leader
    }

    pub fn is_leader(&self) -> bool {
        self.leader_id() == Some(self.raft_id)
    }

    /// Proposes a command and waits for it to be applied; fails fast without a quorum.
    pub async fn write(&self, command: Command) -> Result<()> {
        let result = tokio::time::timeout(WRITE_TIMEOUT, self.raft.client_write(command))
            .await
            .map_err(|_| anyhow!("{NO_LEADER} (write timed out)"))?
            .map_err(|err| anyhow!("write refused: {err}"))?;
        result.data.0.map_err(|message| anyhow!(message))
    }

    /// Answers a request from `peer` (maybe forwarded on behalf of `envelope.origin`).
    pub async fn dispatch(&self, peer: &Peer, envelope: Envelope) -> Result<ClusterResponse> {
        let caller = if envelope.forwarded {
            // Only a manager may speak for another node.
            let forwarder = peer.0.as_deref().unwrap_or_default();
            let is_manager = self.read(|s| {
                s.nodes
                    .get(forwarder)
                    .is_some_and(|n| n.role == Role::Manager)
            });
            if !is_manager {
                bail!("only managers may forward requests");
            }
            envelope.origin.clone()
        } else {
            if envelope.origin.is_some() {
                bail!("only managers may forward requests");
            }
            peer.0.clone()
        };
        // Without a certificate a caller can only ask to join.
        if caller.is_none() && !matches!(envelope.request, ClusterRequest::Join(_)) {
            bail!("this request needs a cluster member's certificate");
        }
        // Elections and membership changes leave short windows without a reachable leader:
        // retry for a few seconds before giving up.
        let deadline = Instant::now() + FORWARD_PATIENCE;
        loop {
            if self.is_leader() {
                return self.handle(caller, envelope.request).await;
            }
            let attempt = match self.leader_member() {
                Some(member) => {
                    let forwarded = Envelope {
                        forwarded: true,
                        origin: caller.clone(),
                        request: envelope.request.clone(),
                    };
                    self.client
                        .post(
                            &member.addr,
                            "/cluster",
                            &forwarded,
                            Duration::from_secs(10),
                        )
                        .await
                        .context("forwarding to the leader")
                }
                None => Err(anyhow!(NO_LEADER)),
            };
            match attempt {
                Ok(answer) => return Ok(answer),
                Err(err) if Instant::now() >= deadline => return Err(err),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }

    fn leader_member(&self) -> Option<Member> {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader?;
        metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .cloned()
    }

    /// A request from this manager's own CLI clients.
    pub async fn local(&self, request: ControlRequest) -> Result<ControlResponse> {
        let envelope = Envelope {
            forwarded: false,
            origin: None,
            request: ClusterRequest::Control(request),
        };
        let me = Peer(Some(self.node_id.clone()));
        match self.dispatch(&me, envelope).await? {
            ClusterResponse::Control(response) => Ok(response),
            _ => bail!("unexpected answer to a control request"),
        }
    }

    async fn handle(
        &self,
        caller: Option<String>,
        request: ClusterRequest,
    ) -> Result<ClusterResponse> {
        match request {
            ClusterRequest::Join(join) => Ok(ClusterResponse::Joined(self.join(join).await?)),
            ClusterRequest::Heartbeat { reports, resources } => {
                let caller =
                    caller.ok_or_else(|| anyhow!("heartbeat without a node certificate"))?;
                if let Some(update) =
                    super::resources::node_update(&self.state(), &caller, resources)
                {
                    self.write(update).await?;
                }
                Ok(ClusterResponse::Heartbeat(
                    self.heartbeat(&caller, reports).await?,
                ))
            }
            ClusterRequest::Leave => {
                let caller = caller.ok_or_else(|| anyhow!("leave without a node certificate"))?;
                self.leave(&caller).await?;
                Ok(ClusterResponse::Left)
            }
            ClusterRequest::Control(control) => {
                let caller =
                    caller.ok_or_else(|| anyhow!("control request without a node certificate"))?;
                match self.read(|s| s.nodes.get(&caller).map(|n| n.role)) {
                    Some(Role::Manager) => {}
                    Some(Role::Worker) => bail!(NOT_A_MANAGER),
                    None => bail!("node {caller} is not part of this swarm"),
                }
                Ok(ClusterResponse::Control(self.control(control).await?))
            }
        }
    }

    async fn join(&self, join: JoinRequest) -> Result<JoinResponse> {
        let state = self.state();
        let role = if secrets_match(&state.manager_secret, &join.secret) {
            Role::Manager
        } else if secrets_match(&state.worker_secret, &join.secret) {
            Role::Worker
        } else {
            bail!("invalid join token: it was rotated or belongs to another swarm; {TOKEN_HINT}");
        };
        let ca = state
            .ca
            .as_ref()
            .ok_or_else(|| anyhow!("cluster has no CA"))?;
        let node_id = random_id(25);
        let cert_pem = ca.sign_node(&node_id, join.addr, &join.csr_pem)?;
        let at = now();
        let node = Node {
            id: node_id.clone(),
            raft_id: 0,
            hostname: join.hostname,
            addr: join.addr,
            port: join.port,
            role,
            availability: Availability::Active,
            status: NodeStatus::Ready,
            labels: BTreeMap::new(),
            created_at: at,
            status_since: at,
            ingress_address: None,
            gossip_port: join.gossip_port,
            exposed_metrics_port: join.exposed_metrics_port,
            left: false,
            resources: join.resources,
        };
        self.write(Command::AddNode(node)).await?;
        let added = self
            .state()
            .nodes
            .get(&node_id)
            .cloned()
            .ok_or_else(|| anyhow!("node {node_id} vanished after joining"))?;
        let raft_id = added.raft_id;
        self.heartbeats
            .lock()
            .expect("heartbeats")
            .insert(node_id.clone(), Instant::now());
        // A manager becomes a Raft voter through the leader loop's membership reconciliation.
        tracing::info!(node = %node_id, %role, "node joined");
        Ok(JoinResponse {
            cluster_id: state.cluster_id.clone(),
            node_id,
            raft_id,
            role,
            cert_pem,
            ca_pem: ca.cert_pem.clone(),
            managers: self.read(|s| self.manager_endpoints(s)),
        })
    }

    /// A node says it leaves: from now on it is Down and gets no task, and the orchestrator
    /// replaces its tasks elsewhere at once (the node stops them itself).
    async fn leave(&self, node_id: &str) -> Result<()> {
        let hostname = self.read(|s| s.nodes.get(node_id).map(|n| n.hostname.clone()));
        let hostname = hostname.ok_or_else(|| {
            anyhow!("node {node_id} is not part of this swarm (it was removed already)")
        })?;
        self.write(Command::NodeLeaving {
            id: node_id.to_owned(),
            at: now(),
        })
        .await?;
        tracing::info!(node = %hostname, "node is leaving the swarm");
        Ok(())
    }

    /// Waits until this manager is a voter the quorum counts on (see `raft::wait_until_voter`).
    pub async fn wait_until_voter(&self, limit: Duration) -> Result<()> {
        raft::wait_until_voter(&self.raft, self.raft_id, limit).await
    }

    /// Makes Raft's voters follow the managers of the state: one missing manager at a time
    /// (openraft takes one membership change at a time) is added as a learner, then made a
    /// voter, in the background; a failure is retried on a later pass.
    fn reconcile_membership(&self, state: &ClusterState) {
        let voters: BTreeSet<u64> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        // Only a manager heard from lately: a lost one (after --force-new-cluster, say) must
        // not become a voter the quorum would then wait for.
        let heard = |id: &str| {
            self.heartbeats
                .lock()
                .expect("heartbeats")
                .get(id)
                .is_some_and(|t| t.elapsed() < NODE_DOWN_AFTER)
        };
        let Some(missing) = state
            .managers()
            .find(|n| !voters.contains(&n.raft_id) && heard(&n.id))
        else {
            return;
        };
        let mut adding = self.adding_voter.lock().expect("adding voter");
        if adding.is_some() {
            return;
        }
        *adding = Some(missing.raft_id);
        let (raft, raft_id) = (self.raft.clone(), missing.raft_id);
        let member = Member {
            addr: missing.endpoint(),
            node_id: missing.id.clone(),
        };
        let slot = self.adding_voter.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(ADD_VOTER_TIMEOUT, add_voter(&raft, raft_id, member)).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::warn!(raft_id, error = %format!("{err:#}"), "adding a manager to Raft; will retry")
                }
                Err(_) => tracing::warn!(raft_id, "adding a manager to Raft timed out; will retry"),
            }
            *slot.lock().expect("adding voter") = None;
        });
    }

    /// Manager endpoints, the leader last (workers try them in order, and the leader is the
    /// one most likely to change).
    fn manager_endpoints(&self, state: &ClusterState) -> Vec<String> {
        let leader = self.leader_id();
        let mut managers: Vec<(bool, String)> = state
            .managers()
            .map(|n| (Some(n.raft_id) != leader, n.endpoint()))
            .collect();
        managers.sort();
        managers.into_iter().map(|(_, e)| e).collect()
    }

    async fn heartbeat(
        &self,
        caller: &str,
        reports: Vec<super::state::TaskReport>,
    ) -> Result<HeartbeatResponse> {
        let known = self.read(|state| {
            let role = state.nodes.get(caller)?.role;
            let moves = reports.iter().any(|r| {
                state
                    .tasks
                    .get(&r.task_id)
                    .is_some_and(|t| t.node_id.as_deref() == Some(caller) && r.state > t.state)
            });
            Some((role, moves))
        });
        let Some((role, moves)) = known else {
            bail!("node {caller} is not part of this swarm (it was removed); join again");
        };
        self.heartbeats
            .lock()
            .expect("heartbeats")
            .insert(caller.to_owned(), Instant::now());
        if moves {
            self.write(Command::ReportTasks {
                node_id: caller.to_owned(),
                reports,
                at: now(),
            })
            .await?;
        }
        Ok(self.read(|state| HeartbeatResponse {
            assignments: state
                .tasks
                .values()
                .filter(|t| t.node_id.as_deref() == Some(caller) && !t.state.is_terminal())
                // A task waiting on this node for resources is not for it to start yet.
                .filter(|t| !(t.state == TaskState::Pending && t.desired == TaskState::Running))
                .map(|t| {
                    let service = state.services.get(&t.service_id);
                    let spec = service.map(|s| &s.spec);
                    Assignment {
                        task_id: t.id.clone(),
                        name: task_name(state, t),
                        // Tasks of a removed service are only ever stopped.
                        desired: if service.is_some() {
                            t.desired
                        } else {
                            TaskState::Shutdown
                        },
                        command: spec.map(|s| s.command.clone()).unwrap_or_default(),
                        env: spec.map(|s| s.env.clone()).unwrap_or_default(),
                        containment: spec.map(|s| s.containment.clone()).unwrap_or_default(),
                        networks: t
                            .attachments
                            .iter()
                            .filter_map(|a| {
                                Some(AssignedNetwork {
                                    spec: state
                                        .networks
                                        .get(&a.network_id)?
                                        .dataplane_spec(state.settings.data_path_port),
                                    address: a.address,
                                    vip: service
                                        .and_then(|s| {
                                            s.vips.iter().find(|v| v.network_id == a.network_id)
                                        })
                                        .map(|v| v.address),
                                })
                            })
                            .collect(),
                        service_id: t.service_id.clone(),
                        service_name: service.map(|s| s.spec.name.clone()).unwrap_or_default(),
                        ports: spec.map(|s| s.ports.clone()).unwrap_or_default(),
                    }
                })
                .collect(),
            managers: self.manager_endpoints(state),
            role,
            manager_ids: state.managers().map(|n| n.id.clone()).collect(),
            gossip_keys: state.gossip_keys.clone(),
            peers: state
                .nodes
                .values()
                .filter(|n| n.id != caller)
                .map(|n| n.endpoint())
                .collect(),
            ingress: state.ingress_network().and_then(|network| {
                Some(AssignedNetwork {
                    spec: network.dataplane_spec(state.settings.data_path_port),
                    address: state.nodes.get(caller)?.ingress_address?,
                    vip: None,
                })
            }),
        }))
    }

    /// Leader duties, every half second: node liveness, then reconciliation.
    pub async fn run_leader_loop(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut was_leader = false;
        while !*shutdown.borrow() {
            let leader = self.is_leader();
            if leader && !was_leader {
                // New leader: nobody is marked Down before they had time to find it.
                *self.leader_since.lock().expect("leader since") = Instant::now();
                tracing::info!("this manager is the leader");
            }
            was_leader = leader;
            if leader {
                if let Err(err) = self.leader_pass().await {
                    tracing::warn!(error = %format!("{err:#}"), "leader pass failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(LEADER_LOOP_PERIOD) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    async fn leader_pass(&self) -> Result<()> {
        let state = self.state();
        let in_grace = self.leader_since.lock().expect("leader since").elapsed() < NODE_DOWN_AFTER;
        let changes: Vec<(String, String, NodeStatus)> = {
            let heartbeats = self.heartbeats.lock().expect("heartbeats");
            state
                .nodes
                .values()
                .filter_map(|node| {
                    // The leader's own agent heartbeats too, but it is alive by definition.
                    // A leaving node is Down from the moment it said so, even while its
                    // last heartbeats report its tasks stopping.
                    let alive = !node.left
                        && (node.id == self.node_id
                            || in_grace
                            || heartbeats
                                .get(&node.id)
                                .is_some_and(|t| t.elapsed() < NODE_DOWN_AFTER));
                    let status = if alive {
                        NodeStatus::Ready
                    } else {
                        NodeStatus::Down
                    };
                    (status != node.status)
                        .then(|| (node.id.clone(), node.hostname.clone(), status))
                })
                .collect()
        };
        for (id, hostname, status) in changes {
            tracing::info!(node = %hostname, ?status, "node status changed");
            self.write(Command::SetNodeStatus {
                id,
                status,
                since: now(),
            })
            .await?;
        }
        // Gossip keys rotate on a schedule; the first is made as soon as there is a leader.
        if state.gossip_keys.is_empty()
            || now().saturating_sub(state.gossip_key_added_at) >= GOSSIP_KEY_ROTATION.as_secs()
        {
            self.write(new_gossip_key()).await?;
        }
        self.reconcile_membership(&state);
        for command in orchestrator::reconcile(&self.state(), now(), self.settings) {
            self.write(command).await?;
        }
        Ok(())
    }

    async fn control(&self, request: ControlRequest) -> Result<ControlResponse> {
        let state = self.state();
        Ok(match request {
            ControlRequest::NodeList => {
                ControlResponse::Nodes(state.nodes.values().map(|n| self.node_view(n)).collect())
            }
            ControlRequest::NodeInspect { node } => {
                ControlResponse::Node(self.node_view(state.find_node(&node)?))
            }
            ControlRequest::NodeUpdate {
                node,
                availability,
                label_add,
                label_rm,
                role,
            } => {
                let mut updated = state.find_node(&node)?.clone();
                if let Some(availability) = availability {
                    updated.availability = availability;
                }
                for label in label_add {
                    let (key, value) = label.split_once('=').unwrap_or((&label, ""));
                    if key.is_empty() {
                        bail!("label {label:?}: empty key");
                    }
                    updated.labels.insert(key.to_owned(), value.to_owned());
                }
                for key in label_rm {
                    if updated.labels.remove(&key).is_none() {
                        bail!("node {} has no label {key}", updated.hostname);
                    }
                }
                let demoted = role == Some(Role::Worker) && updated.role == Role::Manager;
                if demoted && state.managers().count() <= 1 {
                    bail!(
                        "node {} is the last manager of the swarm and cannot be demoted: \
                         promote another node first (`shoal node promote NODE`)",
                        updated.hostname
                    );
                }
                if let Some(role) = role {
                    updated.role = role;
                }
                // The role is written first: the leader loop then adds a promoted node to Raft,
                // and never re-adds a demoted one while its voter is removed below.
                self.write(Command::UpdateNode(updated.clone())).await?;
                if demoted {
                    self.remove_voter(&updated).await?;
                }
                ControlResponse::Node(self.node_view(&updated))
            }
            ControlRequest::NodeRemove { node, force } => {
                let node = state.find_node(&node)?;
                if node.role == Role::Manager {
                    bail!(
                        "node {} is a manager: demote it first (`shoal node demote {}`)",
                        node.hostname,
                        node.hostname
                    );
                }
                if node.status == NodeStatus::Ready && !force {
                    bail!(
                        "node {} is not down and can't be removed: stop its agent (or `shoal swarm leave` on it) first, or use --force",
                        node.hostname
                    );
                }
                self.write(Command::RemoveNode {
                    id: node.id.clone(),
                })
                .await?;
                ControlResponse::Done
            }
            ControlRequest::NodeTasks { node } => {
                let node = state.find_node(&node)?;
                ControlResponse::Tasks(task_views(&state, |t| {
                    t.node_id.as_deref() == Some(&node.id)
                }))
            }
            ControlRequest::RotateGossipKey => {
                self.write(new_gossip_key()).await?;
                ControlResponse::Done
            }
            ControlRequest::JoinToken { role, rotate } => {
                if rotate {
                    self.write(Command::RotateToken {
                        role,
                        secret: random_id(25),
                    })
                    .await?;
                }
                ControlResponse::Token(self.state().token(role)?.to_string())
            }
            ControlRequest::ServiceCreate(mut spec) => {
                spec.networks = resolve_networks(&state, &spec.networks)?;
                spec.validate()?;
                super::resources::check_reservation_fits(&state, &spec)?;
                let at = now();
                let service = Service {
                    id: random_id(25),
                    spec,
                    version: 1,
                    created_at: at,
                    updated_at: at,
                    vips: vec![],
                };
                state.check_published_ports(&service)?;
                self.write(Command::PutService(service.clone())).await?;
                ControlResponse::Service(service_view(&self.state(), &service))
            }
            ControlRequest::ServiceList => ControlResponse::Services(
                state
                    .services
                    .values()
                    .map(|s| service_view(&state, s))
                    .collect(),
            ),
            ControlRequest::ServiceInspect { service } => {
                ControlResponse::Service(service_view(&state, state.find_service(&service)?))
            }
            ControlRequest::ServiceTasks { service } => {
                let service = state.find_service(&service)?;
                ControlResponse::Tasks(task_views(&state, |t| t.service_id == service.id))
            }
            ControlRequest::ServiceUpdate {
                service,
                replicas,
                env_add,
                network_add,
                network_rm,
                publish_add,
                publish_rm,
                force,
                containment,
            } => {
                let mut updated = state.find_service(&service)?.clone();
                if let Some(replicas) = replicas {
                    match &mut updated.spec.mode {
                        ServiceMode::Replicated { replicas: r } => *r = replicas,
                        ServiceMode::Global => {
                            bail!(
                                "service {} is global: it cannot be scaled",
                                updated.spec.name
                            )
                        }
                    }
                }
                // Anything but the replica count restarts tasks (a rolling update).
                let restart = force
                    || !env_add.is_empty()
                    || !network_add.is_empty()
                    || !network_rm.is_empty()
                    || !publish_add.is_empty()
                    || !publish_rm.is_empty();
                for key in publish_rm {
                    let (port, protocol) = match key.split_once('/') {
                        Some((port, protocol)) => (port, protocol.parse()?),
                        None => (key.as_str(), shoal_dataplane::mesh::Protocol::Tcp),
                    };
                    let port: u16 = port
                        .parse()
                        .map_err(|_| anyhow!("--publish-rm {key:?}: expected PORT or PORT/udp"))?;
                    let before = updated.spec.ports.len();
                    updated
                        .spec
                        .ports
                        .retain(|p| !(p.published == port && p.protocol == protocol));
                    if updated.spec.ports.len() == before {
                        bail!(
                            "service {0} does not publish {key}: \
                             `shoal service inspect {0} --pretty` lists its ports",
                            updated.spec.name
                        );
                    }
                }
                for port in publish_add {
                    updated.spec.ports.retain(|p| {
                        !(p.published == port.published && p.protocol == port.protocol)
                    });
                    updated.spec.ports.push(port);
                }
                for key in network_rm {
                    let id = state.find_network(&key)?.id.clone();
                    if !updated.spec.networks.contains(&id) {
                        bail!(
                            "service {} is not attached to network {key}",
                            updated.spec.name
                        );
                    }
                    updated.spec.networks.retain(|n| *n != id);
                }
                let mut networks = updated.spec.networks.clone();
                networks.extend(network_add);
                updated.spec.networks = resolve_networks(&state, &networks)?;
                for entry in env_add {
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
                let restart = containment.apply(&mut updated.spec.containment)? || restart;
                updated.spec.validate()?;
                super::resources::check_reservation_fits(&state, &updated.spec)?;
                state.check_published_ports(&updated)?;
                if restart {
                    updated.version += 1;
                }
                updated.updated_at = now();
                self.write(Command::PutService(updated.clone())).await?;
                ControlResponse::Service(service_view(&self.state(), &updated))
            }
            ControlRequest::NetworkCreate(request) => {
                let claims = tokio::task::spawn_blocking(ipam::host_claims)
                    .await?
                    .context("reading this manager's addresses and routes")?;
                let leader = state
                    .nodes
                    .get(&self.node_id)
                    .map_or(self.node_id.as_str(), |n| &n.hostname);
                let network = new_network(&state, request, &claims, leader)?;
                self.write(Command::PutNetwork(network.clone())).await?;
                ControlResponse::Network(network_view(&self.state(), &network))
            }
            ControlRequest::NetworkList => ControlResponse::Networks(
                state
                    .networks
                    .values()
                    .map(|n| network_view(&state, n))
                    .collect(),
            ),
            ControlRequest::NetworkInspect { network } => {
                ControlResponse::Network(network_view(&state, state.find_network(&network)?))
            }
            ControlRequest::NetworkRemove { network } => {
                let network = state.find_network(&network)?;
                self.write(Command::RemoveNetwork {
                    id: network.id.clone(),
                })
                .await?;
                ControlResponse::Done
            }
            ControlRequest::ServiceLogs { service, tail } => {
                let service = state.find_service(&service)?;
                ControlResponse::Logs(self.service_logs(&state, &service.id, tail).await?)
            }
            ControlRequest::ServiceRemove { service } => {
                let service = state.find_service(&service)?;
                self.write(Command::RemoveService {
                    id: service.id.clone(),
                })
                .await?;
                ControlResponse::Done
            }
        })
    }

    /// Gathers the output of a service's tasks from the nodes that ran them.
    async fn service_logs(
        &self,
        state: &ClusterState,
        service_id: &str,
        tail: Option<usize>,
    ) -> Result<Vec<LogLine>> {
        let mut by_node: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
        for task in state.tasks.values().filter(|t| t.service_id == service_id) {
            if let Some(node) = task.node_id.as_deref() {
                by_node.entry(node).or_default().push(task);
            }
        }
        let mut lines = Vec::new();
        for (node_id, tasks) in by_node {
            let Some(node) = state.nodes.get(node_id) else {
                continue;
            };
            let request = LogsRequest {
                task_ids: tasks.iter().map(|t| t.id.clone()).collect(),
                tail,
            };
            let logs: Vec<TaskLog> = match self
                .client
                .post(
                    &node.endpoint(),
                    "/node/logs",
                    &request,
                    Duration::from_secs(5),
                )
                .await
            {
                Ok(logs) => logs,
                Err(err) => {
                    lines.push(LogLine {
                        source: format!("@{}", node.hostname),
                        line: format!("(logs unavailable: {err:#})"),
                    });
                    continue;
                }
            };
            for log in logs {
                let Some(task) = state.tasks.get(&log.task_id) else {
                    continue;
                };
                let source = format!("{}@{}", task_name(state, task), node.hostname);
                lines.extend(log.lines.into_iter().map(|line| LogLine {
                    source: source.clone(),
                    line,
                }));
            }
        }
        Ok(lines)
    }

    async fn remove_voter(&self, node: &Node) -> Result<()> {
        let remaining: BTreeSet<u64> = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != node.raft_id)
            .collect();
        tokio::time::timeout(WRITE_TIMEOUT, self.raft.change_membership(remaining, false))
            .await
            .map_err(|_| anyhow!("{NO_LEADER} (membership change timed out)"))?
            .map_err(|err| anyhow!("demoting {}: {err}", node.hostname))?;
        Ok(())
    }

    fn node_view(&self, node: &Node) -> NodeView {
        let voter = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .any(|id| id == node.raft_id);
        let manager_status = match node.role {
            Role::Worker => String::new(),
            Role::Manager if Some(node.raft_id) == self.leader_id() => "Leader".into(),
            // Reachable: a voting member of Raft whose agent heartbeats.
            Role::Manager if voter && node.status == NodeStatus::Ready => "Reachable".into(),
            Role::Manager => "Unavailable".into(),
        };
        NodeView {
            id: node.id.clone(),
            hostname: node.hostname.clone(),
            addr: node.addr,
            role: node.role,
            status: node.status,
            availability: node.availability,
            manager_status,
            labels: node.labels.clone(),
            created_at: node.created_at,
            resources: node.resources,
        }
    }
}

async fn add_voter(raft: &Raft, raft_id: u64, member: Member) -> Result<()> {
    raft.add_learner(raft_id, member, true)
        .await
        .map_err(|err| anyhow!("adding learner: {err}"))?;
    let mut voters: BTreeSet<u64> = raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    voters.insert(raft_id);
    raft.change_membership(voters, false)
        .await
        .map_err(|err| anyhow!("making it a voter: {err}"))?;
    tracing::info!(raft_id, "manager added to Raft");
    Ok(())
}

/// Network names (or IDs) of a service spec, as IDs; the ingress network is the mesh's own.
fn resolve_networks(state: &ClusterState, keys: &[String]) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    for key in keys {
        let network = state.find_network(key)?;
        if network.ingress {
            bail!("the ingress network cannot be attached explicitly: publish a port instead");
        }
        if ids.contains(&network.id) {
            bail!("network {} is given twice", network.name);
        }
        ids.push(network.id.clone());
    }
    Ok(ids)
}

/// A network as `request` asks, its subnet clear of the networks, the nodes' addresses and
/// what the leader's kernel addresses or routes (`claims`; other nodes check theirs when a
/// task comes).
fn new_network(
    state: &ClusterState,
    request: NetworkCreate,
    claims: &[ipam::HostClaim],
    leader: &str,
) -> Result<Network> {
    let name_ok = !request.name.is_empty()
        && request.name.len() <= 63
        && request
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if !name_ok {
        bail!(
            "invalid network name {:?}: 1-63 characters of letters, digits, -, _ and .",
            request.name
        );
    }
    let subnet = match request.subnet {
        Some(subnet) => {
            if subnet.prefix > 30 {
                bail!("subnet {subnet} is too small (at most /30)");
            }
            if let Some(claim) = ipam::first_overlap(subnet, claims) {
                bail!(
                    "subnet {subnet} overlaps {claim} on node {leader}, the leader: the \
                     network's tasks could not reach those addresses; choose another --subnet, \
                     or leave it out"
                );
            }
            subnet
        }
        None => {
            let node_addresses = state.nodes.values().filter_map(|n| match n.addr {
                IpAddr::V4(addr) => ipam::Subnet::new(addr, 32).ok(),
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
            )?
        }
    };
    let gateway = request.gateway.unwrap_or_else(|| subnet.first_host());
    if !subnet.hosts().any(|host| host == gateway) {
        bail!("gateway {gateway} is not a host address of {subnet}");
    }
    if let Some(mtu) = request.mtu {
        if !(576..=9000).contains(&mtu) {
            bail!("mtu {mtu} is out of range (576-9000)");
        }
    }
    Ok(Network {
        id: random_id(25),
        name: request.name,
        subnet,
        gateway,
        vni: state.free_vni(),
        attachable: request.attachable,
        internal: request.internal,
        mtu: request.mtu,
        ingress: false,
        created_at: now(),
    })
}

fn network_view(state: &ClusterState, network: &Network) -> NetworkView {
    NetworkView {
        id: network.id.clone(),
        name: network.name.clone(),
        driver: "overlay".into(),
        scope: "swarm".into(),
        subnet: network.subnet,
        gateway: network.gateway,
        vni: network.vni,
        attachable: network.attachable,
        internal: network.internal,
        mtu: network.mtu,
        ingress: network.ingress,
        services: state
            .services
            .values()
            .filter(|s| s.spec.networks.contains(&network.id))
            .map(|s| s.spec.name.clone())
            .collect(),
        created_at: network.created_at,
    }
}

fn network_name(state: &ClusterState, id: &str) -> String {
    state
        .networks
        .get(id)
        .map(|n| n.name.clone())
        .unwrap_or_else(|| id.to_owned())
}

/// `web.1.<id>` (or `web.<node id>.<id>` for global services), the task's hostname.
pub fn task_name(state: &ClusterState, task: &Task) -> String {
    format!("{}.{}", short_task_name(state, task), task.id)
}

fn short_task_name(state: &ClusterState, task: &Task) -> String {
    let service = state
        .services
        .get(&task.service_id)
        .map(|s| s.spec.name.as_str())
        .unwrap_or("(removed)");
    if task.slot > 0 {
        format!("{service}.{}", task.slot)
    } else {
        format!("{service}.{}", task.node_id.as_deref().unwrap_or(""))
    }
}

fn task_views(state: &ClusterState, keep: impl Fn(&Task) -> bool) -> Vec<TaskView> {
    let mut views: Vec<TaskView> = state
        .tasks
        .values()
        .filter(|t| keep(t))
        .map(|t| TaskView {
            id: t.id.clone(),
            name: short_task_name(state, t),
            service: state
                .services
                .get(&t.service_id)
                .map(|s| s.spec.name.clone())
                .unwrap_or_default(),
            slot: t.slot,
            service_version: t.service_version,
            node_id: t.node_id.clone(),
            node: t
                .node_id
                .as_ref()
                .and_then(|id| state.nodes.get(id))
                .map(|n| n.hostname.clone())
                .unwrap_or_default(),
            desired: t.desired,
            state: t.state,
            state_since: t.state_since,
            message: t.message.clone(),
            error: t.error.clone(),
            created_at: t.created_at,
            addresses: t
                .attachments
                .iter()
                .map(|a| (network_name(state, &a.network_id), a.address))
                .collect(),
            // Open only while the task runs, as in `docker service ps`.
            host_ports: state
                .services
                .get(&t.service_id)
                .filter(|_| t.state == TaskState::Running)
                .map(|s| {
                    s.spec
                        .ports
                        .iter()
                        .filter(|p| p.mode == PublishMode::Host)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect();
    // By slot, newest first within a slot: the running task, then its history.
    views.sort_by(|a, b| {
        (
            a.service.as_str(),
            a.slot,
            &a.node_id,
            std::cmp::Reverse(a.created_at),
        )
            .cmp(&(
                b.service.as_str(),
                b.slot,
                &b.node_id,
                std::cmp::Reverse(b.created_at),
            ))
    });
    views
}

fn service_view(state: &ClusterState, service: &Service) -> ServiceView {
    let live = |t: &&Task| t.service_id == service.id && t.desired == TaskState::Running;
    let running = state
        .tasks
        .values()
        .filter(live)
        .filter(|t| t.state == TaskState::Running)
        .count() as u64;
    let desired = match service.spec.mode {
        ServiceMode::Replicated { replicas } => replicas,
        ServiceMode::Global => state.tasks.values().filter(live).count() as u64,
    };
    ServiceView {
        id: service.id.clone(),
        name: service.spec.name.clone(),
        mode: service.spec.mode.clone(),
        running,
        desired,
        command: service.spec.command.clone(),
        env: service.spec.env.clone(),
        constraints: service
            .spec
            .constraints
            .iter()
            .map(ToString::to_string)
            .collect(),
        version: service.version,
        update_parallelism: service.spec.update_parallelism,
        update_delay_secs: service.spec.update_delay_secs,
        networks: service
            .spec
            .networks
            .iter()
            .map(|id| network_name(state, id))
            .collect(),
        endpoint_mode: service.spec.endpoint_mode,
        ports: service.spec.ports.clone(),
        containment: Box::new(service.spec.containment.clone()),
        vips: service
            .vips
            .iter()
            .map(|v| (network_name(state, &v.network_id), v.address))
            .collect(),
        created_at: service.created_at,
        updated_at: service.updated_at,
    }
}
