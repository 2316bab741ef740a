//! What a node exposes, as the managers decide it: shoal's own ports can never be published,
//! a published port and a service name each have one owner even when many ask at once, and
//! an overlay's subnet keeps clear of the nodes' addresses and routes. Needs root.

use std::{fs::OpenOptions, io::Write as _, sync::Barrier, time::Duration};

use shoal_tests::{wait_for, TestLab};

/// `shoal ARGS` on a node, against its agent: whether it succeeded, and its stderr.
fn attempt(lab: &TestLab, node: &str, args: &[&str]) -> (bool, String) {
    let mut full = vec!["exec", node, "--", "shoal"];
    full.extend_from_slice(args);
    let out = lab.run(&full);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Asserts a command on node1 fails with stderr containing every one of `words`.
fn refused(lab: &TestLab, args: &[&str], words: &[&str]) {
    let (ok, stderr) = attempt(lab, "node1", args);
    assert!(!ok, "shoal {args:?} was accepted");
    for word in words {
        assert!(stderr.contains(word), "shoal {args:?}: {stderr}");
    }
}

/// Runs `command(i)` for i in 0..n on threads released at the same moment.
fn at_once<T: Send>(n: usize, command: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let start = Barrier::new(n);
    std::thread::scope(|scope| {
        let runs: Vec<_> = (0..n)
            .map(|i| {
                let (start, command) = (&start, &command);
                scope.spawn(move || {
                    start.wait();
                    command(i)
                })
            })
            .collect();
        runs.into_iter().map(|run| run.join().unwrap()).collect()
    })
}

/// Services of the swarm that publish `port` (`8080/tcp`).
fn publishers(lab: &TestLab, port: &str) -> Vec<String> {
    let (number, protocol) = port.split_once('/').unwrap();
    lab.node_json("node1", &["service", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["ports"].as_array().unwrap().iter().any(|p| {
                p["published"].as_u64().unwrap().to_string() == number && p["protocol"] == protocol
            })
        })
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// `service create` of a service `bad` publishing `publish`.
fn create_publishing(publish: &str) -> [&str; 10] {
    [
        "service",
        "create",
        "--detach",
        "--name",
        "bad",
        "--publish",
        publish,
        "--",
        "sleep",
        "600",
    ]
}

#[test]
fn shoal_ports_cannot_be_published() {
    let lab = TestLab::up("exp-ports", 1);
    lab.create_service("base", &[], &["sleep", "600"]);
    let reserved = [
        ("2377:80", "2377/tcp", "manager API"),
        ("7946:80", "7946/tcp", "gossip"),
        ("7946:80/udp", "7946/udp", "gossip"),
        ("4789:80/udp", "4789/udp", "VXLAN data path"),
        (
            "published=2377,target=80,mode=host",
            "2377/tcp",
            "manager API",
        ),
        (
            "published=7946,target=80,protocol=udp,mode=host",
            "7946/udp",
            "gossip",
        ),
    ];
    for (publish, port, listener) in reserved {
        let words = [
            &format!("port {port} is reserved: ") as &str,
            listener,
            "publish another port",
        ];
        let create = create_publishing(publish);
        refused(&lab, &create, &words);
        let update = [
            "service",
            "update",
            "--detach",
            "--publish-add",
            publish,
            "base",
        ];
        refused(&lab, &update, &words);
    }
    assert!(publishers(&lab, "7946/udp").is_empty());
    let services = lab.node_json("node1", &["service", "ls"]);
    assert_eq!(services.as_array().unwrap().len(), 1, "{services}");

    // The swarm's data-path port is the one `swarm init` chose, and a metrics listener the
    // node network can reach is reserved as well.
    let config = format!("/run/shoal-lab/{}/node1/agent.toml", lab.name);
    let mut file = OpenOptions::new().append(true).open(&config).unwrap();
    writeln!(file, "metrics_addr = \"0.0.0.0:9100\"").unwrap();
    lab.ok(&["stop", "node1"]);
    lab.ok(&["start", "node1"]);
    lab.exec("node1", &["shoal", "swarm", "leave", "--force"]);
    lab.exec(
        "node1",
        &["shoal", "swarm", "init", "--data-path-port", "4790"],
    );
    for (publish, port, listener, on) in [
        ("4790:80/udp", "4790/udp", "VXLAN data path", "every node"),
        ("9100:80", "9100/tcp", "metrics", "node node1"),
    ] {
        let create = create_publishing(publish);
        let words = [
            &format!("port {port} is reserved: ") as &str,
            listener,
            &format!("listens there on {on}; publish another port"),
        ];
        refused(&lab, &create, &words);
    }
}

#[test]
fn a_port_and_a_name_have_one_owner_under_concurrent_writes() {
    let lab = TestLab::up("exp-race", 1);

    // Ten creates of one published port: one wins, the others are told who has it.
    let outcomes = at_once(10, |i| {
        let name = format!("web{i}");
        attempt(
            &lab,
            "node1",
            &[
                "service",
                "create",
                "--detach",
                "--name",
                &name,
                "--publish",
                "8080:80",
                "--",
                "sleep",
                "600",
            ],
        )
    });
    let owners = publishers(&lab, "8080/tcp");
    assert_eq!(owners.len(), 1, "{owners:?}");
    assert_eq!(
        outcomes.iter().filter(|(ok, _)| *ok).count(),
        1,
        "{outcomes:#?}"
    );
    for (_, stderr) in outcomes.iter().filter(|(ok, _)| !ok) {
        assert!(
            stderr.contains(&format!(
                "port 8080/tcp is already published by service {}",
                owners[0]
            )),
            "{stderr}"
        );
    }

    // Ten updates adding one port to different services: the same.
    for i in 0..10 {
        lab.create_service(&format!("up{i}"), &[], &["sleep", "600"]);
    }
    let outcomes = at_once(10, |i| {
        let name = format!("up{i}");
        attempt(
            &lab,
            "node1",
            &[
                "service",
                "update",
                "--detach",
                "--publish-add",
                "9090:80/udp",
                &name,
            ],
        )
    });
    assert_eq!(publishers(&lab, "9090/udp").len(), 1);
    assert_eq!(
        outcomes.iter().filter(|(ok, _)| *ok).count(),
        1,
        "{outcomes:#?}"
    );
    for (_, stderr) in outcomes.iter().filter(|(ok, _)| !ok) {
        assert!(
            stderr.contains("port 9090/udp is already published by service up"),
            "{stderr}"
        );
    }

    // Ten creates of one name.
    let outcomes = at_once(10, |_| {
        attempt(
            &lab,
            "node1",
            &[
                "service", "create", "--detach", "--name", "api", "--", "sleep", "600",
            ],
        )
    });
    assert_eq!(
        outcomes.iter().filter(|(ok, _)| *ok).count(),
        1,
        "{outcomes:#?}"
    );
    for (_, stderr) in outcomes.iter().filter(|(ok, _)| !ok) {
        assert!(
            stderr.contains("a service named api already exists"),
            "{stderr}"
        );
    }
}

#[test]
fn overlay_subnets_keep_clear_of_node_networks() {
    let lab = TestLab::up("exp-subnet", 2);

    // The nodes' own segment, or a part of it, is refused.
    for subnet in ["192.168.77.0/24", "192.168.77.0/28", "192.168.0.0/16"] {
        refused(
            &lab,
            &["network", "create", "--subnet", subnet, "under"],
            &[
                &format!("subnet {subnet} overlaps 192.168.77.0/24 (address 192.168.77.11/24 on eth0) on node node1, the leader"),
                "choose another --subnet",
            ],
        );
    }

    // A route of the leader's: refused when asked for, stepped around when allocating.
    lab.exec(
        "node1",
        &["ip", "route", "add", "10.0.1.0/24", "via", "192.168.77.100"],
    );
    refused(
        &lab,
        &["network", "create", "--subnet", "10.0.1.0/25", "routed"],
        &["overlaps 10.0.1.0/24 (route via 192.168.77.100 dev eth0)"],
    );
    lab.exec("node1", &["shoal", "network", "create", "auto"]);
    let auto = lab.node_json("node1", &["network", "inspect", "auto"]);
    assert_eq!(auto["subnet"], "10.0.2.0/24", "{auto}");

    // A route only node2 has: the leader cannot know, so node2 rejects the task, saying why.
    lab.exec(
        "node2",
        &[
            "ip",
            "route",
            "add",
            "10.77.0.0/16",
            "via",
            "192.168.77.100",
        ],
    );
    lab.exec(
        "node1",
        &[
            "shoal",
            "network",
            "create",
            "--subnet",
            "10.77.1.0/24",
            "side",
        ],
    );
    lab.exec(
        "node1",
        &[
            "shoal",
            "node",
            "update",
            "--label-add",
            "only=node2",
            "node2",
        ],
    );
    lab.create_service(
        "cut",
        &[
            "--network",
            "side",
            "--constraint",
            "node.labels.only==node2",
        ],
        &["sleep", "600"],
    );
    let error = wait_for("a rejected task of cut", Duration::from_secs(30), || {
        let tasks = lab.try_json("node1", &["service", "ps", "cut"])?;
        tasks
            .as_array()?
            .iter()
            .find(|t| t["state"] == "rejected")
            .map(|t| t["error"].as_str().unwrap_or_default().to_owned())
    });
    assert!(
        error.contains(
            "network side: its subnet 10.77.1.0/24 overlaps 10.77.0.0/16 (route via \
             192.168.77.100 dev eth0) on this node"
        ),
        "{error}"
    );

    // `swarm init --default-addr-pool` refuses a pool holding the node's own network; the
    // default pool is carved around the node's routes instead.
    lab.exec("node2", &["shoal", "swarm", "leave"]);
    let (ok, stderr) = attempt(
        &lab,
        "node2",
        &["swarm", "init", "--default-addr-pool", "192.168.0.0/16"],
    );
    assert!(!ok, "pool over the node's segment accepted");
    assert!(
        stderr.contains(
            "--default-addr-pool 192.168.0.0/16 overlaps 192.168.77.0/24 (address \
             192.168.77.12/24 on eth0) of this node"
        ),
        "{stderr}"
    );
    lab.exec(
        "node2",
        &["ip", "route", "add", "10.0.0.0/16", "via", "192.168.77.100"],
    );
    lab.exec("node2", &["shoal", "swarm", "init"]);
    let ingress = lab.node_json("node2", &["network", "inspect", "ingress"]);
    assert_eq!(ingress["subnet"], "10.1.0.0/24", "{ingress}");
}
