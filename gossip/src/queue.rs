//! Table writes waiting to be disseminated, each sent a bounded number of times (the idea of
//! memberlist's TransmitLimitedQueue): a newer write of the same key replaces the older one,
//! and the least-sent writes go first.

use crate::message::Update;

/// Who may receive a write: everyone (membership table) or the nodes on one network.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Cluster,
    Network(String),
}

impl Update {
    pub fn scope(&self) -> Scope {
        match self {
            Update::Membership { .. } => Scope::Cluster,
            Update::Endpoint { net, .. } => Scope::Network(net.clone()),
        }
    }

    fn key(&self) -> &str {
        match self {
            Update::Membership { key, .. } | Update::Endpoint { key, .. } => key,
        }
    }
}

struct Pending {
    scope: Scope,
    update: Update,
    encoded_len: usize,
    sent: u32,
}

/// An upper bound of one record's bytes in the extensions trailer, and the trailer's length.
const EXTENSIONS_SHARE: usize = 4;

#[derive(Default)]
pub struct TransmitQueue {
    items: Vec<Pending>,
}

impl TransmitQueue {
    pub fn push(&mut self, update: Update) {
        let scope = update.scope();
        self.items
            .retain(|p| !(p.scope == scope && p.update.key() == update.key()));
        // With the record's share of an extensions trailer (at most a few bytes).
        let encoded_len = postcard::to_allocvec(&update).map_or(0, |b| b.len()) + EXTENSIONS_SHARE;
        self.items.push(Pending {
            scope,
            update,
            encoded_len,
            sent: 0,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Scopes with writes waiting.
    pub fn scopes(&self) -> Vec<Scope> {
        let mut scopes: Vec<Scope> = self.items.iter().map(|p| p.scope.clone()).collect();
        scopes.sort();
        scopes.dedup();
        scopes
    }

    /// The writes of `scope` for one packet to one node, least-sent first, within
    /// `max_bytes` of encoded updates; counts the send and forgets writes sent `limit` times.
    pub fn take_batch(&mut self, scope: &Scope, max_bytes: usize, limit: u32) -> Vec<Update> {
        let mut candidates: Vec<usize> = (0..self.items.len())
            .filter(|&i| self.items[i].scope == *scope)
            .collect();
        candidates.sort_by_key(|&i| self.items[i].sent);
        let mut batch = Vec::new();
        let mut used = 0;
        for i in candidates {
            let item = &mut self.items[i];
            // An oversized write still goes out, alone.
            if used > 0 && used + item.encoded_len > max_bytes {
                continue;
            }
            used += item.encoded_len;
            item.sent += 1;
            batch.push(item.update.clone());
        }
        self.items.retain(|p| p.sent < limit);
        batch
    }
}
