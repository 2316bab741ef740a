//! Tasks as processes: each in its own PID, network, mount and UTS namespaces and its own
//! cgroup (v2), with hostname = task name and `/etc/resolv.conf` = `nameserver 127.0.0.11`.
//!
//! Launch: the agent runs `shoal task-init`, placed in the task's cgroup before exec, which
//! makes the namespaces (as `unshare --fork --pid --mount-proc --net --uts --kill-child` did
//! before it, one exec less per start) and forks PID 1 of the task: that sets the hostname,
//! bind-mounts the resolver file and runs the command as its child. Before exec, task-init waits at a start gate (a unix
//! socket on fd 3) until the agent has connected the task's namespace to its networks, so the
//! command never runs without them; if the agent closes the gate without opening it, the task
//! ends. Stop: SIGTERM to the cgroup, then `cgroup.kill`.
//!
//! task-init opens the task's DNS sockets (127.0.0.11:53) as soon as its namespaces exist, and
//! sends them to the agent (`SCM_RIGHTS`) with the byte that says so, through the gate: the
//! agent serves them and attaches the task's interfaces while task-init sets up the rest.
//!
//! Tasks outlive the agent (live restore): the first process runs in a session of its own, so a
//! stopped or killed agent leaves it running; task-init writes the command's exit status to
//! `<id>.exit` in the tasks directory, so a task that ends while no agent runs is reported
//! with its real status; and task-init holds the task's DNS sockets (at `DNS_UDP_FD` /
//! `DNS_TCP_FD`), which a later agent takes copies of
//! (`pidfd_getfd`), so queries sent while the agent restarts wait in the socket instead of
//! being refused.

use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};

/// The resolver every task uses: the agent's embedded DNS inside the task's namespace.
pub const TASK_RESOLV_CONF: &str = "nameserver 127.0.0.11\noptions ndots:0\n";

/// What to run.
#[derive(Clone, Debug)]
pub struct TaskLaunch {
    pub id: String,
    /// Task name (`web.1.<id>`), also its hostname.
    pub name: String,
    pub command: Vec<String>,
    pub env: Vec<String>,
    /// What the command is confined to (None: unconfined, `SHOAL_TASK_CONFINEMENT=off`).
    pub confinement: Option<crate::confinement::Confinement>,
    /// Resource limits, written into the task's cgroup before it starts.
    pub limits: crate::limits::Resources,
}

/// Where tasks of this node live.
#[derive(Clone, Debug)]
pub struct TaskRuntime {
    cgroup_root: PathBuf,
    dir: PathBuf,
    /// The `shoal` binary, which provides `task-init`.
    init_exe: PathBuf,
    /// The agent's own paths (socket, state, config) hidden from confined tasks.
    masked: Vec<PathBuf>,
    controllers: crate::limits::CgroupControllers,
}

/// The file descriptor task-init reads its start gate from.
pub const GATE_FD: i32 = 3;
/// What the agent sends through the gate to let the command run.
const GATE_OPEN: &[u8] = b"1";
/// What task-init sends back through the gate once its namespaces exist.
const NAMESPACES_MADE: &[u8] = b"n";
/// Where task-init keeps the task's DNS sockets (127.0.0.11:53) for the agents it sees.
pub const DNS_UDP_FD: i32 = 4;
pub const DNS_TCP_FD: i32 = 5;

/// A task the agent supervises: the first process it started (or, for a task adopted
/// from a previous agent, the task's PID 1 it watches through a pidfd), and the cgroup.
pub struct TaskHandle {
    pub id: String,
    process: TaskProcess,
    cgroup: PathBuf,
    /// Where task-init writes the command's exit status; removed with the cgroup.
    exit_file: PathBuf,
    /// The cgroup controllers of its limits (v1 cgroups to remove with it, OOM kills).
    controllers: crate::limits::CgroupControllers,
    /// The agent's end of the start gate while the task waits at it.
    gate: Option<tokio::net::UnixStream>,
}

enum TaskProcess {
    /// Started by this agent: its child, waited on directly.
    Child(tokio::process::Child),
    /// Started by a previous agent: the first process (in the task's network namespace;
    /// `unshare` for a task an older agent started), and the task's PID 1, whose end the
    /// pidfd reports; its status is in the exit file.
    Adopted {
        first_pid: u32,
        init: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
    },
}

impl TaskRuntime {
    pub fn new(cgroup_root: &Path, state_dir: &Path, init_exe: PathBuf) -> Result<Self> {
        let dir = state_dir.join("tasks");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::write(dir.join("resolv.conf"), TASK_RESOLV_CONF)?;
        fs::create_dir_all(cgroup_root)?;
        Ok(Self {
            cgroup_root: cgroup_root.to_owned(),
            dir,
            init_exe,
            masked: Vec::new(),
            controllers: crate::limits::CgroupControllers::detect(cgroup_root),
        })
    }

    /// Paths of the agent (socket, state dir, config) that confined tasks must not see: each
    /// gets an empty read-only mount over it in the task's mount namespace.
    pub fn with_masked_paths(mut self, paths: Vec<PathBuf>) -> Self {
        self.masked = paths;
        self
    }

    /// The standard PATH, behind the agent's own directory so `shoal whoami` and friends
    /// resolve to the agent's binary even where it is not installed (the lab).
    fn task_path(&self) -> String {
        let standard = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
        match self.init_exe.parent() {
            Some(dir) => format!("{}:{standard}", dir.display()),
            None => standard.to_owned(),
        }
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    fn cgroup(&self, id: &str) -> PathBuf {
        self.cgroup_root.join(id)
    }

    pub fn start(&self, launch: &TaskLaunch) -> Result<TaskHandle> {
        // IDs become file and cgroup names: only [0-9a-z] (the managers' alphabet).
        let id_ok = !launch.id.is_empty()
            && launch
                .id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !id_ok {
            bail!("bad task id {:?}", launch.id);
        }
        if launch.command.is_empty() {
            bail!("task {} has no command", launch.id);
        }
        let cgroup = self.cgroup(&launch.id);
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;
        let _ = fs::remove_file(self.exit_path(&launch.id));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&launch.id))?;
        // task-init makes the namespaces itself (`enter_task_namespaces`).
        let mut command = std::process::Command::new(&self.init_exe);
        command
            .args(["task-init", "--gate-fd", &GATE_FD.to_string()])
            .arg("--exit-file")
            .arg(self.exit_path(&launch.id))
            .args(["--hostname", &launch.name, "--resolv-conf"])
            .arg(self.dir.join("resolv.conf"));
        if let Some(confinement) = &launch.confinement {
            command.args(confinement.args());
            for path in &self.masked {
                command.arg("--mask").arg(path);
            }
        }
        command
            .arg("--")
            .args(&launch.command)
            .env_clear()
            .env("PATH", self.task_path())
            .env("HOSTNAME", &launch.name)
            .env("SHOAL_TASK_ID", &launch.id)
            .env("SHOAL_TASK_NAME", &launch.name)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        for entry in &launch.env {
            if let Some((key, value)) = entry.split_once('=') {
                command.env(key, value);
            }
        }
        crate::process::detach_into_cgroup(&mut command, &cgroup)?;
        if let Err(err) = self
            .controllers
            .apply(&launch.id, &cgroup, &launch.limits, &mut command)
        {
            // Nothing half-applied: the task's cgroups go with the error.
            self.controllers.remove(&launch.id);
            let _ = fs::remove_dir(&cgroup);
            return Err(err);
        }
        // Both ends close-on-exec; the task's end is put at `GATE_FD` for task-init only.
        let (gate, task_end) =
            std::os::unix::net::UnixStream::pair().context("making the task's start gate")?;
        gate.set_nonblocking(true)?;
        let gate = tokio::net::UnixStream::from_std(gate)?;
        crate::process::pass_fd(&mut command, task_end.into(), GATE_FD);
        let child = tokio::process::Command::from(command)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("starting task {}", launch.id))?;
        Ok(TaskHandle {
            id: launch.id.clone(),
            process: TaskProcess::Child(child),
            cgroup,
            exit_file: self.exit_path(&launch.id),
            controllers: self.controllers.clone(),
            gate: Some(gate),
        })
    }

    fn exit_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.exit"))
    }

    /// The tasks a previous agent left (IDs): one cgroup each under the cgroup root, running
    /// or ended since.
    pub fn leftovers(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.cgroup_root)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        found.sort();
        Ok(found)
    }

    /// Supervises a task a previous agent started, which still runs.
    pub fn adopt(&self, id: &str) -> Result<TaskHandle> {
        let cgroup = self.cgroup(id);
        let (first_pid, init_pid) =
            task_processes(&cgroup).with_context(|| format!("task {id} is not running"))?;
        let pidfd = pidfd_open(init_pid)
            .with_context(|| format!("watching process {init_pid} of task {id}"))?;
        Ok(TaskHandle {
            id: id.to_owned(),
            process: TaskProcess::Adopted {
                first_pid,
                // SAFETY: the pidfd is ours alone and registered once, here.
                init: unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        pidfd,
                        tokio::io::Interest::READABLE,
                    )
                }
                .map_err(io::Error::from)?,
            },
            cgroup,
            exit_file: self.exit_path(id),
            controllers: self.controllers.clone(),
            gate: None,
        })
    }

    /// How a task that ended while no agent ran exited, from the status its PID 1 wrote.
    pub fn exit_status(&self, id: &str) -> Option<ExitStatus> {
        read_exit_file(&self.exit_path(id))
    }

    /// Ends what is left of a task (processes, cgroup, exit status) without a grace period:
    /// a task the managers no longer want, or one that ended while no agent ran.
    pub fn discard(&self, id: &str) -> Result<()> {
        let cgroup = self.cgroup(id);
        kill_cgroup(&cgroup)?;
        remove_cgroup_dir(&cgroup)?;
        self.controllers.remove(id);
        match fs::remove_file(self.exit_path(id)) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(err.into()),
        }
    }

    /// PID (as the host sees it) of the task's own PID 1, for entering its namespaces.
    pub fn init_pid(&self, id: &str) -> Result<u32> {
        task_processes(&self.cgroup(id))
            .map(|(_, init)| init)
            .with_context(|| format!("task {id} is not running on this node"))
    }
}

/// The first process of a task (the only one whose parent is outside its cgroup) and its
/// child, the task's PID 1; None when the task no longer runs.
fn task_processes(cgroup: &Path) -> Option<(u32, u32)> {
    let procs = fs::read_to_string(cgroup.join("cgroup.procs")).ok()?;
    let pids: Vec<u32> = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let first = pids
        .iter()
        .copied()
        .find(|pid| parent_of(*pid).is_some_and(|parent| !pids.contains(&parent)))?;
    let init = pids
        .iter()
        .copied()
        .find(|pid| parent_of(*pid) == Some(first))?;
    Some((first, init))
}

/// A task's embedded DNS sockets: UDP and TCP on 127.0.0.11:53 in its network namespace.
#[derive(Debug)]
pub struct DnsSockets {
    pub udp: std::net::UdpSocket,
    pub tcp: std::net::TcpListener,
}

impl DnsSockets {
    /// Other descriptors of the same sockets.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            udp: self.udp.try_clone()?,
            tcp: self.tcp.try_clone()?,
        })
    }
}

/// The task's DNS sockets, opened by task-init in the task's network namespace: `lo` up
/// first (a socket bound to 127.0.0.11 while it is down would answer from another address),
/// then UDP and TCP on 127.0.0.11:53, at `DNS_UDP_FD` and `DNS_TCP_FD`, close-on-exec: task-init
/// holds them for as long as the task runs (for the agents it sees), the command does not
/// inherit them.
fn open_dns_sockets() -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let address = std::net::SocketAddr::from(([127, 0, 0, 11], 53));
    bring_loopback_up().context("bringing lo up")?;
    // Above the targets first: a socket may be made on the other's target.
    let udp = dup_above_dns_fds(&std::net::UdpSocket::bind(address)?)?;
    let tcp = dup_above_dns_fds(&std::net::TcpListener::bind(address)?)?;
    for (fd, target) in [(udp, DNS_UDP_FD), (tcp, DNS_TCP_FD)] {
        // SAFETY: dup3 onto a descriptor task-init does not otherwise use (its own start
        // leaves 0-3 open only); the copies above are closed, these stay.
        if unsafe { libc::dup3(fd.as_raw_fd(), target, libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error()).context("placing the task's DNS sockets");
        }
    }
    Ok(())
}

/// Copies of the DNS sockets task-init holds for the task whose first process is
/// `first_pid` (a task a previous agent started, which handed them to task-init), waiting
/// (5 s at most) for task-init to hold them.
pub async fn take_dns_sockets(first_pid: u32) -> Result<DnsSockets> {
    let mut wait = StartupWait::new();
    while wait.more() {
        let init = fs::read_to_string(format!("/proc/{first_pid}/task/{first_pid}/children"))
            .ok()
            .and_then(|children| children.split_whitespace().next()?.parse::<u32>().ok());
        let Some(pidfd) = init.and_then(|pid| pidfd_open(pid).ok()) else {
            wait.pause().await;
            continue;
        };
        match (
            pidfd_getfd(&pidfd, DNS_UDP_FD),
            pidfd_getfd(&pidfd, DNS_TCP_FD),
        ) {
            (Ok(udp), Ok(tcp)) => {
                return Ok(DnsSockets {
                    udp: udp.into(),
                    tcp: tcp.into(),
                })
            }
            // Not there yet (EBADF).
            _ => wait.pause().await,
        }
    }
    bail!("task-init (under pid {first_pid}) did not hold the task's DNS sockets within 5 s")
}

/// Polling for a previous agent's task-init to hold the DNS sockets, for 5 s at most: 0.25
/// ms first, doubling up to 10 ms, so a slow one is not polled a thousand times a second.
struct StartupWait {
    next: Duration,
    deadline: std::time::Instant,
}

impl StartupWait {
    fn new() -> Self {
        Self {
            next: Duration::from_micros(250),
            deadline: std::time::Instant::now() + Duration::from_secs(5),
        }
    }

    fn more(&self) -> bool {
        std::time::Instant::now() < self.deadline
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Duration::from_millis(10));
    }
}

fn pidfd_open(pid: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// A copy of descriptor `target` of the process behind `pidfd` (Linux 5.6+, CAP_SYS_PTRACE).
fn pidfd_getfd(pidfd: &std::os::fd::OwnedFd, target: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _};
    // SAFETY: pidfd_getfd(2) returns a new close-on-exec descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// The status task-init wrote when the command ended (`exit_status` of a task that ended
/// while no agent ran).
fn read_exit_file(path: &Path) -> Option<ExitStatus> {
    use std::os::unix::process::ExitStatusExt as _;
    let code: i32 = fs::read_to_string(path).ok()?.trim().parse().ok()?;
    Some(ExitStatus::from_raw((code & 0xff) << 8))
}

impl TaskHandle {
    /// The task's first process, which is in the task's namespaces once they are made (for
    /// an adopted task, already); None once it has ended.
    pub fn first_pid(&self) -> Option<u32> {
        match &self.process {
            TaskProcess::Child(child) => child.id(),
            TaskProcess::Adopted { first_pid, .. } => Some(*first_pid),
        }
    }

    /// For a task this agent started: the PID of a process inside its network namespace (its
    /// first process) and its DNS sockets, once task-init has made the namespaces and sent
    /// them through the gate (5 s at most).
    pub async fn namespaces_made(&self) -> Result<(u32, DnsSockets)> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        let (pid, gate) = match (&self.process, &self.gate) {
            (TaskProcess::Child(child), Some(gate)) => {
                (child.id().context("the task already ended")?, gate)
            }
            (TaskProcess::Child(_), None) => bail!("the start gate was already used"),
            (TaskProcess::Adopted { .. }, _) => bail!("an adopted task has its namespaces"),
        };
        let receive = || {
            let mut byte = [0u8; 1];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 2]);
            let mut iov = [io::IoSliceMut::new(&mut byte)];
            let message = recvmsg::<()>(
                gate.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            let read = message.bytes;
            let mut received: Vec<OwnedFd> = Vec::new();
            for cmsg in message.cmsgs().map_err(io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = cmsg {
                    // SAFETY: descriptors the kernel just installed for us.
                    received.extend(
                        fds.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
            Ok((byte[..read] == *NAMESPACES_MADE, received))
        };
        let (made, received) = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                gate.readable().await?;
                match gate.try_io(tokio::io::Interest::READABLE, receive) {
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => continue,
                    other => return other,
                }
            }
        })
        .await
        .context("the task's namespaces did not appear within 5 s")?
        .context("reading the task's start gate")?;
        if !made {
            bail!("the task ended before its namespaces were made");
        }
        let [udp, tcp]: [OwnedFd; 2] = received
            .try_into()
            .map_err(|_| anyhow::anyhow!("task-init sent no DNS sockets with its namespaces"))?;
        let dns = DnsSockets {
            udp: udp.into(),
            tcp: tcp.into(),
        };
        Ok((pid, dns))
    }

    /// Ends a task waiting at its gate without running its command.
    pub fn close_gate(&mut self) {
        self.gate = None;
    }

    /// Lets the task's command run.
    pub fn open_gate(&mut self) -> Result<()> {
        let gate = self
            .gate
            .take()
            .context("the start gate was already used")?;
        match gate.try_write(GATE_OPEN) {
            Ok(1) => Ok(()),
            Ok(_) => bail!("opening the task's start gate: nothing written"),
            Err(err) => Err(err).context("opening the task's start gate"),
        }
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        match &mut self.process {
            TaskProcess::Child(child) => child.wait().await,
            TaskProcess::Adopted { init, .. } => {
                // A pidfd turns readable when its process ends.
                let _ = init.readable().await?;
                // task-init writes the status just before it exits.
                read_exit_file(&self.exit_file).ok_or_else(|| {
                    io::Error::other("the task's PID 1 ended without writing its exit status")
                })
            }
        }
    }

    /// SIGTERM to every process of the task, SIGKILL (cgroup.kill) after `grace`, then waits
    /// for the task to end and removes its cgroup.
    pub async fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        signal_cgroup(&self.cgroup, libc::SIGTERM)?;
        let status = match tokio::time::timeout(grace, self.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                kill_cgroup(&self.cgroup)?;
                self.wait().await?
            }
        };
        self.remove_cgroup().await?;
        Ok(status)
    }

    /// After the task ended on its own: kills stragglers and removes the cgroup (and the
    /// exit status its PID 1 left).
    pub async fn remove_cgroup(&self) -> Result<()> {
        kill_cgroup(&self.cgroup)?;
        let cgroup = self.cgroup.clone();
        let (controllers, id) = (self.controllers.clone(), self.id.clone());
        tokio::task::spawn_blocking(move || {
            remove_cgroup_dir(&cgroup)?;
            controllers.remove(&id);
            anyhow::Ok(())
        })
        .await??;
        let _ = fs::remove_file(&self.exit_file);
        Ok(())
    }

    /// How many processes of the task the kernel's OOM killer killed (read it before the
    /// cgroup is removed).
    pub fn oom_kills(&self) -> u64 {
        self.controllers.oom_kills(&self.id, &self.cgroup)
    }
}

/// Removes an (emptied) cgroup, waiting up to 2 s for its last processes to be reaped.
fn remove_cgroup_dir(cgroup: &Path) -> Result<()> {
    for _ in 0..100 {
        match fs::remove_dir(cgroup) {
            Ok(()) => return Ok(()),
            Err(err) if crate::process::cgroup_gone(&err) => return Ok(()),
            // Busy until the last process is reaped.
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    bail!("cgroup {} still busy", cgroup.display())
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn signal_cgroup(cgroup: &Path, signal: i32) -> Result<()> {
    let procs = match fs::read_to_string(cgroup.join("cgroup.procs")) {
        Ok(procs) => procs,
        Err(err) if crate::process::cgroup_gone(&err) => return Ok(()),
        Err(err) => return Err(err.into()),
    };
    for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: plain kill(2); a pid that just exited gives ESRCH, which is fine.
        unsafe { libc::kill(pid, signal) };
    }
    Ok(())
}

/// SIGKILL to the whole cgroup: `cgroup.kill` where the kernel has it (5.14+).
fn kill_cgroup(cgroup: &Path) -> Result<()> {
    match fs::write(cgroup.join("cgroup.kill"), "1") {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound && !cgroup.exists() => Ok(()),
        Err(_) => signal_cgroup(cgroup, libc::SIGKILL),
    }
}

/// `shoal task-init`: runs inside the new namespaces as the task's PID 1. Sets the hostname,
/// puts the task's resolv.conf over /etc/resolv.conf (in its private mount namespace), then
/// runs the command as its child: it forwards signals to it (a PID 1 without handlers would
/// ignore SIGTERM), reaps orphans, and exits with the command's status (128 + signal when it
/// was killed). Everything up to the command's exec happens before the gate (the command's
/// process forked and confined, waiting); past it, task-init only takes the DNS sockets and
/// releases the command, which execs. Returns only on a set-up error.
pub fn exec_init(
    gate_fd: i32,
    (hostname, resolv_conf): (&str, &Path),
    exit_file: &Path,
    (confinement, masked): (Option<crate::confinement::Confinement>, &[PathBuf]),
    command: &[String],
) -> anyhow::Error {
    match run_init(
        gate_fd,
        (hostname, resolv_conf),
        exit_file,
        (confinement, masked),
        command,
    ) {
        Ok(never) => match never {},
        Err(err) => err,
    }
}

/// Where task-init records the command's status: the exit file's directory, opened before
/// the agent's state dir is masked in the task's mount namespace, and the file's name in it.
struct ExitRecord {
    dir: File,
    name: CString,
    staged: CString,
}

impl ExitRecord {
    fn open(exit_file: &Path) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = exit_file
            .parent()
            .context("exit file without a directory")?;
        let name = exit_file.file_name().context("exit file without a name")?;
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .with_context(|| format!("opening {}", dir.display()))?;
        let staged = format!("{}.new", name.to_string_lossy());
        Ok(Self {
            dir,
            name: CString::new(name.as_encoded_bytes())?,
            staged: CString::new(staged)?,
        })
    }

    fn write(&self, code: i32) {
        use std::io::Write as _;
        use std::os::fd::{AsRawFd as _, FromRawFd as _};
        // SAFETY: openat(2) relative to our open directory; a new descriptor or -1.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                self.staged.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return;
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let mut file = unsafe { File::from_raw_fd(fd) };
        if file.write_all(code.to_string().as_bytes()).is_ok() {
            drop(file);
            // SAFETY: renameat(2) within our open directory.
            unsafe {
                libc::renameat(
                    self.dir.as_raw_fd(),
                    self.staged.as_ptr(),
                    self.dir.as_raw_fd(),
                    self.name.as_ptr(),
                )
            };
        }
    }
}

/// Records the command's status for an agent that did not see the task end, then exits
/// with it.
fn exit_with(exit: &ExitRecord, code: i32) -> ! {
    exit.write(code);
    std::process::exit(code)
}

/// Sets `lo` up in the calling thread's network namespace (SIOCSIFFLAGS).
fn bring_loopback_up() -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let socket = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    // SAFETY: an all-zero ifreq is valid; the ioctls read and write only that struct.
    unsafe {
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo") {
            *slot = *byte as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(io::Error::last_os_error().into());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(io::Error::last_os_error().into());
        }
    }
    Ok(())
}

/// In the command's process before exec: whether task-init released it (it passed the
/// gate), rather than ended.
fn released(release_wait: &std::os::fd::OwnedFd) -> bool {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(release_wait, &mut byte) {
            Ok(n) => return n == 1,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// A close-on-exec copy of `fd` numbered 16 or more: clear of `DNS_UDP_FD` and `DNS_TCP_FD`.
fn dup_above_dns_fds(fd: &impl std::os::fd::AsRawFd) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 16) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(copy) })
}

/// Blocks until the agent opens the start gate (or closes it: the task is not to run).
fn wait_at_gate(gate_fd: i32) -> Result<()> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    // SAFETY: the agent passes the gate's end as `gate_fd` and nothing else owns it.
    let gate = unsafe { OwnedFd::from_raw_fd(gate_fd) };
    let mut byte = [0u8; 1];
    let read = loop {
        match nix::unistd::read(&gate, &mut byte) {
            Err(nix::errno::Errno::EINTR) => continue,
            other => break other.context("reading the start gate")?,
        }
    };
    if read == 0 || byte != *GATE_OPEN {
        bail!("the agent could not connect the task to its networks");
    }
    Ok(())
}

/// Makes the task's namespaces (mount, UTS, network, PID), as `unshare --fork --pid
/// --mount-proc --net --uts --kill-child --propagation private` did before task-init, without
/// its exec on every start. Returns in the child, PID 1 of the new PID namespace, with a
/// `/proc` of its own. The first process (in the other namespaces, not in the PID namespace:
/// the one the agent started) waits for it and exits as it did, ignoring the stop signals as
/// `unshare` does (a stop signals the whole cgroup; PID 1 passes it on to the command).
fn enter_task_namespaces(gate_fd: i32) -> Result<()> {
    use nix::{
        mount::{mount, MsFlags},
        sched::{unshare, CloneFlags},
        sys::signal::{SigSet, SigmaskHow, Signal},
        unistd::{fork, ForkResult},
    };
    unshare(
        CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWPID,
    )
    .context("making the task's namespaces")?;
    // The agent serves the DNS sockets and attaches the task's interfaces from now on,
    // while the rest is set up.
    open_dns_sockets().context("opening the task's DNS sockets at 127.0.0.11:53")?;
    nix::sys::socket::sendmsg::<()>(
        gate_fd,
        &[io::IoSlice::new(NAMESPACES_MADE)],
        &[nix::sys::socket::ControlMessage::ScmRights(&[
            DNS_UDP_FD, DNS_TCP_FD,
        ])],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .context("telling the agent the namespaces are made")?;
    // Nothing the task mounts reaches the node.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making the task's mounts private")?;
    let mut stops = SigSet::empty();
    stops.add(Signal::SIGINT);
    stops.add(Signal::SIGTERM);
    let previous = stops.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
    // Turns readable once the first process has ended: PID 1 checks it after asking to die
    // with it, in case it ended before (then nothing would signal PID 1).
    let first = pidfd_open(std::process::id())?;
    // SAFETY: task-init is single-threaded (no runtime has started), so fork is safe.
    match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            previous.thread_set_mask()?;
            // The task ends with the first process, as with `unshare --kill-child`.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            let mut ended = libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&first),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call, which does not wait.
            if unsafe { libc::poll(&mut ended, 1, 0) } > 0 {
                bail!("the task's first process ended while it started");
            }
            drop(first);
            mount(
                Some("none"),
                "/proc",
                None::<&str>,
                MsFlags::MS_REC | MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .and_then(|()| {
                mount(
                    Some("proc"),
                    "/proc",
                    Some("proc"),
                    MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV,
                    None::<&str>,
                )
            })
            .context("mounting the task's /proc")?;
            Ok(())
        }
        ForkResult::Parent { child } => {
            drop(first);
            // The gate and the DNS sockets are PID 1's alone.
            for fd in [gate_fd, DNS_UDP_FD, DNS_TCP_FD] {
                // SAFETY: descriptors placed for PID 1; this process never uses them.
                unsafe { libc::close(fd) };
            }
            exit_as(child)
        }
    }
}

/// Waits for `child` and ends this process as it ended: its exit code, or the signal that
/// killed it (re-raised), as `unshare --fork` does.
fn exit_as(child: nix::unistd::Pid) -> ! {
    use nix::sys::{
        signal::{kill, signal, SigHandler, SigSet, Signal},
        wait::{waitpid, WaitStatus},
    };
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                if sig != Signal::SIGKILL {
                    // SAFETY: the default action, no handler.
                    let _ = unsafe { signal(sig, SigHandler::SigDfl) };
                    let mut raised = SigSet::empty();
                    raised.add(sig);
                    let _ = raised.thread_unblock();
                }
                let _ = kill(nix::unistd::getpid(), sig);
                std::process::exit(128 + sig as i32);
            }
            Err(nix::errno::Errno::EINTR) | Ok(_) => {}
            Err(err) => {
                eprintln!("shoal: waiting for the task's PID 1: {err}");
                std::process::exit(1);
            }
        }
    }
}

fn run_init(
    gate_fd: i32,
    (hostname, resolv_conf): (&str, &Path),
    exit_file: &Path,
    (confinement, masked): (Option<crate::confinement::Confinement>, &[PathBuf]),
    command: &[String],
) -> Result<std::convert::Infallible> {
    use nix::{
        sys::{
            signal::{kill, SigSet, SigmaskHow, Signal},
            wait::{waitpid, WaitPidFlag, WaitStatus},
        },
        unistd::{fork, ForkResult},
    };

    enter_task_namespaces(gate_fd)?;
    nix::unistd::sethostname(hostname).context("setting the task's hostname")?;
    File::open(resolv_conf).with_context(|| format!("opening {}", resolv_conf.display()))?;
    nix::mount::mount(
        Some(resolv_conf),
        "/etc/resolv.conf",
        None::<&str>,
        nix::mount::MsFlags::MS_BIND,
        None::<&str>,
    )
    .context("bind-mounting the task's resolv.conf")?;
    // What task-init needs later (the exit file's directory) is opened before the agent's
    // paths are masked; the resolv.conf bind mount above stays.
    let exit_file = &ExitRecord::open(exit_file)?;
    let confinement = match confinement {
        Some(confinement) => {
            crate::confinement::mask_paths(masked).context("masking paths in the task")?;
            Some(
                confinement
                    .prepare()
                    .context("compiling the task's seccomp filter")?,
            )
        }
        None => None,
    };
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let program = argv.first().context("no command")?.clone();

    let forwarded = [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGWINCH,
        Signal::SIGCHLD,
    ];
    let mut mask = SigSet::empty();
    for signal in forwarded {
        mask.add(signal);
    }
    let previous = mask.thread_swap_mask(SigmaskHow::SIG_BLOCK)?;
    // The command's process is forked and confined before the gate (the seccomp filter's
    // install alone is most of a millisecond), then waits on `release` for task-init to have
    // passed the gate: past it, only an exec is left.
    let (release_wait, release) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    // SAFETY: task-init is single-threaded (no runtime has started), so fork is safe.
    let child = match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            let _ = previous.thread_set_mask();
            drop(release);
            // SAFETY: the gate is task-init's; the command must not hold it.
            unsafe { libc::close(gate_fd) };
            if let Some(confinement) = &confinement {
                if let Err(err) = confinement.apply() {
                    eprintln!("shoal: confining the task: {err:#}");
                    std::process::exit(126);
                }
            }
            if !released(&release_wait) {
                // The gate closed: task-init is gone, and the task with it.
                std::process::exit(1);
            }
            let err = nix::unistd::execvp(&program, &argv).unwrap_err();
            eprintln!("shoal: executing {}: {err}", command[0]);
            std::process::exit(127);
        }
        ForkResult::Parent { child } => child,
    };
    drop(release_wait);
    wait_at_gate(gate_fd)?;
    nix::unistd::write(&release, GATE_OPEN).context("releasing the task's command")?;
    drop(release);
    loop {
        let signal = mask.wait().context("waiting for signals")?;
        if signal != Signal::SIGCHLD {
            let _ = kill(child, signal);
            continue;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => exit_with(exit_file, code),
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                    exit_with(exit_file, 128 + signal as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                // An orphan reaped, or a stop/continue: keep going.
                Ok(_) => {}
            }
        }
    }
}
