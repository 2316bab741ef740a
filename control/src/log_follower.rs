//! Following a service's logs (`service logs --follow`, the Engine API's `follow=1`): the
//! managers are asked every half second for what came after the previous answer (its cursor),
//! so each line comes once, and a node whose tasks cannot be read is reported once per
//! outage, not at every poll.

use std::{collections::BTreeSet, future::Future, time::Duration};

use anyhow::{bail, Result};
use shoal_api::{ApiError, ErrorKind};
use shoal_cluster::protocol::{
    ControlRequest, ControlResponse, LogCursor, LogLine, ServiceLogs, UnreadableNode,
};

/// Between two polls.
const POLL_EVERY: Duration = Duration::from_millis(500);

pub struct LogFollower {
    service: String,
    /// `--tail` of the first poll; the later ones go on from the cursor.
    tail: Option<usize>,
    after: LogCursor,
    /// Nodes the previous poll could not read.
    unreadable: BTreeSet<String>,
    polled: bool,
}

/// What one poll brought.
#[derive(Debug, Default, PartialEq)]
pub struct LogBatch {
    pub lines: Vec<LogLine>,
    /// Nodes that could not be read this time and could the time before.
    pub newly_unreadable: Vec<UnreadableNode>,
}

impl LogFollower {
    pub fn new(service: &str, tail: Option<usize>) -> Self {
        Self {
            service: service.to_owned(),
            tail,
            after: LogCursor::new(),
            unreadable: BTreeSet::new(),
            polled: false,
        }
    }

    /// The next poll's answer through `control` (the first at once, the next ones every half
    /// second); None once the service is gone.
    pub async fn next<F, Answer>(&mut self, control: F) -> Result<Option<LogBatch>>
    where
        F: FnOnce(ControlRequest) -> Answer,
        Answer: Future<Output = Result<ControlResponse>>,
    {
        if self.polled {
            tokio::time::sleep(POLL_EVERY).await;
        }
        self.polled = true;
        let request = ControlRequest::ServiceLogs {
            service: self.service.clone(),
            tail: self.tail.take(),
            after: Some(self.after.clone()),
        };
        match control(request).await {
            Ok(ControlResponse::Logs(logs)) => Ok(Some(self.absorb(logs))),
            Ok(other) => bail!("unexpected answer from the agent: {other:?}"),
            Err(err) if ApiError::kind_of(&err) == ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    fn absorb(&mut self, logs: ServiceLogs) -> LogBatch {
        self.after.extend(logs.cursor);
        let unreadable = logs.unreadable.iter().map(|u| u.node.clone()).collect();
        let previously = std::mem::replace(&mut self.unreadable, unreadable);
        LogBatch {
            lines: logs.lines,
            newly_unreadable: logs
                .unreadable
                .into_iter()
                .filter(|u| !previously.contains(&u.node))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(lines: &[&str], cursor: &[(&str, u64)], unreadable: &[&str]) -> ServiceLogs {
        ServiceLogs {
            lines: lines
                .iter()
                .map(|l| LogLine {
                    source: "web.1.a@node1".into(),
                    line: (*l).into(),
                })
                .collect(),
            cursor: cursor.iter().map(|(t, o)| ((*t).into(), *o)).collect(),
            unreadable: unreadable
                .iter()
                .map(|n| UnreadableNode {
                    node: (*n).into(),
                    error: "timed out".into(),
                })
                .collect(),
        }
    }

    /// Answers with `logs` and keeps the request it was asked.
    fn reply(
        asked: &mut Option<ControlRequest>,
        logs: ServiceLogs,
    ) -> impl FnOnce(ControlRequest) -> std::future::Ready<Result<ControlResponse>> + '_ {
        move |request| {
            *asked = Some(request);
            std::future::ready(Ok(ControlResponse::Logs(logs)))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_poll_goes_on_from_the_last_and_an_outage_is_reported_once() {
        let mut follower = LogFollower::new("web", Some(3));
        let mut asked = None;
        let first = answer(&["a", "b"], &[("t1", 4)], &["node2"]);
        let batch = follower.next(reply(&mut asked, first)).await.unwrap();
        let batch = batch.expect("a batch");
        assert_eq!(batch.lines.len(), 2);
        assert_eq!(batch.newly_unreadable.len(), 1);
        let Some(ControlRequest::ServiceLogs { tail, after, .. }) = asked.take() else {
            panic!("a logs request");
        };
        assert_eq!((tail, after), (Some(3), Some(LogCursor::new())));

        // Still unreadable: not reported again; the tail was for the first poll only.
        let second = answer(&["c"], &[("t2", 9)], &["node2"]);
        let batch = follower
            .next(reply(&mut asked, second))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch.newly_unreadable, []);
        let Some(ControlRequest::ServiceLogs { tail, after, .. }) = asked.take() else {
            panic!("a logs request");
        };
        assert_eq!(tail, None);
        assert_eq!(after, Some([("t1".to_owned(), 4)].into()));

        // Back, then gone again: a new outage.
        follower
            .next(reply(&mut asked, answer(&[], &[("t1", 6)], &[])))
            .await
            .unwrap();
        let Some(ControlRequest::ServiceLogs { after, .. }) = asked.take() else {
            panic!("a logs request");
        };
        assert_eq!(
            after,
            Some([("t1".to_owned(), 4), ("t2".to_owned(), 9)].into())
        );
        let batch = follower
            .next(reply(&mut asked, answer(&[], &[], &["node2"])))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(batch.newly_unreadable.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_service_ends_the_follow() {
        let mut follower = LogFollower::new("web", None);
        let gone = follower
            .next(|_| async { Err(ApiError::not_found("no such service: web").into()) })
            .await
            .unwrap();
        assert_eq!(gone, None);
    }
}
