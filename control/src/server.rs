//! The agent's local API server: HTTP/JSON on a Unix socket. The requests, answers and error
//! body are `shoal-api`'s; the reports defined here embed the agent's own config and the
//! dataplane's and gossip's views.

use std::{
    sync::{Arc, Mutex},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{
    extract::{Path, State},
    routing::{get, post},
    Json, Router,
};
use serde::{Deserialize, Serialize};
use shoal_dataplane::{overlay::NetworkDataplane, Dataplane, DataplaneStatus};
use shoal_dns::DnsStats;
use shoal_gossip::{net::GossipHandle, EndpointRecord, GossipStats, MemberInfo};

use shoal_api::{
    ApiError, DnsLookupQuery, InitRequest, InitResponse, JoinArgs, JoinedResponse, LeaveRequest,
    SwarmInfo, Version,
};
use shoal_cluster::{
    failure::Failure,
    networking::{DnsLookup, IngressPort, IngressTrace, LoadBalancer},
    node::ClusterRuntime,
    protocol::{ControlRequest, ControlResponse},
};

use crate::{
    config::AgentConfig,
    neighbours::{NeighbourTableStatus, NeighbourWatch},
};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AgentInfo {
    pub version: Version,
    pub pid: u32,
    pub kernel: String,
    pub started_at_unix: u64,
    pub uptime_secs: u64,
    pub config: AgentConfig,
    /// Resolvers names outside the cluster are forwarded to.
    pub dns_upstreams: Vec<String>,
    /// Unset until the node inits or joins a swarm.
    pub swarm: Option<SwarmInfo>,
}

/// What the handlers share.
pub struct AgentState {
    pub config: AgentConfig,
    pub kernel: String,
    pub started: Instant,
    pub started_at: SystemTime,
    pub dns_upstreams: Vec<String>,
    pub dataplane: Mutex<Dataplane>,
    pub cluster: Arc<ClusterRuntime>,
    /// The kernel's neighbour table, watched (and sized) by this agent.
    pub neighbours: NeighbourWatch,
}

pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/v1/version", get(version))
        .route("/v1/info", get(info))
        .route("/v1/dataplane", get(dataplane))
        .route("/v1/swarm/init", post(swarm_init))
        .route("/v1/swarm/join", post(swarm_join))
        .route("/v1/swarm/leave", post(swarm_leave))
        .route("/v1/control", post(control))
        .route("/v1/tasks/{task}/pid", get(task_pid))
        .route("/v1/networks/{network}/dataplane", get(network_dataplane))
        .route("/v1/gossip/members", get(gossip_members))
        .route("/v1/lb", get(load_balancers))
        .route("/v1/ingress", get(ingress_ports))
        .route("/v1/conntrack", get(conntrack))
        .route("/v1/ingress/trace", get(ingress_trace))
        .route("/v1/dns/lookup", get(dns_lookup))
        .route("/v1/dns/stats", get(dns_stats))
        .route("/v1/gossip/tables/{network}", get(gossip_table))
        .fallback(not_found)
        .with_state(state)
}

async fn version() -> Json<Version> {
    Json(Version::current())
}

async fn info(State(state): State<Arc<AgentState>>) -> Json<AgentInfo> {
    let swarm = state.cluster.info().await;
    Json(AgentInfo {
        swarm,
        version: Version::current(),
        pid: std::process::id(),
        kernel: state.kernel.clone(),
        started_at_unix: state
            .started_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        uptime_secs: state.started.elapsed().as_secs(),
        config: state.config.clone(),
        dns_upstreams: state.dns_upstreams.clone(),
    })
}

/// `dataplane status`: the eBPF programs and maps, and the kernel's neighbour table.
#[derive(Debug, Serialize, Deserialize)]
pub struct DataplaneReport {
    #[serde(flatten)]
    pub dataplane: DataplaneStatus,
    /// None where the agent cannot reach the table (see its log).
    pub neighbour_table: Option<NeighbourTableStatus>,
}

async fn dataplane(State(state): State<Arc<AgentState>>) -> Result<Json<DataplaneReport>, Failure> {
    let mut status = state
        .dataplane
        .lock()
        .map_err(|_| anyhow::anyhow!("dataplane state poisoned"))?
        .status()?;
    // The gateway bridge exists once the node is in a swarm.
    if let Ok(networks) = state.cluster.networks().await {
        status.counters.push(networks.gateway_refusals()?);
    }
    Ok(Json(DataplaneReport {
        dataplane: status,
        neighbour_table: state.neighbours.status()?,
    }))
}

async fn swarm_init(
    State(state): State<Arc<AgentState>>,
    Json(request): Json<InitRequest>,
) -> Result<Json<InitResponse>, Failure> {
    Ok(Json(state.cluster.init(request).await?))
}

async fn swarm_join(
    State(state): State<Arc<AgentState>>,
    Json(args): Json<JoinArgs>,
) -> Result<Json<JoinedResponse>, Failure> {
    Ok(Json(state.cluster.join(args).await?))
}

async fn swarm_leave(
    State(state): State<Arc<AgentState>>,
    Json(request): Json<LeaveRequest>,
) -> Result<Json<()>, Failure> {
    Ok(Json(state.cluster.leave(request.force).await?))
}

async fn control(
    State(state): State<Arc<AgentState>>,
    Json(request): Json<ControlRequest>,
) -> Result<Json<ControlResponse>, Failure> {
    Ok(Json(state.cluster.control(request).await?))
}

async fn task_pid(
    State(state): State<Arc<AgentState>>,
    Path(task): Path<String>,
) -> Result<Json<u32>, Failure> {
    Ok(Json(state.cluster.task_pid(&task).await?))
}

/// A network as programmed on this node (null when no local task uses it).
async fn network_dataplane(
    State(state): State<Arc<AgentState>>,
    Path(network): Path<String>,
) -> Result<Json<Option<NetworkDataplane>>, Failure> {
    let networks = state.cluster.networks().await?;
    Ok(Json(
        tokio::task::spawn_blocking(move || networks.inspect(&network))
            .await
            .map_err(anyhow::Error::from)??,
    ))
}

async fn dns_lookup(
    State(state): State<Arc<AgentState>>,
    axum::extract::Query(query): axum::extract::Query<DnsLookupQuery>,
) -> Result<Json<DnsLookup>, Failure> {
    Ok(Json(
        state.cluster.dns_lookup(&query.task, &query.name).await?,
    ))
}

async fn dns_stats(State(state): State<Arc<AgentState>>) -> Result<Json<DnsStats>, Failure> {
    Ok(Json(state.cluster.dns_stats().await?))
}

async fn load_balancers(
    State(state): State<Arc<AgentState>>,
) -> Result<Json<Vec<LoadBalancer>>, Failure> {
    let networks = state.cluster.networks().await?;
    Ok(Json(networks.load_balancers().await?))
}

async fn ingress_ports(
    State(state): State<Arc<AgentState>>,
) -> Result<Json<Vec<IngressPort>>, Failure> {
    let networks = state.cluster.networks().await?;
    Ok(Json(networks.ingress_ports().await?))
}

async fn ingress_trace(
    State(state): State<Arc<AgentState>>,
    axum::extract::Query(request): axum::extract::Query<shoal_dataplane::mesh::TraceRequest>,
) -> Result<Json<IngressTrace>, Failure> {
    let networks = state.cluster.networks().await?;
    let result = {
        let dataplane = state
            .dataplane
            .lock()
            .map_err(|_| anyhow::anyhow!("dataplane state poisoned"))?;
        networks.trace(&request, |frame| dataplane.test_run_ingress(frame))?
    };
    Ok(Json(networks.name_backend(result).await?))
}

async fn conntrack(
    State(state): State<Arc<AgentState>>,
) -> Result<Json<Vec<shoal_dataplane::mesh::TrackedFlow>>, Failure> {
    let networks = state.cluster.networks().await?;
    Ok(Json(networks.flows()?))
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GossipMembers {
    pub members: Vec<MemberInfo>,
    pub stats: GossipStats,
}

async fn gossip_members(
    State(state): State<Arc<AgentState>>,
) -> Result<Json<GossipMembers>, Failure> {
    let gossip = gossip_of(&state).await?;
    Ok(Json(GossipMembers {
        members: gossip.members().await.map_err(anyhow::Error::from)?,
        stats: gossip.stats().await.map_err(anyhow::Error::from)?,
    }))
}

/// One row of `gossip tables`: an entry with its version, tombstones included.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GossipTableRow {
    pub key: String,
    pub version: u64,
    pub writer: String,
    pub record: Option<EndpointRecord>,
    /// In this node's view: not deleted, and its node is not down (a dead node's entries are
    /// kept, hidden, until reaped).
    pub live: bool,
}

async fn gossip_table(
    State(state): State<Arc<AgentState>>,
    Path(network): Path<String>,
) -> Result<Json<Vec<GossipTableRow>>, Failure> {
    let networks = state.cluster.networks().await?;
    let id = networks.local_id(&network).ok_or_else(|| {
        ApiError::not_found(format!(
            "no task of this node is on network {network}: its table is not here"
        ))
    })?;
    let gossip = gossip_of(&state).await?;
    let live: std::collections::HashSet<String> = gossip
        .view(&id)
        .await
        .map_err(anyhow::Error::from)?
        .into_iter()
        .map(|(key, _)| key)
        .collect();
    Ok(Json(
        gossip
            .entries(&id)
            .await
            .map_err(anyhow::Error::from)?
            .into_iter()
            .map(|(key, entry)| GossipTableRow {
                live: live.contains(&key),
                key,
                version: entry.version.time,
                writer: entry.version.node,
                record: entry.value,
            })
            .collect(),
    ))
}

async fn gossip_of(state: &AgentState) -> Result<GossipHandle, Failure> {
    state.cluster.networks().await?.gossip().ok_or_else(|| {
        ApiError::unavailable("gossip has not started yet: no keyring from the managers").into()
    })
}

async fn not_found(uri: axum::http::Uri) -> Failure {
    ApiError::not_found(format!("no such API endpoint: {}", uri.path())).into()
}
