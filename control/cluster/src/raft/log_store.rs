//! Raft log storage (openraft storage-v2) in redb.
//!
//! Tables:
//! - `raft_logs`:     index (u64) -> serde_json(`Entry<TypeConfig>`)
//! - `raft_log_meta`: "vote" | "committed" | "last_purged" -> serde_json value
//!
//! Every mutation is a single redb write transaction committed with the default
//! `Durability::Immediate` (fsync), so it is atomic and durable when `commit()` returns.
//! redb calls are blocking, so they run on tokio's blocking pool.

use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::LogFlushed;
use openraft::storage::RaftLogStorage;
use openraft::AnyError;
use openraft::Entry;
use openraft::ErrorSubject;
use openraft::ErrorVerb;
use openraft::LogId;
use openraft::LogState;
use openraft::RaftLogReader;
use openraft::StorageIOError;
use openraft::Vote;
use redb::Database;
use redb::ReadableDatabase;
use redb::ReadableTable;
use redb::TableDefinition;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::NodeId;
use super::StorageError;
use super::TypeConfig;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_log_meta");

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_LAST_PURGED: &str = "last_purged";

/// Wrap any error as an openraft storage IO error (generic subject).
pub(crate) fn io_err<E: std::error::Error + 'static>(e: E) -> StorageError {
    StorageIOError::new(ErrorSubject::Store, ErrorVerb::Write, AnyError::new(&e)).into()
}

/// `.sto(&subject, verb)?` converts any error into an openraft `StorageError`.
pub(crate) trait StoResult<T> {
    fn sto(self, subject: &ErrorSubject<NodeId>, verb: ErrorVerb) -> Result<T, StorageError>;
}

impl<T, E: std::error::Error + 'static> StoResult<T> for Result<T, E> {
    fn sto(self, subject: &ErrorSubject<NodeId>, verb: ErrorVerb) -> Result<T, StorageError> {
        self.map_err(|e| StorageIOError::new(subject.clone(), verb, AnyError::new(&e)).into())
    }
}

/// Run blocking redb work off the async worker threads.
pub(crate) async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(io_err)?
}

#[derive(Clone)]
pub struct RedbLogStore {
    db: Arc<Database>,
}

impl RedbLogStore {
    /// Creates the tables if missing (read transactions fail on absent tables).
    pub fn new(db: Arc<Database>) -> Result<Self, StorageError> {
        let txn = db.begin_write().map_err(io_err)?;
        txn.open_table(LOGS).map_err(io_err)?;
        txn.open_table(META).map_err(io_err)?;
        txn.commit().map_err(io_err)?;
        Ok(Self { db })
    }

    fn read_meta<T: DeserializeOwned>(
        db: &Database,
        key: &str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, StorageError> {
        let (s, vb) = (&subject, ErrorVerb::Read);
        let txn = db.begin_read().sto(s, vb)?;
        let table = txn.open_table(META).sto(s, vb)?;
        let v = table.get(key).sto(s, vb)?;
        match v {
            None => Ok(None),
            Some(g) => Ok(Some(serde_json::from_slice(g.value()).sto(s, vb)?)),
        }
    }

    async fn write_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        subject: ErrorSubject<NodeId>,
    ) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(io_err)?;
        let db = self.db.clone();
        blocking(move || {
            let (s, vb) = (&subject, ErrorVerb::Write);
            let txn = db.begin_write().sto(s, vb)?;
            txn.open_table(META)
                .sto(s, vb)?
                .insert(key, bytes.as_slice())
                .sto(s, vb)?;
            txn.commit().sto(s, vb)
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for RedbLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let bounds: (Bound<u64>, Bound<u64>) =
            (range.start_bound().cloned(), range.end_bound().cloned());
        let db = self.db.clone();
        blocking(move || {
            let (s, vb) = (&ErrorSubject::Logs, ErrorVerb::Read);
            // redb (like BTreeMap) must not be given an inverted range.
            let lo = match bounds.0 {
                Bound::Included(x) => x,
                Bound::Excluded(x) => x.saturating_add(1),
                Bound::Unbounded => 0,
            };
            match bounds.1 {
                Bound::Included(x) if x < lo => return Ok(vec![]),
                Bound::Excluded(x) if x <= lo => return Ok(vec![]),
                _ => {}
            }
            let txn = db.begin_read().sto(s, vb)?;
            let table = txn.open_table(LOGS).sto(s, vb)?;
            let mut out = Vec::new();
            for item in table.range(bounds).sto(s, vb)? {
                let (_k, v) = item.sto(s, vb)?;
                out.push(serde_json::from_slice(v.value()).sto(s, vb)?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for RedbLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let last_purged_log_id: Option<LogId<NodeId>> =
                Self::read_meta(&db, KEY_LAST_PURGED, ErrorSubject::Logs)?;
            let (s, vb) = (&ErrorSubject::Logs, ErrorVerb::Read);
            let txn = db.begin_read().sto(s, vb)?;
            let table = txn.open_table(LOGS).sto(s, vb)?;
            let last_log_id = match table.last().sto(s, vb)? {
                Some((_k, v)) => {
                    let ent: Entry<TypeConfig> = serde_json::from_slice(v.value()).sto(s, vb)?;
                    Some(ent.log_id)
                }
                None => last_purged_log_id,
            };
            Ok(LogState {
                last_purged_log_id,
                last_log_id,
            })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.write_meta(KEY_VOTE, vote, ErrorSubject::Vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        let db = self.db.clone();
        blocking(move || Self::read_meta(&db, KEY_VOTE, ErrorSubject::Vote)).await
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        self.write_meta(KEY_COMMITTED, &committed, ErrorSubject::Store)
            .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        let db = self.db.clone();
        // Stored as `Option<LogId>`, so flatten "missing key" and "stored None".
        blocking(move || {
            Ok(
                Self::read_meta::<Option<LogId<NodeId>>>(&db, KEY_COMMITTED, ErrorSubject::Store)?
                    .flatten(),
            )
        })
        .await
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut rows = Vec::new();
        for ent in entries {
            let bytes = serde_json::to_vec(&ent)
                .map_err(|e| StorageIOError::write_log_entry(ent.log_id, &e))?;
            rows.push((ent.log_id.index, bytes));
        }
        let db = self.db.clone();
        let res = blocking(move || {
            let (s, vb) = (&ErrorSubject::Logs, ErrorVerb::Write);
            let txn = db.begin_write().sto(s, vb)?;
            {
                let mut table = txn.open_table(LOGS).sto(s, vb)?;
                for (idx, bytes) in &rows {
                    table.insert(*idx, bytes.as_slice()).sto(s, vb)?;
                }
            }
            txn.commit().sto(s, vb)
        })
        .await;
        // Data is durable (or failed) here: report to openraft.
        match &res {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(io::Error::other(e.to_string()))),
        }
        res
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let db = self.db.clone();
        blocking(move || {
            let (s, vb) = (&ErrorSubject::Logs, ErrorVerb::Delete);
            let txn = db.begin_write().sto(s, vb)?;
            // Delete [log_id.index, ..) in one transaction: no hole possible.
            txn.open_table(LOGS)
                .sto(s, vb)?
                .retain_in(log_id.index.., |_, _| false)
                .sto(s, vb)?;
            txn.commit().sto(s, vb)
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&log_id).map_err(io_err)?;
        let db = self.db.clone();
        blocking(move || {
            let (s, vb) = (&ErrorSubject::Logs, ErrorVerb::Delete);
            let txn = db.begin_write().sto(s, vb)?;
            // Record last_purged and delete [.., log_id.index] atomically.
            txn.open_table(META)
                .sto(s, vb)?
                .insert(KEY_LAST_PURGED, bytes.as_slice())
                .sto(s, vb)?;
            txn.open_table(LOGS)
                .sto(s, vb)?
                .retain_in(..=log_id.index, |_, _| false)
                .sto(s, vb)?;
            txn.commit().sto(s, vb)
        })
        .await
    }
}
