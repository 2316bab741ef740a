//! Overlay throughput in the lab, side by side in one run (`cargo bench -p shoal-tests
//! --bench overlay`, as root, release binary built, `scripts/setup.sh bench` for wrk, iperf3
//! and nginx): task -> task across nodes over shoal's overlay, and over the hand-built kernel
//! VXLAN of `TOOLCHAIN.md` on the same underlay (bridge + `vxlan nolearning` in the node's
//! namespace, flood list + static FDB). Same tools both ways: nginx (1 worker) served to
//! wrk (1 thread, 50 connections) with keep-alive and with `Connection: close`, and iperf3.
//! Rounds alternate between the two paths; medians are reported with their ratio, and the
//! table is written to target/bench/overlay.json.

use std::{
    fs,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};
use shoal_tests::{RunningTask, TestLab};

const ROUNDS: usize = 3;
const WRK_SECONDS: &str = "5";
const IPERF_SECONDS: &str = "4";
/// Hand-built VXLAN: its own VNI and port next to shoal's 4789.
const BASELINE_VNI: &str = "4999";
const BASELINE_PORT: &str = "4790";

fn nginx_config(dir: &str, name: &str) -> String {
    let path = format!("{dir}/{name}.conf");
    fs::write(
        &path,
        format!(
            "daemon off; master_process off; worker_processes 1;\n\
             pid {dir}/{name}.pid; error_log stderr error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; client_body_temp_path {dir}/{name}-body;\n\
               proxy_temp_path {dir}/{name}-proxy; fastcgi_temp_path {dir}/{name}-fcgi;\n\
               uwsgi_temp_path {dir}/{name}-uwsgi; scgi_temp_path {dir}/{name}-scgi;\n\
               server {{ listen 80 reuseport; location / {{ return 200 \"ok\\n\"; }} }} }}\n"
        ),
    )
    .expect("nginx config");
    path
}

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect(args[0]);
    assert!(status.success(), "{args:?}");
}

/// The hand-built path between node1 and node2: a namespace behind each node's bridge.
struct Baseline {
    client_ns: String,
    servers: Vec<Child>,
}

impl Baseline {
    fn build(lab: &TestLab, nginx_conf: &str) -> Self {
        let node = |n: u8| format!("shoal-{}-node{n}", lab.name);
        let task_ns = |n: u8| format!("{}.bench", node(n));
        let mac = |n: u8| format!("02:99:00:00:00:0{n}");
        for n in [1u8, 2] {
            let (me, peer) = (format!("192.168.77.1{n}"), format!("192.168.77.1{}", 3 - n));
            let ns = node(n);
            let ip = |args: &[&str]| {
                let mut all = vec!["ip", "-n", &ns];
                all.extend_from_slice(args);
                sh(&all);
            };
            ip(&["link", "add", "brb", "mtu", "1450", "type", "bridge"]);
            ip(&["link", "set", "brb", "up"]);
            ip(&[
                "link",
                "add",
                "vxb",
                "mtu",
                "1450",
                "type",
                "vxlan",
                "id",
                BASELINE_VNI,
                "dstport",
                BASELINE_PORT,
                "local",
                &me,
                "dev",
                "eth0",
                "nolearning",
            ]);
            ip(&["link", "set", "vxb", "master", "brb", "up"]);
            sh(&[
                "bridge",
                "-n",
                &ns,
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                "vxb",
                "dst",
                &peer,
            ]);
            sh(&[
                "bridge",
                "-n",
                &ns,
                "fdb",
                "add",
                &mac(3 - n),
                "dev",
                "vxb",
                "dst",
                &peer,
                "self",
                "permanent",
            ]);
            sh(&["ip", "netns", "add", &task_ns(n)]);
            ip(&[
                "link",
                "add",
                "vb",
                "mtu",
                "1450",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &task_ns(n),
            ]);
            ip(&["link", "set", "vb", "master", "brb", "up"]);
            let inside = task_ns(n);
            sh(&[
                "ip",
                "-n",
                &inside,
                "link",
                "set",
                "eth0",
                "address",
                &mac(n),
                "up",
            ]);
            sh(&["ip", "-n", &inside, "link", "set", "lo", "up"]);
            sh(&[
                "ip",
                "-n",
                &inside,
                "addr",
                "add",
                &format!("10.99.0.{n}/24"),
                "dev",
                "eth0",
            ]);
        }
        let server_ns = task_ns(2);
        let spawn = |args: &[&str]| {
            Command::new("ip")
                .args(["netns", "exec", &server_ns])
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("server")
        };
        let servers = vec![
            spawn(&["nginx", "-c", nginx_conf]),
            spawn(&["iperf3", "-s"]),
        ];
        std::thread::sleep(Duration::from_millis(500));
        Self {
            client_ns: task_ns(1),
            servers,
        }
    }

    fn run(&self, command: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client_ns])
            .args(command)
            .output()
            .expect("baseline client");
        assert!(out.status.success(), "{command:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

/// One wrk run: (requests/s, p50 ms, p99 ms).
fn parse_wrk(out: &str) -> (f64, f64, f64) {
    let field = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("wrk printed no {prefix}: {out}"))
    };
    let ms = |v: String| {
        let (number, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
        let number: f64 = number.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => number / 1000.0,
            "s" => number * 1000.0,
            _ => number,
        }
    };
    (
        field("Requests/sec:").parse().unwrap_or(f64::NAN),
        ms(field("50%")),
        ms(field("99%")),
    )
}

fn wrk_args(url: &str, close: bool) -> Vec<String> {
    let mut args: Vec<String> = ["wrk", "-t1", "-c50", "-d", WRK_SECONDS, "--latency"]
        .map(String::from)
        .to_vec();
    if close {
        args.extend(["-H".into(), "Connection: close".into()]);
    }
    args.push(url.to_owned());
    args
}

fn iperf_gbits(out: &str) -> f64 {
    let report: Value = serde_json::from_str(out).expect("iperf3 JSON");
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(f64::NAN)
        / 1e9
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn main() {
    shoal_tests::require_root();
    shoal_tests::require_tools(&["wrk", "iperf3", "nginx"]);
    let dir = "/tmp/shoal-bench-overlay";
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let overlay_conf = nginx_config(dir, "overlay");
    let baseline_conf = nginx_config(dir, "baseline");

    let lab = TestLab::up("bov", 3);
    for (node, role) in [("node1", "client"), ("node2", "server")] {
        let label = format!("bench={role}");
        lab.exec(
            "node1",
            &["shoal", "node", "update", "--label-add", &label, node],
        );
    }
    lab.exec("node1", &["shoal", "network", "create", "bench"]);
    let service = |name: &str, role: &str, command: &[&str]| {
        let constraint = format!("node.labels.bench=={role}");
        lab.create_service(
            name,
            &["--network", "bench", "--constraint", &constraint],
            command,
        );
    };
    service("nginx", "server", &["nginx", "-c", &overlay_conf]);
    service("iperf", "server", &["iperf3", "-s"]);
    service("load", "client", &["sleep", "infinity"]);
    let nginx_ip = lab.running_tasks("nginx", 1)[0].addresses["bench"].clone();
    let iperf_ip = lab.running_tasks("iperf", 1)[0].addresses["bench"].clone();
    let load: RunningTask = lab.running_tasks("load", 1).remove(0);
    let in_load = |command: &[String]| {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        let out = lab.in_task(&load, &args);
        assert!(out.status.success(), "{command:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let baseline = Baseline::build(&lab, &baseline_conf);
    // Warm-up: ARP, first connections, page cache.
    baseline.run(&["curl", "-sf", "http://10.99.0.2/"]);
    in_load(&["curl".into(), "-sf".into(), format!("http://{nginx_ip}/")]);

    let mut results: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    let mut record =
        |name: &str, shoal: f64, base: f64| match results.iter_mut().find(|(n, _, _)| n == name) {
            Some((_, s, b)) => {
                s.push(shoal);
                b.push(base);
            }
            None => results.push((name.to_owned(), vec![shoal], vec![base])),
        };
    for round in 0..ROUNDS {
        eprintln!("round {}/{ROUNDS}", round + 1);
        for close in [false, true] {
            let label = if close {
                "Connection: close"
            } else {
                "keep-alive"
            };
            let shoal = parse_wrk(&in_load(&wrk_args(&format!("http://{nginx_ip}/"), close)));
            let base_args = wrk_args("http://10.99.0.2/", close);
            let base_args: Vec<&str> = base_args.iter().map(String::as_str).collect();
            let base = parse_wrk(&baseline.run(&base_args));
            record(&format!("wrk {label} req/s"), shoal.0, base.0);
            record(&format!("wrk {label} p50 ms"), shoal.1, base.1);
            record(&format!("wrk {label} p99 ms"), shoal.2, base.2);
        }
        let shoal = iperf_gbits(&in_load(
            &["iperf3", "-c", &iperf_ip, "-t", IPERF_SECONDS, "-J"].map(String::from),
        ));
        let base =
            iperf_gbits(&baseline.run(&["iperf3", "-c", "10.99.0.2", "-t", IPERF_SECONDS, "-J"]));
        record("iperf3 Gbit/s", shoal, base);
    }
    drop(baseline);
    lab.down_clean();

    println!(
        "\n{:<30} {:>12} {:>14} {:>8}",
        "task -> task, node1 -> node2", "shoal", "hand-built", "ratio"
    );
    let mut rows = Vec::new();
    for (name, shoal, base) in &results {
        let (s, b) = (median(shoal.clone()), median(base.clone()));
        println!("{name:<30} {s:>12.2} {b:>14.2} {:>8.3}", s / b);
        rows.push(
            json!({"measure": name, "shoal": shoal, "baseline": base, "median_ratio": s / b}),
        );
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&out).unwrap();
    fs::write(
        out.join("overlay.json"),
        serde_json::to_vec_pretty(&rows).unwrap(),
    )
    .unwrap();
    let _ = fs::remove_dir_all(dir);
}
