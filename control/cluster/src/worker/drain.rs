//! The drain before a withdrawn task is signalled: every node must have stopped sending it
//! new connections. Gossip carries the withdrawal in milliseconds, but a loaded node may
//! take longer to reprogram its tables, and a connection it sends meanwhile would be cut by
//! the stop. So the drain lasts `MIN` when the task's network namespace accepted no new TCP
//! connection in its last `QUIET` (its `PassiveOpens` counter, per namespace), else until it
//! has accepted none for `QUIET`, and at most `MAX`.

use std::time::Duration;

use tokio::time::Instant;

const MIN: Duration = Duration::from_secs(1);
const QUIET: Duration = Duration::from_millis(500);
const MAX: Duration = Duration::from_secs(5);
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// Waits until the task whose PID 1 is `pid` (None: not known, the minimum only) is drained;
/// whether it still accepted connections when `MAX` passed.
pub async fn until_quiet(pid: Option<u32>) -> bool {
    let start = Instant::now();
    let Some(pid) = pid else {
        tokio::time::sleep(MIN).await;
        return false;
    };
    // The quiet window is the minimum's last part: a quiet task stops after `MIN`, as before.
    tokio::time::sleep(MIN - QUIET).await;
    let mut last = passive_opens(pid);
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < QUIET || start.elapsed() < MIN {
        if start.elapsed() >= MAX {
            return true;
        }
        tokio::time::sleep(LOOK_EVERY).await;
        let now = passive_opens(pid);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    false
}

/// TCP connections the network namespace of `pid` accepted so far (None: unreadable, e.g.
/// the task ended).
fn passive_opens(pid: u32) -> Option<u64> {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).ok()?;
    tcp_counter(&snmp, "PassiveOpens")
}

/// A counter of the `Tcp:` lines of `/proc/net/snmp` (a line of names, then one of values).
fn tcp_counter(snmp: &str, name: &str) -> Option<u64> {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let index = names.split_whitespace().position(|n| n == name)?;
    values.split_whitespace().nth(index)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tcp_counter_is_read_by_name() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm RtoMin ActiveOpens PassiveOpens\nTcp: 1 200 7 42\n\
                    Udp: InDatagrams\nUdp: 3\n";
        assert_eq!(tcp_counter(snmp, "PassiveOpens"), Some(42));
        assert_eq!(tcp_counter(snmp, "Nope"), None);
        assert_eq!(tcp_counter("", "PassiveOpens"), None);
    }

    #[test]
    fn this_process_namespace_has_the_counter() {
        assert!(passive_opens(std::process::id()).is_some());
    }
}
