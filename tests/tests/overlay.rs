//! Overlay networks in the lab: tasks on three nodes reach each other over VXLAN programmed
//! from gossip, networks are isolated, a dead node's endpoints are withdrawn everywhere,
//! forged gossip is dropped and counted, key rotation keeps membership, and an ended task
//! leaves no interface behind for a new task given its address to be shadowed by. Needs root.

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;
use shoal_tests::{wait_for, RunningTask, TestLab};

fn ping(lab: &TestLab, from: &RunningTask, ip: &str) -> bool {
    lab.in_task(from, &["ping", "-c", "3", "-i", "0.3", "-W", "1", ip])
        .status
        .success()
}

/// Endpoint IPs of a network in a node's gossip view (live entries: not deleted, node up).
fn gossip_ips(lab: &TestLab, node: &str, network: &str) -> BTreeSet<String> {
    lab.try_json(node, &["gossip", "tables", network])
        .and_then(|rows| rows.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter(|r| r["live"] == true)
        .map(|r| r["record"]["ip"].as_str().unwrap().to_owned())
        .collect()
}

/// FDB entries (MAC -> VTEP) programmed for a network on a node.
fn programmed_vteps(lab: &TestLab, node: &str, network: &str) -> BTreeSet<String> {
    let out = lab.exec(
        node,
        &["shoal", "network", "inspect", network, "--format", "json"],
    );
    let view: Value = serde_json::from_str(&out).expect("JSON");
    view["local"]["fdb"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| e[1].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn create_whoami(lab: &TestLab, name: &str, network: &str, replicas: &str) {
    lab.create_service(
        name,
        &["--replicas", replicas, "--network", network],
        &["shoal", "whoami", "--listen", "0.0.0.0:80"],
    );
}

#[test]
fn tasks_on_three_nodes_talk_over_their_overlay_and_nothing_else() {
    let lab = TestLab::up("ovl", 3);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.exec("node1", &["shoal", "network", "create", "back"]);
    create_whoami(&lab, "web", "front", "3");
    create_whoami(&lab, "db", "back", "1");
    let web = lab.running_tasks("web", 3);
    let db = lab.running_tasks("db", 1);
    let nodes: BTreeSet<&str> = web.iter().map(|t| t.node.as_str()).collect();
    assert_eq!(nodes.len(), 3, "one web task per node: {web:?}");
    let front: BTreeSet<String> = web.iter().map(|t| t.addresses["front"].clone()).collect();
    for node in ["node1", "node2", "node3"] {
        wait_for(
            "every front endpoint in gossip",
            Duration::from_secs(10),
            || (gossip_ips(&lab, node, "front") == front).then_some(()),
        );
    }

    // Every task reaches every other one: ICMP and TCP (HTTP to whoami).
    for from in &web {
        for to in &web {
            let ip = &to.addresses["front"];
            assert!(
                ping(&lab, from, ip),
                "{} cannot ping {} ({ip})",
                from.name,
                to.name
            );
            let url = format!("http://{ip}:80/");
            assert!(
                lab.in_task(from, &["curl", "-sf", "--max-time", "3", &url])
                    .status
                    .success(),
                "{} cannot open TCP to {} ({ip})",
                from.name,
                to.name
            );
        }
    }
    // Front cannot reach back, not even on the same node.
    let db_ip = &db[0].addresses["back"];
    for from in &web {
        assert!(
            !ping(&lab, from, db_ip),
            "{} reached db on another network",
            from.name
        );
    }
    // The overlays carry IPv4 only: a task's interfaces have no IPv6 address (nothing of
    // IPv6 goes into the overlay), its loopback keeps ::1.
    let ipv6 = |device: &str| {
        let out = lab.in_task(&web[0], &["ip", "-6", "-o", "addr", "show", "dev", device]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(ipv6("eth0"), "", "IPv6 on the overlay interface");
    assert_eq!(ipv6("eth1"), "", "IPv6 on the gateway interface");
    assert!(ipv6("lo").contains("::1"), "loopback without ::1");
    // A node is not on any network: it cannot reach a task's overlay address.
    let web_ip = &web[0].addresses["front"];
    for node in ["node1", "node2", "node3"] {
        let out = lab.run(&["exec", node, "--", "ping", "-c", "1", "-W", "1", web_ip]);
        assert!(!out.status.success(), "{node} reached {web_ip}");
    }
    // Each node programmed exactly the other nodes' endpoints of front.
    for node in ["node1", "node2", "node3"] {
        let remote: BTreeSet<String> = web
            .iter()
            .filter(|t| t.node != node)
            .map(|t| t.addresses["front"].clone())
            .collect();
        let view: Value = serde_json::from_str(&lab.exec(
            node,
            &["shoal", "network", "inspect", "front", "--format", "json"],
        ))
        .unwrap();
        let neighbours: BTreeSet<String> = view["local"]["neighbours"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n[0].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(neighbours, remote, "neighbour entries on {node}");
    }

    // The last task of a network on a node takes the network's namespace with it; only the
    // ingress network (the routing mesh's, one per node) stays.
    lab.exec("node1", &["shoal", "service", "rm", "web", "db"]);
    let ingress: Value = serde_json::from_str(&lab.exec(
        "node1",
        &["shoal", "network", "inspect", "ingress", "--format", "json"],
    ))
    .unwrap();
    let ingress_ns = format!(".ov-{}", &ingress["id"].as_str().unwrap()[..12]);
    let overlay_namespaces = || {
        std::fs::read_dir("/run/netns")
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("shoal-{}-", lab.name)) && n.contains(".ov-"))
            .collect::<Vec<_>>()
    };
    wait_for(
        "overlay namespaces removed",
        Duration::from_secs(20),
        || {
            let left = overlay_namespaces();
            (left.len() == 3 && left.iter().all(|n| n.ends_with(&ingress_ns))).then_some(())
        },
    );
    // ... and its VIPs leave the kernel maps.
    for node in ["node1", "node2", "node3"] {
        let vips = lab.node_json(node, &["lb", "ls"]);
        assert_eq!(vips, serde_json::json!([]), "{node}");
    }
    lab.down_clean();
}

#[test]
fn a_dead_node_is_withdrawn_and_forged_gossip_is_dropped() {
    let lab = TestLab::up("ovd", 3);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    create_whoami(&lab, "web", "front", "3");
    let web = lab.running_tasks("web", 3);
    let node3_ip = web
        .iter()
        .find(|t| t.node == "node3")
        .map(|t| t.addresses["front"].clone())
        .expect("a task on node3");
    for node in ["node1", "node2"] {
        wait_for(
            "node3's endpoint on the others",
            Duration::from_secs(10),
            || {
                gossip_ips(&lab, node, "front")
                    .contains(&node3_ip)
                    .then_some(())
            },
        );
        assert!(programmed_vteps(&lab, node, "front").contains("192.168.77.13"));
    }

    // Forged packets from the client: dropped, counted, and membership does not move.
    let before = lab.node_json("node1", &["gossip", "members"]);
    let dropped_before = before["stats"]["auth_failures"].as_u64().unwrap()
        + before["stats"]["malformed_dropped"].as_u64().unwrap();
    let forged = lab.run(&[
        "exec",
        "client",
        "--",
        "bash",
        "-c",
        "for i in 1 2 3 4 5; do head -c 200 /dev/urandom > /dev/udp/192.168.77.11/7946; done",
    ]);
    assert!(forged.status.success(), "{forged:?}");
    let after = wait_for("forged packets counted", Duration::from_secs(5), || {
        let after = lab.try_json("node1", &["gossip", "members"])?;
        let dropped = after["stats"]["auth_failures"].as_u64()?
            + after["stats"]["malformed_dropped"].as_u64()?;
        (dropped >= dropped_before + 5).then_some(after)
    });
    let alive = |v: &Value| {
        v["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "Alive")
            .count()
    };
    assert_eq!(alive(&after), 3, "{after}");

    // Power node3 off (an agent that is merely silent keeps its entries while its host
    // answers: tests/tests/restart.rs): its endpoint leaves every other node's view and kernel.
    lab.ok(&["stop", "node3", "--power-off"]);
    for node in ["node1", "node2"] {
        wait_for(
            "node3's endpoint withdrawn",
            Duration::from_secs(15),
            || (!gossip_ips(&lab, node, "front").contains(&node3_ip)).then_some(()),
        );
        wait_for(
            "node3's FDB entries removed",
            Duration::from_secs(5),
            || (!programmed_vteps(&lab, node, "front").contains("192.168.77.13")).then_some(()),
        );
    }

    // node3 comes back (its tasks died with it and are replaced): every node with a task ends
    // with exactly the endpoints of the running tasks, none stale, none missing.
    lab.ok(&["start", "node3"]);
    wait_for(
        "views equal to the running tasks",
        Duration::from_secs(30),
        || {
            let running = lab.running_tasks("web", 3);
            let ips: BTreeSet<String> = running
                .iter()
                .map(|t| t.addresses["front"].clone())
                .collect();
            running
                .iter()
                .all(|t| gossip_ips(&lab, &t.node, "front") == ips)
                .then_some(())
        },
    );
    lab.down_clean();
}

#[test]
fn rotating_the_gossip_key_keeps_membership() {
    let lab = TestLab::up("ovk", 3);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    create_whoami(&lab, "web", "front", "3");
    lab.running_tasks("web", 3);
    for _ in 0..4 {
        lab.exec(
            "node1",
            &["shoal", "swarm", "update", "--rotate-gossip-key"],
        );
        std::thread::sleep(Duration::from_millis(1500));
    }
    for node in ["node1", "node2", "node3"] {
        let members = lab.node_json(node, &["gossip", "members"]);
        let states: Vec<&str> = members["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["state"].as_str().unwrap())
            .collect();
        assert_eq!(states, ["Alive"; 3], "{node}: {members}");
    }
    // Updates still flow with the new keys: scaling shows up in every node's table.
    lab.exec("node1", &["shoal", "service", "scale", "--detach", "web=6"]);
    let web = lab.running_tasks("web", 6);
    let all: BTreeSet<String> = web.iter().map(|t| t.addresses["front"].clone()).collect();
    for node in ["node1", "node2", "node3"] {
        wait_for("six endpoints everywhere", Duration::from_secs(10), || {
            (gossip_ips(&lab, node, "front") == all).then_some(())
        });
    }
    lab.down_clean();
}

/// The task process whose command line names it (`--hostname NAME`): its network namespace.
fn task_netns(task: &RunningTask) -> std::fs::File {
    let marker = format!("--hostname\0{}\0", task.name);
    let pid = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .find(|entry| {
            std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| {
                cmdline
                    .windows(marker.len())
                    .any(|w| w == marker.as_bytes())
            })
        })
        .unwrap_or_else(|| panic!("no process of task {}", task.name))
        .file_name();
    std::fs::File::open(format!("/proc/{}/ns/net", pid.to_string_lossy())).expect("its netns")
}

/// Names of the links in a named network namespace.
fn links(netns: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["-n", netns, "-br", "link"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .collect()
}

/// A task's namespace can outlive it (a socket still closing, an open handle): its veths
/// must not. Left on the bridge, the ended task kept answering for its address (refusing
/// connections) and a new task given that address on another node was unreachable from
/// here: the published port refused a third of its requests during rolling updates.
#[test]
fn an_ended_task_leaves_no_interface_even_while_its_namespace_lives_on() {
    let lab = TestLab::up("ovend", 2);
    let publish = ["--publish", "8080:80", "--constraint"];
    let whoami = ["shoal", "whoami", "--listen", "0.0.0.0:80"];
    lab.create_service(
        "web",
        &[&publish[..], &["node.hostname==node1"]].concat(),
        &whoami,
    );
    let old = lab.running_tasks("web", 1).remove(0);
    let short: String = old
        .name
        .rsplit('.')
        .next()
        .unwrap()
        .chars()
        .take(10)
        .collect();
    let ingress_ns = std::fs::read_dir("/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with(&format!("shoal-{}-node1.ov-", lab.name)))
        .expect("node1's ingress network namespace");
    let node_ns = format!("shoal-{}-node1", lab.name);
    let (bridged, gateway) = (format!("v0{short}"), format!("g{short}"));
    assert!(
        links(&ingress_ns).contains(&bridged),
        "{:?}",
        links(&ingress_ns)
    );
    assert!(links(&node_ns).contains(&gateway), "{:?}", links(&node_ns));

    // Held here, the namespace lives on after the task.
    let held = task_netns(&old);
    lab.exec("node1", &["shoal", "service", "rm", "web"]);
    wait_for("its veths removed", Duration::from_secs(20), || {
        (!links(&ingress_ns).contains(&bridged) && !links(&node_ns).contains(&gateway))
            .then_some(())
    });
    // A new task on node2, reached from node1 through the routing mesh. Addresses are given
    // out freed-last, so it gets a fresh one while any is left: the check of the veths above
    // is what fails on the old code; this one sees the mesh through node1 still whole.
    lab.create_service(
        "web",
        &[&publish[..], &["node.hostname==node2"]].concat(),
        &whoami,
    );
    let new = lab.running_tasks("web", 1).remove(0);
    wait_for(
        "node1 routes to the new task only",
        Duration::from_secs(10),
        || (lab.port_backends("node1", 8080)? == [new.addresses["ingress"].clone()]).then_some(()),
    );
    wait_for(
        "node1 routes to the new task",
        Duration::from_secs(10),
        || lab.client_get("http://192.168.77.11:8080/", 2),
    );
    for _ in 0..20 {
        let body = lab.client_get("http://192.168.77.11:8080/", 2);
        assert!(
            body.is_some_and(|b| b.contains(&new.name)),
            "a request through node1 failed"
        );
    }
    drop(held);
    lab.down_clean();
}
