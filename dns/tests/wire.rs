//! The server on the wire: real UDP and TCP over 127.0.0.1, stub upstreams run by the tests.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use shoal_dataplane::{
    netlink::{LinkChange, Netlink},
    netns,
};
use shoal_dns::{
    DnsServer, Forwarder, ForwarderConfig, Records, ServeHandle, SharedRecords, TaskEndpoint,
    TaskScope,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::time::timeout;

const CLIENT_WAIT: Duration = Duration::from_secs(6);
const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

fn cluster() -> SharedRecords {
    SharedRecords::new(Records::from_endpoints(&[
        TaskEndpoint::new(
            "front",
            "web.1.aaa",
            "web",
            [10, 0, 1, 3],
            Some([10, 0, 1, 2]),
        ),
        TaskEndpoint::new(
            "front",
            "web.2.bbb",
            "web",
            [10, 0, 1, 4],
            Some([10, 0, 1, 2]),
        ),
        TaskEndpoint::new("back", "db.1.ccc", "db", [10, 0, 2, 3], Some([10, 0, 2, 2])),
    ]))
}

struct Running {
    server: DnsServer,
    udp: SocketAddr,
    tcp: SocketAddr,
    handle: ServeHandle,
}

fn start(records: SharedRecords, forwarder: ForwarderConfig) -> Running {
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let server = DnsServer::new(records, Forwarder::new(forwarder)).unwrap();
    let scope = TaskScope {
        networks: vec!["front".into()],
    };
    let handle = server.serve(udp, tcp, scope).unwrap();
    Running {
        server,
        udp: udp_addr,
        tcp: tcp_addr,
        handle,
    }
}

fn upstream(addr: SocketAddr) -> ForwarderConfig {
    ForwarderConfig {
        upstreams: vec![addr],
        ..ForwarderConfig::default()
    }
}

fn query(name: &str, kind: RecordType, edns_payload: Option<u16>) -> Vec<u8> {
    let mut message = Message::new(rand::random(), MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
    if let Some(payload) = edns_payload {
        let mut edns = Edns::new();
        edns.set_max_payload(payload);
        message.set_edns(edns);
    }
    message.to_vec().unwrap()
}

/// Sends a datagram and waits for the reply; `None` when nothing comes within `wait`.
async fn udp_exchange(server: SocketAddr, wire: &[u8], wait: Duration) -> Option<Vec<u8>> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.send_to(wire, server).await.unwrap();
    let mut buffer = vec![0u8; 65_535];
    let (len, _) = timeout(wait, socket.recv_from(&mut buffer))
        .await
        .ok()?
        .ok()?;
    buffer.truncate(len);
    Some(buffer)
}

async fn udp_ask(server: SocketAddr, wire: &[u8]) -> Message {
    let reply = udp_exchange(server, wire, CLIENT_WAIT)
        .await
        .expect("a UDP reply");
    let message = Message::from_vec(&reply).unwrap();
    assert_eq!(
        message.metadata.id.to_be_bytes(),
        wire[..2],
        "the reply carries the query's id"
    );
    message
}

async fn tcp_ask(server: SocketAddr, wire: &[u8]) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    write_framed(&mut stream, wire).await;
    let reply = timeout(CLIENT_WAIT, read_framed(&mut stream))
        .await
        .unwrap()
        .unwrap();
    Message::from_vec(&reply).unwrap()
}

async fn write_framed(stream: &mut TcpStream, wire: &[u8]) {
    let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(wire);
    stream.write_all(&framed).await.unwrap();
}

async fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut length = [0u8; 2];
    stream.read_exact(&mut length).await?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut reply).await?;
    Ok(reply)
}

fn a_records(message: &Message) -> Vec<Ipv4Addr> {
    let mut ips: Vec<Ipv4Addr> = message
        .answers
        .iter()
        .filter_map(|record| match record.data {
            RData::A(A(ip)) => Some(ip),
            _ => None,
        })
        .collect();
    ips.sort();
    ips
}

/// How a stub upstream behaves.
#[derive(Clone, Copy)]
enum Stub {
    /// Answers every query with one A record, EXTERNAL_IP.
    Answers,
    /// Never answers.
    Silent,
    /// Answers UDP with TC set and no records; TCP (same port) with `n` A records.
    TruncatesUdp(u8),
}

/// Runs a stub upstream on 127.0.0.1 (UDP, and TCP on the same port) until the test ends.
async fn stub_upstream(behaviour: Stub) -> SocketAddr {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_535];
        loop {
            let (len, client) = udp.recv_from(&mut buffer).await.unwrap();
            let request = Message::from_vec(&buffer[..len]).unwrap();
            let reply = match behaviour {
                Stub::Silent => continue,
                Stub::Answers => stub_answer(&request, 1),
                Stub::TruncatesUdp(_) => {
                    let mut reply = stub_answer(&request, 0);
                    reply.metadata.truncation = true;
                    reply
                }
            };
            udp.send_to(&reply.to_vec().unwrap(), client).await.unwrap();
        }
    });
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = tcp.accept().await.unwrap();
            let Ok(wire) = read_framed(&mut stream).await else {
                continue;
            };
            let request = Message::from_vec(&wire).unwrap();
            let count = match behaviour {
                Stub::TruncatesUdp(n) => n,
                _ => 1,
            };
            write_framed(&mut stream, &stub_answer(&request, count).to_vec().unwrap()).await;
        }
    });
    addr
}

fn stub_answer(request: &Message, count: u8) -> Message {
    let mut reply = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    reply.add_queries(request.queries.iter().cloned());
    let name = request.queries[0].name().clone();
    for i in 0..count {
        let ip = if count == 1 {
            EXTERNAL_IP
        } else {
            Ipv4Addr::new(198, 51, 100, i)
        };
        reply.add_answer(Record::from_rdata(name.clone(), 60, RData::A(A(ip))));
    }
    reply
}

#[tokio::test]
async fn cluster_names_over_udp_and_tcp() {
    let running = start(cluster(), ForwarderConfig::default());
    let vip = vec![Ipv4Addr::new(10, 0, 1, 2)];
    let tasks = vec![Ipv4Addr::new(10, 0, 1, 3), Ipv4Addr::new(10, 0, 1, 4)];

    let web = udp_ask(running.udp, &query("web.", RecordType::A, None)).await;
    assert_eq!(a_records(&web), vip);
    assert_eq!(web.answers[0].ttl, shoal_dns::CLUSTER_TTL_SECS);
    let all = udp_ask(running.udp, &query("tasks.web.", RecordType::A, Some(1232))).await;
    assert_eq!(a_records(&all), tasks);
    assert!(all.edns.is_some(), "an EDNS query gets an EDNS reply");
    assert_eq!(
        a_records(&tcp_ask(running.tcp, &query("TASKS.WEB.front.", RecordType::A, None)).await),
        tasks
    );
    assert_eq!(
        a_records(&tcp_ask(running.tcp, &query("web.1.aaa.", RecordType::A, None)).await),
        tasks[..1]
    );

    let aaaa = udp_ask(running.udp, &query("web.", RecordType::AAAA, None)).await;
    assert_eq!(aaaa.metadata.response_code, ResponseCode::NoError);
    assert!(aaaa.answers.is_empty());
    // `db` lives on `back`, which this task is not attached to; no upstream is configured, so an
    // NXDOMAIN here can only come from the cluster side.
    let db = udp_ask(running.udp, &query("db.", RecordType::A, None)).await;
    assert_eq!(db.metadata.response_code, ResponseCode::NXDomain);

    let stats = running.server.stats();
    assert_eq!(
        (stats.answered_locally, stats.nodata, stats.nxdomain),
        (4, 1, 1)
    );
}

#[tokio::test]
async fn external_names_are_forwarded_to_the_upstream() {
    let stub = stub_upstream(Stub::Answers).await;
    let running = start(cluster(), upstream(stub));
    let udp = udp_ask(running.udp, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(udp.metadata.response_code, ResponseCode::NoError);
    assert_eq!(a_records(&udp), [EXTERNAL_IP]);
    let tcp = tcp_ask(running.tcp, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(a_records(&tcp), [EXTERNAL_IP]);
    assert_eq!(running.server.stats().forwarded, 2);
}

#[tokio::test]
async fn a_silent_upstream_gives_servfail_within_the_overall_timeout() {
    let stub = stub_upstream(Stub::Silent).await;
    let config = upstream(stub);
    let overall = config.overall_timeout;
    let running = start(cluster(), config);
    let started = Instant::now();
    let reply = udp_ask(running.udp, &query("example.com.", RecordType::A, None)).await;
    let elapsed = started.elapsed();
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(
        elapsed < overall + Duration::from_secs(1),
        "SERVFAIL after {elapsed:?}"
    );
    assert_eq!(running.server.stats().servfail, 1);
}

#[tokio::test]
async fn a_silent_upstream_is_skipped_for_the_next_one() {
    let silent = stub_upstream(Stub::Silent).await;
    let answering = stub_upstream(Stub::Answers).await;
    let running = start(
        cluster(),
        ForwarderConfig {
            upstreams: vec![silent, answering],
            try_timeout: Duration::from_millis(300),
            ..ForwarderConfig::default()
        },
    );
    let started = Instant::now();
    let reply = udp_ask(running.udp, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(a_records(&reply), [EXTERNAL_IP]);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the silent one was asked first"
    );
    assert_eq!(running.server.stats().forwarded, 1);
}

#[tokio::test]
async fn beyond_the_in_flight_cap_clients_get_servfail_at_once() {
    let stub = stub_upstream(Stub::Silent).await;
    let running = start(
        cluster(),
        ForwarderConfig {
            max_in_flight: 1,
            ..upstream(stub)
        },
    );
    let first = query("a.example.", RecordType::A, None);
    let held = tokio::spawn(async move { udp_exchange(running.udp, &first, CLIENT_WAIT).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let reply = udp_ask(running.udp, &query("b.example.", RecordType::A, None)).await;
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_secs(1));
    held.abort();
}

#[tokio::test]
async fn a_truncated_upstream_answer_is_fetched_over_tcp_and_fitted_to_the_client() {
    let stub = stub_upstream(Stub::TruncatesUdp(100)).await;
    let running = start(cluster(), upstream(stub));
    // The client advertised 4096 bytes: the full answer (about 1.6 kB) fits.
    let large = udp_ask(
        running.udp,
        &query("many.example.", RecordType::A, Some(4096)),
    )
    .await;
    assert!(!large.metadata.truncation);
    assert_eq!(large.answers.len(), 100);
    // No EDNS: 512 bytes at most, so TC, and the client's TCP retry gets everything.
    let small = udp_ask(running.udp, &query("many.example.", RecordType::A, None)).await;
    assert!(small.metadata.truncation);
    let tcp = tcp_ask(running.tcp, &query("many.example.", RecordType::A, None)).await;
    assert_eq!(tcp.answers.len(), 100);
}

#[tokio::test]
async fn malformed_queries_get_formerr_or_nothing_and_serving_goes_on() {
    let running = start(cluster(), ForwarderConfig::default());
    let mut bad_label = query("web.", RecordType::A, None);
    bad_label[12] = 0x40; // label type 01: reserved, undecodable
    let malformed: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xde, 0xad, 0xbe, 0xef, 0x01],
        vec![0, 9, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0], // one question announced, none there
        bad_label,
        (0..300u32).map(|i| (i * 7919 % 251) as u8).collect(),
    ];
    for wire in &malformed {
        if let Some(reply) = udp_exchange(running.udp, wire, Duration::from_millis(300)).await {
            let reply = Message::from_vec(&reply).unwrap();
            assert_eq!(reply.metadata.response_code, ResponseCode::FormErr);
        }
        let good = udp_ask(running.udp, &query("web.", RecordType::A, None)).await;
        assert_eq!(a_records(&good), [Ipv4Addr::new(10, 0, 1, 2)]);
    }
    // Over TCP, the connection gets FORMERR (or is closed) and the next connection is served.
    let mut stream = TcpStream::connect(running.tcp).await.unwrap();
    write_framed(&mut stream, &malformed[3]).await;
    if let Ok(Ok(reply)) = timeout(CLIENT_WAIT, read_framed(&mut stream)).await {
        assert_eq!(
            Message::from_vec(&reply).unwrap().metadata.response_code,
            ResponseCode::FormErr
        );
    }
    assert_eq!(
        a_records(&tcp_ask(running.tcp, &query("web.", RecordType::A, None)).await).len(),
        1
    );
    assert!(running.server.stats().formerr >= 2);
}

#[tokio::test]
async fn a_stopped_server_answers_no_more() {
    let running = start(cluster(), ForwarderConfig::default());
    udp_ask(running.udp, &query("web.", RecordType::A, None)).await;
    running.handle.stop();
    tokio::task::yield_now().await;
    let reply = udp_exchange(
        running.udp,
        &query("web.", RecordType::A, None),
        Duration::from_millis(500),
    )
    .await;
    assert!(reply.is_none());
}

/// A named network namespace for one test, deleted when dropped.
/// A named network namespace (lo up) for one test, removed when it ends.
struct TestNetns(String);

impl TestNetns {
    fn create() -> Self {
        let name = format!("shoal-dns-test-{}", std::process::id());
        netns::create_named(&name).expect("creating a network namespace (needs root)");
        let netns = Self(name);
        netns
            .run(|| {
                let mut netlink = Netlink::open()?;
                let lo = netlink.index_of("lo")?;
                let up = LinkChange {
                    up: Some(true),
                    ..LinkChange::default()
                };
                Ok(netlink.set_link(lo, &up)?)
            })
            .unwrap();
        netns
    }

    fn path(&self) -> std::path::PathBuf {
        Path::new("/run/netns").join(&self.0)
    }

    /// Runs `body` on a thread inside the namespace (a socket made there stays there).
    fn run<T: Send>(&self, body: impl FnOnce() -> anyhow::Result<T> + Send) -> anyhow::Result<T> {
        netns::run_in_file(&std::fs::File::open(self.path())?, body)
    }

    /// The embedded DNS's sockets, bound at 127.0.0.11:53 inside the namespace.
    fn bind_embedded_dns(&self) -> (std::net::UdpSocket, std::net::TcpListener) {
        self.run(|| {
            let udp = std::net::UdpSocket::bind(shoal_dns::EMBEDDED_DNS_ADDR)?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(shoal_dns::EMBEDDED_DNS_ADDR)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })
        .unwrap()
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = netns::delete_named(&self.0);
    }
}

/// A query sent from inside the namespace (from a blocking thread that enters it, never from
/// a pooled runtime thread, which would stay there).
async fn ask_from_netns(netns: std::path::PathBuf, wire: Vec<u8>) -> Message {
    let reply = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(netns).unwrap();
        netns::run_in_file(&file, || {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
            socket.set_read_timeout(Some(CLIENT_WAIT))?;
            socket.send_to(&wire, shoal_dns::EMBEDDED_DNS_ADDR)?;
            let mut buffer = vec![0u8; 65_535];
            let len = socket.recv(&mut buffer)?;
            buffer.truncate(len);
            Ok(buffer)
        })
        .unwrap()
    })
    .await
    .unwrap();
    Message::from_vec(&reply).unwrap()
}

#[tokio::test]
async fn serves_a_task_namespace_and_forwards_from_the_host() {
    let netns = TestNetns::create();
    // The stub listens on the host's loopback, which the task's namespace cannot reach: the
    // answer proves forwarding leaves from the agent's namespace.
    let stub = stub_upstream(Stub::Answers).await;
    let (udp, tcp) = netns.bind_embedded_dns();
    let server = DnsServer::new(cluster(), Forwarder::new(upstream(stub))).unwrap();
    let scope = TaskScope {
        networks: vec!["front".into()],
    };
    let _handle = server.serve(udp, tcp, scope).unwrap();
    let web = ask_from_netns(netns.path(), query("web.", RecordType::A, None)).await;
    assert_eq!(a_records(&web), [Ipv4Addr::new(10, 0, 1, 2)]);
    let external = ask_from_netns(netns.path(), query("example.com.", RecordType::A, None)).await;
    assert_eq!(a_records(&external), [EXTERNAL_IP]);
}

/// Latency of cluster answers over UDP, one client, sequential queries. Run by hand:
/// `cargo test --release -p shoal-dns --test wire -- --ignored --nocapture local_answer_latency`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn local_answer_latency() {
    let endpoints: Vec<_> = (0..2_000u32)
        .map(|i| {
            let [_, _, high, low] = i.to_be_bytes();
            TaskEndpoint::new(
                "front",
                &format!("s{}.1.t{i}", i % 200),
                &format!("s{}", i % 200),
                [10, 1, high, low],
                None,
            )
        })
        .collect();
    let running = start(
        SharedRecords::new(Records::from_endpoints(&endpoints)),
        ForwarderConfig::default(),
    );
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(running.udp).await.unwrap();
    let mut buffer = vec![0u8; 65_535];
    let mut samples = Vec::new();
    for i in 0..20_000 {
        let wire = query(&format!("tasks.s{}.", i % 200), RecordType::A, Some(1232));
        let started = Instant::now();
        socket.send(&wire).await.unwrap();
        socket.recv(&mut buffer).await.unwrap();
        samples.push(started.elapsed());
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "{} queries, 2,000 endpoints, 10 A records each: p50 {:?} p99 {:?} p99.9 {:?} max {:?}",
        samples.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        samples[samples.len() - 1]
    );
}
