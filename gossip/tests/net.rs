//! Three real services on 127.0.0.1.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdp};
use std::time::Duration;

use shoal_gossip::net::{now_ms, GossipHandle, GossipService};
use shoal_gossip::{EndpointRecord, Gossip, GossipConfig, Keyring};
use tokio::net::UdpSocket;

fn keyring(key: u8) -> Keyring {
    Keyring::new(vec![[key; 32]]).unwrap()
}

/// Starts a service on a free 127.0.0.1 port (UDP and TCP), retrying if TCP is taken.
async fn start(name: &str, seed: u64) -> GossipHandle {
    for _ in 0..10 {
        let port = StdUdp::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        let core = Gossip::new(GossipConfig::new(name, addr, seed), keyring(1), now_ms()).unwrap();
        if let Ok(handle) = GossipService::start(core, addr).await {
            return handle;
        }
    }
    panic!("no free port");
}

fn record(node: &str) -> EndpointRecord {
    EndpointRecord {
        task_id: "t1".into(),
        task_name: "web.1".into(),
        service_id: "s1".into(),
        service_name: "web".into(),
        node_id: node.into(),
        ip: Ipv4Addr::new(10, 0, 1, 2),
        mac: [2, 66, 10, 0, 1, 2],
        vtep: IpAddr::V4(Ipv4Addr::LOCALHOST),
        vip: Some(Ipv4Addr::new(10, 0, 1, 100)),
        ports: Vec::new(),
        health: None,
    }
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_services_share_an_endpoint_and_ignore_forgeries() {
    let nodes = [
        start("a", 1).await,
        start("b", 2).await,
        start("c", 3).await,
    ];
    let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.local_addr()).collect();
    let mut changes = nodes[1].subscribe();
    for node in &nodes {
        node.join(seeds.clone()).await.unwrap();
        node.join_network("net1").await.unwrap();
    }
    eventually("membership", || async {
        let mut all = true;
        for node in &nodes {
            all &= node.stats().await.unwrap().members_alive == 2;
            all &= node.networks_of("c").await.unwrap() == ["net1"];
        }
        all
    })
    .await;
    nodes[0].publish("net1", "t1", record("a")).await.unwrap();
    eventually("the endpoint on b and c", || async {
        let b = nodes[1].view("net1").await.unwrap();
        let c = nodes[2].view("net1").await.unwrap();
        b == [("t1".to_owned(), record("a"))] && c == b
    })
    .await;
    let mut saw_net1 = false;
    while let Ok(change) = changes.try_recv() {
        saw_net1 |= change == shoal_gossip::net::Change::Network("net1".into());
    }
    assert!(saw_net1, "b was told net1 changed");

    // Forgeries: random bytes, and a packet sealed with another key.
    let before = nodes[1].stats().await.unwrap();
    let raw = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    raw.send_to(b"not a gossip packet", nodes[1].local_addr())
        .await
        .unwrap();
    let mut forger = Gossip::new(
        GossipConfig::new("a", raw.local_addr().unwrap(), 9),
        keyring(2),
        now_ms(),
    )
    .unwrap();
    forger.join_network("net1", now_ms()).unwrap();
    forger
        .publish("net1", "evil", record("a"), now_ms())
        .unwrap();
    forger.join(&[nodes[1].local_addr()], now_ms());
    let mut forged = 0;
    while let Some(output) = forger.poll_output() {
        if let shoal_gossip::Output::Datagram { bytes, .. } = output {
            raw.send_to(&bytes, nodes[1].local_addr()).await.unwrap();
            forged += 1;
        }
    }
    assert!(forged > 0);
    eventually("the forgeries counted", || async {
        let after = nodes[1].stats().await.unwrap();
        after.malformed_dropped > before.malformed_dropped
            && after.auth_failures >= before.auth_failures + forged
    })
    .await;
    assert_eq!(nodes[1].view("net1").await.unwrap().len(), 1);
    assert_eq!(nodes[1].stats().await.unwrap().members_alive, 2);

    for node in nodes {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_service_s_entries_stay_while_its_host_refuses_connections() {
    let nodes = [start("a", 4).await, start("b", 5).await];
    let seeds: Vec<SocketAddr> = nodes.iter().map(|n| n.local_addr()).collect();
    for node in &nodes {
        node.join(seeds.clone()).await.unwrap();
        node.join_network("net1").await.unwrap();
    }
    nodes[0].publish("net1", "t1", record("a")).await.unwrap();
    eventually("the endpoint on b", || async {
        nodes[1].view("net1").await.unwrap().len() == 1
    })
    .await;

    // Nothing listens on a's port any more: the kernel refuses, so its host is there.
    nodes[0].shutdown().await;
    eventually("a Down on b", || async {
        nodes[1].stats().await.unwrap().members_down == 1
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        nodes[1].view("net1").await.unwrap(),
        [("t1".to_owned(), record("a"))]
    );
    nodes[1].shutdown().await;
}
