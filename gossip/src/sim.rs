//! A discrete-event simulator: many `Gossip` nodes (the real code) over a simulated network
//! with per-packet loss, latency plus jitter, partitions, and node kills (of the whole node or
//! of its agent only) and restarts, in simulated milliseconds. Sync requests and host probes
//! travel reliably (TCP) unless partitioned.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};

use crate::core::{Gossip, GossipConfig, Output, SwimConfig};
use crate::record::EndpointRecord;
use crate::wire::Keyring;

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    /// Probability that a datagram is lost.
    pub loss: f64,
    pub latency_ms: u64,
    /// Extra latency, uniform in `0..=jitter_ms`.
    pub jitter_ms: u64,
    pub seed: u64,
    /// How many nodes are the seeds every node joins through (the managers).
    pub seeds: usize,
    /// Joins are spread over this long, as nodes would start.
    pub join_spread_ms: u64,
    /// Every node's failure-detection settings.
    pub swim: SwimConfig,
}

impl SimConfig {
    pub fn new(nodes: usize) -> SimConfig {
        SimConfig {
            nodes,
            loss: 0.0,
            latency_ms: 1,
            jitter_ms: 0,
            seed: 1,
            seeds: 3,
            join_spread_ms: 1_000,
            swim: SwimConfig::fast_lossy_lan(),
        }
    }
}

enum Event {
    Wake,
    Datagram { from: usize, bytes: Vec<u8> },
    SyncRequest { from: usize, bytes: Vec<u8> },
    SyncResponse { from: usize, bytes: Vec<u8> },
    HostAnswer { node: String, answering: bool },
    Join,
}

struct Scheduled {
    at: u64,
    seq: u64,
    node: usize,
    event: Event,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Earliest first in a max-heap.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct SimNode {
    id: String,
    addr: SocketAddr,
    gossip: Option<Gossip>,
    keyring: Keyring,
    wake_at: Option<u64>,
    restarts: u64,
    /// Its host answers probes (true unless the whole node is killed).
    host_up: bool,
}

/// Records, per node, when a watched endpoint first reached the wanted state.
pub struct Watch {
    pub net: String,
    pub key: String,
    pub present: bool,
    pub reached_at: Vec<Option<u64>>,
}

pub struct Sim {
    config: SimConfig,
    now: u64,
    seq: u64,
    events: BinaryHeap<Scheduled>,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    /// Partition side of each node; nodes on different sides cannot talk.
    sides: Vec<u32>,
    rng: SmallRng,
    watch: Option<Watch>,
    pub datagrams_sent: u64,
    pub datagrams_lost: u64,
}

/// The simulated address of node `i`.
pub fn sim_addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8)),
        7946,
    )
}

impl Sim {
    /// Builds the nodes (all holding `keyring`) and schedules their joins; nothing runs
    /// until `run_until`. Simulated time starts at a realistic UNIX time.
    pub fn new(config: SimConfig, keyring: Keyring) -> Sim {
        let start = 1_700_000_000_000;
        let mut sim = Sim {
            now: start,
            seq: 0,
            events: BinaryHeap::new(),
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            sides: vec![0; config.nodes],
            rng: SmallRng::seed_from_u64(config.seed),
            watch: None,
            datagrams_sent: 0,
            datagrams_lost: 0,
            config,
        };
        for i in 0..sim.config.nodes {
            let id = format!("node{i}");
            let addr = sim_addr(i);
            sim.by_addr.insert(addr, i);
            sim.nodes.push(SimNode {
                id,
                addr,
                gossip: None,
                keyring: keyring.clone(),
                wake_at: None,
                restarts: 0,
                host_up: true,
            });
            sim.start_node(i);
            let delay = if sim.config.join_spread_ms == 0 {
                0
            } else {
                sim.rng.random_range(0..sim.config.join_spread_ms)
            };
            sim.schedule(start + delay, i, Event::Join);
        }
        sim
    }

    fn start_node(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let seed = self.config.seed ^ ((i as u64) << 20) ^ (node.restarts << 40);
        let mut config = GossipConfig::new(&node.id, node.addr, seed);
        config.expected_cluster_size = self.config.nodes as u32;
        config.swim = self.config.swim.clone();
        // Node ids and settings are valid by construction.
        node.gossip = Gossip::new(config, node.keyring.clone(), self.now).ok();
        node.wake_at = None;
    }

    pub fn now(&self) -> u64 {
        self.now
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node, unless it is killed.
    pub fn node(&self, i: usize) -> Option<&Gossip> {
        self.nodes[i].gossip.as_ref()
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].gossip.is_some()
    }

    /// Acts on a node (publish, join a network, ...) at the current time.
    pub fn with_node<R>(&mut self, i: usize, act: impl FnOnce(&mut Gossip, u64) -> R) -> Option<R> {
        let now = self.now;
        let result = self.nodes[i].gossip.as_mut().map(|g| act(g, now));
        self.after(i);
        result
    }

    pub fn set_keyring(&mut self, i: usize, keyring: Keyring) {
        self.nodes[i].keyring = keyring.clone();
        self.with_node(i, |g, _| g.set_keyring(keyring));
    }

    /// Stops a whole node (a power-off): it processes nothing and its host answers nothing
    /// from now on.
    pub fn kill(&mut self, i: usize) {
        self.kill_agent(i);
        self.nodes[i].host_up = false;
    }

    /// Stops a node's agent only: it processes nothing, but its host answers probes.
    pub fn kill_agent(&mut self, i: usize) {
        self.nodes[i].gossip = None;
        self.nodes[i].wake_at = None;
    }

    /// Starts a killed node (or agent) again with empty tables and joins it through the seeds.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restarts += 1;
        self.nodes[i].host_up = true;
        self.start_node(i);
        self.join(i);
    }

    fn join(&mut self, i: usize) {
        let seeds: Vec<SocketAddr> = (0..self.config.seeds.min(self.nodes.len()))
            .map(sim_addr)
            .collect();
        self.with_node(i, |g, now| g.join(&seeds, now));
    }

    /// Splits the cluster: each listed group is one side, unlisted nodes another.
    pub fn partition(&mut self, groups: &[Vec<usize>]) {
        self.sides = vec![0; self.nodes.len()];
        for (side, group) in groups.iter().enumerate() {
            for &i in group {
                self.sides[i] = side as u32 + 1;
            }
        }
    }

    /// Changes the datagram loss from now on.
    pub fn set_loss(&mut self, loss: f64) {
        self.config.loss = loss;
    }

    pub fn heal(&mut self) {
        self.sides = vec![0; self.nodes.len()];
    }

    /// Starts recording when every node sees `key` on `net` present (or absent).
    pub fn watch(&mut self, net: &str, key: &str, present: bool) {
        let reached_at = (0..self.nodes.len())
            .map(|i| {
                let seen = self.node(i).map(|g| g.lookup(net, key).is_some());
                (seen == Some(present)).then_some(self.now)
            })
            .collect();
        self.watch = Some(Watch {
            net: net.to_owned(),
            key: key.to_owned(),
            present,
            reached_at,
        });
    }

    pub fn take_watch(&mut self) -> Option<Watch> {
        self.watch.take()
    }

    fn schedule(&mut self, at: u64, node: usize, event: Event) {
        self.seq += 1;
        self.events.push(Scheduled {
            at,
            seq: self.seq,
            node,
            event,
        });
    }

    fn latency(&mut self) -> u64 {
        let jitter = if self.config.jitter_ms == 0 {
            0
        } else {
            self.rng.random_range(0..=self.config.jitter_ms)
        };
        self.config.latency_ms + jitter
    }

    /// Runs every event up to and including `until`.
    pub fn run_until(&mut self, until: u64) {
        while self.events.peek().is_some_and(|e| e.at <= until) {
            let Some(next) = self.events.pop() else {
                break;
            };
            self.now = next.at;
            self.dispatch(next);
        }
        self.now = until;
    }

    pub fn run_for(&mut self, ms: u64) {
        self.run_until(self.now + ms);
    }

    /// Runs until `done` holds, checking every `step_ms`, for at most `limit_ms`. Returns
    /// whether it held.
    pub fn run_until_true(
        &mut self,
        limit_ms: u64,
        step_ms: u64,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> bool {
        let end = self.now + limit_ms;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.run_until((self.now + step_ms).min(end));
        }
        done(self)
    }

    fn dispatch(&mut self, scheduled: Scheduled) {
        let i = scheduled.node;
        let now = self.now;
        let from_addr = |from: usize| sim_addr(from);
        match scheduled.event {
            Event::Wake => {
                if self.nodes[i].wake_at != Some(scheduled.at) {
                    return;
                }
                self.nodes[i].wake_at = None;
                if let Some(g) = self.nodes[i].gossip.as_mut() {
                    g.tick(now);
                }
            }
            Event::Join => return self.join(i),
            Event::Datagram { from, bytes } => {
                if let Some(g) = self.nodes[i].gossip.as_mut() {
                    g.handle_datagram(from_addr(from), &bytes, now);
                }
            }
            Event::SyncRequest { from, bytes } => {
                let answer = self.nodes[i]
                    .gossip
                    .as_mut()
                    .and_then(|g| g.handle_sync_request(from_addr(from), &bytes, now).ok());
                if let Some(bytes) = answer {
                    if self.sides[i] == self.sides[from] {
                        let at = now + self.latency();
                        self.schedule(at, from, Event::SyncResponse { from: i, bytes });
                    }
                }
            }
            Event::SyncResponse { from, bytes } => {
                if let Some(g) = self.nodes[i].gossip.as_mut() {
                    // A failed sync is counted by the node; nothing else to do.
                    let _ = g.handle_sync_response(from_addr(from), &bytes, now);
                }
            }
            Event::HostAnswer { node, answering } => {
                if let Some(g) = self.nodes[i].gossip.as_mut() {
                    g.host_answered(&node, answering);
                }
            }
        }
        self.after(i);
    }

    /// Delivers a node's outputs into the network and schedules its next wake.
    fn after(&mut self, i: usize) {
        while let Some(output) = self.nodes[i].gossip.as_mut().and_then(Gossip::poll_output) {
            match output {
                Output::Datagram { to, bytes } => self.send(i, to, bytes, false),
                Output::SyncRequest { to, bytes } => self.send(i, to, bytes, true),
                Output::Changed { net } => self.observe(i, &net),
                Output::MembersChanged => self.observe_members(i),
                Output::ProbeHost {
                    node,
                    to,
                    timeout_ms,
                } => self.probe_host(i, node, to, timeout_ms),
            }
        }
        let Some(deadline) = self.nodes[i]
            .gossip
            .as_ref()
            .and_then(Gossip::next_deadline)
        else {
            return;
        };
        let deadline = deadline.max(self.now);
        if self.nodes[i].wake_at.is_none_or(|w| deadline < w) {
            self.nodes[i].wake_at = Some(deadline);
            self.schedule(deadline, i, Event::Wake);
        }
    }

    fn send(&mut self, from: usize, to: SocketAddr, bytes: Vec<u8>, reliable: bool) {
        let Some(&to) = self.by_addr.get(&to) else {
            return;
        };
        if self.sides[from] != self.sides[to] {
            return;
        }
        let at = self.now + self.latency();
        if reliable {
            self.schedule(at, to, Event::SyncRequest { from, bytes });
            return;
        }
        self.datagrams_sent += 1;
        if self.config.loss > 0.0 && self.rng.random_bool(self.config.loss) {
            self.datagrams_lost += 1;
            return;
        }
        self.schedule(at, to, Event::Datagram { from, bytes });
    }

    /// Answers a host probe after a round trip if the host is up and reachable, else at the
    /// timeout.
    fn probe_host(&mut self, from: usize, node: String, to: SocketAddr, timeout_ms: u64) {
        let Some(&to) = self.by_addr.get(&to) else {
            return;
        };
        let answering = self.nodes[to].host_up && self.sides[from] == self.sides[to];
        let at = if answering {
            self.now + 2 * self.latency()
        } else {
            self.now + timeout_ms
        };
        self.schedule(at, from, Event::HostAnswer { node, answering });
    }

    fn observe(&mut self, i: usize, net: &str) {
        let now = self.now;
        let Some(watch) = self.watch.as_mut() else {
            return;
        };
        if watch.net != net || watch.reached_at[i].is_some() {
            return;
        }
        let seen = self.nodes[i]
            .gossip
            .as_ref()
            .map(|g| g.lookup(net, &watch.key).is_some());
        if seen == Some(watch.present) {
            watch.reached_at[i] = Some(now);
        }
    }

    /// A Down owner hides its entries: membership changes can reach a watched state too.
    fn observe_members(&mut self, i: usize) {
        if let Some(net) = self.watch.as_ref().map(|w| w.net.clone()) {
            self.observe(i, &net);
        }
    }
}

impl Watch {
    /// How long after `start` the given fraction of the `among` nodes had reached the state.
    pub fn time_to_fraction(&self, start: u64, among: &[usize], fraction: f64) -> Option<u64> {
        let mut times: Vec<u64> = among
            .iter()
            .filter_map(|&i| self.reached_at[i])
            .map(|t| t.saturating_sub(start))
            .collect();
        times.sort_unstable();
        let needed = ((among.len() as f64) * fraction).ceil() as usize;
        if needed == 0 {
            return Some(0);
        }
        times.get(needed - 1).copied()
    }
}

/// An endpoint of task `task` on node `node`, as simulations and benchmarks publish them.
pub fn sample_endpoint(node: usize, task: u32) -> EndpointRecord {
    EndpointRecord {
        task_id: format!("task{task}"),
        task_name: format!("web.{task}"),
        service_id: "svc".into(),
        service_name: "web".into(),
        node_id: format!("node{node}"),
        ip: Ipv4Addr::new(10, 0, (task >> 8) as u8, task as u8),
        mac: [2, 0, 0, 0, 0, task as u8],
        vtep: IpAddr::V4(Ipv4Addr::new(192, 168, 0, node as u8)),
        vip: None,
        ports: Vec::new(),
        health: None,
    }
}
