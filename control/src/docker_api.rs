//! The Docker Engine API (its swarm subset, versions 1.41 to 1.47) on a second Unix socket,
//! so the unmodified `docker` CLI drives the swarm (`DOCKER_HOST=unix:///run/shoal/docker.sock`).
//! Requests go the way the agent's own API sends them (`ClusterRuntime`); the documents come
//! from `shoal-docker`, as `shoal X inspect` prints them. Errors are Docker's: a status and
//! `{"message": ...}`. What shoal cannot do is refused with a 400 naming the option.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::{Path, Query, Request, State},
    http::{HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use http_body_util::channel::Channel;
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_api::{ApiError, ErrorKind, InitRequest, JoinArgs, Role};
use shoal_cluster::protocol::{
    ControlRequest, ControlResponse, LogLine, NetworkCreate, ServiceChanges, ServiceLogs,
    UnreadableNode,
};
use shoal_docker::{models, spec, Cluster};

use crate::{
    log_follower::{LogBatch, LogFollower},
    server::AgentState,
};

/// The newest API version served; clients asking for more are told so, as dockerd does.
pub const API_VERSION: &str = "1.47";
pub const MIN_API_VERSION: &str = "1.41";

/// The agent answers for the managers, as its own API does.
struct Agent(Arc<AgentState>);

impl Cluster for Agent {
    async fn control(&self, request: ControlRequest) -> anyhow::Result<ControlResponse> {
        self.0.cluster.control(request).await
    }

    async fn managers(&self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .0
            .cluster
            .info()
            .await
            .map(|s| s.managers)
            .unwrap_or_default())
    }

    async fn local_network(
        &self,
        network: &str,
    ) -> anyhow::Result<Option<shoal_dataplane::overlay::NetworkDataplane>> {
        let networks = self.0.cluster.networks().await?;
        let network = network.to_owned();
        tokio::task::spawn_blocking(move || networks.inspect(&network)).await?
    }
}

/// Docker's error answer.
struct DockerError(ApiError);

impl IntoResponse for DockerError {
    fn into_response(self) -> Response {
        let status = match self.0.kind {
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            kind => {
                StatusCode::from_u16(kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
            }
        };
        (status, Json(json!({ "message": self.0.error }))).into_response()
    }
}

impl From<anyhow::Error> for DockerError {
    fn from(err: anyhow::Error) -> Self {
        DockerError(ApiError::of(&err))
    }
}

impl From<ApiError> for DockerError {
    fn from(err: ApiError) -> Self {
        DockerError(err)
    }
}

type Answer<T> = Result<T, DockerError>;

pub fn router(state: Arc<AgentState>) -> Router {
    let api = Router::new()
        .route("/_ping", get(ping).head(ping))
        .route("/version", get(version))
        .route("/info", get(info))
        .route("/swarm", get(swarm_inspect))
        .route("/swarm/init", post(swarm_init))
        .route("/swarm/join", post(swarm_join))
        .route("/swarm/leave", post(swarm_leave))
        .route("/swarm/update", post(swarm_update))
        .route("/nodes", get(node_list))
        .route("/nodes/{id}", get(node_inspect).delete(node_remove))
        .route("/nodes/{id}/update", post(node_update))
        .route("/services", get(service_list))
        .route("/services/create", post(service_create))
        .route(
            "/services/{id}",
            get(service_inspect).delete(service_remove),
        )
        .route("/services/{id}/update", post(service_update))
        .route("/services/{id}/logs", get(service_logs))
        .route("/tasks", get(task_list))
        .route("/tasks/{id}", get(task_inspect))
        .route("/networks", get(network_list))
        .route("/networks/create", post(network_create))
        .route(
            "/networks/{id}",
            get(network_inspect).delete(network_remove),
        )
        .fallback(not_found)
        .with_state(state);
    Router::new()
        .fallback_service(api)
        .layer(axum::middleware::from_fn(versioned))
}

/// `/v1.47/services` is `/services` for a version this server speaks; every answer says the
/// version it speaks, as dockerd's do.
async fn versioned(mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    if let Some((version, rest)) = path
        .strip_prefix("/v")
        .and_then(|p| p.split_once('/'))
        .filter(|(v, _)| v.split('.').all(|n| n.parse::<u32>().is_ok()))
    {
        let number = |v: &str| -> (u32, u32) {
            let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
            (major.parse().unwrap_or(0), minor.parse().unwrap_or(0))
        };
        if number(version) > number(API_VERSION) {
            return DockerError(ApiError::invalid(format!(
                "client version {version} is too new. Maximum supported API version is {API_VERSION}"
            )))
            .into_response();
        }
        if number(version) < number(MIN_API_VERSION) {
            return DockerError(ApiError::invalid(format!(
                "client version {version} is too old. Minimum supported API version is {MIN_API_VERSION}, please upgrade your client to a newer version"
            )))
            .into_response();
        }
        let query = request
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        if let Ok(uri) = format!("/{rest}{query}").parse() {
            *request.uri_mut() = uri;
        }
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert("API-Version", HeaderValue::from_static(API_VERSION));
    headers.insert("OSType", HeaderValue::from_static("linux"));
    headers.insert(
        "Server",
        HeaderValue::from_static(concat!("shoal/", env!("CARGO_PKG_VERSION"), " (linux)")),
    );
    response
}

async fn not_found(uri: axum::http::Uri) -> DockerError {
    ApiError::not_found(format!(
        "{} is not part of the Engine API shoal serves (its swarm subset: see docs/docker-cli.md)",
        uri.path()
    ))
    .into()
}

async fn ping() -> Response {
    let mut response = "OK".into_response();
    response.headers_mut().insert(
        "Cache-Control",
        HeaderValue::from_static("no-cache, no-store, must-revalidate"),
    );
    response
}

/// The architecture as Go names it (`docker version` prints GOARCH).
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

async fn version(State(state): State<Arc<AgentState>>) -> Json<Value> {
    let version = env!("CARGO_PKG_VERSION");
    Json(json!({
        "Platform": { "Name": "shoal" },
        "Components": [{ "Name": "Engine", "Version": version, "Details": {
            "ApiVersion": API_VERSION, "MinAPIVersion": MIN_API_VERSION, "Os": "linux",
            "Arch": go_arch(), "KernelVersion": state.kernel } }],
        "Version": version,
        "ApiVersion": API_VERSION,
        "MinAPIVersion": MIN_API_VERSION,
        "Os": "linux",
        "Arch": go_arch(),
        "KernelVersion": state.kernel,
    }))
}

async fn info(State(state): State<Arc<AgentState>>) -> Answer<Json<Value>> {
    let swarm = state.cluster.info().await;
    let agent = Agent(state.clone());
    let mut swarm_json = json!({
        "NodeID": "", "NodeAddr": "", "LocalNodeState": "inactive", "ControlAvailable": false,
        "Error": "", "RemoteManagers": null,
    });
    if let Some(s) = &swarm {
        swarm_json = json!({
            "NodeID": s.node_id,
            "NodeAddr": s.advertise.ip().to_string(),
            "LocalNodeState": "active",
            "ControlAvailable": s.manager,
            "Error": "",
            "RemoteManagers": s.managers.iter().map(|m| json!({ "NodeID": "", "Addr": m })).collect::<Vec<_>>(),
        });
        if s.manager {
            let nodes = shoal_docker::nodes(&agent).await?;
            swarm_json["Nodes"] = json!(nodes.len());
            swarm_json["Managers"] =
                json!(nodes.iter().filter(|n| n.manager_status.is_some()).count());
            swarm_json["Cluster"] = cluster_document(&agent, &s.cluster_id, false).await?;
        }
    }
    let c = &state.config;
    Ok(Json(json!({
        "ID": swarm.as_ref().map(|s| s.node_id.clone()).unwrap_or_default(),
        "Name": c.hostname,
        "ServerVersion": env!("CARGO_PKG_VERSION"),
        "OperatingSystem": "shoal",
        "OSType": "linux",
        "Architecture": std::env::consts::ARCH,
        "KernelVersion": state.kernel,
        "NCPU": c.node_resources.nano_cpus / shoal_docker::convert::NANOS,
        "MemTotal": c.node_resources.memory_bytes,
        "Driver": "shoal",
        "DockerRootDir": c.state_dir,
        "Swarm": swarm_json,
    })))
}

/// The swarm object: its ID and, for `docker swarm inspect`/`join-token`, the join tokens.
async fn cluster_document(agent: &Agent, cluster_id: &str, tokens: bool) -> anyhow::Result<Value> {
    let mut document = json!({
        "ID": cluster_id,
        "Version": { "Index": 0 },
        "Spec": swarm_spec(),
    });
    if tokens {
        let mut join = serde_json::Map::new();
        for (key, role) in [("Worker", Role::Worker), ("Manager", Role::Manager)] {
            let request = ControlRequest::JoinToken {
                role,
                rotate: false,
            };
            if let ControlResponse::Token(token) = agent.control(request).await? {
                join.insert(key.into(), Value::String(token));
            }
        }
        document["JoinTokens"] = Value::Object(join);
    }
    Ok(document)
}

/// shoal's swarm has no settings Docker's spec holds: what `docker swarm update` may send back.
fn swarm_spec() -> Value {
    json!({ "Name": "default", "Labels": {} })
}

async fn swarm_inspect(State(state): State<Arc<AgentState>>) -> Answer<Json<Value>> {
    let swarm = state.cluster.info().await.ok_or_else(|| {
        ApiError::unavailable("This node is not a swarm manager. Use \"docker swarm init\" or \"docker swarm join\" to connect this node to swarm and try again.")
    })?;
    Ok(Json(
        cluster_document(&Agent(state), &swarm.cluster_id, true).await?,
    ))
}

/// Docker's query flags: `1`/`true` are set.
fn flag(query: &BTreeMap<String, String>, name: &str) -> bool {
    query.get(name).is_some_and(|v| v == "1" || v == "true")
}

async fn swarm_update(
    State(state): State<Arc<AgentState>>,
    Query(query): Query<BTreeMap<String, String>>,
    Json(body): Json<Value>,
) -> Answer<StatusCode> {
    if flag(&query, "rotateManagerUnlockKey") {
        return Err(ApiError::invalid(
            "autolock (--autolock, unlock keys) is not supported by shoal",
        )
        .into());
    }
    let changed = spec::changed_fields(&body, &swarm_spec());
    if !changed.is_empty() {
        return Err(ApiError::invalid(format!(
            "changing swarm settings ({}) is not supported by shoal",
            changed.join(", ")
        ))
        .into());
    }
    for (flag_name, role) in [
        ("rotateWorkerToken", Role::Worker),
        ("rotateManagerToken", Role::Manager),
    ] {
        if flag(&query, flag_name) {
            state
                .cluster
                .control(ControlRequest::JoinToken { role, rotate: true })
                .await?;
        }
    }
    Ok(StatusCode::OK)
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerInit {
    #[serde(default)]
    listen_addr: String,
    #[serde(default)]
    advertise_addr: String,
    #[serde(default)]
    data_path_addr: String,
    #[serde(default)]
    data_path_port: u16,
    #[serde(default)]
    default_addr_pool: Vec<String>,
    #[serde(default)]
    subnet_size: u8,
    #[serde(default)]
    force_new_cluster: bool,
    #[serde(default)]
    spec: Value,
    #[serde(default)]
    auto_lock_managers: bool,
    #[serde(default)]
    availability: String,
}

fn refuse_set(what: &str, set: bool) -> Answer<()> {
    if set {
        return Err(ApiError::invalid(format!("{what} is not supported by shoal")).into());
    }
    Ok(())
}

async fn swarm_init(
    State(state): State<Arc<AgentState>>,
    Json(init): Json<DockerInit>,
) -> Answer<Json<String>> {
    refuse_set("--autolock", init.auto_lock_managers)?;
    refuse_set(
        &format!("--availability {}", init.availability),
        !["", "active"].contains(&init.availability.as_str()),
    )?;
    refuse_set(
        &format!("--listen-addr {}", init.listen_addr),
        !["", "0.0.0.0:2377"].contains(&init.listen_addr.as_str()),
    )?;
    let changed = spec::changed_fields(&init.spec, &Value::Null);
    refuse_set(
        &format!("swarm settings ({})", changed.join(", ")),
        !changed.is_empty(),
    )?;
    refuse_set(
        "more than one --default-addr-pool",
        init.default_addr_pool.len() > 1,
    )?;
    let parse_pool = |p: &String| {
        p.parse()
            .map_err(|e: anyhow::Error| ApiError::invalid(format!("{e:#}")))
    };
    let request = InitRequest {
        advertise_addr: (!init.advertise_addr.is_empty()).then_some(init.advertise_addr),
        force_new_cluster: init.force_new_cluster,
        default_addr_pool: init.default_addr_pool.first().map(parse_pool).transpose()?,
        default_addr_pool_mask_length: (init.subnet_size != 0).then_some(init.subnet_size),
        data_path_port: (init.data_path_port != 0).then_some(init.data_path_port),
        data_path_addr: (!init.data_path_addr.is_empty())
            .then(|| {
                init.data_path_addr
                    .parse()
                    .map_err(|_| ApiError::invalid("--data-path-addr must be an IPv4 address"))
            })
            .transpose()?,
    };
    Ok(Json(state.cluster.init(request).await?.node_id))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerJoin {
    #[serde(default)]
    listen_addr: String,
    #[serde(default)]
    advertise_addr: String,
    #[serde(default)]
    data_path_addr: String,
    remote_addrs: Vec<String>,
    join_token: String,
    #[serde(default)]
    availability: String,
}

async fn swarm_join(
    State(state): State<Arc<AgentState>>,
    Json(join): Json<DockerJoin>,
) -> Answer<StatusCode> {
    refuse_set(
        &format!("--availability {}", join.availability),
        !["", "active"].contains(&join.availability.as_str()),
    )?;
    refuse_set(
        &format!("--listen-addr {}", join.listen_addr),
        !["", "0.0.0.0:2377"].contains(&join.listen_addr.as_str()),
    )?;
    let remote = join
        .remote_addrs
        .first()
        .cloned()
        .ok_or_else(|| ApiError::invalid("no manager address to join"))?;
    state
        .cluster
        .join(JoinArgs {
            token: join.join_token,
            remote,
            advertise_addr: (!join.advertise_addr.is_empty()).then_some(join.advertise_addr),
            data_path_addr: (!join.data_path_addr.is_empty())
                .then(|| {
                    join.data_path_addr
                        .parse()
                        .map_err(|_| ApiError::invalid("--data-path-addr must be an IPv4 address"))
                })
                .transpose()?,
        })
        .await?;
    Ok(StatusCode::OK)
}

async fn swarm_leave(
    State(state): State<Arc<AgentState>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Answer<StatusCode> {
    state.cluster.leave(flag(&query, "force")).await?;
    Ok(StatusCode::OK)
}

/// Docker's `filters` query: `{"name":{"web":true}}` (or the older `{"name":["web"]}`).
struct Filters(BTreeMap<String, Vec<String>>);

impl Filters {
    fn parse(query: &BTreeMap<String, String>, allowed: &[&str]) -> Answer<Self> {
        let Some(text) = query.get("filters").filter(|t| !t.is_empty()) else {
            return Ok(Self(BTreeMap::new()));
        };
        let value: Value = serde_json::from_str(text)
            .map_err(|e| ApiError::invalid(format!("invalid filters: {e}")))?;
        let mut filters = BTreeMap::new();
        for (key, values) in value.as_object().into_iter().flatten() {
            if !allowed.contains(&key.as_str()) {
                return Err(ApiError::invalid(format!("invalid filter '{key}'")).into());
            }
            let values: Vec<String> = match values {
                Value::Object(map) => map.keys().cloned().collect(),
                Value::Array(list) => list
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                _ => return Err(ApiError::invalid(format!("invalid filter '{key}'")).into()),
            };
            filters.insert(key.clone(), values);
        }
        Ok(Self(filters))
    }

    /// True when the filter is absent or one of its values matches.
    fn any(&self, key: &str, matches: impl Fn(&str) -> bool) -> bool {
        self.0
            .get(key)
            .is_none_or(|values| values.iter().any(|v| matches(v)))
    }

    /// `label=KEY` or `label=KEY=VALUE`, every one of them.
    fn labels(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.get("label").is_none_or(|wanted| {
            wanted.iter().all(|w| match w.split_once('=') {
                Some((k, v)) => labels.get(k).is_some_and(|l| l == v),
                None => labels.contains_key(w),
            })
        })
    }
}

async fn node_list(
    State(state): State<Arc<AgentState>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Answer<Json<Vec<models::Node>>> {
    let filters = Filters::parse(
        &query,
        &["id", "name", "label", "node.label", "role", "membership"],
    )?;
    let nodes = shoal_docker::nodes(&Agent(state)).await?;
    Ok(Json(
        nodes
            .into_iter()
            .filter(|n| filters.any("id", |v| n.id.starts_with(v)))
            .filter(|n| filters.any("name", |v| n.description.hostname.starts_with(v)))
            .filter(|n| filters.any("role", |v| n.spec.role == v))
            .filter(|_| filters.any("membership", |v| v == "accepted"))
            .filter(|n| filters.labels(&n.spec.labels))
            .collect(),
    ))
}

async fn node_inspect(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Answer<Json<models::Node>> {
    Ok(Json(shoal_docker::node(&Agent(state), &id).await?))
}

async fn node_update(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Json(body): Json<Value>,
) -> Answer<StatusCode> {
    let agent = Agent(state);
    let new: models::NodeSpec = spec::parse_strict(&body)?;
    let current = shoal_docker::node(&agent, &id).await?;
    let changes = spec::node_changes(&current, &new)?;
    agent
        .control(ControlRequest::NodeUpdate {
            node: current.id,
            availability: changes.availability,
            label_add: changes.label_add,
            label_rm: changes.label_rm,
            role: changes.role,
        })
        .await?;
    Ok(StatusCode::OK)
}

async fn node_remove(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Answer<StatusCode> {
    let force = flag(&query, "force");
    state
        .cluster
        .control(ControlRequest::NodeRemove { node: id, force })
        .await?;
    Ok(StatusCode::OK)
}

async fn service_list(
    State(state): State<Arc<AgentState>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Answer<Json<Vec<models::Service>>> {
    let filters = Filters::parse(&query, &["id", "name", "label", "mode"])?;
    let services = shoal_docker::services(&Agent(state)).await?;
    let status = flag(&query, "status");
    Ok(Json(
        services
            .into_iter()
            .filter(|s| filters.any("id", |v| s.id.starts_with(v)))
            .filter(|s| filters.any("name", |v| s.spec.name.starts_with(v)))
            .filter(|s| {
                let global = s.spec.mode.global.is_some();
                filters.any("mode", |v| (v == "global") == global)
            })
            .filter(|s| filters.labels(&s.spec.labels))
            .map(|mut s| {
                if status {
                    let extras = s.shoal.as_ref();
                    s.service_status = Some(models::ServiceStatus {
                        running_tasks: extras.map_or(0, |e| e.running),
                        desired_tasks: extras.map_or(0, |e| e.desired),
                        completed_tasks: 0,
                    });
                }
                s
            })
            .collect(),
    ))
}

async fn service_inspect(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Answer<Json<models::Service>> {
    Ok(Json(shoal_docker::service(&Agent(state), &id).await?))
}

async fn service_create(
    State(state): State<Arc<AgentState>>,
    Json(body): Json<Value>,
) -> Answer<(StatusCode, Json<Value>)> {
    let docker: models::ServiceSpec = spec::parse_strict(&body)?;
    let shoal = spec::service_spec(&docker)?;
    match state
        .cluster
        .control(ControlRequest::ServiceCreate(Box::new(shoal)))
        .await?
    {
        ControlResponse::Service(view) => Ok((
            StatusCode::CREATED,
            Json(json!({ "ID": view.id, "Warnings": null })),
        )),
        other => Err(anyhow::anyhow!("unexpected answer from the managers: {other:?}").into()),
    }
}

async fn service_update(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
    Json(body): Json<Value>,
) -> Answer<Json<Value>> {
    let agent = Agent(state);
    let current = shoal_docker::service_view(&agent, &id).await?;
    if let Some(version) = query.get("version") {
        if version.parse::<u64>().ok() != Some(current.version) {
            return Err(ApiError::conflict(format!(
                "update out of sequence: service {} is at version {}, the update was made from version {version}",
                current.name, current.version
            ))
            .into());
        }
    }
    // `docker service rollback` (and `update --rollback`): the body is the spec the CLI read;
    // the managers' previous spec is what the service returns to.
    let changes = if query.get("rollback").is_some_and(|r| r == "previous") {
        ServiceChanges {
            rollback: true,
            ..ServiceChanges::default()
        }
    } else {
        let new: models::ServiceSpec = spec::parse_strict(&body)?;
        let networks = shoal_docker::networks(&agent).await?;
        spec::service_changes(&current, &networks, &new)?
    };
    agent
        .control(ControlRequest::ServiceUpdate {
            service: current.id,
            changes: Box::new(changes),
        })
        .await?;
    Ok(Json(json!({ "Warnings": null })))
}

async fn service_remove(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Answer<StatusCode> {
    state
        .cluster
        .control(ControlRequest::ServiceRemove { service: id })
        .await?;
    Ok(StatusCode::OK)
}

/// Docker's multiplexed log stream (stdout frames), each line led by the task's context, as
/// `docker service logs` parses it; with `follow`, the stream stays open and carries what the
/// tasks write next (read every half second, as `shoal service logs --follow` does) until the
/// client goes or the service is removed.
async fn service_logs(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Answer<Response> {
    for unsupported in ["timestamps", "since"] {
        if flag(&query, unsupported)
            || (unsupported == "since"
                && query
                    .get("since")
                    .is_some_and(|s| !s.is_empty() && s != "0"))
        {
            return Err(ApiError::invalid(format!(
                "--{unsupported} is not supported by shoal's service logs"
            ))
            .into());
        }
    }
    let tail = query
        .get("tail")
        .filter(|t| *t != "all")
        .map(|t| t.parse::<usize>())
        .transpose()
        .map_err(|_| ApiError::invalid("--tail must be a number or all"))?;
    let follow = flag(&query, "follow");
    let agent = Agent(state);
    let service_id = shoal_docker::service_view(&agent, &id).await?.id;
    let response =
        Response::builder().header("Content-Type", "application/vnd.docker.multiplexed-stream");
    if !follow {
        let request = ControlRequest::ServiceLogs {
            service: service_id.clone(),
            tail,
            after: None,
        };
        let logs = service_logs_of(&agent, request).await?;
        let mut body = log_frames(&agent, &service_id, &logs.lines).await?;
        body.extend(incomplete_stream(&logs.unreadable));
        return Ok(response
            .body(Body::from(body))
            .map_err(anyhow::Error::from)?);
    }
    let mut follower = LogFollower::new(&service_id, tail);
    let first = follower
        .next(|request| agent.control(request))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("service {id} not found")))?;
    let (sender, body) = Channel::<Bytes, std::convert::Infallible>::new(16);
    tokio::spawn(async move {
        let mut sender = sender;
        let mut batch = first;
        loop {
            let (frames, last) = match log_frames(&agent, &service_id, &batch.lines).await {
                Ok(mut frames) => {
                    let incomplete = incomplete_stream(&batch.newly_unreadable);
                    let last = !incomplete.is_empty() || batch.newly_failed.is_some();
                    frames.extend(incomplete);
                    if let Some(why) = &batch.newly_failed {
                        frames.extend(frame(3, why));
                    }
                    (frames, last)
                }
                Err(err) => (frame(3, &format!("{err:#}")), true),
            };
            // Sent even when empty (the server drops empty chunks): a client that went is
            // noticed on a quiet service too.
            if sender.send_data(frames.into()).await.is_err() {
                return;
            }
            // After a system-error frame the Docker CLI stops reading, as it does from dockerd.
            if last {
                return;
            }
            // Removed, or an error: the stream ends, as Docker's does.
            let next = follower.next(|request| agent.control(request)).await;
            batch = match next {
                Ok(Some(next)) => next,
                Ok(None) => return,
                Err(err) => LogBatch {
                    newly_failed: Some(format!("{err:#}")),
                    ..LogBatch::default()
                },
            };
        }
    });
    Ok(response
        .body(Body::new(body))
        .map_err(anyhow::Error::from)?)
}

/// Swarm's last word on a log stream some nodes could not give their part of: a frame of
/// the "system error" stream (3), which the Docker CLI prints as "error from daemon in
/// stream: ..." before it stops reading.
fn incomplete_stream(unreadable: &[UnreadableNode]) -> Vec<u8> {
    if unreadable.is_empty() {
        return Vec::new();
    }
    let reasons: Vec<String> = unreadable
        .iter()
        .map(|u| format!("node {} is not available: {}", u.node, u.error))
        .collect();
    let text = format!(
        "warning: incomplete log stream. some logs could not be retrieved for the following reasons: {}",
        reasons.join(", ")
    );
    frame(3, &text)
}

async fn service_logs_of(agent: &Agent, request: ControlRequest) -> anyhow::Result<ServiceLogs> {
    match agent.control(request).await? {
        ControlResponse::Logs(logs) => Ok(logs),
        _ => anyhow::bail!("unexpected answer from the managers"),
    }
}

/// One stdout frame per line, led by its task's context (node, service and task IDs).
async fn log_frames(agent: &Agent, service_id: &str, lines: &[LogLine]) -> anyhow::Result<Vec<u8>> {
    if lines.is_empty() {
        return Ok(Vec::new());
    }
    let nodes = shoal_docker::nodes(agent).await?;
    let mut frames = Vec::new();
    for line in lines {
        // `web.1.<task id>@node2`
        let (task, host) = line.source.rsplit_once('@').unwrap_or((&line.source, ""));
        let task_id = task.rsplit_once('.').map_or(task, |(_, id)| id);
        let node_id = nodes
            .iter()
            .find(|n| n.description.hostname == host)
            .map_or("", |n| n.id.as_str());
        let text = format!(
            "com.docker.swarm.node.id={node_id},com.docker.swarm.service.id={service_id},com.docker.swarm.task.id={task_id} {}\n",
            line.line
        );
        frames.extend(frame(1, &text));
    }
    Ok(frames)
}

/// One frame of Docker's multiplexed stream: the stream (1 stdout, 2 stderr, 3 system
/// error), three zero bytes, the length, the text.
fn frame(stream: u8, text: &str) -> Vec<u8> {
    let mut frame = vec![stream, 0, 0, 0];
    frame.extend_from_slice(&(text.len() as u32).to_be_bytes());
    frame.extend_from_slice(text.as_bytes());
    frame
}

async fn task_list(
    State(state): State<Arc<AgentState>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Answer<Json<Vec<models::Task>>> {
    let filters = Filters::parse(
        &query,
        &[
            "id",
            "name",
            "service",
            "node",
            "desired-state",
            "label",
            "_up-to-date",
        ],
    )?;
    let agent = Agent(state);
    let services = shoal_docker::service_views(&agent).await?;
    let nodes = shoal_docker::nodes(&agent).await?;
    let tasks = shoal_docker::tasks(&agent).await?;
    let service_of = |id: &str| services.iter().find(|s| s.id == id);
    Ok(Json(
        tasks
            .into_iter()
            .filter(|t| filters.any("id", |v| t.id.starts_with(v)))
            .filter(|t| filters.any("name", |v| t.name.starts_with(v)))
            .filter(|t| {
                filters.any("service", |v| {
                    service_of(&t.service_id).is_some_and(|s| s.id.starts_with(v) || s.name == v)
                })
            })
            .filter(|t| {
                filters.any("node", |v| {
                    t.node_id.starts_with(v)
                        || nodes
                            .iter()
                            .any(|n| n.id == t.node_id && n.description.hostname == v)
                })
            })
            .filter(|t| {
                filters.any("desired-state", |v| match v {
                    "running" | "accepted" => t.desired_state == "running",
                    "shutdown" => t.desired_state != "running",
                    other => t.desired_state == other,
                })
            })
            .filter(|t| {
                filters.any("_up-to-date", |_| {
                    service_of(&t.service_id).is_some_and(|s| t.version.index == s.version)
                })
            })
            .filter(|t| filters.labels(&t.labels))
            .collect(),
    ))
}

async fn task_inspect(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Answer<Json<models::Task>> {
    Ok(Json(shoal_docker::task(&Agent(state), &id).await?))
}

async fn network_list(
    State(state): State<Arc<AgentState>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Answer<Json<Vec<models::Network>>> {
    let filters = Filters::parse(&query, &["id", "name", "driver", "scope", "label", "type"])?;
    let networks = shoal_docker::network_list(&Agent(state)).await?;
    Ok(Json(
        networks
            .into_iter()
            .filter(|n| filters.any("id", |v| n.id.starts_with(v)))
            .filter(|n| filters.any("name", |v| n.name.contains(v)))
            .filter(|n| filters.any("driver", |v| n.driver == v))
            .filter(|n| filters.any("scope", |v| n.scope == v))
            .filter(|_| filters.any("type", |v| v == "custom"))
            .filter(|n| filters.labels(&n.labels))
            .collect(),
    ))
}

async fn network_inspect(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Answer<Json<models::Network>> {
    Ok(Json(shoal_docker::network(&Agent(state), &id).await?))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerNetworkCreate {
    name: String,
    #[serde(default)]
    driver: String,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    attachable: bool,
    #[serde(rename = "IPAM", default)]
    ipam: Option<models::Ipam>,
    #[serde(default)]
    options: BTreeMap<String, String>,
}

async fn network_create(
    State(state): State<Arc<AgentState>>,
    Json(body): Json<Value>,
) -> Answer<(StatusCode, Json<Value>)> {
    let known = [
        "Name",
        "Driver",
        "Internal",
        "Attachable",
        "IPAM",
        "Options",
        "CheckDuplicate",
        "Scope",
    ];
    let unknown = spec::changed_fields(
        &Value::Object(
            body.as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| !known.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        &Value::Null,
    );
    refuse_set(
        &format!("network option {}", unknown.join(", ")),
        !unknown.is_empty(),
    )?;
    let create: DockerNetworkCreate = serde_json::from_value(body)
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))?;
    refuse_set(
        &format!("the {:?} driver (only overlay exists)", create.driver),
        !["", "overlay"].contains(&create.driver.as_str()),
    )?;
    let mut mtu = None;
    for (key, value) in &create.options {
        match key.as_str() {
            "com.docker.network.driver.mtu" | "mtu" => {
                mtu = Some(value.parse().map_err(|_| {
                    ApiError::invalid(format!("--opt {key}={value}: mtu must be a number"))
                })?)
            }
            _ => {
                return Err(ApiError::invalid(format!(
                    "driver option {key} is not supported by shoal (only mtu)"
                ))
                .into())
            }
        }
    }
    let ipam = create.ipam.unwrap_or_default();
    refuse_set(
        &format!("IPAM driver {:?}", ipam.driver),
        !["", "default"].contains(&ipam.driver.as_str()),
    )?;
    refuse_set("more than one subnet", ipam.config.len() > 1)?;
    let config = ipam.config.first();
    let invalid = |e: String| ApiError::invalid(e);
    let request = NetworkCreate {
        name: create.name,
        subnet: config
            .filter(|c| !c.subnet.is_empty())
            .map(|c| {
                c.subnet
                    .parse()
                    .map_err(|e: anyhow::Error| invalid(format!("{e:#}")))
            })
            .transpose()?,
        gateway: config
            .filter(|c| !c.gateway.is_empty())
            .map(|c| {
                c.gateway
                    .parse()
                    .map_err(|_| invalid(format!("--gateway {}: not an IPv4 address", c.gateway)))
            })
            .transpose()?,
        attachable: create.attachable,
        internal: create.internal,
        mtu,
    };
    match state
        .cluster
        .control(ControlRequest::NetworkCreate(request))
        .await?
    {
        ControlResponse::Network(view) => Ok((
            StatusCode::CREATED,
            Json(json!({ "Id": view.id, "Warning": "" })),
        )),
        other => Err(anyhow::anyhow!("unexpected answer from the managers: {other:?}").into()),
    }
}

async fn network_remove(
    State(state): State<Arc<AgentState>>,
    Path(id): Path<String>,
) -> Answer<StatusCode> {
    state
        .cluster
        .control(ControlRequest::NetworkRemove { network: id })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
