//! Kernel network configuration through iproute2 (`ip`, `bridge`) and `nft`, one batch per
//! call so a whole step costs one process. Each batch runs in a chosen network namespace:
//! the agent's own, a named one (`/run/netns/NAME`), or a task's (`/proc/PID/ns/net`).

use std::{
    io::Write as _,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// Where a batch runs.
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
    /// A command that runs `program` inside this namespace.
    fn command(&self, program: &str) -> Command {
        match self {
            Netns::Current => Command::new(program),
            Netns::Named(name) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", name, program]);
                command
            }
            Netns::Process(pid) => {
                let mut command = Command::new("nsenter");
                command
                    .arg(format!("--net=/proc/{pid}/ns/net"))
                    .arg(program);
                command
            }
        }
    }
}

/// Runs `ip -batch -` (or `bridge -batch -`) with `lines` in `netns`; `-force` is not used,
/// so the first failing line fails the batch and is named in the error.
pub fn batch(netns: &Netns, tool: &str, lines: &[String]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    // iproute2 enters a named namespace itself (`-n`), sparing an `ip netns exec` process.
    let mut command = match netns {
        Netns::Named(name) => {
            let mut command = Command::new(tool);
            command.args(["-n", name]);
            command
        }
        other => other.command(tool),
    };
    command.args(["-batch", "-"]);
    feed(
        command,
        &lines.join("\n"),
        &format!("{tool} batch in {netns:?}"),
    )
}

/// Runs `nft -f -` with a ruleset fragment in `netns`.
pub fn nft(netns: &Netns, ruleset: &str) -> Result<()> {
    let mut command = netns.command("nft");
    command.args(["-f", "-"]);
    feed(command, ruleset, &format!("nft in {netns:?}"))
}

/// Runs one command in `netns` and returns its standard output.
pub fn output(netns: &Netns, program: &str, args: &[&str]) -> Result<String> {
    let mut command = netns.command(program);
    command.args(args);
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} (is iproute2 installed?)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs an iproute2 listing with `-j` in `netns` and parses it (no output: no entries).
pub fn read_json(netns: &Netns, tool: &str, args: &[&str]) -> Result<Vec<serde_json::Value>> {
    let out = output(netns, tool, args)?;
    if out.trim().is_empty() {
        return Ok(vec![]);
    }
    serde_json::from_str(&out).with_context(|| format!("reading {tool} {}", args.join(" ")))
}

/// Writes a sysctl inside `netns` (`/proc/sys` shows the namespace of the reader).
pub fn sysctl(netns: &Netns, key: &str, value: &str) -> Result<()> {
    output(netns, "sysctl", &["-qw", &format!("{key}={value}")]).map(drop)
}

fn feed(mut command: Command, input: &str, what: &str) -> Result<()> {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}
