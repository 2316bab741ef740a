//! A network-scoped table (endpoint key -> value) replicated by gossip: a last-writer-wins
//! map whose writes are ordered by Lamport version, then by the writing node, so that any two
//! nodes that saw the same entries hold the same table, whatever the order they saw them in.
//! Deletes are tombstones, kept until they are old enough that every node has them, so a
//! delayed older write cannot bring a deleted entry back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The order of writes: a Lamport time, ties broken by the node that wrote.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Version {
    pub time: u64,
    pub node: String,
}

/// One write: a value, or a tombstone (`value: None`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry<V> {
    pub version: Version,
    pub value: Option<V>,
}

/// A node's Lamport clock: ticks on local writes, jumps past every version it observes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LamportClock {
    time: u64,
}

impl LamportClock {
    pub fn tick(&mut self) -> u64 {
        // A peer cannot push the clock past the end: it stays at the maximum.
        self.time = self.time.saturating_add(1);
        self.time
    }

    pub fn observe(&mut self, time: u64) {
        self.time = self.time.max(time);
    }

    pub fn now(&self) -> u64 {
        self.time
    }
}

/// The table of one network on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table<V> {
    node: String,
    clock: LamportClock,
    entries: BTreeMap<String, Entry<V>>,
}

impl<V: Clone + PartialEq> Table<V> {
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            clock: LamportClock::default(),
            entries: BTreeMap::new(),
        }
    }

    /// A local write; returns the entry to gossip.
    pub fn set(&mut self, key: &str, value: V) -> Entry<V> {
        self.write(key, Some(value))
    }

    /// A local delete (tombstone); returns the entry to gossip.
    pub fn delete(&mut self, key: &str) -> Entry<V> {
        self.write(key, None)
    }

    fn write(&mut self, key: &str, value: Option<V>) -> Entry<V> {
        let entry = Entry {
            version: Version {
                time: self.clock.tick(),
                node: self.node.clone(),
            },
            value,
        };
        self.entries.insert(key.to_owned(), entry.clone());
        entry
    }

    /// Takes a remote entry if it is newer than ours. Returns whether the table changed.
    pub fn merge(&mut self, key: &str, entry: Entry<V>) -> bool {
        self.clock.observe(entry.version.time);
        match self.entries.get(key) {
            Some(ours) if ours.version >= entry.version => false,
            _ => {
                self.entries.insert(key.to_owned(), entry);
                true
            }
        }
    }

    /// Merges every entry of another table (a full-state sync). Returns how many changed.
    pub fn merge_all(&mut self, other: &Table<V>) -> usize {
        other
            .entries
            .iter()
            .filter(|(key, entry)| self.merge(key, (*entry).clone()))
            .count()
    }

    /// Tombstones every live entry a node wrote (the node died or left); returns them to
    /// gossip. The tombstones are this node's writes, newer than the dead node's.
    pub fn withdraw(&mut self, node: &str) -> Vec<(String, Entry<V>)> {
        let keys: Vec<String> = self
            .entries
            .iter()
            .filter(|(_, e)| e.version.node == node && e.value.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        keys.into_iter()
            .map(|key| {
                let entry = self.delete(&key);
                (key, entry)
            })
            .collect()
    }

    /// Drops tombstones older than `horizon` (a Lamport time every node has passed), so the
    /// table does not grow without bound.
    pub fn reap(&mut self, horizon: u64) -> usize {
        let before = self.entries.len();
        self.entries
            .retain(|_, e| e.value.is_some() || e.version.time >= horizon);
        before - self.entries.len()
    }

    /// Forgets an entry without leaving a tombstone (reaping dead entries locally).
    pub fn remove(&mut self, key: &str) -> Option<Entry<V>> {
        self.entries.remove(key)
    }

    /// The entry of a key, tombstone included.
    pub fn entry(&self, key: &str) -> Option<&Entry<V>> {
        self.entries.get(key)
    }

    pub fn get(&self, key: &str) -> Option<&V> {
        self.entries.get(key)?.value.as_ref()
    }

    /// Live entries, in key order.
    pub fn live(&self) -> impl Iterator<Item = (&str, &V)> {
        self.entries
            .iter()
            .filter_map(|(k, e)| e.value.as_ref().map(|v| (k.as_str(), v)))
    }

    /// Every entry, tombstones included, as a full-state sync sends them.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry<V>)> {
        self.entries.iter().map(|(k, e)| (k.as_str(), e))
    }

    pub fn clock(&self) -> &LamportClock {
        &self.clock
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_delayed_older_write_cannot_undo_a_delete() {
        let mut a = Table::new("a");
        let mut b = Table::new("b");
        let set = a.set("task1", "10.0.1.2");
        b.merge("task1", set.clone());
        let tombstone = b.delete("task1");
        a.merge("task1", tombstone);
        assert_eq!(a.get("task1"), None);
        // The original write arrives again, late: the tombstone wins.
        assert!(!a.merge("task1", set));
        assert_eq!(a.get("task1"), None);
        assert!(
            b.clock().now() > 1,
            "b's delete was ordered after a's write"
        );
    }

    #[test]
    fn a_dead_node_is_withdrawn_everywhere() {
        let mut a = Table::new("a");
        let mut c = Table::new("c");
        for key in ["t1", "t2"] {
            let entry = c.set(key, 1);
            a.merge(key, entry);
        }
        let own = a.set("t3", 3);
        let withdrawn = a.withdraw("c");
        assert_eq!(withdrawn.len(), 2);
        assert_eq!(a.live().collect::<Vec<_>>(), [("t3", &3)]);
        // Another node applying the withdrawal agrees.
        let mut b = Table::new("b");
        b.merge_all(&c);
        b.merge("t3", own);
        for (key, entry) in withdrawn {
            b.merge(&key, entry);
        }
        assert_eq!(b.live().collect::<Vec<_>>(), [("t3", &3)]);
    }

    #[test]
    fn reaping_keeps_live_entries_and_recent_tombstones() {
        let mut t = Table::new("a");
        t.set("keep", 1);
        t.set("old", 2);
        t.delete("old"); // time 3
        t.set("young", 4);
        t.delete("young"); // time 5
        assert_eq!(t.reap(4), 1);
        assert_eq!(
            t.entries().map(|(k, _)| k).collect::<Vec<_>>(),
            ["keep", "young"]
        );
    }

    /// Random writes by three nodes: (node index, key index, Some(value) or delete).
    fn ops() -> impl Strategy<Value = Vec<(usize, u8, Option<u8>)>> {
        proptest::collection::vec(
            (0usize..3, 0u8..6, proptest::option::of(any::<u8>())),
            0..40,
        )
    }

    /// Every entry gossiped, with its key, in the order written.
    type Gossip = Vec<(String, Entry<u8>)>;

    /// Plays the ops on three replicas; returns the replicas and every entry gossiped.
    fn play(ops: &[(usize, u8, Option<u8>)]) -> (Vec<Table<u8>>, Gossip) {
        let mut nodes: Vec<Table<u8>> = ["a", "b", "c"].iter().map(|n| Table::new(n)).collect();
        let mut gossiped: Gossip = Vec::new();
        for (i, (node, key, value)) in ops.iter().enumerate() {
            let key = format!("k{key}");
            // Some gossip gets through while writing, so clocks move as in a live cluster.
            if i % 3 == 0 {
                for (k, e) in &gossiped {
                    nodes[*node].merge(k, e.clone());
                }
            }
            let entry = match value {
                Some(v) => nodes[*node].set(&key, *v),
                None => nodes[*node].delete(&key),
            };
            gossiped.push((key, entry));
        }
        (nodes, gossiped)
    }

    proptest! {
        #[test]
        fn replicas_converge_whatever_the_delivery_order(
            ops in ops(),
            seed in any::<u64>(),
        ) {
            let (_, gossiped) = play(&ops);
            // Two fresh replicas receive every entry in different orders, some twice.
            let mut forward = Table::new("x");
            for (k, e) in &gossiped {
                forward.merge(k, e.clone());
            }
            let mut shuffled = gossiped.clone();
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                shuffled.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let mut backward = Table::new("y");
            for (k, e) in shuffled.iter().chain(gossiped.iter().take(5)) {
                backward.merge(k, e.clone());
            }
            prop_assert_eq!(forward.entries().collect::<Vec<_>>(), backward.entries().collect::<Vec<_>>());
        }

        #[test]
        fn merge_is_commutative_and_idempotent(ops in ops()) {
            let (nodes, _) = play(&ops);
            let (a, b) = (&nodes[0], &nodes[1]);
            let mut ab = a.clone();
            ab.merge_all(b);
            let mut ba = b.clone();
            ba.merge_all(a);
            prop_assert_eq!(ab.entries().collect::<Vec<_>>(), ba.entries().collect::<Vec<_>>());
            let mut again = ab.clone();
            prop_assert_eq!(again.merge_all(&ab.clone()), 0);
            prop_assert_eq!(again.merge_all(b), 0);
            prop_assert_eq!(again.entries().collect::<Vec<_>>(), ab.entries().collect::<Vec<_>>());
        }

        #[test]
        fn the_newest_write_of_each_key_wins_and_tombstones_hide_values(ops in ops()) {
            let (_, gossiped) = play(&ops);
            let mut merged = Table::new("m");
            for (k, e) in &gossiped {
                merged.merge(k, e.clone());
            }
            let mut newest: BTreeMap<&str, &Entry<u8>> = BTreeMap::new();
            for (k, e) in &gossiped {
                if newest.get(k.as_str()).is_none_or(|n| n.version < e.version) {
                    newest.insert(k, e);
                }
            }
            for (k, e) in newest {
                prop_assert_eq!(merged.get(k), e.value.as_ref());
            }
        }
    }
}
