//! What happens when a task ends and when a spec changes: the restart policy (`none` leaves a
//! killed task dead, `on-failure` restarts exit 3 but not exit 0, `max-attempts` stops), an
//! update that fails pauses or rolls back (with every request through the published port
//! served), `service rollback` restores the previous spec, a start-first update of a
//! single replica refuses no request, and with health checks a rollout waits for health
//! and rolls back an update whose tasks never turn healthy. Needs root.

use std::{
    collections::BTreeSet,
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;
use shoal_tests::{shoal_bin, wait_for, TestLab};

/// Serves on :80 unless MODE=bad, when it exits 3 at once: an update to MODE=bad fails.
const WEB: [&str; 3] = [
    "sh",
    "-c",
    "[ \"$MODE\" = bad ] && exit 3; exec shoal whoami --listen 0.0.0.0:80",
];

/// Requests through every node's :8080 from the client, one at a time (2 s at most each, as
/// the mesh test), for `$1` seconds and 20000 requests at most; prints each failure, then
/// `requests=N failed=F`.
const REQUEST_LOOP: &str = r#"
end=$(( ${EPOCHREALTIME/./} + $1 * 1000000 )); n=0; failed=0
while [ ${EPOCHREALTIME/./} -lt $end ] && [ $n -lt 20000 ]; do
  for ip in $NODES; do
    code=$(curl -s -o /dev/null --max-time 2 -w '%{http_code}' http://$ip:8080/)
    [ "$code" = 200 ] || { failed=$((failed + 1)); echo "failed: $ip answered '$code'"; }
    n=$((n + 1))
  done
done
echo "requests=$n failed=$failed"
"#;

/// The request loop, started in the background for `seconds` through the given nodes.
fn load(lab: &TestLab, nodes: &str, seconds: u32) -> Child {
    Command::new(shoal_bin())
        .args(["lab", "--name", &lab.name, "exec", "client", "--"])
        .args(["env", &format!("NODES={nodes}"), "bash", "-c", REQUEST_LOOP])
        .args(["loop", &seconds.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning the request loop")
}

/// Waits for the request loop and asserts it ran and every request was served.
fn assert_all_served(load: Child, what: &str) {
    let out = load.wait_with_output().expect("the request loop");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find_map(|l| l.strip_prefix("requests="))
        .unwrap_or_else(|| panic!("no summary from the request loop: {text}"));
    let (sent, failed) = summary.split_once(" failed=").expect("summary");
    let (sent, failed): (usize, usize) = (sent.parse().unwrap(), failed.parse().unwrap());
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("failed:")).collect();
    assert!(sent > 50, "the request loop ran: {sent} requests");
    assert_eq!(
        failed, 0,
        "{what}: {failed} of {sent} requests failed: {lines:#?}"
    );
    eprintln!("{what}: {sent} requests, none failed");
}

/// `service ps` on node1, history included.
fn tasks(lab: &TestLab, service: &str) -> Vec<Value> {
    lab.node_json("node1", &["service", "ps", service])
        .as_array()
        .expect("tasks")
        .clone()
}

fn inspect(lab: &TestLab, service: &str) -> Value {
    lab.node_json("node1", &["service", "inspect", service])
}

/// IDs of the tasks running and meant to.
fn running_ids(lab: &TestLab, service: &str) -> BTreeSet<String> {
    tasks(lab, service)
        .iter()
        .filter(|t| t["desired"] == "running" && t["state"] == "running")
        .map(|t| t["id"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// `shoal service ARGS...` on node1, which may fail (a paused or rolled-back update does).
fn service(lab: &TestLab, args: &[&str]) -> Output {
    let mut all = vec!["exec", "node1", "--", "shoal", "service"];
    all.extend_from_slice(args);
    lab.run(&all)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait_update_state(lab: &TestLab, service: &str, state: &str) -> Value {
    wait_for(
        &format!("{service}'s update status {state}"),
        Duration::from_secs(60),
        || {
            let view = inspect(lab, service);
            (view["update_status"]["state"] == state).then_some(view)
        },
    )
}

/// `service update --update-failure-action pause CHANGE web`, once every node routes to
/// `replicas` backends: the command fails and the service says its update paused on a
/// task's failure. Returns the command's output and the service.
fn update_that_pauses(
    lab: &TestLab,
    nodes: &[&str],
    replicas: usize,
    change: &[&str],
) -> (String, Value) {
    lab.wait_port_backends(nodes, 8080, replicas);
    let mut args = vec!["update", "--update-failure-action", "pause"];
    args.extend_from_slice(change);
    args.push("web");
    let update = service(lab, &args);
    let out = text(&update);
    assert!(!update.status.success(), "a paused update fails: {out}");
    let view = wait_update_state(lab, "web", "paused");
    let message = view["update_status"]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.starts_with("update paused due to failure or early termination of task"),
        "{view}"
    );
    (out, view)
}

#[test]
fn restart_policy_none_on_failure_and_max_attempts() {
    let lab = TestLab::up("lu-restart", 1);
    let quick = ["--restart-delay", "1s"];

    // none: a killed task stays dead.
    lab.create_service(
        "dead",
        &[&quick[..], &["--restart-condition", "none"]].concat(),
        &["sleep", "100000"],
    );
    let victim = lab.running_tasks("dead", 1).remove(0);
    // Retried: a task reported running may not have exec'd its command yet.
    wait_for("sleep killed in the task", Duration::from_secs(10), || {
        let killed = lab.in_task(&victim, &["pkill", "-9", "-x", "sleep"]);
        // 137: the task ended as pkill killed its command, taking pkill (in its cgroup) along.
        (killed.status.success() || killed.status.code() == Some(137)).then_some(())
    });
    // on-failure: exit 3 is restarted, twice at most; exit 0 is not.
    let on_failure = [&quick[..], &["--restart-condition", "on-failure"]].concat();
    lab.create_service(
        "crash",
        &[&on_failure[..], &["--restart-max-attempts", "2"]].concat(),
        &["sh", "-c", "sleep 1; exit 3"],
    );
    lab.create_service("once", &on_failure, &["sh", "-c", "sleep 1; exit 0"]);

    let crashes = wait_for("3 failed tasks of crash", Duration::from_secs(40), || {
        let all = tasks(&lab, "crash");
        (all.len() == 3 && all.iter().all(|t| t["state"] == "failed")).then_some(all)
    });
    assert!(
        crashes
            .iter()
            .all(|t| t["error"] == "task: non-zero exit (3)"),
        "{crashes:#?}"
    );
    // Well past the delay, nothing more was started.
    std::thread::sleep(Duration::from_secs(5));
    let crashes = tasks(&lab, "crash");
    assert_eq!(crashes.len(), 3, "two restarts, then none: {crashes:#?}");
    assert!(
        crashes[0]["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("not restarted"),
        "the last one says why: {crashes:#?}"
    );
    let dead = tasks(&lab, "dead");
    assert_eq!(dead.len(), 1, "the killed task was not replaced: {dead:#?}");
    assert_eq!(dead[0]["state"], "failed", "{dead:#?}");
    assert_eq!(dead[0]["desired"], "shutdown", "{dead:#?}");
    let once = tasks(&lab, "once");
    assert_eq!(once.len(), 1, "exit 0 was not restarted: {once:#?}");
    assert_eq!(once[0]["state"], "complete", "{once:#?}");

    // service ls counts running tasks over replicas, as Swarm: 0/1 for each.
    let services = lab.node_json("node1", &["service", "ls"]);
    for service in services.as_array().expect("services") {
        assert_eq!(
            (service["running"].as_u64(), service["desired"].as_u64()),
            (Some(0), Some(1)),
            "{service}"
        );
    }
    lab.down_clean();
}

#[test]
fn failed_updates_pause_or_roll_back_and_service_rollback_restores() {
    let lab = TestLab::up("lu-rollback", 3);
    lab.create_service(
        "web",
        &[
            "--replicas",
            "3",
            "--publish",
            "8080:80",
            "--update-monitor",
            "3s",
        ],
        &WEB,
    );
    lab.running_tasks("web", 3);
    let nodes = ["node1", "node2", "node3"];
    lab.wait_port_backends(&nodes, 8080, 3);
    let all_nodes = "192.168.77.11 192.168.77.12 192.168.77.13";
    let original = running_ids(&lab, "web");

    // A good update, then `service rollback`: the previous spec again.
    let good = service(&lab, &["update", "--env-add", "V=2", "web"]);
    assert!(good.status.success(), "{}", text(&good));
    assert!(
        text(&good).contains("verify: Service converged"),
        "{}",
        text(&good)
    );
    assert_eq!(inspect(&lab, "web")["update_status"]["state"], "completed");
    let back = service(&lab, &["rollback", "web"]);
    assert!(back.status.success(), "{}", text(&back));
    let out = text(&back);
    assert!(
        out.contains("rollback: manually requested rollback"),
        "{out}"
    );
    assert!(out.contains("rollback: rollback completed"), "{out}");
    let view = wait_update_state(&lab, "web", "rollback_completed");
    assert!(
        !view["env"]
            .as_array()
            .unwrap()
            .contains(&Value::from("V=2")),
        "the env before the update: {view}"
    );
    lab.wait_port_backends(&nodes, 8080, 3);
    let before = running_ids(&lab, "web");
    assert!(before.is_disjoint(&original), "new tasks of the old spec");

    // An update whose tasks exit at once, with rollback: back to the previous spec and the
    // tasks that still ran it, every request served meanwhile.
    let requests = load(&lab, all_nodes, 25);
    std::thread::sleep(Duration::from_secs(1));
    let failed = service(
        &lab,
        &[
            "update",
            "--update-failure-action",
            "rollback",
            "--env-add",
            "MODE=bad",
            "web",
        ],
    );
    let out = text(&failed);
    assert!(
        !failed.status.success(),
        "an update that rolled back fails: {out}"
    );
    assert!(
        out.contains("rollback: update rolled back due to failure or early termination of task"),
        "{out}"
    );
    assert!(
        out.contains("task: non-zero exit (3)"),
        "the reason shown: {out}"
    );
    let view = wait_update_state(&lab, "web", "rollback_completed");
    assert!(
        !view["env"]
            .as_array()
            .unwrap()
            .contains(&Value::from("MODE=bad")),
        "the previous spec: {view}"
    );
    let after = lab.running_tasks("web", 3);
    let kept = after
        .iter()
        .filter(|t| before.iter().any(|id| t.name.ends_with(id)))
        .count();
    assert_eq!(kept, 2, "the two tasks never replaced still run: {after:?}");
    assert_all_served(requests, "an update rolled back");

    // The same update with pause: it stops after the first batch and says why; the two
    // other tasks keep the previous spec.
    let (out, view) = update_that_pauses(&lab, &nodes, 3, &["--env-add", "MODE=bad"]);
    assert!(
        out.contains("update paused due to failure or early termination of task"),
        "{out}"
    );
    let pretty = lab.exec("node1", &["shoal", "service", "inspect", "--pretty", "web"]);
    assert!(pretty.contains(" State:         paused"), "{pretty}");
    std::thread::sleep(Duration::from_secs(4));
    let version = view["version"].as_u64().unwrap();
    let old: Vec<Value> = tasks(&lab, "web")
        .into_iter()
        .filter(|t| t["desired"] == "running" && t["state"] == "running")
        .filter(|t| t["service_version"].as_u64() < Some(version))
        .collect();
    assert_eq!(old.len(), 2, "the update went no further: {old:#?}");

    // An update while paused resumes with the new spec.
    let resumed = service(&lab, &["update", "--env-add", "MODE=good", "web"]);
    assert!(resumed.status.success(), "{}", text(&resumed));
    assert_eq!(inspect(&lab, "web")["update_status"]["state"], "completed");
    lab.running_tasks("web", 3);
    lab.down_clean();
}

#[test]
fn start_first_updates_a_single_replica_without_a_refused_request() {
    let lab = TestLab::up("lu-startfirst", 2);
    lab.create_service(
        "web",
        &["--publish", "8080:80", "--update-order", "start-first"],
        &WEB,
    );
    let first = lab.running_tasks("web", 1);
    lab.wait_port_backends(&["node1", "node2"], 8080, 1);

    let requests = load(&lab, "192.168.77.11 192.168.77.12", 15);
    std::thread::sleep(Duration::from_secs(2));
    let update = service(&lab, &["update", "--env-add", "V=2", "web"]);
    assert!(update.status.success(), "{}", text(&update));
    assert_all_served(requests, "a start-first update of one replica");
    let now = lab.running_tasks("web", 1);
    assert_ne!(now[0].name, first[0].name, "the task was replaced");
    lab.down_clean();
}

#[test]
fn health_checks_gate_start_first_and_roll_back_a_never_healthy_update() {
    let lab = TestLab::up("lu-health", 2);
    let nodes = ["node1", "node2"];
    lab.create_service(
        "web",
        &[
            "--publish",
            "8080:80",
            "--update-order",
            "start-first",
            "--health-http",
            "/",
            "--health-interval",
            "1s",
            "--health-retries",
            "2",
            "--update-failure-action",
            "rollback",
            "--update-monitor",
            "30s",
        ],
        &WEB,
    );
    let first = lab.running_tasks("web", 1);
    lab.wait_port_backends(&nodes, 8080, 1);

    // The old task leaves only once the new one is healthy (its first probe passed).
    let requests = load(&lab, "192.168.77.11 192.168.77.12", 12);
    std::thread::sleep(Duration::from_secs(2));
    let update = service(&lab, &["update", "--env-add", "V=2", "web"]);
    let out = text(&update);
    assert!(update.status.success(), "{out}");
    assert!(out.contains("1/1: running (healthy)"), "{out}");
    assert_all_served(requests, "a start-first update with a health check");
    let now = lab.running_tasks("web", 1);
    assert_ne!(now[0].name, first[0].name, "the task was replaced");

    // A check no task passes: the new task never takes traffic, turns unhealthy, fails,
    // and the update rolls back to the HTTP check.
    lab.wait_port_backends(&nodes, 8080, 1);
    let requests = load(&lab, "192.168.77.11 192.168.77.12", 20);
    std::thread::sleep(Duration::from_secs(2));
    let update = service(
        &lab,
        &["update", "--health-cmd", "test -e /nonexistent", "web"],
    );
    let out = text(&update);
    assert!(
        !update.status.success(),
        "a rolled-back update fails: {out}"
    );
    let view = wait_update_state(&lab, "web", "rollback_completed");
    assert_eq!(view["healthcheck"]["test"]["http"]["path"], "/", "{view}");
    assert_all_served(requests, "a never-healthy update rolled back");
    lab.running_tasks("web", 1);

    // Three replicas, stop-first: each new task takes traffic only once healthy.
    lab.exec("node1", &["shoal", "service", "scale", "web=3"]);
    lab.running_tasks("web", 3);
    lab.wait_port_backends(&nodes, 8080, 3);
    let requests = load(&lab, "192.168.77.11 192.168.77.12", 20);
    std::thread::sleep(Duration::from_secs(2));
    let update = service(
        &lab,
        &[
            "update",
            "--update-order",
            "stop-first",
            "--env-add",
            "V=3",
            "web",
        ],
    );
    assert!(update.status.success(), "{}", text(&update));
    assert_all_served(
        requests,
        "a rolling update of 3 replicas with a health check",
    );

    // The never-healthy check again, with pause: the update stops after the first batch.
    update_that_pauses(&lab, &nodes, 3, &["--health-cmd", "test -e /nonexistent"]);
    lab.down_clean();
}
