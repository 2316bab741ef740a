//! The agent's Prometheus metrics (`GET /metrics`, text exposition format 0.0.4) and health
//! checks (`GET /healthz`, `GET /readyz`) on one small HTTP listener, `metrics_addr`.
//!
//! Everything is read when scraped, from the parts that already keep it (kernel maps, the
//! gossip core, openraft, the DNS server, the worker): nothing is counted twice. A part that
//! cannot be read leaves its families out and reports
//! `shoal_scrape_collector_success{collector} 0`, so one failing part does not hide the rest.
//!
//! A new family of labelled counters is one call in a collector below:
//! `out.family("shoal_x_total", Kind::Counter, "help").by("service", per_service)`; the
//! metrics table in docs/operations.md lists them all.

use shoal_dataplane::mesh::MeshServiceCounters;
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{Display, Write as _},
    sync::Arc,
    time::{Duration, UNIX_EPOCH},
};

use anyhow::{anyhow, Context as _, Result};
use axum::{
    extract::State,
    http::{header, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use shoal_gossip::MemberState;
use tokio::{net::TcpListener, task::JoinHandle};

use shoal_api::Version;
use shoal_cluster::{node::NodeParts, state::TaskState};

use crate::server::AgentState;

/// The content type of the text format this module writes.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// How long a scrape or health check waits for the swarm membership (held while the node
/// inits, joins or leaves); after that it answers without it.
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(2);
/// A node whose managers have not answered for this long is not ready: the managers mark it
/// Down after the same time.
const HEARTBEAT_STALE: Duration = Duration::from_secs(5);

/// Serves metrics and health checks until dropped.
pub struct MetricsServer(JoinHandle<()>);

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `metrics_addr` (when set) and serves on it; a bind failure stops the agent.
pub async fn start(state: &Arc<AgentState>) -> Result<Option<MetricsServer>> {
    let Some(addr) = state.config.metrics_addr else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for metrics (setting metrics_addr)"))?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    let app = router(state.clone());
    Ok(Some(MetricsServer(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).await {
            tracing::error!(error = %err, "metrics listener failed");
        }
    }))))
}

fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz or /readyz\n",
            )
        })
        .with_state(state)
}

async fn metrics(State(state): State<Arc<AgentState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&state).await)
}

async fn healthz(State(state): State<Arc<AgentState>>) -> (StatusCode, String) {
    answer(health(&state, false).await)
}

async fn readyz(State(state): State<Arc<AgentState>>) -> (StatusCode, String) {
    answer(health(&state, true).await)
}

fn answer(result: Result<&'static str, String>) -> (StatusCode, String) {
    match result {
        Ok(ok) => (StatusCode::OK, format!("{ok}\n")),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

/// Healthy: the agent serves and, in a swarm, its node loops run and (on a manager) Raft
/// has a leader. Ready, besides: in a swarm, a manager answered a heartbeat lately, gossip
/// runs and the ingress program is attached, so the node gets work and carries traffic.
async fn health(state: &AgentState, ready: bool) -> Result<&'static str, String> {
    let parts = tokio::time::timeout(MEMBERSHIP_WAIT, state.cluster.parts())
        .await
        .map_err(|_| "busy: the node is joining or leaving a swarm".to_owned())?;
    let Some(parts) = parts else {
        return if ready {
            Err("not ready: this node is not part of a swarm".into())
        } else {
            Ok("ok: not part of a swarm")
        };
    };
    if !parts.loops_alive {
        return Err(
            "unhealthy: a node loop (server, heartbeats or role changes) has stopped".into(),
        );
    }
    if let Some(manager) = &parts.manager {
        if manager.raft.metrics().borrow().current_leader.is_none() {
            return Err("unhealthy: this manager sees no Raft leader (quorum lost?)".into());
        }
    }
    if !ready {
        return Ok("ok");
    }
    match parts.worker.since_heartbeat() {
        None => return Err("not ready: no manager has answered a heartbeat yet".into()),
        Some(age) if age > HEARTBEAT_STALE => {
            return Err(format!(
                "not ready: no manager has answered a heartbeat for {}s",
                age.as_secs()
            ))
        }
        Some(_) => {}
    }
    if parts.worker.networks().gossip().is_none() {
        return Err("not ready: gossip has not started (no keyring from the managers)".into());
    }
    let attached = state
        .dataplane
        .lock()
        .map_err(|_| "not ready: dataplane state poisoned".to_owned())?
        .ingress_attached()
        .map_err(|err| format!("not ready: reading the dataplane: {err:#}"))?;
    if !attached {
        return Err("not ready: an ingress program is not attached".into());
    }
    if let Some(reason) = state.neighbours.overflow_reason() {
        return Err(reason);
    }
    Ok("ready")
}

/// The whole exposition, every collector in turn.
pub async fn render(state: &AgentState) -> String {
    let mut out = Exposition::default();
    let mut success = BTreeMap::new();
    agent(&mut out, state);
    let parts = tokio::time::timeout(MEMBERSHIP_WAIT, state.cluster.parts()).await;
    let gateway = match &parts {
        Ok(Some(parts)) => Some(parts.worker.networks().gateway_refusals()),
        _ => None,
    };
    success.insert("dataplane", out.keep(dataplane(state, gateway)));
    success.insert("neighbours", out.keep(neighbours(state)));
    match &parts {
        Ok(Some(parts)) => {
            node(&mut out, parts);
            raft(&mut out, parts);
            success.insert("lb", out.keep(lb(parts).await));
            success.insert("mesh", out.keep(mesh(parts).await));
            success.insert("gossip", out.keep(gossip(parts).await));
            dns(&mut out, parts);
        }
        // Outside a swarm there is nothing to read; no failure.
        Ok(None) => {}
        Err(_) => {
            success.insert("swarm", false);
        }
    }
    out.family(
        "shoal_scrape_collector_success",
        Kind::Gauge,
        "Whether a collector could read its part of the agent (1) or not (0)",
    )
    .by("collector", success);
    out.finish()
}

fn agent(out: &mut Exposition, state: &AgentState) {
    let version = Version::current();
    out.family(
        "shoal_build_info",
        Kind::Gauge,
        "The agent's version and API version; always 1",
    )
    .sample(
        &[
            ("version", &version.version),
            ("api_version", &version.api_version),
        ],
        1,
    );
    out.gauge(
        "shoal_agent_start_time_seconds",
        "When the agent started, in seconds since the Unix epoch",
        state
            .started_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
    );
}

/// The dataplane's programs, maps and counters, with the gateway bridge's refusals once the
/// node is in a swarm.
fn dataplane(
    state: &AgentState,
    gateway: Option<Result<shoal_dataplane::CounterStatus>>,
) -> Result<Exposition> {
    let mut status = state
        .dataplane
        .lock()
        .map_err(|_| anyhow!("dataplane state poisoned"))?
        .status()?;
    if let Some(gateway) = gateway {
        status.counters.push(gateway?);
    }
    let old_layouts = state
        .dataplane
        .lock()
        .map_err(|_| anyhow!("dataplane state poisoned"))?
        .old_map_layouts()
        .len();
    let mut out = Exposition::default();
    out.gauge(
        "shoal_dataplane_maps_abi_version",
        "Layout version of the pinned eBPF maps this agent uses",
        shoal_common::MAPS_ABI_VERSION,
    );
    out.gauge(
        "shoal_dataplane_old_map_layouts_removed",
        "Map directories of another layout removed when this agent started (an upgrade that \
         changed the maps ABI: flows tracked before it were lost)",
        old_layouts,
    );
    out.family(
        "shoal_dataplane_ingress_packets_total",
        Kind::Counter,
        "Packets the ingress classifier saw, by verdict",
    )
    .by(
        "verdict",
        status.counters.iter().map(|c| (&c.verdict, c.packets)),
    );
    out.family(
        "shoal_dataplane_ingress_bytes_total",
        Kind::Counter,
        "Bytes the ingress classifier saw, by verdict",
    )
    .by(
        "verdict",
        status.counters.iter().map(|c| (&c.verdict, c.bytes)),
    );
    out.family(
        "shoal_dataplane_refused_packets_total",
        Kind::Counter,
        "Packets the ingress classifier refused or could not handle, by reason (the \
         dropped ones and those left to the kernel)",
    )
    .by(
        "reason",
        status
            .counters
            .iter()
            .filter(|c| c.refusal)
            .map(|c| (&c.verdict, c.packets)),
    );
    let mut attached = out.family(
        "shoal_dataplane_program_attached",
        Kind::Gauge,
        "Whether the kernel runs the program on its hook (1) or not (0)",
    );
    for p in &status.programs {
        attached.sample(
            &[
                ("program", &p.program),
                ("attach_point", &p.attach_point),
                ("interface", &p.interface),
            ],
            p.attached,
        );
    }
    out.family(
        "shoal_dataplane_map_entries",
        Kind::Gauge,
        "Keys in a pinned eBPF hash map now (arrays, whose slots all exist, have none)",
    )
    .by(
        "map",
        status
            .maps
            .iter()
            .filter_map(|m| Some((&m.name, m.entries?))),
    );
    out.family(
        "shoal_dataplane_map_max_entries",
        Kind::Gauge,
        "Capacity of a pinned eBPF map",
    )
    .by("map", status.maps.iter().map(|m| (&m.name, m.max_entries)));
    Ok(out)
}

/// The kernel's neighbour (ARP) table: one for the machine, whatever namespace asks.
fn neighbours(state: &AgentState) -> Result<Exposition> {
    let table = state
        .neighbours
        .status()?
        .context("the kernel's neighbour table is not readable by this agent")?;
    let mut out = Exposition::default();
    out.gauge(
        "shoal_neighbour_table_entries",
        "IPv4 neighbour (ARP) entries in the kernel's table, every namespace's, permanent ones included",
        table.stats.entries,
    );
    out.counter(
        "shoal_neighbour_table_fulls_total",
        "Neighbour entries the kernel refused because its table was full (since boot)",
        table.stats.table_fulls,
    );
    out.gauge(
        "shoal_neighbour_table_overflowing",
        "Whether table_fulls grew lately, so new neighbour entries fail (1) or not (0)",
        table.overflowing,
    );
    let t = table.thresholds;
    out.family(
        "shoal_neighbour_table_threshold",
        Kind::Gauge,
        "The table's limits, net.ipv4.neigh.default.gc_thresh1/2/3",
    )
    .by(
        "threshold",
        [
            ("gc_thresh1", t.gc_thresh1),
            ("gc_thresh2", t.gc_thresh2),
            ("gc_thresh3", t.gc_thresh3),
        ],
    );
    let mut demand = out.family(
        "shoal_neighbour_table_demand_entries",
        Kind::Gauge,
        "Neighbour entries this node may need, and every agent on this kernel together (when sizing)",
    );
    demand.sample(&[("scope", "node")], table.demand);
    if let Some(total) = table.all_agents_demand {
        demand.sample(&[("scope", "all_agents")], total);
    }
    Ok(out)
}

/// The worker's side: which swarm, which role, its tasks and its managers' answers.
fn node(out: &mut Exposition, parts: &NodeParts) {
    let role = if parts.manager.is_some() {
        "manager"
    } else {
        "worker"
    };
    out.family(
        "shoal_swarm_node_info",
        Kind::Gauge,
        "This node's ID and role in the swarm; always 1",
    )
    .sample(&[("node_id", &parts.node_id), ("role", role)], 1);
    // The states a worker moves its tasks through, listed even when zero.
    let mut tasks: BTreeMap<String, u64> = [
        TaskState::Starting,
        TaskState::Running,
        TaskState::Complete,
        TaskState::Shutdown,
        TaskState::Failed,
        TaskState::Rejected,
    ]
    .into_iter()
    .map(|s| (serde_name(&s), 0))
    .collect();
    for state in parts.worker.task_states() {
        *tasks.entry(serde_name(&state)).or_default() += 1;
    }
    out.family(
        "shoal_tasks",
        Kind::Gauge,
        "Tasks this node's agent knows, by state",
    )
    .by("state", tasks);
    if let Some(age) = parts.worker.since_heartbeat() {
        out.gauge(
            "shoal_heartbeat_age_seconds",
            "Seconds since a manager last answered this node's heartbeat",
            age.as_secs_f64(),
        );
    }
}

/// Only managers have Raft: workers leave these families out.
fn raft(out: &mut Exposition, parts: &NodeParts) {
    let Some(manager) = &parts.manager else {
        return;
    };
    let m = manager.raft.metrics().borrow().clone();
    out.gauge(
        "shoal_raft_is_leader",
        "Whether this manager leads the Raft group (1) or not (0)",
        m.current_leader == Some(m.id),
    );
    out.gauge(
        "shoal_raft_has_leader",
        "Whether this manager knows a Raft leader (1) or not (0)",
        m.current_leader.is_some(),
    );
    out.gauge("shoal_raft_term", "The current Raft term", m.current_term);
    out.gauge(
        "shoal_raft_last_log_index",
        "Index of the last entry in this manager's Raft log",
        m.last_log_index.unwrap_or(0),
    );
    out.gauge(
        "shoal_raft_last_applied_index",
        "Index of the last Raft entry applied to this manager's state",
        m.last_applied.map_or(0, |id| id.index),
    );
    out.gauge(
        "shoal_raft_voters",
        "Voting members of the Raft group, as this manager knows it",
        m.membership_config.membership().voter_ids().count(),
    );
    out.family(
        "shoal_raft_server_state",
        Kind::Gauge,
        "This manager's Raft role; 1 for the current one",
    )
    .sample(&[("state", &format!("{:?}", m.state).to_lowercase())], 1);
}

async fn lb(parts: &NodeParts) -> Result<Exposition> {
    let vips = parts.worker.networks().load_balancers().await?;
    let mut out = Exposition::default();
    out.gauge(
        "shoal_lb_vips",
        "Service VIPs in this node's socket load balancer",
        vips.len(),
    );
    let mut backends = out.family(
        "shoal_lb_vip_backends",
        Kind::Gauge,
        "Backends of a service VIP in the kernel's load-balancer maps",
    );
    for lb in &vips {
        backends.sample(
            &[
                ("service", &lb.service),
                ("network", &lb.network),
                ("vip", &lb.entry.vip.to_string()),
            ],
            lb.entry.backends.len(),
        );
    }
    Ok(out)
}

/// A mesh counter family: name, help, and which counter it reads.
type MeshCounterFamily = (&'static str, &'static str, fn(&MeshServiceCounters) -> u64);

/// The routing mesh's per-service counters (summed over CPUs from the kernel), by
/// published port.
async fn mesh(parts: &NodeParts) -> Result<Exposition> {
    let networks = parts.worker.networks();
    let ports = networks.ingress_ports().await?;
    let mut out = Exposition::default();
    let counters: [MeshCounterFamily; 9] = [
        (
            "shoal_mesh_flows_total",
            "Flows given a backend by Maglev",
            |c| c.flows,
        ),
        (
            "shoal_mesh_packets_in_total",
            "Packets sent to backends",
            |c| c.packets_in,
        ),
        ("shoal_mesh_bytes_in_total", "Bytes sent to backends", |c| {
            c.bytes_in
        }),
        (
            "shoal_mesh_packets_out_total",
            "Replies sent back to clients",
            |c| c.packets_out,
        ),
        (
            "shoal_mesh_bytes_out_total",
            "Bytes of replies sent back to clients",
            |c| c.bytes_out,
        ),
        (
            "shoal_mesh_no_backend_packets_total",
            "Packets to a published port without a running backend (refused)",
            |c| c.no_backend,
        ),
        (
            "shoal_mesh_snat_exhausted_packets_total",
            "New SNAT flows that found no free source port (refused)",
            |c| c.snat_exhausted,
        ),
        (
            "shoal_mesh_flow_table_full_packets_total",
            "New flows the flow tables could not hold (refused)",
            |c| c.flow_table_full,
        ),
        (
            "shoal_mesh_rewrite_failed_packets_total",
            "Packets dropped because their rewrite or redirect failed",
            |c| c.rewrite_failed,
        ),
    ];
    for (name, help, value) in counters {
        let mut family = out.family(name, Kind::Counter, help);
        for port in &ports {
            let published = port.status.published.to_string();
            family.sample(
                &[
                    ("service", &port.service),
                    ("published", &published),
                    ("protocol", port.status.protocol.name()),
                ],
                value(&port.status.counters),
            );
        }
    }
    let mut backends = out.family(
        "shoal_mesh_backends",
        Kind::Gauge,
        "Backends in a published port's Maglev row on this node",
    );
    for port in &ports {
        let published = port.status.published.to_string();
        backends.sample(
            &[
                ("service", &port.service),
                ("published", &published),
                ("protocol", port.status.protocol.name()),
            ],
            port.status.backends.len(),
        );
    }
    out.gauge(
        "shoal_mesh_flows",
        "Flows this node's routing mesh tracks now",
        networks.flows()?.len(),
    );
    Ok(out)
}

async fn gossip(parts: &NodeParts) -> Result<Exposition> {
    let mut out = Exposition::default();
    // Gossip starts with the first keyring from the managers: until then it has no samples.
    let Some(gossip) = parts.worker.networks().gossip() else {
        return Ok(out);
    };
    let members = gossip.members().await?;
    let stats = gossip.stats().await?;
    let mut by_state = out.family(
        "shoal_gossip_members",
        Kind::Gauge,
        "Gossip members as this node sees them (itself included), by state",
    );
    for (state, name) in [
        (MemberState::Alive, "alive"),
        (MemberState::Suspect, "suspect"),
        (MemberState::Down, "down"),
    ] {
        let count = members.iter().filter(|m| m.state == state).count();
        by_state.sample(&[("state", name)], count);
    }
    let directions = |sent: u64, received: u64| [("sent", sent), ("received", received)];
    out.family(
        "shoal_gossip_packets_total",
        Kind::Counter,
        "Gossip packets (UDP datagrams and TCP sync frames), by direction",
    )
    .by(
        "direction",
        directions(stats.packets_sent, stats.packets_received),
    );
    out.family(
        "shoal_gossip_bytes_total",
        Kind::Counter,
        "Gossip bytes, by direction",
    )
    .by(
        "direction",
        directions(stats.bytes_sent, stats.bytes_received),
    );
    out.family(
        "shoal_gossip_dropped_packets_total",
        Kind::Counter,
        "Gossip packets dropped, by reason",
    )
    .by(
        "reason",
        [
            ("auth_failure", stats.auth_failures),
            ("replay", stats.replays_dropped),
            ("stale", stats.stale_dropped),
            ("malformed", stats.malformed_dropped),
            ("out_of_scope", stats.out_of_scope_dropped),
        ],
    );
    out.counter(
        "shoal_gossip_suspicions_total",
        "Probes of a member that failed, making this node suspect it",
        stats.suspicions,
    );
    out.counter(
        "shoal_gossip_downs_observed_total",
        "Times this node saw a member go Down",
        stats.downs_observed,
    );
    out.family(
        "shoal_gossip_syncs_total",
        Kind::Counter,
        "Full-state TCP syncs, sent by this node or answered by it",
    )
    .by(
        "direction",
        [
            ("sent", stats.syncs_sent),
            ("answered", stats.syncs_answered),
        ],
    );
    let mut entries = out.family(
        "shoal_gossip_table_entries",
        Kind::Gauge,
        "Entries of a network's endpoint table held here: live, deleted (tombstones) or hidden because their node is down",
    );
    for net in gossip.my_networks().await? {
        let live: BTreeSet<String> = gossip
            .view(&net)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        let mut counts = [("live", 0u64), ("deleted", 0), ("node_down", 0)];
        for (key, entry) in gossip.entries(&net).await? {
            let slot = match (entry.value.is_some(), live.contains(&key)) {
                (false, _) => 1,
                (true, true) => 0,
                (true, false) => 2,
            };
            counts[slot].1 += 1;
        }
        for (state, count) in counts {
            entries.sample(&[("network_id", &net), ("state", state)], count);
        }
    }
    Ok(out)
}

/// Every counter `DnsStats` has, by its field name: new outcomes appear without a change
/// here.
fn dns(out: &mut Exposition, parts: &NodeParts) {
    let stats = serde_json::to_value(parts.worker.networks().dns_stats()).unwrap_or_default();
    let outcomes = stats
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(outcome, n)| Some((outcome, n.as_u64()?)));
    out.family(
        "shoal_dns_queries_total",
        Kind::Counter,
        "Queries the embedded DNS handled for this node's tasks, by outcome",
    )
    .by("outcome", outcomes);
}

/// A value's serde name (its lowercase state name, for task states).
fn serde_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        _ => "unknown".to_owned(),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// A writer of the text exposition format: each family is declared once (HELP, TYPE) and
/// its samples follow it. Names are checked always, not only in debug builds: a mistake
/// must fail the tests, which run the release build.
#[derive(Default)]
pub struct Exposition {
    text: String,
    names: BTreeSet<String>,
}

impl Exposition {
    /// Declares a family; add its samples to what this returns. Counter names end in
    /// `_total`, as the conventions ask.
    pub fn family<'a>(&'a mut self, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
        assert!(valid_name(name, true), "bad metric name {name:?}");
        assert!(
            kind != Kind::Counter || name.ends_with("_total"),
            "counter {name} must end in _total"
        );
        let fresh = self.names.insert(name.to_owned());
        assert!(fresh, "metric family {name} declared twice");
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', r"\\").replace('\n', r"\n");
        let _ = writeln!(self.text, "# HELP {name} {help}");
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
        Family { out: self, name }
    }

    /// A family of one unlabelled counter.
    pub fn counter(&mut self, name: &str, help: &str, value: impl SampleValue) {
        self.family(name, Kind::Counter, help).sample(&[], value);
    }

    /// A family of one unlabelled gauge.
    pub fn gauge(&mut self, name: &str, help: &str, value: impl SampleValue) {
        self.family(name, Kind::Gauge, help).sample(&[], value);
    }

    /// Appends a collector's families if it could read them; whether it could.
    fn keep(&mut self, part: Result<Exposition>) -> bool {
        match part {
            Ok(part) => {
                self.append(part);
                true
            }
            Err(err) => {
                tracing::debug!(error = %format!("{err:#}"), "a metrics collector failed");
                false
            }
        }
    }

    fn append(&mut self, other: Exposition) {
        for name in &other.names {
            assert!(
                !self.names.contains(name),
                "metric family {name} declared twice"
            );
        }
        self.names.extend(other.names);
        self.text.push_str(&other.text);
    }

    pub fn finish(self) -> String {
        self.text
    }
}

/// The samples of one family.
pub struct Family<'a> {
    out: &'a mut Exposition,
    name: &'a str,
}

impl Family<'_> {
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl SampleValue) -> &mut Self {
        let text = &mut self.out.text;
        text.push_str(self.name);
        if !labels.is_empty() {
            text.push('{');
            for (i, (label, value)) in labels.iter().enumerate() {
                assert!(valid_name(label, false) && !label.starts_with("__"));
                if i > 0 {
                    text.push(',');
                }
                let _ = write!(text, "{label}=\"");
                for c in value.chars() {
                    match c {
                        '\\' => text.push_str(r"\\"),
                        '"' => text.push_str("\\\""),
                        '\n' => text.push_str(r"\n"),
                        c => text.push(c),
                    }
                }
                text.push('"');
            }
            text.push('}');
        }
        text.push(' ');
        value.write(text);
        text.push('\n');
        self
    }

    /// One sample per (label value, value) pair, all with the one label `label`:
    /// `out.family(name, Kind::Counter, help).by("service", per_service)`.
    pub fn by<L: Display, V: SampleValue>(
        &mut self,
        label: &str,
        samples: impl IntoIterator<Item = (L, V)>,
    ) -> &mut Self {
        for (value_of_label, value) in samples {
            self.sample(&[(label, &value_of_label.to_string())], value);
        }
        self
    }
}

/// A number as the text format writes it (integers exactly, floats as Go parses them).
pub trait SampleValue {
    fn write(&self, out: &mut String);
}

macro_rules! integer_samples {
    ($($t:ty),*) => {$(
        impl SampleValue for $t {
            fn write(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
integer_samples!(u8, u16, u32, u64, usize, i32, i64);

impl SampleValue for bool {
    fn write(&self, out: &mut String) {
        out.push(if *self { '1' } else { '0' });
    }
}

impl SampleValue for f64 {
    fn write(&self, out: &mut String) {
        if self.is_nan() {
            out.push_str("NaN");
        } else if self.is_infinite() {
            out.push_str(if *self > 0.0 { "+Inf" } else { "-Inf" });
        } else {
            let _ = write!(out, "{self}");
        }
    }
}

/// Metric names may hold colons, label names may not.
fn valid_name(name: &str, metric: bool) -> bool {
    let mut chars = name.chars();
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic()
            || c == '_'
            || (metric && c == ':')
            || (!first && c.is_ascii_digit())
    };
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_help_type_and_samples() {
        let mut out = Exposition::default();
        out.counter("shoal_x_total", "Things", 3u64);
        out.family("shoal_y", Kind::Gauge, "Ys by kind")
            .by("kind", [("a", 1u64), ("b", 2)]);
        out.gauge("shoal_up", "Up", true);
        assert_eq!(
            out.finish(),
            "# HELP shoal_x_total Things\n# TYPE shoal_x_total counter\nshoal_x_total 3\n\
             # HELP shoal_y Ys by kind\n# TYPE shoal_y gauge\nshoal_y{kind=\"a\"} 1\nshoal_y{kind=\"b\"} 2\n\
             # HELP shoal_up Up\n# TYPE shoal_up gauge\nshoal_up 1\n"
        );
    }

    #[test]
    fn label_values_and_help_are_escaped() {
        let mut out = Exposition::default();
        out.family("shoal_z", Kind::Gauge, "A \\ help\nwith two lines")
            .sample(
                &[("a", "quote \" back \\ nl \n end"), ("b", "ünïcode")],
                1.5,
            );
        assert_eq!(
            out.finish(),
            "# HELP shoal_z A \\\\ help\\nwith two lines\n# TYPE shoal_z gauge\n\
             shoal_z{a=\"quote \\\" back \\\\ nl \\n end\",b=\"ünïcode\"} 1.5\n"
        );
    }

    #[test]
    fn a_failing_collector_leaves_its_families_out() {
        let mut out = Exposition::default();
        let mut part = Exposition::default();
        part.gauge("shoal_a", "A", 1u64);
        assert!(out.keep(Ok(part)));
        assert!(!out.keep(Err(anyhow!("unreadable"))));
        assert_eq!(
            out.finish(),
            "# HELP shoal_a A\n# TYPE shoal_a gauge\nshoal_a 1\n"
        );
    }

    #[test]
    fn floats_are_written_as_prometheus_reads_them() {
        let text = |v: f64| {
            let mut s = String::new();
            v.write(&mut s);
            s
        };
        assert_eq!(text(f64::NAN), "NaN");
        assert_eq!(text(f64::INFINITY), "+Inf");
        assert_eq!(text(f64::NEG_INFINITY), "-Inf");
        assert_eq!(text(0.25), "0.25");
        assert_eq!(text(1e21), "1000000000000000000000");
        let mut big = String::new();
        u64::MAX.write(&mut big);
        assert_eq!(big, "18446744073709551615");
    }

    #[test]
    fn names_follow_the_format() {
        assert!(valid_name("shoal_a:b_1", true));
        assert!(!valid_name("shoal_a:b", false));
        assert!(!valid_name("1abc", true));
        assert!(!valid_name("", true));
        assert!(!valid_name("a-b", true));
    }

    #[test]
    #[should_panic(expected = "must end in _total")]
    fn counters_end_in_total() {
        Exposition::default().counter("shoal_x", "X", 1u64);
    }

    #[test]
    #[should_panic(expected = "declared twice")]
    fn a_family_is_declared_once() {
        let mut out = Exposition::default();
        out.gauge("shoal_x", "X", 1u64);
        let mut other = Exposition::default();
        other.gauge("shoal_x", "X", 2u64);
        out.append(other);
    }

    #[test]
    fn task_states_use_their_api_names() {
        assert_eq!(serde_name(&TaskState::Running), "running");
    }
}
