//! How fast an unhealthy task leaves routing on every node (`cargo bench -p shoal-tests
//! --bench health`, as root, release binary built). Prints a table and writes
//! `target/bench/health.json`.
//!
//! A 3-node lab, `web` (3 replicas of `shoal whoami`, one per node) published on 8080 and on
//! an overlay with a VIP, checked by `test ! -e /tmp/hsick-$SHOAL_TASK_ID` every second with
//! one retry, and a global client service (so every node programs the VIP). Each of
//! `TRIALS` trials makes one task sick (rotating over the nodes) and polls every node's
//! kernel maps (`ingress ls`, `lb ls`) from one thread per node until the task is in
//! neither, then waits for the orchestrator to replace it. Per trial:
//! - **unhealthy -> gone**: from the end of the probe that found it unhealthy (its node's
//!   clock, in the task's probe log) to the last node's maps without it: gossip and
//!   reprogramming, what this work adds over a probe interval;
//! - **sick -> gone**: from the file's creation to the last node without it: the above plus
//!   waiting for the next probe (at most one interval);
//! - **unhealthy -> stopped**: until the task ended (its Failed report): how long it would
//!   keep traffic if routing waited for the task to go, as Swarm's does.
//!
//! Each node's poll takes tens of milliseconds (a `shoal` client per read): the resolution.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};
use shoal_tests::{wait_for, RunningTask, TestLab};

const TRIALS: usize = 20;
const NODES: [&str; 3] = ["node1", "node2", "node3"];
const INTERVAL: Duration = Duration::from_secs(1);
/// The longest one trial may wait for the withdrawal (well beyond interval + 1 s).
const WITHDRAWAL_LIMIT: Duration = Duration::from_secs(15);

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

fn ips(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .into_iter()
        .flatten()
        // `IP` (a VIP's backends) or `[IP, slots]` (a published port's).
        .filter_map(|b| b.as_str().or_else(|| b[0].as_str()).map(str::to_owned))
        .collect()
}

/// Whether `node` routes new flows to the task at `ingress` (mesh) or `front` (VIP).
fn routes_to(lab: &TestLab, node: &str, ingress: &str, front: &str) -> Option<bool> {
    let ports = lab.try_json(node, &["ingress", "ls"])?;
    let port = ports.as_array()?.iter().find(|p| p["published"] == 8080)?;
    let vips = lab.try_json(node, &["lb", "ls", "web"])?;
    let vip = vips.as_array()?.first()?;
    Some(ips(&port["backends"]).contains(ingress) || ips(&vip["backends"]).contains(front))
}

fn running_healthy(lab: &TestLab) -> Option<Vec<Value>> {
    let tasks = lab.try_json("node1", &["service", "ps", "web"])?;
    let running: Vec<Value> = tasks
        .as_array()?
        .iter()
        .filter(|t| t["state"] == "running" && t["desired"] == "running")
        .cloned()
        .collect();
    let healthy = running.len() == 3 && running.iter().all(|t| t["health"]["status"] == "healthy");
    healthy.then_some(running)
}

fn task_by_id(lab: &TestLab, id: &str) -> Option<Value> {
    let tasks = lab.try_json("node1", &["service", "ps", "web"])?;
    tasks.as_array()?.iter().find(|t| t["id"] == id).cloned()
}

struct Trial {
    unhealthy_to_gone_ms: f64,
    sick_to_gone_ms: f64,
    unhealthy_to_stopped_ms: f64,
}

/// One trial on the `turn`-th node's task (sorted by node).
fn trial(lab: &TestLab, turn: usize) -> Trial {
    let mut running = wait_for("3 healthy tasks", Duration::from_secs(60), || {
        running_healthy(lab)
    });
    running.sort_by_key(|t| t["node"].as_str().unwrap_or_default().to_owned());
    for check in NODES {
        wait_for(
            &format!("{check} routing to 3"),
            Duration::from_secs(20),
            || {
                let ports = lab.try_json(check, &["ingress", "ls"])?;
                let port = ports.as_array()?.iter().find(|p| p["published"] == 8080)?;
                (ips(&port["backends"]).len() == 3).then_some(())
            },
        );
    }
    let task = running[turn % running.len()].clone();
    let id = task["id"].as_str().expect("id").to_owned();
    let address = |network: &str| {
        task["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a[0] == network)
            .and_then(|a| a[1].as_str())
            .expect("an address")
            .to_owned()
    };
    let (ingress, front) = (address("ingress"), address("front"));
    let sick_file = format!("/tmp/hsick-{id}");
    std::fs::write(&sick_file, b"").expect("the sick file");
    let sick_ms = unix_ms();
    let gone: Vec<u64> = std::thread::scope(|scope| {
        let pollers: Vec<_> = NODES
            .iter()
            .map(|poll_node| {
                let (ingress, front) = (&ingress, &front);
                scope.spawn(move || {
                    let started = Instant::now();
                    while started.elapsed() < WITHDRAWAL_LIMIT {
                        if routes_to(lab, poll_node, ingress, front) == Some(false) {
                            return unix_ms();
                        }
                    }
                    panic!("{poll_node} still routes to the sick task after {WITHDRAWAL_LIMIT:?}");
                })
            })
            .collect();
        pollers
            .into_iter()
            .map(|p| p.join().expect("a poller"))
            .collect()
    });
    let last_gone = *gone.iter().max().expect("three nodes");
    let failed = wait_for("the sick task Failed", Duration::from_secs(30), || {
        task_by_id(lab, &id).filter(|t| t["state"] == "failed")
    });
    let _ = std::fs::remove_file(&sick_file);
    let unhealthy_ms = failed["health"]["log"]
        .as_array()
        .and_then(|log| log.iter().rev().find(|p| p["exit_code"] != 0))
        .and_then(|p| p["end_ms"].as_u64())
        .expect("the failing probe");
    // `state_since` is in seconds: the stop's resolution.
    let stopped_ms = failed["state_since"].as_u64().expect("state_since") * 1000;
    Trial {
        unhealthy_to_gone_ms: last_gone as f64 - unhealthy_ms as f64,
        sick_to_gone_ms: (last_gone - sick_ms) as f64,
        unhealthy_to_stopped_ms: stopped_ms as f64 - unhealthy_ms as f64,
    }
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank]
}

fn main() {
    let lab = TestLab::up("hbench", 3);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    let interval = format!("{}s", INTERVAL.as_secs());
    lab.create_service(
        "web",
        &[
            "--replicas",
            "3",
            "--replicas-max-per-node",
            "1",
            "--network",
            "front",
            "--publish",
            "8080:80",
            "--health-cmd",
            "test ! -e /tmp/hsick-$SHOAL_TASK_ID",
            "--health-interval",
            &interval,
            "--health-retries",
            "1",
        ],
        &["shoal", "whoami", "--listen", "0.0.0.0:80"],
    );
    lab.create_service(
        "client",
        &["--mode", "global", "--network", "front"],
        &["sleep", "infinity"],
    );
    let _: Vec<RunningTask> = lab.running_tasks("client", 3);
    let trials: Vec<Trial> = (0..TRIALS)
        .map(|i| {
            let t = trial(&lab, i);
            eprintln!(
                "trial {i}: unhealthy->gone {:.0} ms, sick->gone {:.0} ms, unhealthy->stopped {:.0} ms",
                t.unhealthy_to_gone_ms, t.sick_to_gone_ms, t.unhealthy_to_stopped_ms
            );
            t
        })
        .collect();
    let column = |f: fn(&Trial) -> f64| trials.iter().map(f).collect::<Vec<f64>>();
    let rows = [
        (
            "unhealthy -> no node routes it",
            column(|t| t.unhealthy_to_gone_ms),
        ),
        (
            "check starts failing -> no node routes it",
            column(|t| t.sick_to_gone_ms),
        ),
        (
            "unhealthy -> task stopped (Swarm's routing ends here)",
            column(|t| t.unhealthy_to_stopped_ms),
        ),
    ];
    println!(
        "health: {TRIALS} trials, 3 nodes, interval {interval}, retries 1 (target: below interval + 1 s = {} ms)",
        INTERVAL.as_millis() + 1000
    );
    println!("{:<55} {:>10} {:>10}", "", "median ms", "p99 ms");
    let mut results = serde_json::Map::new();
    for (name, values) in &rows {
        let (median, p99) = (percentile(values, 50.0), percentile(values, 99.0));
        println!("{name:<55} {median:>10.0} {p99:>10.0}");
        results.insert(
            (*name).to_owned(),
            json!({ "median_ms": median, "p99_ms": p99, "trials_ms": values }),
        );
    }
    let ratio = percentile(&rows[2].1, 50.0) / percentile(&rows[0].1, 50.0).max(1.0);
    println!("routing by health ends new flows {ratio:.1}x sooner than waiting for the stop");
    results.insert("stop_over_withdrawal_ratio".into(), json!(ratio));
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(
        out.join("health.json"),
        serde_json::to_string_pretty(&Value::Object(results)).expect("JSON"),
    )
    .expect("writing health.json");
    lab.down_clean();
}
