//! The lab at scale (run on demand: `cargo bench -p shoal-tests --bench scale`, as root, with
//! the release binary built). For 8, 16, 32 and 48 nodes (3 managers; SHOAL_SCALE_NODES=8,16
//! picks others), one after the other:
//!
//! - `lab up` time;
//! - `service create` of 3 replicas per node on an overlay, publishing 8080: time until all
//!   run, and until every node's published port answers;
//! - connect times (p50/p99) through the mesh (the client to random nodes) and task to task
//!   (random tasks to random tasks' overlay addresses), once gossip has reached every node;
//! - the agents' RSS and CPU, idle; the kernel's neighbour entries per node;
//! - `lab down` time.
//!
//! Prints a table and writes target/bench/scale.json.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use shoal_dataplane::neighbours::{parse_arp_cache, ArpCacheStats};
use shoal_tests::{
    scale::{connections, curl_line, node_address, peers_programmed, Picker},
    wait_for, RunningTask, TestLab,
};

const LAB: &str = "bench-scale";
const REPLICAS_PER_NODE: usize = 3;
const MESH_CONNECTIONS: usize = 200;
const TASK_SOURCES: usize = 4;
const TASK_TARGETS: usize = 50;
const IDLE_SAMPLE: Duration = Duration::from_secs(10);
/// /proc counts CPU time in USER_HZ ticks, 100 a second on every Linux.
const USER_HZ: f64 = 100.0;

fn sizes() -> Vec<u8> {
    std::env::var("SHOAL_SCALE_NODES")
        .ok()
        .map(|text| {
            text.split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect()
        })
        .unwrap_or_else(|| vec![8, 16, 32, 48])
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// p50 and p99 of connect times in ms; connections that never connected count as failed.
fn connect_ms(output: &str, expected: usize) -> Value {
    let found = connections(output, expected);
    let mut ms: Vec<f64> = found
        .iter()
        .filter_map(|c| c.connect_secs.map(|s| s * 1e3))
        .collect();
    ms.sort_by(f64::total_cmp);
    let failed = found.iter().filter(|c| !c.answered).count();
    if ms.is_empty() {
        return json!({"failed": failed});
    }
    json!({"p50": percentile(&ms, 0.5), "p99": percentile(&ms, 0.99), "max": ms[ms.len() - 1], "failed": failed})
}

fn kernel_table() -> ArpCacheStats {
    let text = std::fs::read_to_string("/proc/net/stat/arp_cache").expect("arp_cache");
    parse_arp_cache(&text).expect("arp_cache parses")
}

/// IPv4 neighbour entries in a namespace, entered with `enter` (`ip -n NAME` or nsenter).
fn entries_in(enter: &[&str]) -> usize {
    let out = std::process::Command::new(enter[0])
        .args(&enter[1..])
        .args(["-4", "-o", "neigh", "show"])
        .output()
        .expect("ip neigh");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// The lab's own neighbour entries per node (its namespace, its networks', its tasks'), and
/// the client's: the kernel's count also holds whatever else runs on the machine.
fn lab_neighbours(lab: &TestLab, nodes: u8) -> (Vec<usize>, usize) {
    let prefix = format!("shoal-{}-", lab.name);
    let namespaces: Vec<String> = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix))
        .collect();
    let cgroup = shoal_tests::cgroup2_mount().join(format!("shoal-{}", lab.name));
    let per_node = (1..=nodes)
        .map(|n| {
            let node = format!("{prefix}node{n}");
            let own: usize = namespaces
                .iter()
                .filter(|ns| **ns == node || ns.starts_with(&format!("{node}.")))
                .map(|ns| entries_in(&["ip", "-n", ns]))
                .sum();
            let tasks: usize = task_pids(&cgroup.join(format!("node{n}/tasks")))
                .iter()
                .map(|pid| entries_in(&["nsenter", "-t", &pid.to_string(), "-n", "ip"]))
                .sum();
            own + tasks
        })
        .collect();
    (
        per_node,
        entries_in(&["ip", "-n", &format!("{prefix}client")]),
    )
}

/// The first process of each task cgroup under `dir`.
fn task_pids(dir: &Path) -> Vec<u32> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| {
            std::fs::read_to_string(task.path().join("cgroup.procs"))
                .ok()?
                .lines()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// CPU ticks (user + system) and RSS (KiB) of a process.
fn usage(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    (ticks, rss)
}

/// Mean and max CPU (% of one core) and RSS (MiB) of the agents over `IDLE_SAMPLE`.
fn idle_agents(lab: &TestLab, nodes: u8) -> Value {
    let pids: Vec<u32> = (1..=nodes)
        .map(|n| {
            std::fs::read_to_string(lab.run_dir().join(format!("node{n}/agent.pid")))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        })
        .collect();
    let before: Vec<u64> = pids.iter().map(|p| usage(*p).0).collect();
    std::thread::sleep(IDLE_SAMPLE);
    let (cpu, rss): (Vec<f64>, Vec<f64>) = pids
        .iter()
        .zip(before)
        .map(|(pid, ticks)| {
            let (now, rss) = usage(*pid);
            let cpu = (now - ticks) as f64 / USER_HZ / IDLE_SAMPLE.as_secs_f64() * 100.0;
            (cpu, rss as f64 / 1024.0)
        })
        .unzip();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    json!({"cpu_pct_mean": mean(&cpu), "cpu_pct_max": max(&cpu), "cpu_pct_all": cpu.iter().sum::<f64>(),
           "rss_mib_mean": mean(&rss), "rss_mib_max": max(&rss)})
}

/// Seconds from `start` until every node's published port answers the client.
fn until_every_port_answers(lab: &TestLab, nodes: u8, start: Instant) -> f64 {
    let urls: Vec<String> = (0..usize::from(nodes))
        .map(|i| format!("http://{}:8080/", node_address(i)))
        .collect();
    let mut waiting = urls.clone();
    wait_for(
        "every node's port to answer",
        Duration::from_secs(300),
        || {
            let script: String = waiting
                .iter()
                .map(|url| format!("curl -sf -o /dev/null -m 1 {url} || echo {url}\n"))
                .collect();
            let out = lab.run(&["exec", "client", "--", "sh", "-c", &script]);
            waiting = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            waiting.is_empty().then_some(())
        },
    );
    start.elapsed().as_secs_f64()
}

fn mesh_connects(lab: &TestLab, nodes: u8, pick: &mut Picker) -> Value {
    let script: String = (0..MESH_CONNECTIONS)
        .map(|i| {
            let node = node_address(pick.below(usize::from(nodes)));
            curl_line(
                &node,
                &format!("http://{node}:8080/"),
                Some(40_000 + i as u16),
            )
        })
        .collect();
    connect_ms(
        &lab.exec("client", &["sh", "-c", &script]),
        MESH_CONNECTIONS,
    )
}

fn task_connects(lab: &TestLab, tasks: &[RunningTask], pick: &mut Picker) -> Value {
    let mut output = String::new();
    for _ in 0..TASK_SOURCES {
        let source = &tasks[pick.below(tasks.len())];
        let script: String = (0..TASK_TARGETS)
            .map(|_| {
                let target = &tasks[pick.below(tasks.len())];
                let ip = target.addresses["front"].split('/').next().unwrap();
                curl_line(ip, &format!("http://{ip}:80/"), None)
            })
            .collect();
        let out = lab.in_task(source, &["sh", "-c", &script]);
        output.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    connect_ms(&output, TASK_SOURCES * TASK_TARGETS)
}

fn run(nodes: u8, pick: &mut Picker) -> Value {
    let lab = TestLab::named(LAB);
    lab.run(&["down"]);
    let fulls_before = kernel_table().table_fulls;
    let start = Instant::now();
    lab.ok(&["up", "--nodes", &nodes.to_string(), "--managers", "3"]);
    let lab_up = start.elapsed().as_secs_f64();

    let replicas = REPLICAS_PER_NODE * usize::from(nodes);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    let created = Instant::now();
    lab.create_service(
        "web",
        &[
            "--replicas",
            &replicas.to_string(),
            "--network",
            "front",
            "--publish",
            "8080:80",
        ],
        &["shoal", "whoami", "--listen", "0.0.0.0:80"],
    );
    let tasks = lab.running_tasks_within("web", replicas, Duration::from_secs(300));
    let running = created.elapsed().as_secs_f64();
    let answering = until_every_port_answers(&lab, nodes, created);
    wait_for(
        "gossip to reach every node",
        Duration::from_secs(120),
        || peers_programmed(&lab, "front", &tasks, nodes).then_some(()),
    );
    let mesh = mesh_connects(&lab, nodes, pick);
    let task = task_connects(&lab, &tasks, pick);
    let (per_node, client) = lab_neighbours(&lab, nodes);
    let table = kernel_table();
    let idle = idle_agents(&lab, nodes);
    let start = Instant::now();
    lab.down_clean();
    let lab_down = start.elapsed().as_secs_f64();
    json!({
        "nodes": nodes, "replicas": replicas, "lab_up_s": lab_up,
        "replicas_running_s": running, "every_port_answers_s": answering,
        "mesh_connect_ms": mesh, "task_connect_ms": task,
        "agents_idle": idle,
        "neighbour_entries_per_node": per_node.iter().sum::<usize>() as f64 / f64::from(nodes),
        "neighbour_entries_per_node_max": per_node.iter().max(),
        "neighbour_entries_client": client,
        "kernel_neighbour_entries": table.entries,
        "kernel_table_fulls_during_run": table.table_fulls - fulls_before,
        "lab_down_s": lab_down,
    })
}

fn row(result: &Value) -> String {
    let f = |v: &Value| v.as_f64().map_or("-".to_owned(), |x| format!("{x:.1}"));
    let ms = |v: &Value| format!("{}/{}", f(&v["p50"]), f(&v["p99"]));
    format!(
        "{:>5} {:>8} {:>8} {:>8} {:>12} {:>12} {:>8} {:>8} {:>9} {:>9}",
        result["nodes"],
        f(&result["lab_up_s"]),
        f(&result["replicas_running_s"]),
        f(&result["every_port_answers_s"]),
        ms(&result["mesh_connect_ms"]),
        ms(&result["task_connect_ms"]),
        f(&result["agents_idle"]["rss_mib_mean"]),
        format!(
            "{:.2}",
            result["agents_idle"]["cpu_pct_mean"]
                .as_f64()
                .unwrap_or(0.0)
        ),
        f(&result["neighbour_entries_per_node"]),
        f(&result["lab_down_s"]),
    )
}

fn main() {
    shoal_tests::require_root();
    let mut pick = Picker::seeded();
    let mut results = Vec::new();
    for nodes in sizes() {
        eprintln!("--- {nodes} nodes");
        let result = run(nodes, &mut pick);
        eprintln!("{}", serde_json::to_string_pretty(&result).unwrap());
        results.push(result);
    }
    println!(
        "{:>5} {:>8} {:>8} {:>8} {:>12} {:>12} {:>8} {:>8} {:>9} {:>9}",
        "nodes",
        "up s",
        "3/node",
        "ports s",
        "mesh p50/99",
        "task p50/99",
        "RSS MiB",
        "CPU %",
        "neigh/node",
        "down s"
    );
    for result in &results {
        println!("{}", row(result));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("scale.json"),
        serde_json::to_string_pretty(&Value::Array(results)).unwrap(),
    )
    .unwrap();
}
