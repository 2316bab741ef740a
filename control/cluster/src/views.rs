//! What the control API shows of the state: nodes' tasks, services and networks as the CLI
//! lists and inspects them. Pure functions of the replicated state.

use crate::{
    protocol::{NetworkView, ServiceView, TaskView},
    state::{ClusterState, Network, PublishMode, Service, ServiceMode, Task, TaskState},
};

/// `task inspect`: a task by ID, ID prefix or `web.1.<id>`, else by `web.1` (its newest
/// task, as the slot's history lists it first).
pub fn find_task_view(state: &ClusterState, key: &str) -> anyhow::Result<TaskView> {
    let views = task_views(state, |_| true);
    let by_id: Vec<&TaskView> = views
        .iter()
        .filter(|v| {
            !key.is_empty() && (v.id.starts_with(key) || format!("{}.{}", v.name, v.id) == key)
        })
        .collect();
    match by_id.as_slice() {
        [one] => return Ok((*one).clone()),
        [] => {}
        _ => anyhow::bail!(shoal_api::ApiError::invalid(format!(
            "task {key} is ambiguous: give more of its ID"
        ))),
    }
    views.into_iter().find(|v| v.name == key).ok_or_else(|| {
        shoal_api::ApiError::not_found(format!(
            "no task {key}: `shoal service ps SERVICE` lists a service's tasks"
        ))
        .into()
    })
}

pub fn network_view(state: &ClusterState, network: &Network) -> NetworkView {
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

pub fn network_name(state: &ClusterState, id: &str) -> String {
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

pub fn short_task_name(state: &ClusterState, task: &Task) -> String {
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

pub fn task_views(state: &ClusterState, keep: impl Fn(&Task) -> bool) -> Vec<TaskView> {
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
            health: t.health.clone(),
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

pub fn service_view(state: &ClusterState, service: &Service) -> ServiceView {
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
        placement_prefs: service
            .spec
            .placement_prefs
            .iter()
            .map(ToString::to_string)
            .collect(),
        max_replicas_per_node: service.spec.max_replicas_per_node,
        healthcheck: service.spec.healthcheck.clone(),
        version: service.version,
        update_parallelism: service.spec.update_parallelism,
        update_delay_secs: service.spec.update_delay_secs,
        restart_policy: service.spec.restart.clone(),
        update_config: Box::new(service.spec.update_config()),
        rollback_config: Box::new(service.spec.rollback_config.clone()),
        update_status: service.update_status.clone().map(Box::new),
        previous_version: service
            .previous_spec
            .is_some()
            .then_some(service.previous_version),
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
