//! This agent's place in a swarm: its identity on disk, the manager (Raft member and
//! 2377 server) when it is one, and the worker loop every node runs. `swarm init`, `join` and
//! `leave` start and stop these; an agent restart resumes them from the state dir.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};
use axum::{
    body::Bytes,
    extract::{Path as UrlPath, State},
    routing::post,
    Extension, Json, Router,
};
use serde::{Deserialize, Serialize};
use shoal_dataplane::{netns::Netns, overlay::OverlayConfig, task::TaskRuntime};
use shoal_dns::DnsStats;
use tokio::{sync::watch, task::JoinHandle};

use super::{
    ipam::{allocate_subnet, host_claims, HostClaim, Subnet},
    manager::Manager,
    networking::{DnsLookup, NodeNetworks},
    orchestrator::Settings,
    pki::{
        ca_digest, new_key_and_csr, pem_der, random_id, JoinToken, NodeIdentity, Role, RootCa,
        CA_MISMATCH, TOKEN_HINT,
    },
    protocol::{
        ClusterRequest, ClusterResponse, ControlRequest, ControlResponse, Envelope, JoinRequest,
        LogsRequest, TaskLog,
    },
    raft::{self, Member},
    state::{Availability, ClusterSettings, Command, Network, Node, NodeStatus, FIRST_VNI},
    transport::{self, ClusterClient, Peer},
    worker::Worker,
};
use shoal_api::{
    now, ApiError, ErrorKind, InitRequest, InitResponse, JoinArgs, JoinedResponse, Kind as _,
    SwarmInfo, NOT_A_MANAGER, NOT_IN_SWARM,
};

use crate::{config::NodeConfig, failure::Failure};

/// What a node keeps about its membership (in `<state_dir>/cluster/node.json`, mode 0600).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Membership {
    cluster_id: String,
    identity: NodeIdentity,
    raft_id: u64,
    manager: bool,
    /// Where this node's manager API listens, as others reach it.
    advertise: SocketAddr,
    managers: Vec<String>,
    /// `--data-path-addr` of init or join; the agent's setting otherwise.
    #[serde(default)]
    data_path_addr: Option<Ipv4Addr>,
}

/// See `ClusterRuntime::parts`.
pub struct NodeParts {
    pub node_id: String,
    pub manager: Option<Arc<Manager>>,
    pub worker: Arc<Worker>,
    /// The node's server, heartbeat and role loops are all still running.
    pub loops_alive: bool,
}

struct Running {
    membership: Membership,
    client: ClusterClient,
    shared: Arc<NodeShared>,
    manager: Option<ManagerPart>,
    worker: Arc<Worker>,
    shutdown: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
}

/// What the node's server on the manager port serves from.
struct NodeShared {
    /// Present while this node is a manager: /cluster and /raft are served only then.
    manager: std::sync::RwLock<Option<Arc<Manager>>>,
    worker: Arc<Worker>,
}

/// What a node runs only while it is a manager.
struct ManagerPart {
    manager: Arc<Manager>,
    shutdown: watch::Sender<bool>,
    loops: Vec<JoinHandle<()>>,
}

impl Running {
    fn manager(&self) -> Option<Arc<Manager>> {
        self.manager.as_ref().map(|part| part.manager.clone())
    }
}

pub struct ClusterRuntime {
    config: NodeConfig,
    dir: PathBuf,
    settings: Settings,
    running: tokio::sync::RwLock<Option<Running>>,
}

/// How long a manager's `swarm join` waits for it to become a Raft voter (the leader adds
/// it in the background, catch-up included).
const JOIN_VOTER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `swarm leave` tries to tell the managers before it leaves anyway.
const LEAVE_NOTICE_TIMEOUT: Duration = Duration::from_secs(10);

impl ClusterRuntime {
    pub fn new(config: NodeConfig, settings: Settings) -> Self {
        let dir = config.state_dir.join("cluster");
        Self {
            config,
            dir,
            settings,
            running: tokio::sync::RwLock::new(None),
        }
    }

    fn membership_path(&self) -> PathBuf {
        self.dir.join("node.json")
    }

    /// Rejoins the swarm this node was part of before the agent restarted.
    pub async fn resume(self: &Arc<Self>) -> Result<()> {
        let path = self.membership_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        let membership: Membership =
            serde_json::from_str(&text).with_context(|| format!("corrupt {}", path.display()))?;
        tracing::info!(node = %membership.identity.node_id, manager = membership.manager, "resuming swarm membership");
        let running = self.launch(membership).await?;
        *self.running.write().await = Some(running);
        Ok(())
    }

    fn advertise(&self, requested: Option<&str>) -> Result<SocketAddr> {
        let default = SocketAddr::new(self.config.advertise_addr, self.config.manager_port);
        let Some(text) = requested else {
            return Ok(default);
        };
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(addr);
        }
        let ip: IpAddr = text
            .parse()
            .with_context(|| format!("--advertise-addr {text:?}: expected IP or IP:PORT"))
            .kind(ErrorKind::Invalid)?;
        Ok(SocketAddr::new(ip, self.config.manager_port))
    }

    pub async fn init(self: &Arc<Self>, request: InitRequest) -> Result<InitResponse> {
        if request.force_new_cluster {
            return self.force_new_cluster().await;
        }
        let mut running = self.running.write().await;
        if running.is_some() {
            bail!(ApiError::conflict(
                "this node is already part of a swarm: use `shoal swarm leave` to leave it first"
            ));
        }
        let advertise = self.advertise(request.advertise_addr.as_deref())?;
        let defaults = ClusterSettings::default();
        let settings = ClusterSettings {
            default_pool: request.default_addr_pool.unwrap_or(defaults.default_pool),
            pool_prefix: request
                .default_addr_pool_mask_length
                .unwrap_or(defaults.pool_prefix),
            data_path_port: request.data_path_port.unwrap_or(self.config.data_path_port),
        };
        if settings.data_path_port == 0 {
            bail!(ApiError::invalid("--data-path-port must not be 0"));
        }
        let claims = tokio::task::spawn_blocking(host_claims)
            .await?
            .context("reading this node's addresses and routes")?;
        if let Some(pool) = request.default_addr_pool {
            check_pool_clear(pool, &claims)?;
        }
        // The routing-mesh network takes the pool's first subnet clear of this node's
        // addresses and routes, as Swarm's ingress takes the first.
        let used: Vec<Subnet> = claims.iter().map(|c| c.subnet).collect();
        let ingress_subnet = allocate_subnet(settings.default_pool, settings.pool_prefix, &used)?;
        let ingress = Network {
            id: random_id(25),
            name: "ingress".to_owned(),
            subnet: ingress_subnet,
            gateway: ingress_subnet.first_host(),
            vni: FIRST_VNI,
            attachable: false,
            internal: false,
            mtu: None,
            ingress: true,
            created_at: now(),
        };
        let ca = RootCa::generate()?;
        let node_id = random_id(25);
        let membership = Membership {
            cluster_id: random_id(25),
            identity: ca.issue_identity(&node_id, advertise.ip())?,
            raft_id: 1,
            manager: true,
            advertise,
            managers: vec![advertise.to_string()],
            data_path_addr: request.data_path_addr,
        };
        let started = self.launch(membership.clone()).await?;
        let manager = started.manager().expect("init makes a manager");
        let result = async {
            let members = BTreeMap::from([(
                1,
                Member {
                    addr: advertise.to_string(),
                    node_id: node_id.clone(),
                },
            )]);
            manager
                .raft
                .initialize(members)
                .await
                .map_err(|e| anyhow!("initializing Raft: {e}"))?;
            manager
                .raft
                .wait(Some(Duration::from_secs(10)))
                .current_leader(1, "becoming leader")
                .await
                .map_err(|e| anyhow!("no leader after init: {e}"))?;
            let at = now();
            manager
                .write(Command::Init {
                    cluster_id: membership.cluster_id.clone(),
                    ca: ca.clone(),
                    worker_secret: random_id(25),
                    manager_secret: random_id(25),
                    first: Node {
                        id: node_id.clone(),
                        raft_id: 1,
                        hostname: self.config.hostname.clone(),
                        addr: advertise.ip(),
                        port: advertise.port(),
                        role: Role::Manager,
                        availability: Availability::Active,
                        status: NodeStatus::Ready,
                        labels: BTreeMap::new(),
                        created_at: at,
                        status_since: at,
                        ingress_address: None,
                        gossip_port: self.config.gossip_port,
                        exposed_metrics_port: self.config.exposed_metrics_port,
                        left: false,
                        resources: self.config.node_resources,
                        platform: super::state::Platform::local(),
                    },
                    settings,
                    ingress,
                })
                .await?;
            self.save(&membership)?;
            manager.state().token(Role::Worker)
        }
        .await;
        match result {
            Ok(token) => {
                *running = Some(started);
                tracing::info!(node = %node_id, "swarm initialized");
                Ok(InitResponse {
                    node_id,
                    worker_token: token.to_string(),
                    advertise,
                })
            }
            Err(err) => {
                stop(started).await;
                let _ = std::fs::remove_dir_all(&self.dir);
                Err(err)
            }
        }
    }

    /// Keeps this manager's applied state, drops the Raft log and membership, and starts a
    /// one-manager Raft from that state. Only the manager part restarts: the node's tasks keep
    /// running. The other managers are left out of Raft (shown Unavailable) until they are
    /// demoted/removed or leave and join again.
    async fn force_new_cluster(&self) -> Result<InitResponse> {
        let mut running = self.running.write().await;
        let current = running
            .as_mut()
            .ok_or_else(|| ApiError::unavailable(NOT_IN_SWARM))?;
        let Some(part) = current.manager.take() else {
            bail!(ApiError::conflict(
                "--force-new-cluster needs a manager's state: this node is a worker"
            ));
        };
        let state = part.manager.state();
        *current.shared.manager.write().expect("manager slot") = None;
        stop_manager(part).await;
        // The state goes to disk before the log is touched, so a failure below loses nothing.
        let stamp = now();
        let saved = self
            .dir
            .join(format!("state-before-force-new-cluster-{stamp}.json"));
        std::fs::write(&saved, serde_json::to_vec(&state)?)
            .with_context(|| format!("saving {}", saved.display()))?;
        let raft_file = self.dir.join("raft.redb");
        let aside = self
            .dir
            .join(format!("raft.redb.before-force-new-cluster-{stamp}"));
        std::fs::rename(&raft_file, &aside)
            .with_context(|| format!("moving {} aside", raft_file.display()))?;
        let membership = current.membership.clone();
        let part = self
            .start_manager_retrying(&membership, &current.client, &current.shared)
            .await?;
        let manager = part.manager.clone();
        current.manager = Some(part);
        manager
            .raft
            .initialize(BTreeMap::from([(
                membership.raft_id,
                Member {
                    addr: membership.advertise.to_string(),
                    node_id: membership.identity.node_id.clone(),
                },
            )]))
            .await
            .map_err(|e| anyhow!("initializing Raft: {e}"))?;
        manager
            .raft
            .wait(Some(Duration::from_secs(10)))
            .current_leader(membership.raft_id, "becoming leader")
            .await
            .map_err(|e| anyhow!("no leader after --force-new-cluster: {e}"))?;
        manager.write(Command::Restore(Box::new(state))).await?;
        let token = manager.state().token(Role::Worker)?;
        tracing::warn!("swarm rebuilt from this manager's state (--force-new-cluster)");
        Ok(InitResponse {
            node_id: membership.identity.node_id,
            worker_token: token.to_string(),
            advertise: membership.advertise,
        })
    }

    /// `start_manager` once the previous Raft has let go of the redb file (its lock goes
    /// with the last handle, shortly after shutdown).
    async fn start_manager_retrying(
        &self,
        membership: &Membership,
        client: &ClusterClient,
        shared: &NodeShared,
    ) -> Result<ManagerPart> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match self.start_manager(membership, client, shared).await {
                Ok(part) => return Ok(part),
                Err(err) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %format!("{err:#}"), "waiting for the old Raft to close");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(err) => return Err(err),
            }
        }
    }

    pub async fn join(self: &Arc<Self>, args: JoinArgs) -> Result<JoinedResponse> {
        let mut running = self.running.write().await;
        if running.is_some() {
            bail!(ApiError::conflict(
                "this node is already part of a swarm: use `shoal swarm leave` to leave it first"
            ));
        }
        let token = JoinToken::parse(&args.token).kind(ErrorKind::Invalid)?;
        let remote: SocketAddr = args
            .remote
            .parse()
            .or_else(|_| {
                args.remote
                    .parse::<IpAddr>()
                    .map(|ip| SocketAddr::new(ip, 2377))
            })
            .with_context(|| format!("manager address {:?}: expected IP[:PORT]", args.remote))
            .kind(ErrorKind::Invalid)?;
        let advertise = self.advertise(args.advertise_addr.as_deref())?;
        let (key_pem, csr_pem) = new_key_and_csr()?;
        let client = ClusterClient::new(transport::joining_client_config(&token.ca_digest)?);
        let envelope = Envelope {
            forwarded: false,
            origin: None,
            request: ClusterRequest::Join(JoinRequest {
                secret: token.secret.clone(),
                csr_pem,
                hostname: self.config.hostname.clone(),
                addr: advertise.ip(),
                port: advertise.port(),
                gossip_port: self.config.gossip_port,
                exposed_metrics_port: self.config.exposed_metrics_port,
                resources: self.config.node_resources,
                platform: super::state::Platform::local(),
            }),
        };
        let answer = client
            .post(
                &remote.to_string(),
                "/cluster",
                &envelope,
                Duration::from_secs(15),
            )
            .await
            .map_err(|err| {
                // The TLS layer wraps the pinned CA's refusal in words of its own.
                if format!("{err:#}").contains(CA_MISMATCH) {
                    ApiError::forbidden(format!("{CA_MISMATCH} ({remote}); {TOKEN_HINT}")).into()
                } else {
                    err.context(format!("joining the swarm through {remote}"))
                }
            })?;
        let ClusterResponse::Joined(joined) = answer else {
            bail!("{remote} answered the join oddly");
        };
        if ca_digest(&pem_der(&joined.ca_pem)?) != token.ca_digest {
            bail!(ApiError::forbidden(format!(
                "{CA_MISMATCH} ({remote}); {TOKEN_HINT}"
            )));
        }
        let membership = Membership {
            cluster_id: joined.cluster_id,
            identity: NodeIdentity {
                node_id: joined.node_id.clone(),
                cert_pem: joined.cert_pem,
                key_pem,
                ca_pem: joined.ca_pem,
            },
            raft_id: joined.raft_id,
            manager: joined.role == Role::Manager,
            advertise,
            managers: joined.managers,
            data_path_addr: args.data_path_addr,
        };
        self.save(&membership)?;
        let started = self.launch(membership).await?;
        let manager = started.manager();
        *running = Some(started);
        // Raft and heartbeats run without this lock; other calls of the CLI need it.
        drop(running);
        tracing::info!(node = %joined.node_id, role = %joined.role, "joined the swarm");
        if let Some(manager) = manager {
            // As in Swarm, a manager's join returns once it is a member the quorum counts.
            manager
                .wait_until_voter(JOIN_VOTER_TIMEOUT)
                .await
                .map_err(|err| {
                    anyhow!(
                        "joined the swarm as manager {}, but {err:#}. It stays in the swarm and \
                         the leader keeps adding it: `shoal node ls` on a manager shows it \
                         Reachable once it votes; until then see the leader's agent log",
                        joined.node_id
                    )
                })?;
            tracing::info!("this manager is a Raft voter");
        }
        Ok(JoinedResponse {
            node_id: joined.node_id,
            role: joined.role,
        })
    }

    /// Leaves the swarm: tells the managers, stops this node's tasks and the cluster loops,
    /// and forgets the membership. A manager needs `force` (it may cost the swarm its quorum).
    pub async fn leave(&self, force: bool) -> Result<()> {
        let mut running = self.running.write().await;
        let Some(current) = running.as_ref() else {
            bail!(ApiError::unavailable(NOT_IN_SWARM))
        };
        if current.membership.manager && !force {
            bail!(ApiError::conflict(
                "this node is a manager: leaving may cost the swarm its quorum. Demote it first \
                 (`shoal node demote`), or use --force to leave anyway"
            ));
        }
        // Said before the tasks stop, so that their replacements go to other nodes.
        announce_leave(current).await;
        let current = running.take().expect("checked");
        current.worker.stop_all().await;
        let networks = current.worker.networks().clone();
        stop(current).await;
        networks.remove_all().await?;
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))?;
        tracing::info!("left the swarm");
        Ok(())
    }

    fn save(&self, membership: &Membership) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join("node.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(membership)?)?;
        std::fs::rename(&tmp, self.membership_path())?;
        Ok(())
    }

    async fn launch(self: &Arc<Self>, membership: Membership) -> Result<Running> {
        std::fs::create_dir_all(&self.dir)?;
        let client = ClusterClient::new(transport::member_client_config(&membership.identity)?);
        let runtime = TaskRuntime::new(
            &self.config.cgroup_root,
            &self.config.state_dir,
            std::env::current_exe()?,
        )?
        .with_masked_paths(self.config.hidden_paths.clone());
        super::resources::set_reported(self.config.node_resources);
        let (roles, mut role_changes) = tokio::sync::mpsc::unbounded_channel();
        let role = if membership.manager {
            Role::Manager
        } else {
            Role::Worker
        };
        let networks = Arc::new(NodeNetworks::start(
            &membership.identity.node_id,
            OverlayConfig {
                netns_prefix: self.config.netns_prefix.clone(),
                node_netns: Netns::Current,
                data_addr: membership
                    .data_path_addr
                    .unwrap_or(self.config.data_path_addr),
                gateway_subnet: self.config.gateway_subnet,
            },
            SocketAddr::new(membership.advertise.ip(), self.config.gossip_port),
            &self.config.bpffs_root,
            (
                self.config.advertise_interface.as_str(),
                self.config.mesh_limits,
            ),
            // Configured resolvers are fixed; the node's own are followed as they change.
            (
                self.config.dns_resolvers(),
                self.config.dns_upstreams.is_none(),
            ),
        )?);
        let worker = Arc::new(Worker::new(
            runtime,
            networks,
            client.clone(),
            membership.managers.clone(),
            role,
            roles,
        )?);
        let shared = Arc::new(NodeShared {
            manager: std::sync::RwLock::new(None),
            worker: worker.clone(),
        });
        // Every node serves the manager port: task logs to managers, and while it is a
        // manager, cluster requests and Raft.
        let any = if membership.advertise.is_ipv4() {
            IpAddr::from([0, 0, 0, 0])
        } else {
            IpAddr::from([0u16; 8])
        };
        let listen = SocketAddr::new(any, membership.advertise.port());
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen} (manager port)"))?;
        let tls = transport::server_config(&membership.identity)?;
        let manager = if membership.manager {
            Some(self.start_manager(&membership, &client, &shared).await?)
        } else {
            None
        };
        let (shutdown, watch_shutdown) = watch::channel(false);
        let this = Arc::downgrade(self);
        let loops = vec![
            tokio::spawn(transport::serve(listener, tls, node_router(shared.clone()))),
            tokio::spawn(worker.clone().run(watch_shutdown)),
            // Promotion and demotion reach a node through its heartbeats.
            tokio::spawn(async move {
                while let Some(role) = role_changes.recv().await {
                    let Some(runtime) = this.upgrade() else {
                        return;
                    };
                    if let Err(err) = runtime.apply_role(role).await {
                        tracing::error!(%role, error = %format!("{err:#}"), "changing role failed");
                    }
                }
            }),
        ];
        Ok(Running {
            membership,
            client,
            shared,
            manager,
            worker,
            shutdown,
            loops,
        })
    }

    /// Raft member and leader loop, published to the node's server.
    async fn start_manager(
        &self,
        membership: &Membership,
        client: &ClusterClient,
        shared: &NodeShared,
    ) -> Result<ManagerPart> {
        let (raft, sm) = raft::start(
            membership.raft_id,
            &self.dir.join("raft.redb"),
            Arc::new(RaftTransport(client.clone())),
        )
        .await?;
        let manager = Arc::new(Manager::new(
            raft,
            sm,
            membership.raft_id,
            membership.identity.node_id.clone(),
            client.clone(),
            self.settings,
        ));
        let (shutdown, watch_shutdown) = watch::channel(false);
        let loops = vec![tokio::spawn(
            manager.clone().run_leader_loop(watch_shutdown),
        )];
        *shared.manager.write().expect("manager slot") = Some(manager.clone());
        Ok(ManagerPart {
            manager,
            shutdown,
            loops,
        })
    }

    /// Starts or stops this node's manager part after a promotion or demotion.
    async fn apply_role(&self, role: Role) -> Result<()> {
        let mut running = self.running.write().await;
        let Some(current) = running.as_mut() else {
            return Ok(());
        };
        match (role, current.manager.is_some()) {
            (Role::Manager, false) => {
                current.manager = Some(
                    self.start_manager(&current.membership, &current.client, &current.shared)
                        .await?,
                );
                tracing::info!("promoted: now a manager");
            }
            (Role::Worker, true) => {
                *current.shared.manager.write().expect("manager slot") = None;
                if let Some(part) = current.manager.take() {
                    stop_manager(part).await;
                }
                // A later promotion starts from an empty log.
                let raft_file = self.dir.join("raft.redb");
                std::fs::remove_file(&raft_file)
                    .with_context(|| format!("removing {}", raft_file.display()))?;
                tracing::info!("demoted: now a worker");
            }
            _ => return Ok(()),
        }
        current.membership.manager = role == Role::Manager;
        self.save(&current.membership)
    }

    pub async fn info(&self) -> Option<SwarmInfo> {
        let running = self.running.read().await;
        let running = running.as_ref()?;
        let m = &running.membership;
        Some(SwarmInfo {
            node_id: m.identity.node_id.clone(),
            cluster_id: m.cluster_id.clone(),
            manager: running.manager.is_some(),
            advertise: m.advertise,
            managers: running
                .manager()
                .map(|mgr| mgr.state().managers().map(|n| n.endpoint()).collect())
                .unwrap_or_else(|| m.managers.clone()),
            leader: running.manager().map(|mgr| mgr.is_leader()),
        })
    }

    /// The running parts of this node's membership, for metrics and health checks; None
    /// outside a swarm.
    pub async fn parts(&self) -> Option<NodeParts> {
        let running = self.running.read().await;
        let running = running.as_ref()?;
        Some(NodeParts {
            node_id: running.membership.identity.node_id.clone(),
            manager: running.manager(),
            worker: running.worker.clone(),
            loops_alive: running.loops.iter().all(|l| !l.is_finished()),
        })
    }

    /// A control request from this node's CLI.
    pub async fn control(&self, request: ControlRequest) -> Result<ControlResponse> {
        let running = self.running.read().await;
        let running = running
            .as_ref()
            .ok_or_else(|| ApiError::unavailable(NOT_IN_SWARM))?;
        let Some(manager) = running.manager() else {
            bail!(ApiError::unavailable(NOT_A_MANAGER));
        };
        manager.local(request).await
    }

    /// The host PID of a local task's PID 1, by task ID or unique ID prefix.
    pub async fn task_pid(&self, task: &str) -> Result<u32> {
        let running = self.running.read().await;
        let running = running
            .as_ref()
            .ok_or_else(|| ApiError::unavailable(NOT_IN_SWARM))?;
        let id = running.worker.resolve_local(task)?;
        running.worker.runtime().init_pid(&id)
    }

    /// `shoal dns lookup`: what a local task (ID, prefix or name) would get for `name`.
    pub async fn dns_lookup(&self, task: &str, name: &str) -> Result<DnsLookup> {
        let running = self.running.read().await;
        let running = running
            .as_ref()
            .ok_or_else(|| ApiError::unavailable(NOT_IN_SWARM))?;
        let id = running.worker.resolve_local(task)?;
        running.worker.networks().dns_lookup(&id, name)
    }

    /// The embedded DNS's counters by outcome on this node (see `NodeNetworks::dns_stats`).
    pub async fn dns_stats(&self) -> Result<DnsStats> {
        Ok(self.networks().await?.dns_stats())
    }

    /// This node's overlay networking, while it is in a swarm.
    pub async fn networks(&self) -> Result<Arc<NodeNetworks>> {
        let running = self.running.read().await;
        let running = running
            .as_ref()
            .ok_or_else(|| ApiError::unavailable(NOT_IN_SWARM))?;
        Ok(running.worker.networks().clone())
    }

    /// Agent shutdown: loops stop; tasks keep running until the next agent takes over.
    pub async fn shutdown(&self) {
        if let Some(running) = self.running.write().await.take() {
            stop(running).await;
        }
    }
}

/// Tells the managers this node is leaving: they place nothing on it any more and replace
/// its tasks elsewhere at once. Best effort: a node that cannot tell them leaves anyway and
/// is marked Down once its heartbeats stop, as after a crash.
async fn announce_leave(current: &Running) {
    let managers = match current.manager() {
        Some(manager) => manager.state().managers().map(|n| n.endpoint()).collect(),
        // The heartbeats' latest list: the one saved at join may be long gone.
        None => current.worker.managers(),
    };
    let notice = tell_managers_leaving(&current.client, &managers);
    let failure = match tokio::time::timeout(LEAVE_NOTICE_TIMEOUT, notice).await {
        Ok(Ok(())) => return,
        Ok(Err(err)) => format!("{err:#}"),
        Err(_) => format!("no answer within {} s", LEAVE_NOTICE_TIMEOUT.as_secs()),
    };
    tracing::warn!(
        error = %failure,
        "could not tell the managers this node leaves: they mark it Down when its heartbeats \
         stop and move its tasks after their reschedule grace"
    );
}

async fn tell_managers_leaving(client: &ClusterClient, managers: &[String]) -> Result<()> {
    let envelope = Envelope {
        forwarded: false,
        origin: None,
        request: ClusterRequest::Leave,
    };
    let mut last_error = anyhow!("no managers known");
    for manager in managers {
        match client
            .post::<_, ClusterResponse>(manager, "/cluster", &envelope, Duration::from_secs(5))
            .await
        {
            Ok(ClusterResponse::Left) => return Ok(()),
            Ok(_) => last_error = anyhow!("{manager} answered the leave oddly"),
            Err(err) => last_error = err.context(format!("manager {manager}")),
        }
    }
    Err(last_error)
}

async fn stop(running: Running) {
    let _ = running.shutdown.send(true);
    *running.shared.manager.write().expect("manager slot") = None;
    if let Some(part) = running.manager {
        stop_manager(part).await;
    }
    for handle in running.loops {
        handle.abort();
    }
}

async fn stop_manager(part: ManagerPart) {
    let _ = part.shutdown.send(true);
    if let Err(err) = part.manager.raft.shutdown().await {
        tracing::warn!(error = %err, "raft shutdown");
    }
    for handle in part.loops {
        handle.abort();
    }
}

/// An explicit `--default-addr-pool` must not take this node's own networks (its addresses
/// and connected routes); the default pool is only allocated around them instead.
fn check_pool_clear(pool: Subnet, claims: &[HostClaim]) -> Result<()> {
    if let Some(claim) = claims
        .iter()
        .find(|c| c.connected && c.subnet.overlaps(pool))
    {
        bail!(ApiError::conflict(format!(
            "--default-addr-pool {pool} overlaps {claim} of this node: overlay tasks could not \
             reach those addresses; choose a pool clear of the node's networks (`ip -4 addr`, \
             `ip -4 route` list them)"
        )));
    }
    Ok(())
}

/// Raft RPCs over the cluster transport.
struct RaftTransport(ClusterClient);

impl raft::Transport for RaftTransport {
    async fn post(&self, addr: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>, String> {
        self.0
            .post_raw(addr, path, body, Duration::from_secs(3))
            .await
            .map_err(|e| format!("{e:#}"))
    }
}

fn node_router(shared: Arc<NodeShared>) -> Router {
    Router::new()
        .route("/cluster", post(cluster_call))
        // Snapshot chunks and large entries exceed axum's 2 MB default.
        .route(
            "/raft/{rpc}",
            post(raft_call).layer(axum::extract::DefaultBodyLimit::max(RAFT_BODY_LIMIT)),
        )
        .route("/node/logs", post(logs_call))
        .with_state(shared)
}

/// Largest Raft message accepted (a snapshot chunk or a batch of entries, as JSON).
const RAFT_BODY_LIMIT: usize = 64 << 20;

fn manager_of(shared: &NodeShared) -> Result<Arc<Manager>, Failure> {
    shared
        .manager
        .read()
        .expect("manager slot")
        .clone()
        .ok_or_else(|| ApiError::unavailable("this node is not a manager").into())
}

async fn cluster_call(
    State(shared): State<Arc<NodeShared>>,
    Extension(peer): Extension<Peer>,
    Json(envelope): Json<Envelope>,
) -> Result<Json<ClusterResponse>, Failure> {
    Ok(Json(manager_of(&shared)?.dispatch(&peer, envelope).await?))
}

async fn raft_call(
    State(shared): State<Arc<NodeShared>>,
    Extension(peer): Extension<Peer>,
    UrlPath(rpc): UrlPath<String>,
    body: Bytes,
) -> Result<Vec<u8>, Failure> {
    let manager = manager_of(&shared)?;
    let caller = peer.require()?;
    // Only Raft members may talk Raft; a manager not yet given a membership listens to the
    // managers its own heartbeats named.
    let membership = manager.raft.metrics().borrow().membership_config.clone();
    let known = membership
        .membership()
        .nodes()
        .any(|(_, m)| m.node_id == caller);
    let fresh = membership.membership().nodes().next().is_none();
    let allowed = known || (fresh && shared.worker.is_manager(caller));
    if !allowed {
        return Err(ApiError::forbidden(format!("node {caller} is not a Raft member")).into());
    }
    raft::handle_rpc(&manager.raft, &format!("/raft/{rpc}"), &body)
        .await
        .map_err(|err| ApiError::invalid(err).into())
}

async fn logs_call(
    State(shared): State<Arc<NodeShared>>,
    Extension(peer): Extension<Peer>,
    Json(request): Json<LogsRequest>,
) -> Result<Json<Vec<TaskLog>>, Failure> {
    let caller = peer.require()?;
    shared
        .worker
        .task_logs(caller, &request)
        .map(Json)
        .map_err(|err| ApiError::forbidden(format!("{err:#}")).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_pool_must_not_take_the_nodes_own_networks() {
        let claim = |subnet: &str, connected| HostClaim {
            subnet: subnet.parse().unwrap(),
            connected,
            source: "address 192.168.77.11/24 on eth0".into(),
        };
        let claims = [claim("192.168.77.0/24", true), claim("10.5.0.0/16", false)];
        let err = check_pool_clear("192.168.0.0/16".parse().unwrap(), &claims).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "--default-addr-pool 192.168.0.0/16 overlaps 192.168.77.0/24 (address \
                 192.168.77.11/24 on eth0) of this node: "
            ),
            "{err}"
        );
        // A network behind a gateway is allocated around, not refused.
        check_pool_clear("10.0.0.0/8".parse().unwrap(), &claims).unwrap();
    }
}
