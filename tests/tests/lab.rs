//! The lab end to end: real agents in namespaces, their eBPF programs, and a teardown that
//! leaves nothing, also after crashes. Needs root.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use shoal_tests::{shoal_bin, verdict_packets, TestLab};

/// Datagrams from the client namespace to one node's port (bash's /dev/udp, no extra tools).
fn send_udp(lab: &TestLab, addr: &str, port: u16, count: usize) {
    let script = format!("for i in $(seq {count}); do echo x >/dev/udp/{addr}/{port}; done");
    lab.exec("client", &["bash", "-c", &script]);
}

#[test]
fn three_node_lab_answers_and_counts_client_traffic() {
    let lab = TestLab::up("e2e-three", 3);
    for (i, node) in ["node1", "node2", "node3"].iter().enumerate() {
        let version = lab.node_json(node, &["version"]);
        assert_eq!(version["agent"]["api_version"], "v1", "{version}");
        let info = lab.node_json(node, &["info"]);
        assert_eq!(info["config"]["hostname"], *node);
        assert_eq!(
            info["config"]["advertise_addr"],
            format!("192.168.77.{}", 11 + i)
        );
        let status = lab.node_json(node, &["dataplane", "status"]);
        let program = &status["programs"][0];
        assert_eq!(program["program"], "shoal_ingress");
        assert_eq!(program["attach_point"], "tcx/ingress");
        assert_eq!(program["interface"], "eth0");
        assert_eq!(program["attached"], true, "{status}");
    }

    use std::os::unix::fs::PermissionsExt as _;
    let mode = |p: &str| {
        std::fs::metadata(lab.run_dir().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(
        mode("node1/shoal.sock"),
        0o600,
        "API socket is for root only"
    );
    assert_eq!(mode("node1/state"), 0o700, "state dir is for root only");

    let before2 = lab.node_json("node2", &["dataplane", "status"]);
    let before1 = lab.node_json("node1", &["dataplane", "status"]);
    send_udp(&lab, "192.168.77.12", 4789, 5);
    send_udp(&lab, "192.168.77.12", 7946, 4);
    lab.exec(
        "client",
        &["ping", "-c", "2", "-i", "0.2", "-q", "192.168.77.12"],
    );
    let after2 = lab.node_json("node2", &["dataplane", "status"]);
    let after1 = lab.node_json("node1", &["dataplane", "status"]);

    let moved =
        |before, after, verdict| verdict_packets(after, verdict) - verdict_packets(before, verdict);
    assert_eq!(
        moved(&before2, &after2, "vxlan_not_member"),
        5,
        "VXLAN datagrams to node2 from the client, which is no node: refused"
    );
    assert_eq!(
        moved(&before2, &after2, "control"),
        4,
        "gossip datagrams to node2"
    );
    assert!(
        moved(&before2, &after2, "other") >= 2,
        "pings to node2: {after2}"
    );
    // node1's control count is not checked: it is the manager, and the workers' heartbeats
    // (a long poll, answered whenever the swarm changes, as it does just after `lab up`) reach
    // it on the manager port at any time.
    assert_eq!(
        moved(&before1, &after1, "vxlan_not_member"),
        0,
        "node1 saw none of node2's traffic"
    );

    let status = lab.run(&["exec", "node9", "--", "true"]);
    assert!(!status.status.success());
    assert!(
        String::from_utf8_lossy(&status.stderr).contains(&format!(
            "lab \"{}\" has no node \"node9\" (node1..node3)",
            lab.name
        )),
        "{status:?}"
    );
    let again = lab.run(&["up", "--nodes", "1"]);
    assert!(
        !again.status.success(),
        "a second `up` of a live lab must refuse"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));

    lab.down_clean();
}

#[test]
fn agent_restart_keeps_counters_maps_and_link() {
    let lab = TestLab::up("e2e-restart", 1);
    send_udp(&lab, "192.168.77.11", 4789, 7);
    let before = lab.node_json("node1", &["dataplane", "status"]);
    assert_eq!(verdict_packets(&before, "vxlan_not_member"), 7);

    lab.ok(&["stop", "node1"]);
    let down = lab.run(&["exec", "node1", "--", "shoal", "info"]);
    assert!(!down.status.success(), "a stopped agent does not answer");
    // The program stays attached while the agent is down: traffic is still classified.
    send_udp(&lab, "192.168.77.11", 4789, 2);
    lab.ok(&["start", "node1"]);

    let after = lab.node_json("node1", &["dataplane", "status"]);
    assert_eq!(
        verdict_packets(&after, "vxlan_not_member"),
        9,
        "counters survive, and counted (and refused) while down"
    );
    let ids = |s: &serde_json::Value, key: &str| -> Vec<u64> {
        s["maps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m[key].as_u64().unwrap())
            .collect()
    };
    assert_eq!(
        ids(&before, "map_id"),
        ids(&after, "map_id"),
        "pinned maps reused"
    );
    assert_eq!(
        before["programs"][0]["link_id"],
        after["programs"][0]["link_id"]
    );
    assert_ne!(
        before["programs"][0]["program_id"], after["programs"][0]["program_id"],
        "the new agent's program replaced the old one in the link"
    );
    assert_eq!(after["programs"][0]["attached"], true);
    lab.down_clean();
}

#[test]
fn second_agent_on_a_state_dir_is_refused() {
    let lab = TestLab::up("e2e-lock", 1);
    let config = lab.run_dir().join("node1/agent.toml");
    let config = config.to_str().unwrap();
    let out = lab.run(&["exec", "node1", "--", "shoal", "agent", "--config", config]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another shoal agent (pid ")
            && stderr.contains("is already using the state dir"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line, no trace: {stderr}");
    // The first agent is unharmed.
    assert_eq!(
        lab.node_json("node1", &["info"])["config"]["hostname"],
        "node1"
    );
    lab.down_clean();
}

#[test]
fn down_after_a_killed_agent_and_a_stray_process_leaves_nothing() {
    let lab = TestLab::up("e2e-crash", 2);
    lab.ok(&["stop", "node1", "--kill"]);
    let status: serde_json::Value =
        serde_json::from_str(&lab.ok(&["status", "--format", "json"])).unwrap();
    assert_eq!(status[0]["agent_up"], false, "{status}");
    assert_eq!(status[1]["agent_up"], true, "{status}");

    // A process someone left running in the client namespace, outside any cgroup of the lab.
    let mut stray = Command::new(shoal_bin())
        .args([
            "lab", "--name", &lab.name, "exec", "client", "--", "sleep", "600",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    lab.down_clean();
    let ended = stray.wait().unwrap();
    assert!(!ended.success(), "the stray process was killed by lab down");
}

#[test]
fn down_after_an_interrupted_up_leaves_nothing() {
    let lab = TestLab::named("e2e-intr");
    shoal_tests::require_root();
    lab.run(&["down"]);
    // Interrupt `lab up` once its first agent is starting; retry if it finished first.
    let mut interrupted = false;
    for _ in 0..5 {
        let mut up = Command::new(shoal_bin())
            .args(["lab", "--name", &lab.name, "up", "--nodes", "6"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let first_agent = lab.run_dir().join("node1/agent.pid");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !first_agent.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(1));
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(up.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let status = up.wait().unwrap();
        interrupted = !status.success();
        if interrupted {
            break;
        }
        lab.down_clean();
    }
    assert!(interrupted, "never caught `lab up` half-way");
    assert!(
        !lab.leftovers().is_empty(),
        "the interrupted up left pieces to clean"
    );
    let again = lab.run(&["up"]);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("a crashed one left pieces"),
        "{again:?}"
    );
    lab.down_clean();
}

/// The agent speaks systemd's notify protocol: READY=1 once it serves, STOPPING=1 on SIGTERM,
/// then exits 0 and removes its socket. The test plays systemd with a datagram socket.
#[test]
fn agent_notifies_ready_and_stopping_and_exits_cleanly_on_sigterm() {
    use std::os::unix::net::UnixDatagram;

    let lab = TestLab::up("e2e-notify", 1);
    lab.ok(&["stop", "node1"]);
    let notify_path = lab.run_dir().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let config = lab.run_dir().join("node1/agent.toml");
    let mut agent = Command::new(shoal_bin())
        .args([
            "lab", "--name", &lab.name, "exec", "node1", "--", "shoal", "agent", "--config",
        ])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 within 20 s");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "READY=1");
    // Ready means serving: the API answers right away.
    assert_eq!(
        lab.node_json("node1", &["info"])["config"]["hostname"],
        "node1"
    );

    // `lab exec` runs the agent as its child; signal the agent itself.
    let info = lab.node_json("node1", &["info"]);
    let pid = info["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = notify.recv(&mut buf).expect("STOPPING=1 after SIGTERM");
    assert_eq!(String::from_utf8_lossy(&buf[..n]).trim(), "STOPPING=1");
    let status = agent.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(
        !lab.run_dir().join("node1/shoal.sock").exists(),
        "socket removed"
    );
    lab.down_clean();
}
