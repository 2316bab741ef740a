//! `shoal agent`: the per-node daemon.

use std::{
    fs::{self, File},
    io::{Read as _, Seek as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use anyhow::{bail, Context as _, Result};
use nix::fcntl::{Flock, FlockArg};
use shoal_common::IngressSettings;
use shoal_dataplane::{Dataplane, DataplaneConfig};
use tokio::net::UnixListener;

use shoal_cluster::{node::ClusterRuntime, orchestrator::Settings};

use crate::{
    config::{AgentConfig, AgentSettings, SystemHost, DEFAULT_CONFIG},
    metrics,
    neighbours::{self, NeighbourWatch},
    server::{self, AgentState},
};

pub fn run(config_file: Option<PathBuf>, flags: AgentSettings) -> Result<()> {
    let file = match &config_file {
        Some(path) => AgentSettings::from_file(path, true)?,
        None => AgentSettings::from_file(Path::new(DEFAULT_CONFIG), false)?,
    };
    let config = AgentConfig::resolve(flags.over(file), &SystemHost)?;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log_level)?)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Everything the agent creates (state, socket) is for root only.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));

    fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    let _lock = StateLock::acquire(&config.state_dir)?;
    ensure_cgroup_root(&config.cgroup_root)?;

    let dataplane = Dataplane::start(DataplaneConfig {
        bpffs_root: config.bpffs_root.clone(),
        interface: config.advertise_interface.clone(),
        settings: IngressSettings {
            data_path_port: config.data_path_port,
            gossip_port: config.gossip_port,
            manager_port: config.manager_port,
            // Reachable from the node network only when not on loopback.
            metrics_port: config
                .metrics_addr
                .filter(|addr| !addr.ip().is_loopback())
                .map_or(0, |addr| addr.port()),
            advertise_ip: match config.advertise_addr {
                std::net::IpAddr::V4(ip) => u32::from_ne_bytes(ip.octets()),
                std::net::IpAddr::V6(_) => 0,
            },
            ..Default::default()
        },
        task_cgroup: config.cgroup_root.clone(),
        node_cgroup: shoal_dataplane::process::cgroup2_from_mountinfo(&fs::read_to_string(
            "/proc/self/mountinfo",
        )?)
        .context("no cgroup2 mount: the agent needs the unified cgroup hierarchy")?,
        mesh: config.mesh_limits(),
    })?;
    tracing::info!(
        interface = %config.advertise_interface,
        replaced_running_program = dataplane.replaced_link(),
        "ingress classifier attached"
    );
    if !dataplane.old_map_layouts().is_empty() {
        tracing::warn!(
            removed = ?dataplane.old_map_layouts(),
            now = shoal_common::MAPS_ABI_VERSION,
            "the eBPF maps changed layout with this upgrade: flows the routing mesh tracked \
             are balanced afresh (established connections through this node may reset), VXLAN \
             peers and published ports are rebuilt from gossip (docs/operations.md, Upgrades)"
        );
    }

    let state = Arc::new(AgentState {
        kernel: nix::sys::utsname::uname()?
            .release()
            .to_string_lossy()
            .into_owned(),
        started: Instant::now(),
        started_at: SystemTime::now(),
        dns_upstreams: config
            .dns_resolvers()
            .iter()
            .map(ToString::to_string)
            .collect(),
        dataplane: Mutex::new(dataplane),
        neighbours: NeighbourWatch::open(config.neighbour_table),
        cluster: Arc::new(ClusterRuntime::new(
            config.node_config(),
            Settings {
                down_grace_secs: config.reschedule_grace,
            },
        )),
        config,
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(state))
}

async fn serve(state: Arc<AgentState>) -> Result<()> {
    let socket = state.config.socket.clone();
    let listener = bind_api_socket(&socket)?;
    // Same permissions as the agent's socket: the Engine API drives the swarm as fully.
    let docker_socket = state.config.docker_socket.clone();
    if let Some(path) = &docker_socket {
        let docker = bind_api_socket(path)?;
        let app = crate::docker_api::router(state.clone());
        // Runs until the runtime ends with the agent.
        tokio::spawn(async move {
            if let Err(err) = axum::serve(docker, app).await {
                tracing::error!(error = %err, "the Docker API socket stopped serving");
            }
        });
    }
    let _metrics = metrics::start(&state).await?;
    // Runs until the runtime ends with the agent.
    tokio::spawn(neighbours::watch(state.clone()));
    state.cluster.resume().await?;
    tracing::info!(
        socket = %socket.display(),
        node = %state.config.hostname,
        advertise = %state.config.advertise_addr,
        "agent ready"
    );
    notify(&[sd_notify::NotifyState::Ready]);
    let result = axum::serve(listener, server::router(state.clone()))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    notify(&[sd_notify::NotifyState::Stopping]);
    state.cluster.shutdown().await;
    let _ = fs::remove_file(&socket);
    if let Some(path) = &docker_socket {
        let _ = fs::remove_file(path);
    }
    tracing::info!("agent stopped; the dataplane stays attached until the next start");
    result.context("serving the API")
}

fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(err) = sd_notify::notify(false, state) {
        tracing::warn!(error = %err, "sd_notify failed");
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

/// Binds the API socket, refusing when another agent serves it and replacing a stale file.
fn bind_api_socket(path: &Path) -> Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "another agent is already serving the API socket {}",
            path.display()
        );
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match fs::remove_file(path) {
        Ok(()) => tracing::info!(socket = %path.display(), "removed stale API socket"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", path.display())),
    }
    let listener = UnixListener::bind(path)
        .with_context(|| format!("binding API socket {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn ensure_cgroup_root(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating cgroup root {}", dir.display()))?;
    let fs_type = nix::sys::statfs::statfs(dir)?.filesystem_type();
    if fs_type != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        bail!("cgroup root {} is not on a cgroup v2 mount", dir.display());
    }
    Ok(())
}

/// An exclusive lock on the state dir, held for the agent's life; the file names its holder.
struct StateLock {
    _lock: Flock<File>,
}

impl StateLock {
    fn acquire(state_dir: &Path) -> Result<Self> {
        let path = state_dir.join("agent.lock");
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut lock = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                bail!(
                    "another shoal agent (pid {}) is already using the state dir {}",
                    holder.trim(),
                    state_dir.display()
                );
            }
            Err((_, errno)) => {
                return Err(errno).with_context(|| format!("locking {}", path.display()))
            }
        };
        lock.set_len(0)?;
        lock.rewind()?;
        writeln!(lock, "{}", std::process::id())?;
        Ok(StateLock { _lock: lock })
    }
}
