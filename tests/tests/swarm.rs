//! The Swarm walkthroughs in the lab: init and join, services that scale, heal and drain,
//! managers that survive losing their leader, and tokens that protect the cluster.
//! Needs root.

use std::{
    collections::BTreeMap,
    fs,
    time::{Duration, Instant},
};

use serde_json::Value;
use shoal_tests::{wait_for, TestLab};

/// Running tasks of a service per node hostname.
fn running_per_node(lab: &TestLab, service: &str) -> BTreeMap<String, usize> {
    let tasks = lab.node_json("node1", &["service", "ps", service]);
    let mut per = BTreeMap::new();
    for task in tasks.as_array().unwrap() {
        if task["desired"] == "running" && task["state"] == "running" {
            *per.entry(task["node"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    per
}

/// Task process IDs (every process in every task cgroup) of one node of the lab.
fn task_pids(lab: &TestLab, node: &str) -> Vec<u32> {
    let dir = shoal_tests::cgroup2_mount().join(format!("shoal-{}/{node}/tasks", lab.name));
    let mut pids = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().unwrap().is_dir() {
            let procs = fs::read_to_string(entry.path().join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.parse::<u32>().ok()));
        }
    }
    pids
}

#[test]
fn walkthrough_scale_heal_drain_and_remove() {
    let lab = TestLab::up("sw-walk", 3);

    // node ls: one leader, two ready and active workers, this node starred.
    let nodes = lab.node_json("node1", &["node", "ls"]);
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    let leaders: Vec<&Value> = nodes
        .iter()
        .filter(|n| n["manager_status"] == "Leader")
        .collect();
    assert_eq!(leaders.len(), 1);
    assert_eq!(leaders[0]["hostname"], "node1");
    for node in nodes.iter().filter(|n| n["hostname"] != "node1") {
        assert_eq!(
            (node["status"].as_str(), node["availability"].as_str()),
            (Some("ready"), Some("active"))
        );
        assert_eq!(node["role"], "worker");
    }
    let table = lab.exec("node1", &["shoal", "node", "ls"]);
    assert!(
        table.starts_with("ID   ") && table.contains("MANAGER STATUS"),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(" * ") && l.contains("node1")),
        "{table}"
    );

    // A worker refuses manager commands and says how to fix it.
    let out = lab.run(&["exec", "node2", "--", "shoal", "node", "ls"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("this node is not a swarm manager"));

    // Malformed specs are refused before anything is made.
    for (args, message) in [
        (
            &["--name", "bad/name", "--", "true"][..],
            "invalid service name",
        ),
        (
            &["--name", "c", "--constraint", "node.foo==x", "--", "true"],
            "unknown key \"node.foo\"",
        ),
        (
            &["--name", "e", "--env", "NOVALUE", "--", "true"],
            "is not KEY=VALUE",
        ),
    ] {
        let mut full = vec!["exec", "node1", "--", "shoal", "service", "create"];
        full.extend_from_slice(args);
        let out = lab.run(&full);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(message),
            "{args:?}: {out:?}"
        );
    }

    let created = lab.exec(
        "node1",
        &[
            "shoal",
            "service",
            "create",
            "--name",
            "web",
            "--replicas",
            "1",
            "--",
            "shoal",
            "whoami",
            "--listen",
            "0.0.0.0:8080",
        ],
    );
    assert!(created.contains("verify: Service converged"), "{created}");
    let scaled = lab.exec("node1", &["shoal", "service", "scale", "web=5"]);
    assert!(
        scaled.contains("overall progress: 5 out of 5 tasks"),
        "{scaled}"
    );
    let mut spread: Vec<usize> = running_per_node(&lab, "web").into_values().collect();
    spread.sort();
    assert_eq!(spread, [1, 2, 2], "fewest tasks of the service first");

    // service logs gathers every task's output from the node that ran it.
    let logs = wait_for(
        "five whoami greetings in the logs",
        Duration::from_secs(10),
        || {
            let logs = lab.exec("node1", &["shoal", "service", "logs", "web"]);
            (logs.matches("whoami listening on 0.0.0.0:8080").count() == 5).then_some(logs)
        },
    );
    for node in ["@node1 ", "@node2 ", "@node3 "] {
        assert!(logs.contains(node), "a line from {node}: {logs}");
    }
    assert!(logs.lines().all(|l| l.starts_with("web.")), "{logs}");

    // A task is a process tree in its own namespaces: hostname is its name.
    let tasks = lab.node_json("node1", &["node", "ps", "node1"]);
    let mine = tasks
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["desired"] == "running")
        .expect("a task on node1")
        .clone();
    let full_name = format!(
        "{}.{}",
        mine["name"].as_str().unwrap(),
        mine["id"].as_str().unwrap()
    );
    let hostname = lab.exec(
        "node1",
        &["shoal", "task", "exec", &full_name, "--", "hostname"],
    );
    assert_eq!(hostname.trim(), full_name);
    let resolv = lab.exec(
        "node1",
        &[
            "shoal",
            "task",
            "exec",
            &full_name,
            "--",
            "cat",
            "/etc/resolv.conf",
        ],
    );
    assert!(resolv.contains("nameserver 127.0.0.11"), "{resolv}");

    // Kill a task's process: it comes back, with the dead one kept as history.
    let victim = *task_pids(&lab, "node1").last().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_for(
        "the killed task to be replaced",
        Duration::from_secs(20),
        || {
            let tasks = lab.node_json("node1", &["service", "ps", "web"]);
            let tasks = tasks.as_array().unwrap();
            let failed = tasks
                .iter()
                .any(|t| t["state"] == "failed" && t["error"] == "task: non-zero exit (137)");
            let running = tasks
                .iter()
                .filter(|t| t["desired"] == "running" && t["state"] == "running")
                .count();
            (failed && running == 5).then_some(())
        },
    );
    let ps = lab.exec("node1", &["shoal", "service", "ps", "web"]);
    assert!(ps.contains(" \\_ web."), "history row shown: {ps}");

    // A rolling update replaces every task with the new spec, one at a time.
    let updated = lab.exec(
        "node1",
        &[
            "shoal",
            "service",
            "update",
            "--env-add",
            "COLOR=blue",
            "web",
        ],
    );
    assert!(updated.contains("verify: Service converged"), "{updated}");
    let tasks = lab.node_json("node1", &["service", "ps", "web"]);
    let live: Vec<&Value> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["desired"] == "running")
        .collect();
    assert_eq!(live.len(), 5);
    let inspect = lab.node_json("node1", &["service", "ls"]);
    assert_eq!(inspect[0]["version"], 2);
    assert_eq!(inspect[0]["env"], serde_json::json!(["COLOR=blue"]));
    let task = live
        .iter()
        .find(|t| t["node"] == "node1")
        .expect("a task on node1");
    let name = format!(
        "{}.{}",
        task["name"].as_str().unwrap(),
        task["id"].as_str().unwrap()
    );
    let env = lab.exec(
        "node1",
        &[
            "shoal",
            "task",
            "exec",
            &name,
            "--",
            "sh",
            "-c",
            "echo $COLOR",
        ],
    );
    assert_eq!(env.trim(), "blue", "the new task runs the new spec");

    // Drain node2: its tasks move and it runs none.
    lab.exec(
        "node1",
        &[
            "shoal",
            "node",
            "update",
            "--availability",
            "drain",
            "node2",
        ],
    );
    wait_for("node2 to run nothing", Duration::from_secs(30), || {
        let per = running_per_node(&lab, "web");
        (!per.contains_key("node2")
            && per.values().sum::<usize>() == 5
            && task_pids(&lab, "node2").is_empty())
        .then_some(())
    });

    lab.exec("node1", &["shoal", "service", "scale", "web=3"]);
    assert_eq!(running_per_node(&lab, "web").values().sum::<usize>(), 3);
    let ls = lab.node_json("node1", &["service", "ls"]);
    assert_eq!(
        (ls[0]["running"].as_u64(), ls[0]["desired"].as_u64()),
        (Some(3), Some(3))
    );

    lab.exec("node1", &["shoal", "service", "rm", "web"]);
    wait_for(
        "no task process on any node",
        Duration::from_secs(20),
        || {
            ["node1", "node2", "node3"]
                .iter()
                .all(|n| task_pids(&lab, n).is_empty())
                .then_some(())
        },
    );
    assert_eq!(
        lab.node_json("node1", &["service", "ls"]),
        serde_json::json!([])
    );
    lab.down_clean();
}

#[test]
fn three_managers_survive_losing_the_leader() {
    let lab = TestLab::named("sw-raft");
    shoal_tests::require_root();
    lab.run(&["down"]);
    lab.ok(&["up", "--nodes", "3", "--managers", "3"]);
    let statuses = |node: &str| -> Option<BTreeMap<String, String>> {
        let nodes = lab.try_json(node, &["node", "ls"])?;
        Some(
            nodes
                .as_array()?
                .iter()
                .map(|n| {
                    (
                        n["hostname"].as_str().unwrap().to_owned(),
                        n["manager_status"].as_str().unwrap().to_owned(),
                    )
                })
                .collect(),
        )
    };
    wait_for("three voting managers", Duration::from_secs(20), || {
        let s = statuses("node1")?;
        (s.values().filter(|v| *v == "Leader").count() == 1
            && s.values().filter(|v| *v == "Reachable").count() == 2)
            .then_some(())
    });
    lab.exec(
        "node1",
        &[
            "shoal",
            "service",
            "create",
            "--name",
            "keep",
            "--replicas",
            "3",
            "--",
            "sleep",
            "100000",
        ],
    );

    // Without a certificate, nobody gets past join: not at the leader, not via a follower,
    // not by claiming to be a forwarded request.
    for node in ["192.168.77.11", "192.168.77.12", "192.168.77.13"] {
        for body in [
            r#"{"origin":null,"request":{"Control":"NodeList"}}"#,
            r#"{"forwarded":true,"origin":"x","request":{"Control":{"JoinToken":{"role":"manager","rotate":false}}}}"#,
            r#"{"origin":null,"request":{"Heartbeat":{"reports":[]}}}"#,
        ] {
            let url = format!("https://{node}:2377/cluster");
            let out = lab.exec(
                "client",
                &[
                    "curl",
                    "-sk",
                    "-X",
                    "POST",
                    "-H",
                    "Content-Type: application/json",
                    "-d",
                    body,
                    &url,
                ],
            );
            assert!(
                out.contains("needs a cluster member's certificate")
                    || out.contains("only managers may forward"),
                "{node} {body}: {out}"
            );
        }
    }

    // kill -9 the leader's agent: a new leader answers within 10 s, nothing lost.
    let killed = Instant::now();
    lab.ok(&["stop", "node1", "--kill"]);
    let new_leader = wait_for("a new leader", Duration::from_secs(10), || {
        let s = statuses("node2")?;
        s.iter()
            .find(|(_, v)| *v == "Leader")
            .map(|(k, _)| k.clone())
    });
    assert_ne!(new_leader, "node1");
    eprintln!("new leader {new_leader} after {:?}", killed.elapsed());
    let services = lab.node_json("node2", &["service", "ls"]);
    assert_eq!(
        services[0]["name"], "keep",
        "the service survived: {services}"
    );

    // The old leader comes back as a reachable follower.
    lab.ok(&["start", "node1"]);
    wait_for("node1 reachable again", Duration::from_secs(20), || {
        let s = statuses("node2")?;
        (s.get("node1").map(String::as_str) == Some("Reachable")).then_some(())
    });

    // Lose the quorum: commands fail fast and clearly, tasks keep running.
    let before = ["node1", "node2", "node3"]
        .iter()
        .map(|n| task_pids(&lab, n).len())
        .sum::<usize>();
    assert!(before > 0);
    let survivor = if new_leader == "node3" {
        "node2"
    } else {
        "node3"
    };
    for node in ["node1", "node2", "node3"]
        .iter()
        .filter(|n| **n != survivor)
    {
        lab.ok(&["stop", node, "--kill"]);
    }
    let asked = Instant::now();
    let out = lab.run(&[
        "exec", survivor, "--", "shoal", "service", "scale", "keep=4", "--detach",
    ]);
    assert!(!out.status.success());
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "fails fast, took {:?}",
        asked.elapsed()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not have a leader"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = ["node1", "node2", "node3"]
        .iter()
        .map(|n| task_pids(&lab, n).len())
        .sum::<usize>();
    assert_eq!(before, after, "tasks keep running without a quorum");
    lab.down_clean();
}

#[test]
fn join_tokens_protect_the_swarm() {
    let lab = TestLab::up("sw-trust", 3);
    let token = |role: &str| {
        lab.exec("node1", &["shoal", "swarm", "join-token", "-q", role])
            .trim()
            .to_owned()
    };
    let (worker, manager) = (token("worker"), token("manager"));
    assert!(worker.starts_with("SWMTKN-1-") && manager.starts_with("SWMTKN-1-"));
    assert_ne!(worker, manager);
    assert_eq!(
        worker[..59],
        manager[..59],
        "same CA digest, different secrets"
    );

    // node3 leaves, then tries to come back with bad tokens.
    lab.exec("node3", &["shoal", "swarm", "leave"]);
    let join = |token: &str| {
        lab.run(&[
            "exec",
            "node3",
            "--",
            "shoal",
            "swarm",
            "join",
            "--token",
            token,
            "192.168.77.11:2377",
        ])
    };
    let refused = |token: &str, message: &str| {
        let out = join(token);
        assert!(!out.status.success(), "{token} must be refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{token}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    };
    refused("SWMTKN-1-nonsense", "invalid join token");
    let wrong_ca = format!("SWMTKN-1-{}{}", "0".repeat(50), &worker[59..]);
    refused(&wrong_ca, "does not match the join token");
    let wrong_secret = format!("{}{}", &worker[..60], "0".repeat(25));
    refused(&wrong_secret, "invalid join token");

    // Rotation: the old worker token stops working at once.
    lab.exec(
        "node1",
        &["shoal", "swarm", "join-token", "--rotate", "worker"],
    );
    refused(&worker, "invalid join token");
    let fresh = token("worker");
    assert_ne!(fresh, worker);

    // The worker token makes a worker, never a manager.
    let joined = join(&fresh);
    assert!(joined.status.success(), "{joined:?}");
    assert!(String::from_utf8_lossy(&joined.stdout).contains("as a worker"));
    let out = lab.run(&["exec", "node3", "--", "shoal", "node", "ls"]);
    assert!(!out.status.success(), "a worker cannot act as a manager");

    // Leaving leaves a Down node behind on the managers; `node rm` cleans it up.
    wait_for("the old node3 to be down", Duration::from_secs(20), || {
        let nodes = lab.node_json("node1", &["node", "ls"]);
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["hostname"] == "node3" && n["status"] == "down")
            .map(|n| n["id"].as_str().unwrap().to_owned())
    });
    let nodes = lab.node_json("node1", &["node", "ls"]);
    let old = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["hostname"] == "node3" && n["status"] == "down")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    lab.exec("node1", &["shoal", "node", "rm", &old]);
    let out = lab.run(&["exec", "node1", "--", "shoal", "node", "rm", "node2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not down and can't be removed"));
    lab.down_clean();
}

#[test]
fn force_new_cluster_recovers_from_a_lost_quorum() {
    let lab = TestLab::named("sw-force");
    shoal_tests::require_root();
    lab.run(&["down"]);
    lab.ok(&["up", "--nodes", "3", "--managers", "3"]);
    lab.exec(
        "node1",
        &[
            "shoal",
            "service",
            "create",
            "--name",
            "keep",
            "--replicas",
            "2",
            "--",
            "sleep",
            "100000",
        ],
    );
    lab.ok(&["stop", "node2", "--kill"]);
    lab.ok(&["stop", "node3", "--kill"]);
    let lost = lab.run(&[
        "exec", "node1", "--", "shoal", "service", "scale", "keep=3", "--detach",
    ]);
    assert!(!lost.status.success(), "no quorum, no writes");

    let out = lab.exec("node1", &["shoal", "swarm", "init", "--force-new-cluster"]);
    assert!(out.contains("Swarm initialized"), "{out}");
    let nodes = lab.node_json("node1", &["node", "ls"]);
    let status: BTreeMap<&str, &str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["hostname"].as_str().unwrap(),
                n["manager_status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(status["node1"], "Leader");
    assert_eq!(
        (status["node2"], status["node3"]),
        ("Unavailable", "Unavailable")
    );
    let services = lab.node_json("node1", &["service", "ls"]);
    assert_eq!(services[0]["name"], "keep", "state kept: {services}");
    let scaled = lab.exec("node1", &["shoal", "service", "scale", "keep=3"]);
    assert!(scaled.contains("verify: Service converged"), "{scaled}");
    lab.down_clean();
}

#[test]
fn a_state_dir_backup_restores_the_swarm() {
    let lab = TestLab::up("sw-backup", 1);
    lab.exec(
        "node1",
        &[
            "shoal",
            "service",
            "create",
            "--name",
            "before",
            "--replicas",
            "1",
            "--",
            "sleep",
            "100000",
        ],
    );
    let state = lab.run_dir().join("node1/state");
    let backup = tempfile::tempdir().unwrap();
    lab.ok(&["stop", "node1"]);
    let copied = std::process::Command::new("cp")
        .args(["-a"])
        .arg(state.join("cluster"))
        .arg(backup.path())
        .status()
        .unwrap();
    assert!(copied.success());
    lab.ok(&["start", "node1"]);
    lab.exec(
        "node1",
        &[
            "shoal",
            "service",
            "create",
            "--name",
            "after",
            "--replicas",
            "1",
            "--",
            "sleep",
            "100000",
        ],
    );
    assert_eq!(
        lab.node_json("node1", &["service", "ls"])
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // Restore: stop, put the backup back, start: the swarm is as it was at backup time.
    lab.ok(&["stop", "node1"]);
    fs::remove_dir_all(state.join("cluster")).unwrap();
    let restored = std::process::Command::new("cp")
        .args(["-a"])
        .arg(backup.path().join("cluster"))
        .arg(&state)
        .status()
        .unwrap();
    assert!(restored.success());
    lab.ok(&["start", "node1"]);
    let services = wait_for(
        "the restored manager to lead",
        Duration::from_secs(15),
        || lab.try_json("node1", &["service", "ls"]),
    );
    let names: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["before"]);
    lab.down_clean();
}

#[test]
fn promote_and_demote_change_raft_membership() {
    let lab = TestLab::up("sw-roles", 3);
    let manager_status = |node: &str| -> Option<String> {
        let nodes = lab.try_json("node1", &["node", "ls"])?;
        nodes
            .as_array()?
            .iter()
            .find(|n| n["hostname"] == node)
            .map(|n| n["manager_status"].as_str().unwrap().to_owned())
    };
    let promoted = lab.exec("node1", &["shoal", "node", "promote", "node2"]);
    assert!(promoted.contains("promoted to a manager"), "{promoted}");
    wait_for(
        "node2 to be a reachable voter",
        Duration::from_secs(20),
        || (manager_status("node2")? == "Reachable").then_some(()),
    );
    // The promoted node now answers manager commands itself.
    let nodes = wait_for("node2 to serve node ls", Duration::from_secs(10), || {
        lab.try_json("node2", &["node", "ls"])
    });
    assert_eq!(nodes.as_array().unwrap().len(), 3);

    lab.exec("node1", &["shoal", "node", "demote", "node2"]);
    wait_for(
        "node2 to be a worker again",
        Duration::from_secs(20),
        || {
            let refused = !lab
                .run(&["exec", "node2", "--", "shoal", "node", "ls"])
                .status
                .success();
            (manager_status("node2")?.is_empty() && refused).then_some(())
        },
    );
    // The last manager cannot be demoted.
    let out = lab.run(&["exec", "node1", "--", "shoal", "node", "demote", "node1"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("last manager"),
        "{out:?}"
    );
    lab.down_clean();
}

#[test]
fn networks_are_allocated_attached_and_removed() {
    let lab = TestLab::up("sw-nets", 2);
    let networks = lab.node_json("node1", &["network", "ls"]);
    assert_eq!(networks.as_array().unwrap().len(), 1);
    let ingress = &networks[0];
    assert_eq!(
        (
            ingress["name"].as_str(),
            ingress["subnet"].as_str(),
            ingress["vni"].as_u64(),
            ingress["ingress"].as_bool()
        ),
        (Some("ingress"), Some("10.0.0.0/24"), Some(4096), Some(true))
    );

    lab.exec("node1", &["shoal", "network", "create", "backend"]);
    let backend: Value = serde_json::from_str(&lab.exec(
        "node1",
        &["shoal", "network", "inspect", "backend", "--format", "json"],
    ))
    .unwrap();
    assert_eq!(
        (
            backend["subnet"].as_str(),
            backend["gateway"].as_str(),
            backend["vni"].as_u64()
        ),
        (Some("10.0.1.0/24"), Some("10.0.1.1"), Some(4097))
    );
    lab.exec(
        "node1",
        &[
            "shoal",
            "network",
            "create",
            "--subnet",
            "192.168.50.0/24",
            "--gateway",
            "192.168.50.254",
            "--attachable",
            "--opt",
            "mtu=1400",
            "front",
        ],
    );
    let front: Value = serde_json::from_str(&lab.exec(
        "node1",
        &["shoal", "network", "inspect", "front", "--format", "json"],
    ))
    .unwrap();
    assert_eq!(
        (
            front["gateway"].as_str(),
            front["mtu"].as_u64(),
            front["attachable"].as_bool()
        ),
        (Some("192.168.50.254"), Some(1400), Some(true))
    );

    let refused = |args: &[&str], message: &str| {
        let mut full = vec!["exec", "node1", "--", "shoal"];
        full.extend_from_slice(args);
        let out = lab.run(&full);
        assert!(!out.status.success(), "{args:?} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    };
    refused(
        &["network", "create", "--subnet", "10.0.1.128/25", "clash"],
        "overlaps 10.0.1.0/24 of network backend",
    );
    refused(&["network", "create", "backend"], "already exists");
    refused(
        &[
            "network",
            "create",
            "--subnet",
            "10.9.0.0/24",
            "--gateway",
            "10.8.0.1",
            "gw",
        ],
        "is not a host address",
    );
    refused(&["network", "create", "bad/name"], "invalid network name");
    refused(
        &[
            "service",
            "create",
            "--name",
            "x",
            "--network",
            "ingress",
            "--",
            "true",
        ],
        "ingress network cannot be attached",
    );
    refused(
        &[
            "service",
            "create",
            "--name",
            "x",
            "--network",
            "nope",
            "--",
            "true",
        ],
        "network nope not found: `shoal network ls` lists them",
    );

    lab.exec(
        "node1",
        &[
            "shoal",
            "service",
            "create",
            "--name",
            "api",
            "--replicas",
            "2",
            "--network",
            "backend",
            "--network",
            "front",
            "--",
            "sleep",
            "100000",
        ],
    );
    let tasks = lab.node_json("node1", &["service", "ps", "api"]);
    let mut backend_ips: Vec<String> = tasks
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            assert_eq!(t["addresses"][1][0], "front", "{t}");
            assert_eq!(t["addresses"][0][0], "backend", "{t}");
            t["addresses"][0][1].as_str().unwrap().to_owned()
        })
        .collect();
    backend_ips.sort();
    // The service's VIP on backend took the first free address (.2); tasks take the next.
    assert_eq!(backend_ips, ["10.0.1.3", "10.0.1.4"]);
    let inspect: Value = serde_json::from_str(&lab.exec(
        "node1",
        &["shoal", "service", "inspect", "api", "--format", "json"],
    ))
    .unwrap();
    assert_eq!(
        inspect["vips"][0],
        serde_json::json!(["backend", "10.0.1.2"])
    );

    // Detaching a network is a rolling update: the new tasks have one address left.
    let updated = lab.exec(
        "node1",
        &["shoal", "service", "update", "--network-rm", "front", "api"],
    );
    assert!(updated.contains("verify: Service converged"), "{updated}");
    let tasks = lab.node_json("node1", &["service", "ps", "api"]);
    let live: Vec<&Value> = tasks
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["desired"] == "running")
        .collect();
    assert_eq!(live.len(), 2);
    for task in live {
        assert_eq!(task["addresses"].as_array().unwrap().len(), 1, "{task}");
        assert_eq!(task["addresses"][0][0], "backend");
    }
    refused(
        &["service", "update", "--network-rm", "front", "api"],
        "is not attached to network front",
    );
    refused(&["network", "rm", "backend"], "in use by service api");
    lab.exec("node1", &["shoal", "service", "rm", "api"]);
    lab.exec("node1", &["shoal", "network", "rm", "backend", "front"]);
    assert_eq!(
        lab.node_json("node1", &["network", "ls"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A swarm made with its own pool takes its subnets from it.
    lab.exec("node2", &["shoal", "swarm", "leave"]);
    lab.exec(
        "node2",
        &[
            "shoal",
            "swarm",
            "init",
            "--default-addr-pool",
            "10.20.0.0/16",
            "--default-addr-pool-mask-length",
            "26",
        ],
    );
    lab.exec("node2", &["shoal", "network", "create", "mine"]);
    let subnets: Vec<String> = lab
        .node_json("node2", &["network", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["subnet"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(subnets.len(), 2);
    assert!(
        subnets.contains(&"10.20.0.0/26".to_owned())
            && subnets.contains(&"10.20.0.64/26".to_owned()),
        "{subnets:?}"
    );
    lab.down_clean();
}
