//! Kernel programs run by the kernel (BPF_PROG_TEST_RUN) on crafted packets: the ingress
//! classifier and its restart path (pinned maps reused, pinned link updated in place), and
//! the VIP echo responder against a VIP programmed in the live maps. Needs root and bpffs.

mod support;

use std::{collections::BTreeSet, net::Ipv4Addr};

use etherparse::{Ethernet2Header, PacketBuilder, PacketBuilderStep};
use shoal_dataplane::{vxlan_peers::VxlanPeers, Dataplane, DataplaneStatus};
use support::{checksum_ok, config, in_private_netns, require_root};

const CLIENT: [u8; 4] = [192, 168, 77, 100];
const PEER: [u8; 4] = [192, 168, 77, 12];
const STRANGER: [u8; 4] = [192, 168, 77, 66];

fn packets(status: &DataplaneStatus, verdict: &str) -> u64 {
    status
        .counters
        .iter()
        .find(|c| c.verdict == verdict)
        .unwrap_or_else(|| panic!("no counter for verdict {verdict}"))
        .packets
}

fn eth() -> PacketBuilderStep<Ethernet2Header> {
    PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
}

fn udp4(dport: u16) -> Vec<u8> {
    let builder = eth()
        .ipv4([192, 168, 77, 100], [192, 168, 77, 11], 64)
        .udp(40000, dport);
    let mut out = Vec::new();
    builder.write(&mut out, b"payload").unwrap();
    out
}

fn tcp4(dport: u16) -> Vec<u8> {
    let builder = eth()
        .ipv4([192, 168, 77, 100], [192, 168, 77, 11], 64)
        .tcp(40000, dport, 1, 65535);
    let mut out = Vec::new();
    builder.write(&mut out, b"").unwrap();
    out
}

fn udp6(dport: u16) -> Vec<u8> {
    let builder = eth().ipv6([0xfd; 16], [0xfe; 16], 64).udp(40000, dport);
    let mut out = Vec::new();
    builder.write(&mut out, b"payload").unwrap();
    out
}

/// A VXLAN datagram from `src` on `vni`, carrying a broadcast frame.
fn vxlan(src: [u8; 4], vni: u32) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0];
    payload.extend(&(vni << 8).to_be_bytes());
    let mut inner = Vec::new();
    PacketBuilder::ethernet2([2, 0x42, 10, 0, 1, 9], [0xff; 6])
        .ipv4([10, 0, 1, 9], [10, 0, 1, 255], 64)
        .udp(5000, 5000)
        .write(&mut inner, b"inner")
        .unwrap();
    payload.extend(inner);
    let mut out = Vec::new();
    eth()
        .ipv4(src, [192, 168, 77, 11], 64)
        .udp(40000, 4789)
        .write(&mut out, &payload)
        .unwrap();
    out
}

/// Sends `packet` through the program and returns which counter moved, checking that the
/// program names the same verdict and passes the packet unchanged (or drops it, for the
/// verdicts that drop).
fn verdict_of(dataplane: &Dataplane, packet: &[u8]) -> String {
    let before = dataplane.status().unwrap();
    let run = dataplane
        .test_run_ingress(packet)
        .unwrap_or_else(|e| panic!("test run of {packet:02x?}: {e:#}"));
    let expected_code = if run.verdict.dropped() { 2 } else { 0 };
    assert_eq!(run.code, expected_code, "{:?}", run.verdict);
    assert_eq!(run.frame, packet, "classified packets are never changed");
    let after = dataplane.status().unwrap();
    let moved: Vec<_> = after
        .counters
        .iter()
        .filter(|c| packets(&before, &c.verdict) != c.packets)
        .collect();
    assert_eq!(
        moved.len(),
        1,
        "exactly one counter moves per packet: {moved:?}"
    );
    assert_eq!(moved[0].packets, packets(&before, &moved[0].verdict) + 1);
    assert_eq!(
        moved[0].verdict,
        run.verdict.name(),
        "cb[0] names the counted verdict"
    );
    moved[0].verdict.clone()
}

/// The data-path port takes VXLAN only from the nodes the agent lists for its VNI.
fn accept(dataplane: &Dataplane, vni: u32, vteps: &[[u8; 4]]) -> VxlanPeers {
    let mut peers = VxlanPeers::open(&dataplane.config().maps_dir()).unwrap();
    let vteps: BTreeSet<Ipv4Addr> = vteps.iter().map(|v| Ipv4Addr::from(*v)).collect();
    peers.sync(vni, &vteps, false).unwrap();
    peers
}

#[test]
fn classifies_by_destination_port_and_protocol() {
    in_private_netns("ports", |pins| {
        let dp = Dataplane::start(config(pins)).unwrap();
        accept(&dp, 4096, &[CLIENT]);
        assert_eq!(verdict_of(&dp, &vxlan(CLIENT, 4096)), "overlay");
        assert_eq!(
            verdict_of(&dp, &udp6(4789)),
            "other",
            "the data path is IPv4 only"
        );
        assert_eq!(verdict_of(&dp, &tcp4(4789)), "other", "VXLAN is UDP only");
        assert_eq!(verdict_of(&dp, &udp4(7946)), "control");
        assert_eq!(verdict_of(&dp, &tcp4(7946)), "control");
        assert_eq!(verdict_of(&dp, &tcp4(2377)), "control");
        assert_eq!(
            verdict_of(&dp, &udp4(2377)),
            "other",
            "the manager port is TCP only"
        );
        assert_eq!(verdict_of(&dp, &tcp4(80)), "other");
    });
}

#[test]
fn odd_and_broken_packets_pass_untouched() {
    in_private_netns("odd", |pins| {
        let dp = Dataplane::start(config(pins)).unwrap();

        let mut arp = vec![0xffu8; 12];
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0; 28]);
        assert_eq!(verdict_of(&dp, &arp), "other");

        // VLAN-tagged VXLAN is still overlay traffic, checked for membership alike.
        accept(&dp, 4096, &[CLIENT]);
        let tag = |plain: Vec<u8>| {
            let mut tagged = plain[..12].to_vec();
            tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
            tagged.extend_from_slice(&plain[12..]);
            tagged
        };
        assert_eq!(verdict_of(&dp, &tag(vxlan(CLIENT, 4096))), "overlay");
        assert_eq!(
            verdict_of(&dp, &tag(vxlan(STRANGER, 4096))),
            "vxlan_not_member"
        );

        // IPv4 header length below 20 bytes.
        let mut bad_ihl = udp4(4789);
        bad_ihl[14] = 0x43;
        assert_eq!(verdict_of(&dp, &bad_ihl), "malformed");

        // Cut inside the UDP header. (A frame cut inside the IPv4 header is refused by
        // BPF_PROG_TEST_RUN itself, so the bad IHL above stands in for it.)
        assert_eq!(verdict_of(&dp, &udp4(4789)[..14 + 20 + 2]), "malformed");

        // A later fragment has no UDP header to match, whatever its bytes say.
        let mut fragment = udp4(4789);
        fragment[14 + 6] = 0x00;
        fragment[14 + 7] = 0x10;
        assert_eq!(verdict_of(&dp, &fragment), "fragment");
    });
}

#[test]
fn vxlan_passes_only_from_members_of_its_vni() {
    in_private_netns("vxlan-members", |pins| {
        let dp = Dataplane::start(config(pins)).unwrap();
        // Before the agent lists anyone, no VXLAN enters.
        assert_eq!(verdict_of(&dp, &vxlan(PEER, 4096)), "vxlan_not_member");
        let mut peers = accept(&dp, 4096, &[PEER]);
        assert_eq!(verdict_of(&dp, &vxlan(PEER, 4096)), "overlay");
        for (what, frame) in [
            ("another source", vxlan(STRANGER, 4096)),
            ("a member of another VNI", vxlan(PEER, 4097)),
            ("a header too short to name a VNI", udp4(4789)),
        ] {
            assert_eq!(verdict_of(&dp, &frame), "vxlan_not_member", "{what}");
        }
        // A first fragment carries the UDP header: refused alike, so its datagram can never
        // be reassembled; a member's passes.
        let first_fragment = |src| {
            let mut frame = vxlan(src, 4096);
            frame[14 + 6] = 0x20;
            frame
        };
        assert_eq!(
            verdict_of(&dp, &first_fragment(STRANGER)),
            "vxlan_not_member"
        );
        assert_eq!(verdict_of(&dp, &first_fragment(PEER)), "overlay");

        // While an agent catches up after a restart, members are only added.
        let later: BTreeSet<Ipv4Addr> = [Ipv4Addr::from(STRANGER)].into();
        assert_eq!(peers.sync(4096, &later, true).unwrap(), (1, 0));
        assert_eq!(verdict_of(&dp, &vxlan(PEER, 4096)), "overlay");
        // Then the list is exact: a node that left is refused at once.
        assert_eq!(peers.sync(4096, &later, false).unwrap(), (0, 1));
        assert_eq!(verdict_of(&dp, &vxlan(PEER, 4096)), "vxlan_not_member");
        assert_eq!(verdict_of(&dp, &vxlan(STRANGER, 4096)), "overlay");

        // A new agent reads what the map holds; the status counts it.
        let reopened = VxlanPeers::open(&dp.config().maps_dir()).unwrap();
        assert_eq!(reopened.programmed(), peers.programmed());
        let status = dp.status().unwrap();
        let map = status
            .maps
            .iter()
            .find(|m| m.name == "VXLAN_PEERS")
            .unwrap();
        assert_eq!(map.entries, Some(1), "entries are counted, not capacity");
        let refused = status
            .counters
            .iter()
            .find(|c| c.verdict == "vxlan_not_member")
            .unwrap();
        assert!(refused.refusal && refused.dropped && refused.packets == 6);
    });
}

#[test]
fn restart_reuses_pinned_maps_and_replaces_the_program_in_place() {
    in_private_netns("restart", |pins| {
        let first = Dataplane::start(config(pins.clone())).unwrap();
        assert!(
            !first.replaced_link(),
            "a fresh root has no link to take over"
        );
        accept(&first, 4096, &[CLIENT]);
        for _ in 0..3 {
            first.test_run_ingress(&vxlan(CLIENT, 4096)).unwrap();
        }
        let before = first.status().unwrap();
        assert!(before.programs[0].attached, "{before:?}");
        drop(first);

        // Maps of an older layout, as an upgrade finds them, go; other names stay.
        std::fs::create_dir_all(pins.join("maps-v1/inner")).unwrap();
        std::fs::create_dir_all(pins.join("maps-vnext")).unwrap();
        let second = Dataplane::start(config(pins.clone())).unwrap();
        assert!(!pins.join("maps-v1").exists(), "old maps unpinned");
        assert!(pins.join("maps-vnext").exists() && second.config().maps_dir().exists());
        assert!(second.replaced_link());
        let after = second.status().unwrap();
        assert_eq!(
            packets(&after, "overlay"),
            3,
            "counters survive the restart"
        );
        assert_eq!(
            before.maps.iter().map(|m| m.map_id).collect::<Vec<_>>(),
            after.maps.iter().map(|m| m.map_id).collect::<Vec<_>>(),
            "the same kernel maps are reused"
        );
        assert_eq!(
            before.programs[0].link_id, after.programs[0].link_id,
            "same link"
        );
        assert_ne!(
            before.programs[0].program_id, after.programs[0].program_id,
            "the link now runs the newly loaded program"
        );
        assert!(after.programs[0].attached);
        let (_, on_hook) =
            aya::programs::SchedClassifier::query_tcx("lo", aya::programs::TcAttachType::Ingress)
                .unwrap();
        assert_eq!(
            on_hook.len(),
            1,
            "the old program was replaced, not stacked"
        );
    });
}

#[test]
fn refuses_a_root_outside_bpffs() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let err = Dataplane::start(config(dir.path().join("pins")))
        .err()
        .expect("must fail");
    assert!(
        format!("{err:#}").contains("not on a bpffs mount"),
        "{err:#}"
    );
}

/// TC_ACT_UNSPEC: on to the next program of the hook (or the stack).
const TC_ACT_NEXT: u32 = u32::MAX;
const TC_ACT_REDIRECT: u32 = 7;
const TASK_MAC: [u8; 6] = [0x02, 0x42, 10, 0, 1, 7];

fn echo_request(to: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(TASK_MAC, [0xff; 6])
        .ipv4([10, 0, 1, 7], to, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut out, b"ping payload")
        .unwrap();
    out
}

fn arp_request(target: [u8; 4]) -> Vec<u8> {
    let mut frame = vec![0xff; 6];
    frame.extend(TASK_MAC);
    frame.extend([0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend(TASK_MAC);
    frame.extend([10, 0, 1, 7]);
    frame.extend([0; 6]);
    frame.extend(target);
    frame
}

/// The ARP reply `answer` must be, for `target`, to the task that asked.
fn assert_arp_reply(answer: &[u8], target: [u8; 4]) {
    let target_mac = [0x02, 0x42, target[0], target[1], target[2], target[3]];
    assert_eq!(&answer[0..6], &TASK_MAC);
    assert_eq!(&answer[6..12], &target_mac);
    assert_eq!(&answer[20..22], &[0, 2], "ARP reply");
    assert_eq!(&answer[22..28], &target_mac);
    assert_eq!(&answer[28..32], &target);
    assert_eq!(&answer[32..38], &TASK_MAC);
    assert_eq!(&answer[38..42], &[10, 0, 1, 7]);
}

#[test]
fn vips_answer_ping_and_arp_and_nothing_else_is_touched() {
    use shoal_dataplane::{
        overlay_endpoints::OverlayEndpoints, socket_lb::VipTable, vip_echo::VipEcho,
    };
    in_private_netns("echo", |pins| {
        let dp = Dataplane::start(config(pins)).unwrap();
        let maps = dp.config().maps_dir();
        let mut vips = VipTable::open(&maps).unwrap();
        vips.set("10.0.1.2".parse().unwrap(), &["10.0.1.3".parse().unwrap()])
            .unwrap();
        vips.set("10.0.1.9".parse().unwrap(), &[]).unwrap();
        let echo = VipEcho::load(&maps).unwrap();

        // An echo request to the VIP comes back as the reply, addressed to the task.
        let request = echo_request([10, 0, 1, 2]);
        let (code, reply) = echo.test_run(&request).unwrap();
        assert_eq!(code, TC_ACT_REDIRECT);
        assert_eq!(reply.len(), request.len());
        assert_eq!(&reply[0..6], &TASK_MAC, "back to the task's MAC");
        assert_eq!(&reply[26..30], &[10, 0, 1, 2], "from the VIP");
        assert_eq!(&reply[30..34], &[10, 0, 1, 7], "to the task");
        assert_eq!(reply[34], 0, "echo reply");
        assert!(checksum_ok(&reply[14..34]), "IPv4 header checksum");
        assert!(checksum_ok(&reply[34..]), "ICMP checksum");
        assert_eq!(&reply[42..], b"ping payload");

        // ARP for the VIP is answered with its derived MAC, and so is ARP for an endpoint
        // on another node: no neighbour entry stands in for it.
        let (code, answer) = echo.test_run(&arp_request([10, 0, 1, 2])).unwrap();
        assert_eq!(code, TC_ACT_REDIRECT);
        assert_arp_reply(&answer, [10, 0, 1, 2]);
        let mut remote = OverlayEndpoints::open(&maps).unwrap();
        remote.set("10.0.1.4".parse().unwrap(), 4096).unwrap();
        let (code, answer) = echo.test_run(&arp_request([10, 0, 1, 4])).unwrap();
        assert_eq!(code, TC_ACT_REDIRECT);
        assert_arp_reply(&answer, [10, 0, 1, 4]);
        assert_eq!(
            remote.of_network(4096).unwrap(),
            ["10.0.1.4".parse::<std::net::Ipv4Addr>().unwrap()]
        );
        remote.remove("10.0.1.4".parse().unwrap()).unwrap();

        // Untouched, and on to the next program: pings to other addresses, a VIP without
        // backends, ARP for local or withdrawn endpoints, other traffic, truncated frames.
        for frame in [
            echo_request([10, 0, 1, 3]),
            echo_request([10, 0, 1, 9]),
            arp_request([10, 0, 1, 3]),
            arp_request([10, 0, 1, 4]),
            udp4(53),
            // The IP header whole (the kernel wants it), the ICMP header cut short.
            echo_request([10, 0, 1, 2])[..38].to_vec(),
            arp_request([10, 0, 1, 2])[..20].to_vec(),
        ] {
            let (code, out) = echo
                .test_run(&frame)
                .unwrap_or_else(|e| panic!("{} bytes: {e:#}", frame.len()));
            assert_eq!(code, TC_ACT_NEXT, "{frame:02x?}");
            assert_eq!(out, frame, "a frame not for a VIP is left as it was");
        }
    })
}
