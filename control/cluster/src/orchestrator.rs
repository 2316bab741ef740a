//! The leader's reconciliation: from services and nodes to tasks. A pure function of the
//! state and the clock, so every decision is unit-testable; the leader proposes its output.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use super::{
    ipam,
    pki::random_id,
    state::{
        Attachment, Availability, ClusterState, Command, EndpointMode, Network, Node, NodeStatus,
        Service, ServiceMode, Task, TaskState, Timestamp,
    },
    update::{self, FailureAction, Transition, UpdateOrder},
};

/// Tasks kept per slot (the running one plus history), as Swarm's default; more when the
/// restart policy counts more attempts.
pub const TASK_HISTORY_LIMIT: usize = 5;

/// Start-first without a health check: how long (seconds, whole ones as the state counts
/// them, so 1-2 s) a replacement runs before the task it replaces leaves. It is in the
/// routing mesh once it accepts connections (probed every 50 ms, then gossiped); this is its
/// time to start listening. (Nodes report a started task within 100 ms, so nothing else
/// leaves that time any more.) With a health check, its first passing probe is the signal.
const START_FIRST_SETTLE: Timestamp = 2;

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// How long a node may be Down before its tasks are rescheduled elsewhere.
    pub down_grace_secs: u64,
}

/// The commands that bring tasks in line with services and nodes; empty when converged.
pub fn reconcile(state: &ClusterState, now: Timestamp, settings: Settings) -> Vec<Command> {
    let mut commands = Vec::new();
    let mut vips = plan_vips(state, &mut commands);
    plan_node_ingress(state, &mut commands, &mut vips);
    let mut plan = Plan {
        state,
        now,
        changed: BTreeMap::new(),
        delete: Vec::new(),
        rollouts: Vec::new(),
        vips,
        addresses: HashMap::new(),
    };
    plan.orphan_tasks_of_lost_nodes(settings.down_grace_secs);
    for service in state.services.values() {
        match service.spec.mode {
            ServiceMode::Replicated { replicas } => plan.replicated(service, replicas),
            ServiceMode::Global => plan.global(service),
        }
        plan.rolling_update(service);
    }
    plan.shut_down_removed_services();
    plan.assign_pending();
    plan.trim_history();

    commands.append(&mut plan.rollouts);
    if !plan.changed.is_empty() {
        commands.push(Command::PutTasks(plan.changed.into_values().collect()));
    }
    if !plan.delete.is_empty() {
        commands.push(Command::DeleteTasks(plan.delete));
    }
    commands
}

struct Plan<'a> {
    state: &'a ClusterState,
    now: Timestamp,
    /// Tasks created or changed in this pass, by ID; they shadow the state's copies.
    changed: BTreeMap<String, Task>,
    delete: Vec<String>,
    /// `SetUpdateStatus` commands: rollouts that paused, rolled back or completed.
    rollouts: Vec<Command>,
    /// Addresses tasks must not take after this pass: every service's VIPs, and the nodes'
    /// ingress endpoints (under `node/<id>`).
    vips: BTreeMap<String, Vec<Attachment>>,
    /// Each network's addresses as this pass gives them out, from its first new task on.
    addresses: HashMap<String, ipam::AddressBook>,
}

/// Gives every `vip`-mode service one VIP per network (keeping the ones it has), and takes
/// them from `dnsrr` services and removed networks. Returns every service's VIPs.
fn plan_vips(
    state: &ClusterState,
    commands: &mut Vec<Command>,
) -> BTreeMap<String, Vec<Attachment>> {
    let mut all: BTreeMap<String, Vec<Attachment>> = state
        .services
        .iter()
        .map(|(id, s)| (id.clone(), s.vips.clone()))
        .collect();
    for service in state.services.values() {
        let wanted: &[String] = match service.spec.endpoint_mode {
            EndpointMode::Vip => &service.spec.networks,
            EndpointMode::Dnsrr => &[],
        };
        let mut vips: Vec<Attachment> = Vec::new();
        for network_id in wanted {
            if let Some(kept) = service.vips.iter().find(|v| v.network_id == *network_id) {
                vips.push(kept.clone());
                continue;
            }
            let Some(network) = state.networks.get(network_id) else {
                continue;
            };
            let reserved = all
                .values()
                .flatten()
                .filter(|a| a.network_id == *network_id);
            let reserved = reserved.map(|a| a.address);
            let mut book = address_book(network, state.tasks.values(), reserved);
            match book.take() {
                Ok(address) => vips.push(Attachment {
                    network_id: network_id.clone(),
                    address,
                }),
                Err(err) => {
                    tracing::warn!(service = %service.spec.name, error = %format!("{err:#}"), "no address left for a VIP")
                }
            }
        }
        if vips != service.vips {
            all.insert(service.id.clone(), vips.clone());
            commands.push(Command::SetServiceVips {
                id: service.id.clone(),
                vips,
            });
        }
    }
    all
}

/// A network's addresses for one pass: those of tasks that have not finished and `reserved`
/// ones are taken; the ones finished tasks (kept for the record) held are given last, the
/// longest freed first (`ipam::AddressBook`).
fn address_book<'a>(
    network: &Network,
    tasks: impl Iterator<Item = &'a Task>,
    reserved: impl Iterator<Item = Ipv4Addr>,
) -> ipam::AddressBook {
    let mut used: BTreeSet<Ipv4Addr> = reserved.collect();
    let mut freed: BTreeMap<Ipv4Addr, Timestamp> = BTreeMap::new();
    for task in tasks {
        let here = task
            .attachments
            .iter()
            .filter(|a| a.network_id == network.id);
        for attachment in here {
            if task.state.is_terminal() {
                let at = freed.entry(attachment.address).or_insert(task.state_since);
                *at = (*at).max(task.state_since);
            } else {
                used.insert(attachment.address);
            }
        }
    }
    ipam::AddressBook::new(network.subnet, network.gateway, used, freed)
}

/// Gives every node an address on the ingress network (the routing mesh's endpoint there)
/// and adds them to `reserved`.
fn plan_node_ingress(
    state: &ClusterState,
    commands: &mut Vec<Command>,
    reserved: &mut BTreeMap<String, Vec<Attachment>>,
) {
    let Some(ingress) = state.ingress_network() else {
        return;
    };
    let endpoints = state.nodes.values().filter_map(|n| n.ingress_address);
    let mut addresses = address_book(ingress, state.tasks.values(), endpoints);
    for node in state.nodes.values() {
        let address = match node.ingress_address {
            Some(address) => address,
            None => match addresses.take() {
                Ok(address) => {
                    commands.push(Command::SetNodeIngress {
                        id: node.id.clone(),
                        address: Some(address),
                    });
                    address
                }
                Err(err) => {
                    tracing::warn!(node = %node.hostname, error = %format!("{err:#}"), "no ingress address left for a node");
                    continue;
                }
            },
        };
        reserved.insert(
            format!("node/{}", node.id),
            vec![Attachment {
                network_id: ingress.id.clone(),
                address,
            }],
        );
    }
}

impl Plan<'_> {
    fn tasks(&self) -> impl Iterator<Item = &Task> {
        self.state
            .tasks
            .values()
            .filter(|t| !self.changed.contains_key(&t.id))
            .chain(self.changed.values())
    }

    fn service_tasks(&self, service_id: &str) -> Vec<Task> {
        self.tasks()
            .filter(|t| t.service_id == service_id)
            .cloned()
            .collect()
    }

    fn put(&mut self, task: Task) {
        self.changed.insert(task.id.clone(), task);
    }

    fn shut_down(&mut self, mut task: Task, message: &str) {
        task.desired = TaskState::Shutdown;
        task.message = message.to_owned();
        self.put(task);
    }

    /// Returns the new task's ID (None: no address left for it).
    fn new_task(
        &mut self,
        service: &Service,
        slot: u64,
        node_id: Option<String>,
    ) -> Option<String> {
        let attachments = match self.attach(service) {
            Ok(attachments) => attachments,
            Err(err) => {
                // No address left: the slot waits, as a Pending task would, and says why.
                tracing::warn!(service = %service.spec.name, error = %format!("{err:#}"), "cannot attach a new task");
                return None;
            }
        };
        let task = Task {
            attachments,
            id: random_id(25),
            service_id: service.id.clone(),
            slot,
            service_version: service.version,
            desired: TaskState::Running,
            state: if node_id.is_some() {
                TaskState::Assigned
            } else {
                TaskState::Pending
            },
            node_id,
            message: "created".into(),
            error: String::new(),
            created_at: self.now,
            state_since: self.now,
            health: None,
        };
        let id = task.id.clone();
        self.put(task);
        Some(id)
    }

    /// One address per network of the service: a free one, where free means not held by a
    /// task that has not finished (finished tasks keep theirs for the record only), those
    /// finished tasks held given last (`ipam::AddressBook`).
    fn attach(&mut self, service: &Service) -> anyhow::Result<Vec<Attachment>> {
        let mut attachments = Vec::new();
        for network_id in self.state.task_networks(&service.spec) {
            let network = self
                .state
                .networks
                .get(&network_id)
                .ok_or_else(|| anyhow::anyhow!("network {network_id} is gone"))?;
            if !self.addresses.contains_key(&network_id) {
                let vips = self.vips.values().flatten();
                let vips = vips
                    .filter(|a| a.network_id == network_id)
                    .map(|a| a.address);
                let book = address_book(network, self.tasks(), vips);
                self.addresses.insert(network_id.clone(), book);
            }
            let book = self.addresses.get_mut(&network_id).expect("just made");
            attachments.push(Attachment {
                address: book.take()?,
                network_id,
            });
        }
        Ok(attachments)
    }

    /// A task still meant to run, not known to have stopped, on a node that keeps it.
    fn is_live(&self, task: &Task) -> bool {
        task.desired == TaskState::Running
            && !task.state.is_terminal()
            && self.eviction(task).is_none()
    }

    /// Why a task must move off its node now, if it must: the node is drained, or it is
    /// leaving the swarm (it stops its tasks itself; their replacements go elsewhere at once).
    fn eviction(&self, task: &Task) -> Option<&'static str> {
        let node = self.state.nodes.get(task.node_id.as_ref()?)?;
        if node.left {
            Some("node left")
        } else if node.availability == Availability::Drain {
            Some("node drained")
        } else {
            None
        }
    }

    /// Whether a slot with no live task gets a new one now. A slot that is new, or whose
    /// last task ran an older spec or was stopped or lost by the swarm, always does; one whose
    /// task ended on its own follows the restart policy, after its delay. A task left
    /// unreplaced for good is marked so (desired Shutdown, with the reason).
    fn refill(&mut self, service: &Service, in_slot: impl Fn(&Task) -> bool) -> bool {
        let mut history: Vec<&Task> = self
            .tasks()
            .filter(|t| t.service_id == service.id && in_slot(t))
            .collect();
        history.sort_by_key(|t| (t.created_at, t.state_since));
        let Some(&newest) = history.last() else {
            return true;
        };
        if newest.service_version != service.version || !newest.ended_on_its_own() {
            if newest.state.is_terminal() && newest.desired == TaskState::Running {
                let newest = newest.clone();
                self.shut_down(newest, "replaced");
            }
            return true;
        }
        let policy = &service.spec.restart;
        if self.now < newest.state_since + policy.delay_secs {
            return false;
        }
        let mut ends: Vec<Timestamp> = history
            .iter()
            .filter(|t| t.service_version == service.version && t.ended_on_its_own())
            .map(|t| t.state_since)
            .collect();
        ends.sort();
        let newest = newest.clone();
        if policy.allows_restart(newest.state, &ends) {
            if newest.desired == TaskState::Running {
                self.shut_down(newest, "replaced");
            }
            return true;
        }
        if newest.desired == TaskState::Running {
            let why = format!(
                "not restarted (restart condition {}{})",
                policy.condition,
                if policy.max_attempts > 0 {
                    format!(", max attempts {}", policy.max_attempts)
                } else {
                    String::new()
                }
            );
            self.shut_down(newest, &why);
        }
        false
    }

    /// Tasks of nodes Down past the grace period, or removed from the swarm, have no one to
    /// report on them: they are Orphaned (and replaced by the passes that follow).
    fn orphan_tasks_of_lost_nodes(&mut self, grace: u64) {
        let orphans: Vec<(Task, &str)> = self
            .tasks()
            .filter(|t| !t.state.is_terminal())
            .filter_map(|t| {
                let node_id = t.node_id.as_ref()?;
                match self.state.nodes.get(node_id) {
                    None => Some((t.clone(), "node removed")),
                    Some(n)
                        if n.status == NodeStatus::Down && self.now >= n.status_since + grace =>
                    {
                        Some((t.clone(), "node down"))
                    }
                    Some(_) => None,
                }
            })
            .collect();
        for (mut task, why) in orphans {
            task.state = TaskState::Orphaned;
            task.state_since = self.now;
            task.desired = TaskState::Shutdown;
            task.message = why.to_owned();
            self.put(task);
        }
    }

    fn replicated(&mut self, service: &Service, replicas: u64) {
        let tasks = self.service_tasks(&service.id);
        for task in &tasks {
            if task.desired != TaskState::Running {
                continue;
            }
            if task.slot > replicas {
                self.shut_down(task.clone(), "scaled down");
            } else if task.state.is_terminal() {
                // Ended: `refill` below replaces it or not, as the restart policy says,
                // unless its slot runs another task (start-first) and it is simply done.
                self.retire_if_superseded(task);
            } else if let Some(why) = self.eviction(task) {
                self.shut_down(task.clone(), why);
            }
        }
        for slot in 1..=replicas {
            let has_live = self
                .tasks()
                .any(|t| t.service_id == service.id && t.slot == slot && self.is_live(t));
            if !has_live && self.refill(service, |t| t.slot == slot) {
                self.new_task(service, slot, None);
            }
        }
    }

    /// An ended task still desired Running whose slot has another live task (the old one
    /// of a start-first update it failed to replace) is not refilled: it is marked done, so
    /// a slot never counts two tasks.
    fn retire_if_superseded(&mut self, task: &Task) {
        let same_slot = |t: &Task| {
            t.service_id == task.service_id
                && t.slot == task.slot
                && (t.slot != 0 || t.node_id == task.node_id)
        };
        if self
            .tasks()
            .any(|t| t.id != task.id && same_slot(t) && self.is_live(t))
        {
            self.shut_down(task.clone(), "replaced");
        }
    }

    fn global(&mut self, service: &Service) {
        let eligible: Vec<&Node> = self
            .state
            .nodes
            .values()
            .filter(|n| eligible(n, service))
            .collect();
        for task in self.service_tasks(&service.id) {
            if task.desired != TaskState::Running {
                continue;
            }
            let still_eligible = eligible
                .iter()
                .any(|n| Some(&n.id) == task.node_id.as_ref());
            if !still_eligible {
                self.shut_down(task, "node no longer eligible");
            } else if task.state.is_terminal() {
                self.retire_if_superseded(&task);
            }
        }
        let reservations = &service.spec.containment.reservations;
        let mut capacity = super::resources::Capacity::new(self.state, self.tasks());
        for node in eligible {
            let has_live = self.tasks().any(|t| {
                t.service_id == service.id
                    && t.node_id.as_deref() == Some(&node.id)
                    && self.is_live(t)
            });
            let on_node = |t: &Task| t.node_id.as_deref() == Some(&node.id);
            if !has_live && self.refill(service, on_node) {
                let Some(id) = self.new_task(service, 0, Some(node.id.clone())) else {
                    continue;
                };
                if capacity.fits(node, reservations) {
                    capacity.take(&node.id, reservations);
                } else if let Some(task) = self.changed.get_mut(&id) {
                    // Its node lacks the reserved resources: it waits there, Pending.
                    task.state = TaskState::Pending;
                    task.message = super::resources::no_suitable_node(1);
                }
            }
        }
    }

    /// Rolls a new spec (or, rolling back, the previous one) out: tasks of another version
    /// are replaced `parallelism` at a time, once the service has converged and `delay` has
    /// passed since the last replacement started. New tasks that end within the monitor
    /// window are the rollout's failures; over the ratio, its failure action applies.
    fn rolling_update(&mut self, service: &Service) {
        let status = service.update_status.as_ref();
        let config = match status {
            Some(status) if status.is_rollback() => service.spec.rollback_config.clone(),
            _ => service.spec.update_config(),
        };
        let current = |t: &Task| t.service_version == service.version;
        let slot_of = |t: &Task| (t.slot, if t.slot == 0 { t.node_id.clone() } else { None });
        self.retire_replaced(service);
        if status.is_some_and(|s| !s.in_progress()) {
            return;
        }
        let since = status.map_or(0, |s| s.started_at);
        let tasks = self.service_tasks(&service.id);
        let monitor = config.control.monitor_secs;
        let mut failed: Vec<&Task> = tasks
            .iter()
            .filter(|t| current(t) && t.created_at >= since && t.ended_on_its_own())
            .filter(|t| t.state_since <= t.created_at + monitor)
            .collect();
        failed.sort_by_key(|t| t.state_since);
        let live: Vec<&Task> = tasks.iter().filter(|t| self.is_live(t)).collect();
        let total = match service.spec.mode {
            ServiceMode::Replicated { replicas } => replicas as usize,
            ServiceMode::Global => live.len(),
        };
        if let (Some(status), Some(last)) = (status, failed.last()) {
            if update::over_failure_ratio(failed.len(), total, config.control.max_failure_ratio) {
                let action = match config.control.failure_action {
                    // Nothing to roll back to (a service from before rollbacks were kept).
                    FailureAction::Rollback if service.previous_spec.is_none() => {
                        FailureAction::Pause
                    }
                    action => action,
                };
                if let Some(transition) = status.on_failure(action, &last.id, self.now) {
                    let (status, roll_back) = match transition {
                        Transition::Status(status) => (status, false),
                        Transition::RollBack(status) => (status, true),
                    };
                    self.rollouts.push(Command::SetUpdateStatus {
                        id: service.id.clone(),
                        version: service.version,
                        status,
                        roll_back,
                    });
                    return;
                }
            }
        }
        let outdated: Vec<&Task> = live.iter().copied().filter(|t| !current(t)).collect();
        // Start-first: a slot whose old task has not left yet (its replacement settling) holds
        // the next batch, so a slot never keeps two tasks beyond `parallelism` of them.
        let retiring = outdated.iter().any(|old| {
            live.iter()
                .any(|t| current(t) && slot_of(t) == slot_of(old))
        });
        let converged = live.iter().all(|t| t.is_ready()) && !retiring;
        let last_start = live
            .iter()
            .filter(|t| current(t))
            .map(|t| t.created_at)
            .max();
        if outdated.is_empty() {
            let monitored = last_start.is_none_or(|at| self.now >= at.max(since) + monitor);
            if let Some(done) = status
                .filter(|_| converged && monitored)
                .and_then(|s| s.completed(self.now))
            {
                self.rollouts.push(Command::SetUpdateStatus {
                    id: service.id.clone(),
                    version: service.version,
                    status: done,
                    roll_back: false,
                });
            }
            return;
        }
        let delay_over = last_start.is_none_or(|at| self.now >= at + config.delay_secs);
        if !converged || !delay_over {
            return;
        }
        // Slots with a live task of the spec already (start-first: the old one is retiring).
        let renewed: BTreeSet<(u64, Option<String>)> = live
            .iter()
            .filter(|t| current(t))
            .map(|t| slot_of(t))
            .collect();
        let batch = match config.parallelism {
            0 => usize::MAX,
            n => n as usize,
        };
        let replaced: Vec<Task> = outdated
            .into_iter()
            .filter(|t| !renewed.contains(&slot_of(t)))
            .take(batch)
            .cloned()
            .collect();
        for task in replaced {
            let (slot, node) = (task.slot, task.node_id.clone());
            if config.control.order == UpdateOrder::StopFirst {
                self.shut_down(task, "updated");
            }
            let node = match service.spec.mode {
                ServiceMode::Global => node,
                ServiceMode::Replicated { .. } => None,
            };
            self.new_task(service, slot, node);
        }
    }

    /// Start-first: a task of an older spec leaves once its slot's new task is ready (paused
    /// or not, so a slot never keeps two): healthy, or without a health check, running for
    /// `START_FIRST_SETTLE`.
    fn retire_replaced(&mut self, service: &Service) {
        let settled = |t: &Task| {
            t.health.is_some() || self.now.saturating_sub(t.state_since) >= START_FIRST_SETTLE
        };
        let ready: BTreeSet<(u64, Option<String>)> = self
            .tasks()
            .filter(|t| {
                t.service_id == service.id
                    && t.service_version == service.version
                    && self.is_live(t)
                    && t.is_ready()
                    && settled(t)
            })
            .map(|t| (t.slot, if t.slot == 0 { t.node_id.clone() } else { None }))
            .collect();
        let retiring: Vec<Task> = self
            .tasks()
            .filter(|t| {
                t.service_id == service.id
                    && t.service_version != service.version
                    && self.is_live(t)
                    && ready.contains(&(t.slot, if t.slot == 0 { t.node_id.clone() } else { None }))
            })
            .cloned()
            .collect();
        for task in retiring {
            self.shut_down(task, "updated");
        }
    }

    fn shut_down_removed_services(&mut self) {
        let orphaned: Vec<Task> = self
            .tasks()
            .filter(|t| !self.state.services.contains_key(&t.service_id))
            .cloned()
            .collect();
        for task in orphaned {
            if task.state.is_terminal() || task.node_id.is_none() {
                self.delete.push(task.id.clone());
                self.changed.remove(&task.id);
            } else if task.desired != TaskState::Shutdown {
                self.shut_down(task, "service removed");
            }
        }
    }

    /// Spread: the eligible node with the fewest tasks of the service, then fewest overall.
    fn assign_pending(&mut self) {
        let mut load: HashMap<(&str, &str), usize> = HashMap::new();
        let mut total: HashMap<&str, usize> = HashMap::new();
        for task in self.tasks().filter(|t| self.is_live(t)) {
            if let Some(node) = task.node_id.as_deref() {
                let node = self
                    .state
                    .nodes
                    .get_key_value(node)
                    .map(|(k, _)| k.as_str());
                if let Some(node) = node {
                    let service = self.state.services.get_key_value(&task.service_id);
                    if let Some((service, _)) = service {
                        *load.entry((service.as_str(), node)).or_default() += 1;
                    }
                    *total.entry(node).or_default() += 1;
                }
            }
        }
        let pending: Vec<Task> = self
            .tasks()
            .filter(|t| {
                t.node_id.is_none() && t.desired == TaskState::Running && !t.state.is_terminal()
            })
            .cloned()
            .collect();
        // What each node has left after the reservations of the tasks it holds.
        let mut capacity = super::resources::Capacity::new(self.state, self.tasks());
        // Global tasks wait on their own node until its resources free.
        let waiting: Vec<Task> = self
            .tasks()
            .filter(|t| {
                t.node_id.is_some()
                    && t.state == TaskState::Pending
                    && t.desired == TaskState::Running
            })
            .cloned()
            .collect();
        for mut task in waiting {
            let (Some(node), Some(service)) = (
                task.node_id.as_ref().and_then(|n| self.state.nodes.get(n)),
                self.state.services.get(&task.service_id),
            ) else {
                continue;
            };
            let reservations = &service.spec.containment.reservations;
            if capacity.fits(node, reservations) {
                capacity.take(&node.id, reservations);
                task.state = TaskState::Assigned;
                task.state_since = self.now;
                task.message = "scheduled".into();
                self.put(task);
            }
        }
        for mut task in pending {
            let Some((service_key, service)) = self.state.services.get_key_value(&task.service_id)
            else {
                continue;
            };
            let reservations = &service.spec.containment.reservations;
            let spec = &service.spec;
            let on_node = |load: &HashMap<(&str, &str), usize>, node: &str| {
                load.get(&(service_key.as_str(), node))
                    .copied()
                    .unwrap_or(0)
            };
            // Nodes that could take a task at all, then those the constraints allow.
            let ready: Vec<&Node> = self.state.nodes.values().filter(|n| available(n)).collect();
            let allowed: Vec<&Node> = ready
                .iter()
                .copied()
                .filter(|n| spec.constraints.iter().all(|c| c.matches(n)))
                .collect();
            let under_limit = |n: &Node| {
                spec.max_replicas_per_node == 0
                    || (on_node(&load, &n.id) as u64) < spec.max_replicas_per_node
            };
            // Placement preferences: per level, how many of the service's tasks the group
            // of nodes sharing the label values (so far) holds, over the allowed nodes.
            let groups = |n: &Node, level: usize| -> Vec<Option<String>> {
                spec.placement_prefs[..=level]
                    .iter()
                    .map(|p| n.labels.get(&p.spread).cloned())
                    .collect()
            };
            let group_load = |n: &Node, level: usize| -> usize {
                let group = groups(n, level);
                allowed
                    .iter()
                    .filter(|m| groups(m, level) == group)
                    .map(|m| on_node(&load, &m.id))
                    .sum()
            };
            let best = allowed
                .iter()
                .copied()
                .filter(|n| under_limit(n) && capacity.fits(n, reservations))
                .min_by_key(|n| {
                    let spread: Vec<usize> = (0..spec.placement_prefs.len())
                        .map(|level| group_load(n, level))
                        .collect();
                    (
                        spread,
                        on_node(&load, &n.id),
                        total.get(n.id.as_str()).copied().unwrap_or(0),
                        n.id.clone(),
                    )
                });
            match best {
                Some(node) => {
                    *load
                        .entry((service_key.as_str(), node.id.as_str()))
                        .or_default() += 1;
                    *total.entry(node.id.as_str()).or_default() += 1;
                    capacity.take(&node.id, reservations);
                    task.node_id = Some(node.id.clone());
                    task.state = TaskState::Assigned;
                    task.state_since = self.now;
                    task.message = "scheduled".into();
                    self.put(task);
                }
                None => {
                    // Swarm's words, with how many nodes each filter turned down.
                    let constrained = ready.len() - allowed.len();
                    let at_limit = allowed.iter().filter(|n| !under_limit(n)).count();
                    let short = allowed
                        .iter()
                        .filter(|n| under_limit(n) && !capacity.fits(n, reservations))
                        .count();
                    let message =
                        super::resources::no_suitable_node_because(constrained, at_limit, short);
                    if task.message != message {
                        task.message = message;
                        self.put(task);
                    }
                }
            }
        }
    }

    /// Keeps the newest `TASK_HISTORY_LIMIT` tasks per slot (per node for global services).
    fn trim_history(&mut self) {
        let mut slots: BTreeMap<(String, u64, String), Vec<&Task>> = BTreeMap::new();
        for task in self.tasks() {
            let node = if task.slot == 0 {
                task.node_id.clone().unwrap_or_default()
            } else {
                String::new()
            };
            slots
                .entry((task.service_id.clone(), task.slot, node))
                .or_default()
                .push(task);
        }
        let mut old = Vec::new();
        for ((service_id, _, _), tasks) in slots.iter_mut() {
            tasks.sort_by_key(|t| (t.created_at, t.id.clone()));
            // The restart policy counts attempts in the history: it keeps them all.
            let attempts = self
                .state
                .services
                .get(service_id)
                .map_or(0, |s| s.spec.restart.max_attempts as usize);
            let limit = TASK_HISTORY_LIMIT.max(attempts + 1);
            let excess = tasks.len().saturating_sub(limit);
            old.extend(
                tasks[..excess]
                    .iter()
                    .filter(|t| t.state.is_terminal())
                    .map(|t| t.id.clone()),
            );
        }
        for id in old {
            self.changed.remove(&id);
            self.delete.push(id);
        }
    }
}

/// A node that takes new tasks: up, active, not leaving.
fn available(node: &Node) -> bool {
    node.status == NodeStatus::Ready && !node.left && node.availability == Availability::Active
}

fn eligible(node: &Node, service: &Service) -> bool {
    available(node) && service.spec.constraints.iter().all(|c| c.matches(node))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        pki::Role,
        state::{Constraint, PlacementPref, ServiceSpec, TaskReport},
    };

    const SETTINGS: Settings = Settings {
        down_grace_secs: 10,
    };

    fn cluster(nodes: usize) -> ClusterState {
        let mut state = ClusterState::default();
        for i in 1..=nodes {
            let id = format!("n{i}");
            state.nodes.insert(
                id.clone(),
                Node {
                    id: id.clone(),
                    raft_id: i as u64,
                    hostname: format!("node{i}"),
                    addr: "10.0.0.1".parse().unwrap(),
                    port: 2377,
                    role: if i == 1 { Role::Manager } else { Role::Worker },
                    availability: Availability::Active,
                    status: NodeStatus::Ready,
                    labels: BTreeMap::new(),
                    created_at: 0,
                    status_since: 0,
                    ingress_address: None,
                    gossip_port: 7946,
                    exposed_metrics_port: None,
                    left: false,
                    resources: Default::default(),
                    platform: crate::state::Platform {
                        os: "linux".into(),
                        arch: "x86_64".into(),
                    },
                },
            );
        }
        state
    }

    fn service(state: &mut ClusterState, name: &str, mode: ServiceMode) -> String {
        let id = format!("svc-{name}");
        state.services.insert(
            id.clone(),
            Service {
                id: id.clone(),
                spec: ServiceSpec::new(name, mode, vec!["sleep".into(), "1000".into()]),
                version: 1,
                created_at: 0,
                updated_at: 0,
                vips: vec![],
                previous_spec: None,
                previous_version: 0,
                update_status: None,
            },
        );
        id
    }

    /// Applies reconcile until nothing changes, marking assigned tasks Running as workers would.
    fn converge(state: &mut ClusterState, now: Timestamp) {
        for _ in 0..20 {
            let commands = reconcile(state, now, SETTINGS);
            let mut reports: BTreeMap<String, Vec<TaskReport>> = BTreeMap::new();
            for command in commands.iter().cloned() {
                state.apply(command).unwrap();
            }
            for task in state.tasks.values() {
                let next = match (task.desired, task.state) {
                    (TaskState::Running, TaskState::Assigned) => TaskState::Running,
                    (TaskState::Shutdown, s) if !s.is_terminal() => TaskState::Shutdown,
                    _ => continue,
                };
                let Some(node) = task.node_id.clone() else {
                    continue;
                };
                let down = state
                    .nodes
                    .get(&node)
                    .is_none_or(|n| n.status == NodeStatus::Down);
                if !down {
                    reports.entry(node).or_default().push(TaskReport {
                        task_id: task.id.clone(),
                        state: next,
                        error: String::new(),
                        health: None,
                    });
                }
            }
            if commands.is_empty() && reports.is_empty() {
                return;
            }
            for (node_id, reports) in reports {
                state
                    .apply(Command::ReportTasks {
                        node_id,
                        reports,
                        at: now,
                    })
                    .unwrap();
            }
        }
        panic!("did not converge");
    }

    fn running_per_node(state: &ClusterState, service: &str) -> BTreeMap<String, usize> {
        let mut per = BTreeMap::new();
        for t in state.tasks.values() {
            if t.service_id == service
                && t.state == TaskState::Running
                && t.desired == TaskState::Running
            {
                *per.entry(t.node_id.clone().unwrap()).or_default() += 1;
            }
        }
        per
    }

    /// The node running `task` reports it failed at `at`.
    fn fail(state: &mut ClusterState, task: &Task, at: Timestamp, error: &str) {
        state
            .apply(Command::ReportTasks {
                node_id: task.node_id.clone().unwrap(),
                reports: vec![TaskReport {
                    task_id: task.id.clone(),
                    state: TaskState::Failed,
                    error: error.into(),
                    health: None,
                }],
                at,
            })
            .unwrap();
    }

    fn add_network(state: &mut ClusterState, id: &str, subnet: &str) {
        use crate::{
            ipam::Subnet,
            state::{Network, FIRST_VNI},
        };
        let subnet: Subnet = subnet.parse().unwrap();
        let vni = FIRST_VNI + 1 + state.networks.len() as u32;
        state.networks.insert(
            id.into(),
            Network {
                id: id.into(),
                name: id.into(),
                subnet,
                gateway: subnet.first_host(),
                vni,
                attachable: false,
                internal: false,
                mtu: None,
                ingress: false,
                created_at: 0,
            },
        );
    }

    fn set_replicas(state: &mut ClusterState, id: &str, replicas: u64) {
        state.services.get_mut(id).unwrap().spec.mode = ServiceMode::Replicated { replicas };
    }

    #[test]
    fn scale_spreads_two_two_one_and_back_down() {
        let mut state = cluster(3);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 1 });
        converge(&mut state, 1);
        assert_eq!(running_per_node(&state, &web).values().sum::<usize>(), 1);
        set_replicas(&mut state, &web, 5);
        converge(&mut state, 2);
        let mut counts: Vec<usize> = running_per_node(&state, &web).into_values().collect();
        counts.sort();
        assert_eq!(counts, [1, 2, 2]);
        set_replicas(&mut state, &web, 3);
        converge(&mut state, 3);
        assert_eq!(running_per_node(&state, &web).values().sum::<usize>(), 3);
        let slots: Vec<u64> = state
            .tasks
            .values()
            .filter(|t| t.desired == TaskState::Running)
            .map(|t| t.slot)
            .collect();
        assert_eq!(slots.len(), 3);
        assert!(slots.iter().all(|s| (1..=3).contains(s)), "{slots:?}");
    }

    #[test]
    fn an_exited_task_is_replaced_and_kept_as_history() {
        let mut state = cluster(2);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 2 });
        converge(&mut state, 1);
        let victim = state.tasks.values().next().unwrap().clone();
        fail(&mut state, &victim, 2, "exit status 137");
        converge(&mut state, 3);
        assert_eq!(
            running_per_node(&state, &web).values().sum::<usize>(),
            1,
            "the replacement waits for the restart delay"
        );
        converge(&mut state, 2 + crate::update::DEFAULT_RESTART_DELAY_SECS);
        assert_eq!(running_per_node(&state, &web).values().sum::<usize>(), 2);
        let slot: Vec<&Task> = state
            .tasks
            .values()
            .filter(|t| t.slot == victim.slot)
            .collect();
        assert_eq!(slot.len(), 2, "the failed task stays as history");
        let old = &state.tasks[&victim.id];
        assert_eq!(
            (old.state, old.desired),
            (TaskState::Failed, TaskState::Shutdown)
        );
        assert_eq!(old.error, "exit status 137");
    }

    #[test]
    fn history_is_capped_per_slot() {
        let mut state = cluster(1);
        service(&mut state, "web", ServiceMode::Replicated { replicas: 1 });
        for round in 0..10u64 {
            converge(&mut state, round * 10);
            let running = state
                .tasks
                .values()
                .find(|t| t.desired == TaskState::Running)
                .unwrap()
                .clone();
            fail(&mut state, &running, round * 10 + 1, "");
        }
        converge(&mut state, 1000);
        assert_eq!(state.tasks.len(), TASK_HISTORY_LIMIT);
    }

    #[test]
    fn drain_moves_tasks_and_pause_takes_no_new_ones() {
        let mut state = cluster(3);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 6 });
        converge(&mut state, 1);
        state.nodes.get_mut("n2").unwrap().availability = Availability::Drain;
        state.nodes.get_mut("n3").unwrap().availability = Availability::Pause;
        converge(&mut state, 2);
        let per = running_per_node(&state, &web);
        assert_eq!(per.get("n2"), None, "drained node runs nothing: {per:?}");
        assert_eq!(
            per.get("n3"),
            Some(&2),
            "paused node keeps its tasks: {per:?}"
        );
        assert_eq!(per.get("n1"), Some(&4));
    }

    #[test]
    fn a_leaving_node_gets_no_task_and_its_tasks_move_at_once() {
        let mut state = cluster(3);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 3 });
        let agent = service(&mut state, "agent", ServiceMode::Global);
        converge(&mut state, 1);
        assert_eq!(running_per_node(&state, &web).get("n3"), Some(&1));
        state
            .apply(Command::NodeLeaving {
                id: "n3".into(),
                at: 2,
            })
            .unwrap();
        // Well within the grace of a Down node: a leaving one does not wait for it.
        converge(&mut state, 3);
        let expected = BTreeMap::from([("n1".into(), 1), ("n2".into(), 1)]);
        assert_eq!(running_per_node(&state, &agent), expected);
        let web_per_node = running_per_node(&state, &web);
        assert_eq!(web_per_node.get("n3"), None, "{web_per_node:?}");
        assert_eq!(web_per_node.values().sum::<usize>(), 3);
        assert!(
            state
                .tasks
                .values()
                .filter(|t| t.node_id.as_deref() == Some("n3"))
                .all(|t| t.created_at == 1 && t.desired == TaskState::Shutdown),
            "nothing new is placed on the leaving node"
        );
    }

    #[test]
    fn a_leaving_node_is_never_eligible_even_while_it_still_heartbeats() {
        let mut state = cluster(2);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 2 });
        converge(&mut state, 1);
        state
            .apply(Command::NodeLeaving {
                id: "n2".into(),
                at: 2,
            })
            .unwrap();
        // Its last heartbeats could have it seen alive, and it reports its task stopping.
        state
            .apply(Command::SetNodeStatus {
                id: "n2".into(),
                status: NodeStatus::Ready,
                since: 2,
            })
            .unwrap();
        let stopped: Vec<TaskReport> = state
            .tasks
            .values()
            .filter(|t| t.node_id.as_deref() == Some("n2"))
            .map(|t| TaskReport {
                task_id: t.id.clone(),
                state: TaskState::Shutdown,
                error: String::new(),
                health: None,
            })
            .collect();
        state
            .apply(Command::ReportTasks {
                node_id: "n2".into(),
                reports: stopped,
                at: 2,
            })
            .unwrap();
        converge(&mut state, 2 + crate::update::DEFAULT_RESTART_DELAY_SECS);
        assert_eq!(
            running_per_node(&state, &web),
            BTreeMap::from([("n1".into(), 2)])
        );
    }

    #[test]
    fn tasks_of_a_down_node_move_after_the_grace_period() {
        let mut state = cluster(2);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 2 });
        converge(&mut state, 1);
        let n2 = state.nodes.get_mut("n2").unwrap();
        n2.status = NodeStatus::Down;
        n2.status_since = 100;
        converge(&mut state, 105);
        assert_eq!(
            running_per_node(&state, &web).get("n2"),
            Some(&1),
            "within grace"
        );
        converge(&mut state, 110);
        assert_eq!(
            running_per_node(&state, &web),
            BTreeMap::from([("n1".into(), 2)])
        );
        assert!(state.tasks.values().any(|t| t.state == TaskState::Orphaned));
    }

    fn label(state: &mut ClusterState, node: &str, key: &str, value: &str) {
        let node = state.nodes.get_mut(node).unwrap();
        node.labels.insert(key.into(), value.into());
    }

    fn pending(state: &ClusterState, service: &str) -> Vec<String> {
        state
            .tasks
            .values()
            .filter(|t| {
                t.service_id == service
                    && t.desired == TaskState::Running
                    && t.state == TaskState::Pending
            })
            .map(|t| t.message.clone())
            .collect()
    }

    #[test]
    fn spread_over_a_zone_label_evens_the_zones_first() {
        // One node per zone: 2-2-2 by node.
        let mut state = cluster(3);
        for (node, zone) in [("n1", "a"), ("n2", "b"), ("n3", "c")] {
            label(&mut state, node, "zone", zone);
        }
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 6 });
        state.services.get_mut(&web).unwrap().spec.placement_prefs =
            vec![PlacementPref::parse("spread=node.labels.zone").unwrap()];
        converge(&mut state, 1);
        assert_eq!(
            running_per_node(&state, &web),
            BTreeMap::from([("n1".into(), 2), ("n2".into(), 2), ("n3".into(), 2)])
        );

        // Uneven zones (1, 2 and 3 nodes): still 2 per zone, and even within one; nodes
        // without the label are a zone of their own.
        let mut state = cluster(7);
        for (node, zone) in [
            ("n1", "a"),
            ("n2", "b"),
            ("n3", "b"),
            ("n4", "c"),
            ("n5", "c"),
            ("n6", "c"),
        ] {
            label(&mut state, node, "zone", zone);
        }
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 8 });
        state.services.get_mut(&web).unwrap().spec.placement_prefs =
            vec![PlacementPref::parse("spread=node.labels.zone").unwrap()];
        converge(&mut state, 1);
        let per_node = running_per_node(&state, &web);
        let zone_of = |n: &str| state.nodes[n].labels.get("zone").cloned();
        let mut per_zone: BTreeMap<Option<String>, usize> = BTreeMap::new();
        for (node, count) in &per_node {
            *per_zone.entry(zone_of(node)).or_default() += count;
        }
        assert_eq!(per_zone.values().copied().collect::<Vec<_>>(), [2, 2, 2, 2]);
        assert_eq!((per_node["n2"], per_node["n3"]), (1, 1));
        assert_eq!(
            per_node.get("n4").copied().unwrap_or(0)
                + per_node.get("n5").copied().unwrap_or(0)
                + per_node.get("n6").copied().unwrap_or(0),
            2
        );
    }

    #[test]
    fn constraints_on_node_attributes_pin_tasks() {
        let mut state = cluster(3);
        let pinned = service(
            &mut state,
            "pinned",
            ServiceMode::Replicated { replicas: 3 },
        );
        state.services.get_mut(&pinned).unwrap().spec.constraints =
            vec![Constraint::parse("node.hostname==node2").unwrap()];
        let workers = service(
            &mut state,
            "workers",
            ServiceMode::Replicated { replicas: 4 },
        );
        state.services.get_mut(&workers).unwrap().spec.constraints = vec![
            Constraint::parse("node.role==worker").unwrap(),
            Constraint::parse("node.platform.os==linux").unwrap(),
            Constraint::parse("node.id!=n3").unwrap(),
        ];
        converge(&mut state, 1);
        assert_eq!(
            running_per_node(&state, &pinned),
            BTreeMap::from([("n2".into(), 3)])
        );
        assert_eq!(
            running_per_node(&state, &workers),
            BTreeMap::from([("n2".into(), 4)])
        );
    }

    #[test]
    fn replicas_max_per_node_leaves_the_rest_pending_with_the_reason() {
        let mut state = cluster(3);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 4 });
        state
            .services
            .get_mut(&web)
            .unwrap()
            .spec
            .max_replicas_per_node = 1;
        converge(&mut state, 1);
        assert_eq!(running_per_node(&state, &web).len(), 3);
        assert_eq!(
            pending(&state, &web),
            ["no suitable node (max replicas per node limit exceed on 3 nodes)"]
        );
        // Reasons add up, each node under the first filter it fails.
        let mut mixed = state.clone();
        mixed.services.get_mut(&web).unwrap().spec.constraints =
            vec![Constraint::parse("node.role==worker").unwrap()];
        converge(&mut mixed, 2);
        assert_eq!(
            pending(&mixed, &web),
            ["no suitable node (scheduling constraints not satisfied on 1 node; max replicas per node limit exceed on 2 nodes)"]
        );
        // A node joining takes the waiting task.
        let mut joined = state.clone();
        let mut n4 = joined.nodes["n3"].clone();
        n4.id = "n4".into();
        n4.hostname = "node4".into();
        joined.nodes.insert("n4".into(), n4);
        converge(&mut joined, 2);
        assert!(pending(&joined, &web).is_empty());
        assert_eq!(running_per_node(&joined, &web).len(), 4);
        // Scaling down to 3 leaves none pending.
        if let ServiceMode::Replicated { replicas } =
            &mut state.services.get_mut(&web).unwrap().spec.mode
        {
            *replicas = 3;
        }
        converge(&mut state, 2);
        assert!(pending(&state, &web).is_empty());
        assert_eq!(running_per_node(&state, &web).len(), 3);
    }

    #[test]
    fn a_task_waiting_on_a_constraint_starts_once_a_node_matches() {
        let mut state = cluster(2);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 1 });
        state.services.get_mut(&web).unwrap().spec.constraints =
            vec![Constraint::parse("node.labels.disk==ssd").unwrap()];
        converge(&mut state, 1);
        assert_eq!(
            pending(&state, &web),
            ["no suitable node (scheduling constraints not satisfied on 2 nodes)"]
        );
        label(&mut state, "n2", "disk", "ssd");
        converge(&mut state, 2);
        assert_eq!(
            running_per_node(&state, &web),
            BTreeMap::from([("n2".into(), 1)])
        );
    }

    #[test]
    fn global_runs_one_per_eligible_node_and_constraints_filter() {
        let mut state = cluster(3);
        state
            .nodes
            .get_mut("n3")
            .unwrap()
            .labels
            .insert("zone".into(), "b".into());
        let agent = service(&mut state, "agent", ServiceMode::Global);
        converge(&mut state, 1);
        assert_eq!(running_per_node(&state, &agent).len(), 3);
        let zoned = service(&mut state, "zoned", ServiceMode::Replicated { replicas: 2 });
        state.services.get_mut(&zoned).unwrap().spec.constraints =
            vec![Constraint::parse("node.labels.zone==b").unwrap()];
        converge(&mut state, 2);
        assert_eq!(
            running_per_node(&state, &zoned),
            BTreeMap::from([("n3".into(), 2)])
        );
        let impossible = service(
            &mut state,
            "nowhere",
            ServiceMode::Replicated { replicas: 1 },
        );
        state
            .services
            .get_mut(&impossible)
            .unwrap()
            .spec
            .constraints = vec![Constraint::parse("node.labels.zone==z").unwrap()];
        converge(&mut state, 3);
        let pending: Vec<&Task> = state
            .tasks
            .values()
            .filter(|t| t.service_id == impossible)
            .collect();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].state, pending[0].message.as_str()),
            (
                TaskState::Pending,
                "no suitable node (scheduling constraints not satisfied on 3 nodes)"
            )
        );
    }

    #[test]
    fn tasks_get_one_free_address_per_network_freed_ones_last() {
        let mut state = cluster(2);
        add_network(&mut state, "net", "10.0.9.0/29");
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 3 });
        let spec = &mut state.services.get_mut(&web).unwrap().spec;
        spec.networks = vec!["net".into()];
        spec.endpoint_mode = EndpointMode::Dnsrr;
        converge(&mut state, 1);
        let mut addresses: Vec<String> = state
            .tasks
            .values()
            .map(|t| {
                assert_eq!(t.attachments.len(), 1);
                t.attachments[0].address.to_string()
            })
            .collect();
        addresses.sort();
        assert_eq!(
            addresses,
            ["10.0.9.2", "10.0.9.3", "10.0.9.4"],
            "gateway .1 skipped"
        );

        // A failed task's address is given last: its replacement gets a fresh one, and the
        // failed task's goes out again once no other is left (the /29 has room for 5 only).
        let victim = state.tasks.values().next().unwrap().clone();
        fail(&mut state, &victim, 2, "");
        converge(&mut state, 2 + crate::update::DEFAULT_RESTART_DELAY_SECS);
        let replacement = state
            .tasks
            .values()
            .find(|t| t.slot == victim.slot && !t.state.is_terminal())
            .expect("a replacement");
        assert_eq!(replacement.attachments[0].address.to_string(), "10.0.9.5");
        set_replicas(&mut state, &web, 5);
        converge(&mut state, 20);
        assert_eq!(running_per_node(&state, &web).values().sum::<usize>(), 5);
        let live: BTreeSet<_> = state
            .tasks
            .values()
            .filter(|t| !t.state.is_terminal())
            .map(|t| t.attachments[0].address)
            .collect();
        assert_eq!(live.len(), 5, "no address given twice");
        assert!(live.contains(&victim.attachments[0].address), "{live:?}");
        set_replicas(&mut state, &web, 6);
        converge(&mut state, 20);
        assert_eq!(
            running_per_node(&state, &web).values().sum::<usize>(),
            5,
            "no sixth address in a /29: the slot waits"
        );
    }

    #[test]
    fn vip_services_get_one_vip_per_network_that_tasks_never_take() {
        let mut state = cluster(2);
        add_network(&mut state, "a", "10.0.1.0/24");
        add_network(&mut state, "b", "10.0.2.0/24");
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 3 });
        let db = service(&mut state, "db", ServiceMode::Replicated { replicas: 1 });
        state.services.get_mut(&web).unwrap().spec.networks = vec!["a".into(), "b".into()];
        let db_spec = &mut state.services.get_mut(&db).unwrap().spec;
        db_spec.networks = vec!["a".into()];
        db_spec.endpoint_mode = EndpointMode::Dnsrr;
        converge(&mut state, 1);
        let vips = &state.services[&web].vips;
        assert_eq!(
            vips.iter()
                .map(|v| v.network_id.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"],
            "one VIP per network, in order"
        );
        assert!(state.services[&db].vips.is_empty(), "dnsrr has no VIP");
        let taken: BTreeSet<Ipv4Addr> = state
            .tasks
            .values()
            .flat_map(|t| t.attachments.iter())
            .map(|a| a.address)
            .collect();
        assert!(vips.iter().all(|v| !taken.contains(&v.address)));

        // A spec update (new version, same networks) keeps the VIPs; dropping a network
        // drops its VIP.
        let before = vips.clone();
        let mut updated = state.services[&web].clone();
        updated.version += 1;
        updated.vips = vec![];
        state.apply(Command::PutService(updated)).unwrap();
        converge(&mut state, 2);
        assert_eq!(state.services[&web].vips, before);
        state.services.get_mut(&web).unwrap().spec.networks = vec!["b".into()];
        converge(&mut state, 3);
        assert_eq!(state.services[&web].vips, before[1..]);
    }

    #[test]
    fn nodes_get_ingress_addresses_and_publishing_tasks_join_ingress() {
        let mut state = cluster(2);
        add_network(&mut state, "ingress", "10.0.0.0/24");
        state.networks.get_mut("ingress").unwrap().ingress = true;
        add_network(&mut state, "front", "10.0.1.0/24");
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 3 });
        let spec = &mut state.services.get_mut(&web).unwrap().spec;
        spec.networks = vec!["front".into()];
        spec.ports = vec![crate::state::PortConfig::parse("8080:80").unwrap()];
        converge(&mut state, 1);
        let nodes: BTreeSet<Ipv4Addr> = state
            .nodes
            .values()
            .map(|n| {
                n.ingress_address
                    .expect("every node has an ingress address")
            })
            .collect();
        assert_eq!(nodes.len(), 2, "distinct node addresses");
        for task in state.tasks.values() {
            let networks: Vec<&str> = task
                .attachments
                .iter()
                .map(|a| a.network_id.as_str())
                .collect();
            assert_eq!(networks, ["front", "ingress"], "ingress comes last");
            assert!(!nodes.contains(&task.attachments[1].address));
        }
        assert!(
            state.services[&web]
                .vips
                .iter()
                .all(|v| v.network_id != "ingress"),
            "no VIP on the ingress network"
        );
    }

    #[test]
    fn rolling_update_replaces_in_batches_and_removal_cleans_up() {
        let mut state = cluster(2);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 4 });
        converge(&mut state, 1);
        let svc = state.services.get_mut(&web).unwrap();
        svc.version = 2;
        svc.spec.update_parallelism = 2;
        // One pass replaces two tasks only.
        for command in reconcile(&state, 2, SETTINGS) {
            state.apply(command).unwrap();
        }
        let new = state
            .tasks
            .values()
            .filter(|t| t.service_version == 2)
            .count();
        assert_eq!(new, 2);
        converge(&mut state, 3);
        let live: Vec<&Task> = state
            .tasks
            .values()
            .filter(|t| t.desired == TaskState::Running)
            .collect();
        assert_eq!(live.len(), 4);
        assert!(live
            .iter()
            .all(|t| t.service_version == 2 && t.state == TaskState::Running));

        state.services.remove(&web);
        converge(&mut state, 4);
        assert!(state.tasks.is_empty(), "{:?}", state.tasks);
    }

    #[test]
    fn reservations_place_tasks_only_where_they_fit_and_wait_with_swarms_reason() {
        let mut state = cluster(2);
        for node in state.nodes.values_mut() {
            node.resources.nano_cpus = 1_000_000_000;
            node.resources.memory_bytes = 1 << 30;
        }
        let reserve = |state: &mut ClusterState, id: &str, cpus: u64| {
            let service = state.services.get_mut(id).unwrap();
            service.spec.containment.reservations.nano_cpus = cpus;
        };
        let big = service(&mut state, "big", ServiceMode::Replicated { replicas: 2 });
        reserve(&mut state, &big, 600_000_000);
        converge(&mut state, 1);
        // One per node: 0.6 + 0.6 CPUs would not fit on one.
        assert_eq!(
            running_per_node(&state, &big)
                .values()
                .copied()
                .collect::<Vec<_>>(),
            [1, 1]
        );

        let more = service(&mut state, "more", ServiceMode::Replicated { replicas: 1 });
        reserve(&mut state, &more, 600_000_000);
        converge(&mut state, 2);
        let pending: Vec<&Task> = state
            .tasks
            .values()
            .filter(|t| t.service_id == more)
            .collect();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].state, TaskState::Pending);
        assert_eq!(
            pending[0].message,
            "no suitable node (insufficient resources on 2 nodes)"
        );

        // Capacity frees when the big service goes: the waiting task is placed.
        state.apply(Command::RemoveService { id: big }).unwrap();
        converge(&mut state, 3);
        assert_eq!(running_per_node(&state, &more).values().sum::<usize>(), 1);
    }

    #[test]
    fn a_global_task_waits_on_its_node_until_the_reservation_fits() {
        let mut state = cluster(2);
        for node in state.nodes.values_mut() {
            node.resources.nano_cpus = 1_000_000_000;
        }
        let hog = service(&mut state, "hog", ServiceMode::Replicated { replicas: 1 });
        state
            .services
            .get_mut(&hog)
            .unwrap()
            .spec
            .containment
            .reservations
            .nano_cpus = 800_000_000;
        converge(&mut state, 1);
        let agent = service(&mut state, "agent", ServiceMode::Global);
        state
            .services
            .get_mut(&agent)
            .unwrap()
            .spec
            .containment
            .reservations
            .nano_cpus = 500_000_000;
        converge(&mut state, 2);
        // Runs where it fits; waits, Pending with the reason, on the hog's node.
        assert_eq!(running_per_node(&state, &agent).values().sum::<usize>(), 1);
        let waiting: Vec<&Task> = state
            .tasks
            .values()
            .filter(|t| t.service_id == agent && t.state == TaskState::Pending)
            .collect();
        assert_eq!(waiting.len(), 1, "{:?}", state.tasks);
        assert_eq!(
            waiting[0].message,
            "no suitable node (insufficient resources on 1 node)"
        );
        state.apply(Command::RemoveService { id: hog }).unwrap();
        converge(&mut state, 3);
        assert_eq!(running_per_node(&state, &agent).values().sum::<usize>(), 2);
    }

    /// Ends a task as its worker would report it.
    fn end(state: &mut ClusterState, task: &Task, at: Timestamp, ended: TaskState) {
        state
            .apply(Command::ReportTasks {
                node_id: task.node_id.clone().unwrap(),
                reports: vec![TaskReport {
                    task_id: task.id.clone(),
                    state: ended,
                    error: String::new(),
                    health: None,
                }],
                at,
            })
            .unwrap();
    }

    /// One reconcile pass, applied.
    fn step(state: &mut ClusterState, now: Timestamp) {
        for command in reconcile(state, now, SETTINGS) {
            state.apply(command).unwrap();
        }
    }

    /// A template change, as `service update` makes it.
    fn update(state: &mut ClusterState, id: &str, at: Timestamp) {
        let service = state.services.get_mut(id).unwrap();
        service.previous_spec = Some(Box::new(service.spec.clone()));
        service.previous_version = service.version;
        service.version += 1;
        service.spec.env.push("V=2".into());
        service.update_status = Some(crate::update::UpdateStatus::updating(at));
    }

    fn live(state: &ClusterState, id: &str) -> Vec<Task> {
        state
            .tasks
            .values()
            .filter(|t| t.service_id == id && t.desired == TaskState::Running)
            .filter(|t| !t.state.is_terminal())
            .cloned()
            .collect()
    }

    fn update_state(state: &ClusterState, id: &str) -> crate::update::UpdateState {
        state.services[id].update_status.as_ref().unwrap().state
    }

    #[test]
    fn restart_policy_decides_whether_an_ended_task_is_replaced() {
        use crate::update::RestartCondition::{Any, None, OnFailure};
        for (condition, ended, replaced) in [
            (Any, TaskState::Complete, true),
            (OnFailure, TaskState::Complete, false),
            (OnFailure, TaskState::Failed, true),
            (None, TaskState::Failed, false),
        ] {
            let mut state = cluster(1);
            let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 1 });
            state.services.get_mut(&web).unwrap().spec.restart.condition = condition;
            converge(&mut state, 1);
            let task = live(&state, &web).remove(0);
            end(&mut state, &task, 10, ended);
            converge(&mut state, 12);
            assert!(live(&state, &web).is_empty(), "the restart delay holds it");
            converge(&mut state, 15);
            let case = format!("{condition:?} after {ended:?}");
            assert_eq!(live(&state, &web).len(), replaced as usize, "{case}");
            let old = &state.tasks[&task.id];
            assert_eq!(old.desired, TaskState::Shutdown, "{case}");
            assert_eq!(
                old.message.starts_with("not restarted"),
                !replaced,
                "{case}: {}",
                old.message
            );
        }
    }

    #[test]
    fn max_attempts_stops_restarting_within_the_window() {
        let mut state = cluster(1);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 1 });
        let restart = &mut state.services.get_mut(&web).unwrap().spec.restart;
        restart.max_attempts = 2;
        restart.delay_secs = 1;
        converge(&mut state, 1);
        for at in [10, 20, 30] {
            let task = live(&state, &web).remove(0);
            end(&mut state, &task, at, TaskState::Failed);
            converge(&mut state, at + 2);
        }
        assert!(live(&state, &web).is_empty(), "two restarts, then none");
        assert_eq!(state.tasks.len(), 3);
        converge(&mut state, 1000);
        assert!(live(&state, &web).is_empty(), "the slot stays empty");
    }

    #[test]
    fn a_failing_update_pauses_after_its_first_batch_or_rolls_back() {
        use crate::update::{FailureAction, UpdateState};
        for action in [FailureAction::Pause, FailureAction::Rollback] {
            let mut state = cluster(2);
            let web = service(&mut state, "web", ServiceMode::Replicated { replicas: 3 });
            state
                .services
                .get_mut(&web)
                .unwrap()
                .spec
                .update_control
                .failure_action = action;
            converge(&mut state, 1);
            let before: BTreeSet<String> = live(&state, &web).into_iter().map(|t| t.id).collect();
            update(&mut state, &web, 10);
            step(&mut state, 10);
            let new: Vec<Task> = live(&state, &web)
                .into_iter()
                .filter(|t| t.service_version == 2)
                .collect();
            assert_eq!(new.len(), 1, "one batch");
            end(&mut state, &new[0], 11, TaskState::Failed);
            converge(&mut state, 12);
            let status = state.services[&web].update_status.clone().unwrap();
            let old: BTreeSet<String> = live(&state, &web)
                .into_iter()
                .filter(|t| t.service_version == 1)
                .map(|t| t.id)
                .collect();
            if action == FailureAction::Pause {
                assert_eq!(status.state, UpdateState::Paused);
                assert_eq!(
                    status.message,
                    format!(
                        "update paused due to failure or early termination of task {}",
                        new[0].id
                    )
                );
                assert_eq!(old.len(), 2, "no second batch");
                converge(&mut state, 30);
                assert_eq!(update_state(&state, &web), UpdateState::Paused);
                continue;
            }
            assert_eq!(status.state, UpdateState::RollbackStarted);
            let service = &state.services[&web];
            assert_eq!((service.version, service.previous_version), (1, 2));
            assert!(!service.spec.env.contains(&"V=2".to_owned()));
            assert_eq!(old.len(), 3, "the failed slot runs the old spec again");
            assert_eq!(old.intersection(&before).count(), 2, "the others kept");
            converge(&mut state, 20);
            assert_eq!(update_state(&state, &web), UpdateState::RollbackCompleted);
        }
    }

    /// One node and a service of `replicas` that updates start-first.
    fn start_first_cluster(replicas: u64) -> (ClusterState, String) {
        let mut state = cluster(1);
        let web = service(&mut state, "web", ServiceMode::Replicated { replicas });
        state
            .services
            .get_mut(&web)
            .unwrap()
            .spec
            .update_control
            .order = crate::update::UpdateOrder::StartFirst;
        (state, web)
    }

    #[test]
    fn start_first_stops_the_old_task_once_its_replacement_is_ready() {
        use crate::update::UpdateState;
        let (mut state, web) = start_first_cluster(1);
        converge(&mut state, 1);
        update(&mut state, &web, 10);
        step(&mut state, 10);
        let both = live(&state, &web);
        assert_eq!(both.len(), 2, "the new task starts beside the old one");
        converge(&mut state, 11);
        let versions = |state: &ClusterState| -> Vec<u64> {
            let mut versions: Vec<u64> = live(state, &web)
                .iter()
                .map(|t| t.service_version)
                .collect();
            versions.sort();
            versions
        };
        assert_eq!(versions(&state), [1, 2], "the new one settles first");
        converge(&mut state, 13);
        assert_eq!(
            versions(&state),
            [2],
            "the old one left once the new one ran"
        );
        assert_eq!(
            update_state(&state, &web),
            UpdateState::Updating,
            "monitoring"
        );
        converge(&mut state, 16);
        assert_eq!(update_state(&state, &web), UpdateState::Completed);
    }

    #[test]
    fn start_first_renews_one_slot_at_a_time_while_replacements_settle() {
        use crate::update::UpdateState;
        let (mut state, web) = start_first_cluster(3);
        converge(&mut state, 1);
        update(&mut state, &web, 10);
        for now in 10..40 {
            converge(&mut state, now);
            let running = live(&state, &web).len();
            assert!(
                running <= 4,
                "at {now}: {running} tasks for 3 replicas, parallelism 1"
            );
        }
        let versions: Vec<u64> = live(&state, &web)
            .iter()
            .map(|t| t.service_version)
            .collect();
        assert_eq!(versions, [2, 2, 2]);
        assert_eq!(update_state(&state, &web), UpdateState::Completed);
    }

    #[test]
    fn a_failed_start_first_task_is_done_once_its_slot_keeps_the_old_one() {
        use crate::update::{FailureAction, UpdateOrder, UpdateState};
        for mode in [ServiceMode::Replicated { replicas: 1 }, ServiceMode::Global] {
            let mut state = cluster(1);
            let web = service(&mut state, "web", mode.clone());
            let control = &mut state.services.get_mut(&web).unwrap().spec.update_control;
            control.order = UpdateOrder::StartFirst;
            control.failure_action = FailureAction::Rollback;
            converge(&mut state, 1);
            let old = live(&state, &web).remove(0);
            update(&mut state, &web, 10);
            step(&mut state, 10);
            let new = live(&state, &web)
                .into_iter()
                .find(|t| t.id != old.id)
                .expect("the new task beside the old one");
            end(&mut state, &new, 11, TaskState::Failed);
            converge(&mut state, 12);
            converge(&mut state, 30);
            assert_eq!(update_state(&state, &web), UpdateState::RollbackCompleted);
            let desired: Vec<&Task> = state
                .tasks
                .values()
                .filter(|t| t.desired == TaskState::Running)
                .collect();
            assert_eq!(
                desired.len(),
                1,
                "{mode:?}: one task meant to run: {desired:?}"
            );
            assert_eq!(desired[0].id, old.id, "{mode:?}: the old one, kept");
            assert_eq!(state.tasks[&new.id].desired, TaskState::Shutdown);
        }
    }
}
