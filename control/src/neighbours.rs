//! The agent's watch on the kernel's neighbour (ARP) table (`shoal_dataplane::neighbours`):
//! every few seconds it sizes the table for what this node programs (unless
//! `neighbour_table = "off"`), and it notices overflow: `table_fulls` growing starts an
//! episode, logged once, shown by `/readyz` and `dataplane status` until the count has been
//! still for a while.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde::{Deserialize, Serialize};
use shoal_dataplane::neighbours::{
    sized_for, ArpCacheStats, DemandLedger, KernelNeighbourTable, NeighbourDemand, Thresholds,
    DEFAULT_LEDGER_DIR, HARD_LIMIT_SETTING,
};

use crate::{config::NeighbourTableSizing, server::AgentState};

/// How often the table is sampled and the demand recomputed.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);
/// An overflow episode ends once `table_fulls` has not grown for this long.
const EPISODE_QUIET: Duration = Duration::from_secs(10);
/// How long the watch waits for the swarm membership (held while joining or leaving).
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(1);

/// The table as `dataplane status` and `/metrics` show it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NeighbourTableStatus {
    #[serde(flatten)]
    pub stats: ArpCacheStats,
    pub thresholds: Thresholds,
    /// `table_fulls` grew within the last `EPISODE_QUIET`: new entries fail.
    pub overflowing: bool,
    /// Whether this agent sizes the table (`neighbour_table = "auto"`).
    pub sizing: bool,
    /// Entries this node may need, as last computed.
    pub demand: u32,
    /// Every live agent's demand on this kernel together (what the table is sized for).
    pub all_agents_demand: Option<u32>,
}

/// Overflow episodes, from successive samples of `table_fulls`.
#[derive(Debug, Default)]
pub struct Episodes {
    last_fulls: Option<u64>,
    current: Option<Episode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Episode {
    started: Instant,
    fulls_at_start: u64,
    last_growth: Instant,
}

/// What a sample changed, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpisodeChange {
    Started,
    /// How long it lasted and how many entries were refused in it.
    Ended {
        lasted: Duration,
        refused: u64,
    },
}

impl Episodes {
    pub fn observe(&mut self, table_fulls: u64, now: Instant) -> Option<EpisodeChange> {
        let grew = self.last_fulls.is_some_and(|last| table_fulls > last);
        let before = self.last_fulls.replace(table_fulls).unwrap_or(table_fulls);
        match &mut self.current {
            Some(episode) if grew => {
                episode.last_growth = now;
                None
            }
            Some(episode) if now.duration_since(episode.last_growth) >= EPISODE_QUIET => {
                let ended = EpisodeChange::Ended {
                    lasted: episode.last_growth.duration_since(episode.started),
                    refused: table_fulls - episode.fulls_at_start,
                };
                self.current = None;
                Some(ended)
            }
            Some(_) => None,
            None if grew => {
                self.current = Some(Episode {
                    started: now,
                    fulls_at_start: before,
                    last_growth: now,
                });
                Some(EpisodeChange::Started)
            }
            None => None,
        }
    }

    pub fn overflowing(&self) -> bool {
        self.current.is_some()
    }
}

#[derive(Default)]
struct WatchState {
    episodes: Episodes,
    /// This agent's demand as last recorded in the ledger (None: not yet).
    recorded: Option<u32>,
    demand: u32,
    all_agents_demand: Option<u32>,
}

/// The table's files, the ledger (when sizing) and what the samples showed.
pub struct NeighbourWatch {
    table: Option<KernelNeighbourTable>,
    ledger: Option<DemandLedger>,
    state: Mutex<WatchState>,
}

impl NeighbourWatch {
    /// Opens the table's files; without them the agent runs on, unable to watch or size
    /// it (said once, here).
    pub fn open(sizing: NeighbourTableSizing) -> Self {
        let table = KernelNeighbourTable::open()
            .inspect_err(|err| {
                tracing::warn!(error = %format!("{err:#}"), "the kernel's neighbour table can be neither watched nor sized");
            })
            .ok();
        let ledger = match (&table, sizing) {
            (Some(_), NeighbourTableSizing::Auto) => {
                DemandLedger::open(std::path::Path::new(DEFAULT_LEDGER_DIR))
                    .inspect_err(|err| {
                        tracing::warn!(error = %format!("{err:#}"), "the neighbour table will not be sized");
                    })
                    .ok()
            }
            _ => None,
        };
        Self {
            table,
            ledger,
            state: Mutex::default(),
        }
    }

    /// Records this node's demand and raises the limits if every agent's together needs it.
    fn size(&self, demand: &NeighbourDemand) -> Result<()> {
        let entries = demand.entries();
        let mut state = self.state.lock().expect("neighbour watch");
        state.demand = entries;
        let (Some(table), Some(ledger)) = (&self.table, &self.ledger) else {
            return Ok(());
        };
        if state.recorded == Some(entries) {
            return Ok(());
        }
        let total = ledger.record(entries, |total| {
            let current = table.thresholds()?;
            let wanted = sized_for(total, current);
            if wanted != current {
                table.write(wanted).with_context(|| {
                    format!("raising the kernel's neighbour table limits (setting {HARD_LIMIT_SETTING})")
                })?;
                tracing::info!(
                    all_agents_demand = total,
                    this_node = entries,
                    "raised the kernel's neighbour table limits gc_thresh1/2/3 from {}/{}/{} to {}/{}/{}",
                    current.gc_thresh1, current.gc_thresh2, current.gc_thresh3,
                    wanted.gc_thresh1, wanted.gc_thresh2, wanted.gc_thresh3,
                );
            }
            Ok(total)
        })?;
        state.recorded = Some(entries);
        state.all_agents_demand = Some(total);
        Ok(())
    }

    /// Samples `table_fulls`; logs an episode's start and end.
    fn sample(&self) -> Result<()> {
        let Some(table) = &self.table else {
            return Ok(());
        };
        let stats = table.stats()?;
        let change = self
            .state
            .lock()
            .expect("neighbour watch")
            .episodes
            .observe(stats.table_fulls, Instant::now());
        match change {
            Some(EpisodeChange::Started) => tracing::warn!(
                entries = stats.entries,
                "the kernel's neighbour table is full: new ARP entries fail and their packets wait \
                 or are lost; {}",
                self.remedy()
            ),
            Some(EpisodeChange::Ended { lasted, refused }) => tracing::info!(
                refused,
                lasted_secs = lasted.as_secs(),
                "the kernel's neighbour table is no longer overflowing"
            ),
            None => {}
        }
        Ok(())
    }

    /// What to do about an overflow, naming the setting.
    fn remedy(&self) -> String {
        let now = self
            .table
            .as_ref()
            .and_then(|t| t.thresholds().ok())
            .map_or_else(|| "unknown".to_owned(), |t| t.gc_thresh3.to_string());
        match self.ledger {
            Some(_) => format!(
                "raise {HARD_LIMIT_SETTING} (now {now}, sized by the agents for what they \
                 program: something else on this machine holds entries too)"
            ),
            None => format!(
                "raise {HARD_LIMIT_SETTING} (now {now}) or let the agent size it \
                 (neighbour_table = \"auto\")"
            ),
        }
    }

    /// None when the table cannot be read.
    pub fn status(&self) -> Result<Option<NeighbourTableStatus>> {
        let Some(table) = &self.table else {
            return Ok(None);
        };
        let state = self.state.lock().expect("neighbour watch");
        Ok(Some(NeighbourTableStatus {
            stats: table.stats()?,
            thresholds: table.thresholds()?,
            overflowing: state.episodes.overflowing(),
            sizing: self.ledger.is_some(),
            demand: state.demand,
            all_agents_demand: state.all_agents_demand,
        }))
    }

    /// Why the node is degraded, while the table overflows.
    pub fn overflow_reason(&self) -> Option<String> {
        let overflowing = self
            .state
            .lock()
            .expect("neighbour watch")
            .episodes
            .overflowing();
        overflowing.then(|| {
            format!(
                "degraded: the kernel's neighbour table is full (table_fulls growing): new \
                 connections stall; {}",
                self.remedy()
            )
        })
    }
}

/// The table's row of `dataplane status`.
pub fn render(status: Option<&NeighbourTableStatus>) -> String {
    let Some(status) = status else {
        return "NEIGHBOUR TABLE\nnot readable by this agent (see its log)\n".to_owned();
    };
    let t = status.thresholds;
    let state = if status.overflowing {
        "OVERFLOWING: new entries fail"
    } else {
        "ok"
    };
    let demand = match status.all_agents_demand.filter(|_| status.sizing) {
        Some(total) => format!("{} (all agents {total})", status.demand),
        None => format!("{} (sizing off)", status.demand),
    };
    crate::output::table(
        [
            "NEIGHBOUR ENTRIES",
            "TABLE FULLS",
            "STATE",
            "GC_THRESH1/2/3",
            "DEMAND",
        ],
        &[[
            status.stats.entries.to_string(),
            status.stats.table_fulls.to_string(),
            state.to_owned(),
            format!("{}/{}/{}", t.gc_thresh1, t.gc_thresh2, t.gc_thresh3),
            demand,
        ]],
    )
}

/// Samples and sizes every `WATCH_INTERVAL` for the agent's life.
pub async fn watch(state: Arc<AgentState>) {
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_error = String::new();
    loop {
        tick.tick().await;
        let demand = node_demand(&state).await;
        let agent = Arc::clone(&state);
        // File locks and sysctl writes: off the runtime's threads.
        let result = tokio::task::spawn_blocking(move || {
            let watch = &agent.neighbours;
            watch.size(&demand).and_then(|()| watch.sample())
        })
        .await
        .unwrap_or_else(|err| Err(err.into()));
        // Said once, not every interval, until it changes or clears.
        let error = result.err().map(|e| format!("{e:#}")).unwrap_or_default();
        if !error.is_empty() && error != last_error {
            tracing::warn!(error = %error, "watching the kernel's neighbour table");
        }
        last_error = error;
    }
}

/// This node's demand: from its overlays in a swarm, the underlay's slack outside one.
async fn node_demand(state: &AgentState) -> NeighbourDemand {
    match tokio::time::timeout(MEMBERSHIP_WAIT, state.cluster.parts()).await {
        Ok(Some(parts)) => parts.worker.networks().neighbour_demand().await,
        _ => NeighbourDemand::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_starts_an_episode_and_quiet_ends_it() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut episodes = Episodes::default();
        assert_eq!(
            episodes.observe(500, at(0)),
            None,
            "a first sample is a baseline"
        );
        assert_eq!(episodes.observe(500, at(2)), None);
        assert_eq!(episodes.observe(520, at(4)), Some(EpisodeChange::Started));
        assert!(episodes.overflowing());
        assert_eq!(
            episodes.observe(600, at(6)),
            None,
            "one log line an episode"
        );
        assert_eq!(
            episodes.observe(600, at(14)),
            None,
            "quiet, but not long enough"
        );
        assert!(episodes.overflowing());
        assert_eq!(
            episodes.observe(600, at(16)),
            Some(EpisodeChange::Ended {
                lasted: Duration::from_secs(2),
                refused: 100,
            })
        );
        assert!(!episodes.overflowing());
        assert_eq!(episodes.observe(601, at(18)), Some(EpisodeChange::Started));
    }

    #[test]
    fn overflow_before_the_agent_started_is_not_an_episode() {
        let mut episodes = Episodes::default();
        assert_eq!(episodes.observe(31_452, Instant::now()), None);
        assert!(!episodes.overflowing());
    }
}
