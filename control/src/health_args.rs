//! The flags of `service create` and `service update` for a service's health check
//! (`--health-cmd`, `--health-http`, `--health-tcp`, the timings, `--no-healthcheck`), with
//! Docker's names, defaults and duration syntax.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use shoal_cluster::health::{
    parse_duration, HealthCheck, HealthStatus, HealthTest, HealthUpdate, TaskHealth,
};

#[derive(Args, Clone, Debug, Default)]
pub struct HealthArgs {
    /// Command run inside each task (sh -c, with the task's confinement) to check its
    /// health: exit 0 is healthy
    #[arg(long, group = "health_test")]
    health_cmd: Option<String>,
    /// Built-in check: GET PATH on the target port from the task's namespace; 2xx/3xx is
    /// healthy (nothing needed in the task)
    #[arg(long, value_name = "PATH", group = "health_test")]
    health_http: Option<String>,
    /// Built-in check: connect to the target port from the task's namespace
    #[arg(long, group = "health_test")]
    health_tcp: bool,
    /// Port of --health-http/--health-tcp [default: the first published port's target]
    #[arg(long)]
    health_port: Option<u16>,
    /// Time between checks (ms|s|m|h) [default: 30s]
    #[arg(long, value_parser = duration)]
    health_interval: Option<Duration>,
    /// Longest a check may take (ms|s|m|h) [default: 30s]
    #[arg(long, value_parser = duration)]
    health_timeout: Option<Duration>,
    /// Failures in a row that make a task unhealthy [default: 3]
    #[arg(long)]
    health_retries: Option<u32>,
    /// Time to start before failures count (ms|s|m|h); a success ends it [default: 0s]
    #[arg(long, value_parser = duration)]
    health_start_period: Option<Duration>,
    /// Remove the service's health check
    #[arg(long, conflicts_with = "health_test")]
    no_healthcheck: bool,
}

fn duration(text: &str) -> Result<Duration> {
    parse_duration(text)
}

fn millis(duration: Option<Duration>) -> Option<u64> {
    duration.map(|d| d.as_millis() as u64)
}

impl HealthArgs {
    /// What the flags change (for `service update`; `create` applies it to no check).
    pub fn update(&self) -> HealthUpdate {
        let port = self.health_port;
        let test = match (&self.health_cmd, &self.health_http, self.health_tcp) {
            (Some(command), _, _) => Some(HealthTest::Command(command.clone())),
            (_, Some(path), _) => Some(HealthTest::Http {
                path: path.clone(),
                port,
            }),
            (_, _, true) => Some(HealthTest::Tcp { port }),
            _ => None,
        };
        HealthUpdate {
            test,
            interval_ms: millis(self.health_interval),
            timeout_ms: millis(self.health_timeout),
            retries: self.health_retries,
            start_period_ms: millis(self.health_start_period),
            disable: self.no_healthcheck,
        }
    }

    /// For `service create`: the check, if any.
    pub fn healthcheck(&self) -> Result<Option<Box<HealthCheck>>> {
        self.update().create()
    }
}

/// `Running (healthy)` and the like, as `service ps` shows a running task.
pub fn state_suffix(health: Option<&TaskHealth>, fail_open: bool) -> String {
    match health.map(|h| h.status) {
        None => String::new(),
        Some(HealthStatus::Unhealthy) if fail_open => " (unhealthy, routed: none healthy)".into(),
        Some(status) => format!(" ({})", status.label()),
    }
}

/// `task inspect --pretty`'s health and last probes (empty for a task without a check).
pub fn render_health(health: Option<&shoal_cluster::health::TaskHealth>) -> String {
    let Some(health) = health else {
        return String::new();
    };
    let mut out = format!(
        "{:<16}{} (failing streak {})\n",
        "Health:",
        health.status.label().trim_start_matches("health: "),
        health.failing_streak
    );
    for probe in &health.log {
        out.push_str(&format!(
            "  probe at {} ms, {} ms, exit {}: {}\n",
            probe.start_ms,
            probe.end_ms.saturating_sub(probe.start_ms),
            probe.exit_code,
            probe.output.trim_end().replace('\n', " / ")
        ));
    }
    out
}

/// `service inspect --pretty`'s line.
pub fn render_healthcheck(check: Option<&HealthCheck>) -> String {
    format!(
        "Healthcheck:    {}\n",
        check.map_or("none".to_owned(), HealthCheck::describe)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        health: HealthArgs,
    }

    fn parse(args: &[&str]) -> Result<HealthArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map(|c| c.health)
    }

    #[test]
    fn flags_make_the_check_with_dockers_defaults() {
        let check = parse(&["--health-cmd", "test -e /ok", "--health-interval", "1m30s"])
            .unwrap()
            .healthcheck()
            .unwrap()
            .unwrap();
        assert_eq!(check.test, HealthTest::Command("test -e /ok".into()));
        assert_eq!(
            (
                check.interval_ms,
                check.timeout_ms,
                check.retries,
                check.start_period_ms
            ),
            (90_000, 30_000, 3, 0)
        );
        let http = parse(&["--health-http", "/health", "--health-start-period", "500ms"])
            .unwrap()
            .healthcheck()
            .unwrap()
            .unwrap();
        assert_eq!(
            http.test,
            HealthTest::Http {
                path: "/health".into(),
                port: None
            }
        );
        assert_eq!(http.start_period_ms, 500);
        assert_eq!(parse(&[]).unwrap().healthcheck().unwrap(), None);
    }

    #[test]
    fn bad_flags_are_refused_with_the_reason() {
        let error = parse(&["--health-interval", "30"])
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("30s, 1m30s or 500ms"), "{error}");
        assert!(parse(&["--health-cmd", "true", "--health-tcp"]).is_err());
        assert!(parse(&["--no-healthcheck", "--health-tcp"]).is_err());
        let timings_alone = parse(&["--health-retries", "2"]).unwrap();
        assert!(timings_alone.healthcheck().is_err());
        assert!(timings_alone.update().create().is_err());
    }
}
