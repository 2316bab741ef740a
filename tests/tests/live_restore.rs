//! The agent is not the dataplane: killing, stopping or swapping the binary of a node's agent
//! costs none of its tasks (same IDs, same processes), none of the connections held through
//! it (to a backend on it and on another node), and no DNS query of its tasks; a task that
//! ends while its agent is away is reported with its real exit status. The programs on its
//! tasks' interfaces stay in the kernel while it is away, and the new agent replaces them in
//! place (same filters, its own programs). Needs root and iproute2 (`tc`).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use shoal_tests::{shoal_bin, wait_for, TestLab};

const WHOAMI: [&str; 4] = ["shoal", "whoami", "--listen", "0.0.0.0:80"];

/// Holds `count` TCP connections from the client to `target` and echoes a line on each every
/// 200 ms for `seconds`; prints `port <local port>` per connection at the start, then
/// `lost <port>` for every echo that did not come back within 2 s, and `done`.
const HOLDER: &str = r#"
import socket, sys, time
target, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conns = []
for _ in range(count):
    c = socket.create_connection((target, 8080), timeout=2)
    conns.append(c)
    print("port", c.getsockname()[1], flush=True)
end = time.time() + seconds
i = 0
while time.time() < end:
    for c in conns:
        port = c.getsockname()[1]
        try:
            c.sendall(b"ping %d\n" % i)
            got = b""
            while not got.endswith(b"\n"):
                chunk = c.recv(64)
                if not chunk:
                    raise OSError("closed")
                got += chunk
        except OSError:
            print("lost", port, flush=True)
    i += 1
    time.sleep(0.2)
print("done", flush=True)
"#;

const HELD_FLOWS: usize = 24;

/// The held connections' output, once the holder is done.
struct Held {
    ports: Vec<u16>,
    lost: BTreeMap<u16, usize>,
}

fn hold(lab: &TestLab, target: &str, count: usize, seconds: u32) -> Child {
    Command::new(shoal_bin())
        .args(["lab", "--name", &lab.name, "exec", "client", "--"])
        .args(["python3", "-c", HOLDER, target])
        .args([count.to_string(), seconds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting the connection holder")
}

/// Waits until the holder opened its connections; returns their local ports.
fn opened(holder: &mut Child, count: usize) -> Vec<u16> {
    let stdout = holder.stdout.as_mut().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    (0..count)
        .map(|_| {
            let line = lines.next().expect("a port line").expect("utf-8");
            line.strip_prefix("port ")
                .unwrap_or_else(|| panic!("not a port line: {line}"))
                .parse()
                .unwrap()
        })
        .collect()
}

fn finish(holder: Child, ports: Vec<u16>) -> Held {
    let out = holder.wait_with_output().expect("the holder's output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("done"), "the holder did not finish:\n{text}");
    let mut lost = BTreeMap::new();
    for port in text.lines().filter_map(|l| l.strip_prefix("lost ")) {
        *lost.entry(port.parse().unwrap()).or_default() += 1;
    }
    Held { ports, lost }
}

/// Task ID -> (node, PID 1 as the host sees it) of a service's running tasks.
fn task_processes(lab: &TestLab, service: &str) -> BTreeMap<String, (String, String)> {
    let tasks = lab.node_json("node1", &["service", "ps", service]);
    tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "running")
        .map(|t| {
            let id = t["id"].as_str().unwrap().to_owned();
            let node = t["node"].as_str().unwrap().to_owned();
            let cgroup = shoal_tests::cgroup2_mount()
                .join(format!("shoal-{}/{node}/tasks/{id}/cgroup.procs", lab.name));
            let procs = std::fs::read_to_string(&cgroup).unwrap_or_default();
            (
                id,
                (node, procs.split_whitespace().collect::<Vec<_>>().join(",")),
            )
        })
        .collect()
}

fn history_states(lab: &TestLab, service: &str) -> Vec<String> {
    lab.node_json("node1", &["service", "ps", service])
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The ingress addresses of the backends node2 sends each held connection to.
fn backends_of(lab: &TestLab, ports: &[u16]) -> BTreeMap<u16, String> {
    let flows = lab.node_json("node2", &["conntrack", "ls"]);
    flows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f: &Value| {
            let client = f["client"].as_str()?;
            let port: u16 = client.rsplit_once(':')?.1.parse().ok()?;
            let backend = f["backend"].as_str()?.rsplit_once(':')?.0.to_owned();
            ports.contains(&port).then_some((port, backend))
        })
        .collect()
}

/// The eBPF filters on the task interfaces of `node`'s networks, as `tc` lists them:
/// (namespace, device, hook, priority, name) -> program ID.
fn task_filters(lab: &TestLab, node: &str) -> BTreeMap<(String, String, String, u32, String), u32> {
    let networks = format!(
        "{}.ov-",
        lab.netns_path(node).file_name().unwrap().to_string_lossy()
    );
    let mut filters = BTreeMap::new();
    for netns in std::fs::read_dir("/run/netns").unwrap().flatten() {
        let netns = netns.file_name().to_string_lossy().into_owned();
        if !netns.starts_with(&networks) {
            continue;
        }
        let links = Command::new("ip")
            .args(["-n", &netns, "-o", "link", "show", "type", "veth"])
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&links.stdout).lines() {
            let Some(device) = line.split(": ").nth(1).and_then(|d| d.split('@').next()) else {
                continue;
            };
            for hook in ["ingress", "egress"] {
                let shown = Command::new("tc")
                    .args(["-n", &netns, "filter", "show", "dev", device, hook])
                    .output()
                    .unwrap();
                // `filter protocol all pref 1 bpf chain 0 handle 0x1 NAME direct-action ... id N`
                for filter in String::from_utf8_lossy(&shown.stdout).lines() {
                    let words: Vec<&str> = filter.split_whitespace().collect();
                    let nth_after = |key: &str, n: usize| {
                        let at = words.iter().position(|w| *w == key)?;
                        words.get(at + n).copied()
                    };
                    let (Some(priority), Some(name), Some(id)) = (
                        nth_after("pref", 1),
                        nth_after("handle", 2),
                        nth_after("id", 1),
                    ) else {
                        continue;
                    };
                    filters.insert(
                        (
                            netns.clone(),
                            device.to_owned(),
                            hook.to_owned(),
                            priority.parse().unwrap(),
                            name.to_owned(),
                        ),
                        id.parse().unwrap(),
                    );
                }
            }
        }
    }
    filters
}

#[test]
fn a_killed_agent_keeps_its_tasks_flows_and_dns() {
    shoal_tests::require_tools(&["tc"]);
    let lab = TestLab::up("live-kill", 3);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.create_service(
        "web",
        &[
            "--replicas",
            "3",
            "--publish",
            "8080:80",
            "--network",
            "front",
        ],
        &WHOAMI,
    );
    let tasks = lab.running_tasks("web", 3);
    // node2 must know all three before the flows below are spread over them.
    lab.wait_port_backends(&["node2"], 8080, 3);
    wait_for("web answers through node2", Duration::from_secs(20), || {
        lab.client_get("192.168.77.12:8080", 1)
    });
    let before = task_processes(&lab, "web");
    let on_node2 = tasks
        .iter()
        .find(|t| t.node == "node2")
        .expect("a task on node2");
    let node2_backend = on_node2.addresses["ingress"].clone();

    // Connections through node2, echoing for the whole test: enough that some reach its own
    // task and some others, whatever the backends' addresses ((2/3)^24 < 1e-4 that none
    // reaches one of three; ten failed CI once).
    let mut holder = hold(&lab, "192.168.77.12", HELD_FLOWS, 25);
    let ports = opened(&mut holder, HELD_FLOWS);
    let backends = wait_for(
        "the held flows in node2's table",
        Duration::from_secs(5),
        || {
            let found = backends_of(&lab, &ports);
            (found.len() == ports.len()).then_some(found)
        },
    );
    let distinct: BTreeSet<&String> = backends.values().collect();
    assert!(
        distinct.contains(&node2_backend) && distinct.len() > 1,
        "{backends:?}"
    );

    // A task on node2 resolves names in a loop for the whole test.
    let resolver = Command::new(shoal_bin())
        .args(["lab", "--name", &lab.name, "exec", "node2", "--"])
        .args(["shoal", "task", "exec", &on_node2.name, "--", "bash", "-c"])
        .arg(
            "ok=0; for i in $(seq 60); do \
               [ -n \"$(dig +short +tries=1 +time=6 @127.0.0.11 tasks.web)\" ] && ok=$((ok+1)); \
               sleep 0.25; done; echo answered=$ok",
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();

    // On node2's task interfaces: the VIP echo first on what a task sends; on the ingress
    // network the mesh's origin tracking after it, and on what the task receives.
    let filters = task_filters(&lab, "node2");
    let kinds: BTreeSet<(&str, u32, &str)> = filters
        .keys()
        .map(|(_, _, hook, priority, name)| (hook.as_str(), *priority, name.as_str()))
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            ("egress", 1, "shoal_mesh_to_task"),
            ("ingress", 1, "shoal_vip_echo"),
            ("ingress", 2, "shoal_mesh_from_task"),
        ]),
        "node2's task filters: {filters:?}"
    );

    std::thread::sleep(Duration::from_secs(2));
    lab.ok(&["stop", "node2", "--kill"]);
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(
        task_filters(&lab, "node2"),
        filters,
        "no agent: the filters stay with their programs"
    );
    lab.ok(&["start", "node2"]);

    let held = finish(holder, ports);
    assert!(
        held.lost.is_empty(),
        "held connections through node2 lost echoes: {:?} (backends {backends:?})",
        held.lost
    );
    let replaced = task_filters(&lab, "node2");
    assert_eq!(
        replaced.keys().collect::<Vec<_>>(),
        filters.keys().collect::<Vec<_>>(),
        "the new agent keeps the same filters"
    );
    assert!(
        replaced.iter().all(|(filter, id)| filters[filter] != *id),
        "the new agent's programs run in them: before {filters:?}, after {replaced:?}"
    );
    assert_eq!(held.ports.len(), HELD_FLOWS);
    let answers = resolver.wait_with_output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&answers.stdout).trim(),
        "answered=60",
        "every DNS query across the restart is answered"
    );
    assert_eq!(
        task_processes(&lab, "web"),
        before,
        "same tasks, same processes"
    );
    let states = history_states(&lab, "web");
    assert!(
        states.iter().all(|s| s == "running"),
        "no task was replaced: {states:?}"
    );
    lab.down_clean();
}

#[test]
fn restarts_and_a_new_binary_keep_tasks_and_a_task_ending_meanwhile_is_reported() {
    let lab = TestLab::up("live-swap", 2);
    lab.exec(
        "node1",
        &[
            "shoal",
            "node",
            "update",
            "--label-add",
            "end=here",
            "node2",
        ],
    );
    lab.create_service("keep", &["--replicas", "2"], &WHOAMI);
    lab.create_service(
        "ender",
        &["--replicas", "1", "--constraint", "node.labels.end==here"],
        &["bash", "-c", "sleep 5; exit 7"],
    );
    lab.running_tasks("keep", 2);
    let ender = lab.running_tasks("ender", 1).remove(0);
    let ender_id = ender.name.rsplit_once('.').unwrap().1.to_owned();
    let before = task_processes(&lab, "keep");

    // A clean stop: the task on node2 ends while its agent is away.
    lab.ok(&["stop", "node2"]);
    std::thread::sleep(Duration::from_secs(6));
    lab.ok(&["start", "node2"]);
    assert_eq!(
        task_processes(&lab, "keep"),
        before,
        "a clean restart keeps tasks"
    );
    let reported = wait_for("the ended task reported", Duration::from_secs(20), || {
        let tasks = lab.node_json("node1", &["service", "ps", "ender"]);
        tasks
            .as_array()?
            .iter()
            .find(|t| t["id"] == ender_id.as_str() && t["state"] == "failed")
            .map(|t| t["error"].as_str().unwrap_or_default().to_owned())
    });
    assert!(
        reported.contains("non-zero exit (7)"),
        "the real exit status of the task that ended while its agent was away: {reported}"
    );

    // The same again with another binary (as an upgrade installs it).
    let dir = tempfile::tempdir().unwrap();
    let swapped = dir.path().join("shoal");
    std::fs::copy(shoal_bin(), &swapped).unwrap();
    lab.ok(&["stop", "node2", "--kill"]);
    let out = Command::new(&swapped)
        .args(["lab", "--name", &lab.name, "start", "node2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let agent = std::fs::read_link(format!(
        "/proc/{}/exe",
        std::fs::read_to_string(lab.run_dir().join("node2/agent.pid"))
            .unwrap()
            .trim()
    ))
    .unwrap();
    assert_eq!(agent, swapped, "node2 runs the new binary");
    wait_for("node2's tasks adopted", Duration::from_secs(20), || {
        (task_processes(&lab, "keep") == before).then_some(())
    });
    lab.down_clean();
}
