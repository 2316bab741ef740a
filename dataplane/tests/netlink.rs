//! One test per netlink operation, each in a throwaway network namespace (a thread that
//! unshared one), checking the kernel state the operation produced by a dump. Needs root:
//! fails, never skips, without it.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Child, Command, Stdio},
};

use std::os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd};

use shoal_dataplane::{
    netlink::{
        BpfFilter, LinkChange, ListedBpfFilter, Netlink, PeerNs, Route, Rule, TcHook, Veth, Vxlan,
        MAIN_TABLE,
    },
    netns::{self, Netns},
};

/// Runs `body` with a socket in a fresh network namespace, on a thread that lives in it.
fn in_netns<T: Send + 'static>(body: impl FnOnce(&mut Netlink) -> T + Send + 'static) -> T {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the netlink tests make network namespaces and need root"
    );
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        let mut netlink = Netlink::open().expect("netlink socket");
        body(&mut netlink)
    })
    .join()
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A process in a namespace of its own, killed when dropped.
struct Sleeper(Child);

impl Sleeper {
    fn new() -> Self {
        let sleeper = Self(
            Command::new("unshare")
                .args(["--net", "sleep", "60"])
                .stdin(Stdio::null())
                .spawn()
                .expect("unshare"),
        );
        let pid = sleeper.pid();
        let ours = std::fs::read_link("/proc/self/ns/net").expect("own netns");
        for _ in 0..400 {
            if std::fs::read_link(format!("/proc/{pid}/ns/net")).ok() != Some(ours.clone()) {
                return sleeper;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        panic!("the sleeper's namespace never appeared");
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const MAC: [u8; 6] = [0x02, 0x53, 0x0a, 0x00, 0x00, 0x01];
const MAC2: [u8; 6] = [0x02, 0x42, 0x0a, 0x00, 0x01, 0x03];

fn up() -> LinkChange<'static> {
    LinkChange {
        up: Some(true),
        ..LinkChange::default()
    }
}

#[test]
fn a_bridge_is_made_with_its_mtu_fixed_mac_and_up() {
    in_netns(|nl| {
        nl.add_bridge("br0", Some(1400), Some(MAC)).unwrap();
        let listed = nl.links().unwrap();
        let bridge = listed.iter().find(|l| l.name == "br0").expect("br0 listed");
        assert_eq!(bridge.mtu, 1400);
        assert_eq!(bridge.mac, Some(MAC));
        assert!(bridge.up);
        assert_eq!(nl.link("br0").unwrap().as_ref(), Some(bridge));
        assert!(nl.link("nope").unwrap().is_none());
    });
}

#[test]
fn a_vxlan_device_has_learning_off_and_proxy_on() {
    in_netns(|nl| {
        let lo = nl.index_of("lo").unwrap();
        nl.set_link(lo, &up()).unwrap();
        nl.add_address(lo, Ipv4Addr::new(192, 0, 2, 1), 32).unwrap();
        nl.add_vxlan(&Vxlan {
            name: "vx4096",
            vni: 4096,
            local: Ipv4Addr::new(192, 0, 2, 1),
            port: 4789,
            mtu: 1450,
        })
        .unwrap();
        assert_eq!(nl.link("vx4096").unwrap().unwrap().mtu, 1450);
        // The VXLAN attributes, read back by iproute2's own dump.
        let out = Command::new("ip")
            .args(["-d", "-j", "link", "show", "vx4096"])
            .output()
            .unwrap();
        let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let data = &shown[0]["linkinfo"]["info_data"];
        assert_eq!(data["id"], 4096);
        assert_eq!(data["local"], "192.0.2.1");
        assert_eq!(data["port"], 4789);
        assert_eq!(data["learning"], false);
        assert_eq!(data["proxy"], true);
    });
}

#[test]
fn a_veth_peer_goes_into_a_process_namespace_by_pid() {
    let task = Sleeper::new();
    let pid = task.pid();
    in_netns(move |nl| {
        nl.add_bridge("br0", None, None).unwrap();
        let bridge = nl.index_of("br0").unwrap();
        nl.add_veth(&Veth {
            name: "vhost",
            mtu: Some(1450),
            mac: None,
            controller: Some(bridge),
            peer: "eth0",
            peer_ns: PeerNs::Pid(pid),
            peer_mac: Some(MAC2),
            up: true,
        })
        .unwrap();
        let host = nl.link("vhost").unwrap().unwrap();
        assert_eq!(
            (host.controller, host.mtu, host.up),
            (Some(bridge), 1450, true)
        );
        // One queue each way, asked for (the kernel would make one per CPU, then cut them).
        assert_eq!(host.queues, (1, 1));
        assert!(nl.link("eth0").unwrap().is_none(), "the peer stayed here");
    });
    let mut inside = Netlink::open_in(&Netns::Process(pid)).unwrap();
    let peer = inside.link("eth0").unwrap().expect("the peer in the task");
    assert_eq!((peer.mac, peer.mtu, peer.up), (Some(MAC2), 1450, false));
    assert_eq!(peer.queues, (1, 1));
}

#[test]
fn a_veth_peer_goes_into_a_named_namespace_by_fd_and_links_move() {
    let name = format!("shoal-nltest-{}", std::process::id());
    netns::create_named(&name).unwrap();
    let path = Netns::Named(name.clone()).path().unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let moved = in_netns(move |nl| {
        nl.add_veth(&Veth {
            name: "a",
            mtu: None,
            mac: Some(MAC),
            controller: None,
            peer: "b",
            peer_ns: PeerNs::Fd(&file),
            peer_mac: None,
            up: false,
        })
        .unwrap();
        assert_eq!(nl.link("a").unwrap().unwrap().mac, Some(MAC));
        // And a whole link moves with set_link (a VXLAN device, as the overlay moves it; a
        // bridge cannot leave its namespace).
        nl.add_vxlan(&Vxlan {
            name: "vx9",
            vni: 9,
            local: Ipv4Addr::new(192, 0, 2, 1),
            port: 4789,
            mtu: 1450,
        })
        .unwrap();
        let index = nl.index_of("vx9").unwrap();
        nl.set_link(
            index,
            &LinkChange {
                netns: Some(&file),
                ..LinkChange::default()
            },
        )
        .unwrap();
        nl.link("vx9").unwrap().is_none()
    });
    assert!(moved, "vx9 left the namespace");
    let mut inside = Netlink::open_in(&Netns::Named(name.clone())).unwrap();
    let names: Vec<String> = inside
        .links()
        .unwrap()
        .into_iter()
        .map(|l| l.name)
        .collect();
    assert!(
        names.contains(&"b".to_owned()) && names.contains(&"vx9".to_owned()),
        "{names:?}"
    );
    drop(inside);
    netns::delete_named(&name).unwrap();
    assert!(!path.exists());
}

#[test]
fn set_link_changes_mac_mtu_master_and_state_and_del_link_removes() {
    in_netns(|nl| {
        nl.add_bridge("br0", None, None).unwrap();
        nl.add_bridge("br1", None, None).unwrap();
        let (br0, br1) = (nl.index_of("br0").unwrap(), nl.index_of("br1").unwrap());
        // A bridge cannot be a port of a bridge: a veth end is.
        let task = Sleeper::new();
        nl.add_veth(&Veth {
            name: "p",
            mtu: None,
            mac: None,
            controller: None,
            peer: "q",
            peer_ns: PeerNs::Pid(task.pid()),
            peer_mac: None,
            up: false,
        })
        .unwrap();
        let port = nl.index_of("p").unwrap();
        nl.set_link(
            port,
            &LinkChange {
                up: Some(true),
                mtu: Some(1300),
                mac: Some(MAC2),
                controller: Some(br0),
                netns: None,
            },
        )
        .unwrap();
        let link = nl.link("p").unwrap().unwrap();
        assert_eq!(
            (link.up, link.mtu, link.mac, link.controller),
            (true, 1300, Some(MAC2), Some(br0))
        );
        nl.del_link(br1).unwrap();
        assert!(nl.link("br1").unwrap().is_none());
        let err = nl.del_link(br1).unwrap_err();
        assert!(err.is_not_found(), "{err}");
    });
}

#[test]
fn addresses_are_added_replaced_and_listed() {
    in_netns(|nl| {
        let lo = nl.index_of("lo").unwrap();
        let ip = Ipv4Addr::new(10, 9, 0, 1);
        nl.add_address(lo, ip, 24).unwrap();
        let err = nl.add_address(lo, ip, 24).unwrap_err();
        assert!(err.is_exists(), "{err}");
        nl.replace_address(lo, ip, 24).unwrap();
        let listed: Vec<_> = nl
            .addresses()
            .unwrap()
            .into_iter()
            .filter(|a| a.ip == ip)
            .collect();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].index, listed[0].prefix), (lo, 24));
    });
}

#[test]
fn routes_go_into_their_table_and_the_default_route_is_read() {
    in_netns(|nl| {
        let lo = nl.index_of("lo").unwrap();
        nl.set_link(lo, &up()).unwrap();
        nl.add_bridge("br0", None, None).unwrap();
        let br0 = nl.index_of("br0").unwrap();
        nl.add_address(br0, Ipv4Addr::new(10, 9, 0, 1), 24).unwrap();
        assert_eq!(nl.default_route().unwrap(), None);
        let gateway = Ipv4Addr::new(10, 9, 0, 254);
        let default = Route {
            destination: Ipv4Addr::UNSPECIFIED,
            prefix: 0,
            gateway: Some(gateway),
            oif: Some(br0),
            table: MAIN_TABLE,
        };
        nl.add_route(&default).unwrap();
        let in_table = Route {
            destination: Ipv4Addr::new(10, 8, 0, 0),
            prefix: 16,
            gateway: None,
            oif: Some(br0),
            table: 2000,
        };
        nl.add_route(&in_table).unwrap();
        assert_eq!(nl.default_route().unwrap(), Some(default));
        assert_eq!(nl.routes(2000).unwrap(), [in_table]);
        assert!(!nl.routes(MAIN_TABLE).unwrap().contains(&in_table));
        assert!(nl.add_route(&in_table).unwrap_err().is_exists());
    });
}

#[test]
fn rules_pick_a_table_by_source() {
    in_netns(|nl| {
        let rule = Rule {
            from: Ipv4Addr::new(10, 0, 0, 7),
            prefix: 32,
            table: 2000,
            priority: 2000,
        };
        nl.add_rule(&rule).unwrap();
        assert_eq!(
            nl.rules()
                .unwrap()
                .into_iter()
                .filter(|r| r.table == 2000)
                .collect::<Vec<_>>(),
            [rule]
        );
    });
}

#[test]
fn a_bridge_port_is_isolated() {
    let task = Sleeper::new();
    let pid = task.pid();
    in_netns(move |nl| {
        nl.add_bridge("gw", None, None).unwrap();
        let gw = nl.index_of("gw").unwrap();
        nl.add_veth(&Veth {
            name: "g1",
            mtu: None,
            mac: None,
            controller: Some(gw),
            peer: "eth1",
            peer_ns: PeerNs::Pid(pid),
            peer_mac: None,
            up: true,
        })
        .unwrap();
        let port = nl.index_of("g1").unwrap();
        assert!(!nl.port_isolated(port).unwrap());
        nl.set_port_isolated(port, true).unwrap();
        assert!(nl.port_isolated(port).unwrap());
    });
}

fn vxlan_here(nl: &mut Netlink) -> u32 {
    nl.add_vxlan(&Vxlan {
        name: "vx7",
        vni: 7,
        local: Ipv4Addr::new(192, 0, 2, 1),
        port: 4789,
        mtu: 1450,
    })
    .unwrap();
    nl.index_of("vx7").unwrap()
}

#[test]
fn fdb_entries_are_replaced_on_the_device_permanent_and_deleted() {
    in_netns(|nl| {
        let vx = vxlan_here(nl);
        let (first, second) = (
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2)),
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3)),
        );
        nl.fdb_replace(vx, MAC2, first).unwrap();
        // Replace moves the MAC to another VTEP rather than adding a second entry.
        nl.fdb_replace(vx, MAC2, second).unwrap();
        let entries: Vec<_> = nl
            .fdb(vx)
            .unwrap()
            .into_iter()
            .filter(|e| e.mac == MAC2)
            .collect();
        assert_eq!(entries.len(), 1, "{entries:?}");
        assert_eq!(entries[0].dst, Some(second));
        assert!(entries[0].permanent && entries[0].own);
        nl.fdb_del(vx, MAC2, second).unwrap();
        assert!(nl.fdb(vx).unwrap().iter().all(|e| e.mac != MAC2));
        assert!(nl.fdb_del(vx, MAC2, second).unwrap_err().is_not_found());
    });
}

#[test]
fn neighbours_are_added_replaced_listed_and_deleted() {
    in_netns(|nl| {
        let vx = vxlan_here(nl);
        nl.set_link(vx, &up()).unwrap();
        let ip = Ipv4Addr::new(10, 0, 1, 3);
        nl.neighbour_add(vx, ip, MAC).unwrap();
        assert!(nl.neighbour_add(vx, ip, MAC2).unwrap_err().is_exists());
        nl.neighbour_replace(vx, ip, MAC2).unwrap();
        let listed = nl.neighbours(vx).unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!((listed[0].ip, listed[0].mac), (ip, Some(MAC2)));
        assert!(listed[0].permanent);
        nl.neighbour_del(vx, ip).unwrap();
        assert!(nl.neighbours(vx).unwrap().is_empty());
        assert!(nl.neighbour_del(vx, ip).unwrap_err().is_not_found());
    });
}

/// A classifier that passes every packet on (`r0 = -1; exit`: `TC_ACT_UNSPEC`), loaded with
/// `BPF_PROG_LOAD`: its descriptor and its kernel ID.
fn pass_through_classifier() -> (OwnedFd, u32) {
    const BPF_PROG_LOAD: libc::c_long = 5;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
    // mov64 r0, -1 (opcode 0xb7, imm -1); exit (0x95).
    let instructions: [u64; 2] = [0xffff_ffff_0000_00b7, 0x95];
    let license = c"GPL";
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_PROG_TYPE_SCHED_CLS) | ((instructions.len() as u64) << 32);
    attr[1] = instructions.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    // SAFETY: bpf(2) reads the attribute union (zeroed past what is set) and the buffers it
    // points to, which outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_PROG_LOAD: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // `struct bpf_prog_info` starts with its type and ID.
    let mut info = [0u32; 2];
    let mut attr = [0u64; 2];
    attr[0] = fd.as_raw_fd() as u64 | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: the kernel writes at most `info_len` bytes into `info`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_OBJ_GET_INFO_BY_FD: {}",
        std::io::Error::last_os_error()
    );
    (fd, info[1])
}

#[test]
fn bpf_filters_are_put_on_clsact_hooks_and_replaced_in_place() {
    let ((first, first_id), (second, second_id)) =
        (pass_through_classifier(), pass_through_classifier());
    in_netns(move |nl| {
        nl.add_bridge("br0", None, None).unwrap();
        let br = nl.index_of("br0").unwrap();
        // No hook to put it on before the qdisc.
        let early = nl.replace_bpf_filter(br, &filter(TcHook::Ingress, 1, &first, "first"));
        assert!(early.is_err(), "a filter without a clsact qdisc: {early:?}");

        nl.add_clsact(br).unwrap();
        assert!(nl.add_clsact(br).unwrap_err().is_exists());
        nl.replace_bpf_filter(br, &filter(TcHook::Ingress, 2, &second, "later"))
            .unwrap();
        nl.replace_bpf_filter(br, &filter(TcHook::Ingress, 1, &first, "first"))
            .unwrap();
        nl.replace_bpf_filter(br, &filter(TcHook::Egress, 1, &first, "out"))
            .unwrap();
        let listed = |priority, program_id, name: &str| ListedBpfFilter {
            priority,
            handle: 1,
            program_id,
            name: name.into(),
            direct_action: true,
        };
        assert_eq!(
            nl.bpf_filters(br, TcHook::Ingress).unwrap(),
            [listed(1, first_id, "first"), listed(2, second_id, "later")],
            "ingress, in the order they run"
        );
        assert_eq!(
            nl.bpf_filters(br, TcHook::Egress).unwrap(),
            [listed(1, first_id, "out")]
        );

        // The same priority and handle again: the program changes, no filter is added.
        nl.replace_bpf_filter(br, &filter(TcHook::Ingress, 1, &second, "first"))
            .unwrap();
        assert_eq!(
            nl.bpf_filters(br, TcHook::Ingress).unwrap(),
            [listed(1, second_id, "first"), listed(2, second_id, "later")]
        );
    });
}

/// A filter of `program` at `priority`, handle 1.
fn filter<'a>(hook: TcHook, priority: u16, program: &'a OwnedFd, name: &'a str) -> BpfFilter<'a> {
    BpfFilter {
        hook,
        priority,
        handle: 1,
        program: program.as_fd(),
        name,
    }
}

#[test]
fn errors_say_what_was_being_done() {
    in_netns(|nl| {
        nl.add_bridge("br0", None, None).unwrap();
        let err = nl.add_bridge("br0", None, None).unwrap_err();
        assert!(err.is_exists());
        assert_eq!(err.to_string(), "adding link br0: it exists already");
        let err = nl.index_of("missing").unwrap_err();
        assert!(err.is_not_found());
        assert!(err.to_string().contains("missing"), "{err}");
    });
}

#[test]
fn sysctls_are_written_inside_the_namespace() {
    let name = format!("shoal-nlsysctl-{}", std::process::id());
    netns::create_named(&name).unwrap();
    let inside = Netns::Named(name.clone());
    netns::sysctl(&inside, "net/ipv4/ip_forward", "1").unwrap();
    let read = |netns: &Netns| {
        netns::run_in(netns, || {
            Ok(std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")?)
        })
        .unwrap()
    };
    assert_eq!(read(&inside).trim(), "1");
    // A fresh namespace starts with forwarding off: the write stayed inside.
    let other = format!("{name}-b");
    netns::create_named(&other).unwrap();
    assert_eq!(read(&Netns::Named(other.clone())).trim(), "0");
    netns::delete_named(&other).unwrap();
    netns::delete_named(&name).unwrap();
    assert!(!netns::named().unwrap().contains(&name));
}
