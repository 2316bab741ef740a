//! A manager: a Raft member holding the cluster state. The leader answers every cluster
//! request (others forward to it), tracks node liveness from heartbeats and runs the
//! orchestrator; followers only replicate.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use shoal_api::{now, ApiError, NOT_A_MANAGER, NO_LEADER};
use tokio::sync::watch;

use super::{
    ipam,
    orchestrator::{self, Settings},
    pki::{random_id, secrets_match, Role, TOKEN_HINT},
    plan::{self, Answer, Inputs},
    protocol::{
        AssignedNetwork, Assignment, ClusterRequest, ClusterResponse, ControlRequest,
        ControlResponse, Envelope, HeartbeatResponse, JoinRequest, JoinResponse, LogCursor,
        LogLine, LogsRequest, NodeView, ServiceLogs, TaskLog, UnreadableNode,
    },
    raft::{self, Member, Raft, StateMachine},
    state::{Availability, ClusterState, Command, Node, NodeStatus, Task, TaskState},
    transport::{ClusterClient, Peer},
    views::{network_view, service_view, task_name},
};

/// A node silent this long is marked Down.
pub const NODE_DOWN_AFTER: Duration = Duration::from_secs(5);
/// Writes that cannot reach a quorum fail after this long instead of hanging.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const LEADER_LOOP_PERIOD: Duration = Duration::from_millis(500);
/// A held heartbeat looks at the state again this long after it changed.
const HOLD_COALESCE: Duration = Duration::from_millis(20);
/// How long adding one manager to Raft (catch-up included) may take before a retry.
const ADD_VOTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a follower keeps trying to reach a leader for a request.
const FORWARD_PATIENCE: Duration = Duration::from_secs(4);

/// How often the leader adds a gossip key (Swarm rotates every 12 hours too).
pub const GOSSIP_KEY_ROTATION: Duration = Duration::from_secs(12 * 3600);

fn new_gossip_key() -> Command {
    Command::AddGossipKey {
        key: new_gossip_key_hex(),
        at: now(),
    }
}

/// A fresh AES-256 gossip key, in hex.
fn new_gossip_key_hex() -> String {
    use rand::RngCore as _;
    let mut key = [0u8; 32];
    rand::rng().fill_bytes(&mut key);
    key.iter().map(|b| format!("{b:02x}")).collect()
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
    /// A control request changed the state: the leader reconciles now, not at its next tick
    /// (a new service's tasks are assigned half a tick sooner on average).
    reconcile_now: tokio::sync::Notify,
}

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
            reconcile_now: tokio::sync::Notify::new(),
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
            .map_err(|_| ApiError::unavailable(format!("{NO_LEADER} (write timed out)")))?
            .map_err(|err| ApiError::unavailable(format!("write refused: {err}")))?;
        Ok(result.data.0?)
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
                bail!(ApiError::forbidden("only managers may forward requests"));
            }
            envelope.origin.clone()
        } else {
            if envelope.origin.is_some() {
                bail!(ApiError::forbidden("only managers may forward requests"));
            }
            peer.0.clone()
        };
        // Without a certificate a caller can only ask to join.
        if caller.is_none() && !matches!(envelope.request, ClusterRequest::Join(_)) {
            bail!(ApiError::forbidden(
                "this request needs a cluster member's certificate"
            ));
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
                None => Err(ApiError::unavailable(NO_LEADER).into()),
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
            ClusterRequest::Heartbeat {
                reports,
                resources,
                known,
            } => {
                let caller = caller
                    .ok_or_else(|| ApiError::forbidden("heartbeat without a node certificate"))?;
                // Read in place: heartbeats come every second from every node, a long poll.
                let update =
                    self.read(|state| crate::resources::node_update(state, &caller, resources));
                if let Some(update) = update {
                    self.write(update).await?;
                }
                Ok(ClusterResponse::Heartbeat(
                    self.heartbeat(&caller, reports, known).await?,
                ))
            }
            ClusterRequest::Leave => {
                let caller = caller
                    .ok_or_else(|| ApiError::forbidden("leave without a node certificate"))?;
                self.leave(&caller).await?;
                Ok(ClusterResponse::Left)
            }
            ClusterRequest::Control(control) => {
                let caller = caller.ok_or_else(|| {
                    ApiError::forbidden("control request without a node certificate")
                })?;
                match self.read(|s| s.nodes.get(&caller).map(|n| n.role)) {
                    Some(Role::Manager) => {}
                    Some(Role::Worker) => bail!(ApiError::unavailable(NOT_A_MANAGER)),
                    None => bail!(ApiError::forbidden(format!(
                        "node {caller} is not part of this swarm"
                    ))),
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
            bail!(ApiError::forbidden(format!(
                "invalid join token: it was rotated or belongs to another swarm; {TOKEN_HINT}"
            )));
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
            platform: join.platform,
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
            ApiError::not_found(format!(
                "node {node_id} is not part of this swarm (it was removed already)"
            ))
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
        let voters = voters(&self.raft);
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

    /// Records a node's task reports and answers its heartbeat. With nothing to record and
    /// an answer the node has already (`known`), the answer is held until it changes or
    /// `HEARTBEAT_INTERVAL` has passed: assignments reach a node as soon as they are written,
    /// not at its next heartbeat (Swarm's dispatcher streams them; this is a long poll).
    async fn heartbeat(
        &self,
        caller: &str,
        reports: Vec<super::state::TaskReport>,
        known: Option<u64>,
    ) -> Result<HeartbeatResponse> {
        let found = self.read(|state| {
            let role = state.nodes.get(caller)?.role;
            let moves = reports.iter().any(|r| {
                state
                    .tasks
                    .get(&r.task_id)
                    .is_some_and(|t| t.node_id.as_deref() == Some(caller) && r.moves(t))
            });
            Some((role, moves))
        });
        let Some((role, moves)) = found else {
            bail!(ApiError::forbidden(format!(
                "node {caller} is not part of this swarm (it was removed); join again"
            )));
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
        // Subscribed before the answer is made: no change between the two is missed.
        let mut changes = self.sm.changes();
        let deadline = tokio::time::Instant::now() + super::worker::HEARTBEAT_INTERVAL;
        loop {
            let answer = self.heartbeat_answer(caller, role);
            // Something to record, or something new for the node: answered at once.
            if moves || known != Some(answer.version) {
                return Ok(answer);
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(answer);
                    }
                    // Writes come in bursts (every node's reports): one new answer for them,
                    // not one per write and held node.
                    tokio::time::sleep(HOLD_COALESCE).await;
                    changes.borrow_and_update();
                }
                () = tokio::time::sleep_until(deadline) => return Ok(answer),
            }
        }
    }

    /// What a heartbeat answers `caller`: its assignments and what it needs to know of the
    /// swarm, with their digest as `version`.
    fn heartbeat_answer(&self, caller: &str, role: Role) -> HeartbeatResponse {
        let mut answer = self.read(|state| HeartbeatResponse {
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
                        healthcheck: spec.and_then(|s| s.healthcheck.as_deref().cloned()),
                    }
                })
                .collect(),
            managers: self.manager_endpoints(state),
            role: state.nodes.get(caller).map_or(role, |n| n.role),
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
            version: 0,
        });
        answer.version = digest(&answer);
        answer
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
                _ = self.reconcile_now.notified() => {}
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

    /// A control request: planned on the state (`plan::plan`), written, then answered.
    async fn control(&self, request: ControlRequest) -> Result<ControlResponse> {
        let host_claims = if matches!(request, ControlRequest::NetworkCreate(_)) {
            tokio::task::spawn_blocking(ipam::host_claims)
                .await?
                .context("reading this manager's addresses and routes")?
        } else {
            Vec::new()
        };
        let inputs = Inputs {
            at: now(),
            fresh_id: random_id(25),
            gossip_key: new_gossip_key_hex(),
            host_claims,
            leader: self.read(|s| {
                s.nodes
                    .get(&self.node_id)
                    .map_or_else(|| self.node_id.clone(), |n| n.hostname.clone())
            }),
        };
        let plan = self.read(|state| plan::plan(state, request, &inputs))?;
        if !plan.commands.is_empty() {
            for command in plan.commands {
                self.write(command).await?;
            }
            self.reconcile_now.notify_one();
        }
        if let Some(node) = &plan.remove_voter {
            self.remove_voter(node).await?;
        }
        Ok(match plan.answer {
            Answer::Ready(response) => response,
            Answer::Nodes(nodes) => {
                ControlResponse::Nodes(nodes.iter().map(|n| self.node_view(n)).collect())
            }
            Answer::Node(node) => ControlResponse::Node(self.node_view(&node)),
            Answer::Service(service) => {
                ControlResponse::Service(self.read(|s| service_view(s, &service)))
            }
            Answer::Network(network) => {
                ControlResponse::Network(self.read(|s| network_view(s, &network)))
            }
            Answer::Token(role) => {
                ControlResponse::Token(self.read(|s| s.token(role))?.to_string())
            }
            Answer::Logs {
                service_id,
                tail,
                after,
            } => {
                let state = self.state();
                ControlResponse::Logs(
                    self.service_logs(&state, &service_id, tail, after.as_ref())
                        .await?,
                )
            }
        })
    }

    /// Gathers the output of a service's tasks from the nodes that ran them (following: what
    /// came after `after`).
    async fn service_logs(
        &self,
        state: &ClusterState,
        service_id: &str,
        tail: Option<usize>,
        after: Option<&LogCursor>,
    ) -> Result<ServiceLogs> {
        let mut by_node: BTreeMap<&str, Vec<&Task>> = BTreeMap::new();
        for task in state.tasks.values().filter(|t| t.service_id == service_id) {
            if let Some(node) = task.node_id.as_deref() {
                by_node.entry(node).or_default().push(task);
            }
        }
        let mut logs = ServiceLogs::default();
        // All nodes at once: a slow one costs its own timeout, not everyone's.
        let mut queries = tokio::task::JoinSet::new();
        for (node_id, tasks) in by_node {
            let Some(node) = state.nodes.get(node_id) else {
                continue;
            };
            if node.status == NodeStatus::Down {
                logs.unreadable.push(UnreadableNode {
                    node_id: node.id.clone(),
                    node: node.hostname.clone(),
                    error: "the node is down".into(),
                });
                continue;
            }
            let request = LogsRequest {
                task_ids: tasks.iter().map(|t| t.id.clone()).collect(),
                tail,
                after: after.map(|after| {
                    tasks
                        .iter()
                        .filter_map(|t| Some((t.id.clone(), *after.get(&t.id)?)))
                        .collect()
                }),
            };
            let (client, endpoint) = (self.client.clone(), node.endpoint());
            let node_id = node.id.clone();
            queries.spawn(async move {
                let timeout = Duration::from_secs(5);
                let answer = client
                    .post(&endpoint, "/node/logs", &request, timeout)
                    .await;
                (node_id, answer)
            });
        }
        let mut answers: BTreeMap<String, Result<Vec<TaskLog>>> = BTreeMap::new();
        while let Some(joined) = queries.join_next().await {
            let (node_id, answer) = joined?;
            answers.insert(node_id, answer);
        }
        // In node order, whichever answered first.
        for (node_id, answer) in answers {
            let Some(node) = state.nodes.get(&node_id) else {
                continue;
            };
            let task_logs = match answer {
                Ok(task_logs) => task_logs,
                Err(err) => {
                    logs.unreadable.push(UnreadableNode {
                        node_id,
                        node: node.hostname.clone(),
                        error: format!("{err:#}"),
                    });
                    continue;
                }
            };
            for log in task_logs {
                let Some(task) = state.tasks.get(&log.task_id) else {
                    continue;
                };
                let source = format!("{}@{}", task_name(state, task), node.hostname);
                logs.lines.extend(log.lines.into_iter().map(|line| LogLine {
                    source: source.clone(),
                    line,
                }));
                logs.cursor.insert(log.task_id, log.end);
            }
        }
        Ok(logs)
    }

    async fn remove_voter(&self, node: &Node) -> Result<()> {
        let mut remaining = voters(&self.raft);
        remaining.remove(&node.raft_id);
        tokio::time::timeout(WRITE_TIMEOUT, self.raft.change_membership(remaining, false))
            .await
            .map_err(|_| {
                ApiError::unavailable(format!("{NO_LEADER} (membership change timed out)"))
            })?
            .map_err(|err| anyhow!("demoting {}: {err}", node.hostname))?;
        Ok(())
    }

    fn node_view(&self, node: &Node) -> NodeView {
        let voter = voters(&self.raft).contains(&node.raft_id);
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
            platform: node.platform.clone(),
        }
    }
}

/// The Raft IDs of the voters, as this member last saw the membership.
fn voters(raft: &Raft) -> BTreeSet<u64> {
    raft.metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect()
}

async fn add_voter(raft: &Raft, raft_id: u64, member: Member) -> Result<()> {
    raft.add_learner(raft_id, member, true)
        .await
        .map_err(|err| anyhow!("adding learner: {err}"))?;
    let mut voters = voters(raft);
    voters.insert(raft_id);
    raft.change_membership(voters, false)
        .await
        .map_err(|err| anyhow!("making it a voter: {err}"))?;
    tracing::info!(raft_id, "manager added to Raft");
    Ok(())
}

/// A digest of a heartbeat's answer (FNV-1a over its JSON): equal answers, equal digests;
/// never 0, which says "no digest".
fn digest(answer: &HeartbeatResponse) -> u64 {
    let bytes = serde_json::to_vec(answer).unwrap_or_default();
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
    });
    hash.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_heartbeat_answer_has_the_digest_of_what_it_says() {
        let answer = |managers: &[&str]| HeartbeatResponse {
            assignments: vec![],
            managers: managers.iter().map(|m| m.to_string()).collect(),
            role: Role::Worker,
            manager_ids: vec![],
            gossip_keys: vec![],
            peers: vec![],
            ingress: None,
            version: 0,
        };
        let one = digest(&answer(&["10.0.0.1:2377"]));
        assert_ne!(one, 0, "0 means no digest");
        assert_eq!(one, digest(&answer(&["10.0.0.1:2377"])));
        assert_ne!(one, digest(&answer(&["10.0.0.2:2377"])));
    }
}
