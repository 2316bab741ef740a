//! Placement as Swarm has it, in the lab: `--placement-pref spread=node.labels.zone` evens
//! the tasks over the zones, a `node.hostname` constraint pins them, and
//! `--replicas-max-per-node` leaves what fits nowhere Pending with Swarm's reason until the
//! service shrinks. Needs root.

use std::{collections::BTreeMap, time::Duration};

use serde_json::Value;
use shoal_tests::{wait_for, TestLab};

const SLEEP: [&str; 2] = ["sleep", "100000"];

fn tasks(lab: &TestLab, service: &str) -> Vec<Value> {
    lab.node_json("node1", &["service", "ps", service])
        .as_array()
        .expect("tasks")
        .clone()
}

fn per_node(lab: &TestLab, service: &str, replicas: usize) -> BTreeMap<String, usize> {
    let mut per = BTreeMap::new();
    for task in lab.running_tasks(service, replicas) {
        *per.entry(task.node).or_default() += 1;
    }
    per
}

#[test]
fn spread_over_zones_pins_by_hostname_and_caps_per_node() {
    let lab = TestLab::up("placement", 3);
    for (node, zone) in [("node1", "a"), ("node2", "b"), ("node3", "c")] {
        let label = format!("zone={zone}");
        lab.exec(
            "node1",
            &["shoal", "node", "update", "--label-add", &label, node],
        );
    }

    // Six replicas spread over three zones of one node each: 2-2-2.
    lab.create_service(
        "spread",
        &[
            "--replicas",
            "6",
            "--placement-pref",
            "spread=node.labels.zone",
        ],
        &SLEEP,
    );
    assert_eq!(
        per_node(&lab, "spread", 6),
        BTreeMap::from([
            ("node1".to_owned(), 2),
            ("node2".to_owned(), 2),
            ("node3".to_owned(), 2)
        ])
    );
    let shown = lab.node_json("node1", &["service", "inspect", "spread"]);
    let shown = if shown.is_array() {
        shown[0].clone()
    } else {
        shown
    };
    assert_eq!(
        shown["placement_prefs"],
        serde_json::json!(["spread=node.labels.zone"]),
        "{shown}"
    );

    // A hostname constraint pins every task.
    lab.create_service(
        "pinned",
        &["--replicas", "3", "--constraint", "node.hostname==node2"],
        &SLEEP,
    );
    assert_eq!(
        per_node(&lab, "pinned", 3),
        BTreeMap::from([("node2".to_owned(), 3)])
    );

    // Nodes report their platform; an update of the constraints rolls the tasks over.
    let node3 = lab.node_json("node1", &["node", "inspect", "node3"]);
    let node3 = if node3.is_array() {
        node3[0].clone()
    } else {
        node3
    };
    assert_eq!(node3["platform"]["os"], "linux", "{node3}");
    lab.exec(
        "node1",
        &[
            "shoal",
            "service",
            "update",
            "--detach",
            "--constraint-rm",
            "node.hostname==node2",
            "--constraint-add",
            "node.hostname==node3",
            "--constraint-add",
            "node.platform.os==linux",
            "pinned",
        ],
    );
    wait_for("pinned moved to node3", Duration::from_secs(60), || {
        let live: Vec<Value> = tasks(&lab, "pinned")
            .into_iter()
            .filter(|t| t["desired"] == "running")
            .collect();
        (live.len() == 3
            && live
                .iter()
                .all(|t| t["state"] == "running" && t["node"] == "node3"))
        .then_some(())
    });

    // A bad constraint is refused up front, naming the flag.
    let out = lab.run(&[
        "exec",
        "node1",
        "--",
        "shoal",
        "service",
        "create",
        "--name",
        "bad",
        "--constraint",
        "node.foo==x",
        "--",
        "sleep",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--constraint") && stderr.contains("node.foo"),
        "{stderr}"
    );

    // One per node, four replicas, three nodes: one stays Pending, with the reason.
    lab.create_service(
        "capped",
        &["--replicas", "4", "--replicas-max-per-node", "1"],
        &SLEEP,
    );
    let placed = per_node(&lab, "capped", 3);
    assert_eq!(placed.len(), 3, "{placed:?}");
    let reason = "no suitable node (max replicas per node limit exceed on 3 nodes)";
    let pending = wait_for(
        "a pending task with the reason",
        Duration::from_secs(30),
        || {
            tasks(&lab, "capped")
                .into_iter()
                .find(|t| t["state"] == "pending" && t["message"] == reason)
        },
    );
    assert!(
        pending["node"].as_str().unwrap_or_default().is_empty(),
        "{pending}"
    );
    let table = lab.exec("node1", &["shoal", "service", "ps", "capped"]);
    assert!(
        table.contains("max replicas per node limit exceed"),
        "{table}"
    );

    // Three replicas fit: none is left pending.
    lab.exec(
        "node1",
        &["shoal", "service", "scale", "--detach", "capped=3"],
    );
    wait_for("no pending task of capped", Duration::from_secs(30), || {
        tasks(&lab, "capped")
            .iter()
            .all(|t| !(t["state"] == "pending" && t["desired"] == "running"))
            .then_some(())
    });
    assert_eq!(per_node(&lab, "capped", 3).len(), 3);
}
