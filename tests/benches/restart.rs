//! What an agent restart costs, side by side with the other ways a node's agent goes away,
//! in one run (`cargo bench -p shoal-tests --bench restart`, as root, release binary built).
//! Prints a table and writes `target/bench/restart.json`.
//!
//! A 3-node lab (`--reschedule-grace 30`, so the managers do not replace tasks during the
//! window), `web` (3 replicas of `shoal whoami`) published on 8080 and on an overlay, one
//! replica per node. For each way node2's agent goes away for `AWAY_SECS`:
//! - **kill**: `lab stop node2 --kill` (SIGKILL, as a crash), then `lab start node2`;
//! - **stop**: `lab stop node2` (SIGTERM, as `systemctl restart`), then `lab start node2`;
//! - **power-off**: `lab stop node2 --power-off` (link down, every process killed, as a host
//!   that is gone), then `lab start node2`: the baseline of a node that really goes away;
//!
//! it measures, while the agent is away and for 5 s after it is back:
//! - requests through every node's :8080 (curl, 1 s timeout each) and how many failed;
//! - 6 connections held through node2 (an echo every 200 ms): how many lost an echo;
//! - DNS from node2's own task (a query every 250 ms, 8 s timeout): queries answered;
//! - the time from `lab start` until node2's API answers and until its task resolves
//!   `tasks.web` again.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use shoal_tests::{shoal_bin, wait_for, RunningTask, TestLab};

const AWAY_SECS: u64 = 10;
const AFTER_SECS: u64 = 5;

/// Requests through every node's :8080 for `$1` seconds; prints `requests=N failed=F`.
const REQUEST_LOOP: &str = r#"
end=$(( ${EPOCHREALTIME/./} + $1 * 1000000 )); n=0; failed=0
while [ ${EPOCHREALTIME/./} -lt $end ] && [ $n -lt 50000 ]; do
  for ip in 192.168.77.11 192.168.77.12 192.168.77.13; do
    curl -s -o /dev/null --max-time 1 http://$ip:8080/ || failed=$((failed + 1))
    n=$((n + 1))
  done
done
echo "requests=$n failed=$failed"
"#;

/// `$2` connections held to `$1`:8080, an echo each every 200 ms for `$3` seconds; prints
/// how many connections lost at least one echo.
const HOLDER: &str = r#"
import socket, sys, time
conns = [socket.create_connection((sys.argv[1], 8080), timeout=2) for _ in range(int(sys.argv[2]))]
lost = set()
end = time.time() + float(sys.argv[3])
while time.time() < end:
    for i, c in enumerate(conns):
        try:
            c.sendall(b"ping\n")
            if not c.recv(64):
                lost.add(i)
        except OSError:
            lost.add(i)
    time.sleep(0.2)
print("lost=%d" % len(lost), flush=True)
"#;

/// Resolves `tasks.web` in a task every 250 ms for `$1` seconds; prints `queries=N answered=A`.
const RESOLVER: &str = r#"
end=$(( ${EPOCHREALTIME/./} + $1 * 1000000 )); n=0; ok=0
while [ ${EPOCHREALTIME/./} -lt $end ]; do
  [ -n "$(dig +short +tries=1 +time=8 @127.0.0.11 tasks.web)" ] && ok=$((ok + 1))
  n=$((n + 1)); sleep 0.25
done
echo "queries=$n answered=$ok"
"#;

fn background(lab: &TestLab, member: &str, command: &[&str]) -> std::process::Child {
    Command::new(shoal_bin())
        .args(["lab", "--name", &lab.name, "exec", member, "--"])
        .args(command)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("a background command")
}

/// The number after `key=` in a command's output.
fn field(output: std::process::Output, key: &str) -> u64 {
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {text:?}"))
}

struct Outcome {
    requests: u64,
    failed: u64,
    held_lost: u64,
    queries: u64,
    answered: u64,
    api_back_ms: u128,
    dns_back_ms: u128,
}

fn away_and_back(lab: &TestLab, how: &str, task: &RunningTask) -> Outcome {
    let window = (AWAY_SECS + AFTER_SECS + 2).to_string();
    let requests = background(
        lab,
        "client",
        &["bash", "-c", REQUEST_LOOP, "loop", &window],
    );
    let holder = background(
        lab,
        "client",
        &["python3", "-c", HOLDER, "192.168.77.12", "6", &window],
    );
    let exec = ["shoal", "task", "exec", &task.name, "--", "bash", "-c"];
    let mut resolver_command = exec.to_vec();
    resolver_command.extend([RESOLVER, "resolve", &window]);
    let resolver = background(lab, "node2", &resolver_command);
    std::thread::sleep(Duration::from_secs(1));
    let mut stop = vec!["stop", "node2"];
    match how {
        "kill" => stop.push("--kill"),
        "power-off" => stop.push("--power-off"),
        _ => {}
    }
    lab.ok(&stop);
    std::thread::sleep(Duration::from_secs(AWAY_SECS));
    let started = Instant::now();
    lab.ok(&["start", "node2"]);
    wait_for("node2's API", Duration::from_secs(30), || {
        let out = lab.run(&["exec", "node2", "--", "shoal", "info"]);
        out.status.success().then_some(())
    });
    let api_back_ms = started.elapsed().as_millis();
    let dns_back_ms = match how {
        // The task is gone with the powered-off node: nothing to resolve from.
        "power-off" => 0,
        _ => {
            wait_for("node2's task resolving", Duration::from_secs(30), || {
                let out = lab.in_task(
                    task,
                    &[
                        "dig",
                        "+short",
                        "+tries=1",
                        "+time=1",
                        "@127.0.0.11",
                        "tasks.web",
                    ],
                );
                (!out.stdout.is_empty()).then_some(())
            });
            started.elapsed().as_millis()
        }
    };
    let requests = requests.wait_with_output().unwrap();
    let held = holder.wait_with_output().unwrap();
    let resolved = resolver.wait_with_output().unwrap();
    let (queries, answered) = if how == "power-off" {
        (0, 0)
    } else {
        (
            field(resolved.clone(), "queries"),
            field(resolved, "answered"),
        )
    };
    Outcome {
        requests: field(requests.clone(), "requests"),
        failed: field(requests, "failed"),
        held_lost: field(held, "lost"),
        queries,
        answered,
        api_back_ms,
        dns_back_ms,
    }
}

fn main() {
    shoal_tests::require_root();
    shoal_tests::require_tools(&["curl", "python3", "dig"]);
    let mut results = serde_json::Map::new();
    println!(
        "\nnode2's agent away {AWAY_SECS} s (3-node lab, web x3 on :8080), then {AFTER_SECS} s more"
    );
    println!(
        "{:<10}{:>10}{:>9}{:>12}{:>14}{:>12}{:>12}",
        "how", "requests", "failed", "held lost", "DNS answered", "API back", "DNS back"
    );
    for how in ["kill", "stop", "power-off"] {
        let lab = TestLab::up_with(
            &format!("bench-rs-{}", &how[..4]),
            3,
            &["--reschedule-grace", "30"],
        );
        lab.exec("node1", &["shoal", "network", "create", "front"]);
        lab.create_service(
            "web",
            &[
                "--replicas",
                "3",
                "--publish",
                "8080:80",
                "--network",
                "front",
            ],
            &["shoal", "whoami", "--listen", "0.0.0.0:80"],
        );
        let tasks = lab.running_tasks("web", 3);
        let task = tasks
            .iter()
            .find(|t| t.node == "node2")
            .expect("a replica on node2")
            .clone();
        wait_for("web through node2", Duration::from_secs(20), || {
            lab.client_get("192.168.77.12:8080", 1)
        });
        let o = away_and_back(&lab, how, &task);
        println!(
            "{how:<10}{:>10}{:>9}{:>12}{:>14}{:>10}ms{:>10}ms",
            o.requests,
            o.failed,
            format!("{}/6", o.held_lost),
            format!("{}/{}", o.answered, o.queries),
            o.api_back_ms,
            o.dns_back_ms
        );
        results.insert(
            how.into(),
            json!({"requests": o.requests, "failed": o.failed, "held_connections_lost": o.held_lost,
                   "held_connections": 6, "dns_queries": o.queries, "dns_answered": o.answered,
                   "api_back_ms": o.api_back_ms, "dns_back_ms": o.dns_back_ms}),
        );
        lab.down_clean();
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("restart.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
}
