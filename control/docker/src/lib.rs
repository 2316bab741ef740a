//! Docker's view of shoal: the Engine API's swarm objects (`models`), built from shoal's
//! views (`convert`), Docker requests read as shoal's (`spec`), and Go-template `--format`
//! (`template`). The documents are built here, over any way of reaching the managers
//! (`Cluster`), so `shoal X inspect` and the Engine API socket print the same ones.

use std::{collections::BTreeMap, future::Future};

use anyhow::{bail, Result};
use serde::Serialize;
use shoal_api::ApiError;
use shoal_cluster::protocol::{
    ControlRequest, ControlResponse, NetworkView, NodeView, ServiceView, TaskView,
};
use shoal_dataplane::overlay::NetworkDataplane;

pub mod convert;
pub mod models;
pub mod spec;
pub mod template;

use convert::Networks;

/// How documents reach the managers: the CLI through its agent's socket, the Engine API
/// server through the agent itself.
pub trait Cluster: Sync {
    fn control(
        &self,
        request: ControlRequest,
    ) -> impl Future<Output = Result<ControlResponse>> + Send;
    /// Manager API endpoints (`IP:PORT`) of the swarm, as this node knows them.
    fn managers(&self) -> impl Future<Output = Result<Vec<String>>> + Send;
    /// What this node programmed for a network (None without a local task on it).
    fn local_network(
        &self,
        network: &str,
    ) -> impl Future<Output = Result<Option<NetworkDataplane>>> + Send;
}

macro_rules! answer {
    ($cluster:expr, $request:expr, $variant:ident) => {
        match $cluster.control($request).await? {
            ControlResponse::$variant(value) => value,
            other => bail!("unexpected answer from the managers: {other:?}"),
        }
    };
}

pub async fn service_views(cluster: &impl Cluster) -> Result<Vec<ServiceView>> {
    Ok(answer!(cluster, ControlRequest::ServiceList, Services))
}

pub async fn networks(cluster: &impl Cluster) -> Result<Networks> {
    Ok(Networks::new(answer!(
        cluster,
        ControlRequest::NetworkList,
        Networks
    )))
}

pub async fn service_view(cluster: &impl Cluster, service: &str) -> Result<ServiceView> {
    let service = service.to_owned();
    Ok(answer!(
        cluster,
        ControlRequest::ServiceInspect { service },
        Service
    ))
}

pub async fn service(cluster: &impl Cluster, service: &str) -> Result<models::Service> {
    let view = service_view(cluster, service).await?;
    Ok(convert::service(&view, &networks(cluster).await?))
}

pub async fn services(cluster: &impl Cluster) -> Result<Vec<models::Service>> {
    let networks = networks(cluster).await?;
    Ok(service_views(cluster)
        .await?
        .iter()
        .map(|v| convert::service(v, &networks))
        .collect())
}

fn manager_addr(view: &NodeView, managers: &[String]) -> Option<String> {
    let ip = view.addr.to_string();
    managers
        .iter()
        .find(|m| m.rsplit_once(':').is_some_and(|(host, _)| host == ip))
        .cloned()
}

pub async fn node(cluster: &impl Cluster, node: &str) -> Result<models::Node> {
    let node = node.to_owned();
    let view = answer!(cluster, ControlRequest::NodeInspect { node }, Node);
    let managers = cluster.managers().await?;
    Ok(convert::node(&view, manager_addr(&view, &managers)))
}

pub async fn nodes(cluster: &impl Cluster) -> Result<Vec<models::Node>> {
    let views = answer!(cluster, ControlRequest::NodeList, Nodes);
    let managers = cluster.managers().await?;
    Ok(views
        .iter()
        .map(|v| convert::node(v, manager_addr(v, &managers)))
        .collect())
}

pub async fn network(cluster: &impl Cluster, network: &str) -> Result<models::Network> {
    let name = network.to_owned();
    let view: NetworkView = answer!(
        cluster,
        ControlRequest::NetworkInspect { network: name },
        Network
    );
    let local = cluster.local_network(&view.id).await?;
    Ok(convert::network(&view, local))
}

pub async fn network_list(cluster: &impl Cluster) -> Result<Vec<models::Network>> {
    Ok(answer!(cluster, ControlRequest::NetworkList, Networks)
        .iter()
        .map(|v| convert::network(v, None))
        .collect())
}

/// Every task of every service (with history), as Docker's `GET /tasks` lists them.
pub async fn tasks(cluster: &impl Cluster) -> Result<Vec<models::Task>> {
    let services: BTreeMap<String, ServiceView> = service_views(cluster)
        .await?
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    let networks = networks(cluster).await?;
    let mut tasks = Vec::new();
    for name in services.keys() {
        let service = name.clone();
        let views: Vec<TaskView> =
            answer!(cluster, ControlRequest::ServiceTasks { service }, Tasks);
        tasks.extend(views.iter().map(|t| convert::task(t, &services, &networks)));
    }
    Ok(tasks)
}

/// A task by ID, unique ID prefix, or name (`web.1`, meaning its current task).
pub async fn task(cluster: &impl Cluster, task: &str) -> Result<models::Task> {
    let all = tasks(cluster).await?;
    if let Some(exact) = all.iter().find(|t| t.id == task) {
        return Ok(exact.clone());
    }
    // Tasks come newest first within a slot: the first named so is the current one.
    if let Some(named) = all.iter().find(|t| t.name == task) {
        return Ok(named.clone());
    }
    let mut prefixed = all.iter().filter(|t| t.id.starts_with(task));
    match (prefixed.next(), prefixed.next()) {
        (Some(one), None) => Ok(one.clone()),
        (Some(_), Some(_)) => bail!(ApiError::invalid(format!(
            "task ID prefix {task:?} is ambiguous"
        ))),
        _ => bail!(ApiError::not_found(format!("no such task: {task}"))),
    }
}

/// `ls`/`ps` rows as Docker's `--format` templates see them (`{{.Name}}`), with their
/// column titles.
pub mod rows {
    use super::*;

    pub const SERVICE_HEADERS: &[(&str, &str)] = &[
        ("ID", "ID"),
        ("Name", "NAME"),
        ("Mode", "MODE"),
        ("Replicas", "REPLICAS"),
        ("Image", "IMAGE"),
        ("Ports", "PORTS"),
    ];
    pub const SERVICE_COLUMNS: &str =
        "{{.ID}}\t{{.Name}}\t{{.Mode}}\t{{.Replicas}}\t{{.Image}}\t{{.Ports}}";

    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct Service {
        #[serde(rename = "ID")]
        pub id: String,
        pub name: String,
        pub mode: String,
        pub replicas: String,
        pub image: String,
        pub ports: String,
    }

    pub const NODE_HEADERS: &[(&str, &str)] = &[
        ("ID", "ID"),
        ("Hostname", "HOSTNAME"),
        ("Status", "STATUS"),
        ("Availability", "AVAILABILITY"),
        ("ManagerStatus", "MANAGER STATUS"),
        ("EngineVersion", "ENGINE VERSION"),
    ];
    pub const NODE_COLUMNS: &str = "{{.ID}}\t{{.Hostname}}\t{{.Status}}\t{{.Availability}}\t{{.ManagerStatus}}\t{{.EngineVersion}}";

    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct Node {
        #[serde(rename = "ID")]
        pub id: String,
        pub hostname: String,
        pub status: String,
        pub availability: String,
        pub manager_status: String,
        pub engine_version: String,
        #[serde(rename = "Self")]
        pub is_self: bool,
    }

    pub const TASK_HEADERS: &[(&str, &str)] = &[
        ("ID", "ID"),
        ("Name", "NAME"),
        ("Image", "IMAGE"),
        ("Node", "NODE"),
        ("DesiredState", "DESIRED STATE"),
        ("CurrentState", "CURRENT STATE"),
        ("Error", "ERROR"),
        ("Ports", "PORTS"),
    ];
    pub const TASK_COLUMNS: &str = "{{.ID}}\t{{.Name}}\t{{.Image}}\t{{.Node}}\t{{.DesiredState}}\t{{.CurrentState}}\t{{.Error}}\t{{.Ports}}";

    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct Task {
        #[serde(rename = "ID")]
        pub id: String,
        pub name: String,
        pub image: String,
        pub node: String,
        pub desired_state: String,
        pub current_state: String,
        pub error: String,
        pub ports: String,
    }

    pub const NETWORK_HEADERS: &[(&str, &str)] = &[
        ("ID", "NETWORK ID"),
        ("Name", "NAME"),
        ("Driver", "DRIVER"),
        ("Scope", "SCOPE"),
        ("Subnet", "SUBNET"),
    ];
    pub const NETWORK_COLUMNS: &str = "{{.ID}}\t{{.Name}}\t{{.Driver}}\t{{.Scope}}";

    #[derive(Serialize)]
    #[serde(rename_all = "PascalCase")]
    pub struct Network {
        #[serde(rename = "ID")]
        pub id: String,
        pub name: String,
        pub driver: String,
        pub scope: String,
        pub subnet: String,
        pub internal: bool,
        pub attachable: bool,
    }
}

#[cfg(test)]
mod tests;
