//! The overlay in the kernel: two "nodes" (network namespaces joined by an underlay veth),
//! each with its own `Overlay`, and "tasks" (processes in their own network namespaces)
//! attached to networks, their ARP answered by the VIP echo program as the agent attaches
//! it. Peers are given the way the agent gives them from gossip. Needs root, a bpffs mount
//! and iproute2 + nftables.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use shoal_dataplane::{
    netns::Netns,
    overlay::{NetworkSpec, Overlay, OverlayConfig, TaskInterface},
    overlay_endpoints::OverlayEndpoints,
    peerdb::{mac_for, Peer},
    task_hooks,
    vip_echo::VipEcho,
};

/// Two node namespaces on a private underlay; everything is removed on drop.
struct Rig {
    tag: String,
    nodes: Vec<String>,
    tasks: Vec<Child>,
    overlays: Vec<Overlay>,
    /// Each node's pinned maps live under `pins/n<N>`.
    pins: PathBuf,
    echoes: Vec<VipEcho>,
}

impl Rig {
    fn new(tag: &str) -> Self {
        assert!(nix::unistd::geteuid().is_root(), "needs root");
        let tag = format!("sot{}{tag}", std::process::id() % 100_000);
        let nodes: Vec<String> = (1..=2).map(|n| format!("{tag}-n{n}")).collect();
        let mut rig = Self {
            tag: tag.clone(),
            nodes: nodes.clone(),
            tasks: vec![],
            overlays: vec![],
            pins: PathBuf::from(format!("/sys/fs/bpf/{tag}")),
            echoes: vec![],
        };
        for node in &nodes {
            run("ip", &["netns", "add", node]);
        }
        run(
            "ip",
            &[
                "link", "add", "sotu1", "netns", &nodes[0], "type", "veth", "peer", "name",
                "sotu2", "netns", &nodes[1],
            ],
        );
        for (i, node) in nodes.iter().enumerate() {
            let ns = Netns::Named(node.clone());
            let underlay = format!("sotu{}", i + 1);
            run("ip", &["-n", node, "link", "set", "lo", "up"]);
            run(
                "ip",
                &[
                    "-n",
                    node,
                    "addr",
                    "add",
                    &format!("192.168.99.{}/24", i + 1),
                    "dev",
                    &underlay,
                ],
            );
            run("ip", &["-n", node, "link", "set", &underlay, "up"]);
            let maps = rig.node_pins(i).join("maps");
            std::fs::create_dir_all(&maps).expect("pin dir");
            rig.echoes.push(VipEcho::load(&maps).expect("echo program"));
            let overlay = Overlay::start(
                OverlayConfig {
                    netns_prefix: format!("{tag}-n{}.", i + 1),
                    node_netns: ns,
                    data_addr: Ipv4Addr::new(192, 168, 99, i as u8 + 1),
                    gateway_subnet: (Ipv4Addr::new(172, 18, 0, 0), 16),
                },
                OverlayEndpoints::open(&maps).expect("endpoints map"),
            )
            .expect("overlay start");
            rig.overlays.push(overlay);
        }
        rig
    }

    fn node_pins(&self, node: usize) -> PathBuf {
        self.pins.join(format!("n{}", node + 1))
    }

    /// Connects a task to networks on `node` as the agent does: its interfaces, and the
    /// program that answers its ARP on each.
    fn attach(
        &mut self,
        node: usize,
        task: &str,
        pid: u32,
        networks: &[(String, Ipv4Addr)],
    ) -> Vec<TaskInterface> {
        let echo = self.echoes[node].task_filter().expect("echo filter");
        self.overlays[node]
            .attach(task, pid, networks, &|netlink, index, _| {
                task_hooks::install_on(netlink, index, &[&echo])
            })
            .expect("attach")
    }

    /// A process in its own network namespace, like a task's PID 1.
    fn task(&mut self) -> u32 {
        let child = Command::new("unshare")
            .args(["--net", "sleep", "60"])
            .stdin(Stdio::null())
            .spawn()
            .expect("unshare");
        let pid = child.id();
        self.tasks.push(child);
        // unshare has switched namespaces once its netns differs from ours.
        let ours = std::fs::read_link("/proc/self/ns/net").expect("own netns");
        for _ in 0..200 {
            if std::fs::read_link(format!("/proc/{pid}/ns/net")).ok() != Some(ours.clone()) {
                return pid;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("task namespace never appeared");
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for task in &mut self.tasks {
            let _ = task.kill();
            let _ = task.wait();
        }
        for overlay in &self.overlays {
            overlay.remove_all().expect("overlay cleanup");
        }
        let _ = shoal_dataplane::remove_pins(&self.pins);
        for node in &self.nodes {
            let _ = Command::new("ip").args(["netns", "del", node]).status();
        }
        let leftovers: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.tag))
                    .collect()
            })
            .unwrap_or_default();
        if !std::thread::panicking() {
            assert!(leftovers.is_empty(), "namespaces left: {leftovers:?}");
        }
    }
}

/// What a test tool printed, or its error output.
fn output(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().expect(program);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn run(program: &str, args: &[&str]) {
    let status = Command::new(program).args(args).status().expect(program);
    assert!(status.success(), "{program} {args:?}");
}

fn network(id: &str, vni: u32, third: u8, internal: bool) -> NetworkSpec {
    NetworkSpec {
        id: id.into(),
        name: id.into(),
        vni,
        port: 4789,
        subnet: (Ipv4Addr::new(10, 0, third, 0), 24),
        mtu: None,
        internal,
        ingress: false,
    }
}

fn peer(ip: Ipv4Addr, node: u8) -> Peer {
    Peer {
        ip,
        mac: mac_for(ip),
        vtep: IpAddr::V4(Ipv4Addr::new(192, 168, 99, node)),
    }
}

/// Whether any of three pings is answered: a neighbour that failed to resolve before its
/// peer was programmed loses the next packet while it resolves again.
fn ping(pid: u32, target: Ipv4Addr) -> bool {
    Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args([
            "ping",
            "-c",
            "3",
            "-i",
            "0.3",
            "-W",
            "1",
            &target.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("ping")
        .success()
}

#[test]
fn tasks_on_two_nodes_reach_each_other_only_over_their_network() {
    let mut rig = Rig::new("a");
    let red = network("redredredred01", 4096, 1, false);
    let blue = network("blueblueblue02", 4097, 2, true);
    for overlay in &rig.overlays {
        overlay.ensure_network(&red).expect("red");
        overlay.ensure_network(&blue).expect("blue");
    }
    let (a_ip, b_ip, c_ip) = (
        Ipv4Addr::new(10, 0, 1, 2),
        Ipv4Addr::new(10, 0, 1, 3),
        Ipv4Addr::new(10, 0, 2, 2),
    );
    let (a, b, c) = (rig.task(), rig.task(), rig.task());
    let a_if = rig.attach(0, "taska", a, &[(red.id.clone(), a_ip)]);
    assert_eq!(a_if[0].ifname, "eth0");
    rig.attach(1, "taskb", b, &[(red.id.clone(), b_ip)]);
    rig.attach(1, "taskc", c, &[(blue.id.clone(), c_ip)]);

    // Nothing is learned or flooded: before peers are programmed, nothing gets through.
    assert!(!ping(a, b_ip), "reached a peer that was never programmed");

    let on_node2 = BTreeMap::from([
        ("taskb".to_string(), peer(b_ip, 2)),
        ("taskc".to_string(), peer(c_ip, 2)),
    ]);
    rig.overlays[0]
        .program_peers(&red.id, &BTreeMap::from([("taskb".into(), peer(b_ip, 2))]))
        .expect("program node1");
    rig.overlays[0]
        .program_peers(&blue.id, &BTreeMap::from([("taskc".into(), peer(c_ip, 2))]))
        .expect("program node1 blue");
    rig.overlays[1]
        .program_peers(&red.id, &BTreeMap::from([("taska".into(), peer(a_ip, 1))]))
        .expect("program node2");
    assert!(ping(a, b_ip), "a -> b over VXLAN");
    assert!(ping(b, a_ip), "b -> a over VXLAN");
    assert!(!ping(a, c_ip), "red reached blue");
    drop(on_node2);

    let inspect = rig.overlays[0]
        .inspect(&red.id)
        .expect("inspect")
        .expect("red is here");
    assert_eq!(inspect.vni, 4096);
    assert_eq!(inspect.mtu, 1450);
    assert_eq!(
        inspect.fdb,
        [("02:42:0a:00:01:03".to_string(), "192.168.99.2".to_string())]
    );
    assert_eq!(
        inspect.neighbours,
        [("10.0.1.3".to_string(), "02:42:0a:00:01:03".to_string())],
        "the remote endpoint is answered for"
    );
    let permanent = output(
        "ip",
        &[
            "-n",
            &inspect.netns,
            "-4",
            "neigh",
            "show",
            "nud",
            "permanent",
        ],
    )
    .expect("ip neigh");
    assert_eq!(
        permanent.trim(),
        "",
        "no permanent neighbour entry stands for it"
    );

    // The node itself has no way into a network.
    let node1 = &rig.nodes[0];
    let target = a_ip.to_string();
    assert!(
        output(
            "ip",
            &["netns", "exec", node1, "ping", "-c", "1", "-W", "1", &target]
        )
        .is_err(),
        "the node reached a task's overlay address"
    );

    // The endpoint goes: its entries go.
    rig.overlays[0]
        .program_peers(&red.id, &BTreeMap::new())
        .expect("withdraw");
    let inspect = rig.overlays[0].inspect(&red.id).unwrap().unwrap();
    assert!(inspect.fdb.is_empty() && inspect.neighbours.is_empty());
    assert!(!ping(a, b_ip), "reached a withdrawn peer");
}

#[test]
fn only_tasks_off_internal_networks_get_a_way_out() {
    let mut rig = Rig::new("b");
    let open = network("openopenopen01", 4100, 5, false);
    let internal = network("intintintint02", 4101, 6, true);
    let overlay = &rig.overlays[0];
    overlay.ensure_network(&open).unwrap();
    overlay.ensure_network(&internal).unwrap();
    let (out, closed, other) = (rig.task(), rig.task(), rig.task());
    rig.attach(
        0,
        "out",
        out,
        &[(open.id.clone(), Ipv4Addr::new(10, 0, 5, 2))],
    );
    rig.attach(
        0,
        "closed",
        closed,
        &[(internal.id.clone(), Ipv4Addr::new(10, 0, 6, 2))],
    );
    rig.attach(
        0,
        "other",
        other,
        &[(open.id.clone(), Ipv4Addr::new(10, 0, 5, 3))],
    );
    // The way out: node1's underlay address, through the gateway bridge and masquerade.
    let underlay = Ipv4Addr::new(192, 168, 99, 2);
    assert!(ping(out, underlay), "a task with a gateway reaches out");
    assert!(!ping(closed, underlay), "an internal-only task reached out");
    // Tasks on the gateway bridge cannot use it to reach each other.
    let routes = output(
        "nsenter",
        &[
            &format!("--net=/proc/{other}/ns/net"),
            "ip",
            "-4",
            "-o",
            "addr",
        ],
    )
    .unwrap();
    let gateway_addr = routes
        .lines()
        .find(|l| l.contains(" eth1 "))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse::<Ipv4Addr>().ok())
        .expect("the other task's gateway address");
    assert!(
        !ping(out, gateway_addr),
        "gateway bridge ports are not isolated"
    );
    // Same node, same network: the bridge carries it.
    assert!(ping(out, Ipv4Addr::new(10, 0, 5, 3)));
}
