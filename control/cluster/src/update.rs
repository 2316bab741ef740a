//! A service's lifecycle policies: what happens when a task ends (the restart policy), how a
//! new spec rolls out and when it is given up (update and rollback configs), and where a
//! rollout stands (`UpdateStatus`, as `service inspect` shows it). Types and pure decisions;
//! the orchestrator applies them, `plan` changes them.

use std::{fmt, str::FromStr};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::state::{Service, ServiceSpec, TaskState, Timestamp};

/// Swarm's default delay before a task that ended is replaced, so a crashing command does
/// not spin.
pub const DEFAULT_RESTART_DELAY_SECS: u64 = 5;
/// Swarm's default time a new task is watched for failing after it starts.
pub const DEFAULT_MONITOR_SECS: u64 = 5;

/// `--restart-condition`: which ends of a task bring a replacement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartCondition {
    None,
    OnFailure,
    #[default]
    Any,
}

/// `--restart-*`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RestartPolicy {
    pub condition: RestartCondition,
    pub delay_secs: u64,
    /// Restarts allowed (within `window_secs` when set); 0: no limit.
    pub max_attempts: u64,
    /// 0: every restart of the slot's current spec counts.
    pub window_secs: u64,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            condition: RestartCondition::Any,
            delay_secs: DEFAULT_RESTART_DELAY_SECS,
            max_attempts: 0,
            window_secs: 0,
        }
    }
}

impl RestartPolicy {
    /// Whether a slot whose newest task ended on its own (`ended`: Complete, Failed or
    /// Rejected) gets a replacement, given when each of the slot's tasks of the current spec
    /// that ended on their own ended, oldest first (the newest task's end last). Attempts are
    /// counted in the window that closes with the last end, as Swarm does, so the decision
    /// does not change as time passes: a slot that ran out of attempts stays empty.
    pub fn allows_restart(&self, ended: TaskState, ends: &[Timestamp]) -> bool {
        let condition_met = match ended {
            TaskState::Complete => self.condition == RestartCondition::Any,
            _ => self.condition != RestartCondition::None,
        };
        if !condition_met || self.max_attempts == 0 {
            return condition_met;
        }
        let last = ends.last().copied().unwrap_or_default();
        let in_window = ends
            .iter()
            .filter(|&&end| self.window_secs == 0 || end + self.window_secs >= last)
            .count() as u64;
        // The first end is the original task's; each one after it was a restart.
        in_window <= self.max_attempts
    }
}

/// `--update-failure-action` / `--rollback-failure-action`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureAction {
    #[default]
    Pause,
    Continue,
    Rollback,
}

/// `--update-order` / `--rollback-order`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum UpdateOrder {
    /// The old task stops, then its replacement starts (Swarm's default).
    #[default]
    StopFirst,
    /// The replacement starts; the old task stops once the new one is ready.
    StartFirst,
}

/// `--update-max-failure-ratio`: a fraction of the tasks, 0 to 1 (never NaN: only `FromStr`
/// and JSON, which has no NaN, make one).
#[derive(Clone, Copy, Debug, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FailureRatio(f64);

impl Eq for FailureRatio {}

impl FailureRatio {
    pub fn get(self) -> f64 {
        self.0
    }
}

/// When an update's failures are too many: some failed, and more than the ratio of the
/// tasks it updates (Swarm's rule: with the default ratio 0, the first failure).
pub fn over_failure_ratio(failures: usize, tasks: usize, max: FailureRatio) -> bool {
    failures > 0 && failures as f64 > max.get() * tasks.max(1) as f64
}

/// The part of an update config besides parallelism and delay (which `ServiceSpec` holds as
/// `update_parallelism` / `update_delay_secs`, from before these).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdateControl {
    pub failure_action: FailureAction,
    /// How long after its creation a new task that ends counts as a failure of the update.
    pub monitor_secs: u64,
    pub max_failure_ratio: FailureRatio,
    pub order: UpdateOrder,
}

impl Default for UpdateControl {
    fn default() -> Self {
        Self {
            failure_action: FailureAction::Pause,
            monitor_secs: DEFAULT_MONITOR_SECS,
            max_failure_ratio: FailureRatio(0.0),
            order: UpdateOrder::StopFirst,
        }
    }
}

/// How a rollout proceeds: `--update-*`, or `--rollback-*` for a rollback.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UpdateConfig {
    /// Tasks replaced at once; 0: all of them.
    pub parallelism: u64,
    /// Wait between batches.
    pub delay_secs: u64,
    #[serde(flatten)]
    pub control: UpdateControl,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        Self {
            parallelism: 1,
            delay_secs: 0,
            control: UpdateControl::default(),
        }
    }
}

/// Where a rollout stands, with Swarm's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    Updating,
    Paused,
    Completed,
    RollbackStarted,
    RollbackPaused,
    RollbackCompleted,
}

/// `UpdateStatus` of `service inspect`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateStatus {
    pub state: UpdateState,
    pub started_at: Timestamp,
    pub completed_at: Option<Timestamp>,
    pub message: String,
}

/// What a rollout's failure does to the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// The status changes; the spec stays.
    Status(UpdateStatus),
    /// The service goes back to its previous spec, with this status.
    RollBack(UpdateStatus),
}

impl UpdateStatus {
    /// A new spec starts rolling out (also when an update was paused: it resumes with it).
    pub fn updating(at: Timestamp) -> Self {
        Self::new(UpdateState::Updating, at, "update in progress")
    }

    /// `service rollback`.
    pub fn manual_rollback(at: Timestamp) -> Self {
        Self::new(
            UpdateState::RollbackStarted,
            at,
            "manually requested rollback",
        )
    }

    fn new(state: UpdateState, at: Timestamp, message: &str) -> Self {
        Self {
            state,
            started_at: at,
            completed_at: None,
            message: message.to_owned(),
        }
    }

    /// Tasks are being replaced (not paused, not done).
    pub fn in_progress(&self) -> bool {
        matches!(
            self.state,
            UpdateState::Updating | UpdateState::RollbackStarted
        )
    }

    pub fn is_rollback(&self) -> bool {
        matches!(
            self.state,
            UpdateState::RollbackStarted
                | UpdateState::RollbackPaused
                | UpdateState::RollbackCompleted
        )
    }

    /// The failures of a rollout in progress went over its ratio, the last one `task`'s:
    /// pause, roll back (a rollback is never rolled back: it pauses), or go on (None).
    pub fn on_failure(
        &self,
        action: FailureAction,
        task: &str,
        at: Timestamp,
    ) -> Option<Transition> {
        let why = format!("due to failure or early termination of task {task}");
        match (self.state, action) {
            (_, FailureAction::Continue) => None,
            (UpdateState::Updating, FailureAction::Pause) => Some(Transition::Status(Self {
                state: UpdateState::Paused,
                message: format!("update paused {why}"),
                ..self.clone()
            })),
            (UpdateState::Updating, FailureAction::Rollback) => {
                Some(Transition::RollBack(Self::new(
                    UpdateState::RollbackStarted,
                    at,
                    &format!("update rolled back {why}"),
                )))
            }
            (UpdateState::RollbackStarted, _) => Some(Transition::Status(Self {
                state: UpdateState::RollbackPaused,
                message: format!("rollback paused {why}"),
                ..self.clone()
            })),
            _ => None,
        }
    }

    /// Every task runs the spec and passed its monitor window.
    pub fn completed(&self, at: Timestamp) -> Option<Self> {
        let (state, message) = match self.state {
            UpdateState::Updating => (UpdateState::Completed, "update completed"),
            UpdateState::RollbackStarted => (UpdateState::RollbackCompleted, "rollback completed"),
            _ => return None,
        };
        Some(Self {
            state,
            completed_at: Some(at),
            message: message.to_owned(),
            ..self.clone()
        })
    }
}

/// Swaps the service's spec with its previous one (and the versions their tasks run), so the
/// tasks still running the previous spec are kept and the others replaced.
pub fn roll_back(service: &mut Service) -> Result<()> {
    let Some(previous) = service.previous_spec.take() else {
        bail!(
            "service {} has no previous spec to roll back to: it was never updated",
            service.spec.name
        );
    };
    let current = std::mem::replace(&mut service.spec, *previous);
    service.previous_spec = Some(Box::new(current));
    std::mem::swap(&mut service.version, &mut service.previous_version);
    Ok(())
}

/// `--restart-*`, `--update-*` and `--rollback-*` changes of `service update`: they change
/// how tasks are replaced, not the tasks, so none of them rolls the tasks.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct PolicyUpdate {
    pub restart_condition: Option<RestartCondition>,
    pub restart_delay_secs: Option<u64>,
    pub restart_max_attempts: Option<u64>,
    pub restart_window_secs: Option<u64>,
    pub update: ConfigUpdate,
    pub rollback: ConfigUpdate,
}

/// Changes to one update config.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigUpdate {
    pub parallelism: Option<u64>,
    pub delay_secs: Option<u64>,
    pub failure_action: Option<FailureAction>,
    pub monitor_secs: Option<u64>,
    pub max_failure_ratio: Option<FailureRatio>,
    pub order: Option<UpdateOrder>,
}

impl ConfigUpdate {
    fn apply(&self, config: &mut UpdateConfig) {
        let control = &mut config.control;
        set(&mut config.parallelism, self.parallelism);
        set(&mut config.delay_secs, self.delay_secs);
        set(&mut control.failure_action, self.failure_action);
        set(&mut control.monitor_secs, self.monitor_secs);
        set(&mut control.max_failure_ratio, self.max_failure_ratio);
        set(&mut control.order, self.order);
    }
}

fn set<T>(field: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *field = value;
    }
}

impl PolicyUpdate {
    pub fn apply(&self, spec: &mut ServiceSpec) {
        let restart = &mut spec.restart;
        set(&mut restart.condition, self.restart_condition);
        set(&mut restart.delay_secs, self.restart_delay_secs);
        set(&mut restart.max_attempts, self.restart_max_attempts);
        set(&mut restart.window_secs, self.restart_window_secs);
        let mut update = spec.update_config();
        self.update.apply(&mut update);
        spec.set_update_config(update);
        self.rollback.apply(&mut spec.rollback_config);
    }
}

/// Checks what `ServiceSpec::validate` cannot say better.
pub fn validate(spec: &ServiceSpec) -> Result<()> {
    if spec.rollback_config.control.failure_action == FailureAction::Rollback {
        bail!(
            "service {}: --rollback-failure-action must be pause or continue (a rollback is \
             never rolled back)",
            spec.name
        );
    }
    Ok(())
}

fn parse_choice<T: Copy>(text: &str, what: &str, choices: &[(&str, T)]) -> Result<T> {
    choices
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, value)| *value)
        .with_context(|| {
            let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
            format!("{what} {text:?}: expected {}", names.join(", "))
        })
}

impl FromStr for RestartCondition {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        use RestartCondition::*;
        parse_choice(
            text,
            "restart condition",
            &[("none", None), ("on-failure", OnFailure), ("any", Any)],
        )
    }
}

impl FromStr for FailureAction {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        use FailureAction::*;
        parse_choice(
            text,
            "failure action",
            &[
                ("pause", Pause),
                ("continue", Continue),
                ("rollback", Rollback),
            ],
        )
    }
}

impl FromStr for UpdateOrder {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        use UpdateOrder::*;
        parse_choice(
            text,
            "update order",
            &[("stop-first", StopFirst), ("start-first", StartFirst)],
        )
    }
}

impl FromStr for FailureRatio {
    type Err = anyhow::Error;
    fn from_str(text: &str) -> Result<Self> {
        match text.parse::<f64>() {
            Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(Self(ratio)),
            _ => bail!("failure ratio {text:?}: expected a number from 0 to 1, e.g. 0.2"),
        }
    }
}

impl fmt::Display for RestartCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::OnFailure => "on-failure",
            Self::Any => "any",
        })
    }
}

impl fmt::Display for FailureAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Pause => "pause",
            Self::Continue => "continue",
            Self::Rollback => "rollback",
        })
    }
}

impl fmt::Display for UpdateOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::StopFirst => "stop-first",
            Self::StartFirst => "start-first",
        })
    }
}

impl fmt::Display for UpdateState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Updating => "updating",
            Self::Paused => "paused",
            Self::Completed => "completed",
            Self::RollbackStarted => "rollback_started",
            Self::RollbackPaused => "rollback_paused",
            Self::RollbackCompleted => "rollback_completed",
        })
    }
}

/// A duration as Docker writes it (Go's syntax): `5s`, `1m30s`, `500ms`, `1.5h`, `0`, in
/// whole seconds, rounded up (the managers' clock counts seconds). Hand-written because
/// humantime, the maintained parser, reads another syntax (`1h 30m`, no fractions).
pub fn parse_duration_secs(text: &str) -> Result<u64> {
    let usage = || format!("duration {text:?}: expected e.g. 5s, 1m30s, 500ms");
    let mut rest = text.trim();
    // A bare number is seconds, as shoal read `--update-delay` before Docker's syntax.
    if let Ok(secs) = rest.parse::<u64>() {
        return Ok(secs);
    }
    if rest.is_empty() {
        bail!(usage());
    }
    let mut nanos: f64 = 0.0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .with_context(|| format!("{}: a unit is missing", usage()))?;
        let (number, tail) = rest.split_at(number_end);
        let value: f64 = number.parse().with_context(usage)?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => bail!("{}: unknown unit {unit:?} (ns, us, ms, s, m, h)", usage()),
        };
        nanos += value * scale;
        rest = tail;
    }
    Ok((nanos / 1e9).ceil() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_docker_writes_them() {
        for (text, secs) in [
            ("5s", 5),
            ("1m30s", 90),
            ("500ms", 1),
            ("1.5h", 5400),
            ("0", 0),
            ("0s", 0),
            ("2m", 120),
            ("1h1m1s", 3661),
        ] {
            assert_eq!(parse_duration_secs(text).unwrap(), secs, "{text}");
        }
        assert_eq!(
            parse_duration_secs("7").unwrap(),
            7,
            "a bare number is seconds"
        );
        for bad in ["", "5x", "s", "1m30", "-1s", "ten", "5d"] {
            assert!(parse_duration_secs(bad).is_err(), "{bad:?} refused");
        }
    }

    #[test]
    fn restart_conditions_and_attempts() {
        let policy = |condition, max_attempts, window_secs| RestartPolicy {
            condition,
            delay_secs: 5,
            max_attempts,
            window_secs,
        };
        use RestartCondition::*;
        use TaskState::{Complete, Failed, Rejected};
        assert!(policy(Any, 0, 0).allows_restart(Complete, &[10]));
        assert!(!policy(OnFailure, 0, 0).allows_restart(Complete, &[10]));
        assert!(policy(OnFailure, 0, 0).allows_restart(Failed, &[10]));
        assert!(policy(OnFailure, 0, 0).allows_restart(Rejected, &[10]));
        assert!(!policy(None, 0, 0).allows_restart(Failed, &[10]));
        // Two restarts, then no more.
        let two = policy(Any, 2, 0);
        assert!(two.allows_restart(Failed, &[10]));
        assert!(two.allows_restart(Failed, &[10, 20]));
        assert!(!two.allows_restart(Failed, &[10, 20, 30]));
        // In a window, only the ends it holds count.
        let windowed = policy(Any, 2, 15);
        assert!(windowed.allows_restart(Failed, &[10, 20, 30]));
        assert!(!windowed.allows_restart(Failed, &[10, 20, 25]));
    }

    #[test]
    fn failure_ratio_is_swarms() {
        let ratio = |text: &str| text.parse::<FailureRatio>().unwrap();
        assert!(!over_failure_ratio(0, 3, ratio("0")));
        assert!(over_failure_ratio(1, 3, ratio("0")));
        assert!(!over_failure_ratio(1, 4, ratio("0.25")));
        assert!(over_failure_ratio(2, 4, ratio("0.25")));
        assert!(!over_failure_ratio(3, 3, ratio("1")));
        for bad in ["-0.1", "1.5", "NaN", "half"] {
            assert!(bad.parse::<FailureRatio>().is_err(), "{bad}");
        }
    }

    #[test]
    fn update_status_transitions() {
        use UpdateState::*;
        let updating = UpdateStatus::updating(100);
        assert!(updating.in_progress() && !updating.is_rollback());
        // Pause keeps when it started and says which task failed.
        let Some(Transition::Status(paused)) = updating.on_failure(FailureAction::Pause, "t1", 105)
        else {
            panic!("pause")
        };
        assert_eq!((paused.state, paused.started_at), (Paused, 100));
        assert_eq!(
            paused.message,
            "update paused due to failure or early termination of task t1"
        );
        assert!(!paused.in_progress());
        assert_eq!(paused.on_failure(FailureAction::Pause, "t2", 106), None);
        assert_eq!(
            paused.completed(107),
            None,
            "a paused update does not complete"
        );
        assert_eq!(
            updating.on_failure(FailureAction::Continue, "t1", 105),
            None
        );
        // Rollback starts a rollback now.
        let Some(Transition::RollBack(rollback)) =
            updating.on_failure(FailureAction::Rollback, "t1", 105)
        else {
            panic!("rollback")
        };
        assert_eq!(
            (rollback.state, rollback.started_at),
            (RollbackStarted, 105)
        );
        assert!(rollback.in_progress() && rollback.is_rollback());
        // A failing rollback pauses, whatever its action says.
        for action in [FailureAction::Pause, FailureAction::Rollback] {
            let Some(Transition::Status(stuck)) = rollback.on_failure(action, "t2", 110) else {
                panic!("rollback pause")
            };
            assert_eq!(stuck.state, RollbackPaused);
            assert_eq!(
                stuck.message,
                "rollback paused due to failure or early termination of task t2"
            );
        }
        let done = rollback.completed(120).unwrap();
        assert_eq!(
            (done.state, done.completed_at, done.message.as_str()),
            (RollbackCompleted, Some(120), "rollback completed")
        );
        let done = updating.completed(120).unwrap();
        assert_eq!(
            (done.state, done.message.as_str()),
            (Completed, "update completed")
        );
        assert_eq!(done.completed(130), None);
        assert_eq!(UpdateStatus::manual_rollback(7).state, RollbackStarted);
    }
}
