//! What the kernel-program tests share: a private network namespace and pin directory per
//! test, the dataplane's configuration there, and checksum checks.

#![allow(dead_code)] // each test binary uses its own part

use std::{path::PathBuf, thread};

use shoal_common::IngressSettings;
use shoal_dataplane::DataplaneConfig;

pub const SETTINGS: IngressSettings = IngressSettings {
    data_path_port: 4789,
    gossip_port: 7946,
    manager_port: 2377,
    metrics_port: 0,
    advertise_ip: 0,
    advertise_ifindex: 0,
    ingress_ip: 0,
    ingress_ifindex: 0,
    table_size: 0,
    _pad2: 0,
    netns_cookie: 0,
};

pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads eBPF programs and needs root (run the README's test command as root)"
    );
}

/// Runs `body` on a thread inside a fresh network namespace (so attaching to its `lo` touches
/// nothing on the host), with its own pin directory, removed afterwards.
pub fn in_private_netns<T: Send + 'static>(
    name: &str,
    body: impl FnOnce(PathBuf) -> T + Send + 'static,
) -> T {
    require_root();
    let pins = PathBuf::from(format!(
        "/sys/fs/bpf/shoal-test-{}-{name}",
        std::process::id()
    ));
    let pins_for_thread = pins.clone();
    let result = thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        body(pins_for_thread)
    })
    .join();
    shoal_dataplane::remove_pins(&pins).expect("removing test pins");
    let _ = std::fs::remove_dir(task_cgroup(&pins));
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// An empty cgroup named after the pin directory, for the socket load balancer to attach to.
pub fn task_cgroup(pins: &std::path::Path) -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    shoal_dataplane::process::cgroup2_from_mountinfo(&mountinfo)
        .expect("a cgroup2 mount")
        .join(pins.file_name().expect("pin dir name"))
}

pub fn config(pins: PathBuf) -> DataplaneConfig {
    DataplaneConfig {
        task_cgroup: task_cgroup(&pins),
        node_cgroup: task_cgroup(&pins),
        bpffs_root: pins,
        interface: "lo".to_owned(),
        settings: SETTINGS,
        mesh: Default::default(),
    }
}

/// Ones' complement sum over `bytes`: 0xffff (i.e. 0 when complemented) for a valid checksum.
pub fn checksum_ok(bytes: &[u8]) -> bool {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum == 0xffff
}
