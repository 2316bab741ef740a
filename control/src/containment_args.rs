//! The flags of `service create` and `service update` for what a service's tasks are
//! confined to and the resources they get (`--user`, `--cap-add`, `--cap-drop`,
//! `--limit-*`, `--reserve-*`).

use anyhow::{bail, Result};
use clap::Args;
use shoal_dataplane::{
    confinement::{capability_names, DEFAULT_CAPS},
    limits::{format_cpus, format_memory, parse_cpus, parse_memory, Resources},
};

use shoal_cluster::resources::{Containment, ContainmentUpdate};

#[derive(Args, Clone, Debug, Default)]
pub struct ContainmentArgs {
    /// Run the command as USER[:GROUP], names or numbers, resolved on the task's node
    /// [default: root, with Docker's default capabilities]
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Add a capability to Docker's default set (NET_ADMIN, cap_sys_time, ALL); repeatable
    #[arg(long = "cap-add")]
    cap_add: Vec<String>,
    /// Drop a capability from the set (NET_RAW, ALL); repeatable
    #[arg(long = "cap-drop")]
    cap_drop: Vec<String>,
    /// CPUs each task may use, a decimal (1.5, 0.25): cgroup cpu.max
    #[arg(long, value_parser = cpus, allow_hyphen_values = true)]
    limit_cpu: Option<u64>,
    /// Memory each task may use (512M, 1.5G, bytes; no swap beyond it): cgroup memory.max
    #[arg(long, value_parser = memory, allow_hyphen_values = true)]
    limit_memory: Option<u64>,
    /// Processes (and threads) each task may have: cgroup pids.max
    #[arg(long, value_parser = pids, allow_hyphen_values = true)]
    limit_pids: Option<u64>,
    /// CPUs set aside for each task on its node: tasks go only where they fit
    #[arg(long, value_parser = cpus, allow_hyphen_values = true)]
    reserve_cpu: Option<u64>,
    /// Memory set aside for each task on its node (512M, 1G): tasks go only where it fits
    #[arg(long, value_parser = memory, allow_hyphen_values = true)]
    reserve_memory: Option<u64>,
}

fn cpus(text: &str) -> Result<u64> {
    parse_cpus(text)
}

fn memory(text: &str) -> Result<u64> {
    parse_memory(text)
}

fn pids(text: &str) -> Result<u64> {
    match text.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => bail!("{text:?} is not a number of processes greater than 0"),
    }
}

impl ContainmentArgs {
    /// For `service create`: checked, capability names canonical.
    pub fn containment(&self) -> Result<Containment> {
        let containment = Containment {
            user: self.user.clone(),
            cap_add: self.cap_add.clone(),
            cap_drop: self.cap_drop.clone(),
            limits: Resources {
                nano_cpus: self.limit_cpu.unwrap_or(0),
                memory_bytes: self.limit_memory.unwrap_or(0),
                pids: self.limit_pids.unwrap_or(0),
            },
            reservations: Resources {
                nano_cpus: self.reserve_cpu.unwrap_or(0),
                memory_bytes: self.reserve_memory.unwrap_or(0),
                pids: 0,
            },
        };
        containment.validate()?;
        containment.canonical()
    }

    /// For `service update`: the flags given.
    pub fn update(&self) -> ContainmentUpdate {
        let list = |caps: &Vec<String>| (!caps.is_empty()).then(|| caps.clone());
        ContainmentUpdate {
            user: self.user.clone(),
            cap_add: list(&self.cap_add),
            cap_drop: list(&self.cap_drop),
            limit_cpu: self.limit_cpu,
            limit_memory: self.limit_memory,
            limit_pids: self.limit_pids,
            reserve_cpu: self.reserve_cpu,
            reserve_memory: self.reserve_memory,
        }
    }
}

/// `node inspect --pretty`: what the node offers reservations, as Swarm shows it.
pub fn render_node_resources(resources: &Resources) -> String {
    let or_unknown = |value: u64, show: fn(u64) -> String| {
        if value == 0 {
            "unknown".to_owned()
        } else {
            show(value)
        }
    };
    format!(
        "Resources:\n CPUs:              {}\n Memory:            {}\n",
        or_unknown(resources.nano_cpus, format_cpus),
        or_unknown(resources.memory_bytes, format_memory)
    )
}

/// `service inspect --pretty`: the tasks' user, capabilities, limits and reservations.
pub fn render_containment(containment: &Containment) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let caps = containment.capabilities();
    let _ = writeln!(
        out,
        "User:           {}",
        containment.user.as_deref().unwrap_or("root")
    );
    let _ = writeln!(
        out,
        "Capabilities:   {}{}",
        if caps == DEFAULT_CAPS {
            "Docker's default set: ".to_owned()
        } else {
            String::new()
        },
        match capability_names(caps) {
            names if names.is_empty() => "none".to_owned(),
            names => names.join(", "),
        }
    );
    let amount = |label: &str, value: u64, show: fn(u64) -> String| {
        (value != 0).then(|| format!("{label} {}", show(value)))
    };
    let describe = |r: &Resources| {
        let parts: Vec<String> = [
            amount("CPUs", r.nano_cpus, format_cpus),
            amount("memory", r.memory_bytes, format_memory),
            amount("pids", r.pids, |n| n.to_string()),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            "none".to_owned()
        } else {
            parts.join(", ")
        }
    };
    let _ = writeln!(out, "Limits:         {}", describe(&containment.limits));
    let _ = writeln!(
        out,
        "Reservations:   {}",
        describe(&containment.reservations)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ContainmentArgs,
    }

    fn parse(args: &[&str]) -> Result<Containment, String> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.args.containment().map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn flags_take_units_and_name_themselves_in_errors() {
        let c = parse(&[
            "--limit-cpu",
            "1.5",
            "--limit-memory",
            "512M",
            "--limit-pids",
            "100",
            "--reserve-cpu",
            "0.5",
            "--reserve-memory",
            "256m",
            "--cap-add",
            "cap_net_admin",
            "--user",
            "nobody",
        ])
        .unwrap();
        assert_eq!(c.limits.nano_cpus, 1_500_000_000);
        assert_eq!(c.limits.memory_bytes, 512 << 20);
        assert_eq!(c.limits.pids, 100);
        assert_eq!(c.reservations.nano_cpus, 500_000_000);
        assert_eq!(c.reservations.memory_bytes, 256 << 20);
        assert_eq!(c.cap_add, vec!["NET_ADMIN".to_owned()]);
        for (args, flag) in [
            (&["--limit-cpu", "0"][..], "--limit-cpu"),
            (&["--limit-cpu", "-1"][..], "--limit-cpu"),
            (&["--limit-memory", "0"][..], "--limit-memory"),
            (&["--limit-memory", "12Q"][..], "--limit-memory"),
            (&["--limit-pids", "0"][..], "--limit-pids"),
            (&["--reserve-memory", "-5M"][..], "--reserve-memory"),
        ] {
            let err = parse(args).unwrap_err();
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        assert!(parse(&["--cap-add", "FLY"])
            .unwrap_err()
            .contains("unknown capability"));
    }
}
