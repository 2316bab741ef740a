//! One health probe of a local task: the service's command inside the task (with its
//! confinement, as `task exec` runs it), or the agent's built-in HTTP/TCP probe in the task's
//! network namespace. Always a result: a probe that cannot run failed.

use std::{
    os::unix::process::ExitStatusExt as _,
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result};
use shoal_dataplane::task::TaskRuntime;

use crate::{
    health::{HealthCheck, HealthProbe, HealthTest, PROBE_OUTPUT_MAX},
    protocol::Assignment,
};

/// Docker's exit code of a probe that could not run or ran out of time.
const PROBE_ERROR: i32 = -1;

pub async fn run(runtime: &TaskRuntime, task: &Assignment, check: &HealthCheck) -> HealthProbe {
    let start_ms = unix_ms();
    let (exit_code, output) = match probe(runtime, task, check).await {
        Ok(result) => result,
        Err(err) => (PROBE_ERROR, format!("{err:#}")),
    };
    HealthProbe {
        start_ms,
        end_ms: unix_ms(),
        exit_code,
        output: truncate(output),
    }
}

async fn probe(
    runtime: &TaskRuntime,
    task: &Assignment,
    check: &HealthCheck,
) -> Result<(i32, String)> {
    let pid = runtime.init_pid(&task.task_id)?;
    let timeout = check.timeout();
    let first_target = task.ports.first().map(|p| p.target);
    let port = |port| HealthCheck::probe_port(port, first_target).context("no port to probe");
    match &check.test {
        HealthTest::Command(command) => run_command(pid, command, timeout).await,
        HealthTest::Tcp { port: wanted } => {
            let port = port(*wanted)?;
            builtin(move || shoal_dataplane::probe::tcp(pid, port, timeout)).await
        }
        HealthTest::Http { path, port: wanted } => {
            let port = port(*wanted)?;
            let path = path.clone();
            builtin(move || shoal_dataplane::probe::http(pid, port, &path, timeout)).await
        }
    }
}

/// A built-in probe, on a blocking thread (it enters the task's namespace on its own one).
async fn builtin(
    probe: impl FnOnce() -> Result<shoal_dataplane::probe::Verdict> + Send + 'static,
) -> Result<(i32, String)> {
    Ok(match tokio::task::spawn_blocking(probe).await?? {
        Ok(output) => (0, output),
        Err(why) => (1, why),
    })
}

/// `sh -c COMMAND` inside the task, killed with everything it started when `timeout` passes.
async fn run_command(pid: u32, command: &str, timeout: Duration) -> Result<(i32, String)> {
    let argv = ["sh".to_owned(), "-c".to_owned(), command.to_owned()];
    let exe = std::env::current_exe().context("finding the shoal binary")?;
    let mut command: tokio::process::Command =
        shoal_dataplane::task_exec::command_in_task(pid, &argv, &exe)?.into();
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = command.spawn().context("running nsenter (util-linux)")?;
    let group = child.id().map(|id| nix::unistd::Pid::from_raw(id as i32));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => {
            let output = output?;
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            let code = match (output.status.code(), output.status.signal()) {
                (Some(code), _) => code,
                (None, Some(signal)) => 128 + signal,
                (None, None) => PROBE_ERROR,
            };
            Ok((code, text))
        }
        Err(_) => {
            if let Some(group) = group {
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            }
            Ok((
                PROBE_ERROR,
                format!("Health check exceeded timeout ({timeout:?})"),
            ))
        }
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > PROBE_OUTPUT_MAX {
        let mut end = PROBE_OUTPUT_MAX;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
