//! The embedded DNS in the lab, asked with `dig` (and once through libc) from inside tasks:
//! service names (the VIP), `tasks.` names, scoping to the task's networks, answers that follow
//! scaling and task deaths on every node, forwarding to an upstream (a stub the test serves in the
//! lab's client namespace), SERVFAIL for a silent upstream, FORMERR for malformed queries. One lab
//! for all of it: each costs about 20 s. Needs root.

use std::{
    collections::BTreeSet,
    fs::File,
    net::{SocketAddr, UdpSocket},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc, Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::sched::{setns, CloneFlags};
use shoal_tests::{wait_for, RunningTask, TestLab};

/// Where the stub upstream listens: the lab's client, which runs no agent.
const UPSTREAM: &str = "192.168.77.100:53";
/// The stub answers this name with [`EXTERNAL_IP`], never answers [`SILENT_NAME`], and says
/// NXDOMAIN to everything else, as a real resolver would.
const EXTERNAL_NAME: &str = "ext.example";
const EXTERNAL_IP: [u8; 4] = [203, 0, 113, 7];
const SILENT_NAME: &str = "silent.example";

/// A minimal authoritative server on UDP, in another namespace, on a thread of the test.
struct StubUpstream {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StubUpstream {
    fn start(netns: &Path, addr: SocketAddr) -> Self {
        let netns = File::open(netns).expect("the client's namespace");
        let stop = Arc::new(AtomicBool::new(false));
        let (ready, is_ready) = mpsc::channel();
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            // This thread only: it ends with the stub, so no other code runs in that namespace.
            setns(&netns, CloneFlags::CLONE_NEWNET).expect("setns");
            let socket = UdpSocket::bind(addr).expect("binding the stub upstream");
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            ready.send(()).unwrap();
            // Bounded even if the test forgets to stop it.
            let deadline = Instant::now() + Duration::from_secs(600);
            let mut buffer = [0u8; 4096];
            while !stopped.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok((len, from)) = socket.recv_from(&mut buffer) else {
                    continue;
                };
                if let Some(reply) = stub_answer(&buffer[..len]) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        is_ready.recv().expect("the stub upstream started");
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StubUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The stub's reply to one query: the question echoed, and an A record for [`EXTERNAL_NAME`].
fn stub_answer(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 || query[4..6] != [0, 1] {
        return None;
    }
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let question_end = at + 4;
    let qtype = query.get(at..at + 2)?;
    let name = labels.join(".");
    if name == SILENT_NAME {
        return None;
    }
    let found = name == EXTERNAL_NAME && qtype == [0, 1];
    let mut reply = query[..2].to_vec();
    // QR, RD copied, RA; NOERROR or NXDOMAIN.
    reply.extend([0x80 | (query[2] & 0x01), if found { 0x80 } else { 0x83 }]);
    reply.extend([0, 1, 0, u8::from(found), 0, 0, 0, 0]);
    reply.extend_from_slice(query.get(12..question_end)?);
    if found {
        // Name by pointer to the question, A, IN, TTL 60, 4 bytes.
        reply.extend([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend(EXTERNAL_IP);
    }
    Some(reply)
}

/// What `dig` got from 127.0.0.11 in a task.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: String,
    /// (TTL, type, data) of each answer record.
    answers: Vec<(u32, String, String)>,
}

impl Dig {
    fn addresses(&self) -> BTreeSet<String> {
        self.answers
            .iter()
            .filter(|(_, kind, _)| kind == "A")
            .map(|(_, _, data)| data.clone())
            .collect()
    }
}

/// `dig @127.0.0.11 ARGS` inside the task: one try, waiting longer than the agent's forwarding
/// timeout (4 s), so a silent upstream shows as the agent's SERVFAIL, not as dig's timeout.
fn dig(lab: &TestLab, task: &RunningTask, args: &[&str]) -> Dig {
    let mut command = vec![
        "dig",
        "@127.0.0.11",
        "+tries=1",
        "+timeout=8",
        "+noall",
        "+comments",
        "+answer",
    ];
    command.extend_from_slice(args);
    let out = lab.in_task(task, &command);
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |after: &str, until: char| {
        text.lines()
            .find_map(|l| l.split_once(after))
            .and_then(|(_, rest)| rest.split(until).next())
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    Dig {
        status: field("status: ", ','),
        flags: field(";; flags: ", ';'),
        answers: text
            .lines()
            .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
            .filter_map(|l| {
                let fields: Vec<&str> = l.split_whitespace().collect();
                Some((
                    fields.get(1)?.parse().ok()?,
                    fields.get(3)?.to_string(),
                    fields.get(4)?.to_string(),
                ))
            })
            .collect(),
    }
}

/// Waits until every task gets `expected` for `tasks.web` (15 s at most: gossip, not timing, is
/// under test).
fn wait_for_tasks_web(lab: &TestLab, askers: &[RunningTask], expected: &BTreeSet<String>) {
    for asker in askers {
        wait_for(
            &format!("tasks.web from {} = {expected:?}", asker.node),
            Duration::from_secs(15),
            || (dig(lab, asker, &["tasks.web"]).addresses() == *expected).then_some(()),
        );
    }
}

#[test]
fn tasks_resolve_through_the_embedded_dns() {
    let lab = TestLab::up_with("dns", 3, &["--dns-upstream", UPSTREAM]);
    let stub = StubUpstream::start(&lab.netns_path("client"), UPSTREAM.parse().unwrap());
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.exec("node1", &["shoal", "network", "create", "back"]);
    let whoami = ["shoal", "whoami", "--listen", "0.0.0.0:80"];
    lab.create_service("web", &["--replicas", "3", "--network", "front"], &whoami);
    let sleep = ["sleep", "infinity"];
    // One asking task on every node.
    lab.create_service(
        "client",
        &["--mode", "global", "--network", "front"],
        &sleep,
    );
    lab.create_service("db", &["--network", "back"], &sleep);
    let clients = lab.running_tasks("client", 3);
    let client = &clients[0];
    lab.running_tasks("db", 1);
    let web_ips = |replicas: usize| -> BTreeSet<String> {
        lab.running_tasks("web", replicas)
            .iter()
            .map(|t| t.addresses["front"].clone())
            .collect()
    };
    let vip = {
        let out = lab.exec(
            "node1",
            &["shoal", "service", "inspect", "web", "--format", "json"],
        );
        let view: serde_json::Value = serde_json::from_str(&out).unwrap();
        view["vips"][0][1].as_str().unwrap().to_owned()
    };

    // The service name: its VIP, authoritative, TTL 5 s; the same over TCP.
    let web = dig(&lab, client, &["web"]);
    assert_eq!(web.status, "NOERROR", "{web:?}");
    assert!(web.flags.split(' ').any(|f| f == "aa"), "{web:?}");
    assert_eq!(web.addresses(), BTreeSet::from([vip.clone()]));
    assert!(web.answers.iter().all(|(ttl, _, _)| *ttl == 5), "{web:?}");
    assert_eq!(
        dig(&lab, client, &["+tcp", "web"]).addresses(),
        BTreeSet::from([vip.clone()])
    );
    assert_eq!(
        dig(&lab, client, &["web.front"]).addresses(),
        BTreeSet::from([vip.clone()])
    );
    let three = web_ips(3);
    wait_for_tasks_web(&lab, &clients, &three);

    // AAAA of a cluster name: NODATA at once; PTR of a task; another network's service: NXDOMAIN.
    let aaaa = dig(&lab, client, &["web", "AAAA"]);
    assert!(
        aaaa.status == "NOERROR" && aaaa.answers.is_empty(),
        "{aaaa:?}"
    );
    let some_task = lab.running_tasks("web", 3).remove(0);
    let ptr = dig(&lab, client, &["-x", &some_task.addresses["front"]]);
    assert_eq!(
        ptr.answers.first().map(|a| a.2.as_str()),
        Some(format!("{}.", some_task.name).as_str()),
        "{ptr:?}"
    );
    assert_eq!(dig(&lab, client, &["db"]).status, "NXDOMAIN");

    // libc's resolver through the task's resolv.conf, and a name that answers HTTP.
    let out = lab.in_task(client, &["getent", "ahostsv4", "web"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&vip));
    let out = lab.in_task(client, &["curl", "-sf", "--max-time", "3", "http://web/"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Hostname: web."));

    // External names go to the upstream; its NXDOMAIN is relayed; a silent one gives SERVFAIL.
    let external = dig(&lab, client, &[EXTERNAL_NAME]);
    assert_eq!(external.status, "NOERROR", "{external:?}");
    assert_eq!(external.addresses(), BTreeSet::from(["203.0.113.7".into()]));
    assert_eq!(dig(&lab, client, &["nope.example"]).status, "NXDOMAIN");
    assert_eq!(dig(&lab, client, &[SILENT_NAME]).status, "SERVFAIL");

    // Bad input: 3 bytes are dropped; a header announcing a question it lacks gets FORMERR with
    // its id (the first and only reply read); then the server still answers.
    let exchange = concat!(
        "exec 3<>/dev/udp/127.0.0.11/53; ",
        r"printf '\x01\x02\x03' >&3; ",
        r"printf '\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00' >&3; ",
        "timeout 3 dd bs=512 count=1 status=none <&3 | od -An -tx1"
    );
    let out = lab.in_task(client, &["bash", "-c", exchange]);
    let reply = String::from_utf8_lossy(&out.stdout);
    // A bare header: id 1234, QR and RD, RA and FORMERR.
    assert!(
        reply.split_whitespace().take(4).collect::<Vec<_>>() == ["12", "34", "81", "81"],
        "FORMERR reply expected, got {reply:?}"
    );
    assert_eq!(
        dig(&lab, client, &["web"]).addresses(),
        BTreeSet::from([vip])
    );
    let stats = lab.node_json(&client.node, &["dns", "stats"]);
    for (outcome, at_least) in [
        ("answered_locally", 5),
        ("nxdomain", 1),
        ("nodata", 1),
        ("forwarded", 2),
        ("servfail", 1),
        ("formerr", 1),
        ("dropped", 1),
    ] {
        assert!(stats[outcome].as_u64().unwrap() >= at_least, "{stats}");
    }

    // Scaling changes the answers on every node as gossip carries it.
    lab.exec("node1", &["shoal", "service", "scale", "--detach", "web=5"]);
    let five = web_ips(5);
    wait_for_tasks_web(&lab, &clients, &five);

    // A killed task leaves the answers; its replacement joins them.
    let victim = lab
        .running_tasks("web", 5)
        .into_iter()
        .find(|t| t.node != client.node)
        .expect("a web task on another node");
    let killed = lab.in_task(&victim, &["pkill", "-9", "-x", "shoal"]);
    // pkill is in the task's cgroup: the task ending as it kills may kill pkill too (137).
    assert!(
        killed.status.success() || killed.status.code() == Some(137),
        "{killed:?}"
    );
    let gone = &victim.addresses["front"];
    wait_for(
        "the killed task's address gone",
        Duration::from_secs(10),
        || (!dig(&lab, client, &["tasks.web"]).addresses().contains(gone)).then_some(()),
    );
    wait_for("five tasks again", Duration::from_secs(30), || {
        let now = web_ips(5);
        (dig(&lab, client, &["tasks.web"]).addresses() == now).then_some(())
    });

    // `shoal dns lookup` says the same, and where external names go.
    let five = web_ips(5);
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
        &["dns", "lookup", EXTERNAL_NAME, "--task", &client.name],
    );
    assert_eq!(external["answer"]["forwarded"][0], UPSTREAM, "{external}");

    drop(stub);
    lab.down_clean();
}
