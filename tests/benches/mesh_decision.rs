//! The routing mesh's decision and programming costs, side by side in one run (`cargo bench
//! -p shoal-tests --bench mesh_decision`, as root; no lab needed). Everything runs in a private
//! network namespace with its own pins and cgroup, removed afterwards.
//!
//! 1. **Per-packet decision**: the attached ingress classifier run by BPF_PROG_TEST_RUN, one
//!    packet per run (a repeated run would see its own rewritten packet), the kernel's own
//!    timing of each run; median and p99 over `RUNS` runs, with 10 and with 10,000 published
//!    ports: a SYN to a published port (new flow: Maglev pick, two LRU inserts, rewrite), an
//!    ACK of a tracked flow (flow-table hit, rewrite) and a packet to a port nobody publishes
//!    (lookup miss, passed on).
//! 2. **Programming**: 1,000 published ports × 10 backends with `MeshTable::sync` (Maglev rows
//!    written through the mmap) against `nft -f` of the equivalent rules (one DNAT rule per
//!    port with a `numgen random mod 10` map to the 10 backends).
//!
//! Results go to target/bench/mesh_decision.json.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::json;
use shoal_common::IngressSettings;
use shoal_dataplane::{
    mesh::{MeshLimits, MeshTable, Protocol, PublishedService},
    Dataplane, DataplaneConfig,
};

const RUNS: usize = 20_000;
const NODE: [u8; 4] = [192, 168, 77, 11];
const TABLE_SIZE: u32 = 1_021;

pub(crate) fn packet(sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([192, 168, 77, 100], NODE, 64)
        .tcp(sport, dport, 1, 65_535);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut out = Vec::new();
    builder.write(&mut out, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    out
}

fn backends(port: u16) -> PublishedService {
    PublishedService {
        target: 80,
        snat: false,
        backends: (0..10u8)
            .map(|i| Ipv4Addr::new(10, 0, (port % 250) as u8, 10 + i))
            .collect(),
    }
}

pub(crate) fn ports(count: u16) -> BTreeMap<(Protocol, u16), PublishedService> {
    (0..count)
        .map(|i| ((Protocol::Tcp, 20_000 + i), backends(20_000 + i)))
        .collect()
}

/// A dataplane on this thread's (private) namespace's `lo`, with its own pins and cgroup.
pub(crate) fn dataplane(pins: &Path, limits: MeshLimits) -> Dataplane {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let cgroup = shoal_dataplane::process::cgroup2_from_mountinfo(&mountinfo)
        .unwrap()
        .join(pins.file_name().unwrap());
    Dataplane::start(DataplaneConfig {
        bpffs_root: pins.to_owned(),
        interface: "lo".into(),
        settings: IngressSettings {
            advertise_ip: u32::from_ne_bytes(NODE),
            ..Default::default()
        },
        task_cgroup: cgroup.clone(),
        node_cgroup: cgroup,
        mesh: limits,
    })
    .expect("starting the dataplane")
}

/// Removes a run's pins and cgroup when dropped, also when the run panics.
pub(crate) struct Pins(pub(crate) PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        cleanup(&self.0);
    }
}

fn cleanup(pins: &Path) {
    let _ = shoal_dataplane::remove_pins(pins);
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let cgroup = shoal_dataplane::process::cgroup2_from_mountinfo(&mountinfo)
        .unwrap()
        .join(pins.file_name().unwrap());
    let _ = std::fs::remove_dir(cgroup);
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p) as usize].as_nanos() as f64
}

/// Median and p99 ns of the kernel's timing of single runs.
fn time(dp: &Dataplane, frame: impl Fn(usize) -> Vec<u8>, expect: u32) -> (f64, f64) {
    let mut times: Vec<Duration> = (0..RUNS)
        .map(|i| {
            let (code, took) = dp.time_ingress(&frame(i), 1).unwrap();
            assert_eq!(code, expect, "verdict of run {i}");
            took
        })
        .collect();
    times.sort();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

pub(crate) fn in_private_netns<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare");
        body()
    })
    .join()
    .unwrap()
}

pub(crate) fn decision(services: u16) -> serde_json::Value {
    in_private_netns(move || {
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/shoal-bench-{}-{services}",
            std::process::id()
        ));
        let limits = MeshLimits {
            max_services: u32::from(services).max(16),
            table_size: TABLE_SIZE,
        };
        let _pins = Pins(pins.clone());
        let dp = dataplane(&pins, limits);
        let mut table = MeshTable::open(&dp.config().maps_dir(), limits).unwrap();
        table.set_advertise(NODE.into(), 1).unwrap();
        table.set_ingress(Ipv4Addr::new(10, 0, 0, 2), 1).unwrap();
        table.sync(&ports(services)).unwrap();
        let published = 20_000 + services / 2;
        // Port numbers cycle so new flows spread over the table.
        let new_flow = time(
            &dp,
            |i| packet(1_024 + (i % 60_000) as u16, published, true),
            7,
        );
        // The SYNs above left flows for those ports: ACKs hit the table.
        let tracked = time(
            &dp,
            |i| packet(1_024 + (i % 60_000) as u16, published, false),
            7,
        );
        let other = time(&dp, |i| packet(1_024 + (i % 60_000) as u16, 9, false), 0);
        // The same packet 100,000 times in one call: the warm cost of a pass-through (a
        // rewritten packet cannot be repeated: the next run would see the rewrite).
        let (_, warm) = dp.time_ingress(&packet(1_024, 9, false), 100_000).unwrap();
        drop(table);
        drop(dp);
        json!({
            "services": services,
            "new_flow_ns": {"p50": new_flow.0, "p99": new_flow.1},
            "tracked_flow_ns": {"p50": tracked.0, "p99": tracked.1},
            "unpublished_ns": {"p50": other.0, "p99": other.1},
            "unpublished_warm_mean_ns": warm.as_nanos() as f64,
        })
    })
}

pub(crate) fn programming() -> serde_json::Value {
    in_private_netns(|| {
        let pins = PathBuf::from(format!(
            "/sys/fs/bpf/shoal-bench-{}-prog",
            std::process::id()
        ));
        let limits = MeshLimits {
            max_services: 1_024,
            table_size: shoal_common::MESH_DEFAULT_TABLE_SIZE,
        };
        let _pins = Pins(pins.clone());
        let dp = dataplane(&pins, limits);
        let mut table = MeshTable::open(&dp.config().maps_dir(), limits).unwrap();
        let wanted = ports(1_000);
        let started = Instant::now();
        table.sync(&wanted).unwrap();
        let mesh = started.elapsed();
        // One backend of every port replaced: only the moved slots are written.
        let mut changed = wanted.clone();
        for service in changed.values_mut() {
            service.backends[0] = Ipv4Addr::new(10, 9, 9, 9);
        }
        let started = Instant::now();
        table.sync(&changed).unwrap();
        let mesh_change = started.elapsed();
        drop(table);
        drop(dp);

        let mut rules = String::from(
            "table ip shoal_bench {\n chain prerouting { type nat hook prerouting priority dstnat;\n",
        );
        for ((_, port), service) in &wanted {
            let map: Vec<String> = service
                .backends
                .iter()
                .enumerate()
                .map(|(i, ip)| format!("{i} : {ip}"))
                .collect();
            rules.push_str(&format!(
                "  ip daddr 192.168.77.11 tcp dport {port} dnat to numgen random mod 10 map {{ {} }} : 80\n",
                map.join(", ")
            ));
        }
        rules.push_str(" }\n chain postrouting { type nat hook postrouting priority srcnat; masquerade; }\n}\n");
        let file = std::env::temp_dir().join(format!("shoal-bench-{}.nft", std::process::id()));
        std::fs::write(&file, &rules).unwrap();
        let started = Instant::now();
        let status = Command::new("nft")
            .arg("-f")
            .arg(&file)
            .stdout(Stdio::null())
            .status()
            .expect("nft");
        let nft = started.elapsed();
        let _ = std::fs::remove_file(&file);
        assert!(status.success(), "nft -f of the equivalent rules");
        json!({
            "ports": 1_000,
            "backends_each": 10,
            "mesh_sync_ms": mesh.as_secs_f64() * 1e3,
            "mesh_change_one_backend_each_ms": mesh_change.as_secs_f64() * 1e3,
            "nft_load_ms": nft.as_secs_f64() * 1e3,
        })
    })
}

fn main() {
    assert!(nix::unistd::geteuid().is_root(), "run as root");
    let small = decision(10);
    let large = decision(10_000);
    let program = programming();
    println!(
        "\nper-packet decision, ns (kernel timing of single BPF_PROG_TEST_RUN runs, {RUNS} each)"
    );
    println!("{:<28}{:>16}{:>16}", "", "10 services", "10,000 services");
    for case in ["new_flow_ns", "tracked_flow_ns", "unpublished_ns"] {
        for p in ["p50", "p99"] {
            println!(
                "{:<28}{:>16.0}{:>16.0}",
                format!("{case} {p}"),
                small[case][p].as_f64().unwrap(),
                large[case][p].as_f64().unwrap()
            );
        }
    }
    println!(
        "{:<28}{:>16.0}{:>16.0}",
        "unpublished, warm mean",
        small["unpublished_warm_mean_ns"].as_f64().unwrap(),
        large["unpublished_warm_mean_ns"].as_f64().unwrap()
    );
    println!(
        "\nprogramming 1,000 ports x 10 backends: mesh {:.1} ms (one backend of each replaced: {:.1} ms), nft -f {:.1} ms ({:.2}x)",
        program["mesh_sync_ms"].as_f64().unwrap(),
        program["mesh_change_one_backend_each_ms"].as_f64().unwrap(),
        program["nft_load_ms"].as_f64().unwrap(),
        program["nft_load_ms"].as_f64().unwrap() / program["mesh_sync_ms"].as_f64().unwrap(),
    );
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("mesh_decision.json"),
        serde_json::to_string_pretty(&json!({"decision": [small, large], "programming": program}))
            .unwrap(),
    )
    .unwrap();
}
