//! Following a service's logs (`service logs --follow`, the Engine API's `follow=1`): the
//! managers are asked every half second for what came after the previous answer (its cursor),
//! so each line comes once; a node whose tasks cannot be read, or managers that cannot
//! answer for a moment (an election), are reported once per outage, not at every poll.

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
    /// `--tail`, for the tasks there when following started. Sent until every node has
    /// answered once (a node applies it only to tasks the cursor does not hold yet), so a
    /// node unreadable at first is not read from its tasks' first lines once it answers; a
    /// task started on another node meanwhile is tailed too.
    tail: Option<usize>,
    after: LogCursor,
    /// Nodes (IDs) the previous poll could not read.
    unreadable: BTreeSet<String>,
    /// Whether the previous poll got no answer at all.
    failing: bool,
    polled: bool,
}

/// What one poll brought.
#[derive(Debug, Default, PartialEq)]
pub struct LogBatch {
    pub lines: Vec<LogLine>,
    /// Nodes that could not be read this time and could the time before.
    pub newly_unreadable: Vec<UnreadableNode>,
    /// Why the managers did not answer, if they did the time before.
    pub newly_failed: Option<String>,
}

impl LogFollower {
    pub fn new(service: &str, tail: Option<usize>) -> Self {
        Self {
            service: service.to_owned(),
            tail,
            after: LogCursor::new(),
            unreadable: BTreeSet::new(),
            failing: false,
            polled: false,
        }
    }

    /// The next poll's answer through `control` (the first at once, the next ones every half
    /// second); None once the service is gone. Managers unable to answer for now (no leader,
    /// a timeout) make an empty batch, and the next poll tries again.
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
            tail: self.tail,
            after: Some(self.after.clone()),
        };
        match control(request).await {
            Ok(ControlResponse::Logs(logs)) => {
                self.failing = false;
                Ok(Some(self.absorb(logs)))
            }
            Ok(other) => bail!("unexpected answer from the agent: {other:?}"),
            Err(err) => match ApiError::kind_of(&err) {
                ErrorKind::NotFound => Ok(None),
                ErrorKind::Unavailable => {
                    let already = std::mem::replace(&mut self.failing, true);
                    Ok(Some(LogBatch {
                        newly_failed: (!already).then(|| format!("{err:#}")),
                        ..LogBatch::default()
                    }))
                }
                _ => Err(err),
            },
        }
    }

    fn absorb(&mut self, logs: ServiceLogs) -> LogBatch {
        self.after.extend(logs.cursor);
        if logs.unreadable.is_empty() {
            self.tail = None;
        }
        let unreadable = logs.unreadable.iter().map(|u| u.node_id.clone()).collect();
        let previously = std::mem::replace(&mut self.unreadable, unreadable);
        LogBatch {
            lines: logs.lines,
            newly_unreadable: logs
                .unreadable
                .into_iter()
                .filter(|u| !previously.contains(&u.node_id))
                .collect(),
            newly_failed: None,
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
                    node_id: format!("id-{n}"),
                    node: (*n).into(),
                    error: "timed out".into(),
                })
                .collect(),
        }
    }

    /// Polls once, answering with `logs`: the request it sent (tail, cursor) and the batch.
    async fn poll(
        follower: &mut LogFollower,
        logs: Result<ServiceLogs>,
    ) -> ((Option<usize>, LogCursor), LogBatch) {
        let mut asked = None;
        let batch = follower
            .next(|request| {
                asked = Some(request);
                std::future::ready(logs.map(ControlResponse::Logs))
            })
            .await
            .unwrap()
            .expect("a batch");
        let Some(ControlRequest::ServiceLogs { tail, after, .. }) = asked else {
            panic!("a logs request");
        };
        ((tail, after.expect("a cursor")), batch)
    }

    fn cursor(entries: &[(&str, u64)]) -> LogCursor {
        entries.iter().map(|(t, o)| ((*t).into(), *o)).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn each_poll_goes_on_from_the_last_and_an_outage_is_reported_once() {
        let mut follower = LogFollower::new("web", Some(3));
        let (sent, batch) = poll(
            &mut follower,
            Ok(answer(&["a", "b"], &[("t1", 4)], &["node2"])),
        )
        .await;
        assert_eq!(sent, (Some(3), cursor(&[])));
        assert_eq!(batch.lines.len(), 2);
        assert_eq!(batch.newly_unreadable.len(), 1);

        // Still unreadable: not reported again; the tail stays until node2 has answered.
        let (sent, batch) = poll(&mut follower, Ok(answer(&["c"], &[("t1", 6)], &["node2"]))).await;
        assert_eq!(sent, (Some(3), cursor(&[("t1", 4)])));
        assert_eq!(batch.newly_unreadable, []);
        let (sent, _) = poll(&mut follower, Ok(answer(&[], &[("t2", 9)], &[]))).await;
        assert_eq!(sent, (Some(3), cursor(&[("t1", 6)])));

        // Every node answered: no tail any more. Then node2 goes again: a new outage.
        let (sent, batch) = poll(&mut follower, Ok(answer(&[], &[], &["node2"]))).await;
        assert_eq!(sent, (None, cursor(&[("t1", 6), ("t2", 9)])));
        assert_eq!(batch.newly_unreadable.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn managers_unable_to_answer_are_said_once_and_the_follow_goes_on() {
        let mut follower = LogFollower::new("web", None);
        let election = || Err(ApiError::unavailable("the swarm does not have a leader").into());
        let (_, batch) = poll(&mut follower, election()).await;
        assert!(batch.newly_failed.is_some_and(|e| e.contains("leader")));
        let (_, batch) = poll(&mut follower, election()).await;
        assert_eq!(batch, LogBatch::default());
        let (_, batch) = poll(&mut follower, Ok(answer(&["a"], &[("t1", 2)], &[]))).await;
        assert_eq!(batch.lines.len(), 1);
        let (_, batch) = poll(&mut follower, election()).await;
        assert!(batch.newly_failed.is_some(), "a new outage");
    }

    #[tokio::test(start_paused = true)]
    async fn a_removed_service_ends_the_follow_and_other_errors_fail_it() {
        let mut follower = LogFollower::new("web", None);
        let gone = follower
            .next(|_| async { Err(ApiError::not_found("no such service: web").into()) })
            .await
            .unwrap();
        assert_eq!(gone, None);
        let broken = follower
            .next(|_| async { Err(ApiError::invalid("bad request").into()) })
            .await;
        assert!(broken.is_err());
    }
}
