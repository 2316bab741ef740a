//! The routing mesh against the other ways of publishing a port, side by side in one run
//! (`cargo bench -p shoal-tests --bench mesh`, as root, release binary built, `scripts/setup.sh
//! bench` for wrk, nginx and haproxy). Results are printed and written to
//! `$CARGO_TARGET_DIR/bench/mesh.json` (default `target/bench/mesh.json`).
//!
//! **1. Requests through node1, in a 3-node lab.** One nginx task (1 worker) on node2 is the
//! only backend of every path, so every path ends at the same server over the same `ingress`
//! overlay (VXLAN node1 -> node2). wrk (1 thread, 50 connections, `WRK_SECONDS`, 2 s request
//! timeout, killed after 30 s) runs in the lab's client namespace, with keep-alive and with
//! `Connection: close`, against:
//! - **mesh**: `--publish 8080:80` on node1's address, client address kept (TC on node1's
//!   eth0 rewrites and redirects into `shoal_ing`; replies are un-NATed on `shoal_ing`);
//! - **mesh-snat**: `--publish published=8081,target=81,source=snat` of the same service;
//! - **physical**: the "physical limit": the client routes the task's ingress address through
//!   node1, which forwards it (kernel IP forwarding, no NAT) into `shoal_ing` and so over the
//!   very same VXLAN devices and MAC steering to the very same task. shoal's `ip shoal_overlay`
//!   table drops forwarding into and out of `shoal_ing` (only the mesh may use it), so the
//!   bench inserts two accept rules for the client's address (comment `shoal-bench`) before
//!   the drops and deletes them afterwards. A hand-built VXLAN path (as the overlay bench does)
//!   would have measured other devices and another server; this way the only difference from
//!   the mesh is who moves the packet on node1: the kernel's forwarding path (routing,
//!   netfilter, conntrack: node1's `shoal_overlay` table has a NAT chain) or the mesh's TC
//!   programs;
//! - **nft-dnat**: what Docker Swarm's mesh does minus IPVS (not in this kernel): an nftables
//!   table `ip shoal_bench` on node1, DNAT of port 8090 to the task plus masquerade of the
//!   DNATed flows (same forward accept rules);
//! - **haproxy** on node1 (port 8091), 1 thread, **TCP mode**: one backend connection per
//!   client connection, the same work an L4 balancer does, so it compares like with like. (HTTP
//!   mode with `http-reuse always` turns `Connection: close` clients into reused backend
//!   connections: faster for short connections, but a different job; TOOLCHAIN.md has both.)
//!
//! Each path reaches nginx on its own port (80..84), so the backend never sees the same
//! 4-tuple from two paths: TIME_WAIT entries of one path (with another path's timestamps and
//! sequence numbers) cannot stall the next path's SYNs. nginx answers the address it saw,
//! which the bench checks per path (client's for mesh and physical, node1's ingress address for
//! the others). Rounds alternate: each round runs every path once per mode, the order rotated
//! by one each round; the medians over `ROUNDS` rounds and their ratios are reported.
//!
//! **2. Per-packet cost of the mesh decision**, BPF_PROG_TEST_RUN on the ingress classifier in
//! a private namespace (no lab), 10 and 10,000 published ports (Maglev rows of 1,021 slots):
//! - *single runs* (`mesh_decision.rs`, shared with `--bench mesh_decision`): 20,000 runs of one
//!   packet each, source ports cycling (a fresh flow-table entry per SYN), the kernel's timing
//!   of each run; p50/p99. These include the test-run timer's own overhead (two clock reads,
//!   ~20-40 ns here), visible as the cost of a packet to a port nobody publishes;
//! - *repeated runs* (`repeat` = 100,000 in one call, the kernel's mean): a repeated run sees the
//!   packet its previous run rewrote, so two published ports point at each other (ping ->
//!   node:pong, pong -> node:ping, one backend: the node's own address). Every run is then a
//!   full mesh decision on a packet to a published port: a SYN is balanced afresh (Maglev slot,
//!   both LRU tables written), an ACK hits the flow table; the port and its checksum are
//!   rewritten, the address stays (it is the node's), so this omits one 4-byte address rewrite
//!   (an in-place store and one checksum helper call). Warm caches: a lower bound next to the
//!   single runs.
//!
//! **3. Programming** 1,000 published ports x 10 backends: `MeshTable::sync` against one
//! `nft -f` of the equivalent table (`mesh_decision.rs`).

#[allow(dead_code)] // its `main` is `--bench mesh_decision`'s
#[path = "mesh_decision.rs"]
mod decision;

use std::{
    collections::BTreeMap,
    fs,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::{json, Value};
use shoal_dataplane::mesh::{MeshLimits, MeshTable, Protocol, PublishedService};
use shoal_tests::{wait_for, TestLab};

const ROUNDS: usize = 3;
const WRK_SECONDS: &str = "5";
const LAB: &str = "bmesh";
const NODE1: &str = "192.168.77.11";
const CLIENT: &str = "192.168.77.100";
const TAG: &str = "shoal-bench";
/// Repeated test runs per call for the warm decision cost.
const REPEAT: u32 = 100_000;
const PING: u16 = 30_001;
const PONG: u16 = 30_002;

/// A path from the client to the one backend.
struct Path {
    name: &'static str,
    /// Where wrk connects (filled in once the task's address is known).
    url: String,
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stderr(Stdio::inherit())
        .output()
        .expect(args[0]);
    assert!(out.status.success(), "{args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nginx_config(dir: &str) -> String {
    let path = format!("{dir}/nginx.conf");
    let listen: String = (80..85)
        .map(|p| format!("listen {p} reuseport; "))
        .collect();
    fs::write(
        &path,
        format!(
            "daemon off; master_process off; worker_processes 1;\n\
             pid {dir}/nginx.pid; error_log stderr error;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; client_body_temp_path {dir}/body;\n\
               proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;\n\
               uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;\n\
               server {{ {listen} location / {{ return 200 \"$remote_addr\\n\"; }} }} }}\n"
        ),
    )
    .expect("nginx config");
    path
}

/// Everything the bench adds to the lab besides the service: removed when dropped, also on
/// a panic (the lab itself is removed by `TestLab`'s drop, after this).
struct Baselines {
    node1: String,
    client: String,
    route: Option<String>,
    haproxy: Option<Child>,
}

impl Baselines {
    fn build(lab: &TestLab, dir: &str, task_ip: &str, subnet: &str) -> Self {
        let mut me = Self {
            node1: format!("shoal-{}-node1", lab.name),
            client: format!("shoal-{}-client", lab.name),
            route: None,
            haproxy: None,
        };
        // (c) the client reaches the ingress subnet through node1.
        sh(&["ip", "-n", &me.client, "route", "add", subnet, "via", NODE1]);
        me.route = Some(subnet.to_owned());
        // Forwarding between the client and `shoal_ing`, for (c) and (d) only; before
        // shoal's drops. Then (d): DNAT + masquerade of what was DNATed.
        nft_in(
            &me.node1,
            &format!(
                "insert rule ip shoal_overlay forward iifname \"shoal_ing\" oifname \"eth0\" \
                   ip daddr {CLIENT} accept comment \"{TAG}\"\n\
                 insert rule ip shoal_overlay forward iifname \"eth0\" oifname \"shoal_ing\" \
                   ip saddr {CLIENT} accept comment \"{TAG}\"\n\
                 table ip shoal_bench {{\n\
                   chain prerouting {{ type nat hook prerouting priority dstnat; policy accept;\n\
                     ip daddr {NODE1} tcp dport 8090 dnat to {task_ip}:83\n  }}\n\
                   chain postrouting {{ type nat hook postrouting priority srcnat; policy accept;\n\
                     oifname \"shoal_ing\" ct status dnat masquerade\n  }}\n\
                 }}\n"
            ),
        );
        // (e) haproxy, TCP mode, 1 thread, in node1's namespace.
        let config = format!("{dir}/haproxy.cfg");
        fs::write(
            &config,
            format!(
                "global\n  nbthread 1\n  maxconn 4000\n\
                 defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
                 listen mesh_bench\n  bind {NODE1}:8091\n  server task {task_ip}:84\n"
            ),
        )
        .expect("haproxy config");
        me.haproxy = Some(
            Command::new("ip")
                .args(["netns", "exec", &me.node1, "haproxy", "-db", "-f", &config])
                .stdout(Stdio::null())
                .spawn()
                .expect("haproxy"),
        );
        me
    }
}

/// `nft -f -` inside a namespace.
fn nft_in(netns: &str, script: &str) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(
        child.wait().unwrap().success(),
        "nft -f in {netns}:\n{script}"
    );
}

impl Drop for Baselines {
    fn drop(&mut self) {
        if let Some(mut haproxy) = self.haproxy.take() {
            let _ = haproxy.kill();
            let _ = haproxy.wait();
        }
        // The bench's rules in shoal's table, by handle.
        let listed = Command::new("ip")
            .args(["netns", "exec", &self.node1, "nft", "-a", "list", "chain"])
            .args(["ip", "shoal_overlay", "forward"])
            .output();
        if let Ok(listed) = listed {
            for line in String::from_utf8_lossy(&listed.stdout).lines() {
                if let (true, Some(handle)) = (
                    line.contains(&format!("comment \"{TAG}\"")),
                    line.rsplit_once("# handle ").map(|(_, h)| h.trim()),
                ) {
                    let _ = Command::new("ip")
                        .args(["netns", "exec", &self.node1, "nft", "delete", "rule"])
                        .args(["ip", "shoal_overlay", "forward", "handle", handle])
                        .status();
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.node1, "nft", "delete", "table"])
            .args(["ip", "shoal_bench"])
            .stderr(Stdio::null())
            .status();
        if let Some(subnet) = self.route.take() {
            let _ = Command::new("ip")
                .args(["-n", &self.client, "route", "del", &subnet])
                .status();
        }
    }
}

/// One wrk run: (requests/s, p50 ms, p99 ms, socket errors + non-2xx answers).
fn parse_wrk(out: &str) -> (f64, f64, f64, u64) {
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
    let mut errors = 0;
    for line in out.lines().map(str::trim) {
        if let Some(counts) = line.strip_prefix("Socket errors:") {
            errors += counts
                .split(',')
                .filter_map(|c| c.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        }
        if let Some(count) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += count.trim().parse::<u64>().unwrap_or(0);
        }
    }
    (
        field("Requests/sec:").parse().unwrap_or(f64::NAN),
        ms(field("50%")),
        ms(field("99%")),
        errors,
    )
}

fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

fn wrk(lab: &TestLab, url: &str, close: bool) -> (f64, f64, f64, u64) {
    let mut args = vec![
        "timeout",
        "30",
        "wrk",
        "-t1",
        "-c50",
        "-d",
        WRK_SECONDS,
        "--timeout",
        "2s",
        "--latency",
    ];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    parse_wrk(&lab.exec("client", &args))
}

/// The lab half: per measure, per path, one value per round.
type LabResults = BTreeMap<String, BTreeMap<&'static str, Vec<f64>>>;

fn lab_bench() -> (Vec<&'static str>, LabResults) {
    let dir = "/tmp/shoal-bench-mesh";
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).unwrap();
    let conf = nginx_config(dir);

    let lab = TestLab::up(LAB, 3);
    lab.exec(
        "node1",
        &[
            "shoal",
            "node",
            "update",
            "--label-add",
            "bench=server",
            "node2",
        ],
    );
    lab.create_service(
        "web",
        &[
            "--constraint",
            "node.labels.bench==server",
            "--publish",
            "8080:80",
            "--publish",
            "published=8081,target=81,source=snat",
        ],
        &["nginx", "-c", &conf],
    );
    let task = lab.running_tasks("web", 1).remove(0);
    assert_eq!(task.node, "node2");
    let task_ip = task.addresses["ingress"].clone();
    for port in [8080, 8081] {
        wait_for(
            &format!("port {port} with its backend on node1"),
            Duration::from_secs(30),
            || {
                let ports = lab.try_json("node1", &["ingress", "ls"])?;
                let found = ports.as_array()?.iter().any(|p| {
                    p["published"] == port && p["backends"].as_array().is_some_and(|b| b.len() == 1)
                });
                found.then_some(())
            },
        );
    }
    // node1's ingress endpoint: its address is the source nft-dnat and haproxy use.
    let ing: Value = serde_json::from_str(&sh(&[
        "ip",
        "-n",
        &format!("shoal-{LAB}-node1"),
        "-j",
        "addr",
        "show",
        "shoal_ing",
    ]))
    .unwrap();
    let info = ing[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["family"] == "inet")
        .expect("an IPv4 address on shoal_ing");
    let node1_ing = info["local"].as_str().unwrap().to_owned();
    let prefix = info["prefixlen"].as_u64().unwrap();
    let base = u32::from(node1_ing.parse::<Ipv4Addr>().unwrap()) & (u32::MAX << (32 - prefix));
    let subnet = format!("{}/{prefix}", Ipv4Addr::from(base));

    let baselines = Baselines::build(&lab, dir, &task_ip, &subnet);
    let paths = [
        Path {
            name: "mesh",
            url: format!("http://{NODE1}:8080/"),
        },
        Path {
            name: "mesh-snat",
            url: format!("http://{NODE1}:8081/"),
        },
        Path {
            name: "physical",
            url: format!("http://{task_ip}:82/"),
        },
        Path {
            name: "nft-dnat",
            url: format!("http://{NODE1}:8090/"),
        },
        Path {
            name: "haproxy",
            url: format!("http://{NODE1}:8091/"),
        },
    ];
    // Every path answers, from the server that saw the expected source.
    for path in &paths {
        let seen = wait_for(
            &format!("an answer through {}", path.name),
            Duration::from_secs(10),
            || {
                let out = lab.run(&[
                    "exec",
                    "client",
                    "--",
                    "curl",
                    "-sf",
                    "--max-time",
                    "2",
                    &path.url,
                ]);
                out.status
                    .success()
                    .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
            },
        );
        let expected = match path.name {
            "mesh" | "physical" => CLIENT,
            _ => node1_ing.as_str(),
        };
        assert_eq!(
            seen, expected,
            "source the backend saw through {}",
            path.name
        );
    }

    let mut results = LabResults::new();
    for round in 0..ROUNDS {
        for close in [false, true] {
            let mode = if close { "close" } else { "keep-alive" };
            for i in 0..paths.len() {
                let path = &paths[(i + round) % paths.len()];
                eprintln!("round {}/{ROUNDS}: {mode} through {}", round + 1, path.name);
                let (rps, p50, p99, errors) = wrk(&lab, &path.url, close);
                for (measure, value) in [
                    ("req/s", rps),
                    ("p50 ms", p50),
                    ("p99 ms", p99),
                    ("errors", errors as f64),
                ] {
                    results
                        .entry(format!("{mode} {measure}"))
                        .or_default()
                        .entry(path.name)
                        .or_default()
                        .push(value);
                }
            }
        }
    }
    drop(baselines);
    lab.down_clean();
    let _ = fs::remove_dir_all(dir);
    (paths.iter().map(|p| p.name).collect(), results)
}

/// Warm per-packet cost with `repeat`: ping and pong publish each other (see the doc above).
fn warm_decision(services: u16) -> Value {
    decision::in_private_netns(move || {
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/shoal-bench-mesh-{}-{services}",
            std::process::id()
        ));
        let limits = MeshLimits {
            max_services: u32::from(services) + 16,
            table_size: 1_021,
        };
        let _pins = decision::Pins(pins.clone());
        let dp = decision::dataplane(&pins, limits);
        let mut table = MeshTable::open(&dp.config().maps_dir(), limits).unwrap();
        let node = Ipv4Addr::new(192, 168, 77, 11);
        table.set_advertise(node, 1).unwrap();
        table.set_ingress(Ipv4Addr::new(10, 0, 0, 2), 1).unwrap();
        let mut wanted = decision::ports(services);
        for (port, target) in [(PING, PONG), (PONG, PING)] {
            wanted.insert(
                (Protocol::Tcp, port),
                PublishedService {
                    target,
                    snat: false,
                    backends: vec![node],
                },
            );
        }
        table.sync(&wanted).unwrap();
        let counters = |table: &MeshTable| {
            table
                .list()
                .unwrap()
                .into_iter()
                .filter(|p| p.published == PING || p.published == PONG)
                .map(|p| (p.counters.flows, p.counters.packets_in))
                .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
        };
        let (code, syn) = dp
            .time_ingress(&decision::packet(40_000, PING, true), REPEAT)
            .unwrap();
        assert_eq!(code, 7, "SYN redirected");
        let (flows, _) = counters(&table);
        assert_eq!(flows, u64::from(REPEAT), "every SYN run balanced afresh");
        let (code, ack) = dp
            .time_ingress(&decision::packet(40_000, PING, false), REPEAT)
            .unwrap();
        assert_eq!(code, 7, "ACK redirected");
        let (flows_after, packets) = counters(&table);
        assert_eq!(flows_after, flows, "every ACK run hit the flow table");
        assert_eq!(packets, 2 * u64::from(REPEAT));
        drop(table);
        drop(dp);
        json!({
            "services": services,
            "new_flow_warm_mean_ns": syn.as_nanos() as f64,
            "tracked_flow_warm_mean_ns": ack.as_nanos() as f64,
        })
    })
}

/// bpf(2) `command` with `attr` (whose buffers it may read), for a command that returns a
/// new descriptor, owned by the caller and closed when dropped.
fn bpf_new_fd<T>(command: i64, attr: &T, what: &str) -> std::os::fd::OwnedFd {
    // SAFETY: `attr` is a whole bpf_attr prefix of its own size, valid for the call.
    let fd = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_bpf,
            command,
            attr as *const T,
            size_of::<T>(),
        )
    };
    assert!(fd >= 0, "{what}: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nobody else owns.
    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
}

/// The floor under every figure of part 2 on this machine: one BPF_PROG_TEST_RUN iteration
/// of an empty TC program (`r0 = 0; exit`), and of one with a single call of a helper that
/// does next to nothing (`bpf_get_prandom_u32`): the price of a call and its return, which
/// return thunks (SRSO "Safe RET" on this VM's AMD CPUs) make high; of one with three such
/// calls (the fewest a TC rewrite makes: two checksum helpers and the redirect), of an
/// empty XDP program, and of one that only writes one entry into an LRU map shaped like
/// `MESH_FLOWS` (a new flow writes two). Repeated 1,000,000 times, the kernel's mean. Loaded from raw
/// instructions (bpf(2)), closed at once.
fn calibration() -> Value {
    #[repr(C)]
    struct Load {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        rest: [u8; 104],
    }
    #[repr(C)]
    struct TestRun {
        prog_fd: u32,
        retval: u32,
        size_in: u32,
        size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        rest: [u8; 88],
    }
    const SCHED_CLS: u32 = 3;
    let (exit, r0_zero, prandom) = (0x95u64, 0xb7u64, 0x85u64 | (7 << 32));
    let license = c"GPL";
    let frame = decision::packet(1, 9, false);
    let mut out = serde_json::Map::new();
    const XDP: u32 = 6;
    // An LRU hash map shaped like MESH_FLOWS (16-byte keys, 32-byte values), for the price
    // of the one insert every new flow needs (the mesh makes two).
    #[repr(C)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        rest: [u8; 112],
    }
    let create = MapCreate {
        map_type: 9, // BPF_MAP_TYPE_LRU_HASH
        key_size: 16,
        value_size: 32,
        max_entries: shoal_common::MESH_MAX_FLOWS,
        rest: [0; 112],
    };
    const BPF_MAP_CREATE: i64 = 0;
    const BPF_PROG_LOAD: i64 = 5;
    let map = bpf_new_fd(BPF_MAP_CREATE, &create, "creating the calibration map");
    // Instructions as (opcode, dst, src, offset, immediate).
    let insn = |code: u8, dst: u8, src: u8, off: i16, imm: i32| {
        u64::from(code)
            | u64::from(dst | src << 4) << 8
            | u64::from(off as u16) << 16
            | u64::from(imm as u32) << 32
    };
    let map_fd = std::os::fd::AsRawFd::as_raw_fd(&map);
    let mut lru_insert: Vec<u64> = (1..=6).map(|i| insn(0x7a, 10, 0, -8 * i, 0)).collect();
    lru_insert.extend([
        insn(0x18, 1, 1, 0, map_fd), // r1 = the map (two slots)
        0,
        insn(0xbf, 2, 10, 0, 0), // r2 = key: fp - 16
        insn(0x07, 2, 0, 0, -16),
        insn(0xbf, 3, 10, 0, 0), // r3 = value: fp - 48
        insn(0x07, 3, 0, 0, -48),
        insn(0xb7, 4, 0, 0, 0), // r4 = BPF_ANY
        insn(0x85, 0, 0, 0, 2), // bpf_map_update_elem
        r0_zero,
        exit,
    ]);
    for (name, prog_type, insns) in [
        ("empty_program_ns", SCHED_CLS, vec![r0_zero, exit]),
        (
            "one_helper_call_program_ns",
            SCHED_CLS,
            vec![prandom, r0_zero, exit],
        ),
        // What any TC rewrite of a tracked flow must call at least: two checksum helpers
        // and the redirect.
        (
            "three_helper_calls_program_ns",
            SCHED_CLS,
            vec![prandom, prandom, prandom, r0_zero, exit],
        ),
        ("empty_xdp_program_ns", XDP, vec![r0_zero, exit]),
        ("lru_insert_program_ns", SCHED_CLS, lru_insert),
    ] {
        let load = Load {
            prog_type,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            rest: [0; 104],
        };
        let fd = bpf_new_fd(BPF_PROG_LOAD, &load, "loading the calibration program");
        let runs: Vec<f64> = (0..3)
            .map(|_| {
                let mut run = TestRun {
                    prog_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
                    retval: 0,
                    size_in: frame.len() as u32,
                    size_out: 0,
                    data_in: frame.as_ptr() as u64,
                    data_out: 0,
                    repeat: 1_000_000,
                    duration: 0,
                    rest: [0; 88],
                };
                // SAFETY: bpf(BPF_PROG_TEST_RUN) reads the frame and writes `run` back.
                let done = unsafe {
                    nix::libc::syscall(
                        nix::libc::SYS_bpf,
                        10,
                        &mut run as *mut TestRun,
                        size_of::<TestRun>(),
                    )
                };
                assert_eq!(done, 0, "test run: {}", std::io::Error::last_os_error());
                f64::from(run.duration)
            })
            .collect();
        out.insert(name.into(), json!(median(&runs)));
    }
    Value::Object(out)
}

fn decision_only() {
    println!("{}", calibration());
    let single = [decision::decision(10), decision::decision(10_000)];
    let warm = [warm_decision(10), warm_decision(10_000)];
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"single_runs": single, "repeated": warm})).unwrap()
    );
}

fn main() {
    shoal_tests::require_root();
    shoal_tests::require_tools(&["wrk", "nginx", "haproxy", "nft", "curl"]);
    // SHOAL_BENCH_MESH_NO_LAB=1: parts 2 and 3 only (a quick check of a kernel-side change).
    if std::env::var_os("SHOAL_BENCH_MESH_NO_LAB").is_some() {
        return decision_only();
    }
    let (paths, lab) = lab_bench();
    let single = [decision::decision(10), decision::decision(10_000)];
    let warm = [warm_decision(10), warm_decision(10_000)];
    let programming = decision::programming();
    let floor = calibration();

    // 1. The lab table.
    println!(
        "\nclient -> node1 -> nginx on node2 (wrk 1 thread, 50 connections, medians of {ROUNDS})"
    );
    print!("{:<18}", "");
    for path in &paths {
        print!("{path:>12}");
    }
    println!(
        "{:>11}{:>11}{:>11}{:>11}",
        "mesh/phys", "snat/phys", "mesh/nft", "mesh/hapx"
    );
    let mut rows = Vec::new();
    for (measure, per_path) in &lab {
        let med: BTreeMap<&str, f64> = per_path.iter().map(|(p, v)| (*p, median(v))).collect();
        print!("{measure:<18}");
        for path in &paths {
            print!("{:>12.2}", med[path]);
        }
        let ratio = |a: &str, b: &str| med[a] / med[b];
        let ratios = json!({
            "mesh/physical": ratio("mesh", "physical"),
            "mesh-snat/physical": ratio("mesh-snat", "physical"),
            "mesh/nft-dnat": ratio("mesh", "nft-dnat"),
            "mesh/haproxy": ratio("mesh", "haproxy"),
        });
        if measure.ends_with("errors") {
            println!();
        } else {
            println!(
                "{:>11.3}{:>11.3}{:>11.3}{:>11.3}",
                ratio("mesh", "physical"),
                ratio("mesh-snat", "physical"),
                ratio("mesh", "nft-dnat"),
                ratio("mesh", "haproxy")
            );
        }
        rows.push(
            json!({"measure": measure, "rounds": per_path, "medians": med, "ratios": ratios}),
        );
    }
    let req = |mode: &str, path: &str| median(&lab[&format!("{mode} req/s")][path]);
    let mut targets = Vec::new();
    for mode in ["keep-alive", "close"] {
        let vs_phys = req(mode, "mesh") / req(mode, "physical");
        let vs_nft = req(mode, "mesh") / req(mode, "nft-dnat");
        targets.push(json!({"target": format!("{mode}: mesh >= 0.95 x physical"), "value": vs_phys, "met": vs_phys >= 0.95}));
        targets.push(json!({"target": format!("{mode}: mesh ahead of nft-dnat"), "value": vs_nft, "met": vs_nft > 1.0}));
    }

    // 2. Decision cost.
    println!("\nper-packet mesh decision, ns (BPF_PROG_TEST_RUN)      10 ports   10,000 ports");
    let cell = |v: &Value, path: &[&str]| {
        path.iter()
            .fold(v, |v, k| &v[*k])
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    for (label, source, path) in [
        (
            "new flow (SYN), single runs p50",
            &single,
            &["new_flow_ns", "p50"][..],
        ),
        (
            "new flow (SYN), single runs p99",
            &single,
            &["new_flow_ns", "p99"],
        ),
        (
            "new flow (SYN), repeated, mean",
            &warm,
            &["new_flow_warm_mean_ns"],
        ),
        (
            "tracked flow (ACK), single runs p50",
            &single,
            &["tracked_flow_ns", "p50"],
        ),
        (
            "tracked flow (ACK), single runs p99",
            &single,
            &["tracked_flow_ns", "p99"],
        ),
        (
            "tracked flow (ACK), repeated, mean",
            &warm,
            &["tracked_flow_warm_mean_ns"],
        ),
        (
            "unpublished port, single runs p50",
            &single,
            &["unpublished_ns", "p50"],
        ),
        (
            "unpublished port, repeated, mean",
            &single,
            &["unpublished_warm_mean_ns"],
        ),
    ] {
        println!(
            "{label:<48}{:>11.0}{:>15.0}",
            cell(&source[0], path),
            cell(&source[1], path)
        );
    }
    println!(
        "(floor here, per test run: an empty TC program {:.0} ns, with one helper call {:.0} ns, with three {:.0} ns (the fewest a TC rewrite can make); an empty XDP program {:.0} ns; a TC program that only inserts one flow into an LRU map like MESH_FLOWS {:.0} ns)",
        floor["empty_program_ns"].as_f64().unwrap(),
        floor["one_helper_call_program_ns"].as_f64().unwrap(),
        floor["three_helper_calls_program_ns"].as_f64().unwrap(),
        floor["empty_xdp_program_ns"].as_f64().unwrap(),
        floor["lru_insert_program_ns"].as_f64().unwrap()
    );
    for (label, key) in [
        ("new flow", "new_flow_warm_mean_ns"),
        ("tracked flow", "tracked_flow_warm_mean_ns"),
    ] {
        let (small, large) = (
            warm[0][key].as_f64().unwrap(),
            warm[1][key].as_f64().unwrap(),
        );
        targets.push(json!({"target": format!("{label}: < 100 ns (repeated mean) at 10 and 10,000 ports"), "value": [small, large], "met": small < 100.0 && large < 100.0}));
        targets.push(json!({"target": format!("{label}: flat from 10 to 10,000 ports (within 20%)"), "value": large / small, "met": large / small < 1.2}));
    }

    // 3. Programming.
    let ms = |k: &str| programming[k].as_f64().unwrap();
    println!(
        "\nprogramming 1,000 ports x 10 backends: MeshTable::sync {:.1} ms (one backend of each replaced: {:.1} ms), nft -f {:.1} ms: mesh {:.2}x faster",
        ms("mesh_sync_ms"),
        ms("mesh_change_one_backend_each_ms"),
        ms("nft_load_ms"),
        ms("nft_load_ms") / ms("mesh_sync_ms"),
    );

    println!("\ntargets:");
    for t in &targets {
        println!(
            "  {:<60} {:<8} {}",
            t["target"].as_str().unwrap(),
            if t["met"] == true { "met" } else { "MISSED" },
            t["value"]
        );
    }
    let out = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("bench");
    fs::create_dir_all(&out).unwrap();
    fs::write(
        out.join("mesh.json"),
        serde_json::to_vec_pretty(&json!({
            "lab": {"paths": paths, "rows": rows, "rounds": ROUNDS, "wrk_seconds": WRK_SECONDS},
            "decision": {"single_runs": single, "repeated": warm, "repeat": REPEAT, "test_run_floor": floor},
            "programming": programming,
            "targets": targets,
        }))
        .unwrap(),
    )
    .unwrap();
    println!("\nwritten to {}", out.join("mesh.json").display());
}
