//! Service VIPs in the lab: connections from a task to a service's VIP are balanced by the
//! socket load balancer over the running replicas on any node, keep the client task's own
//! address, and follow scaling; the VIP answers ping. Needs root.

use std::{collections::BTreeSet, time::Duration};

use serde_json::Value;
use shoal_tests::{wait_for, RunningTask, TestLab};

/// The `Hostname:` lines of `count` requests from `client` to `url`, and the `RemoteAddr:`
/// addresses the servers saw.
fn ask_many(
    lab: &TestLab,
    client: &RunningTask,
    url: &str,
    count: usize,
) -> (Vec<String>, BTreeSet<String>) {
    let script = format!("for i in $(seq {count}); do curl -s --max-time 2 {url}; done");
    let out = lab.in_task(client, &["sh", "-c", &script]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
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

fn vip_of(lab: &TestLab, service: &str) -> String {
    let out = lab.exec(
        "node1",
        &["shoal", "service", "inspect", service, "--format", "json"],
    );
    let view: Value = serde_json::from_str(&out).expect("JSON");
    view["vips"][0][1].as_str().expect("a VIP").to_owned()
}

#[test]
fn a_vip_spreads_connections_over_replicas_on_every_node() {
    let lab = TestLab::up("vip", 3);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    let network = ["--network", "front"];
    lab.create_service(
        "web",
        &["--replicas", "3", network[0], network[1]],
        &["shoal", "whoami", "--listen", "0.0.0.0:80"],
    );
    lab.create_service("client", &network, &["sleep", "infinity"]);
    lab.create_service(
        "rr",
        &["--endpoint-mode", "dnsrr", network[0], network[1]],
        &["sleep", "infinity"],
    );
    let web = lab.running_tasks("web", 3);
    let client = lab.running_tasks("client", 1).remove(0);
    lab.running_tasks("rr", 1);
    let vip = vip_of(&lab, "web");
    let replicas: BTreeSet<String> = web.iter().map(|t| t.name.clone()).collect();
    let url = format!("http://{vip}/");

    // The client's node knows all three backends, then every replica answers, and each saw
    // the client task's own address.
    wait_for(
        "the VIP programmed with 3 backends",
        Duration::from_secs(10),
        || {
            let rows = lab.try_json(&client.node, &["lb", "ls", "web"])?;
            (rows[0]["backends"].as_array()?.len() == 3).then_some(())
        },
    );
    let (hosts, remotes) = ask_many(&lab, &client, &url, 30);
    assert_eq!(hosts.len(), 30, "every request answered: {hosts:?}");
    let seen: BTreeSet<String> = hosts.into_iter().collect();
    assert_eq!(seen, replicas, "connections reach every replica");
    assert_eq!(
        remotes,
        BTreeSet::from([client.addresses["front"].clone()]),
        "servers see the client task's address"
    );

    // The VIP answers ping (as in Swarm); an address nobody holds does not.
    let ping = |ip: &str| {
        lab.in_task(&client, &["ping", "-c", "2", "-i", "0.3", "-W", "1", ip])
            .status
            .success()
    };
    assert!(ping(&vip), "ping of the VIP {vip}");
    assert!(!ping("10.0.1.250"), "an unused address answered ping");

    // dnsrr services get no VIP.
    let rows: Value = lab.node_json(&client.node, &["lb", "ls"]);
    let services: BTreeSet<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["service"].as_str().unwrap())
        .collect();
    assert_eq!(services, BTreeSet::from(["client", "web"]));

    // Scaling down leaves one backend: every connection goes there.
    lab.exec("node1", &["shoal", "service", "scale", "--detach", "web=1"]);
    let only = lab.running_tasks("web", 1).remove(0);
    wait_for(
        "the VIP down to one backend",
        Duration::from_secs(15),
        || {
            let rows = lab.try_json(&client.node, &["lb", "ls", "web"])?;
            (rows[0]["backends"].as_array()?.len() == 1).then_some(())
        },
    );
    let (hosts, _) = ask_many(&lab, &client, &url, 10);
    assert_eq!(hosts, vec![only.name.clone(); 10]);
    lab.down_clean();
}
