//! The core's handling of hostile input: nothing that fails authentication or freshness
//! changes state, and every drop is counted by reason.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proptest::prelude::*;
use shoal_gossip::{EndpointRecord, Gossip, GossipConfig, Keyring, Output};

const NOW: u64 = 1_700_000_000_000;

fn addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

fn node(name: &str, port: u16, key: u8) -> Gossip {
    let ring = Keyring::new(vec![[key; 32]]).unwrap();
    Gossip::new(GossipConfig::new(name, addr(port), 1), ring, NOW).unwrap()
}

fn record() -> EndpointRecord {
    EndpointRecord {
        task_id: "t".into(),
        task_name: "web.1".into(),
        service_id: "s".into(),
        service_name: "web".into(),
        node_id: "a".into(),
        ip: Ipv4Addr::new(10, 0, 0, 2),
        mac: [2, 0, 0, 0, 0, 2],
        vtep: IpAddr::V4(Ipv4Addr::LOCALHOST),
        vip: None,
        ports: Vec::new(),
        health: None,
    }
}

/// Datagrams `a` sends after joining `b` and `net1`.
fn datagrams_from_a(key: u8) -> Vec<Vec<u8>> {
    let mut a = node("a", 1, key);
    a.join(&[addr(2)], NOW);
    a.join_network("net1", NOW).unwrap();
    std::iter::from_fn(|| a.poll_output())
        .filter_map(|o| match o {
            Output::Datagram { bytes, .. } => Some(bytes),
            _ => None,
        })
        .collect()
}

#[test]
fn a_replayed_datagram_is_dropped_and_counted() {
    let packets = datagrams_from_a(1);
    assert!(!packets.is_empty());
    let mut b = node("b", 2, 1);
    for p in &packets {
        b.handle_datagram(addr(1), p, NOW + 5);
    }
    let stats = b.stats();
    let members = b.members();
    let membership = b.membership_entries();
    for p in &packets {
        b.handle_datagram(addr(1), p, NOW + 10);
    }
    let after = b.stats();
    assert_eq!(
        after.replays_dropped,
        stats.replays_dropped + packets.len() as u64
    );
    assert_eq!(b.members(), members);
    assert_eq!(b.membership_entries(), membership);
}

#[test]
fn old_and_foreign_datagrams_are_dropped() {
    let mut b = node("b", 2, 1);
    for p in datagrams_from_a(1) {
        b.handle_datagram(addr(1), &p, NOW + 61_000);
    }
    for p in datagrams_from_a(2) {
        b.handle_datagram(addr(1), &p, NOW);
    }
    let stats = b.stats();
    assert!(stats.stale_dropped > 0 && stats.auth_failures > 0);
    assert_eq!(b.members().len(), 1, "b learned nothing");
    assert!(b.membership_entries().is_empty());
    assert!(
        b.publish("net1", "x", record(), NOW).is_err(),
        "not on net1"
    );
}

proptest! {
    #[test]
    fn random_bytes_never_panic_nor_change_state(
        packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..20),
        prefix in any::<bool>(),
    ) {
        let mut b = node("b", 2, 1);
        for mut p in packets {
            if prefix && p.len() > 4 {
                // Get past the magic and version check now and then.
                p[..3].copy_from_slice(b"SG\x01");
            }
            b.handle_datagram(addr(1), &p, NOW);
            prop_assert!(b.handle_sync_request(addr(1), &p, NOW).is_err());
        }
        prop_assert_eq!(b.members().len(), 1);
        prop_assert!(b.membership_entries().is_empty());
        let stats = b.stats();
        prop_assert_eq!(stats.packets_sent, 0);
        prop_assert!(stats.malformed_dropped + stats.auth_failures > 0);
    }
}
