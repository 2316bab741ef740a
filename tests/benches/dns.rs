//! The embedded DNS against dnsmasq and unbound, side by side in one run (`cargo bench -p
//! shoal-tests --bench dns`, as root, release binary built, `scripts/setup.sh bench` for
//! dnsperf, unbound and dnsmasq):
//!
//! - throughput: dnsperf (1 thread, 100 queries outstanding, 10 s) inside a task against
//!   127.0.0.11, served by the agent; and in a namespace of the same kind (loopback only, the
//!   server at 127.0.0.11 in it) against dnsmasq and against unbound (1 thread), both serving
//!   the same records (`web` → VIP, `tasks.web` → 3 IPs, the 3 task names). Rounds alternate.
//! - latency: dnsperf at a fixed 10,000 queries/s for 5 s with `-v`, which prints every
//!   query's latency; p50 and p99 are taken from those (dnsperf itself reports only mean and
//!   standard deviation). At full load the latency is the queue dnsperf builds, not the server.
//! - memory at 10,000 records (100 services × 100 tasks): for shoal, the resident memory the
//!   `Records` snapshot adds to this process (what the agent holds, twice during a swap); for
//!   dnsmasq and unbound, their RSS serving the same names minus their RSS serving 3 names.
//! - scale to answer: from `shoal service scale web=5` (and back to 3) until `dig tasks.web` in
//!   a task on every node gives the new set, polled every 10 ms inside the tasks.
//!
//! Medians of the rounds are printed and written to target/bench/dns.json.

use std::{
    fs,
    process::{Child, Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};
use shoal_dns::{Records, TaskEndpoint};
use shoal_tests::{RunningTask, TestLab};

const ROUNDS: usize = 3;
const THROUGHPUT_SECONDS: &str = "10";
const LATENCY_SECONDS: &str = "5";
const LATENCY_QPS: &str = "10000";
const DIR: &str = "/tmp/shoal-bench-dns";

/// The names every server answers: (name, addresses).
type Zone = Vec<(String, Vec<String>)>;
/// A measure and its value per round for shoal, dnsmasq and unbound.
type Row = (String, Vec<f64>, Vec<f64>, Vec<f64>);

fn sh(args: &[&str]) {
    let status = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect(args[0]);
    assert!(status.success(), "{args:?}");
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn rss_kib(pid: u32) -> f64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

fn dnsmasq_hosts(zone: &Zone) -> String {
    zone.iter()
        .flat_map(|(name, ips)| ips.iter().map(move |ip| format!("{ip} {name}\n")))
        .collect()
}

fn unbound_config(zone: &Zone) -> String {
    // Every name local and static: no recursion, as the other two do not recurse either.
    let mut config = String::from(
        "server:\n  interface: 127.0.0.11\n  port: 53\n  num-threads: 1\n  do-daemonize: no\n  \
         username: \"\"\n  chroot: \"\"\n  pidfile: \"\"\n  use-syslog: no\n  verbosity: 0\n  \
         do-ip6: no\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  \
         local-zone: \".\" static\n",
    );
    for (name, ips) in zone {
        for ip in ips {
            config.push_str(&format!("  local-data: \"{name}. 5 IN A {ip}\"\n"));
        }
    }
    config
}

/// A namespace with only loopback, a DNS server at 127.0.0.11 in it, and dnsperf run there.
struct Baseline {
    netns: String,
    server: Child,
}

impl Baseline {
    fn start(netns: &str, kind: &str, zone: &Zone) -> Self {
        sh(&["ip", "netns", "add", netns]);
        sh(&["ip", "-n", netns, "link", "set", "lo", "up"]);
        let command: Vec<String> = match kind {
            "dnsmasq" => {
                let hosts = format!("{DIR}/{netns}.hosts");
                fs::write(&hosts, dnsmasq_hosts(zone)).unwrap();
                [
                    "dnsmasq",
                    "--keep-in-foreground",
                    "--no-resolv",
                    "--no-hosts",
                    "--listen-address=127.0.0.11",
                    "--bind-interfaces",
                    "--user=root",
                    "--pid-file=",
                    "--local-ttl=5",
                ]
                .map(String::from)
                .into_iter()
                .chain([format!("--addn-hosts={hosts}")])
                .collect()
            }
            _ => {
                let config = format!("{DIR}/{netns}.conf");
                fs::write(&config, unbound_config(zone)).unwrap();
                vec!["unbound".into(), "-d".into(), "-c".into(), config]
            }
        };
        let server = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(&command)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(kind);
        let baseline = Self {
            netns: netns.to_owned(),
            server,
        };
        // Ready when it answers (a 10,000-name zone takes a moment to load).
        let ready = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            baseline
                .output(&[
                    "dig",
                    "@127.0.0.11",
                    "+short",
                    "+tries=1",
                    "+timeout=1",
                    &zone[0].0,
                ])
                .is_some_and(|out| !out.trim().is_empty())
        });
        assert!(ready, "{kind} did not answer in {netns}");
        baseline
    }

    fn output(&self, command: &[&str]) -> Option<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns])
            .args(command)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The server's RSS, in KiB: `ip netns exec` execs it, so the child's pid is the server's.
    fn rss_kib(&self) -> f64 {
        rss_kib(self.server.id())
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

/// Queries per second of a full-load dnsperf run.
fn parse_qps(out: &str) -> f64 {
    let lost = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Queries lost:"))
        .unwrap_or_else(|| panic!("no dnsperf summary: {out}"));
    assert!(
        lost.trim().starts_with("0 "),
        "dnsperf lost queries: {lost}"
    );
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Queries per second:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no qps in dnsperf output: {out}"))
}

/// (p50, p99) in microseconds from `dnsperf -v` lines (`> NOERROR web A 0.000095`).
fn parse_percentiles(out: &str) -> (f64, f64) {
    let mut latencies: Vec<f64> = out
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    assert!(latencies.len() > 1000, "too few latencies: {out:.500}");
    latencies.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize];
    (at(0.50), at(0.99))
}

fn throughput_args(queries: &str) -> Vec<&str> {
    vec![
        "dnsperf",
        "-s",
        "127.0.0.11",
        "-d",
        queries,
        "-l",
        THROUGHPUT_SECONDS,
    ]
}

fn latency_args(queries: &str) -> Vec<&str> {
    vec![
        "dnsperf",
        "-s",
        "127.0.0.11",
        "-d",
        queries,
        "-l",
        LATENCY_SECONDS,
        "-Q",
        LATENCY_QPS,
        "-v",
    ]
}

/// 100 services × 100 tasks on one network: the endpoints and the names they make.
fn big_zone() -> (Vec<TaskEndpoint>, Zone) {
    let mut endpoints = Vec::new();
    let mut zone = Zone::new();
    for s in 0..100u32 {
        let service = format!("svc{s}");
        let vip = [10, 1, s as u8, 1];
        let mut task_ips = Vec::new();
        for t in 0..100u32 {
            let ip = [10, 1, s as u8, 2 + t as u8];
            let task = format!("{service}.{}.{:025x}", t + 1, s * 1000 + t);
            endpoints.push(TaskEndpoint::new("front", &task, &service, ip, Some(vip)));
            let ip = std::net::Ipv4Addr::from(ip).to_string();
            zone.push((task, vec![ip.clone()]));
            task_ips.push(ip);
        }
        zone.push((
            service.clone(),
            vec![std::net::Ipv4Addr::from(vip).to_string()],
        ));
        zone.push((format!("tasks.{service}"), task_ips));
    }
    (endpoints, zone)
}

/// Resident memory (KiB) the shoal `Records` for `endpoints` add to this process.
fn shoal_records_kib(endpoints: &[TaskEndpoint]) -> f64 {
    let before = rss_kib(std::process::id());
    let records = Records::from_endpoints(endpoints);
    let after = rss_kib(std::process::id());
    drop(records);
    after - before
}

/// Seconds from `service scale web=N` until a task on every node gets N addresses for
/// `tasks.web`: pollers start in the tasks first, each prints when it saw the new set.
fn scale_to_answer(lab: &TestLab, askers: &[RunningTask], replicas: usize) -> f64 {
    // Bounded: at most 3,000 polls (30 s and more).
    let poll = format!(
        "for i in $(seq 3000); do \
           n=$(dig @127.0.0.11 +short +tries=1 +timeout=1 tasks.web | wc -l); \
           [ \"$n\" -eq {replicas} ] && {{ date +%s.%N; exit 0; }}; sleep 0.01; \
         done; exit 1"
    );
    let shoal = shoal_tests::shoal_bin();
    let pollers: Vec<Child> = askers
        .iter()
        .map(|task| {
            Command::new(&shoal)
                .args(["lab", "--name", &lab.name, "exec", &task.node, "--"])
                .args([
                    "shoal", "task", "exec", &task.name, "--", "bash", "-c", &poll,
                ])
                .stdout(Stdio::piped())
                .spawn()
                .expect("poller")
        })
        .collect();
    // Let every poller see the old answer first.
    std::thread::sleep(Duration::from_millis(500));
    let start = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let scale = format!("web={replicas}");
    lab.exec("node1", &["shoal", "service", "scale", "--detach", &scale]);
    pollers
        .into_iter()
        .map(|poller| {
            let out = poller.wait_with_output().unwrap();
            assert!(out.status.success(), "a poller never saw {replicas}");
            let seen: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            seen - start
        })
        .fold(0.0, f64::max)
}

fn main() {
    shoal_tests::require_root();
    shoal_tests::require_tools(&["dnsperf", "dnsmasq", "unbound", "dig"]);
    let _ = fs::remove_dir_all(DIR);
    fs::create_dir_all(DIR).unwrap();
    let mut rows: Vec<Row> = Vec::new();
    let mut record = |name: &str, shoal: f64, dnsmasq: f64, unbound: f64| match rows
        .iter_mut()
        .find(|(n, ..)| n == name)
    {
        Some((_, s, d, u)) => {
            s.push(shoal);
            d.push(dnsmasq);
            u.push(unbound);
        }
        None => rows.push((name.to_owned(), vec![shoal], vec![dnsmasq], vec![unbound])),
    };

    // Memory first, before anything else grows this process.
    let (endpoints, big) = big_zone();
    let shoal_kib = shoal_records_kib(&endpoints);

    let lab = TestLab::up("bdns", 3);
    // Lab-owned names: `lab down` removes them (and kills what runs there) after a crash.
    let netns = |kind: &str| format!("shoal-{}-node1.{kind}", lab.name);
    let baseline_kib = ["dnsmasq", "unbound"].map(|kind| {
        let one_name: Zone = vec![("web".into(), vec!["10.9.0.2".into()])];
        let small = Baseline::start(&netns(kind), kind, &one_name).rss_kib();
        let large = Baseline::start(&netns(kind), kind, &big).rss_kib();
        large - small
    });
    record(
        "memory, 10,000 records (MiB)",
        shoal_kib / 1024.0,
        baseline_kib[0] / 1024.0,
        baseline_kib[1] / 1024.0,
    );

    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.create_service(
        "web",
        &["--replicas", "3", "--network", "front"],
        &["sleep", "infinity"],
    );
    lab.create_service(
        "client",
        &["--mode", "global", "--network", "front"],
        &["sleep", "infinity"],
    );
    let askers = lab.running_tasks("client", 3);
    let load = askers
        .iter()
        .find(|t| t.node == "node1")
        .expect("a client on node1")
        .clone();
    let tasks = lab.running_tasks("web", 3);
    let vip = {
        let out = lab.exec("node1", &["shoal", "service", "inspect", "web"]);
        let view: Value = serde_json::from_str(&out).unwrap();
        view["vips"][0][1].as_str().unwrap().to_owned()
    };
    let mut zone: Zone = vec![
        ("web".into(), vec![vip]),
        (
            "tasks.web".into(),
            tasks.iter().map(|t| t.addresses["front"].clone()).collect(),
        ),
    ];
    zone.extend(
        tasks
            .iter()
            .map(|t| (t.name.clone(), vec![t.addresses["front"].clone()])),
    );
    let queries = format!("{DIR}/queries");
    fs::write(
        &queries,
        zone.iter()
            .map(|(name, _)| format!("{name} A\n"))
            .collect::<String>(),
    )
    .unwrap();
    let dnsmasq = Baseline::start(&netns("dnsmasq"), "dnsmasq", &zone);
    let unbound = Baseline::start(&netns("unbound"), "unbound", &zone);
    let in_load = |command: &[&str]| {
        let out = lab.in_task(&load, command);
        assert!(out.status.success(), "{command:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Warm-up, and a check that all three give the same answer.
    let answer = |out: String| {
        let mut ips: Vec<String> = out.lines().map(str::to_owned).collect();
        ips.sort();
        ips
    };
    let dig = ["dig", "@127.0.0.11", "+short", "tasks.web"];
    let expected = answer(in_load(&dig));
    assert_eq!(answer(dnsmasq.output(&dig).unwrap()), expected);
    assert_eq!(answer(unbound.output(&dig).unwrap()), expected);

    for round in 0..ROUNDS {
        eprintln!("round {}/{ROUNDS}", round + 1);
        let shoal = parse_qps(&in_load(&throughput_args(&queries)));
        let d = parse_qps(&dnsmasq.output(&throughput_args(&queries)).unwrap());
        let u = parse_qps(&unbound.output(&throughput_args(&queries)).unwrap());
        record("queries/s (full load)", shoal, d, u);
        let shoal = parse_percentiles(&in_load(&latency_args(&queries)));
        let d = parse_percentiles(&dnsmasq.output(&latency_args(&queries)).unwrap());
        let u = parse_percentiles(&unbound.output(&latency_args(&queries)).unwrap());
        record("p50 µs at 10k q/s", shoal.0, d.0, u.0);
        record("p99 µs at 10k q/s", shoal.1, d.1, u.1);
    }
    drop(dnsmasq);
    drop(unbound);

    let mut up = Vec::new();
    let mut down = Vec::new();
    for round in 0..ROUNDS {
        eprintln!("scale round {}/{ROUNDS}", round + 1);
        up.push(scale_to_answer(&lab, &askers, 5));
        down.push(scale_to_answer(&lab, &askers, 3));
    }
    lab.down_clean();

    println!(
        "\n{:<32} {:>12} {:>12} {:>12} {:>10}",
        "", "shoal", "dnsmasq", "unbound", "/unbound"
    );
    let mut out = Vec::new();
    for (name, s, d, u) in &rows {
        let (ms, md, mu) = (median(s.clone()), median(d.clone()), median(u.clone()));
        println!(
            "{name:<32} {ms:>12.1} {md:>12.1} {mu:>12.1} {:>10.2}",
            ms / mu
        );
        out.push(json!({"measure": name, "shoal": s, "dnsmasq": d, "unbound": u}));
    }
    let (up_s, down_s) = (median(up.clone()), median(down.clone()));
    println!("scale 3 -> 5, new answer on every node: {up_s:.2} s (median; {up:.2?})");
    println!("scale 5 -> 3, new answer on every node: {down_s:.2} s (median; {down:.2?})");
    out.push(json!({"measure": "scale to answer on every node (s)", "up": up, "down": down}));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    fs::create_dir_all(&dir).unwrap();
    fs::write(
        dir.join("dns.json"),
        serde_json::to_vec_pretty(&out).unwrap(),
    )
    .unwrap();
    let _ = fs::remove_dir_all(DIR);
}
