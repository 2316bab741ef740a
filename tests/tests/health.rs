//! Health checks in the lab: a task whose check starts failing leaves every node's routing
//! (published port, VIP, `tasks.NAME`) within one interval and a second, keeps the
//! connections it holds, and is replaced; a task in its start period takes no traffic until
//! its first passing check; a service none of whose tasks is healthy keeps routing to them
//! (fail open) and `lb ls` says so; TCP checks and timed-out commands say what they saw in
//! the probe log. Needs root.

use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;
use shoal_tests::{shoal_bin, wait_for, RunningTask, TestLab};

const NODES: [&str; 3] = ["node1", "node2", "node3"];
const NODE_ADDRESSES: [&str; 3] = ["192.168.77.11", "192.168.77.12", "192.168.77.13"];
const WHOAMI: [&str; 4] = ["shoal", "whoami", "--listen", "0.0.0.0:80"];
/// The check interval of the tests' services.
const INTERVAL: Duration = Duration::from_secs(1);

/// The `Hostname:` (task name) lines of `count` requests to `url`, from the client namespace
/// (requests that fail are left out).
fn hosts_from_client(lab: &TestLab, url: &str, count: usize) -> Vec<String> {
    let script = format!("for i in $(seq {count}); do curl -s --max-time 1 {url}; done");
    let out = lab.run(&["exec", "client", "--", "sh", "-c", &script]);
    hostnames(&String::from_utf8_lossy(&out.stdout))
}

/// The same from inside a task.
fn hosts_from_task(lab: &TestLab, task: &RunningTask, url: &str, count: usize) -> Vec<String> {
    let script = format!("for i in $(seq {count}); do curl -s --max-time 1 {url}; done");
    let out = lab.in_task(task, &["sh", "-c", &script]);
    hostnames(&String::from_utf8_lossy(&out.stdout))
}

fn hostnames(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("Hostname:"))
        .map(|h| h.trim().to_owned())
        .collect()
}

/// The health status of each running task of `service`, by task name.
fn health_of(lab: &TestLab, service: &str) -> Option<Vec<(String, String)>> {
    let tasks = lab.try_json("node1", &["service", "ps", service])?;
    Some(
        tasks
            .as_array()?
            .iter()
            .filter(|t| t["state"] == "running")
            .map(|t| {
                (
                    format!(
                        "{}.{}",
                        t["name"].as_str().unwrap_or(""),
                        t["id"].as_str().unwrap_or("")
                    ),
                    t["health"]["status"].as_str().unwrap_or("none").to_owned(),
                )
            })
            .collect(),
    )
}

fn wait_all_healthy(lab: &TestLab, service: &str, replicas: usize) {
    wait_for(
        &format!("{replicas} healthy tasks of {service}"),
        Duration::from_secs(40),
        || {
            let health = health_of(lab, service)?;
            (health.len() == replicas && health.iter().all(|(_, h)| h == "healthy")).then_some(())
        },
    );
}

/// The IPs a node routes new flows to: port 8080's mesh backends, and the backends of
/// `web`'s VIP on `front`.
fn routed(lab: &TestLab, node: &str) -> Option<(BTreeSet<String>, BTreeSet<String>)> {
    let mesh = lab.port_backends(node, 8080)?.into_iter().collect();
    let vips = lab.try_json(node, &["lb", "ls", "web"])?;
    let vip = ips(&vips.as_array()?.first()?["backends"]);
    Some((mesh, vip))
}

/// Addresses in a VIP's JSON list of backends.
fn ips(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b.as_str().map(str::to_owned))
        .collect()
}

/// What `tasks.web` resolves to for a task on `node` (no addresses when it has none).
fn tasks_web(lab: &TestLab, node: &str, asking: &str) -> Option<BTreeSet<String>> {
    let lookup = lab.try_json(node, &["dns", "lookup", "tasks.web", "--task", asking])?;
    Some(
        lookup["answer"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_owned))
            .collect(),
    )
}

/// `/tmp/NAME-<task id>`, the file a task's check or command looks for (tasks share the
/// node's /tmp), removed when the test ends.
struct TaskFile(std::path::PathBuf);

impl TaskFile {
    fn new(name: &str, task: &RunningTask) -> Self {
        let id = task.name.rsplit('.').next().expect("a task id");
        Self(format!("/tmp/{name}-{id}").into())
    }
}

impl Drop for TaskFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A task's probe log as `service ps` has it (for failure messages).
fn probes_of(lab: &TestLab, task: &str) -> String {
    let tasks = lab
        .try_json("node1", &["service", "ps", "web"])
        .unwrap_or_default();
    tasks
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| {
            format!(
                "{}.{}",
                t["name"].as_str().unwrap_or(""),
                t["id"].as_str().unwrap_or("")
            ) == task
        })
        .map(|t| t["health"].to_string())
        .unwrap_or_default()
}

fn unix_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
}

#[test]
fn an_unhealthy_task_leaves_every_nodes_routing_keeps_its_connections_and_is_replaced() {
    let lab = TestLab::up("health", 3);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.create_service(
        "web",
        &[
            "--replicas",
            "3",
            "--network",
            "front",
            "--publish",
            "8080:80",
            "--health-cmd",
            // Tasks share the node's /tmp: each looks for its own file.
            "test ! -e /tmp/sick-$SHOAL_TASK_ID",
            "--health-interval",
            "1s",
            "--health-timeout",
            "2s",
            "--health-retries",
            "1",
        ],
        &WHOAMI,
    );
    // One client task per node: each node's VIPs and DNS are programmed and can be asked.
    lab.create_service(
        "client",
        &["--mode", "global", "--network", "front"],
        &["sleep", "infinity"],
    );
    let web = lab.running_tasks("web", 3);
    let clients = lab.running_tasks("client", 3);
    wait_all_healthy(&lab, "web", 3);
    let table = lab.exec("node1", &["shoal", "service", "ps", "web"]);
    assert_eq!(table.matches("Running (healthy)").count(), 3, "{table}");
    for node in NODES {
        wait_for(
            &format!("3 backends on {node}"),
            Duration::from_secs(20),
            || {
                let (mesh, vip) = routed(&lab, node)?;
                (mesh.len() == 3 && vip.len() == 3).then_some(())
            },
        );
    }

    // A held connection through node1 (TCP echo, a line every 200 ms, for 30 s at most),
    // each answer stamped; the task it reaches is the one made sick.
    let held = Command::new(shoal_bin())
        .args([
            "lab", "--name", &lab.name, "exec", "client", "--", "bash", "-c",
        ])
        .arg(
            "exec 3<>/dev/tcp/192.168.77.11/8080 || exit 1
             for i in $(seq 150); do
               echo ping $i >&3
               read -t 2 line <&3 && [ \"$line\" = \"ping $i\" ] || { echo LOST $i; exit 1; }
               echo \"ok $(date +%s.%N)\"
               sleep 0.2
             done",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the held connection");
    let backend = wait_for(
        "node1 tracking the held connection",
        Duration::from_secs(10),
        || {
            let flows = lab.try_json("node1", &["conntrack", "ls"])?;
            flows
                .as_array()?
                .iter()
                .find(|f| {
                    f["published"]
                        .as_str()
                        .is_some_and(|p| p.ends_with(":8080"))
                })
                .and_then(|f| f["backend"].as_str())
                .map(|b| b.split(':').next().unwrap_or(b).to_owned())
        },
    );
    let sick = web
        .iter()
        .find(|t| t.addresses.get("ingress") == Some(&backend))
        .unwrap_or_else(|| panic!("no task of web behind {backend}: {web:?}"))
        .clone();
    let sick_front = sick.addresses["front"].clone();

    let sick_file = TaskFile::new("sick", &sick);
    lab.in_task(&sick, &["sh", "-c", "touch /tmp/sick-$SHOAL_TASK_ID"]);
    let sick_at = unix_secs();
    std::thread::sleep(INTERVAL + Duration::from_secs(1));
    let deadline = unix_secs();

    // No new request reaches it: through every node's published port, nor through the VIP
    // from a task on another node.
    for address in NODE_ADDRESSES {
        let hosts = hosts_from_client(&lab, &format!("http://{address}:8080/"), 6);
        assert_eq!(
            hosts.len(),
            6,
            "every request through {address} answered: {hosts:?}; node1's mesh: {}",
            String::from_utf8_lossy(
                &lab.run(&["exec", "node1", "--", "shoal", "ingress", "ls"])
                    .stdout
            )
        );
        assert!(
            !hosts.contains(&sick.name),
            "{address} sent a request to {} {:.3} s after its check started failing; its \
             probes: {}",
            sick.name,
            unix_secs() - sick_at,
            probes_of(&lab, &sick.name)
        );
    }
    let other_client = clients
        .iter()
        .find(|c| c.node != sick.node)
        .expect("a client on another node");
    let hosts = hosts_from_task(&lab, other_client, "http://web/", 6);
    assert_eq!(
        hosts.len(),
        6,
        "every request to the VIP answered: {hosts:?}"
    );
    assert!(
        !hosts.contains(&sick.name),
        "the VIP sent a request to {}",
        sick.name
    );
    // Nor does any node route to it or name it.
    for client in &clients {
        let (mesh, vip) = routed(&lab, &client.node).expect("routing");
        assert!(
            !mesh.contains(&backend) && !vip.contains(&sick_front),
            "{} still routes to {}: mesh {mesh:?}, VIP {vip:?}",
            client.node,
            sick.name
        );
        let names = tasks_web(&lab, &client.node, &client.name).expect("tasks.web");
        assert!(
            !names.contains(&sick_front) && names.len() >= 2,
            "tasks.web on {} still names {}: {names:?}",
            client.node,
            sick.name
        );
    }
    let ps = lab.exec("node1", &["shoal", "service", "ps", "web"]);
    assert!(
        ps.contains("(unhealthy)") || ps.contains("task: unhealthy container"),
        "{ps}"
    );

    // It is replaced: three healthy tasks again, the sick one Failed as Swarm says it.
    wait_for("the sick task replaced", Duration::from_secs(40), || {
        let health = health_of(&lab, "web")?;
        let replaced = !health.iter().any(|(name, _)| *name == sick.name);
        (replaced && health.len() == 3 && health.iter().all(|(_, h)| h == "healthy")).then_some(())
    });
    let tasks = lab
        .try_json("node1", &["service", "ps", "web"])
        .expect("ps");
    let failed = tasks
        .as_array()
        .expect("tasks")
        .iter()
        .find(|t| {
            format!(
                "{}.{}",
                t["name"].as_str().unwrap(),
                t["id"].as_str().unwrap()
            ) == sick.name
        })
        .expect("the sick task in the history");
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["error"], "task: unhealthy container");
    let log = failed["health"]["log"].as_array().expect("the probe log");
    let last = log.last().expect("a probe");
    assert_ne!(last["exit_code"], 0, "the last probe failed: {log:?}");
    assert!(last["end_ms"].as_u64() >= last["start_ms"].as_u64());

    // The held connection was answered after every node had stopped routing new flows to
    // its task: the withdrawal did not cut it (the task's stop later did).
    let out = held.wait_with_output().expect("the held connection");
    let text = String::from_utf8_lossy(&out.stdout);
    let answered_after: Vec<f64> = text
        .lines()
        .filter_map(|l| l.strip_prefix("ok ")?.trim().parse().ok())
        .filter(|at| *at > deadline)
        .collect();
    assert!(
        !answered_after.is_empty(),
        "the held connection was cut when its task left routing (sick at {sick_at}, \
         routing checked by {deadline}): {text}"
    );
    drop(sick_file);
}

#[test]
fn a_task_in_its_start_period_takes_no_traffic_until_healthy() {
    let lab = TestLab::up("healthstart", 2);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.create_service(
        "web",
        &[
            "--network",
            "front",
            "--publish",
            "8080:80",
            "--health-http",
            "/",
            "--health-interval",
            "1s",
            "--health-start-period",
            "60s",
        ],
        &[
            "sh",
            "-c",
            "while [ ! -e /tmp/ready-$SHOAL_TASK_ID ]; do sleep 0.2; done; \
             exec shoal whoami --listen 0.0.0.0:80",
        ],
    );
    lab.create_service(
        "client",
        &["--mode", "global", "--network", "front"],
        &["sleep", "infinity"],
    );
    let web = lab.running_tasks("web", 1).remove(0);
    let clients = lab.running_tasks("client", 2);
    // Failing probes in the start period leave it starting, and out of routing.
    wait_for("a few failed probes", Duration::from_secs(20), || {
        let tasks = lab.try_json("node1", &["service", "ps", "web"])?;
        let log = tasks.as_array()?.first()?["health"]["log"]
            .as_array()?
            .len();
        (log >= 3).then_some(())
    });
    let ps = lab.exec("node1", &["shoal", "service", "ps", "web"]);
    assert!(ps.contains("Running (health: starting)"), "{ps}");
    for address in &NODE_ADDRESSES[..2] {
        let hosts = hosts_from_client(&lab, &format!("http://{address}:8080/"), 3);
        assert!(
            hosts.is_empty(),
            "a starting task got traffic through {address}"
        );
    }
    for client in &clients {
        let names = tasks_web(&lab, &client.node, &client.name).expect("tasks.web");
        assert!(
            names.is_empty(),
            "tasks.web names a starting task: {names:?}"
        );
    }

    // Ready: the first passing probe ends the start period and routing follows everywhere.
    let _ready_file = TaskFile::new("ready", &web);
    lab.in_task(&web, &["sh", "-c", "touch /tmp/ready-$SHOAL_TASK_ID"]);
    wait_all_healthy(&lab, "web", 1);
    for address in &NODE_ADDRESSES[..2] {
        let url = format!("http://{address}:8080/");
        let hosts = wait_for(
            &format!("traffic through {address}"),
            Duration::from_secs(10),
            || {
                let hosts = hosts_from_client(&lab, &url, 3);
                (hosts.len() == 3).then_some(hosts)
            },
        );
        assert!(hosts.iter().all(|h| *h == web.name), "{hosts:?}");
    }
    let hosts = hosts_from_task(&lab, &clients[0], "http://web/", 3);
    assert_eq!(hosts.len(), 3, "the VIP answers once healthy: {hosts:?}");
}

#[test]
fn a_service_with_no_healthy_task_keeps_routing_to_its_unhealthy_ones() {
    let lab = TestLab::up("healthopen", 2);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.create_service(
        "web",
        &[
            "--replicas",
            "2",
            "--network",
            "front",
            "--publish",
            "8080:80",
            "--health-cmd",
            "test ! -e /tmp/down-$SHOAL_TASK_ID",
            "--health-interval",
            "1s",
            "--health-retries",
            "1",
        ],
        &WHOAMI,
    );
    lab.create_service(
        "client",
        &["--mode", "global", "--network", "front"],
        &["sleep", "infinity"],
    );
    let web = lab.running_tasks("web", 2);
    lab.running_tasks("client", 2);
    wait_all_healthy(&lab, "web", 2);
    wait_for("2 backends on node1", Duration::from_secs(20), || {
        let (mesh, vip) = routed(&lab, "node1")?;
        (mesh.len() == 2 && vip.len() == 2).then_some(())
    });
    // Both fail at once (a shared dependency down): they stay in routing, and say so, until
    // they are stopped.
    let files: Vec<TaskFile> = web.iter().map(|t| TaskFile::new("down", t)).collect();
    for file in &files {
        std::fs::write(&file.0, b"").expect("the down file");
    }
    wait_for("node1 failing open", Duration::from_secs(5), || {
        let vips = lab.try_json("node1", &["lb", "ls", "web"])?;
        let vip = vips.as_array()?.first()?.clone();
        (vip["fail_open"] == true && ips(&vip["backends"]).len() == 2).then_some(())
    });
    let hosts = hosts_from_client(&lab, "http://192.168.77.12:8080/", 2);
    assert_eq!(hosts.len(), 2, "requests still answered: {hosts:?}");
    let table = lab.exec("node1", &["shoal", "lb", "ls", "web"]);
    assert!(table.contains("fail open"), "{table}");
}

/// The probe outputs of every task `service` had (running or ended), newest task last.
fn probe_outputs(lab: &TestLab, service: &str) -> Option<Vec<String>> {
    let tasks = lab.try_json("node1", &["service", "ps", service])?;
    Some(
        tasks
            .as_array()?
            .iter()
            .flat_map(|t| t["health"]["log"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p["output"].as_str().map(str::to_owned))
            .collect(),
    )
}

#[test]
fn tcp_checks_and_timed_out_commands_say_why_in_the_probe_log() {
    let lab = TestLab::up("healthwhy", 1);
    let quick = ["--health-interval", "1s", "--health-retries", "1"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> { [&quick[..], extra].concat() };
    // The target port of the published port, probed from inside the task's namespace.
    lab.create_service(
        "open",
        &with(&["--publish", "8080:80", "--health-tcp"]),
        &WHOAMI,
    );
    // A port nothing listens on.
    lab.create_service(
        "closed",
        &with(&["--health-tcp", "--health-port", "81"]),
        &WHOAMI,
    );
    // A command that outlives its timeout.
    lab.create_service(
        "slow",
        &with(&["--health-cmd", "sleep 10", "--health-timeout", "500ms"]),
        &WHOAMI,
    );
    wait_all_healthy(&lab, "open", 1);
    let outputs = probe_outputs(&lab, "open").expect("open's tasks");
    assert!(
        outputs.iter().all(|o| o == "connected to port 80"),
        "{outputs:?}"
    );
    for (service, why) in [
        ("closed", "connecting to port 81"),
        ("slow", "Health check exceeded timeout (500ms)"),
    ] {
        let outputs = wait_for(
            &format!("{service}'s failing probe"),
            Duration::from_secs(20),
            || {
                let outputs = probe_outputs(&lab, service)?;
                (!outputs.is_empty()).then_some(outputs)
            },
        );
        assert!(outputs.iter().all(|o| o.starts_with(why)), "{outputs:?}");
        wait_for(
            &format!("{service}'s task to fail unhealthy"),
            Duration::from_secs(30),
            || {
                let tasks = lab.try_json("node1", &["service", "ps", service])?;
                tasks
                    .as_array()?
                    .iter()
                    .any(|t| t["state"] == "failed" && t["error"] == "task: unhealthy container")
                    .then_some(())
            },
        );
    }
    lab.down_clean();
}
