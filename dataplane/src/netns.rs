//! The one way into a network namespace: a closure run on a short-lived thread that entered
//! it. A socket keeps the namespace it was created in, so a netlink socket (or a TCX link, or
//! a `/proc/sys` file) opened there is used afterwards from any thread; no pooled runtime
//! thread, and no long-lived thread of the agent, ever changes namespace.
//!
//! Named namespaces (`/run/netns/NAME`) are made and removed here as `ip netns` does it: a
//! thread unshares a new network namespace and bind-mounts it onto a file under `/run/netns`,
//! which is a shared mount point so the name is seen from every mount namespace.

use std::{
    fmt,
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use nix::{
    mount::{mount, umount2, MntFlags, MsFlags},
    sched::{setns, unshare, CloneFlags},
};

/// Where named namespaces are bind-mounted, as iproute2 has them.
pub const NETNS_DIR: &str = "/run/netns";

/// A network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Netns {
    /// The agent's own namespace (the node's).
    Current,
    /// A namespace bind-mounted under `/run/netns`.
    Named(String),
    /// The namespace of a process (a task's PID 1).
    Process(u32),
}

impl Netns {
    /// The file that holds the namespace; None for the agent's own.
    pub fn path(&self) -> Option<PathBuf> {
        match self {
            Netns::Current => None,
            Netns::Named(name) => Some(Path::new(NETNS_DIR).join(name)),
            Netns::Process(pid) => Some(PathBuf::from(format!("/proc/{pid}/ns/net"))),
        }
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Netns::Current => f.write_str("the node's namespace"),
            Netns::Named(name) => write!(f, "namespace {name}"),
            Netns::Process(pid) => write!(f, "the namespace of PID {pid}"),
        }
    }
}

/// Runs `body` inside `netns`: on the calling thread for the agent's own namespace, else on a
/// scoped thread that enters it first and ends with `body`.
pub fn run_in<T: Send>(netns: &Netns, body: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    let Some(path) = netns.path() else {
        return body();
    };
    let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    run_in_file(&file, body).with_context(|| format!("in {netns}"))
}

/// Runs `body` on a scoped thread that entered the namespace open as `file`.
pub fn run_in_file<T: Send>(file: &File, body: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(scope, || {
                setns(file, CloneFlags::CLONE_NEWNET).context("entering the namespace")?;
                body()
            })
            .context("starting a thread to enter a namespace")?
            .join()
            .map_err(|_| anyhow::anyhow!("the thread inside a namespace panicked"))?
    })
}

/// Writes a sysctl of `netns`, `key` as in `/proc/sys` (`net/ipv4/ip_forward`): a `/proc/sys/net`
/// file belongs to the namespace of whoever opens it, so it is opened inside.
pub fn sysctl(netns: &Netns, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    run_in(netns, || {
        std::fs::write(&path, value)
            .with_context(|| format!("writing {value} to {}", path.display()))
    })
}

/// The names under `/run/netns`.
pub fn named() -> Result<Vec<String>> {
    match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => Ok(entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(err) => Err(err).context("listing network namespaces"),
    }
}

/// Makes a new network namespace named `name` (it must not exist), with `lo` down as the
/// kernel makes it.
pub fn create_named(name: &str) -> Result<()> {
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {NETNS_DIR}"))?;
    share_netns_dir(dir)?;
    let target = dir.join(name);
    File::options()
        .write(true)
        .create_new(true)
        .open(&target)
        .with_context(|| format!("creating {}", target.display()))?;
    let made = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<()> {
                unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .with_context(|| format!("bind-mounting the new namespace on {}", target.display()))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread making a namespace panicked"))?
    });
    if made.is_err() {
        let _ = std::fs::remove_file(&target);
    }
    made.with_context(|| format!("creating network namespace {name}"))
}

/// Removes the named namespace (gone already: fine). The namespace itself lives on while
/// anything still holds it (a process, a socket); its name goes at once.
pub fn delete_named(name: &str) -> Result<()> {
    let target = Path::new(NETNS_DIR).join(name);
    match umount2(&target, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(err) => {
            return Err(err).with_context(|| format!("unmounting {}", target.display()));
        }
    }
    match std::fs::remove_file(&target) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("removing {}", target.display())),
    }
}

/// Makes `/run/netns` a shared mount point (a bind mount of itself first if it is none), so a
/// namespace mounted there shows in every mount namespace that sees the directory, as iproute2
/// sets it up.
fn share_netns_dir(dir: &Path) -> Result<()> {
    let shared = |dir: &Path| {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared(dir) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting {} on itself", dir.display()))?;
            shared(dir).with_context(|| format!("making {} a shared mount", dir.display()))
        }
        Err(err) => bail!("making {} a shared mount: {err}", dir.display()),
    }
}
