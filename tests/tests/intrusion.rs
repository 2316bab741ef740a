//! A hostile host on the node network (the lab's `client` namespace) tries the ways into the
//! cluster that are not published ports: VXLAN datagrams it builds itself, and routes through
//! a node to the tasks' gateway-bridge addresses. Each is refused and counted, while members'
//! overlay traffic, the tasks' own outbound traffic and published ports keep working.
//! Needs root.

use std::{net::Ipv4Addr, time::Duration};

use etherparse::PacketBuilder;
use serde_json::Value;
use shoal_tests::{verdict_packets, wait_for, RunningTask, TestLab};

const PORT: &str = "9000";

/// The MAC shoal gives an overlay address.
fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x42, a, b, c, d]
}

/// A VXLAN datagram's payload (VXLAN header and inner frame) carrying a UDP datagram from
/// `src` to `dst` (a task's address, or the subnet's broadcast) on VNI `vni`.
fn vxlan_payload(vni: u32, src: Ipv4Addr, dst: Ipv4Addr, dst_mac: [u8; 6], text: &str) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0];
    payload.extend((vni << 8).to_be_bytes());
    PacketBuilder::ethernet2(mac_for(src), dst_mac)
        .ipv4(src.octets(), dst.octets(), 64)
        .udp(40_000, PORT.parse().unwrap())
        .write(&mut payload, text.as_bytes())
        .unwrap();
    payload
}

/// Sends `payload` as one UDP datagram from the client namespace to `to` (bash's /dev/udp).
fn send_from_client(lab: &TestLab, payload: &[u8], to: &str, port: u16) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), payload).unwrap();
    let script = format!("cat {} > /dev/udp/{to}/{port}", file.path().display());
    lab.exec("client", &["bash", "-c", &script]);
}

fn address_on(task: &RunningTask, network: &str) -> Ipv4Addr {
    task.addresses[network].parse().unwrap()
}

fn logs(lab: &TestLab, service: &str) -> String {
    lab.exec("node1", &["shoal", "service", "logs", service])
}

fn status(lab: &TestLab, node: &str) -> Value {
    lab.node_json(node, &["dataplane", "status"])
}

#[test]
fn vxlan_from_a_non_member_never_reaches_a_task() {
    let lab = TestLab::up("intrusion-vx", 2);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    let listen = format!("0.0.0.0:{PORT}");
    lab.create_service(
        "sink",
        &["--replicas", "2", "--network", "front"],
        &["shoal", "whoami", "--listen", &listen],
    );
    let tasks = lab.running_tasks("sink", 2);
    let on = |node: &str| {
        tasks
            .iter()
            .find(|t| t.node == node)
            .unwrap_or_else(|| panic!("a sink task on {node}: {tasks:?}"))
    };
    let (sender, target) = (on("node1"), on("node2"));
    let (sender_ip, target_ip) = (address_on(sender, "front"), address_on(target, "front"));
    let network = lab.node_json("node1", &["network", "inspect", "front"]);
    let vni = network["vni"].as_u64().unwrap() as u32;

    // A member's traffic flows: task to task across the two nodes.
    wait_for(
        "a datagram between members",
        Duration::from_secs(20),
        || {
            let script = format!("echo from-member > /dev/udp/{target_ip}/{PORT}");
            lab.in_task(sender, &["bash", "-c", &script]);
            logs(&lab, "sink").contains("from-member").then_some(())
        },
    );

    // The client forges frames on the overlay: one impersonating the other task, one
    // broadcast, both to node2's data-path port with the right VNI.
    let before = verdict_packets(&status(&lab, "node2"), "vxlan_not_member");
    let broadcast = Ipv4Addr::from(u32::from(target_ip) | 0xff);
    let forged = [
        vxlan_payload(
            vni,
            sender_ip,
            target_ip,
            mac_for(target_ip),
            "forged-unicast",
        ),
        vxlan_payload(vni, sender_ip, broadcast, [0xff; 6], "forged-broadcast"),
    ];
    for payload in &forged {
        send_from_client(&lab, payload, "192.168.77.12", 4789);
    }
    let refused = wait_for("the forged frames counted", Duration::from_secs(10), || {
        let now = verdict_packets(&status(&lab, "node2"), "vxlan_not_member");
        (now >= before + 2).then_some(now - before)
    });
    assert!(refused >= 2);
    // A member's datagram sent after the forged ones arrives, so theirs had their chance.
    let script = format!("echo after-forgery > /dev/udp/{target_ip}/{PORT}");
    wait_for(
        "a member datagram after the forgery",
        Duration::from_secs(10),
        || {
            lab.in_task(sender, &["bash", "-c", &script]);
            logs(&lab, "sink").contains("after-forgery").then_some(())
        },
    );
    let seen = logs(&lab, "sink");
    assert!(
        !seen.contains("forged"),
        "a forged frame reached a task:\n{seen}"
    );
    // The refusal is named in the metrics too.
    let metrics = lab.exec("node2", &["curl", "-s", "127.0.0.1:9323/metrics"]);
    assert!(
        metrics.contains("shoal_dataplane_refused_packets_total{reason=\"vxlan_not_member\"}"),
        "{metrics}"
    );
    lab.down_clean();
}

#[test]
fn tasks_are_not_reachable_through_the_gateway_bridge() {
    let lab = TestLab::up("intrusion-gw", 2);
    lab.exec("node1", &["shoal", "network", "create", "back"]);
    let listen = format!("0.0.0.0:{PORT}");
    // Not internal: its tasks have a gateway-bridge address and a way out.
    lab.create_service(
        "hidden",
        &["--replicas", "2", "--network", "back"],
        &["shoal", "whoami", "--listen", &listen],
    );
    lab.create_service(
        "web",
        &["--replicas", "1", "--publish", "8080:9000"],
        &["shoal", "whoami", "--listen", &listen],
    );
    let hidden = lab.running_tasks("hidden", 2);
    lab.running_tasks("web", 1);
    let task = hidden
        .iter()
        .find(|t| t.node == "node2")
        .expect("a task on node2");
    let addresses = lab.in_task(task, &["ip", "-4", "-o", "addr", "show"]);
    let text = String::from_utf8_lossy(&addresses.stdout);
    let gateway_address = text
        .split_whitespace()
        .filter_map(|word| word.split_once('/').map(|(ip, _)| ip))
        .find(|ip| ip.starts_with("172.18."))
        .unwrap_or_else(|| panic!("no gateway-bridge address in {text}"))
        .to_owned();

    // The task reaches out through the gateway bridge, and hears back.
    let out = lab.in_task(task, &["ping", "-c", "1", "-W", "2", "192.168.77.100"]);
    assert!(out.status.success(), "outbound from a task: {out:?}");

    // A host that routes the gateway subnet via node2 gets nothing back.
    let before = verdict_packets(&status(&lab, "node2"), "gateway_inbound");
    lab.exec(
        "client",
        &[
            "ip",
            "route",
            "add",
            "172.18.0.0/16",
            "via",
            "192.168.77.12",
        ],
    );
    let url = format!("http://{gateway_address}:{PORT}/");
    let answer = lab.client_get(&url, 2);
    assert!(
        answer.is_none(),
        "a task answered through the gateway bridge: {answer:?}"
    );
    let after = verdict_packets(&status(&lab, "node2"), "gateway_inbound");
    assert!(
        after > before,
        "the refusal is counted ({before} -> {after})"
    );

    // Published ports still answer through the mesh, on every node.
    for node in ["192.168.77.11", "192.168.77.12"] {
        let url = format!("http://{node}:8080/");
        let answer = wait_for("the published port", Duration::from_secs(20), || {
            lab.client_get(&url, 2)
        });
        assert!(answer.contains("RemoteAddr: 192.168.77.100"), "{answer}");
    }
    lab.down_clean();
}
