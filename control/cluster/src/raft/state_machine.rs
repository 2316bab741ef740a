//! The cluster state machine persisted in redb.
//!
//! Table `sm_meta`: "state" | "last_applied" | "last_membership" | "snapshot" -> serde_json.
//!
//! The state is also kept in memory for reads and snapshots. `apply()` commits to redb first
//! and only then updates memory, so the persisted `last_applied` never lags behind what a
//! caller has observed. The whole state is written per applied batch: simple, and small at
//! the scale of a swarm's orchestration state.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::SystemTime;
use std::time::UNIX_EPOCH;

use openraft::storage::RaftStateMachine;
use openraft::storage::Snapshot;
use openraft::Entry;
use openraft::EntryPayload;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::LogId;
use openraft::RaftSnapshotBuilder;
use openraft::SnapshotMeta;
use openraft::StoredMembership;
use redb::Database;
use redb::ReadableDatabase;
use redb::ReadableTable;
use redb::TableDefinition;
use serde::Deserialize;
use serde::Serialize;

use super::log_store::blocking;
use super::log_store::io_err;
use super::log_store::StoResult;
use super::Applied;
use super::Member;
use super::NodeId;
use super::StorageError;
use super::TypeConfig;
use crate::state::ClusterState;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");

const KEY_STATE: &str = "state";
const KEY_LAST_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "last_membership";
const KEY_SNAPSHOT: &str = "snapshot";

/// The whole state machine; also the snapshot payload (serde_json).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StateMachineData {
    pub last_applied: Option<LogId<NodeId>>,
    pub last_membership: StoredMembership<NodeId, Member>,
    pub state: ClusterState,
}

/// The current snapshot, persisted so it survives restarts (logs it covers may be purged).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Member>,
    data: Vec<u8>,
}

#[derive(Default)]
struct Inner {
    sm: StateMachineData,
    snapshot: Option<StoredSnapshot>,
}

/// Cheap to clone: clones share the same database and in-memory state.
/// Keep a clone to serve local reads after handing one to `Raft::new`.
#[derive(Clone)]
pub struct StateMachine {
    db: Arc<Database>,
    inner: Arc<Mutex<Inner>>,
    /// Bumped each time the applied state changes (held heartbeats wait on it).
    changes: Arc<tokio::sync::watch::Sender<u64>>,
}

impl StateMachine {
    /// Create tables if missing and load the persisted state into memory.
    pub fn new(db: Arc<Database>) -> Result<Self, StorageError> {
        let (s, vb) = (&ErrorSubject::StateMachine, ErrorVerb::Read);
        let txn = db.begin_write().sto(s, vb)?;
        txn.open_table(META).sto(s, vb)?;
        txn.commit().sto(s, vb)?;

        let txn = db.begin_read().sto(s, vb)?;
        let mut inner = Inner::default();
        let meta = txn.open_table(META).sto(s, vb)?;
        if let Some(v) = meta.get(KEY_STATE).sto(s, vb)? {
            inner.sm.state = serde_json::from_slice(v.value()).sto(s, vb)?;
        }
        if let Some(v) = meta.get(KEY_LAST_APPLIED).sto(s, vb)? {
            inner.sm.last_applied = serde_json::from_slice(v.value()).sto(s, vb)?;
        }
        if let Some(v) = meta.get(KEY_MEMBERSHIP).sto(s, vb)? {
            inner.sm.last_membership = serde_json::from_slice(v.value()).sto(s, vb)?;
        }
        if let Some(v) = meta.get(KEY_SNAPSHOT).sto(s, vb)? {
            inner.snapshot = Some(serde_json::from_slice(v.value()).sto(s, vb)?);
        }
        Ok(Self {
            db,
            inner: Arc::new(Mutex::new(inner)),
            changes: Arc::new(tokio::sync::watch::Sender::new(0)),
        })
    }

    /// Wakes on each change of the applied state.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// A copy of the applied cluster state (this manager's view).
    pub fn state(&self) -> ClusterState {
        self.read(ClusterState::clone)
    }

    /// Reads the applied state in place, without copying it. `f` must not block.
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> R {
        f(&self.inner.lock().unwrap().sm.state)
    }

    /// Persist the current snapshot unless a newer one is already stored.
    /// Returns whether `snap` became the current snapshot.
    async fn save_snapshot(&self, snap: StoredSnapshot) -> Result<bool, StorageError> {
        let db = self.db.clone();
        let to_store = snap.clone();
        let stored = blocking(move || {
            let (s, vb) = (
                &ErrorSubject::Snapshot(Some(to_store.meta.signature())),
                ErrorVerb::Write,
            );
            let txn = db.begin_write().sto(s, vb)?;
            {
                let mut meta = txn.open_table(META).sto(s, vb)?;
                let existing: Option<StoredSnapshot> = match meta.get(KEY_SNAPSHOT).sto(s, vb)? {
                    Some(v) => Some(serde_json::from_slice(v.value()).sto(s, vb)?),
                    None => None,
                };
                if existing.is_some_and(|x| x.meta.last_log_id > to_store.meta.last_log_id) {
                    return Ok(false);
                }
                let bytes = serde_json::to_vec(&to_store).sto(s, vb)?;
                meta.insert(KEY_SNAPSHOT, bytes.as_slice()).sto(s, vb)?;
            }
            txn.commit().sto(s, vb)?;
            Ok(true)
        })
        .await?;
        if stored {
            self.inner.lock().unwrap().snapshot = Some(snap);
        }
        Ok(stored)
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Serialize a consistent copy of the in-memory state.
        let (meta, data) = {
            let inner = self.inner.lock().unwrap();
            let data = serde_json::to_vec(&inner.sm).map_err(io_err)?;
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let snapshot_id = match &inner.sm.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, nanos),
                None => format!("none-{}", nanos),
            };
            let meta = SnapshotMeta {
                last_log_id: inner.sm.last_applied,
                last_membership: inner.sm.last_membership.clone(),
                snapshot_id,
            };
            (meta, data)
        };
        self.save_snapshot(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        })
        .await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Member>), StorageError> {
        let inner = self.inner.lock().unwrap();
        Ok((inner.sm.last_applied, inner.sm.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut responses = Vec::new();
        let mut state = self.state();
        let mut last_applied = None;
        let mut membership = None;
        for ent in entries {
            last_applied = Some(ent.log_id);
            match ent.payload {
                EntryPayload::Blank => responses.push(Applied(Ok(()))),
                EntryPayload::Normal(command) => {
                    // A refused command changes nothing; the proposer gets the reason.
                    let mut next = state.clone();
                    match next.apply(command) {
                        Ok(()) => {
                            state = next;
                            responses.push(Applied(Ok(())));
                        }
                        Err(err) => responses.push(Applied(Err(shoal_api::ApiError::of(&err)))),
                    }
                }
                EntryPayload::Membership(m) => {
                    membership = Some(StoredMembership::new(Some(ent.log_id), m));
                    responses.push(Applied(Ok(())));
                }
            }
        }
        let Some(last_applied) = last_applied else {
            return Ok(responses);
        };

        // 1. Persist (one transaction for the whole batch).
        let db = self.db.clone();
        let m = membership.clone();
        let state_json = serde_json::to_vec(&state).map_err(io_err)?;
        blocking(move || {
            let (s, vb) = (&ErrorSubject::Apply(last_applied), ErrorVerb::Write);
            let txn = db.begin_write().sto(s, vb)?;
            {
                let mut meta = txn.open_table(META).sto(s, vb)?;
                meta.insert(KEY_STATE, state_json.as_slice()).sto(s, vb)?;
                let la = serde_json::to_vec(&Some(last_applied)).sto(s, vb)?;
                meta.insert(KEY_LAST_APPLIED, la.as_slice()).sto(s, vb)?;
                if let Some(m) = &m {
                    let mb = serde_json::to_vec(m).sto(s, vb)?;
                    meta.insert(KEY_MEMBERSHIP, mb.as_slice()).sto(s, vb)?;
                }
            }
            txn.commit().sto(s, vb)
        })
        .await?;

        // 2. Publish in memory.
        {
            let mut inner = self.inner.lock().unwrap();
            inner.sm.state = state;
            inner.sm.last_applied = Some(last_applied);
            if let Some(m) = membership {
                inner.sm.last_membership = m;
            }
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let (s, vb) = (
            &ErrorSubject::Snapshot(Some(meta.signature())),
            ErrorVerb::Read,
        );
        let mut new_sm: StateMachineData = serde_json::from_slice(&bytes).sto(s, vb)?;
        // The meta is authoritative for the log position.
        new_sm.last_applied = meta.last_log_id;
        new_sm.last_membership = meta.last_membership.clone();

        // Replace the persisted state machine and current snapshot in one transaction.
        let db = self.db.clone();
        let snap = StoredSnapshot {
            meta: meta.clone(),
            data: bytes,
        };
        let (sm2, snap2) = (new_sm.clone(), snap.clone());
        blocking(move || {
            let (s, vb) = (
                &ErrorSubject::Snapshot(Some(snap2.meta.signature())),
                ErrorVerb::Write,
            );
            let txn = db.begin_write().sto(s, vb)?;
            {
                let mut m = txn.open_table(META).sto(s, vb)?;
                m.insert(
                    KEY_STATE,
                    serde_json::to_vec(&sm2.state).sto(s, vb)?.as_slice(),
                )
                .sto(s, vb)?;
                m.insert(
                    KEY_LAST_APPLIED,
                    serde_json::to_vec(&sm2.last_applied).sto(s, vb)?.as_slice(),
                )
                .sto(s, vb)?;
                m.insert(
                    KEY_MEMBERSHIP,
                    serde_json::to_vec(&sm2.last_membership)
                        .sto(s, vb)?
                        .as_slice(),
                )
                .sto(s, vb)?;
                m.insert(
                    KEY_SNAPSHOT,
                    serde_json::to_vec(&snap2).sto(s, vb)?.as_slice(),
                )
                .sto(s, vb)?;
            }
            txn.commit().sto(s, vb)
        })
        .await?;

        {
            let mut inner = self.inner.lock().unwrap();
            inner.sm = new_sm;
            inner.snapshot = Some(snap);
        }
        self.changes.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let inner = self.inner.lock().unwrap();
        Ok(inner.snapshot.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}
