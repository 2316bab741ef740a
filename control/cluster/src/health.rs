//! Service health checks: what a service asks for (`HealthCheck`, in its spec), what a task
//! reports (`TaskHealth`), and the state machine between them (`HealthTracker`), as Docker
//! defines it: a task starts `starting`; a success makes it `healthy`; `retries` failures in
//! a row make it `unhealthy`; failures during the start period do not count, and a success
//! ends the start period. Pure: the worker runs the probes and feeds the results in.

use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Docker's defaults.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_RETRIES: u32 = 3;
/// How many probe results a task keeps (and reports), newest last, as Docker keeps 5.
pub const PROBE_LOG_LEN: usize = 5;
/// How much of a probe's output is kept.
pub const PROBE_OUTPUT_MAX: usize = 4096;

/// A service's health check (`--health-*`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub test: HealthTest,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
    pub start_period_ms: u64,
}

/// What a probe does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthTest {
    /// `--health-cmd`: a shell command run inside the task, with its confinement; exit 0 is
    /// healthy.
    Command(String),
    /// `--health-http PATH`: the agent sends `GET PATH` to the port from inside the task's
    /// network namespace; a 2xx or 3xx status is healthy.
    Http { path: String, port: HealthPort },
    /// `--health-tcp`: the agent connects to the port from inside the task's network
    /// namespace; an accepted connection is healthy.
    Tcp { port: HealthPort },
}

/// The port a built-in probe tries: `--health-port`, or the target of the service's first
/// published port (resolved when the probe runs, so an update of the ports follows).
pub type HealthPort = Option<u16>;

impl HealthCheck {
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn start_period(&self) -> Duration {
        Duration::from_millis(self.start_period_ms)
    }

    /// The port a built-in probe tries, given the service's first published target port.
    pub fn probe_port(port: HealthPort, first_target: Option<u16>) -> Option<u16> {
        port.or(first_target)
    }

    /// Refuses a check that could never work (`first_target`: the target of the service's
    /// first published port).
    pub fn validate(&self, first_target: Option<u16>) -> Result<()> {
        if self.interval_ms == 0 || self.timeout_ms == 0 {
            bail!("--health-interval and --health-timeout must be greater than 0");
        }
        if self.retries == 0 {
            bail!("--health-retries must be at least 1");
        }
        match &self.test {
            HealthTest::Command(command) if command.trim().is_empty() => {
                bail!("--health-cmd is empty")
            }
            HealthTest::Http { path, .. } if !path.starts_with('/') => {
                bail!("--health-http {path:?}: the path must start with /")
            }
            HealthTest::Http { path, .. } if path.bytes().any(|b| b.is_ascii_whitespace()) => {
                bail!("--health-http {path:?}: the path may not contain spaces")
            }
            HealthTest::Http { port, .. } | HealthTest::Tcp { port }
                if Self::probe_port(*port, first_target).is_none_or(|p| p == 0) =>
            {
                bail!(
                    "--health-http and --health-tcp probe the service's target port: publish a \
                     port (--publish) or name one with --health-port"
                )
            }
            _ => Ok(()),
        }
    }

    /// `cmd: test ! -e /tmp/sick`, `http: GET :80/health`, `tcp: :80`, as inspect shows it.
    pub fn describe(&self) -> String {
        let test = match &self.test {
            HealthTest::Command(command) => format!("cmd: {command}"),
            HealthTest::Http { path, port } => format!("http: GET {path} on {}", port_text(*port)),
            HealthTest::Tcp { port } => format!("tcp: {}", port_text(*port)),
        };
        format!(
            "{test}, every {:?}, timeout {:?}, {} retries, start period {:?}",
            self.interval(),
            self.timeout(),
            self.retries,
            self.start_period()
        )
    }
}

fn port_text(port: HealthPort) -> String {
    port.map_or("the target port".to_owned(), |p| format!("port {p}"))
}

/// What `service update` changes of the health check: each `--health-*` flag given
/// replaces its part (a new test, or a timing of the existing check); `--no-healthcheck`
/// removes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthUpdate {
    #[serde(default)]
    pub test: Option<HealthTest>,
    #[serde(default)]
    pub interval_ms: Option<u64>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    #[serde(default)]
    pub retries: Option<u32>,
    #[serde(default)]
    pub start_period_ms: Option<u64>,
    #[serde(default)]
    pub disable: bool,
}

impl HealthUpdate {
    fn timings_given(&self) -> bool {
        self.interval_ms.is_some()
            || self.timeout_ms.is_some()
            || self.retries.is_some()
            || self.start_period_ms.is_some()
    }

    /// The check `service create` makes of the flags (None: no `--health-cmd/-http/-tcp`).
    pub fn create(&self) -> Result<Option<Box<HealthCheck>>> {
        let mut check = None;
        self.apply(&mut check)?;
        Ok(check)
    }

    /// Applies the flags to a service's check; true when it changed.
    pub fn apply(&self, check: &mut Option<Box<HealthCheck>>) -> Result<bool> {
        let before = check.clone();
        if self.disable {
            if self.test.is_some() || self.timings_given() {
                bail!("--no-healthcheck conflicts with the other --health-* flags");
            }
            *check = None;
            return Ok(before.is_some());
        }
        let updated = match (check.take(), &self.test) {
            (Some(mut existing), test) => {
                if let Some(test) = test {
                    existing.test = test.clone();
                }
                Some(existing)
            }
            (None, Some(test)) => Some(Box::new(HealthCheck {
                test: test.clone(),
                interval_ms: DEFAULT_INTERVAL.as_millis() as u64,
                timeout_ms: DEFAULT_TIMEOUT.as_millis() as u64,
                retries: DEFAULT_RETRIES,
                start_period_ms: 0,
            })),
            (None, None) if self.timings_given() => bail!(
                "--health-interval, --health-timeout, --health-retries and \
                 --health-start-period need a check: --health-cmd, --health-http or --health-tcp"
            ),
            (None, None) => None,
        };
        *check = updated.map(|mut c| {
            c.interval_ms = self.interval_ms.unwrap_or(c.interval_ms);
            c.timeout_ms = self.timeout_ms.unwrap_or(c.timeout_ms);
            c.retries = self.retries.unwrap_or(c.retries);
            c.start_period_ms = self.start_period_ms.unwrap_or(c.start_period_ms);
            c
        });
        Ok(*check != before)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Starting,
    Healthy,
    Unhealthy,
}

impl HealthStatus {
    pub fn label(self) -> &'static str {
        match self {
            HealthStatus::Starting => "health: starting",
            HealthStatus::Healthy => "healthy",
            HealthStatus::Unhealthy => "unhealthy",
        }
    }
}

/// One probe, as Docker's `State.Health.Log` has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthProbe {
    /// Unix milliseconds.
    pub start_ms: u64,
    pub end_ms: u64,
    /// 0 healthy; 1 unhealthy (a command's own non-zero code is kept as it exited).
    pub exit_code: i32,
    /// The command's output or what the built-in probe saw, at most `PROBE_OUTPUT_MAX` bytes.
    pub output: String,
}

impl HealthProbe {
    pub fn passed(&self) -> bool {
        self.exit_code == 0
    }
}

/// A task's health, as its node reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskHealth {
    pub status: HealthStatus,
    /// Failures in a row that counted.
    pub failing_streak: u32,
    /// The last probes, oldest first.
    pub log: Vec<HealthProbe>,
}

impl TaskHealth {
    /// A change worth replicating: the status or the failing streak moved (every counted
    /// failure, and the return to healthy), or a new probe of a task that is not healthy (so
    /// a starting task's probes can be seen); passing probes of a healthy task are not.
    pub fn moved_from(&self, before: Option<&TaskHealth>) -> bool {
        before.is_none_or(|b| {
            b.status != self.status
                || b.failing_streak != self.failing_streak
                || (self.status != HealthStatus::Healthy && b.log.last() != self.log.last())
        })
    }
}

/// The health state machine of one task.
#[derive(Clone, Debug)]
pub struct HealthTracker {
    retries: u32,
    start_period: Duration,
    /// Until the first success, or the start period's end, failures do not count.
    in_start_period: bool,
    health: TaskHealth,
}

impl HealthTracker {
    pub fn new(check: &HealthCheck) -> Self {
        Self {
            retries: check.retries,
            start_period: check.start_period(),
            in_start_period: true,
            health: TaskHealth {
                status: HealthStatus::Starting,
                failing_streak: 0,
                log: Vec::new(),
            },
        }
    }

    pub fn health(&self) -> &TaskHealth {
        &self.health
    }

    /// Takes one probe's result, `since_start` after the task started; returns the status
    /// when it changed.
    pub fn record(&mut self, probe: HealthProbe, since_start: Duration) -> Option<HealthStatus> {
        let before = self.health.status;
        if since_start >= self.start_period {
            self.in_start_period = false;
        }
        if probe.passed() {
            self.in_start_period = false;
            self.health.failing_streak = 0;
            self.health.status = HealthStatus::Healthy;
        } else if !self.in_start_period {
            self.health.failing_streak += 1;
            if self.health.failing_streak >= self.retries {
                self.health.status = HealthStatus::Unhealthy;
            }
        }
        self.health.log.push(probe);
        let excess = self.health.log.len().saturating_sub(PROBE_LOG_LEN);
        self.health.log.drain(..excess);
        (self.health.status != before).then_some(self.health.status)
    }
}

/// A duration as Docker writes it (Go's `time.ParseDuration`): `30s`, `1m30s`, `500ms`,
/// `1.5h`, units `ns us µs ms s m h`; a bare `0` is zero. A dozen lines, so no dependency
/// for it (the crates that parse durations take a different grammar: `1 minute`, no `1.5s`).
pub fn parse_duration(text: &str) -> Result<Duration> {
    let bad = || anyhow::anyhow!("invalid duration {text:?}: write it as 30s, 1m30s or 500ms");
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(bad)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| bad())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad()),
        };
        rest = &rest[unit_len..];
        total += number * nanos_per_unit;
    }
    if total > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(Duration::from_nanos(total.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(retries: u32, start_period: Duration) -> HealthCheck {
        HealthCheck {
            test: HealthTest::Tcp { port: None },
            interval_ms: 1000,
            timeout_ms: 1000,
            retries,
            start_period_ms: start_period.as_millis() as u64,
        }
    }

    fn probe(passed: bool) -> HealthProbe {
        HealthProbe {
            start_ms: 0,
            end_ms: 1,
            exit_code: if passed { 0 } else { 1 },
            output: String::new(),
        }
    }

    const SEC: Duration = Duration::from_secs(1);

    #[test]
    fn a_task_starts_starting_and_one_success_makes_it_healthy() {
        let mut tracker = HealthTracker::new(&check(3, Duration::ZERO));
        assert_eq!(tracker.health().status, HealthStatus::Starting);
        assert_eq!(
            tracker.record(probe(true), SEC),
            Some(HealthStatus::Healthy)
        );
        assert_eq!(tracker.record(probe(true), 2 * SEC), None);
    }

    #[test]
    fn retries_failures_in_a_row_make_it_unhealthy_and_a_success_resets_the_streak() {
        let mut tracker = HealthTracker::new(&check(3, Duration::ZERO));
        tracker.record(probe(true), SEC);
        assert_eq!(tracker.record(probe(false), 2 * SEC), None);
        assert_eq!(tracker.record(probe(false), 3 * SEC), None);
        assert_eq!(tracker.health().failing_streak, 2);
        assert_eq!(tracker.record(probe(true), 4 * SEC), None);
        assert_eq!(tracker.health().failing_streak, 0);
        for at in 5..7 {
            assert_eq!(tracker.record(probe(false), at * SEC), None);
        }
        assert_eq!(
            tracker.record(probe(false), 7 * SEC),
            Some(HealthStatus::Unhealthy)
        );
        assert_eq!(
            tracker.record(probe(true), 8 * SEC),
            Some(HealthStatus::Healthy)
        );
    }

    #[test]
    fn a_task_that_never_passes_goes_from_starting_to_unhealthy() {
        let mut tracker = HealthTracker::new(&check(2, Duration::ZERO));
        assert_eq!(tracker.record(probe(false), SEC), None);
        assert_eq!(tracker.health().status, HealthStatus::Starting);
        assert_eq!(
            tracker.record(probe(false), 2 * SEC),
            Some(HealthStatus::Unhealthy)
        );
    }

    #[test]
    fn failures_in_the_start_period_do_not_count() {
        let mut tracker = HealthTracker::new(&check(1, 10 * SEC));
        for at in 1..10 {
            assert_eq!(tracker.record(probe(false), at * SEC), None);
        }
        assert_eq!(tracker.health().failing_streak, 0);
        assert_eq!(tracker.health().status, HealthStatus::Starting);
        assert_eq!(
            tracker.record(probe(false), 10 * SEC),
            Some(HealthStatus::Unhealthy)
        );
    }

    #[test]
    fn a_success_ends_the_start_period() {
        let mut tracker = HealthTracker::new(&check(1, 60 * SEC));
        assert_eq!(
            tracker.record(probe(true), SEC),
            Some(HealthStatus::Healthy)
        );
        assert_eq!(
            tracker.record(probe(false), 2 * SEC),
            Some(HealthStatus::Unhealthy)
        );
    }

    #[test]
    fn the_log_keeps_the_last_probes() {
        let mut tracker = HealthTracker::new(&check(100, Duration::ZERO));
        for at in 0..(PROBE_LOG_LEN as u64 + 3) {
            let mut p = probe(false);
            p.start_ms = at;
            tracker.record(p, SEC);
        }
        let log = &tracker.health().log;
        assert_eq!(log.len(), PROBE_LOG_LEN);
        assert_eq!(log.last().unwrap().start_ms, PROBE_LOG_LEN as u64 + 2);
    }

    #[test]
    fn changes_and_probes_of_unhealthy_tasks_are_moves_not_passing_probes() {
        let mut tracker = HealthTracker::new(&check(3, 60 * SEC));
        let starting = tracker.health().clone();
        let mut failed = probe(false);
        failed.start_ms = 7;
        tracker.record(failed, SEC);
        assert!(
            tracker.health().moved_from(Some(&starting)),
            "a probe in the start period is seen"
        );
        tracker.record(probe(true), SEC);
        let healthy = tracker.health().clone();
        assert!(healthy.moved_from(None));
        tracker.record(probe(true), 2 * SEC);
        assert!(!tracker.health().moved_from(Some(&healthy)));
        tracker.record(probe(false), 3 * SEC);
        assert!(tracker.health().moved_from(Some(&healthy)));
    }

    #[test]
    fn updates_replace_what_they_name_and_no_healthcheck_removes_it() {
        let tcp = HealthUpdate {
            test: Some(HealthTest::Tcp { port: None }),
            ..HealthUpdate::default()
        };
        let mut check = tcp.create().unwrap();
        assert_eq!(check.as_ref().unwrap().interval(), DEFAULT_INTERVAL);
        let faster = HealthUpdate {
            interval_ms: Some(1000),
            ..HealthUpdate::default()
        };
        assert!(faster.apply(&mut check).unwrap());
        let check_now = check.clone().unwrap();
        assert_eq!((check_now.interval_ms, check_now.retries), (1000, 3));
        assert_eq!(check_now.test, HealthTest::Tcp { port: None });
        assert!(!faster.apply(&mut check).unwrap(), "no change");
        let off = HealthUpdate {
            disable: true,
            ..HealthUpdate::default()
        };
        assert!(off.apply(&mut check).unwrap());
        assert_eq!(check, None);
        assert!(faster.create().is_err(), "timings without a test");
        let both = HealthUpdate {
            disable: true,
            ..tcp
        };
        assert!(both.create().is_err());
        assert_eq!(HealthUpdate::default().create().unwrap(), None);
    }

    #[test]
    fn durations_parse_as_docker_writes_them() {
        let ms = Duration::from_millis;
        for (text, want) in [
            ("30s", ms(30_000)),
            ("1m30s", ms(90_000)),
            ("500ms", ms(500)),
            ("1.5h", ms(5_400_000)),
            ("2m", ms(120_000)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("100us", Duration::from_micros(100)),
            ("1h2m3s4ms", ms(3_723_004)),
        ] {
            assert_eq!(parse_duration(text).unwrap(), want, "{text}");
        }
        for text in ["", "30", "s", "1x", "-1s", "1m30", "1.2.3s", " 1s", "1 s"] {
            assert!(parse_duration(text).is_err(), "{text:?} must be refused");
        }
    }

    #[test]
    fn checks_that_cannot_work_are_refused() {
        let published = Some(80);
        let mut bad = check(3, Duration::ZERO);
        let error = bad.validate(None).unwrap_err().to_string();
        assert!(error.contains("--publish"), "{error}");
        bad.test = HealthTest::Tcp { port: Some(8080) };
        assert!(bad.validate(None).is_ok(), "--health-port names the port");
        bad.test = HealthTest::Http {
            path: "health".into(),
            port: None,
        };
        assert!(bad.validate(published).is_err());
        bad.test = HealthTest::Command(" ".into());
        assert!(bad.validate(published).is_err());
        let mut zero = check(3, Duration::ZERO);
        zero.interval_ms = 0;
        assert!(zero.validate(published).is_err());
        assert!(check(0, Duration::ZERO).validate(published).is_err());
        assert!(check(3, Duration::ZERO).validate(published).is_ok());
    }
}
