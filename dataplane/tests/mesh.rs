//! The routing mesh's programs run by the kernel (BPF_PROG_TEST_RUN) against live maps: a
//! published port balanced by Maglev and rewritten with valid checksums, flows kept on their
//! backend across backend changes, replies translated back, SNAT, the origin MAC on the
//! backend's node, and everything else left untouched, including thousands of random and
//! mutated packets. Needs root and bpffs.

mod support;

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
use shoal_common::names;
use shoal_dataplane::{
    mesh::{MeshLimits, MeshPrograms, MeshTable, Protocol, PublishedService},
    Dataplane,
};
use support::{checksum_ok, config, in_private_netns};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const NODE: [u8; 4] = [192, 168, 77, 11];
const CLIENT: [u8; 4] = [192, 168, 77, 100];
const NODE_INGRESS: [u8; 4] = [10, 0, 0, 2];
const B1: [u8; 4] = [10, 0, 0, 5];
const B2: [u8; 4] = [10, 0, 0, 6];
const ORIGIN_MAC: [u8; 6] = [0x02, 0x42, 10, 0, 0, 3];

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2(ORIGIN_MAC, [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 65535);
    let builder = if syn { builder.syn() } else { builder.ack(1) };
    let mut out = Vec::new();
    builder.write(&mut out, b"hello").unwrap();
    out
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(ORIGIN_MAC, [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sport, dport)
        .write(&mut out, b"query")
        .unwrap();
    out
}

/// Addresses and ports of an IPv4 TCP/UDP frame, after checking every checksum.
fn endpoints(frame: &[u8]) -> ([u8; 4], u16, [u8; 4], u16) {
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    assert!(checksum_ok(&frame[14..14 + ihl]), "IPv4 header checksum");
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let segment = &frame[14 + ihl..14 + total];
    let mut pseudo = Vec::new();
    pseudo.extend(&frame[26..34]);
    pseudo.extend([0, frame[23]]);
    pseudo.extend((segment.len() as u16).to_be_bytes());
    pseudo.extend(segment);
    let udp_without_checksum = frame[23] == 17 && segment[6..8] == [0, 0];
    assert!(
        udp_without_checksum || checksum_ok(&pseudo),
        "transport checksum"
    );
    let packet = SlicedPacket::from_ethernet(frame).expect("parses");
    let (sport, dport) = match packet.transport {
        Some(TransportSlice::Tcp(t)) => (t.source_port(), t.destination_port()),
        Some(TransportSlice::Udp(u)) => (u.source_port(), u.destination_port()),
        other => panic!("not TCP/UDP: {other:?}"),
    };
    let src: [u8; 4] = frame[26..30].try_into().unwrap();
    let dst: [u8; 4] = frame[30..34].try_into().unwrap();
    (src, sport, dst, dport)
}

fn service(target: u16, snat: bool, backends: &[[u8; 4]]) -> PublishedService {
    PublishedService {
        target,
        snat,
        backends: backends.iter().map(|b| Ipv4Addr::from(*b)).collect(),
    }
}

struct Mesh {
    dataplane: Dataplane,
    table: MeshTable,
    programs: MeshPrograms,
}

impl Mesh {
    fn start(pins: std::path::PathBuf) -> Self {
        let dataplane = Dataplane::start(config(pins)).unwrap();
        let maps = dataplane.config().maps_dir();
        let mut table = MeshTable::open(&maps, MeshLimits::default()).unwrap();
        // `lo` (index 1 in a fresh namespace) stands for both interfaces.
        table.set_advertise(NODE.into(), 1).unwrap();
        table.set_ingress(NODE_INGRESS.into(), 1).unwrap();
        let programs = MeshPrograms::load(&maps).unwrap();
        Mesh {
            dataplane,
            table,
            programs,
        }
    }

    fn publish(&mut self, ports: &[((Protocol, u16), PublishedService)]) {
        let wanted: BTreeMap<_, _> = ports.iter().cloned().collect();
        self.table.sync(&wanted).unwrap();
    }

    fn ingress(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let run = self.dataplane.test_run_ingress(frame).unwrap();
        (run.code, run.frame)
    }

    fn run(&self, program: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.programs.test_run(program, frame).unwrap()
    }
}

#[test]
fn published_ports_are_balanced_tracked_and_translated_back() {
    in_private_netns("mesh", |pins| {
        let mut mesh = Mesh::start(pins);
        mesh.publish(&[((Protocol::Tcp, 8080), service(80, false, &[B1, B2]))]);

        // New flows spread over both backends, rewritten to backend:80 from the client.
        let mut chosen: HashMap<u16, [u8; 4]> = HashMap::new();
        for port in 40_000..40_200 {
            let (code, out) = mesh.ingress(&tcp(CLIENT, port, NODE, 8080, true));
            assert_eq!(code, TC_ACT_REDIRECT, "sent into the ingress network");
            let (src, sport, dst, dport) = endpoints(&out);
            assert_eq!((src, sport), (CLIENT, port), "the client's address is kept");
            assert!(dst == B1 || dst == B2);
            assert_eq!(dport, 80);
            chosen.insert(port, dst);
        }
        let on_b1 = chosen.values().filter(|b| **b == B1).count();
        assert!(
            (60..140).contains(&on_b1),
            "{on_b1} of 200 flows on one of two backends"
        );

        // Tracked flows keep their backend when B2 leaves; new flows all go to B1.
        mesh.publish(&[((Protocol::Tcp, 8080), service(80, false, &[B1]))]);
        for (port, backend) in &chosen {
            let (_, out) = mesh.ingress(&tcp(CLIENT, *port, NODE, 8080, false));
            assert_eq!(endpoints(&out).2, *backend, "an established flow stays put");
        }
        for port in 41_000..41_050 {
            let (_, out) = mesh.ingress(&tcp(CLIENT, port, NODE, 8080, true));
            assert_eq!(endpoints(&out).2, B1, "a stopped backend gets no new flow");
        }

        // The backend's reply arrives at the node's ingress endpoint: from the published
        // port, to the client, out of the advertise interface.
        let (port, backend) = chosen.iter().next().unwrap();
        let (code, out) = mesh.run(names::MESH_REPLY, &tcp(*backend, 80, CLIENT, *port, false));
        assert_eq!(code, TC_ACT_REDIRECT);
        assert_eq!(endpoints(&out), (NODE, 8080, CLIENT, *port));
        let flows = mesh.table.flows().unwrap();
        assert!(flows.iter().any(|f| f.client.port() == *port
            && f.backend.ip().octets() == *backend
            && f.state == "established"));

        // A reply nobody translated is left alone.
        let stray = tcp(B1, 80, CLIENT, 1, false);
        assert_eq!(mesh.run(names::MESH_REPLY, &stray), (TC_ACT_OK, stray));

        let listed = mesh.table.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].counters.flows, 250);
        assert_eq!(listed[0].counters.packets_out, 1);
    });
}

#[test]
fn a_trace_runs_the_attached_program_and_leaves_no_flow_behind() {
    use shoal_dataplane::mesh::TraceRequest;
    in_private_netns("mesh-trace", |pins| {
        let mut mesh = Mesh::start(pins);
        mesh.publish(&[((Protocol::Tcp, 8080), service(80, false, &[B1, B2]))]);
        let request = TraceRequest {
            protocol: Protocol::Tcp,
            source: "192.168.77.100:40000".parse().unwrap(),
            destination: "192.168.77.11:8080".parse().unwrap(),
        };
        let Mesh {
            dataplane, table, ..
        } = &mut mesh;
        let traced = table
            .trace(&request, |frame| dataplane.test_run_ingress(frame))
            .unwrap();
        assert_eq!(
            (traced.verdict.as_str(), traced.reason.as_str()),
            ("redirect", "mesh")
        );
        let backend = traced.backend.expect("a backend");
        assert!([B1, B2].contains(&backend.ip().octets()) && backend.port() == 80);
        assert_eq!(traced.source_seen, Some(request.source));
        assert_eq!(
            traced.packet_out,
            format!("tcp 192.168.77.100:40000 -> {backend}")
        );
        assert!(traced.slot.is_some() && !traced.tracked);
        assert!(table.flows().unwrap().is_empty(), "the trace left a flow");

        let closed = TraceRequest {
            destination: "192.168.77.11:8081".parse().unwrap(),
            ..request
        };
        let traced = table
            .trace(&closed, |frame| dataplane.test_run_ingress(frame))
            .unwrap();
        assert_eq!((traced.verdict.as_str(), traced.backend), ("pass", None));
        assert_eq!(traced.reason, "other");

        // A published port without a running task says so.
        table
            .sync(&[((Protocol::Tcp, 8081), service(80, false, &[]))].into())
            .unwrap();
        let traced = table
            .trace(&closed, |frame| dataplane.test_run_ingress(frame))
            .unwrap();
        assert_eq!(
            (traced.verdict.as_str(), traced.reason.as_str()),
            ("pass", "no_backend")
        );
    });
}

/// shoal's own ports are never translated, even with entries the control plane would never
/// write (it refuses to publish them): gossip, the manager API and VXLAN keep reaching the
/// node, and VXLAN is still checked for membership.
#[test]
fn shoals_own_ports_are_never_translated_whatever_the_map_says() {
    in_private_netns("mesh-reserved", |pins| {
        let mut mesh = Mesh::start(pins);
        let crafted = [
            ((Protocol::Tcp, 2377), service(80, false, &[B1])),
            ((Protocol::Tcp, 7946), service(80, false, &[B1])),
            ((Protocol::Udp, 7946), service(80, false, &[B1])),
            ((Protocol::Udp, 4789), service(80, true, &[B1])),
        ];
        mesh.publish(&crafted);
        for frame in [
            tcp(CLIENT, 1, NODE, 2377, true),
            tcp(CLIENT, 1, NODE, 7946, true),
            udp(CLIENT, 1, NODE, 7946),
        ] {
            let run = mesh.dataplane.test_run_ingress(&frame).unwrap();
            assert_eq!(run.code, TC_ACT_OK);
            assert_eq!(run.frame, frame, "untouched");
            assert_eq!(run.verdict.name(), "reserved_port");
        }
        // A datagram to the data-path port from a non-member is dropped, not translated.
        let run = mesh
            .dataplane
            .test_run_ingress(&udp(CLIENT, 1, NODE, 4789))
            .unwrap();
        assert_eq!(
            (run.code, run.verdict.name()),
            (TC_ACT_SHOT, "vxlan_not_member")
        );
        assert!(mesh.table.flows().unwrap().is_empty(), "no flow was made");
        // The same ports as any other are balanced.
        mesh.publish(&[((Protocol::Tcp, 2378), service(80, false, &[B1]))]);
        let run = mesh
            .dataplane
            .test_run_ingress(&tcp(CLIENT, 1, NODE, 2378, true))
            .unwrap();
        assert_eq!((run.code, run.verdict.name()), (TC_ACT_REDIRECT, "mesh"));
    });
}

#[test]
fn udp_and_snat_translate_both_ways() {
    in_private_netns("mesh-snat", |pins| {
        let mut mesh = Mesh::start(pins);
        mesh.publish(&[
            ((Protocol::Udp, 5353), service(53, false, &[B1])),
            ((Protocol::Tcp, 9000), service(90, true, &[B2])),
        ]);
        let (code, out) = mesh.ingress(&udp(CLIENT, 5000, NODE, 5353));
        assert_eq!(code, TC_ACT_REDIRECT);
        assert_eq!(endpoints(&out), (CLIENT, 5000, B1, 53));
        // A UDP datagram without checksum keeps none.
        let mut bare = udp(CLIENT, 5001, NODE, 5353);
        bare[40..42].copy_from_slice(&[0, 0]);
        let (_, out) = mesh.ingress(&bare);
        assert_eq!(&out[40..42], &[0, 0]);
        assert_eq!(endpoints(&out).2, B1);

        // SNAT: the backend sees the node's ingress address; a retransmitted SYN gets the
        // same source port; the reply goes back to the client.
        let (code, out) = mesh.ingress(&tcp(CLIENT, 6000, NODE, 9000, true));
        assert_eq!(code, TC_ACT_REDIRECT);
        let (src, snat_port, dst, dport) = endpoints(&out);
        assert_eq!((src, dst, dport), (NODE_INGRESS, B2, 90));
        let (_, again) = mesh.ingress(&tcp(CLIENT, 6000, NODE, 9000, true));
        assert_eq!(endpoints(&again).1, snat_port);
        let (code, back) = mesh.run(
            names::MESH_REPLY,
            &tcp(B2, 90, NODE_INGRESS, snat_port, false),
        );
        assert_eq!(code, TC_ACT_REDIRECT);
        assert_eq!(endpoints(&back), (NODE, 9000, CLIENT, 6000));
    });
}

#[test]
fn replies_leave_the_task_towards_the_node_the_flow_came_through() {
    in_private_netns("mesh-origin", |pins| {
        let mesh = Mesh::start(pins);
        // Towards the task: the frame's source MAC is the origin node's endpoint.
        let inbound = tcp(CLIENT, 7000, B1, 80, true);
        assert_eq!(
            mesh.run(names::MESH_TO_TASK, &inbound),
            (TC_ACT_OK, inbound)
        );
        // From the task, addressed by its routing to its own node: sent to the origin.
        let reply = tcp(B1, 80, CLIENT, 7000, false);
        let (code, out) = mesh.run(names::MESH_FROM_TASK, &reply);
        assert_eq!(code, TC_ACT_OK);
        assert_eq!(&out[0..6], &ORIGIN_MAC);
        assert_eq!(&out[6..], &reply[6..]);
        // Other traffic of the task is untouched.
        let other = tcp(B1, 80, CLIENT, 7001, false);
        assert_eq!(mesh.run(names::MESH_FROM_TASK, &other), (TC_ACT_OK, other));
    });
}

#[test]
fn everything_else_passes_untouched() {
    in_private_netns("mesh-other", |pins| {
        let mut mesh = Mesh::start(pins);
        mesh.publish(&[
            ((Protocol::Tcp, 8080), service(80, false, &[B1])),
            ((Protocol::Tcp, 8081), service(80, false, &[])),
        ]);
        let mut fragment = tcp(CLIENT, 1, NODE, 8080, true);
        fragment[20] = 0x20; // more fragments
        let mut later_fragment = tcp(CLIENT, 1, NODE, 8080, true);
        later_fragment[21] = 0x10; // offset 16
        let full = tcp(CLIENT, 1, NODE, 8080, true);
        let cases = [
            ("another port", tcp(CLIENT, 1, NODE, 8082, true)),
            (
                "a published port without backends",
                tcp(CLIENT, 1, NODE, 8081, true),
            ),
            ("UDP to a TCP port", udp(CLIENT, 1, NODE, 8080)),
            (
                "another address",
                tcp(CLIENT, 1, [192, 168, 77, 12], 8080, true),
            ),
            ("a first fragment", fragment),
            ("a later fragment", later_fragment),
            // (A truncated IP header cannot be tested: BPF_PROG_TEST_RUN refuses it.)
            ("a truncated TCP header", full[..14 + 20 + 12].to_vec()),
        ];
        for (what, frame) in cases {
            assert_eq!(mesh.ingress(&frame), (TC_ACT_OK, frame), "{what}");
        }
    });
}

#[test]
fn ip_options_are_skipped_over() {
    in_private_netns("mesh-options", |pins| {
        let mut mesh = Mesh::start(pins);
        mesh.publish(&[((Protocol::Tcp, 8080), service(80, false, &[B1]))]);
        let plain = tcp(CLIENT, 2, NODE, 8080, true);
        // The same packet with a 4-byte IPv4 option (NOPs + EOL), lengths and checksum fixed.
        let mut frame = plain[..34].to_vec();
        frame.extend([1, 1, 1, 0]);
        frame.extend(&plain[34..]);
        frame[14] = 0x46;
        let total = u16::from_be_bytes([frame[16], frame[17]]) + 4;
        frame[16..18].copy_from_slice(&total.to_be_bytes());
        frame[24..26].copy_from_slice(&[0, 0]);
        let sum = !fold(&frame[14..38]);
        frame[24..26].copy_from_slice(&sum.to_be_bytes());
        let (code, out) = mesh.ingress(&frame);
        assert_eq!(code, TC_ACT_REDIRECT);
        assert_eq!(endpoints(&out), (CLIENT, 2, B1, 80));
    });
}

fn fold(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Only addresses, ports and checksums differ between `frame` and `out`, and a valid IPv4
/// header checksum stays valid.
fn only_translation_changed(
    frame: &[u8],
    out: &[u8],
) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prelude::*;
    prop_assert_eq!(frame.len(), out.len());
    let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
    let csum = if frame[23] == 6 { l4 + 16 } else { l4 + 6 };
    let translated = [24..34, l4..l4 + 4, csum..csum + 2];
    for (i, (a, b)) in frame.iter().zip(out).enumerate() {
        if !translated.iter().any(|r| r.contains(&i)) {
            prop_assert_eq!(a, b, "byte {} changed", i);
        }
    }
    if checksum_ok(&frame[14..l4]) {
        prop_assert!(checksum_ok(&out[14..l4]));
    }
    Ok(())
}

/// Thousands of random frames and mutations of valid ones through every mesh program: no
/// crash, and a frame is either left exactly as it was, dropped, or fully rewritten with
/// valid checksums to a backend.
#[test]
fn random_packets_are_never_half_rewritten() {
    use proptest::{
        prelude::*,
        test_runner::{Config, TestRunner},
    };
    in_private_netns("mesh-random", |pins| {
        let mut mesh = Mesh::start(pins);
        mesh.publish(&[
            ((Protocol::Tcp, 8080), service(80, false, &[B1, B2])),
            ((Protocol::Udp, 8080), service(80, true, &[B1])),
        ]);
        let seeds = [
            tcp(CLIENT, 3, NODE, 8080, true),
            udp(CLIENT, 3, NODE, 8080),
            tcp(B1, 80, CLIENT, 3, false),
        ];
        let frames = prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..128),
            (
                0..seeds.len(),
                proptest::collection::vec((0..80usize, any::<u8>()), 1..4),
                0..90usize
            )
                .prop_map(move |(seed, flips, cut)| {
                    let mut frame = seeds[seed].clone();
                    for (at, value) in flips {
                        if let Some(byte) = frame.get_mut(at) {
                            *byte = value;
                        }
                    }
                    frame.truncate(frame.len().saturating_sub(cut % 20));
                    frame
                }),
        ];
        let mut runner = TestRunner::new(Config {
            cases: 4_000,
            rng_seed: proptest::test_runner::RngSeed::Fixed(7),
            ..Config::default()
        });
        runner
            .run(&frames, |frame| {
                // BPF_PROG_TEST_RUN refuses frames without a whole Ethernet header, or an
                // IPv4/IPv6 one when the EtherType says so.
                let ethertype = frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]));
                let too_short = match ethertype {
                    None => true,
                    Some(0x0800) => frame.len() < 34,
                    Some(0x86dd) => frame.len() < 54,
                    Some(_) => false,
                };
                if too_short {
                    return Ok(());
                }
                for program in [names::MESH_TO_TASK, names::MESH_FROM_TASK] {
                    let (code, out) = mesh.run(program, &frame);
                    prop_assert_eq!(code, TC_ACT_OK);
                    let kept = if program == names::MESH_TO_TASK { 0 } else { 6 };
                    prop_assert_eq!(&out[kept..], &frame[kept..]);
                }
                // A reply the mesh translated comes from the node's published port.
                let (code, out) = mesh.run(names::MESH_REPLY, &frame);
                match code {
                    TC_ACT_OK => prop_assert_eq!(&out, &frame),
                    TC_ACT_REDIRECT => {
                        prop_assert_eq!(&out[26..30], &NODE);
                        only_translation_changed(&frame, &out)?;
                    }
                    other => prop_assert!(false, "unexpected verdict {other}"),
                }
                let (code, out) = mesh.ingress(&frame);
                match code {
                    TC_ACT_OK | TC_ACT_SHOT => prop_assert_eq!(&out, &frame),
                    TC_ACT_REDIRECT => {
                        let l4 = 14 + usize::from(frame[14] & 0x0f) * 4;
                        let dst: [u8; 4] = out[30..34].try_into().unwrap();
                        prop_assert!(dst == B1 || dst == B2);
                        prop_assert_eq!(&out[l4 + 2..l4 + 4], &80u16.to_be_bytes());
                        only_translation_changed(&frame, &out)?;
                    }
                    other => prop_assert!(false, "unexpected verdict {other}"),
                }
                Ok(())
            })
            .unwrap();
    });
}

fn tcp_rst(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(ORIGIN_MAC, [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 0)
        .rst()
        .write(&mut out, &[])
        .unwrap();
    out
}

#[test]
fn flows_age_on_the_agents_clock_and_expire_by_state() {
    use shoal_dataplane::mesh::FlowTimeouts;
    in_private_netns("mesh-clock", |pins| {
        let mut mesh = Mesh::start(pins);
        mesh.publish(&[((Protocol::Tcp, 8080), service(80, false, &[B1]))]);
        let idle = |table: &MeshTable, port: u16| {
            table
                .flows()
                .unwrap()
                .into_iter()
                .find(|f| f.client.port() == port)
                .map(|f| (f.idle_secs, f.state))
        };
        // A clock that only moves when told to (its thread would tick in an hour).
        let maps = mesh.dataplane.config().maps_dir();
        let clock =
            shoal_dataplane::mesh::MeshClock::start(&maps, std::time::Duration::from_secs(3_600))
                .unwrap();
        mesh.ingress(&tcp(CLIENT, 40_000, NODE, 8080, true));
        mesh.ingress(&tcp(CLIENT, 40_001, NODE, 8080, true));
        assert_eq!(idle(&mesh.table, 40_000), Some((0, "established".into())));

        // Packets are stamped with the clock the agent last wrote, not the packet's time:
        // without a tick, a packet a second later leaves the flow a second idle.
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        mesh.ingress(&tcp(CLIENT, 40_000, NODE, 8080, false));
        assert!((1..=2).contains(&idle(&mesh.table, 40_000).unwrap().0));
        clock.tick().unwrap();
        mesh.ingress(&tcp(CLIENT, 40_000, NODE, 8080, false));
        assert_eq!(idle(&mesh.table, 40_000).unwrap().0, 0);

        // A reset flow goes after the closed timeout; established ones stay for theirs.
        mesh.ingress(&tcp_rst(CLIENT, 40_001, NODE, 8080));
        assert_eq!(idle(&mesh.table, 40_001).unwrap().1, "reset");
        let timeouts = FlowTimeouts {
            closed_secs: 0,
            ..FlowTimeouts::default()
        };
        assert_eq!(mesh.table.expire(&timeouts).unwrap(), 1);
        assert_eq!(idle(&mesh.table, 40_001), None);
        assert!(idle(&mesh.table, 40_000).is_some());

        // After an agent restart the clock has stood still: a flow is never older than the
        // table that looks at it, so a restarted agent does not expire live flows for the
        // time no agent ran. The table opened before the pause does.
        let stale = FlowTimeouts {
            established_secs: 1,
            ..FlowTimeouts::default()
        };
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        let mut restarted = MeshTable::open(&maps, MeshLimits::default()).unwrap();
        assert_eq!(restarted.expire(&stale).unwrap(), 0);
        assert_eq!(mesh.table.expire(&stale).unwrap(), 1);

        // The agent's ticking thread keeps the clock current on its own.
        drop(clock);
        let clock =
            shoal_dataplane::mesh::MeshClock::start(&maps, std::time::Duration::from_millis(20))
                .unwrap();
        mesh.ingress(&tcp(CLIENT, 40_002, NODE, 8080, true));
        std::thread::sleep(std::time::Duration::from_millis(1_100));
        mesh.ingress(&tcp(CLIENT, 40_002, NODE, 8080, false));
        assert_eq!(idle(&restarted, 40_002).unwrap().0, 0);
        drop(clock);
    });
}

#[test]
fn published_ports_are_recovered_by_a_new_table_and_unpublished_at_once() {
    in_private_netns("mesh-ports", |pins| {
        let mut mesh = Mesh::start(pins);
        let published = [
            ((Protocol::Tcp, 8080), service(80, false, &[B1, B2])),
            ((Protocol::Udp, 8080), service(53, true, &[B2])),
            ((Protocol::Tcp, 65_535), service(1, false, &[B1])),
        ];
        mesh.publish(&published);
        let maps = mesh.dataplane.config().maps_dir();
        let reopened = MeshTable::open(&maps, MeshLimits::default()).unwrap();
        assert_eq!(
            reopened.programmed(),
            published.iter().cloned().collect::<BTreeMap<_, _>>(),
            "a restarted agent finds every port, its target, mode and backends"
        );
        drop(reopened);

        // A tracked flow of a port that goes away is not carried on: its next packet is
        // left to the kernel, as a packet to any port nobody publishes.
        let (code, _) = mesh.ingress(&tcp(CLIENT, 40_000, NODE, 8080, true));
        assert_eq!(code, TC_ACT_REDIRECT);
        let (code, _) = mesh.ingress(&tcp(CLIENT, 40_000, NODE, 8080, false));
        assert_eq!(code, TC_ACT_REDIRECT, "tracked");
        mesh.publish(&published[1..]);
        let ack = tcp(CLIENT, 40_000, NODE, 8080, false);
        let (code, out) = mesh.ingress(&ack);
        assert_eq!((code, out), (TC_ACT_OK, ack), "untouched once unpublished");
        let (code, _) = mesh.ingress(&udp(CLIENT, 40_000, NODE, 8080));
        assert_eq!(
            code, TC_ACT_REDIRECT,
            "the same port over UDP is still published"
        );

        // Published again with another target: new flows go there.
        mesh.publish(&[
            ((Protocol::Tcp, 8080), service(8000, false, &[B1])),
            published[1].clone(),
        ]);
        let (code, out) = mesh.ingress(&tcp(CLIENT, 40_001, NODE, 8080, true));
        assert_eq!(code, TC_ACT_REDIRECT);
        let (_, _, backend, port) = endpoints(&out);
        assert_eq!((backend, port), (B1, 8000));
        let (code, _) = mesh.ingress(&tcp(CLIENT, 40_000, NODE, 65_535, true));
        assert_eq!(code, TC_ACT_OK, "65535 was unpublished with 8080");
    });
}
