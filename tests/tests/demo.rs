//! The end-to-end test of the whole product: `shoal lab demo` plays the Swarm walkthrough on a
//! fresh lab (swarm, overlay network, service with a published port, routing mesh from every
//! node, DNS, VIP ping, scaling, a killed task coming back, drain, removal), checking every step
//! itself. Here it must succeed and say so; then the lab goes down leaving nothing. Needs root.

use std::{process::Command, time::Instant};

use shoal_tests::{require_root, shoal_bin, TestLab};

#[test]
fn the_demo_plays_the_whole_walkthrough() {
    require_root();
    let lab = TestLab::named("demo-e2e");
    // A lab of this name from an earlier run is replaced by the demo itself.
    let started = Instant::now();
    let out = Command::new(shoal_bin())
        .args(["lab", "--name", &lab.name, "demo"])
        .env_remove("SHOAL_SOCKET")
        .env_remove("SHOAL_LAB")
        .output()
        .expect("running shoal lab demo");
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("the demo took {elapsed:?}");
    assert!(out.status.success(), "the demo failed ({})", out.status);

    for line in [
        "$ shoal lab --name demo-e2e up --nodes 3",
        "$ shoal lab --name demo-e2e exec node1 -- shoal swarm join-token worker",
        "$ shoal lab --name demo-e2e exec node1 -- shoal node ls",
        "$ shoal lab --name demo-e2e exec node1 -- shoal network create front",
        "$ shoal lab --name demo-e2e exec node1 -- shoal service create --name web --replicas 3 --network front --publish 8080:80 -- shoal whoami --listen 0.0.0.0:80",
        "$ shoal lab --name demo-e2e exec client -- curl -s --max-time 2 http://192.168.77.13:8080/",
        "RemoteAddr: 192.168.77.100:",
        "dig +short tasks.web",
        "ping -c 2 web",
        "$ shoal lab --name demo-e2e exec node1 -- shoal service scale web=5",
        "pkill -9 -x shoal",
        "failed (exit 137: SIGKILL)",
        "$ shoal lab --name demo-e2e exec node1 -- shoal node update --availability drain node2",
        "$ shoal lab --name demo-e2e exec node1 -- shoal service rm web",
        "every step checked",
        "remove it with `shoal lab --name demo-e2e down`",
    ] {
        assert!(text.contains(line), "the demo's narration lacks {line:?}");
    }
    assert_eq!(text.matches("\n[").count(), 12, "twelve narrated steps");

    // The demo leaves its lab up, and `lab down` removes all of it.
    assert!(lab.netns_path("node1").exists(), "the lab stays up");
    lab.down_clean();
}
