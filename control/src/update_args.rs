//! The flags of `service create` and `service update` for how tasks are replaced: when one
//! ends (`--restart-*`), when the spec changes (`--update-*`) and when it is rolled back
//! (`--rollback-*`). Durations in Docker's syntax (`5s`, `1m30s`, `500ms`).

use anyhow::Result;
use clap::Args;

use shoal_cluster::{
    state::ServiceSpec,
    update::{
        parse_duration_secs, ConfigUpdate, FailureAction, FailureRatio, PolicyUpdate,
        RestartCondition, RestartPolicy, UpdateConfig, UpdateOrder,
    },
};

#[derive(Args, Clone, Debug, Default)]
pub struct UpdateArgs {
    /// When a task that ended is replaced: none, on-failure or any [default: any]
    #[arg(long, value_parser = restart_condition)]
    restart_condition: Option<RestartCondition>,
    /// Wait before a task that ended is replaced [default: 5s]
    #[arg(long, value_parser = duration)]
    restart_delay: Option<u64>,
    /// Restarts allowed per task slot, 0 for no limit [default: 0]
    #[arg(long)]
    restart_max_attempts: Option<u64>,
    /// Window in which --restart-max-attempts counts, 0 for all time [default: 0s]
    #[arg(long, value_parser = duration)]
    restart_window: Option<u64>,
    /// Tasks updated at once, 0 for all [default: 1]
    #[arg(long)]
    update_parallelism: Option<u64>,
    /// Wait between update batches [default: 0s]
    #[arg(long, value_parser = duration)]
    update_delay: Option<u64>,
    /// When an update fails: pause, continue or rollback [default: pause]
    #[arg(long, value_parser = failure_action)]
    update_failure_action: Option<FailureAction>,
    /// How long a new task that ends counts as an update failure [default: 5s]
    #[arg(long, value_parser = duration)]
    update_monitor: Option<u64>,
    /// Fraction of the tasks that may fail during an update, 0 to 1 [default: 0]
    #[arg(long, value_parser = ratio)]
    update_max_failure_ratio: Option<FailureRatio>,
    /// stop-first, or start-first: the new task is ready before the old one stops
    /// [default: stop-first]
    #[arg(long, value_parser = order)]
    update_order: Option<UpdateOrder>,
    /// Tasks rolled back at once, 0 for all [default: 1]
    #[arg(long)]
    rollback_parallelism: Option<u64>,
    /// Wait between rollback batches [default: 0s]
    #[arg(long, value_parser = duration)]
    rollback_delay: Option<u64>,
    /// When a rollback fails: pause or continue [default: pause]
    #[arg(long, value_parser = failure_action)]
    rollback_failure_action: Option<FailureAction>,
    /// How long a rolled-back task that ends counts as a rollback failure [default: 5s]
    #[arg(long, value_parser = duration)]
    rollback_monitor: Option<u64>,
    /// Fraction of the tasks that may fail during a rollback, 0 to 1 [default: 0]
    #[arg(long, value_parser = ratio)]
    rollback_max_failure_ratio: Option<FailureRatio>,
    /// stop-first or start-first [default: stop-first]
    #[arg(long, value_parser = order)]
    rollback_order: Option<UpdateOrder>,
}

fn duration(text: &str) -> Result<u64> {
    parse_duration_secs(text)
}

fn restart_condition(text: &str) -> Result<RestartCondition> {
    text.parse()
}

fn failure_action(text: &str) -> Result<FailureAction> {
    text.parse()
}

fn ratio(text: &str) -> Result<FailureRatio> {
    text.parse()
}

fn order(text: &str) -> Result<UpdateOrder> {
    text.parse()
}

impl UpdateArgs {
    /// For `service update`: only what was given changes.
    pub fn update(&self) -> PolicyUpdate {
        PolicyUpdate {
            restart_condition: self.restart_condition,
            restart_delay_secs: self.restart_delay,
            restart_max_attempts: self.restart_max_attempts,
            restart_window_secs: self.restart_window,
            update: ConfigUpdate {
                parallelism: self.update_parallelism,
                delay_secs: self.update_delay,
                failure_action: self.update_failure_action,
                monitor_secs: self.update_monitor,
                max_failure_ratio: self.update_max_failure_ratio,
                order: self.update_order,
            },
            rollback: ConfigUpdate {
                parallelism: self.rollback_parallelism,
                delay_secs: self.rollback_delay,
                failure_action: self.rollback_failure_action,
                monitor_secs: self.rollback_monitor,
                max_failure_ratio: self.rollback_max_failure_ratio,
                order: self.rollback_order,
            },
        }
    }

    /// For `service create`: Swarm's defaults, then what was given.
    pub fn apply_to(&self, spec: &mut ServiceSpec) {
        spec.restart = RestartPolicy::default();
        spec.set_update_config(UpdateConfig::default());
        spec.rollback_config = UpdateConfig::default();
        self.update().apply(spec);
    }
}

/// The restart and update lines of `service inspect --pretty`.
pub fn render_policies(
    restart: &RestartPolicy,
    update: &UpdateConfig,
    rollback: &UpdateConfig,
) -> String {
    let config = |what: &str, c: &UpdateConfig| {
        format!(
            "{what:<16}parallelism {}, delay {}s, on failure {}, monitor {}s, max failure ratio {}, order {}\n",
            c.parallelism,
            c.delay_secs,
            c.control.failure_action,
            c.control.monitor_secs,
            c.control.max_failure_ratio.get(),
            c.control.order
        )
    };
    format!(
        "Restart:        condition {}, delay {}s, max attempts {}, window {}s\n{}{}",
        restart.condition,
        restart.delay_secs,
        restart.max_attempts,
        restart.window_secs,
        config("Update:", update),
        config("Rollback:", rollback),
    )
}
