//! Cluster benchmarks in the lab (run on demand: `cargo bench -p shoal-tests --bench cluster`,
//! as root, with the release binary built). Prints a table and writes
//! target/bench/cluster.json.
//!
//! - convergence: `service create --replicas 50` until 50/50 run (3 nodes), then scale to 200;
//!   then the same on an overlay network with a published port;
//! - network attach per task: from the task's namespace existing to (local) its interfaces
//!   and embedded DNS ready, and (every node) its name resolving and its VIP answering from a
//!   task on each node (3 nodes, 24 tasks one after the other, medians);
//! - containment: convergence (plain) with the tasks' default containment (capabilities,
//!   no_new_privs, seccomp, masked paths) and without it (`SHOAL_TASK_CONFINEMENT=off`, a
//!   bench-only switch), alternately, three times each: what the containment costs a start;
//! - manager write latency (p50/p99) with 1 and 3 managers: node label updates sent straight
//!   to the local API socket, so no CLI process start is counted;
//! - agent memory (RSS): idle, and with 100 tasks on the node.
//!
//! `SHOAL_BASELINE_BIN=/path/to/older/shoal` runs convergence and attach against that binary
//! too, alternately with the current one, and prints the ratios. Arguments after `--` pick
//! sections (`convergence`, `attach`, `writes`, `memory`); none: all.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use shoal_tests::{cgroup2_mount, TestLab};

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

/// Convergence of 50 replicas, then 200, with or without an overlay network and a published
/// port: (seconds to 50 running, seconds from 50 to 200 running).
fn convergence(lab_name: &str, networked: bool) -> (f64, f64) {
    let lab = TestLab::up(lab_name, 3);
    if networked {
        lab.exec("node1", &["shoal", "network", "create", "front"]);
    }
    let create_start = Instant::now();
    if networked {
        lab.create_service(
            "fifty",
            &[
                "--replicas",
                "50",
                "--network",
                "front",
                "--publish",
                "8080:80",
            ],
            &["shoal", "whoami", "--listen", "0.0.0.0:80"],
        );
    } else {
        create(&lab, "fifty", 50);
    }
    wait_running(&lab, "fifty", 50, Duration::from_secs(180));
    let to_50 = create_start.elapsed();
    let scale_start = Instant::now();
    scale(&lab, "fifty", 200);
    wait_running(&lab, "fifty", 200, Duration::from_secs(400));
    let to_200 = scale_start.elapsed();
    lab.down_clean();
    (to_50.as_secs_f64(), to_200.as_secs_f64())
}

/// Every process in a node's task cgroups.
fn task_pids(lab: &TestLab, node: &str) -> BTreeSet<u32> {
    fn walk(dir: &Path, pids: &mut BTreeSet<u32>) {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path(), pids);
            }
        }
    }
    let dir: PathBuf = cgroup2_mount()
        .join(format!("shoal-{}", lab.name))
        .join(node)
        .join("tasks");
    let mut pids = BTreeSet::new();
    walk(&dir, &mut pids);
    pids
}

/// Whether a task is connected in its namespace: its default route (the last step of an
/// attach, through the gateway bridge) and its embedded DNS (127.0.0.11:53, UDP) are there.
fn connected(pid: u32) -> bool {
    let read = |table: &str| std::fs::read_to_string(format!("/proc/{pid}/net/{table}"));
    read("route").is_ok_and(|routes| {
        routes
            .lines()
            .any(|l| l.split('\t').nth(1) == Some("00000000"))
    }) && read("udp").is_ok_and(|sockets| sockets.contains(" 0B00007F:0035 "))
}

/// The inode of a network namespace file: which namespace it is.
fn netns_inode(path: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// A helper process inside a task (its network namespace and cgroup, so the socket load
/// balancer turns its connections to a VIP into connections to a backend, as for the task),
/// asked line by line whether a service name resolves and its VIP answers.
struct Prober {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

/// The environment variable that makes this bench a prober inside the task with that PID.
const PROBER_ENV: &str = "SHOAL_BENCH_PROBER_IN";

/// The environment variable that makes this bench a task's command that only listens on
/// port 80: the same minimal workload for both binaries, so the attach is what differs.
const LISTENER_ENV: &str = "SHOAL_BENCH_LISTENER";

/// The listener's side: accept and close connections on port 80 until the task is stopped.
fn run_listener() {
    let listener = std::net::TcpListener::bind("0.0.0.0:80").expect("port 80");
    for connection in listener.incoming() {
        drop(connection);
    }
}

impl Prober {
    fn new(pid: u32) -> Self {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .env(PROBER_ENV, pid.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("prober");
        let stdout = child.stdout.take().unwrap();
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        Self { child, lines }
    }

    /// Asks whether `service` is reachable from this prober's task; `answer` reads it.
    fn ask(&mut self, service: &str) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{service}").unwrap();
    }

    fn answer(&mut self) -> bool {
        self.lines.next().unwrap().unwrap() == "yes"
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The prober's side: enter the task, then answer each service name on stdin with whether it
/// resolves (embedded DNS) and its VIP opens a connection on port 80.
fn run_prober(pid: u32) {
    let netns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let relative = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::/"))
        .expect("the task's cgroup v2 path");
    std::fs::write(
        cgroup2_mount().join(relative).join("cgroup.procs"),
        std::process::id().to_string(),
    )
    .unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    println!("ready");
    for name in std::io::stdin().lines() {
        let name = name.unwrap();
        let yes = resolve(&udp, &name).is_some_and(|vip| {
            TcpStream::connect_timeout(&SocketAddr::from((vip, 80)), Duration::from_millis(100))
                .is_ok()
        });
        println!("{}", if yes { "yes" } else { "no" });
    }
}

/// The A record of `name` from the embedded DNS (127.0.0.11), if it has one.
fn resolve(udp: &UdpSocket, name: &str) -> Option<Ipv4Addr> {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    udp.send_to(&query, "127.0.0.11:53").ok()?;
    let mut answer = [0u8; 512];
    let n = udp.recv(&mut answer).ok()?;
    let answer = &answer[..n];
    let answers = u16::from_be_bytes([*answer.get(6)?, *answer.get(7)?]);
    if answer[3] & 0x0f != 0 || answers == 0 {
        return None;
    }
    // The answer's name (a pointer or labels), type, class, TTL, length, then the address.
    let mut at = query.len();
    if answer.get(at)? & 0xc0 == 0xc0 {
        at += 2;
    } else {
        while *answer.get(at)? != 0 {
            at += answer[at] as usize + 1;
        }
        at += 1;
    }
    at += 10;
    let bytes: [u8; 4] = answer.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(bytes))
}

/// What the tasks of the attach bench run.
#[derive(Clone, Copy)]
enum Workload {
    /// This bench's own minimal listener, the same program for both binaries.
    Listener,
    /// `shoal whoami` of the binary under test, as in earlier runs of this bench.
    Whoami,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Listener => "minimal listener",
            Workload::Whoami => "shoal whoami",
        }
    }
}

/// Network attach per task, medians in milliseconds: (namespace -> interfaces and DNS ready
/// on its node, namespace -> resolving and answering on its VIP from every node).
fn attach_times(lab_name: &str, tasks: usize, workload: Workload) -> (f64, f64) {
    let lab = TestLab::up(lab_name, 3);
    let nodes = ["node1", "node2", "node3"];
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.create_service(
        "probe",
        &["--mode", "global", "--network", "front"],
        &["sleep", "100000"],
    );
    lab.running_tasks_within("probe", 3, Duration::from_secs(60));
    let mut probers: Vec<Prober> = nodes
        .iter()
        .map(|node| Prober::new(*task_pids(&lab, node).iter().next().expect("a probe task")))
        .collect();
    let (mut local, mut everywhere) = (Vec::new(), Vec::new());
    for i in 0..tasks {
        let before: Vec<BTreeSet<u32>> = nodes.iter().map(|n| task_pids(&lab, n)).collect();
        let name = format!("t{i}");
        let listener = std::env::current_exe().unwrap();
        let listener_env = format!("{LISTENER_ENV}=1");
        match workload {
            Workload::Whoami => lab.create_service(
                &name,
                &["--network", "front"],
                &["shoal", "whoami", "--listen", "0.0.0.0:80"],
            ),
            Workload::Listener => lab.create_service(
                &name,
                &["--network", "front", "--env", &listener_env],
                &[listener.to_str().unwrap()],
            ),
        }
        // The task's first process appears (in its cgroup before exec), then its namespace
        // (unshare): the start, before any interface.
        let (pid, node) = loop {
            let found = nodes.iter().zip(&before).find_map(|(node, before)| {
                Some((*task_pids(&lab, node).difference(before).next()?, *node))
            });
            if let Some(found) = found {
                break found;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let node_netns = netns_inode(&lab.netns_path(node).to_string_lossy());
        while netns_inode(&format!("/proc/{pid}/ns/net")) == node_netns {
            std::thread::sleep(Duration::from_millis(1));
        }
        let start = Instant::now();
        while !connected(pid) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name} never got connected"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        local.push(start.elapsed().as_secs_f64() * 1e3);
        let mut pending: Vec<&mut Prober> = probers.iter_mut().collect();
        while !pending.is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "{name} never reachable"
            );
            // Every node asked at once, so a round takes one probe's time, not three.
            pending.iter_mut().for_each(|p| p.ask(&name));
            pending.retain_mut(|p| !p.answer());
            std::thread::sleep(Duration::from_micros(500));
        }
        everywhere.push(start.elapsed().as_secs_f64() * 1e3);
    }
    drop(probers);
    lab.down_clean();
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(local), median(everywhere))
}

/// Feeds `lines` to a program's standard input (`ip -batch -` and the like); it must succeed.
fn feed(program: &str, args: &[&str], lines: &[String]) {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect(program);
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.join("\n").as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "{program} {args:?}");
}

/// The kernel programming of one task's network attach (one overlay network and the gateway
/// bridge), `tasks` times, in a private namespace standing for a node: medians in ms of the
/// in-process path (`Overlay::attach`: netlink) and of the process-based path it replaced,
/// as commit cc98641 ran it (the same four iproute2 batches: five processes).
fn attach_kernel(tasks: usize) -> (f64, f64) {
    use shoal_dataplane::{
        netns::Netns,
        overlay::{NetworkSpec, Overlay, OverlayConfig},
        overlay_endpoints::OverlayEndpoints,
        vip_echo::VipEcho,
    };
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let data = Ipv4Addr::new(192, 0, 2, 1);
        feed(
            "ip",
            &["-batch", "-"],
            &[
                "link set lo up".into(),
                format!("addr add {data}/32 dev lo"),
            ],
        );
        let tag = format!("bka{}", std::process::id());
        let pins = PathBuf::from(format!("/sys/fs/bpf/{tag}"));
        let maps = pins.join("maps");
        std::fs::create_dir_all(&maps).unwrap();
        let echo = VipEcho::load(&maps).unwrap();
        let overlay = Overlay::start(
            OverlayConfig {
                netns_prefix: format!("{tag}."),
                node_netns: Netns::Current,
                data_addr: data,
                gateway_subnet: (Ipv4Addr::new(172, 18, 0, 0), 16),
            },
            OverlayEndpoints::open(&maps).unwrap(),
        )
        .unwrap();
        let spec = NetworkSpec {
            id: "benchattach0000".into(),
            name: "bench".into(),
            vni: 4096,
            port: 4789,
            subnet: (Ipv4Addr::new(10, 0, 0, 0), 16),
            mtu: None,
            internal: false,
            ingress: false,
        };
        overlay.ensure_network(&spec).unwrap();
        let netns = overlay
            .netns_path(&spec.id)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let mut sleepers = Vec::new();
        let mut sleeper = || {
            let child = std::process::Command::new("unshare")
                .args(["--net", "sleep", "600"])
                .spawn()
                .unwrap();
            let pid = child.id();
            let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
            while std::fs::read_link(format!("/proc/{pid}/ns/net")).ok() == Some(ours.clone()) {
                std::thread::sleep(Duration::from_millis(1));
            }
            sleepers.push(child);
            pid
        };
        let (mut current, mut before) = (Vec::new(), Vec::new());
        for i in 0..tasks {
            // Alternately, so both paths see the same machine.
            let pid = sleeper();
            let ip = Ipv4Addr::new(10, 0, 1, i as u8 + 2);
            let start = Instant::now();
            overlay
                .attach(
                    &format!("cur{i:07}"),
                    pid,
                    &[(spec.id.clone(), ip)],
                    &|_, _, _| Ok(()),
                )
                .unwrap();
            current.push(start.elapsed().as_secs_f64() * 1e3);

            let pid = sleeper();
            let ip = Ipv4Addr::new(10, 0, 2, i as u8 + 2);
            let mac = format!("02:42:0a:00:02:{:02x}", i + 2);
            let mtu = overlay.underlay_mtu() - 50;
            let (host, gw) = (format!("v0old{i:05}"), format!("gold{i:06}"));
            let start = Instant::now();
            feed(
                "ip",
                &["-n", &netns, "-batch", "-"],
                &[
                    format!("link add {host} mtu {mtu} type veth peer name eth0 netns {pid}"),
                    format!("link set {host} master br0 up"),
                ],
            );
            feed(
                "ip",
                &["-batch", "-"],
                &[
                    format!("link add {gw} type veth peer name eth1 netns {pid}"),
                    format!("link set {gw} master shoal_gw up"),
                ],
            );
            feed(
                "bridge",
                &["-batch", "-"],
                &[format!("link set dev {gw} isolated on")],
            );
            feed(
                "nsenter",
                &[&format!("--net=/proc/{pid}/ns/net"), "ip", "-batch", "-"],
                &[
                    "link set lo up".into(),
                    format!("link set eth0 address {mac} mtu {mtu} up"),
                    format!("addr add {ip}/16 dev eth0"),
                    "link set eth1 up".into(),
                    format!("addr add 172.18.200.{}/16 dev eth1", i + 2),
                    "route add default via 172.18.0.1".into(),
                ],
            );
            before.push(start.elapsed().as_secs_f64() * 1e3);
        }
        for mut child in sleepers {
            let _ = child.kill();
            let _ = child.wait();
        }
        overlay.remove_all().unwrap();
        drop(echo);
        shoal_dataplane::remove_pins(&pins).unwrap();
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        (median(current), median(before))
    })
    .join()
    .unwrap()
}

/// Runs `body` with `shoal` meaning `bin` for the lab helpers.
fn with_bin<T>(bin: &Path, body: impl FnOnce() -> T) -> T {
    std::env::set_var("SHOAL_BIN", bin);
    body()
}

/// What a result's key ends with: nothing for the current binary, `_baseline` for the other.
fn result_suffix(which: &str) -> String {
    if which == "current" {
        String::new()
    } else {
        format!("_{which}")
    }
}

fn main() {
    if std::env::var_os(LISTENER_ENV).is_some() {
        return run_listener();
    }
    if let Some(pid) = std::env::var_os(PROBER_ENV) {
        return run_prober(pid.to_str().unwrap().parse().unwrap());
    }
    shoal_tests::require_root();
    let mut results = serde_json::Map::new();
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let wants = |section: &str| sections.is_empty() || sections.iter().any(|s| s == section);
    let current = shoal_tests::shoal_bin();
    let baseline = std::env::var_os("SHOAL_BASELINE_BIN").map(PathBuf::from);
    // The baseline first in each pair, so neither gets a warmer machine every time.
    let mut binaries: Vec<(&str, PathBuf)> = Vec::new();
    if let Some(baseline) = &baseline {
        binaries.push(("baseline", baseline.clone()));
    }
    binaries.push(("current", current.clone()));

    // Convergence on 3 nodes, without and with an overlay network and a published port.
    if wants("convergence") {
        for (case, networked) in [("plain", false), ("ovl", true)] {
            for (which, bin) in &binaries {
                let (to_50, to_200) =
                    with_bin(bin, || convergence(&format!("bc-{case}"), networked));
                eprintln!(
                    "convergence {case} {which}: 50 in {to_50:.2} s, 50->200 in {to_200:.2} s"
                );
                let suffix = result_suffix(which);
                let prefix = if networked { "overlay_published_" } else { "" };
                results.insert(
                    format!("{prefix}create_50_to_running_s{suffix}"),
                    json!(to_50),
                );
                results.insert(format!("{prefix}scale_50_to_200_s{suffix}"), json!(to_200));
            }
        }
    }

    if wants("containment") {
        containment(&mut results);
    }

    // Network attach per task.
    if wants("attach") {
        for workload in [Workload::Listener, Workload::Whoami] {
            for (which, bin) in &binaries {
                let (local, everywhere) = with_bin(bin, || attach_times("b-attach", 24, workload));
                let name = workload.name();
                eprintln!(
                    "attach {which} ({name}): local {local:.1} ms, every node {everywhere:.1} ms"
                );
                let suffix = result_suffix(which);
                let prefix = match workload {
                    Workload::Listener => "attach",
                    Workload::Whoami => "attach_whoami",
                };
                results.insert(format!("{prefix}_local_ms{suffix}"), json!(local));
                results.insert(format!("{prefix}_every_node_ms{suffix}"), json!(everywhere));
            }
        }
    }
    // The kernel programming of an attach alone, both paths in one namespace.
    if wants("attach") {
        let (current, before) = attach_kernel(40);
        eprintln!(
            "attach (kernel programming) process-based {before:.2} ms, netlink {current:.2} ms"
        );
        results.insert("attach_kernel_ms".into(), json!(current));
        results.insert("attach_kernel_ms_baseline".into(), json!(before));
    }
    if baseline.is_some() || wants("attach") {
        let ratios: serde_json::Map<String, Value> = results
            .iter()
            .filter_map(|(key, before)| {
                let key = key.strip_suffix("_baseline")?;
                let after = results.get(key)?.as_f64()?;
                Some((
                    format!("{key}_before_over_after"),
                    json!(before.as_f64()? / after),
                ))
            })
            .collect();
        results.extend(ratios);
    }
    with_bin(&current, || ());

    // Write latency with 1 and 3 managers.
    for managers in [1u8, 3].into_iter().filter(|_| wants("writes")) {
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
    if wants("memory") {
        memory(&mut results);
    }

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

/// Convergence with and without the tasks' containment, alternately, three times each.
fn containment(results: &mut serde_json::Map<String, Value>) {
    let mut runs: [(Vec<f64>, Vec<f64>); 2] = Default::default();
    for _ in 0..3 {
        for (i, confined) in [true, false].into_iter().enumerate() {
            // The agents `lab up` starts inherit it.
            if !confined {
                std::env::set_var("SHOAL_TASK_CONFINEMENT", "off");
            }
            let (to_50, to_200) = convergence("bc-contain", false);
            std::env::remove_var("SHOAL_TASK_CONFINEMENT");
            runs[i].0.push(to_50);
            runs[i].1.push(to_200);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        (v[(v.len() - 1) / 2] + v[v.len() / 2]) / 2.0
    };
    eprintln!(
        "containment (median of 3): confined 50 {:.2} s, 200 {:.2} s; unconfined 50 {:.2} s, 200 {:.2} s",
        median(&runs[0].0),
        median(&runs[0].1),
        median(&runs[1].0),
        median(&runs[1].1)
    );
    results.insert(
        "confined_create_50_to_running_s".into(),
        json!(median(&runs[0].0)),
    );
    results.insert(
        "confined_scale_50_to_200_s".into(),
        json!(median(&runs[0].1)),
    );
    results.insert(
        "unconfined_create_50_to_running_s".into(),
        json!(median(&runs[1].0)),
    );
    results.insert(
        "unconfined_scale_50_to_200_s".into(),
        json!(median(&runs[1].1)),
    );
    results.insert(
        "containment_runs_s".into(),
        json!({"confined": runs[0], "unconfined": runs[1]}),
    );
}

fn memory(results: &mut serde_json::Map<String, Value>) {
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
}
