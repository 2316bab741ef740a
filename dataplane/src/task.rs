//! Tasks as processes: each in its own PID, network, mount and UTS namespaces and its own
//! cgroup (v2), with hostname = task name and `/etc/resolv.conf` = `nameserver 127.0.0.11`.
//!
//! Launch: the agent runs util-linux `unshare --fork --pid --mount-proc --net --uts` (which
//! makes the namespaces and a fresh /proc), placed in the task's cgroup before exec; inside,
//! `shoal task-init` sets the hostname, bind-mounts the resolver file and execs the command,
//! which becomes PID 1 of the task. Before exec, task-init waits at a start gate (a pipe on
//! fd 3) until the agent has connected the task's namespace to its networks, so the command
//! never runs without them; if the agent closes the gate without opening it, the task ends.
//! Stop: SIGTERM to the cgroup, then `cgroup.kill`.

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
}

/// Where tasks of this node live.
#[derive(Clone, Debug)]
pub struct TaskRuntime {
    cgroup_root: PathBuf,
    dir: PathBuf,
    /// The `shoal` binary, which provides `task-init`.
    init_exe: PathBuf,
}

/// The file descriptor task-init reads its start gate from.
pub const GATE_FD: i32 = 3;

/// A started task: the `unshare` process the agent waits on, and the task's cgroup.
pub struct TaskHandle {
    pub id: String,
    child: tokio::process::Child,
    cgroup: PathBuf,
    /// Write end of the start gate while the task waits at it.
    gate: Option<File>,
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
        })
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
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(&launch.id))?;
        let mut command = std::process::Command::new("unshare");
        command
            .args([
                "--fork",
                "--pid",
                "--mount-proc",
                "--net",
                "--uts",
                "--kill-child",
            ])
            .args(["--propagation", "private", "--"])
            .arg(&self.init_exe)
            .args(["task-init", "--gate-fd", &GATE_FD.to_string()])
            .args(["--hostname", &launch.name, "--resolv-conf"])
            .arg(self.dir.join("resolv.conf"))
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
        let (gate_read, gate_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        crate::process::pass_fd(&mut command, gate_read, GATE_FD);
        let child = tokio::process::Command::from(command)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("starting task {} (is util-linux installed?)", launch.id))?;
        Ok(TaskHandle {
            id: launch.id.clone(),
            child,
            cgroup,
            gate: Some(File::from(gate_write)),
        })
    }

    /// Kills what a previous agent left in the cgroup root (its tasks are reported lost and
    /// replaced by the orchestrator). Returns the task IDs found.
    pub fn remove_leftovers(&self) -> Result<Vec<String>> {
        let mut found = Vec::new();
        for entry in fs::read_dir(&self.cgroup_root)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                kill_cgroup(&entry.path())?;
                remove_cgroup_dir(&entry.path())?;
                found.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(found)
    }

    /// PID (as the host sees it) of the task's own PID 1, for entering its namespaces.
    pub fn init_pid(&self, id: &str) -> Result<u32> {
        let procs = fs::read_to_string(self.cgroup(id).join("cgroup.procs"))
            .with_context(|| format!("task {id} is not running on this node"))?;
        // The unshare process is the only one whose parent is outside the cgroup; its child
        // is the task's PID 1.
        let pids: Vec<u32> = procs
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        pids.iter()
            .copied()
            .find(|pid| parent_of(*pid).is_some_and(|parent| pids.contains(&parent)))
            .with_context(|| format!("task {id} has no running process"))
    }
}

impl TaskHandle {
    /// The PID of a process inside the task's network namespace, once there is one: the
    /// `unshare` process itself moves into the namespaces it makes.
    pub async fn netns_pid(&self) -> Result<u32> {
        let pid = self.child.id().context("the task already ended")?;
        let ours = fs::read_link("/proc/self/ns/net")?;
        for _ in 0..500 {
            match fs::read_link(format!("/proc/{pid}/ns/net")) {
                Ok(theirs) if theirs != ours => return Ok(pid),
                Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(_) => bail!("the task ended before its namespaces were made"),
            }
        }
        bail!("the task's namespaces did not appear within 5 s")
    }

    /// Ends a task waiting at its gate without running its command.
    pub fn close_gate(&mut self) {
        self.gate = None;
    }

    /// Lets the task's command run.
    pub fn open_gate(&mut self) -> Result<()> {
        use std::io::Write as _;
        let mut gate = self
            .gate
            .take()
            .context("the start gate was already used")?;
        gate.write_all(b"1")
            .context("opening the task's start gate")
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// SIGTERM to every process of the task, SIGKILL (cgroup.kill) after `grace`, then waits
    /// for the task to end and removes its cgroup.
    pub async fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        signal_cgroup(&self.cgroup, libc::SIGTERM)?;
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                kill_cgroup(&self.cgroup)?;
                self.child.wait().await?
            }
        };
        self.remove_cgroup().await?;
        Ok(status)
    }

    /// After the task ended on its own: kills stragglers and removes the cgroup.
    pub async fn remove_cgroup(&self) -> Result<()> {
        kill_cgroup(&self.cgroup)?;
        let cgroup = self.cgroup.clone();
        tokio::task::spawn_blocking(move || remove_cgroup_dir(&cgroup)).await?
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
/// was killed). Returns only on a set-up error.
pub fn exec_init(
    gate_fd: i32,
    hostname: &str,
    resolv_conf: &Path,
    command: &[String],
) -> anyhow::Error {
    match run_init(gate_fd, hostname, resolv_conf, command) {
        Ok(never) => match never {},
        Err(err) => err,
    }
}

/// Blocks until the agent opens the start gate; the command must not inherit it.
fn wait_at_gate(gate_fd: i32) -> Result<()> {
    use std::{io::Read as _, os::fd::FromRawFd as _};
    // SAFETY: the agent passes the gate's read end as `gate_fd` and nothing else owns it.
    let mut gate = unsafe { File::from_raw_fd(gate_fd) };
    let mut byte = [0u8; 1];
    match gate.read(&mut byte) {
        Ok(1) => Ok(()),
        Ok(_) => bail!("the agent could not connect the task to its networks"),
        Err(err) => Err(err).context("reading the start gate"),
    }
}

fn run_init(
    gate_fd: i32,
    hostname: &str,
    resolv_conf: &Path,
    command: &[String],
) -> Result<std::convert::Infallible> {
    use nix::{
        sys::{
            signal::{kill, SigSet, SigmaskHow, Signal},
            wait::{waitpid, WaitPidFlag, WaitStatus},
        },
        unistd::{fork, ForkResult},
    };

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
    let argv: Vec<CString> = command
        .iter()
        .map(|a| CString::new(a.as_bytes()))
        .collect::<Result<_, _>>()?;
    let program = argv.first().context("no command")?.clone();
    wait_at_gate(gate_fd)?;

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
    // SAFETY: task-init is single-threaded (no runtime has started), so fork is safe.
    let child = match unsafe { fork() }.context("fork")? {
        ForkResult::Child => {
            let _ = previous.thread_set_mask();
            let err = nix::unistd::execvp(&program, &argv).unwrap_err();
            eprintln!("shoal: executing {}: {err}", command[0]);
            std::process::exit(127);
        }
        ForkResult::Parent { child } => child,
    };
    loop {
        let signal = mask.wait().context("waiting for signals")?;
        if signal != Signal::SIGCHLD {
            let _ = kill(child, signal);
            continue;
        }
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == child => std::process::exit(code),
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => {
                    std::process::exit(128 + signal as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                // An orphan reaped, or a stop/continue: keep going.
                Ok(_) => {}
            }
        }
    }
}
