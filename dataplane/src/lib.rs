//! shoal's dataplane in user space: loads the kernel programs built from `ebpf/`, keeps their
//! maps pinned under the bpffs root so they outlive the agent, and attaches the ingress
//! classifier to the advertise interface through a pinned TCX link.
//!
//! Restart semantics: maps are reused from their pins (counters and, later, conntrack survive)
//! and a pinned link is updated in place to the newly loaded program, so the interface is never
//! without a program while the agent restarts.

mod bpf_syscall;
pub mod confinement;
pub mod limits;
pub mod maglev;
pub mod mesh;
pub mod neighbours;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod overlay;
pub mod overlay_endpoints;
pub mod peerdb;
pub mod probe;
pub mod process;
pub mod socket_lb;
mod status;
pub mod task;
mod task_devices;
pub mod task_exec;
pub mod task_hooks;
pub mod vip_echo;
pub mod vxlan_peers;

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::Array,
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    sys::SyscallError,
    Ebpf, EbpfLoader,
};
use shoal_common::{names, IngressSettings, Verdict, MAPS_ABI_VERSION};

pub use status::{AttachStatus, CounterStatus, DataplaneStatus, MapStatus};

/// The kernel object built by build.rs from the `shoal-ebpf` crate.
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shoal-ebpf"));

/// Where and how to run the dataplane on this node.
#[derive(Clone, Debug)]
pub struct DataplaneConfig {
    /// Directory on a bpffs mount owned by this agent (e.g. /sys/fs/bpf/shoal).
    pub bpffs_root: PathBuf,
    /// Interface whose ingress the classifier watches (the advertise interface).
    pub interface: String,
    pub settings: IngressSettings,
    /// The cgroup every task lives under: the socket load balancer attaches there.
    pub task_cgroup: PathBuf,
    /// The cgroup of the node's own processes (the cgroup2 root): the mesh's connect
    /// program attaches there so they reach published ports too.
    pub node_cgroup: PathBuf,
    pub mesh: mesh::MeshLimits,
}

impl DataplaneConfig {
    pub fn maps_dir(&self) -> PathBuf {
        maps_dir(&self.bpffs_root)
    }

    fn links_dir(&self) -> PathBuf {
        self.bpffs_root.join("links")
    }

    fn ingress_link_pin(&self) -> PathBuf {
        self.links_dir().join(format!("ingress-{}", self.interface))
    }
}

/// Where an agent with pins under `bpffs_root` keeps its maps.
pub fn maps_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join(format!("maps-v{MAPS_ABI_VERSION}"))
}

/// The loaded programs and maps of one agent.
pub struct Dataplane {
    config: DataplaneConfig,
    ebpf: Ebpf,
    /// True when this start replaced the program of a link a previous agent left pinned.
    replaced_link: bool,
    /// Map directories of other layouts (`maps-v<N>`) this start found and removed: an
    /// upgrade across a maps ABI change, whose tracked flows are lost.
    old_map_layouts: Vec<String>,
}

impl Dataplane {
    /// Loads the programs (reusing pinned maps), writes the settings and attaches the ingress
    /// classifier, replacing in place any program a previous agent left attached.
    pub fn start(config: DataplaneConfig) -> Result<Self> {
        ensure_bpffs(&config.bpffs_root)?;
        for dir in [config.maps_dir(), config.links_dir()] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        config.mesh.validate()?;
        remove_resized_mesh_maps(&config.maps_dir(), &config.mesh)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(config.maps_dir())
            .map_max_entries(names::MESH_MAGLEV, config.mesh.slots())
            .map_max_entries(names::MESH_COUNTERS, config.mesh.max_services)
            .load(EBPF_OBJECT)
            .context("loading shoal's eBPF object")?;

        let mut settings: Array<_, IngressSettings> = Array::try_from(
            ebpf.map_mut(names::INGRESS_SETTINGS)
                .context("settings map missing from the eBPF object")?,
        )?;
        // The mesh's endpoints stay as the previous agent left them until this one has its
        // own, so published ports keep answering across a restart.
        let previous = settings.get(&0, 0).unwrap_or_default();
        let written = IngressSettings {
            advertise_ifindex: nix::net::if_::if_nametoindex(config.interface.as_str())
                .with_context(|| format!("no interface {}", config.interface))?,
            ingress_ip: previous.ingress_ip,
            ingress_ifindex: previous.ingress_ifindex,
            table_size: config.mesh.table_size,
            netns_cookie: netns_cookie()?,
            ..config.settings
        };
        // Rewritten only when changed: a packet on another CPU could read a half-written entry.
        if written != previous {
            settings
                .set(0, written, 0)
                .context("writing ingress settings")?;
        }

        let program: &mut SchedClassifier = ebpf
            .program_mut(names::INGRESS_PROGRAM)
            .context("ingress program missing from the eBPF object")?
            .try_into()?;
        program
            .load()
            .context("loading the ingress classifier into the kernel (verifier)")?;
        let replaced_link = attach_pinned(
            program,
            None,
            (&config.interface, TcAttachType::Ingress),
            &config.ingress_link_pin(),
        )?;
        fs::create_dir_all(&config.task_cgroup)
            .with_context(|| format!("creating {}", config.task_cgroup.display()))?;
        socket_lb::attach(
            &mut ebpf,
            &config.task_cgroup,
            &config.node_cgroup,
            &config.links_dir(),
        )?;
        task_devices::attach(&mut ebpf, &config.task_cgroup, &config.links_dir())?;
        remove_stale_links(&config)?;
        let old_map_layouts = remove_old_map_versions(&config.bpffs_root)?;
        Ok(Dataplane {
            config,
            ebpf,
            replaced_link,
            old_map_layouts,
        })
    }

    pub fn config(&self) -> &DataplaneConfig {
        &self.config
    }

    /// Whether this start took over a link left attached by an earlier agent.
    pub fn replaced_link(&self) -> bool {
        self.replaced_link
    }

    /// The maps of other layouts this start removed (empty unless the maps ABI changed).
    pub fn old_map_layouts(&self) -> &[String] {
        &self.old_map_layouts
    }

    /// Programs, attach points, maps and counters, read from the kernel now.
    pub fn status(&self) -> Result<DataplaneStatus> {
        status::read(self)
    }

    /// Whether the kernel runs the ingress classifier on its interface (cheap: no map walk).
    pub fn ingress_attached(&self) -> Result<bool> {
        Ok(status::ingress_attach(self)?.attached)
    }

    /// Runs the loaded ingress classifier on one packet with BPF_PROG_TEST_RUN against the
    /// live maps: its return code, the packet as it left the program, and its verdict.
    pub fn test_run_ingress(&self, packet: &[u8]) -> Result<IngressRun> {
        let run = test_run(&self.ebpf, names::INGRESS_PROGRAM, packet)?;
        Ok(IngressRun {
            code: run.code,
            frame: run.frame,
            verdict: Verdict::from_index(run.cb0)
                .context("the ingress classifier left no verdict")?,
        })
    }
}

impl Dataplane {
    /// Runs the ingress classifier `repeat` times on `packet` against the live maps (each run
    /// sees what the previous one left): the last return code and the kernel's own mean time
    /// per run (for the decision-cost benchmark).
    pub fn time_ingress(&self, packet: &[u8], repeat: u32) -> Result<(u32, std::time::Duration)> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let program: &SchedClassifier = self
            .ebpf
            .program(names::INGRESS_PROGRAM)
            .context("ingress program missing")?
            .try_into()?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN on the ingress classifier")?;
        Ok((result.return_value, result.duration))
    }
}

/// What one run of the ingress classifier did to a packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressRun {
    /// The TC action (0 pass, 2 drop, 7 redirect).
    pub code: u32,
    /// The packet as it left the program.
    pub frame: Vec<u8>,
    pub verdict: Verdict,
}

/// What a test run of any classifier returned.
pub(crate) struct TestRunOutput {
    pub code: u32,
    pub frame: Vec<u8>,
    /// `cb[0]` of the packet's context afterwards.
    pub cb0: u32,
}

/// Runs the loaded classifier `name` of `ebpf` on one frame with BPF_PROG_TEST_RUN against
/// the live maps: its return code, the frame as it left the program, and `cb[0]`.
pub(crate) fn test_run(ebpf: &Ebpf, name: &str, frame: &[u8]) -> Result<TestRunOutput> {
    use aya::programs::{TestRun as _, TestRunOptions};
    /// `cb[0]` in `struct __sk_buff`, which is 192 bytes on the kernels shoal runs on.
    const SKB_CB0: usize = 48;
    let program: &SchedClassifier = ebpf
        .program(name)
        .with_context(|| format!("{name} missing"))?
        .try_into()?;
    let mut out = vec![0u8; frame.len() + 64];
    let mut context = [0u8; 256];
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_out: Some(&mut context),
            ..Default::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN on {name}"))?;
    out.truncate(result.data_size_out as usize);
    let cb0: [u8; 4] = context[SKB_CB0..SKB_CB0 + 4]
        .try_into()
        .expect("four bytes");
    Ok(TestRunOutput {
        code: result.return_value,
        frame: out,
        cb0: u32::from_ne_bytes(cb0),
    })
}

/// Attaches `program` to `interface` through the link pinned at `pin`: an existing pinned link
/// gets the new program atomically (bpf_link_update); otherwise a new TCX link is made (in
/// the namespace `netns` when given) and pinned. Returns whether an existing link was reused.
fn attach_pinned(
    program: &mut SchedClassifier,
    netns: Option<&fs::File>,
    (interface, direction): (&str, TcAttachType),
    pin: &Path,
) -> Result<bool> {
    match PinnedLink::from_pin(pin) {
        Ok(old) => {
            let link: SchedClassifierLink = FdLink::from(old).try_into()?;
            match program.attach_to_link(link) {
                Ok(_) => return Ok(true),
                // The interface the link was made for is gone (its link is defunct): start over.
                Err(err) => {
                    tracing::warn!(pin = %pin.display(), error = %err, "pinned link unusable; attaching anew");
                    fs::remove_file(pin).with_context(|| format!("removing {}", pin.display()))?;
                }
            }
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. }))
            if io_error.kind() == io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("opening pinned link {}", pin.display()))
        }
    }
    let link = attach_in(program, netns, interface, direction)?;
    link.pin(pin)
        .with_context(|| format!("pinning the link of {interface} at {}", pin.display()))?;
    Ok(false)
}

/// A TC program's link pinned in bpffs, so the program keeps running on its interface while
/// no agent does, and the next agent takes it over in place. Dropping it keeps the pin;
/// `release` removes it, which detaches the program.
#[derive(Debug)]
pub struct PinnedTcLink {
    pin: PathBuf,
}

impl PinnedTcLink {
    /// Attaches the loaded classifier `name` of `ebpf` through the link pinned at `pin`.
    pub(crate) fn attach(
        ebpf: &mut Ebpf,
        name: &str,
        netns: Option<&fs::File>,
        hook: (&str, TcAttachType),
        pin: PathBuf,
    ) -> Result<Self> {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .with_context(|| format!("{name} missing from the eBPF object"))?
            .try_into()?;
        attach_pinned(program, netns, hook, &pin)?;
        Ok(Self { pin })
    }

    /// Unpins the link, detaching its program (an interface that is gone took it already).
    pub fn release(self) -> Result<()> {
        unpin(&self.pin)
    }
}

fn unpin(pin: &Path) -> Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", pin.display())),
    }
}

/// Where an agent with pins under `bpffs_root` pins the links of its ingress endpoint, which
/// must outlive it like the ingress link. Agents before `task_hooks` pinned their tasks'
/// links here too (as `<task id>@<what>`: bpffs refuses dots in names).
pub fn task_links_dir(bpffs_root: &Path) -> PathBuf {
    bpffs_root.join("task-links")
}

/// Unpins the task links an earlier agent pinned (TCX, before `task_hooks`) for tasks `keep`
/// does not keep, detaching what is left of them. An adopted task gets its filters first, so
/// it is never without its programs; other pins (the ingress endpoint's) are kept.
pub fn release_task_links(links_dir: &Path, keep: &dyn Fn(&str) -> bool) -> Result<usize> {
    let entries = match fs::read_dir(links_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(err).with_context(|| format!("listing {}", links_dir.display())),
    };
    let mut released = 0;
    for entry in entries {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some((task, _)) = name.split_once('@') {
            if !keep(task) {
                unpin(&path)?;
                released += 1;
            }
        }
    }
    Ok(released)
}

/// Attaches a loaded classifier to `interface` through a new TCX link, inside the namespace
/// `netns` when given (interface names resolve in the caller's namespace, so the attach runs
/// on a thread that entered it). The link detaches when dropped unless pinned.
fn attach_in(
    program: &mut SchedClassifier,
    netns: Option<&fs::File>,
    interface: &str,
    direction: TcAttachType,
) -> Result<FdLink> {
    let mut attach = || -> Result<FdLink> {
        let id = program
            .attach_with_options(
                interface,
                direction,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .with_context(|| format!("attaching to {interface} ({direction:?})"))?;
        Ok(program.take_link(id)?.try_into()?)
    };
    match netns {
        Some(netns) => netns::run_in_file(netns, attach),
        None => attach(),
    }
}

/// Unpins links for interfaces this agent no longer watches (a changed advertise interface),
/// which detaches their programs.
fn remove_stale_links(config: &DataplaneConfig) -> Result<()> {
    let mut keep = socket_lb::link_pins(&config.links_dir());
    keep.push(task_devices::link_pin(&config.links_dir()));
    keep.push(config.ingress_link_pin());
    for entry in fs::read_dir(config.links_dir())? {
        let path = entry?.path();
        if !keep.contains(&path) {
            tracing::info!(pin = %path.display(), "detaching stale link");
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
    }
    Ok(())
}

/// Unpins the maps of earlier map layouts (`maps-v<N>` other than this one's): once the
/// programs that used them are replaced they only hold memory (the old Maglev rows alone are
/// megabytes). Flows tracked in them are balanced afresh by the new maps. Returns the
/// directories removed.
fn remove_old_map_versions(bpffs_root: &Path) -> Result<Vec<String>> {
    let current = maps_dir(bpffs_root);
    let mut removed = Vec::new();
    for entry in fs::read_dir(bpffs_root)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let versioned = name
            .strip_prefix("maps-v")
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()));
        if versioned && path != current {
            fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.push(name.to_owned());
        }
    }
    Ok(removed)
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14+).
fn netns_cookie() -> Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket =
        std::net::UdpSocket::bind("127.0.0.1:0").context("a socket to ask for the netns cookie")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}

/// Drops the pinned mesh maps when their size no longer matches the settings (the kernel
/// cannot resize a map); the flows they tracked are balanced afresh.
fn remove_resized_mesh_maps(maps_dir: &Path, limits: &mesh::MeshLimits) -> Result<()> {
    let maglev = maps_dir.join(names::MESH_MAGLEV);
    let Ok(info) = aya::maps::MapInfo::from_pin(&maglev) else {
        return Ok(());
    };
    if info.max_entries() == limits.slots() {
        return Ok(());
    }
    tracing::warn!(
        from = info.max_entries(),
        to = limits.slots(),
        "mesh limits changed: recreating the mesh maps"
    );
    for name in [
        names::MESH_MAGLEV,
        names::MESH_PORTS,
        names::MESH_COUNTERS,
        names::MESH_FLOWS,
        names::MESH_REPLIES,
    ] {
        match fs::remove_file(maps_dir.join(name)) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("removing the pin of {name}")),
        }
    }
    Ok(())
}

fn ensure_bpffs(root: &Path) -> Result<()> {
    let mount = root
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let fs_type = nix::sys::statfs::statfs(mount)
        .with_context(|| format!("statfs {}", mount.display()))?
        .filesystem_type();
    anyhow::ensure!(
        fs_type == nix::sys::statfs::BPF_FS_MAGIC,
        "{} is not on a bpffs mount (mount it with `mount -t bpf bpf /sys/fs/bpf`)",
        root.display()
    );
    Ok(())
}

/// Detaches everything an agent left pinned under `root` and removes the directory: links are
/// unpinned (detaching their programs) and maps dropped. Used by `shoal dataplane cleanup` and
/// the lab; the agent itself leaves its pins in place on shutdown.
pub fn remove_pins(root: &Path) -> Result<()> {
    match fs::remove_dir_all(root) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing pins under {}", root.display())),
    }
}
