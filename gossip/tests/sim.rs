//! Simulated clusters running the real gossip code.

use shoal_gossip::sim::{sample_endpoint, Sim, SimConfig};
use shoal_gossip::{Keyring, MemberState};

fn keyring(keys: &[u8]) -> Keyring {
    Keyring::new(keys.iter().map(|k| [*k; 32]).collect()).unwrap()
}

/// A cluster of `n` nodes, all joined and on network `net1`, with membership settled.
fn cluster(n: usize, loss: f64, seed: u64) -> Sim {
    let mut config = SimConfig::new(n);
    config.loss = loss;
    config.latency_ms = 1;
    config.jitter_ms = 2;
    config.seed = seed;
    let mut sim = Sim::new(config, keyring(&[1]));
    sim.run_for(2_000);
    for i in 0..n {
        sim.with_node(i, |g, now| g.join_network("net1", now).unwrap());
    }
    let settled = sim.run_until_true(120_000, 500, |sim| {
        (0..n).all(|i| {
            sim.node(i).is_some_and(|g| {
                g.stats().members_alive == n - 1
                    && g.networks_of(&format!("node{}", (i + 1) % n)) == ["net1"]
            })
        })
    });
    assert!(settled, "cluster of {n} formed");
    sim
}

fn views_agree(sim: &Sim, net: &str, among: &[usize], expected: &[&str]) -> bool {
    among.iter().all(|&i| {
        sim.node(i).is_some_and(|g| {
            let keys: Vec<String> = g.view(net).into_iter().map(|(k, _)| k).collect();
            keys == expected
        })
    })
}

fn suspicions(sim: &Sim) -> u64 {
    (0..sim.len())
        .filter_map(|i| sim.node(i))
        .map(|g| g.stats().suspicions)
        .sum()
}

fn false_downs(sim: &Sim) -> u64 {
    (0..sim.len())
        .filter_map(|i| sim.node(i))
        .map(|g| g.stats().downs_observed)
        .sum()
}

#[test]
fn publish_and_withdraw_converge_with_loss_and_delay() {
    let n = 50;
    let mut sim = cluster(n, 0.05, 11);
    let all: Vec<usize> = (0..n).collect();
    sim.with_node(7, |g, now| {
        g.publish("net1", "task1", sample_endpoint(7, 1), now)
            .unwrap()
    });
    assert!(sim.run_until_true(5_000, 50, |s| views_agree(s, "net1", &all, &["task1"])));
    sim.with_node(7, |g, now| g.withdraw("net1", "task1", now));
    assert!(sim.run_until_true(5_000, 50, |s| views_agree(s, "net1", &all, &[])));
    assert_eq!(false_downs(&sim), 0);
}

#[test]
fn a_partition_heals_and_both_sides_writes_converge() {
    let n = 20;
    let mut sim = cluster(n, 0.0, 12);
    let left: Vec<usize> = (0..10).collect();
    sim.partition(&[left]);
    sim.with_node(2, |g, now| {
        g.publish("net1", "left", sample_endpoint(2, 1), now)
            .unwrap()
    });
    sim.with_node(15, |g, now| {
        g.publish("net1", "right", sample_endpoint(15, 2), now)
            .unwrap()
    });
    sim.run_for(60_000);
    sim.heal();
    let all: Vec<usize> = (0..n).collect();
    let converged = sim.run_until_true(300_000, 1_000, |s| {
        views_agree(s, "net1", &all, &["left", "right"])
            && (0..n).all(|i| s.node(i).is_some_and(|g| g.stats().members_alive == n - 1))
    });
    assert!(converged, "both sides' writes everywhere after healing");
}

#[test]
fn only_nodes_on_a_network_receive_its_entries() {
    let n = 12;
    let mut sim = cluster(n, 0.0, 13);
    for i in 0..6 {
        sim.with_node(i, |g, now| g.join_network("secret", now).unwrap());
    }
    sim.run_for(2_000);
    for i in 0..6 {
        let key = format!("t{i}");
        sim.with_node(i, |g, now| {
            g.publish("secret", &key, sample_endpoint(i, i as u32), now)
                .unwrap()
        });
    }
    sim.run_for(40_000); // a full sync period too
    let on: Vec<usize> = (0..6).collect();
    assert!(views_agree(
        &sim,
        "secret",
        &on,
        &["t0", "t1", "t2", "t3", "t4", "t5"]
    ));
    for i in 6..n {
        let g = sim.node(i).unwrap();
        assert!(
            g.entries("secret").is_empty(),
            "node{i} holds no table of secret"
        );
        assert_eq!(
            g.stats().out_of_scope_dropped,
            0,
            "nobody sent node{i} a secret entry"
        );
        // It still knows who is on the network.
        assert_eq!(g.networks_of("node0"), ["net1", "secret"]);
    }
}

#[test]
fn a_killed_node_disappears_and_a_restarted_one_holds_exactly_its_current_entries() {
    let n = 20;
    let mut sim = cluster(n, 0.0, 14);
    for task in 0..3 {
        let key = format!("n5-t{task}");
        sim.with_node(5, |g, now| {
            g.publish("net1", &key, sample_endpoint(5, task), now)
                .unwrap()
        });
    }
    sim.with_node(6, |g, now| {
        g.publish("net1", "n6-t0", sample_endpoint(6, 9), now)
            .unwrap()
    });
    let others: Vec<usize> = (0..n).filter(|&i| i != 5).collect();
    let before = ["n5-t0", "n5-t1", "n5-t2", "n6-t0"];
    assert!(sim.run_until_true(3_000, 50, |s| views_agree(s, "net1", &others, &before)));

    sim.kill(5);
    let killed_at = sim.now();
    // Suspicion 3 * log10(20) * 0.5 s = 2 s after a probe that fails within 2 probe periods.
    let gone = sim.run_until_true(30_000, 100, |s| views_agree(s, "net1", &others, &["n6-t0"]));
    assert!(gone, "node5's entries withdrawn everywhere");
    let detection = sim.now() - killed_at;
    assert!(detection <= 5_000, "detected in {detection} ms");

    sim.restart(5);
    sim.run_for(100);
    sim.with_node(5, |g, now| {
        g.join_network("net1", now).unwrap();
        g.publish("net1", "n5-t1", sample_endpoint(5, 11), now)
            .unwrap();
    });
    let all: Vec<usize> = (0..n).collect();
    let restored = sim.run_until_true(60_000, 200, |s| {
        views_agree(s, "net1", &all, &["n5-t1", "n6-t0"])
            && all.iter().all(|&i| {
                s.node(i).unwrap().lookup("net1", "n5-t1") == Some(&sample_endpoint(5, 11))
            })
    });
    assert!(
        restored,
        "exactly node5's current entries, with its current value"
    );
    // And it stays so (no stale entry resurfaces through a later sync).
    sim.run_for(65_000);
    assert!(views_agree(&sim, "net1", &all, &["n5-t1", "n6-t0"]));
}

#[test]
fn no_false_downs_at_five_percent_loss() {
    let n = 100;
    let mut sim = cluster(n, 0.05, 15);
    let downs_before = false_downs(&sim);
    sim.run_for(60_000);
    let suspicions = suspicions(&sim);
    assert_eq!(suspicions, 0, "100 nodes, 5% loss, 60 s");
    assert_eq!(false_downs(&sim) - downs_before, 0);
    for i in 0..n {
        let members = sim.node(i).unwrap().members();
        assert!(members.iter().all(|m| m.state != MemberState::Down));
    }
}

#[test]
fn keys_rotate_one_node_at_a_time_without_disturbing_membership() {
    let n = 10;
    let mut sim = cluster(n, 0.0, 16);
    // Distribute key 2, then 3 (sending moves to 2), then drop 1 (sending stays on 2 until 4
    // arrives): one node at a time, a second apart.
    for ring in [keyring(&[1, 2]), keyring(&[1, 2, 3]), keyring(&[2, 3])] {
        for i in 0..n {
            sim.set_keyring(i, ring.clone());
            sim.run_for(1_000);
        }
    }
    sim.with_node(3, |g, now| {
        g.publish("net1", "after", sample_endpoint(3, 1), now)
            .unwrap()
    });
    sim.run_for(5_000);
    let all: Vec<usize> = (0..n).collect();
    assert!(views_agree(&sim, "net1", &all, &["after"]));
    for i in 0..n {
        let stats = sim.node(i).unwrap().stats();
        assert_eq!(stats.auth_failures, 0, "node{i}");
        assert_eq!(stats.suspicions, 0, "node{i}");
        assert_eq!(stats.downs_observed, 0, "node{i}");
        assert_eq!(stats.members_alive, n - 1, "node{i}");
    }
}

#[test]
fn a_node_with_an_old_key_is_locked_out() {
    let n = 6;
    let mut sim = cluster(n, 0.0, 17);
    for i in 0..n - 1 {
        sim.set_keyring(i, keyring(&[2]));
    }
    sim.run_for(30_000);
    let outsider = sim.node(n - 1).unwrap().stats();
    assert!(outsider.auth_failures > 0);
    let insider = sim.node(0).unwrap();
    assert!(insider.stats().auth_failures > 0);
    let outsider_state = insider
        .members()
        .into_iter()
        .find(|m| m.node_id == format!("node{}", n - 1))
        .map(|m| m.state);
    assert_eq!(outsider_state, Some(MemberState::Down));
}

fn sees_down(sim: &Sim, i: usize, node: &str) -> bool {
    sim.node(i).is_some_and(|g| {
        g.members()
            .iter()
            .any(|m| m.node_id == node && m.state == MemberState::Down)
    })
}

/// The key scenarios on a lossy 20-node cluster for several seeds: a property that holds for
/// one seed only is luck.
#[test]
fn key_scenarios_hold_across_seeds() {
    let n = 20;
    for seed in 100..106 {
        let mut sim = cluster(n, 0.05, seed);
        let all: Vec<usize> = (0..n).collect();
        sim.with_node(3, |g, now| {
            g.publish("net1", "a", sample_endpoint(3, 1), now).unwrap()
        });
        sim.with_node(9, |g, now| {
            g.publish("net1", "b", sample_endpoint(9, 2), now).unwrap()
        });
        let converged =
            sim.run_until_true(3_000, 50, |s| views_agree(s, "net1", &all, &["a", "b"]));
        assert!(converged, "seed {seed}: publishes converge");

        sim.run_for(30_000);
        assert_eq!(suspicions(&sim), 0, "seed {seed}: no suspicion at 5% loss");
        assert_eq!(false_downs(&sim), 0, "seed {seed}: no down at 5% loss");

        sim.kill(3);
        let others: Vec<usize> = (0..n).filter(|&i| i != 3).collect();
        let killed_at = sim.now();
        let detected = sim.run_until_true(30_000, 50, |s| {
            others.iter().all(|&i| sees_down(s, i, "node3"))
                && views_agree(s, "net1", &others, &["b"])
        });
        let detection = sim.now() - killed_at;
        // Typically 3-4 s; the tail is the dead node going unprobed for a few periods.
        assert!(
            detected && detection <= 8_000,
            "seed {seed}: a kill is detected everywhere within 8 s, not {detection} ms"
        );

        sim.restart(3);
        sim.run_for(100);
        sim.with_node(3, |g, now| {
            g.join_network("net1", now).unwrap();
            g.publish("net1", "c", sample_endpoint(3, 3), now).unwrap();
        });
        let rejoined =
            sim.run_until_true(10_000, 100, |s| views_agree(s, "net1", &all, &["b", "c"]));
        assert!(
            rejoined,
            "seed {seed}: a restarted node's new entries everywhere, old ones gone"
        );
    }
}

/// node5 and node6 publish `n5` and `n6` on a settled 10-node cluster.
fn cluster_with_two_publishers(seed: u64) -> (Sim, Vec<usize>) {
    let n = 10;
    let mut sim = cluster(n, 0.0, seed);
    for (node, key) in [(5, "n5"), (6, "n6")] {
        sim.with_node(node, |g, now| {
            g.publish("net1", key, sample_endpoint(node, node as u32), now)
                .unwrap()
        });
    }
    let others: Vec<usize> = (0..n).filter(|&i| i != 5).collect();
    assert!(sim.run_until_true(3_000, 50, |s| views_agree(
        s,
        "net1",
        &others,
        &["n5", "n6"]
    )));
    (sim, others)
}

/// Kills node5's agent and runs until every other node sees it Down; returns that time.
fn silence_node5(sim: &mut Sim, others: &[usize]) -> u64 {
    sim.kill_agent(5);
    let down = sim.run_until_true(10_000, 50, |s| {
        others.iter().all(|&i| sees_down(s, i, "node5"))
    });
    assert!(down, "node5 seen Down everywhere");
    sim.now()
}

#[test]
fn a_silent_agent_keeps_its_entries_while_its_host_answers() {
    let (mut sim, others) = cluster_with_two_publishers(18);
    // Records the first moment any node's view loses n5, even for a millisecond.
    sim.watch("net1", "n5", false);
    silence_node5(&mut sim, &others);
    sim.run_for(30_000);
    let watch = sim.take_watch().unwrap();
    for &i in &others {
        assert_eq!(watch.reached_at[i], None, "node{i} never lost n5");
    }

    // The restarted agent rejoins as any node does: its current entries, the old one gone.
    sim.restart(5);
    sim.run_for(100);
    sim.with_node(5, |g, now| {
        g.join_network("net1", now).unwrap();
        g.publish("net1", "n5-new", sample_endpoint(5, 7), now)
            .unwrap();
    });
    let all: Vec<usize> = (0..10).collect();
    let rejoined = sim.run_until_true(10_000, 100, |s| {
        views_agree(s, "net1", &all, &["n5-new", "n6"])
    });
    assert!(rejoined, "node5's new entries everywhere, the old one gone");
}

#[test]
fn a_silent_agent_s_entries_go_at_once_when_its_host_stops_answering() {
    let (mut sim, others) = cluster_with_two_publishers(19);
    silence_node5(&mut sim, &others);
    sim.run_for(10_000);
    assert!(views_agree(&sim, "net1", &others, &["n5", "n6"]));
    sim.kill(5);
    let powered_off_at = sim.now();
    let gone = sim.run_until_true(5_000, 10, |s| views_agree(s, "net1", &others, &["n6"]));
    let took = sim.now() - powered_off_at;
    // The next probe round (500 ms) plus the probe timeout (500 ms).
    assert!(
        gone && took <= 1_100,
        "withdrawn {took} ms after the power-off"
    );
}

#[test]
fn a_silent_agent_s_entries_go_after_the_grace() {
    let (mut sim, others) = cluster_with_two_publishers(20);
    let down_at = silence_node5(&mut sim, &others);
    sim.run_until(down_at + 59_000);
    assert!(views_agree(&sim, "net1", &others, &["n5", "n6"]));
    // The grace counts from each node's own Down (within the last 50 ms), checked every
    // probe round (500 ms).
    sim.run_until(down_at + 60_600);
    assert!(views_agree(&sim, "net1", &others, &["n6"]));
}

#[test]
fn a_powered_off_node_is_withdrawn_as_fast_as_before() {
    let (mut sim, others) = cluster_with_two_publishers(21);
    sim.kill(5);
    let killed_at = sim.now();
    let gone = sim.run_until_true(10_000, 10, |s| views_agree(s, "net1", &others, &["n6"]));
    let took = sim.now() - killed_at;
    let stats = sim.node(0).unwrap().stats();
    assert!(
        gone && took <= 4_000,
        "withdrawn {took} ms after the power-off"
    );
    assert_eq!(stats.members_down, 1);
}

/// A service of 96 tasks starting on 32 nodes within 4 s: every node sees every endpoint
/// within a few seconds, not at the next full sync (30 s). Each holder pushes a write a
/// bounded number of times to random members; too few, and about one (node, write) pair
/// in a burst like this is missed by all of them.
#[test]
fn a_burst_of_endpoints_reaches_every_node_without_waiting_for_a_sync() {
    let n = 32;
    for seed in 1..=10 {
        let mut sim = cluster(n, 0.0, seed);
        for step in 0..n * 3 {
            let (node, task) = (step % n, (step / n) as u32);
            sim.with_node(node, |g, now| {
                g.publish(
                    "net1",
                    &format!("t{node}-{task}"),
                    sample_endpoint(node, task),
                    now,
                )
                .unwrap()
            });
            sim.run_for(40);
        }
        let complete = sim.run_until_true(6_000, 100, |s| {
            (0..n).all(|i| s.node(i).is_some_and(|g| g.view("net1").len() == n * 3))
        });
        assert!(
            complete,
            "seed {seed}: some node still misses endpoints after 6 s"
        );
    }
}
