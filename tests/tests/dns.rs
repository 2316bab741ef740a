//! The embedded DNS in the lab: every task on a network resolves service names (the VIP),
//! `tasks.` names (every running task) and its own network's names only, through
//! 127.0.0.11 in its namespace, and answers follow scaling. Needs root.

use std::{collections::BTreeSet, time::Duration};

use shoal_tests::{wait_for, RunningTask, TestLab};

/// The IPv4 addresses libc's resolver (through the task's resolv.conf) gets for `name`.
fn resolve(lab: &TestLab, task: &RunningTask, name: &str) -> BTreeSet<String> {
    let out = lab.in_task(task, &["getent", "ahostsv4", name]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn tasks_resolve_services_and_tasks_of_their_networks() {
    let lab = TestLab::up("dns", 3);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.exec("node1", &["shoal", "network", "create", "back"]);
    let whoami = ["shoal", "whoami", "--listen", "0.0.0.0:80"];
    lab.create_service("web", &["--replicas", "3", "--network", "front"], &whoami);
    lab.create_service("client", &["--network", "front"], &["sleep", "infinity"]);
    lab.create_service("db", &["--network", "back"], &["sleep", "infinity"]);
    let client = lab.running_tasks("client", 1).remove(0);
    lab.running_tasks("db", 1);
    let addresses = |replicas: usize| -> BTreeSet<String> {
        lab.running_tasks("web", replicas)
            .iter()
            .map(|t| t.addresses["front"].clone())
            .collect()
    };
    let vip = {
        let out = lab.exec("node1", &["shoal", "service", "inspect", "web"]);
        let view: serde_json::Value = serde_json::from_str(&out).unwrap();
        view["vips"][0][1].as_str().unwrap().to_owned()
    };

    assert_eq!(resolve(&lab, &client, "web"), BTreeSet::from([vip.clone()]));
    let three = addresses(3);
    wait_for(
        "tasks.web lists the 3 tasks",
        Duration::from_secs(5),
        || (resolve(&lab, &client, "tasks.web") == three).then_some(()),
    );
    assert_eq!(resolve(&lab, &client, "web.front"), BTreeSet::from([vip]));
    assert!(
        resolve(&lab, &client, "db").is_empty(),
        "a service on another network resolved"
    );
    // Names resolve to something that answers: HTTP to the service name.
    let out = lab.in_task(&client, &["curl", "-sf", "--max-time", "3", "http://web/"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Hostname: web."));

    // Scaling changes the answers everywhere as gossip carries it.
    lab.exec("node1", &["shoal", "service", "scale", "--detach", "web=5"]);
    let five = addresses(5);
    wait_for(
        "tasks.web lists the 5 tasks",
        Duration::from_secs(5),
        || (resolve(&lab, &client, "tasks.web") == five).then_some(()),
    );

    // A killed task leaves the answers; its replacement joins them.
    let victim = lab
        .running_tasks("web", 5)
        .into_iter()
        .find(|t| t.node != client.node)
        .expect("a web task on another node");
    let killed = lab.in_task(&victim, &["pkill", "-9", "-x", "shoal"]);
    assert!(killed.status.success(), "{killed:?}");
    wait_for(
        "the killed task's address gone",
        Duration::from_secs(10),
        || {
            (!resolve(&lab, &client, "tasks.web").contains(&victim.addresses["front"]))
                .then_some(())
        },
    );
    wait_for("five tasks again", Duration::from_secs(30), || {
        let now = addresses(5);
        (resolve(&lab, &client, "tasks.web") == now).then_some(())
    });
    let five = addresses(5);

    // `shoal dns lookup` says the same, and that external names are forwarded.
    let lookup = lab.node_json(
        &client.node,
        &["dns", "lookup", "tasks.web", "--task", &client.name],
    );
    let listed: BTreeSet<String> = lookup["answer"]["addresses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, five);
    let external = lab.node_json(
        &client.node,
        &["dns", "lookup", "example.com", "--task", &client.name],
    );
    assert!(external["answer"]["forwarded"].is_array(), "{external}");
    lab.down_clean();
}
