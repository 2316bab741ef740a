//! Every node's side of the cluster: heartbeats to the managers, carrying the state of each
//! local task, and starting or stopping tasks as the answers assign them. Each heartbeat
//! reports every task the node knows, so a lost heartbeat heals itself (reports only move
//! tasks forward).

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use shoal_dataplane::task::{TaskHandle, TaskLaunch, TaskRuntime};
use tokio::sync::{mpsc, oneshot, watch, Notify};

mod drain;
mod health_probe;
mod task_log;

use super::{
    health::{HealthCheck, HealthStatus, HealthTracker, TaskHealth},
    ipam::{self, Subnet},
    networking::NodeNetworks,
    pki::Role,
    protocol::{
        AssignedNetwork, Assignment, ClusterRequest, ClusterResponse, Envelope, HeartbeatResponse,
        LogsRequest, TaskLog,
    },
    state::{TaskReport, TaskState},
    transport::ClusterClient,
};

pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A task's change of state (started, ended, health) is reported at once, not at the next
/// heartbeat, after waiting this long for the others of its burst (a scale starts many tasks
/// together): one report and one replicated write for all of them, as Swarm's dispatcher
/// batches task updates over 100 ms.
const REPORT_BATCH: Duration = Duration::from_millis(100);
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Between an unhealthy task leaving every node's routing (its gossip record says so at
/// once) and its stop: its established connections get this long to finish.
const UNHEALTHY_DRAIN: Duration = Duration::from_secs(3);
/// The error of a task stopped for failing its health check, as Swarm words it.
pub const UNHEALTHY_ERROR: &str = "task: unhealthy container";

/// A task to supervise: started by this agent, or adopted from a previous one.
enum Launched {
    Started(TaskHandle),
    Adopted(TaskHandle),
}

struct LocalTask {
    /// `web.1.<id>`, as `service ps` shows it.
    name: String,
    state: TaskState,
    error: String,
    /// Present while the task runs: a message stops it.
    stop: Option<oneshot::Sender<()>>,
    /// While it runs with a health check.
    health: Option<TaskHealth>,
}

pub struct Worker {
    runtime: TaskRuntime,
    networks: Arc<NodeNetworks>,
    /// The gossip keyring last applied.
    gossip_keys: Mutex<Vec<String>>,
    client: ClusterClient,
    managers: Mutex<Vec<String>>,
    /// The role the managers last gave this node, and where changes are announced.
    role: Mutex<Role>,
    role_changes: mpsc::UnboundedSender<Role>,
    manager_ids: Mutex<Vec<String>>,
    tasks: Mutex<HashMap<String, LocalTask>>,
    /// Tasks a previous agent left, until the first assignments settle them.
    leftovers: Mutex<Option<Vec<String>>>,
    wake: Notify,
    /// When a manager last answered a heartbeat (health checks).
    last_heartbeat: Mutex<Option<tokio::time::Instant>>,
}

impl Worker {
    pub fn new(
        runtime: TaskRuntime,
        networks: Arc<NodeNetworks>,
        client: ClusterClient,
        managers: Vec<String>,
        role: Role,
        role_changes: mpsc::UnboundedSender<Role>,
    ) -> Result<Self> {
        // Tasks a previous agent started are settled with the managers' first answer:
        // adopted while the managers still want them, stopped otherwise.
        let leftovers = runtime.leftovers()?;
        if !leftovers.is_empty() {
            tracing::info!(tasks = leftovers.len(), "found tasks of a previous agent");
        }
        Ok(Self {
            runtime,
            networks,
            gossip_keys: Mutex::default(),
            client,
            managers: Mutex::new(managers),
            role: Mutex::new(role),
            role_changes,
            manager_ids: Mutex::default(),
            tasks: Mutex::default(),
            leftovers: Mutex::new(Some(leftovers)),
            wake: Notify::new(),
            last_heartbeat: Mutex::default(),
        })
    }

    pub fn runtime(&self) -> &TaskRuntime {
        &self.runtime
    }

    pub fn networks(&self) -> &Arc<NodeNetworks> {
        &self.networks
    }

    /// The managers' API endpoints as the last heartbeat listed them.
    pub fn managers(&self) -> Vec<String> {
        self.managers.lock().expect("managers").clone()
    }

    /// The state of each task this node knows (metrics).
    pub fn task_states(&self) -> Vec<TaskState> {
        let tasks = self.tasks.lock().expect("tasks");
        tasks.values().map(|task| task.state).collect()
    }

    /// How long ago a manager last answered a heartbeat; None before the first answer.
    pub fn since_heartbeat(&self) -> Option<Duration> {
        let last = *self.last_heartbeat.lock().expect("last heartbeat");
        last.map(|at| at.elapsed())
    }

    /// Whether a node is a manager, as the last heartbeat said.
    pub fn is_manager(&self, node_id: &str) -> bool {
        self.manager_ids
            .lock()
            .expect("manager ids")
            .iter()
            .any(|id| id == node_id)
    }

    /// Output of local tasks, for a manager: the last `tail` lines of each task's log (at
    /// most `task_log::LINES_CAP`), or for a follower what came after its last read.
    pub fn task_logs(&self, caller: &str, request: &LogsRequest) -> Result<Vec<TaskLog>> {
        if !self.is_manager(caller) {
            anyhow::bail!("only managers may read task logs");
        }
        let tail = request
            .tail
            .unwrap_or(task_log::LINES_CAP)
            .min(task_log::LINES_CAP);
        let mut logs = Vec::new();
        for id in &request.task_ids {
            // IDs are ours to check: they become file names.
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                anyhow::bail!("bad task id {id:?}");
            }
            let path = self.runtime.log_path(id);
            let (lines, end) = match request.after.as_ref().map(|after| after.get(id)) {
                None => task_log::tail(&task_log::read(&path), tail, false),
                // A follower's first read of this task: from its tail, or its start.
                Some(None) if request.tail.is_some() => {
                    task_log::tail(&task_log::read(&path), tail, true)
                }
                Some(None) => task_log::after(&path, 0)?,
                Some(Some(&offset)) => task_log::after(&path, offset)?,
            };
            logs.push(TaskLog {
                task_id: id.clone(),
                lines,
                end,
            });
        }
        Ok(logs)
    }

    /// A running local task by ID, ID prefix, name (`web.1.<id>`) or name without its ID
    /// (`web.1`: one slot runs one task at a time).
    pub fn resolve_local(&self, key: &str) -> Result<String> {
        let tasks = self.tasks.lock().expect("tasks");
        let matches: Vec<&String> = tasks
            .iter()
            .filter(|(id, task)| task.stop.is_some() && names_task(key, id, &task.name))
            .map(|(id, _)| id)
            .collect();
        match matches.as_slice() {
            [id] => Ok((*id).clone()),
            [] => anyhow::bail!(shoal_api::ApiError::not_found(format!(
                "no running task {key} on this node: `shoal node ps` lists this node's tasks, \
                 `shoal service ps SERVICE` (on a manager) says where a service's tasks run"
            ))),
            _ => anyhow::bail!(shoal_api::ApiError::invalid(format!(
                "task {key} is ambiguous on this node"
            ))),
        }
    }

    /// Stops every local task and waits (bounded) until they are gone.
    pub async fn stop_all(&self) {
        for task in self.tasks.lock().expect("tasks").values_mut() {
            if let Some(stop) = task.stop.take() {
                let _ = stop.send(());
            }
        }
        let deadline = tokio::time::Instant::now() + STOP_GRACE + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            let all_done = self
                .tasks
                .lock()
                .expect("tasks")
                .values()
                .all(|t| t.state.is_terminal());
            if all_done {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Heartbeats until `shutdown` turns true. Tasks keep running when the agent stops.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut failing_since: Option<tokio::time::Instant> = None;
        // The version of the managers' last answer: they hold the next one until it changes.
        let mut known: Option<u64> = None;
        // What the managers were last told of each task.
        let mut told: HashMap<String, TaskReport> = HashMap::new();
        // When the managers were last sent news: news goes at most every `REPORT_BATCH`.
        let mut last_news: Option<tokio::time::Instant> = None;
        while !*shutdown.borrow() {
            // A wake for a change the reports below include already: forgotten (taken
            // without waiting), so it does not cut the next held heartbeat short.
            let _ = tokio::time::timeout(Duration::ZERO, self.wake.notified()).await;
            let mut reports = self.reports();
            let mut news = reports.iter().any(|r| is_news(r, told.get(&r.task_id)));
            if let Some(wait) = last_news
                .filter(|_| news)
                .and_then(|at| REPORT_BATCH.checked_sub(at.elapsed()))
            {
                // Tasks start in bursts: one report, one replicated write for the batch.
                tokio::time::sleep(wait).await;
                reports = self.reports();
                news = reports.iter().any(|r| is_news(r, told.get(&r.task_id)));
            }
            if news {
                last_news = Some(tokio::time::Instant::now());
            }
            let beat = tokio::select! {
                beat = self.heartbeat(known, reports.clone()) => beat,
                // A task changed state while a heartbeat with nothing new is held: it goes
                // now. (One with news is answered at once, and is not cut short.)
                () = self.wake.notified(), if known.is_some() && !news => {
                    tokio::time::sleep(REPORT_BATCH).await;
                    continue;
                }
                _ = shutdown.changed() => continue,
            };
            let previous = known;
            known = beat.as_ref().ok().map(|a| a.version).filter(|v| *v != 0);
            if beat.is_ok() {
                told = reports
                    .into_iter()
                    .map(|r| (r.task_id.clone(), r))
                    .collect();
            }
            match beat {
                Ok(answer) => {
                    *self.last_heartbeat.lock().expect("last heartbeat") =
                        Some(tokio::time::Instant::now());
                    if failing_since.take().is_some() {
                        tracing::info!("managers reachable again");
                    }
                    if !answer.managers.is_empty() {
                        *self.managers.lock().expect("managers") = answer.managers.clone();
                    }
                    *self.manager_ids.lock().expect("manager ids") = answer.manager_ids;
                    self.apply_role(answer.role);
                    let seeds: Vec<String> = answer
                        .managers
                        .iter()
                        .chain(&answer.peers)
                        .cloned()
                        .collect();
                    self.apply_gossip_keys(&answer.gossip_keys, &seeds, &shutdown)
                        .await;
                    if let Some(ingress) = &answer.ingress {
                        if let Err(err) = self.networks.ensure_ingress(ingress).await {
                            tracing::warn!(error = %format!("{err:#}"), "setting up the routing mesh endpoint");
                        }
                    }
                    self.apply(answer.assignments);
                }
                Err(err) => {
                    if failing_since.is_none() {
                        tracing::warn!(error = %format!("{err:#}"), "heartbeat failed; tasks keep running");
                        failing_since = Some(tokio::time::Instant::now());
                    }
                }
            }
            if known.is_some() {
                // The managers pace the next heartbeat by holding it. After an answer that
                // changed, the tasks it starts go first: the next one is asked for a batch
                // later (with what those starts have to report by then).
                if known != previous {
                    tokio::select! {
                        _ = tokio::time::sleep(REPORT_BATCH) => {}
                        _ = shutdown.changed() => {}
                    }
                }
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
                _ = self.wake.notified() => tokio::time::sleep(REPORT_BATCH).await,
                _ = shutdown.changed() => {}
            }
        }
    }

    fn apply_role(&self, new: Role) {
        let mut role = self.role.lock().expect("role");
        if *role != new {
            *role = new;
            let _ = self.role_changes.send(new);
        }
    }

    async fn apply_gossip_keys(
        &self,
        keys: &[String],
        seeds: &[String],
        shutdown: &watch::Receiver<bool>,
    ) {
        if keys.is_empty() || *self.gossip_keys.lock().expect("gossip keys") == keys {
            return;
        }
        match self
            .networks
            .set_keyring(keys, seeds, shutdown.clone())
            .await
        {
            Ok(()) => *self.gossip_keys.lock().expect("gossip keys") = keys.to_vec(),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "applying the gossip keyring failed")
            }
        }
    }

    fn reports(&self) -> Vec<TaskReport> {
        self.tasks
            .lock()
            .expect("tasks")
            .iter()
            .map(|(id, task)| TaskReport {
                task_id: id.clone(),
                state: task.state,
                error: task.error.clone(),
                health: task.health.clone(),
            })
            .collect()
    }

    /// One heartbeat, to the first manager that answers (the last good one first).
    async fn heartbeat(
        &self,
        known: Option<u64>,
        reports: Vec<TaskReport>,
    ) -> Result<HeartbeatResponse> {
        let managers = self.managers.lock().expect("managers").clone();
        let envelope = Envelope {
            forwarded: false,
            origin: None,
            request: ClusterRequest::Heartbeat {
                reports,
                resources: super::resources::reported(),
                known,
            },
        };
        let mut last_error = anyhow::anyhow!("no managers known");
        for (i, manager) in managers.iter().enumerate() {
            match self
                .client
                .post::<_, ClusterResponse>(manager, "/cluster", &envelope, Duration::from_secs(5))
                .await
            {
                Ok(ClusterResponse::Heartbeat(answer)) => {
                    if i > 0 {
                        self.managers.lock().expect("managers").rotate_left(i);
                    }
                    return Ok(answer);
                }
                Ok(_) => last_error = anyhow::anyhow!("{manager} answered a heartbeat oddly"),
                Err(err) => last_error = err.context(format!("manager {manager}")),
            }
        }
        Err(last_error)
    }

    /// Settles the tasks a previous agent left against the managers' assignments: a task
    /// they still want running is adopted (same process, addresses and cgroup); one that
    /// ended meanwhile is reported with its real exit status; one they replaced while this
    /// node was away is stopped, as Swarm does with orphaned tasks.
    fn settle_leftovers(
        self: &Arc<Self>,
        assignments: &[Assignment],
        tasks: &mut HashMap<String, LocalTask>,
    ) {
        // Once, with the first assignments.
        let Some(leftovers) = self.leftovers.lock().expect("leftovers").take() else {
            return;
        };
        let mut adopted = HashSet::new();
        for id in leftovers {
            let wanted = assignments
                .iter()
                .find(|a| a.task_id == id && a.desired == TaskState::Running);
            let Some(assignment) = wanted else {
                tracing::info!(task = %id, "stopped a task the managers no longer want (orphaned while the agent was away)");
                self.discard_leftover(&id);
                continue;
            };
            let (state, error, stop) = match self.runtime.adopt(&id) {
                Ok(handle) => {
                    tracing::info!(task = %assignment.name, "adopted a task of the previous agent");
                    let (stop, stopped) = oneshot::channel();
                    tokio::spawn(Arc::clone(self).supervise(
                        assignment.clone(),
                        Launched::Adopted(handle),
                        stopped,
                    ));
                    adopted.insert(id.clone());
                    (TaskState::Running, String::new(), Some(stop))
                }
                // It ended while no agent ran: reported with the status its PID 1 left.
                Err(err) => {
                    let (state, error) = match self.runtime.exit_status(&id) {
                        Some(status) if status.success() => (TaskState::Complete, String::new()),
                        Some(status) => (TaskState::Failed, describe_exit(status)),
                        None => (
                            TaskState::Failed,
                            format!("task: could not be adopted after an agent restart: {err:#}"),
                        ),
                    };
                    tracing::info!(task = %assignment.name, state = ?state, error = %error, "a task ended while the agent was away");
                    self.discard_leftover(&id);
                    (state, error, None)
                }
            };
            let name = assignment.name.clone();
            tasks.insert(
                id,
                LocalTask {
                    name,
                    state,
                    error,
                    stop,
                    health: None,
                },
            );
        }
        self.networks.release_task_links_except(&adopted);
    }

    /// Ends what is left of a previous agent's task that is not adopted.
    fn discard_leftover(&self, id: &str) {
        if let Err(err) = self.runtime.discard(id) {
            tracing::warn!(task = %id, error = %format!("{err:#}"), "cleaning up a leftover task");
        }
        self.networks.forget_leftover(id);
    }

    fn apply(self: &Arc<Self>, assignments: Vec<Assignment>) {
        let mut tasks = self.tasks.lock().expect("tasks");
        self.settle_leftovers(&assignments, &mut tasks);
        let assigned: HashSet<&str> = assignments.iter().map(|a| a.task_id.as_str()).collect();
        for assignment in &assignments {
            match (assignment.desired, tasks.get_mut(&assignment.task_id)) {
                (TaskState::Running, None) => {
                    let local = self.start(assignment);
                    tasks.insert(assignment.task_id.clone(), local);
                }
                (desired, Some(local)) if desired != TaskState::Running => {
                    if let Some(stop) = local.stop.take() {
                        let _ = stop.send(());
                    }
                }
                (_, None) => {
                    // To be stopped, but it never ran here.
                    tasks.insert(
                        assignment.task_id.clone(),
                        LocalTask {
                            name: assignment.name.clone(),
                            state: TaskState::Shutdown,
                            error: String::new(),
                            stop: None,
                            health: None,
                        },
                    );
                }
                _ => {}
            }
        }
        // A running task the managers no longer list (its service is gone): stop it.
        for (id, local) in tasks.iter_mut() {
            if !assigned.contains(id.as_str()) {
                if let Some(stop) = local.stop.take() {
                    let _ = stop.send(());
                }
            }
        }
        // Forget finished tasks the managers no longer ask about.
        tasks.retain(|id, local| assigned.contains(id.as_str()) || !local.state.is_terminal());
    }

    fn start(self: &Arc<Self>, assignment: &Assignment) -> LocalTask {
        // The user is resolved here: one this node does not know Rejects the task.
        let options = assignment.containment.launch_options();
        let launch = options.and_then(|(confinement, limits)| {
            let launch = TaskLaunch {
                id: assignment.task_id.clone(),
                name: assignment.name.clone(),
                command: assignment.command.clone(),
                env: assignment.env.clone(),
                confinement,
                limits,
            };
            let handle = self.runtime.start(&launch)?;
            Ok((launch, handle))
        });
        match launch {
            Ok((launch, handle)) => {
                let (stop, stopped) = oneshot::channel();
                tokio::spawn(Arc::clone(self).supervise(
                    assignment.clone(),
                    Launched::Started(handle),
                    stopped,
                ));
                LocalTask {
                    name: launch.name,
                    state: TaskState::Starting,
                    error: String::new(),
                    stop: Some(stop),
                    health: None,
                }
            }
            Err(err) => {
                tracing::warn!(task = %assignment.name, error = %format!("{err:#}"), "task rejected");
                LocalTask {
                    name: assignment.name.clone(),
                    state: TaskState::Rejected,
                    error: format!("{err:#}"),
                    stop: None,
                    health: None,
                }
            }
        }
    }

    /// Connects a started task to its networks, then lets its command run; an adopted one
    /// is connected already: its networks and programs are taken over.
    async fn connect(&self, task: &Assignment, launched: &mut Launched) -> Result<()> {
        match launched {
            Launched::Started(handle) => {
                check_networks_clear(&self.networks, &task.networks).await?;
                // task-init opened the task's DNS sockets with its namespaces, so its DNS is
                // there as soon as its interfaces are.
                let (pid, dns) = handle.namespaces_made().await?;
                self.networks
                    .connect(task, pid, &dns, || handle.open_gate())
                    .await
            }
            Launched::Adopted(handle) => {
                let pid = handle.first_pid().context("the task already ended")?;
                self.networks.readopt(task, pid).await
            }
        }
    }

    async fn supervise(
        self: Arc<Self>,
        task: Assignment,
        mut launched: Launched,
        mut stopped: oneshot::Receiver<()>,
    ) {
        let id = task.task_id.clone();
        // None: told to stop while starting.
        let connected = tokio::select! {
            connected = self.connect(&task, &mut launched) => Some(connected),
            _ = &mut stopped => None,
        };
        let (Launched::Started(mut handle) | Launched::Adopted(mut handle)) = launched;
        let (state, error) = match connected {
            Some(Ok(())) => {
                tracing::info!(task = %task.name, "task started");
                self.set_state(&id, TaskState::Running, String::new(), true);
                self.wake.notify_one();
                self.wait_or_stop(&task, &mut handle, stopped).await
            }
            failed_or_stopped => {
                // Closing the gate ends the task; stop() reaps it and removes its cgroup.
                handle.close_gate();
                let _ = handle.stop(STOP_GRACE).await;
                match failed_or_stopped {
                    Some(Err(err)) => {
                        tracing::warn!(task = %task.name, error = %format!("{err:#}"), "task could not start");
                        (TaskState::Rejected, format!("{err:#}"))
                    }
                    _ => (TaskState::Shutdown, String::new()),
                }
            }
        };
        self.networks.disconnect(&id).await;
        tracing::info!(task = %id, state = ?state, error = %error, "task ended");
        self.set_state(&id, state, error, false);
        self.wake.notify_one();
    }

    fn set_state(&self, id: &str, state: TaskState, error: String, running: bool) {
        if let Some(local) = self.tasks.lock().expect("tasks").get_mut(id) {
            local.state = state;
            local.error = error;
            if !running {
                local.stop = None;
            }
        }
    }

    async fn wait_or_stop(
        &self,
        task: &Assignment,
        handle: &mut TaskHandle,
        stopped: oneshot::Receiver<()>,
    ) -> (TaskState, String) {
        let id = task.task_id.as_str();
        let memory_limit = task.containment.limits.memory_bytes;
        let unhealthy = async {
            match &task.healthcheck {
                Some(check) => self.watch_health(task, check).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = handle.wait() => {
                let oom_kills = handle.oom_kills();
                if let Err(err) = handle.remove_cgroup().await {
                    tracing::warn!(task = %id, error = %format!("{err:#}"), "cleaning up the task's cgroup");
                }
                match status {
                    Ok(status) if status.success() => (TaskState::Complete, String::new()),
                    Ok(_) if oom_kills > 0 => (
                        TaskState::Failed,
                        format!(
                            "out of memory: killed at its {} limit (--limit-memory)",
                            shoal_dataplane::limits::format_memory(memory_limit)
                        ),
                    ),
                    Ok(status) => (TaskState::Failed, describe_exit(status)),
                    Err(err) => (TaskState::Failed, format!("lost track of the task: {err}")),
                }
            }
            _ = stopped => {
                // Out of every VIP first, so no new connection picks a task about to stop.
                self.networks.withdraw(id).await;
                self.drain(task).await;
                match handle.stop(STOP_GRACE).await {
                    Ok(_) => (TaskState::Shutdown, String::new()),
                    Err(err) => (TaskState::Shutdown, format!("stopping: {err:#}")),
                }
            }
            () = unhealthy => {
                // Every node stopped sending it new flows when its record said unhealthy;
                // what it still serves gets time to finish, then it ends Failed and the
                // orchestrator replaces it, as Swarm does.
                tracing::warn!(task = %task.name, "unhealthy: stopping it");
                tokio::time::sleep(UNHEALTHY_DRAIN).await;
                self.networks.withdraw(id).await;
                self.drain(task).await;
                if let Err(err) = handle.stop(STOP_GRACE).await {
                    tracing::warn!(task = %task.name, error = %format!("{err:#}"), "stopping an unhealthy task");
                }
                (TaskState::Failed, UNHEALTHY_ERROR.to_owned())
            }
        }
    }

    /// Between withdrawing a task from routing and signalling it: until no node sends it new
    /// connections any more (see `drain`).
    async fn drain(&self, task: &Assignment) {
        let pid = self.runtime.init_pid(&task.task_id).ok();
        if drain::until_quiet(pid).await {
            tracing::warn!(task = %task.name, "still given new connections after its withdrawal: stopping it anyway");
        }
    }

    /// Probes the task every interval until it turns unhealthy. Each change of its health
    /// goes to gossip at once (routing on every node follows it) and to the managers with
    /// the next heartbeat, sent now.
    async fn watch_health(&self, task: &Assignment, check: &HealthCheck) {
        let started = tokio::time::Instant::now();
        let mut tracker = HealthTracker::new(check);
        self.set_health(&task.task_id, tracker.health());
        self.wake.notify_one();
        loop {
            tokio::time::sleep(check.interval()).await;
            let probe = health_probe::run(&self.runtime, task, check).await;
            let before = tracker.health().clone();
            let changed = tracker.record(probe, started.elapsed());
            self.set_health(&task.task_id, tracker.health());
            if let Some(status) = changed {
                tracing::info!(task = %task.name, health = status.label(), "health changed");
                self.networks
                    .set_health(&task.task_id, routing_health(status))
                    .await;
            }
            // What the managers keep goes at once.
            if tracker.health().moved_from(Some(&before)) {
                self.wake.notify_one();
            }
            if tracker.health().status == HealthStatus::Unhealthy {
                return;
            }
        }
    }

    fn set_health(&self, id: &str, health: &TaskHealth) {
        if let Some(local) = self.tasks.lock().expect("tasks").get_mut(id) {
            local.health = Some(health.clone());
        }
    }
}

fn routing_health(status: HealthStatus) -> shoal_gossip::EndpointHealth {
    match status {
        HealthStatus::Starting => shoal_gossip::EndpointHealth::Starting,
        HealthStatus::Healthy => shoal_gossip::EndpointHealth::Healthy,
        HealthStatus::Unhealthy => shoal_gossip::EndpointHealth::Unhealthy,
    }
}

/// Refuses networks whose subnet overlaps this node's addresses or routes, which the
/// managers cannot see: the task could not reach those addresses (its route to the overlay
/// wins), so it is Rejected with the reason instead of running cut off. Only networks not
/// built here yet are checked: the host is read once per network, not once per task.
async fn check_networks_clear(built: &NodeNetworks, networks: &[AssignedNetwork]) -> Result<()> {
    let new: Vec<&AssignedNetwork> = networks
        .iter()
        .filter(|n| built.local_id(&n.spec.id).is_none())
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let claims = tokio::task::spawn_blocking(ipam::host_claims)
        .await?
        .context("reading this node's addresses and routes")?;
    for network in new {
        let (base, prefix) = network.spec.subnet;
        let subnet = Subnet::new(base, prefix)?;
        if let Some(claim) = ipam::first_overlap(subnet, &claims) {
            anyhow::bail!(
                "network {}: its subnet {subnet} overlaps {claim} on this node, so its tasks \
                 could not reach those addresses; give the network another subnet, or the node \
                 other addresses",
                network.spec.name
            );
        }
    }
    Ok(())
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("task: non-zero exit ({code})"),
        (None, Some(signal)) => format!("task: killed by signal {signal}"),
        _ => "task: ended abnormally".into(),
    }
}

/// Whether `key` (ID, ID prefix, `web.1.<id>` or `web.1`) names the task `id` called `name`.
fn names_task(key: &str, id: &str, name: &str) -> bool {
    !key.is_empty()
        && (id.starts_with(key)
            || name == key
            || name
                .strip_prefix(key)
                .is_some_and(|rest| rest == format!(".{id}")))
}

/// Whether a task's report says more than the managers were told (`told`): a task they have
/// not heard of, a new state or error, or a health change worth replicating.
fn is_news(report: &TaskReport, told: Option<&TaskReport>) -> bool {
    told.is_none_or(|told| {
        report.state != told.state
            || report.error != told.error
            || report
                .health
                .as_ref()
                .is_some_and(|health| health.moved_from(told.health.as_ref()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_the_managers_were_not_told_is_news() {
        use crate::health::{HealthProbe, HealthStatus, TaskHealth};
        let probe = |end_ms| HealthProbe {
            start_ms: end_ms - 1,
            end_ms,
            exit_code: 0,
            output: String::new(),
        };
        let healthy = |log| TaskHealth {
            status: HealthStatus::Healthy,
            failing_streak: 0,
            log,
        };
        let report = |state, health| TaskReport {
            task_id: "t".into(),
            state,
            error: String::new(),
            health,
        };
        let told = report(TaskState::Running, Some(healthy(vec![probe(10)])));
        // A task the managers have not heard of, a new state or error: news.
        assert!(is_news(&told, None));
        assert!(is_news(&report(TaskState::Failed, None), Some(&told)));
        let mut failed = told.clone();
        failed.error = "exit 1".into();
        assert!(is_news(&failed, Some(&told)));
        // A healthy task's new passing probe is not (the managers do not replicate those);
        // turning unhealthy is.
        let later = report(
            TaskState::Running,
            Some(healthy(vec![probe(10), probe(20)])),
        );
        assert!(!is_news(&later, Some(&told)));
        let mut unhealthy = later.clone();
        unhealthy.health.as_mut().unwrap().status = HealthStatus::Unhealthy;
        assert!(is_news(&unhealthy, Some(&told)));
        assert!(!is_news(&told, Some(&told)));
    }

    #[test]
    fn tasks_are_named_by_id_prefix_full_name_or_slot() {
        let (id, name) = ("pq8sp0ctah", "web.1.pq8sp0ctah");
        for key in ["pq8sp0ctah", "pq8", "web.1.pq8sp0ctah", "web.1"] {
            assert!(names_task(key, id, name), "{key}");
        }
        for key in [
            "",
            "1",
            "web",
            "web.2",
            "api.1.pq8sp0ctah",
            "web.1.pq8",
            "web.1.zzz",
        ] {
            assert!(!names_task(key, id, name), "{key}");
        }
    }
}
