//! nftables rules, through the `nft` program: the netlink protocol of nftables has no
//! maintained Rust binding, and its rulesets are text either way, so `nft -f -` stays a process
//! (netavark execs `nft` too). One transaction per call. In another namespace the child enters
//! it itself (setns between fork and exec), so no `ip netns exec` or `nsenter` runs.

use std::{
    fs::File,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::Netns;

/// `nft` with `args`, to run inside `netns`.
fn command(netns: &Netns, args: &[&str]) -> Result<Command> {
    let mut command = Command::new("nft");
    command.args(args);
    if let Some(path) = netns.path() {
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: setns is async-signal-safe; the file stays open in the closure until exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Ok(command)
}

/// Applies a ruleset fragment (`nft -f -`) in `netns`, all or nothing.
pub fn apply(netns: &Netns, ruleset: &str) -> Result<()> {
    let mut child = command(netns, &["-f", "-"])?
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting nft (is nftables installed?)")?;
    child
        .stdin
        .take()
        .context("nft's stdin")?
        .write_all(ruleset.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "nft in {netns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `nft ARGS` in `netns` and returns what it printed.
pub fn output(netns: &Netns, args: &[&str]) -> Result<String> {
    let out = command(netns, args)?
        .stdin(Stdio::null())
        .output()
        .context("running nft (is nftables installed?)")?;
    if !out.status.success() {
        bail!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
