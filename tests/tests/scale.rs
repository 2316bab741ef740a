//! A 32-node lab with 96 replicas on an overlay and a published port: it converges and
//! serves, through every node and task to task, with no connection waiting on a neighbour
//! entry the kernel could not make (the ARP table is one for all namespaces of the machine,
//! and at this size it overflowed: SYNs were lost, connections took 1-3 s). Needs root; takes
//! a minute or two.

use std::time::{Duration, Instant};

use shoal_dataplane::neighbours::{parse_arp_cache, ArpCacheStats};
use shoal_tests::{
    scale::{connections, curl_line, node_address, peers_programmed, Connection, Picker},
    wait_for, RunningTask, TestLab,
};

const NODES: u8 = 32;
const REPLICAS: usize = 96;
const CONNECTIONS: usize = 100;
const TASK_TARGETS: usize = 30;
/// A connection that lost its first SYN takes 1 s or more: anything under this is clean.
const CONNECT_LIMIT: f64 = 0.5;

/// The kernel's neighbour table (the test runs in the initial namespace, where this is).
fn arp_cache() -> ArpCacheStats {
    let text = std::fs::read_to_string("/proc/net/stat/arp_cache").expect("arp_cache");
    parse_arp_cache(&text).expect("arp_cache parses")
}

/// The connections that were slow (>= `CONNECT_LIMIT`), never connected or got no answer.
fn slow(found: &[Connection]) -> Vec<String> {
    found
        .iter()
        .filter(|c| !c.answered || c.connect_secs.is_none_or(|secs| secs >= CONNECT_LIMIT))
        .map(|c| c.line.clone())
        .collect()
}

/// Waits until the published port answers on every node, through the client namespace.
fn wait_every_node_answers(lab: &TestLab) {
    for index in 0..usize::from(NODES) {
        let url = format!("http://{}:8080/", node_address(index));
        wait_for(&format!("{url} to answer"), Duration::from_secs(60), || {
            let out = lab.run(&["exec", "client", "--", "curl", "-sf", "-m", "2", &url]);
            out.status.success().then_some(())
        });
    }
}

#[test]
fn a_32_node_lab_with_96_replicas_connects_at_once_everywhere() {
    let started = Instant::now();
    let lab = TestLab::up_with("scale", NODES, &["--managers", "3"]);
    eprintln!("lab up: {:?}", started.elapsed());
    let fulls_before = arp_cache().table_fulls;

    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.create_service(
        "web",
        &[
            "--replicas",
            &REPLICAS.to_string(),
            "--network",
            "front",
            "--publish",
            "8080:80",
        ],
        &["shoal", "whoami", "--listen", "0.0.0.0:80"],
    );
    let tasks = lab.running_tasks_within("web", REPLICAS, Duration::from_secs(120));
    eprintln!("{REPLICAS} running: {:?}", started.elapsed());
    wait_every_node_answers(&lab);
    eprintln!("every node answers: {:?}", started.elapsed());
    wait_for(
        "every node to have programmed its peers on front",
        Duration::from_secs(60),
        || peers_programmed(&lab, "front", &tasks, NODES).then_some(()),
    );
    eprintln!("converged: {:?}", started.elapsed());

    // Through the mesh: each connection to a random node, from its own source port.
    let mut pick = Picker::seeded();
    let script: String = (0..CONNECTIONS)
        .map(|i| {
            let node = node_address(pick.below(usize::from(NODES)));
            let port = 40_000 + i as u16;
            curl_line(
                &format!("{node}:8080<-{port}"),
                &format!("http://{node}:8080/"),
                Some(port),
            )
        })
        .collect();
    let output = lab.exec("client", &["sh", "-c", &script]);
    let late = slow(&connections(&output, CONNECTIONS));
    assert!(
        late.is_empty(),
        "{} of {CONNECTIONS} connections through the mesh were slow (>= {CONNECT_LIMIT} s) or failed:\n{}",
        late.len(),
        late.join("\n")
    );

    // Task to task over the overlay, from a random task to random others.
    let source = &tasks[pick.below(tasks.len())];
    let others: Vec<&RunningTask> = tasks.iter().filter(|t| t.name != source.name).collect();
    let script: String = (0..TASK_TARGETS)
        .map(|_| {
            let target = others[pick.below(others.len())];
            let ip = target.addresses["front"].split('/').next().unwrap();
            curl_line(
                &format!("{}@{}", target.name, target.node),
                &format!("http://{ip}:80/"),
                None,
            )
        })
        .collect();
    let out = lab.in_task(source, &["sh", "-c", &script]);
    let late = slow(&connections(
        &String::from_utf8_lossy(&out.stdout),
        TASK_TARGETS,
    ));
    assert!(
        late.is_empty(),
        "{} of {TASK_TARGETS} connections from {} on {} to other tasks were slow or failed:\n{}",
        late.len(),
        source.name,
        source.node,
        late.join("\n")
    );

    assert_eq!(
        arp_cache().table_fulls,
        fulls_before,
        "the kernel's neighbour table overflowed during the test (table_fulls)"
    );
    eprintln!("done: {:?}", started.elapsed());
    lab.down_clean();
}
