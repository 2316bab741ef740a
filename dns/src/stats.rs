//! Counters by outcome, node-wide and monotonic, for metrics.

use std::sync::atomic::{AtomicU64, Ordering};

/// How one query ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    AnsweredLocally,
    NxDomain,
    NoData,
    Forwarded,
    ServFail,
    FormErr,
    Refused,
    Dropped,
}

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DnsStats {
    /// Cluster names answered with records (A or PTR).
    pub answered_locally: u64,
    /// Cluster names that do not exist for the asking task.
    pub nxdomain: u64,
    /// Cluster names asked with a type they have no record of (AAAA, MX, …).
    pub nodata: u64,
    /// External names answered by an upstream (whatever its response code).
    pub forwarded: u64,
    /// No upstream answered in time, none is configured, or too many queries were in flight.
    pub servfail: u64,
    /// Undecodable queries or queries with other than one question.
    pub formerr: u64,
    /// Opcodes other than QUERY and classes other than IN.
    pub refused: u64,
    /// Messages too short to have a header, or responses sent to us.
    pub dropped: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters([AtomicU64; 8]);

impl Counters {
    pub(crate) fn count(&self, outcome: Outcome) {
        self.0[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> DnsStats {
        let get = |outcome: Outcome| self.0[outcome as usize].load(Ordering::Relaxed);
        DnsStats {
            answered_locally: get(Outcome::AnsweredLocally),
            nxdomain: get(Outcome::NxDomain),
            nodata: get(Outcome::NoData),
            forwarded: get(Outcome::Forwarded),
            servfail: get(Outcome::ServFail),
            formerr: get(Outcome::FormErr),
            refused: get(Outcome::Refused),
            dropped: get(Outcome::Dropped),
        }
    }
}
