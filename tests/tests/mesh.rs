//! The routing mesh in the lab: a published port answers on every node (with or without a
//! replica) and reaches every replica with the client's own address (or the node's, in SNAT
//! mode), also for the nodes' own processes; nothing else is open; a long-lived connection survives scaling and a kill -9 of
//! the agent it goes through; a rolling update under load fails no request. Needs root.

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::Duration,
};

use shoal_tests::{shoal_bin, TestLab};

const CLIENT: &str = "192.168.77.100";
const NODES: [&str; 3] = ["192.168.77.11", "192.168.77.12", "192.168.77.13"];
const WHOAMI: [&str; 4] = ["shoal", "whoami", "--listen", "0.0.0.0:80"];

/// `count` requests from the client namespace: the `Hostname:` answers and the addresses
/// the servers saw.
fn ask(lab: &TestLab, url: &str, count: usize) -> (Vec<String>, BTreeSet<String>) {
    let script = format!("for i in $(seq {count}); do curl -s --max-time 2 {url}; done");
    let text = lab.exec("client", &["sh", "-c", &script]);
    let field = |name: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .collect()
    };
    let remotes = field("RemoteAddr:")
        .iter()
        .map(|a| {
            a.rsplit_once(':')
                .map_or(a.clone(), |(ip, _)| ip.to_owned())
        })
        .collect();
    (field("Hostname:"), remotes)
}

/// A command in the client namespace, running while the test goes on.
fn in_client_background(lab: &TestLab, script: &str) -> std::process::Child {
    Command::new(shoal_bin())
        .args(["lab", "--name", &lab.name, "exec", "client", "--"])
        .args(["bash", "-c", script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning a client command")
}

#[test]
fn published_ports_reach_every_replica_from_every_node_and_keep_flows() {
    let lab = TestLab::up("mesh", 3);
    // node1 runs no replica of web: it must answer all the same.
    lab.exec(
        "node1",
        &[
            "shoal",
            "node",
            "update",
            "--label-add",
            "edge=yes",
            "node1",
        ],
    );
    lab.create_service(
        "web",
        &[
            "--replicas",
            "2",
            "--constraint",
            "node.labels.edge!=yes",
            "--publish",
            "8080:80",
        ],
        &WHOAMI,
    );
    lab.create_service(
        "natted",
        &["--publish", "published=9090,target=80,source=snat"],
        &WHOAMI,
    );
    let replicas: BTreeSet<String> = lab
        .running_tasks("web", 2)
        .into_iter()
        .map(|t| t.name)
        .collect();
    lab.running_tasks("natted", 1);
    lab.wait_port_backends(&["node1", "node2", "node3"], 8080, 2);
    lab.wait_port_backends(&["node1", "node2", "node3"], 9090, 1);

    for node in NODES {
        let (hosts, remotes) = ask(&lab, &format!("http://{node}:8080/"), 30);
        assert_eq!(hosts.len(), 30, "every request through {node} answered");
        let seen: BTreeSet<String> = hosts.into_iter().collect();
        assert_eq!(seen, replicas, "{node} reaches every replica");
        assert_eq!(
            remotes,
            BTreeSet::from([CLIENT.to_owned()]),
            "backends see the client's own address through {node}"
        );
        let (hosts, remotes) = ask(&lab, &format!("http://{node}:9090/"), 3);
        assert_eq!(hosts.len(), 3);
        assert!(
            remotes.iter().all(|r| r.starts_with("10.0.0.")),
            "SNAT: backends see the node's ingress address, not the client: {remotes:?}"
        );
    }

    // `service ls` shows the published ports as Docker does.
    let listing = lab.exec("node1", &["shoal", "service", "ls"]);
    let row = |name: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no {name} in {listing}"))
            .to_owned()
    };
    assert!(row("web").ends_with("*:8080->80/tcp"), "{listing}");
    assert!(
        row("natted").ends_with("*:9090->80/tcp (snat)"),
        "{listing}"
    );

    // Per-service counters, as Prometheus metrics: node3 balanced flows of web.
    let metrics = lab.exec("node3", &["curl", "-s", "http://127.0.0.1:9323/metrics"]);
    let flows: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                "shoal_mesh_flows_total{service=\"web\",published=\"8080\",protocol=\"tcp\"} ",
            )
        })
        .unwrap_or_else(|| panic!("no mesh flow counter for web in {metrics}"))
        .parse()
        .unwrap();
    assert!(flows >= 30.0, "node3 counted {flows} flows");

    // The node's own processes reach published ports too, on its address and on localhost.
    for url in ["http://192.168.77.13:8080/", "http://127.0.0.1:8080/"] {
        let text = lab.exec("node3", &["curl", "-s", "--max-time", "2", url]);
        let host = text
            .lines()
            .find_map(|l| l.strip_prefix("Hostname: "))
            .unwrap_or_else(|| panic!("no answer from {url} on node3: {text}"));
        assert!(replicas.contains(host.trim()), "{url} reached {host}");
    }

    // `ingress trace` runs the attached program on node3: a SYN to the published port is
    // sent to a replica, keeping the client's address; an unpublished port is left alone.
    let trace = lab.node_json(
        "node3",
        &[
            "ingress",
            "trace",
            "--dst",
            "192.168.77.13:8080",
            "--src",
            "192.168.77.100:40000",
        ],
    );
    assert_eq!(trace["verdict"], "redirect");
    assert_eq!(trace["source_seen"], "192.168.77.100:40000");
    let task = trace["backend_task"]["task"]
        .as_str()
        .expect("a backend task");
    assert!(replicas.iter().any(|r| task == r), "{task} is a replica");
    let trace = lab.node_json(
        "node3",
        &[
            "ingress",
            "trace",
            "--dst",
            "192.168.77.13:8081",
            "--src",
            "192.168.77.100:40000",
        ],
    );
    assert_eq!(trace["verdict"], "pass");

    // Nothing but published ports: an unpublished port and a task's own port are refused.
    for url in ["http://192.168.77.11:9999/", "http://192.168.77.12:80/"] {
        let out = lab.run(&["exec", "client", "--", "curl", "-s", "--max-time", "2", url]);
        assert_eq!(out.status.code(), Some(7), "{url} refused");
    }

    // A long-lived connection through node1 (echo, one line a second) lives through
    // scaling up and down and a kill -9 and restart of node1's agent.
    let long_lived = in_client_background(
        &lab,
        "exec 3<>/dev/tcp/192.168.77.11/8080 || exit 1
         for i in $(seq 20); do
           echo ping $i >&3
           read -t 5 line <&3 && [ \"$line\" = \"ping $i\" ] || { echo LOST $i; exit 1; }
           sleep 1
         done
         echo survived",
    );
    std::thread::sleep(Duration::from_secs(2));
    lab.exec("node1", &["shoal", "service", "scale", "web=4"]);
    lab.wait_port_backends(&["node1", "node2", "node3"], 8080, 4);
    lab.exec("node1", &["shoal", "service", "scale", "web=2"]);
    lab.wait_port_backends(&["node1", "node2", "node3"], 8080, 2);
    lab.ok(&["stop", "node1", "--kill"]);
    std::thread::sleep(Duration::from_secs(1));
    lab.ok(&["start", "node1"]);
    let out = long_lived
        .wait_with_output()
        .expect("the long-lived client");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("survived"),
        "the long-lived connection broke: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A rolling update of web under steady requests through node3 fails none of them.
    let load = in_client_background(
        &lab,
        "end=$((SECONDS + 15)); n=0
         while [ $SECONDS -lt $end ] && [ $n -lt 5000 ]; do
           curl -s -o /dev/null --max-time 2 -w '%{http_code}\\n' http://192.168.77.13:8080/ || echo failed
           n=$((n + 1))
         done",
    );
    std::thread::sleep(Duration::from_secs(1));
    lab.exec("node1", &["shoal", "service", "update", "--force", "web"]);
    let out = load.wait_with_output().expect("the load loop");
    let codes: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let failed: Vec<(usize, &String)> = codes
        .iter()
        .enumerate()
        .filter(|(_, c)| *c != "200")
        .collect();
    assert!(codes.len() > 100, "the load ran: {} requests", codes.len());
    assert!(
        failed.is_empty(),
        "{} of {} requests failed (request number, answer): {failed:?}",
        failed.len(),
        codes.len()
    );
    let updated: BTreeSet<String> = lab
        .running_tasks("web", 2)
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(
        updated.is_disjoint(&replicas),
        "the update replaced the tasks"
    );

    lab.down_clean();
}
