//! Cluster benchmarks in the lab (run on demand: `cargo bench -p shoal-tests --bench cluster`,
//! as root, with the release binary built). Prints a table and writes
//! target/bench/cluster.json.
//!
//! - convergence: `service create --replicas 50` until 50/50 run (3 nodes), then scale to 200;
//!   with the tasks' default containment (capabilities, no_new_privs, seccomp, masked paths)
//!   and without it (`SHOAL_TASK_CONFINEMENT=off`, a bench-only switch), alternately, three times
//!   each: what the containment costs a task's start;
//! - manager write latency (p50/p99) with 1 and 3 managers: node label updates sent straight
//!   to the local API socket, so no CLI process start is counted;
//! - agent memory (RSS): idle, and with 100 tasks on the node.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use shoal_tests::TestLab;

/// One request to an agent's API socket (HTTP/1.1, Connection: close).
fn api(socket: &Path, method: &str, path: &str, body: &Value) -> Value {
    let mut stream = UnixStream::connect(socket).expect("agent socket");
    let body = body.to_string();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: shoal\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

fn socket(lab: &TestLab, node: &str) -> std::path::PathBuf {
    lab.run_dir().join(node).join("shoal.sock")
}

fn running(lab: &TestLab, service: &str) -> usize {
    let tasks = api(
        &socket(lab, "node1"),
        "POST",
        "/v1/control",
        &json!({"ServiceTasks": {"service": service}}),
    );
    tasks["Tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["desired"] == "running" && t["state"] == "running")
        .count()
}

fn wait_running(lab: &TestLab, service: &str, want: usize, limit: Duration) -> Duration {
    let start = Instant::now();
    while running(lab, service) != want {
        assert!(
            start.elapsed() < limit,
            "{service} did not reach {want} running in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn create(lab: &TestLab, name: &str, replicas: u64) {
    let spec = json!({"ServiceCreate": {
        "name": name, "mode": "replicated", "replicas": replicas,
        "command": ["sleep", "100000"], "env": [], "constraints": [],
        "update_parallelism": 1, "update_delay_secs": 0}});
    api(&socket(lab, "node1"), "POST", "/v1/control", &spec);
}

fn scale(lab: &TestLab, name: &str, replicas: u64) {
    let update = json!({"ServiceUpdate": {"service": name, "replicas": replicas, "env_add": [], "force": false}});
    api(&socket(lab, "node1"), "POST", "/v1/control", &update);
}

/// Latencies (ms) of `count` replicated writes through node1's agent.
fn write_latencies(lab: &TestLab, count: usize) -> Vec<f64> {
    let mut latencies = Vec::with_capacity(count);
    for i in 0..count {
        let update = json!({"NodeUpdate": {"node": "node1", "availability": null,
            "label_add": [format!("bench={i}")], "label_rm": [], "role": null}});
        let start = Instant::now();
        api(&socket(lab, "node1"), "POST", "/v1/control", &update);
        latencies.push(start.elapsed().as_secs_f64() * 1e3);
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn agent_rss_kib(lab: &TestLab, node: &str) -> u64 {
    let info = api(&socket(lab, node), "GET", "/v1/info", &Value::Null);
    let pid = info["pid"].as_u64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Convergence on 3 nodes: (create 50 until running, scale 50 -> 200 until running).
fn convergence(confined: bool) -> (Duration, Duration) {
    // The agents `lab up` starts inherit it.
    if confined {
        std::env::remove_var("SHOAL_TASK_CONFINEMENT");
    } else {
        std::env::set_var("SHOAL_TASK_CONFINEMENT", "off");
    }
    let lab = TestLab::up("bench-conv", 3);
    std::env::remove_var("SHOAL_TASK_CONFINEMENT");
    let create_start = Instant::now();
    create(&lab, "fifty", 50);
    wait_running(&lab, "fifty", 50, Duration::from_secs(120));
    let to_50 = create_start.elapsed();
    let scale_start = Instant::now();
    scale(&lab, "fifty", 200);
    wait_running(&lab, "fifty", 200, Duration::from_secs(300));
    let to_200 = scale_start.elapsed();
    lab.down_clean();
    (to_50, to_200)
}

fn main() {
    shoal_tests::require_root();
    let mut results = serde_json::Map::new();

    // Convergence, with and without the tasks' containment, alternately.
    let mut runs: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    for _ in 0..3 {
        for (i, confined) in [true, false].into_iter().enumerate() {
            let (to_50, to_200) = convergence(confined);
            runs[i].0.push(to_50.as_secs_f64());
            runs[i].1.push(to_200.as_secs_f64());
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
    };
    results.insert("create_50_to_running_s".into(), json!(median(&runs[0].0)));
    results.insert("scale_50_to_200_s".into(), json!(median(&runs[0].1)));
    results.insert(
        "unconfined_create_50_to_running_s".into(),
        json!(median(&runs[1].0)),
    );
    results.insert(
        "unconfined_scale_50_to_200_s".into(),
        json!(median(&runs[1].1)),
    );
    results.insert(
        "convergence_runs_s".into(),
        json!({"confined": runs[0], "unconfined": runs[1]}),
    );
    eprintln!(
        "convergence (median of 3): confined 50 {:.2}s, 200 {:.2}s; unconfined 50 {:.2}s, 200 {:.2}s",
        median(&runs[0].0),
        median(&runs[0].1),
        median(&runs[1].0),
        median(&runs[1].1)
    );
    if std::env::var("SHOAL_BENCH_CLUSTER").as_deref() == Ok("convergence") {
        println!(
            "{}",
            serde_json::to_string_pretty(&Value::Object(results)).unwrap()
        );
        return;
    }

    // Write latency with 1 and 3 managers.
    for managers in [1u8, 3] {
        let lab = TestLab::named(&format!("bench-w{managers}"));
        lab.run(&["down"]);
        lab.ok(&["up", "--nodes", "3", "--managers", &managers.to_string()]);
        std::thread::sleep(Duration::from_secs(2));
        write_latencies(&lab, 20); // warm-up
        let latencies = write_latencies(&lab, 300);
        results.insert(
            format!("write_{managers}_managers_ms"),
            json!({"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99)}),
        );
        lab.down_clean();
    }

    // Agent memory, idle and with 100 tasks on its node.
    let lab = TestLab::up("bench-mem", 1);
    std::thread::sleep(Duration::from_secs(2));
    let idle = agent_rss_kib(&lab, "node1");
    create(&lab, "hundred", 100);
    wait_running(&lab, "hundred", 100, Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(3));
    let busy = agent_rss_kib(&lab, "node1");
    results.insert("agent_rss_idle_mib".into(), json!(idle as f64 / 1024.0));
    results.insert(
        "agent_rss_100_tasks_mib".into(),
        json!(busy as f64 / 1024.0),
    );
    lab.down_clean();

    let results = Value::Object(results);
    println!("{}", serde_json::to_string_pretty(&results).unwrap());
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("cluster.json"),
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .unwrap();
}
