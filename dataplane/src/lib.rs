//! shoal's dataplane in user space: loads the kernel programs built from `ebpf/`, keeps their
//! maps pinned under the bpffs root so they outlive the agent, and attaches the ingress
//! classifier to the advertise interface through a pinned TCX link.
//!
//! Restart semantics: maps are reused from their pins (counters and, later, conntrack survive)
//! and a pinned link is updated in place to the newly loaded program, so the interface is never
//! without a program while the agent restarts.

pub mod iproute;
pub mod maglev;
pub mod overlay;
pub mod peerdb;
pub mod process;
pub mod socket_lb;
mod status;
pub mod task;
pub mod vip_echo;

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
use shoal_common::{names, IngressSettings, MAPS_ABI_VERSION};

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
}

impl Dataplane {
    /// Loads the programs (reusing pinned maps), writes the settings and attaches the ingress
    /// classifier, replacing in place any program a previous agent left attached.
    pub fn start(config: DataplaneConfig) -> Result<Self> {
        ensure_bpffs(&config.bpffs_root)?;
        for dir in [config.maps_dir(), config.links_dir()] {
            fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(config.maps_dir())
            .load(EBPF_OBJECT)
            .context("loading shoal's eBPF object")?;

        let mut settings: Array<_, IngressSettings> = Array::try_from(
            ebpf.map_mut(names::INGRESS_SETTINGS)
                .context("settings map missing from the eBPF object")?,
        )?;
        settings
            .set(0, config.settings, 0)
            .context("writing ingress settings")?;

        let program: &mut SchedClassifier = ebpf
            .program_mut(names::INGRESS_PROGRAM)
            .context("ingress program missing from the eBPF object")?
            .try_into()?;
        program
            .load()
            .context("loading the ingress classifier into the kernel (verifier)")?;
        let replaced_link = attach_pinned(program, &config.interface, &config.ingress_link_pin())?;
        fs::create_dir_all(&config.task_cgroup)
            .with_context(|| format!("creating {}", config.task_cgroup.display()))?;
        socket_lb::attach(&mut ebpf, &config.task_cgroup, &config.links_dir())?;
        remove_stale_links(&config)?;
        Ok(Dataplane {
            config,
            ebpf,
            replaced_link,
        })
    }

    pub fn config(&self) -> &DataplaneConfig {
        &self.config
    }

    /// Whether this start took over a link left attached by an earlier agent.
    pub fn replaced_link(&self) -> bool {
        self.replaced_link
    }

    /// Programs, attach points, maps and counters, read from the kernel now.
    pub fn status(&self) -> Result<DataplaneStatus> {
        status::read(self)
    }

    /// Runs the loaded ingress classifier on one packet with BPF_PROG_TEST_RUN against the
    /// live maps; returns the program's return code.
    pub fn test_run_ingress(&self, packet: &[u8]) -> Result<u32> {
        use aya::programs::{TestRun as _, TestRunOptions};
        let program: &SchedClassifier = self
            .ebpf
            .program(names::INGRESS_PROGRAM)
            .context("ingress program missing")?
            .try_into()?;
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(packet),
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN on the ingress classifier")?;
        Ok(result.return_value)
    }
}

/// Attaches `program` to `interface` through the link pinned at `pin`: an existing pinned link
/// gets the new program atomically (bpf_link_update); otherwise a new TCX link is made and
/// pinned. Returns whether an existing link was reused.
fn attach_pinned(program: &mut SchedClassifier, interface: &str, pin: &Path) -> Result<bool> {
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
    let id = program
        .attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .with_context(|| format!("attaching the ingress classifier to {interface} (TCX)"))?;
    let link: FdLink = program.take_link(id)?.try_into()?;
    link.pin(pin)
        .with_context(|| format!("pinning the ingress link at {}", pin.display()))?;
    Ok(false)
}

/// Unpins links for interfaces this agent no longer watches (a changed advertise interface),
/// which detaches their programs.
fn remove_stale_links(config: &DataplaneConfig) -> Result<()> {
    let mut keep = socket_lb::link_pins(&config.links_dir());
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
