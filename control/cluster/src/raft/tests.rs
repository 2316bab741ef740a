//! Raft fault tests: three in-process managers on real redb files in a tempdir, RPCs routed
//! through serde_json and `handle_rpc` by an in-memory `Transport` that can isolate a node.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::testing::{StoreBuilder, Suite};
use openraft::ServerState;
use tempfile::TempDir;

use super::log_store::{io_err, RedbLogStore};
use super::{
    handle_rpc, start, wait_until_voter, Applied, Member, NodeId, Raft, StateMachine, StorageError,
    Transport, TypeConfig,
};
use crate::pki::Role;
use crate::state::Command;

const IDS: [NodeId; 3] = [1, 2, 3];
const SECS_5: Duration = Duration::from_secs(5);

/// Cluster tests are timing-sensitive: run them one at a time (2-core machine).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type WriteError = RaftError<NodeId, ClientWriteError<NodeId, Member>>;

#[derive(Default)]
struct RouterInner {
    nodes: HashMap<String, Raft>,
    /// Addresses cut off from everyone, in both directions.
    isolated: HashSet<String>,
}

#[derive(Clone, Default)]
struct Router(Arc<Mutex<RouterInner>>);

impl Router {
    fn blocked(&self, from: &str, to: &str) -> bool {
        let g = self.0.lock().unwrap();
        g.isolated.contains(from) || g.isolated.contains(to)
    }
}

/// One per node: it knows its own address so a partition drops traffic both ways.
struct MemTransport {
    from: String,
    router: Router,
}

impl Transport for MemTransport {
    async fn post(&self, addr: &str, path: &str, body: Vec<u8>) -> Result<Vec<u8>, String> {
        if self.router.blocked(&self.from, addr) {
            return Err(format!("partitioned: {} -> {addr}", self.from));
        }
        let raft = self.router.0.lock().unwrap().nodes.get(addr).cloned();
        let raft = raft.ok_or_else(|| format!("unreachable: {addr}"))?;
        let reply = handle_rpc(&raft, path, &body).await?;
        // A partition that started mid-call drops the reply too.
        if self.router.blocked(&self.from, addr) {
            return Err(format!("partitioned: {addr} -> {}", self.from));
        }
        Ok(reply)
    }
}

fn addr(id: NodeId) -> String {
    format!("node-{id}")
}

fn member(id: NodeId) -> Member {
    Member {
        addr: addr(id),
        node_id: format!("n{id}"),
    }
}

fn rotate(secret: &str) -> Command {
    Command::RotateToken {
        role: Role::Worker,
        secret: secret.to_owned(),
    }
}

fn others(id: NodeId) -> Vec<NodeId> {
    IDS.into_iter().filter(|&i| i != id).collect()
}

struct Node {
    raft: Raft,
    sm: StateMachine,
}

struct Cluster {
    router: Router,
    dir: TempDir,
    nodes: BTreeMap<NodeId, Node>,
}

impl Cluster {
    /// Starts managers 1..=3 and initializes them as one voting cluster.
    async fn new() -> Self {
        let c = Self::unformed().await;
        let members: BTreeMap<_, _> = IDS.into_iter().map(|id| (id, member(id))).collect();
        c.nodes[&1].raft.initialize(members).await.unwrap();
        c
    }

    /// Starts managers 1..=3, members of nothing yet.
    async fn unformed() -> Self {
        let mut c = Cluster {
            router: Router::default(),
            dir: TempDir::new().unwrap(),
            nodes: BTreeMap::new(),
        };
        for id in IDS {
            c.start(id).await;
        }
        c
    }

    fn db_path(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("node-{id}.redb"))
    }

    /// Starts (or restarts) a node from its redb file.
    async fn start(&mut self, id: NodeId) {
        let transport = Arc::new(MemTransport {
            from: addr(id),
            router: self.router.clone(),
        });
        // A node just shut down may still hold redb's exclusive lock for a moment.
        let deadline = Instant::now() + SECS_5;
        let (raft, sm) = loop {
            match start(id, &self.db_path(id), transport.clone()).await {
                Ok(x) => break x,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("start node {id}: {e:#}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("start node {id}: {e:#}"),
            }
        };
        let nodes = &mut self.router.0.lock().unwrap().nodes;
        nodes.insert(addr(id), raft.clone());
        self.nodes.insert(id, Node { raft, sm });
    }

    /// Shuts a node down and drops it, which closes its redb file.
    async fn kill(&mut self, id: NodeId) {
        self.router.0.lock().unwrap().nodes.remove(&addr(id));
        let node = self.nodes.remove(&id).expect("node is running");
        node.raft.shutdown().await.expect("shutdown");
    }

    async fn shutdown(mut self) {
        let ids: Vec<_> = self.nodes.keys().copied().collect();
        for id in ids {
            self.kill(id).await;
        }
    }

    fn isolate(&self, id: NodeId, on: bool) {
        let mut g = self.router.0.lock().unwrap();
        if on {
            g.isolated.insert(addr(id));
        } else {
            g.isolated.remove(&addr(id));
        }
    }

    fn secret(&self, id: NodeId) -> String {
        self.nodes[&id].sm.state().worker_secret
    }

    /// Waits until all of `ids` agree on one leader among them, which sees itself as leader.
    async fn wait_leader(&self, ids: &[NodeId], timeout: Duration) -> NodeId {
        let deadline = Instant::now() + timeout;
        loop {
            let leaders: HashSet<_> = ids
                .iter()
                .map(|id| self.nodes[id].raft.metrics().borrow().current_leader)
                .collect();
            if let [Some(l)] = leaders.into_iter().collect::<Vec<_>>()[..] {
                if ids.contains(&l)
                    && self.nodes[&l].raft.metrics().borrow().state == ServerState::Leader
                {
                    return l;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader among {ids:?} within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn write(&self, via: NodeId, secret: &str) -> Result<(), WriteError> {
        let resp = self.nodes[&via].raft.client_write(rotate(secret)).await?;
        assert_eq!(resp.data, Applied(Ok(())));
        Ok(())
    }

    /// Writes through whoever leads `ids`, retrying (RotateToken is idempotent) if the
    /// leadership moves under us, e.g. when a slow fsync makes a follower time out.
    async fn write_ok(&self, ids: &[NodeId], secret: &str) {
        let deadline = Instant::now() + SECS_5;
        loop {
            let leader = self.wait_leader(ids, SECS_5).await;
            match self.write(leader, secret).await {
                Ok(()) => return,
                Err(e) => {
                    assert!(Instant::now() < deadline, "write {secret} failed: {e}");
                    eprintln!("write {secret} via {leader} failed: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Waits until every node of `ids` has applied the write of `secret`.
    async fn wait_applied(&self, ids: &[NodeId], secret: &str) {
        let deadline = Instant::now() + SECS_5;
        for &id in ids {
            while self.secret(id) != secret {
                assert!(
                    Instant::now() < deadline,
                    "node {id} did not apply {secret}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_managers_elect_and_replicate() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::new().await;
    let leader = c.wait_leader(&IDS, SECS_5).await;

    c.write_ok(&IDS, "s1").await;
    c.wait_applied(&IDS, "s1").await;

    // A follower refuses writes and points at the leader.
    let follower = others(leader)[0];
    match c.write(follower, "refused").await {
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {}
        other => panic!("follower write: expected ForwardToLeader, got {other:?}"),
    }
    c.wait_applied(&IDS, "s1").await;

    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_loss_elects_new_leader() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::new().await;
    c.write_ok(&IDS, "before").await;
    c.wait_applied(&IDS, "before").await;

    let old = c.wait_leader(&IDS, SECS_5).await;
    c.kill(old).await;
    let rest = others(old);
    let t0 = Instant::now();
    let new = c.wait_leader(&rest, SECS_5).await;
    eprintln!(
        "leader {new} elected {:?} after {old} stopped",
        t0.elapsed()
    );

    // The earlier write survived the failover.
    for &id in &rest {
        assert_eq!(c.secret(id), "before");
    }
    c.write_ok(&rest, "after").await;
    c.wait_applied(&rest, "after").await;

    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_leader_cannot_commit() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::new().await;
    c.write_ok(&IDS, "base").await;
    c.wait_applied(&IDS, "base").await;

    let old = c.wait_leader(&IDS, SECS_5).await;
    let majority = others(old);
    c.isolate(old, true);

    // The minority side cannot commit: the write times out or fails.
    let t0 = Instant::now();
    let res = tokio::time::timeout(Duration::from_secs(2), c.write(old, "minority")).await;
    match res {
        Err(_) => eprintln!("minority write timed out after {:?}", t0.elapsed()),
        Ok(Err(e)) => eprintln!("minority write failed after {:?}: {e}", t0.elapsed()),
        Ok(Ok(())) => panic!("isolated leader committed a write"),
    }
    assert_eq!(c.secret(old), "base");

    // The majority elects a new leader and keeps committing.
    c.write_ok(&majority, "majority").await;
    c.wait_applied(&majority, "majority").await;

    // Healed: the old leader adopts the majority's log and drops its uncommitted entry.
    c.isolate(old, false);
    c.wait_applied(&[old], "majority").await;
    c.write_ok(&IDS, "healed").await;
    c.wait_applied(&IDS, "healed").await;
    let state = c.nodes[&majority[0]].sm.state();
    for id in IDS {
        assert_eq!(c.nodes[&id].sm.state(), state, "node {id} diverged");
    }

    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_follower_recovers_and_catches_up() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::new().await;
    for i in 0..5 {
        c.write_ok(&IDS, &format!("s{i}")).await;
    }
    c.wait_applied(&IDS, "s4").await;

    let leader = c.wait_leader(&IDS, SECS_5).await;
    let f = others(leader)[0];
    let before = c.nodes[&f].sm.state();
    c.kill(f).await;
    c.write_ok(&others(f), "while_down").await;

    // Restart isolated: whatever it holds now was read from its redb file, not received.
    c.isolate(f, true);
    c.start(f).await;
    assert_eq!(
        c.nodes[&f].sm.state(),
        before,
        "state not restored from disk"
    );
    assert_eq!(c.secret(f), "s4");

    c.isolate(f, false);
    c.wait_applied(&[f], "while_down").await;

    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_manager_is_a_voter_only_once_its_membership_is_committed() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::unformed().await;
    let first = &c.nodes[&1].raft;
    first
        .initialize(BTreeMap::from([(1, member(1))]))
        .await
        .unwrap();
    c.wait_leader(&[1], SECS_5).await;
    let joining = &c.nodes[&2].raft;
    let short = Duration::from_millis(300);

    let err = wait_until_voter(joining, 2, short).await.unwrap_err();
    assert!(err.to_string().contains("is not a voter"), "{err}");
    first.add_learner(2, member(2), true).await.unwrap();
    wait_until_voter(joining, 2, short)
        .await
        .expect_err("a learner is not a voter");

    first
        .change_membership(BTreeSet::from([1, 2]), false)
        .await
        .unwrap();
    wait_until_voter(joining, 2, SECS_5).await.unwrap();
    wait_until_voter(first, 2, SECS_5).await.unwrap();

    c.shutdown().await;
}

struct Builder;

impl StoreBuilder<TypeConfig, RedbLogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, RedbLogStore, StateMachine), StorageError> {
        let dir = TempDir::new().map_err(io_err)?;
        let db = redb::Database::create(dir.path().join("raft.redb")).map_err(io_err)?;
        let db = Arc::new(db);
        // The suite keeps the TempDir alive for the duration of each of its tests.
        Ok((dir, RedbLogStore::new(db.clone())?, StateMachine::new(db)?))
    }
}

/// openraft's storage conformance suite. A plain `#[test]`: it builds its own runtimes.
#[test]
fn openraft_storage_suite() {
    // Not timing-sensitive, but keep it off the cores while a cluster test runs.
    let _serial = SERIAL.blocking_lock();
    Suite::test_all(Builder).expect("storage suite");
}
