//! Gossip in simulation (the real `shoal-gossip` code over a simulated network): convergence
//! of one endpoint change, failure detection, bandwidth and false suspicions. Run with
//! `cargo bench -p shoal-tests --bench gossip`.

use std::time::Instant;

use shoal_gossip::sim::{sample_endpoint, Sim, SimConfig};
use shoal_gossip::{Keyring, MemberState, SwimConfig};

/// memberlist's own convergence model for 1,000 nodes (hashicorp's "convergence
/// simulator" with its default LAN settings: 200 ms gossip interval, fanout 3): 99.99% of
/// the nodes have an update after about 1.6 s, all of them after about 2.2 s.
const MEMBERLIST_1000_9999_MS: u64 = 1_600;
const MEMBERLIST_1000_ALL_MS: u64 = 2_200;

/// `n` nodes, 1 ms ± 0.5 ms latency, all on `net1`, given at most `settle_ms` of simulated
/// time to settle (a periodic sync fills what gossip missed); returns the cluster and how many
/// nodes know every member and network.
fn cluster(n: usize, settle_ms: u64, swim: SwimConfig) -> (Sim, usize) {
    let mut config = SimConfig::new(n);
    config.swim = swim;
    config.latency_ms = 1; // 1 to 2 ms: the simulator works in whole milliseconds
    config.jitter_ms = 1;
    config.join_spread_ms = 2_000;
    let mut sim = Sim::new(config, Keyring::new(vec![[7; 32]]).unwrap());
    sim.run_for(3_000);
    for i in 0..n {
        sim.with_node(i, |g, now| g.join_network("net1", now).unwrap());
    }
    let settled_nodes = |s: &Sim| {
        (0..n)
            .filter(|&i| {
                s.node(i).is_some_and(|g| {
                    g.stats().members_alive == n - 1
                        && g.networks_of(&format!("node{}", (i + 1) % n)).len() == 1
                })
            })
            .count()
    };
    sim.run_until_true(settle_ms, 1_000, |s| settled_nodes(s) == n);
    let settled = settled_nodes(&sim);
    (sim, settled)
}

/// Publishes one endpoint and returns the ms to 99.99% and to 100% of the other nodes.
fn convergence(sim: &mut Sim, task: u32) -> (Option<u64>, Option<u64>) {
    let key = format!("bench{task}");
    sim.watch("net1", &key, true);
    let start = sim.now();
    sim.with_node(0, |g, now| {
        g.publish("net1", &key, sample_endpoint(0, task), now)
            .unwrap()
    });
    sim.run_for(5_000);
    let watch = sim.take_watch().unwrap();
    let others: Vec<usize> = (1..sim.len()).collect();
    (
        watch.time_to_fraction(start, &others, 0.9999),
        watch.time_to_fraction(start, &others, 1.0),
    )
}

fn bytes_sent(sim: &Sim) -> u64 {
    (0..sim.len())
        .filter_map(|i| sim.node(i))
        .map(|g| g.stats().bytes_sent)
        .sum()
}

fn ms(t: Option<u64>) -> String {
    t.map_or("never".into(), |t| format!("{t} ms"))
}

struct DetectionTrial {
    suspicions: u64,
    downs: u64,
    detection: Option<u64>,
    idle_bytes_per_node: f64,
}

/// Idle traffic, then false suspicions and downs at 5% loss over 60 s, then how long until
/// every other node holds a killed node Down.
fn failure_detection(sim: &mut Sim) -> DetectionTrial {
    let n = sim.len();
    let before = bytes_sent(sim);
    sim.run_for(10_000);
    let idle_bytes_per_node = (bytes_sent(sim) - before) as f64 / n as f64 / 10.0;
    sim.set_loss(0.05);
    let counts = |s: &Sim| {
        (0..s.len())
            .filter_map(|i| s.node(i))
            .fold((0, 0), |(a, b), g| {
                let st = g.stats();
                (a + st.suspicions, b + st.downs_observed)
            })
    };
    let (suspicions0, downs0) = counts(sim);
    sim.run_for(60_000);
    let (suspicions1, downs1) = counts(sim);
    sim.set_loss(0.0);
    sim.run_for(10_000);
    let victim = n / 2;
    let victim_id = format!("node{victim}");
    sim.kill(victim);
    let killed = sim.now();
    let detected = sim.run_until_true(60_000, 50, |s| {
        (0..s.len()).filter(|&i| i != victim).all(|i| {
            s.node(i)
                .unwrap()
                .members()
                .iter()
                .any(|m| m.node_id == victim_id && m.state == MemberState::Down)
        })
    });
    DetectionTrial {
        suspicions: suspicions1 - suspicions0,
        downs: downs1 - downs0,
        detection: detected.then(|| sim.now() - killed),
        idle_bytes_per_node,
    }
}

fn main() {
    let started = Instant::now();
    println!("shoal-gossip, simulated (real code), latency 1-2 ms, fanout 3, gossip every 200 ms");
    println!();
    println!(
        "{:>6} {:>6} {:>14} {:>14}   memberlist model (1,000 nodes)",
        "nodes", "loss", "to 99.99%", "to 100%"
    );
    let mut task = 0;
    let mut hundred = None;
    for n in [10, 100, 1_000] {
        let built = Instant::now();
        let (mut sim, settled) = cluster(n, 60_000, SwimConfig::fast_lossy_lan());
        let build_secs = built.elapsed().as_secs_f64();
        for loss in [0.0, 0.05] {
            sim.set_loss(loss);
            sim.run_for(2_000);
            task += 1;
            let (most, all) = convergence(&mut sim, task);
            let reference = if n == 1_000 {
                format!("{MEMBERLIST_1000_9999_MS} ms / {MEMBERLIST_1000_ALL_MS} ms")
            } else {
                String::new()
            };
            println!(
                "{n:>6} {:>5.0}% {:>14} {:>14}   {reference}",
                loss * 100.0,
                ms(most),
                ms(all)
            );
        }
        println!(
            "{:>6} ({settled}/{n} nodes knew every member and network when measured; built in {build_secs:.1} s CPU)",
            ""
        );
        if n == 100 {
            hundred = Some(sim);
        }
    }
    let mut sim = hundred.unwrap();
    let n = sim.len();

    // Bandwidth, steady state and with one endpoint change per second.
    sim.set_loss(0.0);
    let secs = 30;
    let before = bytes_sent(&sim);
    sim.run_for(secs * 1_000);
    let idle = (bytes_sent(&sim) - before) as f64 / n as f64 / secs as f64;
    let before = bytes_sent(&sim);
    for second in 0..secs {
        let node = (second as usize * 37) % n;
        let key = format!("churn{second}");
        sim.with_node(node, |g, now| {
            g.publish("net1", &key, sample_endpoint(node, second as u32), now)
                .unwrap()
        });
        sim.run_for(1_000);
    }
    let churn = (bytes_sent(&sim) - before) as f64 / n as f64 / secs as f64;
    println!();
    println!("gossip bytes per node per second, {n} nodes: steady {idle:.0} B/s, one endpoint change per second {churn:.0} B/s");

    println!();
    println!("failure detection, {n} nodes: false alarms at 5% loss over 60 s, then kill -> every other node sees Down");
    println!(
        "{:>32} {:>12} {:>12} {:>12} {:>10}",
        "SWIM settings", "suspicions", "false downs", "detection", "SWIM B/s"
    );
    let settings = [
        ("foca new_lan (before)", SwimConfig::foca_lan()),
        (
            "new_lan + retry + 6 indirect",
            SwimConfig {
                retry_direct_probe: true,
                indirect_probes: 6,
                ..SwimConfig::foca_lan()
            },
        ),
        ("fast_lossy_lan (default)", SwimConfig::fast_lossy_lan()),
    ];
    for (name, swim) in settings {
        let (mut sim, _) = cluster(n, 60_000, swim);
        let trial = failure_detection(&mut sim);
        println!(
            "{name:>32} {:>12} {:>12} {:>12} {:>10.0}",
            trial.suspicions,
            trial.downs,
            ms(trial.detection),
            trial.idle_bytes_per_node
        );
    }
    eprintln!("  (bench ran in {:.1} s)", started.elapsed().as_secs_f64());
}
