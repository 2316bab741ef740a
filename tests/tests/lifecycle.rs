//! Joining and leaving: a swarm of three managers is whole once `lab up` returns (its leader
//! may die at once), and a worker that leaves gets no new task from the moment it says so,
//! its tasks moving to the other nodes at once. Needs root.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use serde_json::Value;
use shoal_tests::{wait_for, TestLab};

/// `service ps SERVICE` on node1, history included.
fn tasks(lab: &TestLab, service: &str) -> Vec<Value> {
    let tasks = lab.node_json("node1", &["service", "ps", service]);
    tasks.as_array().expect("tasks").clone()
}

fn text<'a>(value: &'a Value, field: &str) -> &'a str {
    value[field].as_str().unwrap_or_default()
}

#[test]
fn the_leader_may_die_as_soon_as_lab_up_returns() {
    let lab = TestLab::up_with("lc-quorum", 3, &["--managers", "3"]);
    lab.ok(&["stop", "node1", "--kill"]);
    let killed = Instant::now();

    // node2 and node3 elect a leader between them, and writes go through.
    wait_for("a write without node1", Duration::from_secs(20), || {
        let out = lab.run(&[
            "exec", "node2", "--", "shoal", "service", "create", "--detach", "--name", "after",
            "--", "sleep", "100000",
        ]);
        // A retry may find the service an earlier, timed-out attempt made.
        let made_before = String::from_utf8_lossy(&out.stderr).contains("already exists");
        (out.status.success() || made_before).then_some(())
    });
    eprintln!("wrote {:?} after killing the leader", killed.elapsed());
    let services = lab.node_json("node3", &["service", "ls"]);
    assert_eq!(services[0]["name"], "after", "{services}");
    let nodes = lab.node_json("node3", &["node", "ls"]);
    let leader: Vec<&str> = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["manager_status"] == "Leader")
        .map(|n| text(n, "hostname"))
        .collect();
    assert!(
        leader == ["node2"] || leader == ["node3"],
        "one new leader: {nodes}"
    );
    lab.down_clean();
}

#[test]
fn a_leaving_worker_gets_no_new_task_and_its_task_moves_at_once() {
    let lab = TestLab::up("lc-leave", 3);
    lab.create_service("keep", &["--replicas", "3"], &["sleep", "100000"]);
    let spread: BTreeSet<String> = lab
        .running_tasks("keep", 3)
        .into_iter()
        .map(|t| t.node)
        .collect();
    assert_eq!(spread.len(), 3, "one task per node: {spread:?}");
    let on_node3 = |tasks: &[Value]| -> BTreeSet<String> {
        tasks
            .iter()
            .filter(|t| t["node"] == "node3")
            .map(|t| text(t, "id").to_owned())
            .collect()
    };
    let before = on_node3(&tasks(&lab, "keep"));

    let asked = Instant::now();
    lab.exec("node3", &["shoal", "swarm", "leave"]);
    // The managers know at once, not after node3's heartbeats time out.
    let nodes = lab.node_json("node1", &["node", "ls"]);
    let node3 = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["hostname"] == "node3")
        .expect("node3 listed");
    assert_eq!(node3["status"], "down", "{nodes}");

    // Back at 3/3 on the other nodes well within the reschedule grace of a Down node.
    wait_for(
        "3 running tasks of keep, none on node3",
        Duration::from_secs(10),
        || {
            let running: Vec<Value> = tasks(&lab, "keep")
                .into_iter()
                .filter(|t| t["desired"] == "running" && t["state"] == "running")
                .collect();
            (running.len() == 3 && running.iter().all(|t| t["node"] != "node3")).then_some(())
        },
    );
    eprintln!("3/3 again {:?} after swarm leave", asked.elapsed());
    assert_eq!(
        on_node3(&tasks(&lab, "keep")),
        before,
        "no task was placed on node3 after it said it leaves"
    );
    lab.down_clean();
}
