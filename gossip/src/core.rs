//! The sans-IO gossip node: SWIM membership (foca), the cluster-wide network-membership
//! table, one endpoint table per attached network, dissemination and full-state sync.
//! Time comes in as `now_ms`; everything it wants sent comes out of `poll_output`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use foca::{
    Codec, Config, Foca, Header, Member, Message as SwimMessage, NoCustomBroadcast, Notification,
    PostcardCodec, ProbeNumber, Runtime, State, Timer,
};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, RngExt, SeedableRng};

use crate::identity::NodeIdentity;
use crate::message::{self, membership_key, split_membership_key, Message, SyncState, Update};
use crate::queue::{Scope, TransmitQueue};
use crate::record::EndpointRecord;
use crate::table::{Entry, Table};
use crate::wire::{DropReason, Keyring, Kind, Sealer, MAX_NODE_ID_LEN, MAX_OVERHEAD};

/// Room for the `Message` enum tag and length prefix around a payload.
const MESSAGE_FRAMING: usize = 8;
/// Foca timers fired in one `tick`, at most (they never schedule themselves at zero delay,
/// this only bounds the loop).
const MAX_TIMERS_PER_TICK: usize = 10_000;

#[derive(Clone, Debug)]
pub struct GossipConfig {
    pub node_id: String,
    /// This node's gossip address (UDP and TCP).
    pub addr: SocketAddr,
    /// Seeds every random choice, so a simulation replays exactly.
    pub seed: u64,
    /// How often queued table writes are sent again.
    pub gossip_interval_ms: u64,
    /// Nodes each write is pushed to at once and on every gossip round.
    pub fanout: usize,
    /// A write is sent `retransmit_mult * ceil(log10(n + 1))` times (n: nodes in its scope).
    pub retransmit_mult: u32,
    /// The largest datagram sent, sealing included.
    pub max_datagram: usize,
    /// How often to run a full-state sync with a random member.
    pub sync_interval_ms: u64,
    /// A sync that teaches more writes than this is a bootstrap: they are not re-gossiped.
    pub sync_regossip_max: usize,
    /// How often to announce to the seeds again while no member is known.
    pub rejoin_interval_ms: u64,
    /// Packets whose send time is further than this from now are dropped.
    pub max_packet_age_ms: u64,
    /// Tombstones, and entries whose owner is Down or off the network, are forgotten after
    /// they have been so for this long.
    pub reap_after_ms: u64,
    pub reap_interval_ms: u64,
    /// How often the hosts of Suspect and Down members are probed (`Output::ProbeHost`).
    pub host_probe_interval_ms: u64,
    /// A host probe unanswered by then says the host is gone.
    pub host_probe_timeout_ms: u64,
    /// How long a Down member's entries stay visible while its host still answers (its agent
    /// is silent but its dataplane forwards); then they are withdrawn anyway.
    pub silent_agent_grace_ms: u64,
    /// Foca's timings scale with the cluster size; this is the starting guess.
    pub expected_cluster_size: u32,
    pub swim: SwimConfig,
}

/// Failure-detection settings (foca's `new_lan` with these replaced). Detection takes about
/// `2 * probe_period + suspicion + dissemination`; see docs/gossip.md.
#[derive(Clone, Debug)]
pub struct SwimConfig {
    /// Each node probes one member (shuffled round-robin) this often.
    pub probe_period_ms: u64,
    /// How long a direct probe waits for its ack before the indirect probes (and the retry)
    /// go out.
    pub probe_rtt_ms: u64,
    /// Members asked to probe indirectly after a missed ack.
    pub indirect_probes: usize,
    /// Sends the direct probe once more along with the indirect ones (memberlist sends a
    /// TCP ping then): a single lost ping or ack no longer needs the indirect path.
    pub retry_direct_probe: bool,
    /// A suspect is declared Down `suspicion_mult * max(1, log10(n)) * probe_period` after
    /// the failed probe (n: live cluster size).
    pub suspicion_mult: f64,
}

impl SwimConfig {
    /// foca's `new_lan` (memberlist's LAN defaults) as they are.
    pub fn foca_lan() -> SwimConfig {
        SwimConfig {
            probe_period_ms: 1_000,
            probe_rtt_ms: 500,
            indirect_probes: 3,
            retry_direct_probe: false,
            suspicion_mult: 4.0,
        }
    }

    /// Faster detection that tolerates lossy links: a probe fails only if the direct ping
    /// fails twice and every one of 6 indirect paths fails too (about 4e-7 at 5% loss).
    pub fn fast_lossy_lan() -> SwimConfig {
        SwimConfig {
            probe_period_ms: 500,
            probe_rtt_ms: 200,
            indirect_probes: 6,
            retry_direct_probe: true,
            suspicion_mult: 3.0,
        }
    }

    fn suspicion(&self, cluster_size: u32) -> Duration {
        let scale = f64::from(cluster_size.max(1)).log10().max(1.0);
        Duration::from_millis((self.suspicion_mult * scale * self.probe_period_ms as f64) as u64)
    }
}

impl GossipConfig {
    /// Production defaults.
    pub fn new(node_id: &str, addr: SocketAddr, seed: u64) -> GossipConfig {
        GossipConfig {
            node_id: node_id.to_owned(),
            addr,
            seed,
            gossip_interval_ms: 200,
            fanout: 3,
            // memberlist's 4 left about one (node, write) pair of a 96-task burst on 32 nodes
            // unreached (e^-8 per pair) until the next sync, 30 s on; 6 makes it e^-12.
            retransmit_mult: 6,
            max_datagram: 1_400,
            sync_interval_ms: 30_000,
            sync_regossip_max: 64,
            rejoin_interval_ms: 1_000,
            max_packet_age_ms: 60_000,
            reap_after_ms: 30 * 60_000,
            reap_interval_ms: 60_000,
            host_probe_interval_ms: 500,
            host_probe_timeout_ms: 500,
            silent_agent_grace_ms: 60_000,
            expected_cluster_size: 16,
            swim: SwimConfig::fast_lossy_lan(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node ids are 1 to {MAX_NODE_ID_LEN} bytes")]
    NodeId,
    #[error("network names are 1 to 255 bytes without '/'")]
    NetworkName,
    #[error("this node is not on network {0}")]
    NotOnNetwork(String),
    #[error("dropped: {0}")]
    Dropped(#[from] DropReason),
}

/// What the node wants done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Datagram {
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// Send over TCP and hand the answer to `handle_sync_response`.
    SyncRequest {
        to: SocketAddr,
        bytes: Vec<u8>,
    },
    /// The live view of a network may have changed: read `view(net)` again.
    Changed {
        net: String,
    },
    MembersChanged,
    /// Probe the host of a Suspect or Down member with something its kernel answers without
    /// the agent (a TCP connect to `to`), and hand the answer to `host_answered`: accepted or
    /// refused within `timeout_ms` means the host is there.
    ProbeHost {
        node: String,
        to: SocketAddr,
        timeout_ms: u64,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MemberState {
    Alive,
    Suspect,
    Down,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemberInfo {
    pub node_id: String,
    pub addr: SocketAddr,
    pub state: MemberState,
    pub incarnation: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GossipStats {
    pub packets_sent: u64,
    pub bytes_sent: u64,
    pub packets_received: u64,
    pub bytes_received: u64,
    pub auth_failures: u64,
    pub replays_dropped: u64,
    /// Too old, from the future, or from an older boot of the sender.
    pub stale_dropped: u64,
    pub malformed_dropped: u64,
    /// Writes for a network this node is not on (a sender's stale view).
    pub out_of_scope_dropped: u64,
    /// Probes of this node that failed, making it suspect the member.
    pub suspicions: u64,
    /// Times this node saw a member go Down.
    pub downs_observed: u64,
    pub syncs_sent: u64,
    pub syncs_answered: u64,
    pub members_alive: usize,
    pub members_suspect: usize,
    pub members_down: usize,
}

/// The direct ping of the probe in flight, sent once more if its ack is late.
struct DirectProbe {
    to: SocketAddr,
    number: ProbeNumber,
    ping: Vec<u8>,
}

struct Peer {
    identity: NodeIdentity,
    /// Alive or Suspect; a Down node's entries leave every view unless its host answers.
    up: bool,
}

/// The host probes of a Suspect or Down member: an agent that is silent on gossip is not a
/// node that is gone while its host still answers.
#[derive(Default)]
struct HostWatch {
    /// What the latest probe said; None until one answered.
    answering: Option<bool>,
    /// Set when the member goes Down: its entries stay visible until then while its host
    /// answers.
    keep_until: Option<u64>,
}

impl HostWatch {
    fn keeps_entries(&self) -> bool {
        self.keep_until.is_some() && self.answering == Some(true)
    }
}

/// Where foca's effects land until the node turns them into outputs.
#[derive(Default)]
struct FocaEffects {
    sends: Vec<(SocketAddr, Vec<u8>)>,
    timers: Vec<(Duration, Timer<NodeIdentity>)>,
    notes: Vec<Note>,
}

enum Note {
    Up(NodeIdentity),
    Down(NodeIdentity),
    Renamed(NodeIdentity, NodeIdentity),
    ProbeFailed,
}

impl Runtime<NodeIdentity> for FocaEffects {
    fn notify(&mut self, notification: Notification<'_, NodeIdentity>) {
        let note = match notification {
            Notification::MemberUp(id) => Note::Up(id.clone()),
            Notification::MemberDown(id) => Note::Down(id.clone()),
            Notification::Rename(old, new) => Note::Renamed(old.clone(), new.clone()),
            Notification::ProbeFailed(..) => Note::ProbeFailed,
            _ => return,
        };
        self.notes.push(note);
    }

    fn send_to(&mut self, to: NodeIdentity, data: &[u8]) {
        self.sends.push((to.addr, data.to_vec()));
    }

    fn submit_after(&mut self, event: Timer<NodeIdentity>, after: Duration) {
        self.timers.push((after, event));
    }
}

type Swim = Foca<NodeIdentity, PostcardCodec, SmallRng, NoCustomBroadcast>;

pub struct Gossip {
    config: GossipConfig,
    foca: Swim,
    effects: FocaEffects,
    rng: SmallRng,
    sealer: Sealer,
    timers: BTreeMap<(u64, u64), Timer<NodeIdentity>>,
    timer_seq: u64,
    direct_probe: Option<DirectProbe>,
    foca_sized_for: u32,
    peers: BTreeMap<String, Peer>,
    /// How many of `peers` are up, kept as they change.
    peers_up: usize,
    /// The reachable (Alive or Suspect) members of each scope, this node excluded, kept as
    /// peers and network memberships change: picking gossip targets must not walk them all.
    live: BTreeMap<Scope, BTreeSet<String>>,
    membership: Table<()>,
    /// Which nodes are on which network, from the live entries of `membership`.
    net_members: BTreeMap<String, BTreeSet<String>>,
    /// The networks this node is on, and the endpoints it publishes: what it wants the
    /// tables to say about itself.
    my_networks: BTreeSet<String>,
    my_endpoints: BTreeMap<(String, String), EndpointRecord>,
    tables: BTreeMap<String, Table<EndpointRecord>>,
    queue: TransmitQueue,
    outputs: VecDeque<Output>,
    changed: BTreeSet<String>,
    members_changed: bool,
    seeds: Vec<SocketAddr>,
    sync_on_first_member: bool,
    /// Nodes that joined one of our networks before SWIM told us their address: synced
    /// with as soon as they are up.
    pending_syncs: BTreeSet<String>,
    next_gossip: u64,
    next_sync: Option<u64>,
    next_rejoin: Option<u64>,
    next_reap: u64,
    /// Since when each entry has been reapable (tombstone, owner Down or off the network).
    dead_since: BTreeMap<(Scope, String), u64>,
    /// Members whose host is being probed: Suspect ones, and Down ones within the grace.
    hosts: BTreeMap<String, HostWatch>,
    next_host_probe: u64,
    stats: GossipStats,
}

fn foca_config(cluster_size: u32, config: &GossipConfig) -> Config {
    let swim = &config.swim;
    let mut foca = Config::new_lan(NonZeroU32::new(cluster_size.max(1)).unwrap_or(NonZeroU32::MIN));
    foca.probe_period = Duration::from_millis(swim.probe_period_ms.max(2));
    foca.probe_rtt =
        Duration::from_millis(swim.probe_rtt_ms.clamp(1, swim.probe_period_ms.max(2) - 1));
    foca.num_indirect_probes = NonZeroUsize::new(swim.indirect_probes).unwrap_or(NonZeroUsize::MIN);
    foca.suspect_to_down_after = swim.suspicion(cluster_size).max(Duration::from_millis(1));
    let room = config
        .max_datagram
        .saturating_sub(MAX_OVERHEAD + MESSAGE_FRAMING)
        .max(512);
    foca.max_packet_size = NonZeroUsize::new(room).unwrap_or(NonZeroUsize::MIN);
    foca
}

/// The header of a foca packet (who sent it to whom, and which message).
fn swim_header(data: &[u8]) -> Option<Header<NodeIdentity>> {
    Codec::<NodeIdentity>::decode_header(&mut PostcardCodec, data).ok()
}

fn valid_network_name(net: &str) -> bool {
    !net.is_empty() && net.len() <= 255 && !net.contains('/')
}

impl Gossip {
    pub fn new(config: GossipConfig, keyring: Keyring, now_ms: u64) -> Result<Gossip, Error> {
        if config.node_id.is_empty() || config.node_id.len() > MAX_NODE_ID_LEN {
            return Err(Error::NodeId);
        }
        let mut rng = SmallRng::seed_from_u64(config.seed);
        let identity = NodeIdentity {
            node_id: config.node_id.clone(),
            addr: config.addr,
            bump: now_ms,
        };
        let foca = Foca::new(
            identity,
            foca_config(config.expected_cluster_size, &config),
            SmallRng::seed_from_u64(rng.next_u64()),
            PostcardCodec,
        );
        let sealer = Sealer::new(
            &config.node_id,
            now_ms,
            rng.next_u64(),
            config.max_packet_age_ms,
            &keyring,
        );
        Ok(Gossip {
            foca,
            effects: FocaEffects::default(),
            rng,
            sealer,
            timers: BTreeMap::new(),
            timer_seq: 0,
            direct_probe: None,
            foca_sized_for: config.expected_cluster_size,
            peers: BTreeMap::new(),
            peers_up: 0,
            live: BTreeMap::new(),
            membership: Table::new(&config.node_id),
            net_members: BTreeMap::new(),
            my_networks: BTreeSet::new(),
            my_endpoints: BTreeMap::new(),
            tables: BTreeMap::new(),
            queue: TransmitQueue::default(),
            outputs: VecDeque::new(),
            changed: BTreeSet::new(),
            members_changed: false,
            seeds: Vec::new(),
            sync_on_first_member: false,
            pending_syncs: BTreeSet::new(),
            next_gossip: now_ms + config.gossip_interval_ms,
            next_sync: None,
            next_rejoin: None,
            next_reap: now_ms + config.reap_interval_ms,
            dead_since: BTreeMap::new(),
            hosts: BTreeMap::new(),
            next_host_probe: now_ms + config.host_probe_interval_ms,
            stats: GossipStats::default(),
            config,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    pub fn addr(&self) -> SocketAddr {
        self.config.addr
    }

    /// Announces this node to the seeds (its own address and dead seeds are fine: it keeps
    /// announcing every `rejoin_interval_ms` while it knows no member) and syncs with the
    /// first member it learns of.
    pub fn join(&mut self, seeds: &[SocketAddr], now_ms: u64) {
        self.seeds = seeds
            .iter()
            .copied()
            .filter(|s| *s != self.config.addr)
            .collect();
        self.announce_to_seeds();
        self.sync_on_first_member = true;
        self.next_sync = Some(now_ms + self.config.sync_interval_ms);
        self.next_rejoin = Some(now_ms + self.config.rejoin_interval_ms);
        self.drain_effects(now_ms);
    }

    fn announce_to_seeds(&mut self) {
        for seed in self.seeds.clone() {
            // An announce can only fail to encode, which our identities never do.
            let _ = self
                .foca
                .announce(NodeIdentity::seed(seed), &mut self.effects);
        }
    }

    /// Takes a new keyring (the newest key last); see `wire` for which key sends.
    pub fn set_keyring(&mut self, keyring: Keyring) {
        self.sealer.set_keyring(&keyring);
    }

    pub fn join_network(&mut self, net: &str, now_ms: u64) -> Result<(), Error> {
        if !valid_network_name(net) {
            return Err(Error::NetworkName);
        }
        if !self.my_networks.insert(net.to_owned()) {
            return Ok(());
        }
        self.tables
            .insert(net.to_owned(), Table::new(&self.config.node_id));
        let key = membership_key(net, &self.config.node_id);
        let entry = self.membership.set(&key, ());
        self.set_net_member(net, &self.config.node_id.clone(), true);
        self.changed.insert(net.to_owned());
        self.enqueue(Update::Membership { key, entry }, now_ms);
        self.flush(&Scope::Cluster, now_ms);
        // The network's table is only sent to its members: fetch it now rather than at the
        // next periodic sync.
        if let Some(peer) = self.random_live(&Scope::Network(net.to_owned()), 1).pop() {
            self.start_sync(&peer, now_ms);
        }
        Ok(())
    }

    /// Leaves a network: tombstones this node's endpoints there and its membership, and
    /// forgets the network's table.
    pub fn leave_network(&mut self, net: &str, now_ms: u64) {
        if !self.my_networks.remove(net) {
            return;
        }
        let keys: Vec<String> = self
            .my_endpoints
            .keys()
            .filter(|(n, _)| n == net)
            .map(|(_, k)| k.clone())
            .collect();
        for key in keys {
            self.my_endpoints.remove(&(net.to_owned(), key.clone()));
            if let Some(table) = self.tables.get_mut(net) {
                let entry = table.delete(&key);
                self.enqueue(
                    Update::Endpoint {
                        net: net.to_owned(),
                        key,
                        entry,
                    },
                    now_ms,
                );
            }
        }
        let key = membership_key(net, &self.config.node_id);
        let entry = self.membership.delete(&key);
        self.enqueue(Update::Membership { key, entry }, now_ms);
        self.set_net_member(net, &self.config.node_id.clone(), false);
        self.flush(&Scope::Network(net.to_owned()), now_ms);
        self.flush(&Scope::Cluster, now_ms);
        self.tables.remove(net);
        self.changed.insert(net.to_owned());
    }

    /// Publishes (or replaces) one of this node's endpoints on a network it is on.
    pub fn publish(
        &mut self,
        net: &str,
        key: &str,
        value: EndpointRecord,
        now_ms: u64,
    ) -> Result<(), Error> {
        let table = self
            .tables
            .get_mut(net)
            .ok_or_else(|| Error::NotOnNetwork(net.to_owned()))?;
        let endpoint = (net.to_owned(), key.to_owned());
        let unchanged =
            self.my_endpoints.get(&endpoint) == Some(&value) && table.get(key) == Some(&value);
        self.my_endpoints.insert(endpoint, value.clone());
        if unchanged {
            return Ok(());
        }
        let entry = table.set(key, value);
        self.write_endpoint(net, key, entry, now_ms);
        Ok(())
    }

    /// Withdraws one of this node's endpoints (a tombstone).
    pub fn withdraw(&mut self, net: &str, key: &str, now_ms: u64) {
        self.my_endpoints.remove(&(net.to_owned(), key.to_owned()));
        let Some(table) = self.tables.get_mut(net) else {
            return;
        };
        if table.get(key).is_none() {
            return;
        }
        let entry = table.delete(key);
        self.write_endpoint(net, key, entry, now_ms);
    }

    fn write_endpoint(&mut self, net: &str, key: &str, entry: Entry<EndpointRecord>, now_ms: u64) {
        self.changed.insert(net.to_owned());
        self.enqueue(
            Update::Endpoint {
                net: net.to_owned(),
                key: key.to_owned(),
                entry,
            },
            now_ms,
        );
        self.flush(&Scope::Network(net.to_owned()), now_ms);
    }

    fn enqueue(&mut self, update: Update, now_ms: u64) {
        if self.queue.is_empty() {
            // The first gossip round for it comes one interval after the immediate push.
            self.next_gossip = now_ms + self.config.gossip_interval_ms;
        }
        self.queue.push(update);
    }

    /// Handles a datagram. `from` is informational: the sender is the authenticated node id
    /// in the packet header.
    pub fn handle_datagram(&mut self, _from: SocketAddr, bytes: &[u8], now_ms: u64) {
        self.stats.packets_received += 1;
        self.stats.bytes_received += bytes.len() as u64;
        let Ok(plain) = self.open(Kind::Datagram, bytes, now_ms) else {
            return;
        };
        match message::decode::<Message>(&plain) {
            Ok(Message::Swim(data)) => {
                self.note_probe_ack(&data);
                if self.foca.handle_data(&data, &mut self.effects).is_err() {
                    self.stats.malformed_dropped += 1;
                }
            }
            Ok(Message::Updates(updates)) => self.apply(updates, true, now_ms),
            Err(_) => self.stats.malformed_dropped += 1,
        }
        self.drain_effects(now_ms);
    }

    fn handle_foca_timer(&mut self, timer: Timer<NodeIdentity>) {
        let retry_for = match &timer {
            Timer::SendIndirectProbe { probed_id, .. } if self.config.swim.retry_direct_probe => {
                Some(probed_id.addr)
            }
            _ => None,
        };
        let starts_probe = matches!(timer, Timer::ProbeRandomMember(_));
        // Errors are foca refusing a stale timer: nothing to do.
        let _ = self.foca.handle_timer(timer, &mut self.effects);
        if starts_probe {
            self.direct_probe = self
                .effects
                .sends
                .iter()
                .find_map(|(to, data)| match swim_header(data)?.message {
                    SwimMessage::Ping(number) => Some(DirectProbe {
                        to: *to,
                        number,
                        ping: data.clone(),
                    }),
                    _ => None,
                });
        }
        if let Some(probed) = retry_for {
            if let Some(probe) = self.direct_probe.take().filter(|p| p.to == probed) {
                self.effects.sends.push((probe.to, probe.ping));
            }
        }
    }

    /// Forgets the direct probe in flight once its ack arrives: it needs no retry.
    fn note_probe_ack(&mut self, data: &[u8]) {
        let Some(probe) = &self.direct_probe else {
            return;
        };
        let Some(header) = swim_header(data) else {
            return;
        };
        if header.src.addr == probe.to && header.message == SwimMessage::Ack(probe.number) {
            self.direct_probe = None;
        }
    }

    /// Opens a sealed packet of the expected kind, counting why it was dropped if it was.
    fn open(&mut self, kind: Kind, bytes: &[u8], now_ms: u64) -> Result<Vec<u8>, DropReason> {
        let opened = self.sealer.open(bytes, now_ms).and_then(|(header, plain)| {
            if header.kind == kind {
                Ok(plain)
            } else {
                Err(DropReason::Malformed)
            }
        });
        if let Err(reason) = &opened {
            match reason {
                DropReason::AuthFailure => self.stats.auth_failures += 1,
                DropReason::Replay => self.stats.replays_dropped += 1,
                DropReason::Stale => self.stats.stale_dropped += 1,
                DropReason::Malformed => self.stats.malformed_dropped += 1,
            }
        }
        opened
    }

    /// Fires due timers and periodic work: foca's probes, gossip rounds, syncs, rejoins and
    /// reaping.
    pub fn tick(&mut self, now_ms: u64) {
        for _ in 0..MAX_TIMERS_PER_TICK {
            let Some(entry) = self.timers.first_entry() else {
                break;
            };
            if entry.key().0 > now_ms {
                break;
            }
            let timer = entry.remove();
            self.handle_foca_timer(timer);
            self.drain_effects(now_ms);
        }
        if now_ms >= self.next_gossip {
            self.next_gossip = now_ms + self.config.gossip_interval_ms;
            for scope in self.queue.scopes() {
                self.flush(&scope, now_ms);
            }
        }
        if self.next_sync.is_some_and(|t| now_ms >= t) {
            self.next_sync = Some(now_ms + self.config.sync_interval_ms);
            if let Some(peer) = self.random_live(&Scope::Cluster, 1).pop() {
                self.start_sync(&peer, now_ms);
            }
        }
        if self.next_rejoin.is_some_and(|t| now_ms >= t) {
            self.next_rejoin = Some(now_ms + self.config.rejoin_interval_ms);
            if self.peers_up == 0 {
                self.sync_on_first_member = true;
                self.announce_to_seeds();
            }
        }
        if now_ms >= self.next_reap {
            self.next_reap = now_ms + self.config.reap_interval_ms;
            self.reap(now_ms);
        }
        if now_ms >= self.next_host_probe {
            self.next_host_probe = now_ms + self.config.host_probe_interval_ms;
            self.probe_hosts(now_ms);
        }
        self.drain_effects(now_ms);
    }

    /// When `tick` should next be called.
    pub fn next_deadline(&self) -> Option<u64> {
        let gossip = (!self.queue.is_empty()).then_some(self.next_gossip);
        [
            self.timers.keys().next().map(|(due, _)| *due),
            gossip,
            self.next_sync,
            self.next_rejoin,
            Some(self.next_reap),
            Some(self.next_host_probe),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(output) = self.outputs.pop_front() {
            return Some(output);
        }
        if std::mem::take(&mut self.members_changed) {
            return Some(Output::MembersChanged);
        }
        self.changed.pop_first().map(|net| Output::Changed { net })
    }

    /// Answers a full-state sync: merges what the peer sent, returns this node's state.
    pub fn handle_sync_request(
        &mut self,
        _from: SocketAddr,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<Vec<u8>, Error> {
        let plain = self.open(Kind::SyncRequest, bytes, now_ms)?;
        let (sender, state) = self.decode_sync(&plain)?;
        self.apply_sync(state, now_ms);
        self.stats.syncs_answered += 1;
        let answer = self.sync_state_for(&sender);
        let payload = message::encode(&answer).map_err(|_| DropReason::Malformed)?;
        let sealed = self.sealer.seal(Kind::SyncResponse, &payload, now_ms);
        self.drain_effects(now_ms);
        Ok(sealed)
    }

    pub fn handle_sync_response(
        &mut self,
        _from: SocketAddr,
        bytes: &[u8],
        now_ms: u64,
    ) -> Result<(), Error> {
        let plain = self.open(Kind::SyncResponse, bytes, now_ms)?;
        let (_, state) = self.decode_sync(&plain)?;
        self.apply_sync(state, now_ms);
        self.drain_effects(now_ms);
        Ok(())
    }

    fn decode_sync(&mut self, plain: &[u8]) -> Result<(String, SyncState), Error> {
        match message::decode::<(String, SyncState)>(plain) {
            Ok(decoded) => Ok(decoded),
            Err(_) => {
                self.stats.malformed_dropped += 1;
                Err(DropReason::Malformed.into())
            }
        }
    }

    fn start_sync(&mut self, peer: &str, now_ms: u64) {
        let Some(addr) = self.peers.get(peer).map(|p| p.identity.addr) else {
            return;
        };
        let state = self.sync_state_for(peer);
        let Ok(payload) = message::encode(&state) else {
            return;
        };
        let bytes = self.sealer.seal(Kind::SyncRequest, &payload, now_ms);
        self.stats.syncs_sent += 1;
        self.outputs
            .push_back(Output::SyncRequest { to: addr, bytes });
    }

    /// This node's id, the whole membership table, and the tables of the networks `peer`
    /// is on too (as far as this node knows).
    fn sync_state_for(&self, peer: &str) -> (String, SyncState) {
        let membership = self
            .membership
            .entries()
            .map(|(k, e)| (k.to_owned(), e.clone()))
            .collect();
        let networks = self
            .tables
            .iter()
            .filter(|(net, _)| self.net_members.get(*net).is_some_and(|m| m.contains(peer)))
            .map(|(net, table)| {
                let entries = table
                    .entries()
                    .map(|(k, e)| (k.to_owned(), e.clone()))
                    .collect();
                (net.clone(), entries)
            })
            .collect();
        let me = (self.foca.identity().clone(), 0);
        let members = std::iter::once(me)
            .chain(
                self.foca
                    .iter_members()
                    .map(|m| (m.id().clone(), m.incarnation())),
            )
            .collect();
        (
            self.config.node_id.clone(),
            SyncState {
                members,
                membership,
                networks,
            },
        )
    }

    fn apply_sync(&mut self, state: SyncState, now_ms: u64) {
        // Old news for the rest of the cluster: learned, not re-broadcast. A stale entry loses
        // to what this node knows (a higher incarnation, Down, or a newer identity).
        let members = state
            .members
            .into_iter()
            .map(|(id, incarnation)| Member::new(id, incarnation, State::Alive));
        // Errors are members that fail to encode, which ours never do.
        let _ = self.foca.apply_many(members, false, &mut self.effects);
        let mut updates: Vec<Update> = state
            .membership
            .into_iter()
            .map(|(key, entry)| Update::Membership { key, entry })
            .collect();
        for (net, entries) in state.networks {
            updates.extend(entries.into_iter().map(|(key, entry)| Update::Endpoint {
                net: net.clone(),
                key,
                entry,
            }));
        }
        // Only a sync that repairs a few writes spreads them: a large one is a node catching
        // up, whose news is old news for everyone else.
        let news = updates.iter().filter(|u| self.is_news(u)).count();
        self.apply(updates, news <= self.config.sync_regossip_max, now_ms);
    }

    fn is_news(&self, update: &Update) -> bool {
        match update {
            Update::Membership { key, entry } => self
                .membership
                .entry(key)
                .is_none_or(|ours| ours.version < entry.version),
            Update::Endpoint { net, key, entry } => self
                .tables
                .get(net)
                .is_some_and(|t| t.entry(key).is_none_or(|ours| ours.version < entry.version)),
        }
    }

    /// Merges received writes; rewrites this node's own keys where they disagree with what
    /// it wants (it restarted and lost them, or left); queues the news for gossip.
    fn apply(&mut self, updates: Vec<Update>, regossip: bool, now_ms: u64) {
        let mut dirty: BTreeSet<Scope> = BTreeSet::new();
        for update in updates {
            let scope = update.scope();
            let merged = match &update {
                Update::Membership { key, entry } => {
                    let changed = self.membership.merge(key, entry.clone());
                    if changed {
                        self.membership_changed(key, entry, now_ms);
                    }
                    changed
                }
                Update::Endpoint { net, key, entry } => {
                    let Some(table) = self.tables.get_mut(net) else {
                        self.stats.out_of_scope_dropped += 1;
                        continue;
                    };
                    let changed = table.merge(key, entry.clone());
                    if changed {
                        self.changed.insert(net.clone());
                        self.correct_own_endpoint(net, key, entry, now_ms);
                    }
                    changed
                }
            };
            if merged && regossip {
                self.enqueue(update, now_ms);
                dirty.insert(scope);
            }
        }
        for scope in dirty {
            self.flush(&scope, now_ms);
        }
    }

    fn membership_changed(&mut self, key: &str, entry: &Entry<()>, now_ms: u64) {
        let Some((net, node)) = split_membership_key(key) else {
            return;
        };
        let (net, node) = (net.to_owned(), node.to_owned());
        self.set_net_member(&net, &node, entry.value.is_some());
        if self.my_networks.contains(&net) {
            self.changed.insert(net.clone());
            // A node that just joined one of our networks has none of our endpoints there yet
            // (and we none of its own): exchange tables now rather than at the next periodic
            // sync, or as soon as SWIM says it is up. Only publishers start it, so a network
            // that many nodes join at once without endpoints costs no sync storm; the answer
            // brings the newcomer's back.
            if entry.value.is_some() && node != self.config.node_id && self.publishes_on(&net) {
                if self.peers.get(&node).is_some_and(|p| p.up) {
                    self.start_sync(&node, now_ms);
                } else {
                    self.pending_syncs.insert(node.clone());
                }
            }
        }
        if node == self.config.node_id && entry.version.node == self.config.node_id {
            let wanted = self.my_networks.contains(&net);
            if entry.value.is_some() != wanted {
                let entry = if wanted {
                    self.membership.set(key, ())
                } else {
                    self.membership.delete(key)
                };
                self.set_net_member(&net, &node, wanted);
                self.enqueue(
                    Update::Membership {
                        key: key.to_owned(),
                        entry,
                    },
                    now_ms,
                );
                self.flush(&Scope::Cluster, now_ms);
            }
        }
    }

    /// Whether this node publishes any endpoint on `net`.
    fn publishes_on(&self, net: &str) -> bool {
        self.my_endpoints
            .range((net.to_owned(), String::new())..)
            .next()
            .is_some_and(|((n, _), _)| n == net)
    }

    fn correct_own_endpoint(
        &mut self,
        net: &str,
        key: &str,
        entry: &Entry<EndpointRecord>,
        now_ms: u64,
    ) {
        if entry.version.node != self.config.node_id {
            return;
        }
        let wanted = self.my_endpoints.get(&(net.to_owned(), key.to_owned()));
        if entry.value.as_ref() == wanted {
            return;
        }
        let wanted = wanted.cloned();
        let Some(table) = self.tables.get_mut(net) else {
            return;
        };
        let entry = match wanted {
            Some(value) => table.set(key, value),
            None => table.delete(key),
        };
        self.write_endpoint(net, key, entry, now_ms);
    }

    /// Records whether `node` is on `net`, as a live membership entry now says.
    fn set_net_member(&mut self, net: &str, node: &str, present: bool) {
        let up = self.peers.get(node).is_some_and(|p| p.up);
        self.set_live(Scope::Network(net.to_owned()), node, present && up);
        if present {
            self.net_members
                .entry(net.to_owned())
                .or_default()
                .insert(node.to_owned());
        } else if let Some(members) = self.net_members.get_mut(net) {
            members.remove(node);
            if members.is_empty() {
                self.net_members.remove(net);
            }
        }
    }

    fn live_count(&self, scope: &Scope) -> usize {
        self.live.get(scope).map_or(0, BTreeSet::len)
    }

    /// Up to `k` distinct random reachable members of a scope, in random order.
    fn random_live(&mut self, scope: &Scope, k: usize) -> Vec<String> {
        let count = self.live_count(scope);
        let k = k.min(count);
        // Floyd's sampling: k distinct indices without walking the set more than once.
        let mut picks: Vec<usize> = Vec::with_capacity(k);
        for top in count - k..count {
            let pick = self.rng.random_range(0..=top);
            picks.push(if picks.contains(&pick) { top } else { pick });
        }
        let mut chosen: Vec<String> = self.live.get(scope).map_or_else(Vec::new, |members| {
            members
                .iter()
                .enumerate()
                .filter(|(i, _)| picks.contains(i))
                .map(|(_, id)| id.clone())
                .collect()
        });
        chosen.shuffle(&mut self.rng);
        chosen
    }

    /// Keeps `live` in step with a peer's reachability or a network membership.
    fn set_live(&mut self, scope: Scope, node: &str, live: bool) {
        if live {
            self.live.entry(scope).or_default().insert(node.to_owned());
        } else if let Some(members) = self.live.get_mut(&scope) {
            members.remove(node);
        }
    }

    /// Sends the queued writes of a scope to `fanout` random members of it.
    fn flush(&mut self, scope: &Scope, now_ms: u64) {
        let members = self.live_count(scope);
        if members == 0 {
            return;
        }
        let limit =
            self.config.retransmit_mult * ((members + 2) as f64).log10().ceil().max(1.0) as u32;
        let budget = self
            .config
            .max_datagram
            .saturating_sub(MAX_OVERHEAD + MESSAGE_FRAMING);
        let targets: Vec<SocketAddr> = self
            .random_live(scope, self.config.fanout)
            .iter()
            .filter_map(|id| self.peers.get(id).map(|p| p.identity.addr))
            .collect();
        for to in targets {
            let batch = self.queue.take_batch(scope, budget, limit);
            if batch.is_empty() {
                break;
            }
            self.send_message(to, &Message::Updates(batch), now_ms);
        }
    }

    fn send_message(&mut self, to: SocketAddr, message: &Message, now_ms: u64) {
        let Ok(payload) = message::encode(message) else {
            return;
        };
        let bytes = self.sealer.seal(Kind::Datagram, &payload, now_ms);
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += bytes.len() as u64;
        self.outputs.push_back(Output::Datagram { to, bytes });
    }

    /// Turns foca's sends, timers and notifications into outputs and state.
    fn drain_effects(&mut self, now_ms: u64) {
        for (to, data) in std::mem::take(&mut self.effects.sends) {
            self.send_message(to, &Message::Swim(data), now_ms);
        }
        for (after, timer) in std::mem::take(&mut self.effects.timers) {
            self.timer_seq += 1;
            let due = now_ms + after.as_millis() as u64;
            self.timers.insert((due, self.timer_seq), timer);
        }
        for note in std::mem::take(&mut self.effects.notes) {
            self.on_note(note, now_ms);
        }
    }

    fn on_note(&mut self, note: Note, now_ms: u64) {
        match note {
            Note::Up(id) => {
                let node = id.node_id.clone();
                let was_down = self.peers.get(&node).is_some_and(|p| !p.up);
                self.hosts.remove(&node);
                self.set_peer(id, true);
                let shares_a_network = self
                    .networks_of(&node)
                    .iter()
                    .any(|net| self.my_networks.contains(net));
                // The first member, one back from the dead that shares a network, or one that
                // joined our network before SWIM knew it, may hold state this node misses:
                // sync with it now. (A member merely discovered is not one: syncing with each
                // would be a storm while a cluster forms.)
                let pending = self.pending_syncs.remove(&node);
                if std::mem::take(&mut self.sync_on_first_member)
                    || pending
                    || (was_down && shares_a_network)
                {
                    self.start_sync(&node, now_ms);
                }
            }
            Note::Down(id) => {
                let current = self.peers.get(&id.node_id).map(|p| p.identity.bump);
                if current.is_none_or(|bump| bump <= id.bump) {
                    self.stats.downs_observed += 1;
                    self.watch_down_host(&id, now_ms);
                    self.set_peer(id, false);
                }
            }
            Note::Renamed(old, new) => {
                if old.node_id != new.node_id {
                    // Another node took this address: the old one is gone, whatever answers
                    // there.
                    self.hosts.remove(&old.node_id);
                    self.set_peer(old, false);
                }
                if let Some(peer) = self.peers.get_mut(&new.node_id) {
                    peer.identity = new;
                }
            }
            Note::ProbeFailed => self.stats.suspicions += 1,
        }
    }

    fn set_peer(&mut self, identity: NodeIdentity, up: bool) {
        let node = identity.node_id.clone();
        let was_up = self
            .peers
            .insert(node.clone(), Peer { identity, up })
            .is_some_and(|p| p.up);
        match (was_up, up) {
            (false, true) => self.peers_up += 1,
            (true, false) => self.peers_up -= 1,
            _ => {}
        }
        self.members_changed = true;
        self.set_live(Scope::Cluster, &node, up);
        for net in self.networks_of(&node) {
            self.set_live(Scope::Network(net), &node, up);
        }
        self.views_changed_by(&node);
        self.resize_foca();
    }

    /// Marks the networks of ours that `node` is on as changed: its entries' visibility did.
    fn views_changed_by(&mut self, node: &str) {
        for net in self.networks_of(node) {
            if self.my_networks.contains(&net) {
                self.changed.insert(net);
            }
        }
    }

    /// Foca's suspicion timeout and retransmissions scale with the cluster: retune when the
    /// number of live members doubles or halves.
    fn resize_foca(&mut self) {
        let size = self.peers_up as u32 + 1;
        if size >= self.foca_sized_for * 2 || size * 2 <= self.foca_sized_for {
            self.foca_sized_for = size.max(self.config.expected_cluster_size);
            // Only probe timings may not change, and they do not depend on the size.
            let _ = self
                .foca
                .set_config(foca_config(self.foca_sized_for, &self.config));
        }
    }

    /// Whether an owner's entries are out of the views: it is Down and its host does not
    /// answer (or has answered past the grace).
    fn owner_is_withdrawn(&self, owner: &str) -> bool {
        let down = self.peers.get(owner).is_some_and(|p| !p.up);
        down && !self.hosts.get(owner).is_some_and(HostWatch::keeps_entries)
    }

    /// A member went Down: its entries stay while its host answers, for the grace at most.
    /// Without an answer yet it is withdrawn as before and probed at once.
    fn watch_down_host(&mut self, id: &NodeIdentity, now_ms: u64) {
        let grace = self.config.silent_agent_grace_ms;
        let watch = self.hosts.entry(id.node_id.clone()).or_default();
        watch.keep_until = Some(now_ms + grace);
        match watch.answering {
            Some(true) => tracing::info!(
                node = %id.node_id,
                grace_s = grace / 1_000,
                "member Down but its host answers: keeping its entries"
            ),
            Some(false) => {}
            None => self.probe_host(&id.node_id, id.addr),
        }
    }

    /// The answer to `Output::ProbeHost`: whether the node's host answered in time.
    pub fn host_answered(&mut self, node: &str, answering: bool) {
        let Some(watch) = self.hosts.get_mut(node) else {
            return;
        };
        let kept_before = watch.keeps_entries();
        watch.answering = Some(answering);
        // Only a Down member's watch can keep entries: its visibility changes with the answer.
        let kept = watch.keeps_entries();
        if kept == kept_before {
            return;
        }
        if kept {
            tracing::info!(
                node = %node,
                "the host of a Down member answers: keeping its entries"
            );
        } else {
            tracing::info!(
                node = %node,
                "the host of a Down member stopped answering: withdrawing its entries"
            );
        }
        self.views_changed_by(node);
    }

    /// Probes the hosts of Suspect members (so that the answer is in before they go Down) and
    /// of Down members within the grace; stops watching the others.
    fn probe_hosts(&mut self, now_ms: u64) {
        let suspects: BTreeSet<String> = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == State::Suspect)
            .map(|m| m.id().node_id.clone())
            .collect();
        for node in &suspects {
            self.hosts.entry(node.clone()).or_default();
        }
        let ended: Vec<String> = self
            .hosts
            .iter()
            .filter(|(node, w)| {
                !suspects.contains(*node) && w.keep_until.is_none_or(|t| now_ms >= t)
            })
            .map(|(node, _)| node.clone())
            .collect();
        for node in ended {
            self.stop_watching_host(&node);
        }
        let targets: Vec<(String, SocketAddr)> = self
            .hosts
            .keys()
            .filter_map(|node| Some((node.clone(), self.peers.get(node)?.identity.addr)))
            .collect();
        for (node, addr) in targets {
            self.probe_host(&node, addr);
        }
    }

    fn stop_watching_host(&mut self, node: &str) {
        let Some(watch) = self.hosts.remove(node) else {
            return;
        };
        if watch.keeps_entries() {
            tracing::warn!(
                node = %node,
                grace_s = self.config.silent_agent_grace_ms / 1_000,
                "member Down past the grace while its host answers: withdrawing its entries"
            );
            self.views_changed_by(node);
        }
    }

    fn probe_host(&mut self, node: &str, to: SocketAddr) {
        self.outputs.push_back(Output::ProbeHost {
            node: node.to_owned(),
            to,
            timeout_ms: self.config.host_probe_timeout_ms,
        });
    }

    /// Forgets tombstones and entries of Down or departed owners once they have been so for
    /// `reap_after_ms`, without writing anything: every node does the same on its own.
    fn reap(&mut self, now_ms: u64) {
        let mut dead: Vec<(Scope, String)> = Vec::new();
        for (key, entry) in self.membership.entries() {
            if entry.value.is_none() || self.owner_is_withdrawn(&entry.version.node) {
                dead.push((Scope::Cluster, key.to_owned()));
            }
        }
        for (net, table) in &self.tables {
            let members = self.net_members.get(net);
            for (key, entry) in table.entries() {
                let owner = &entry.version.node;
                let departed = members.is_none_or(|m| !m.contains(owner));
                if entry.value.is_none() || self.owner_is_withdrawn(owner) || departed {
                    dead.push((Scope::Network(net.clone()), key.to_owned()));
                }
            }
        }
        let dead: BTreeSet<(Scope, String)> = dead.into_iter().collect();
        self.dead_since.retain(|k, _| dead.contains(k));
        for item in dead {
            let since = *self.dead_since.entry(item.clone()).or_insert(now_ms);
            if now_ms.saturating_sub(since) < self.config.reap_after_ms {
                continue;
            }
            self.dead_since.remove(&item);
            match &item.0 {
                Scope::Cluster => {
                    self.membership.remove(&item.1);
                }
                Scope::Network(net) => {
                    if let Some(table) = self.tables.get_mut(net) {
                        table.remove(&item.1);
                    }
                }
            }
        }
    }

    /// Every member foca knows (Down ones until foca forgets them), this node first.
    pub fn members(&self) -> Vec<MemberInfo> {
        let me = MemberInfo {
            node_id: self.config.node_id.clone(),
            addr: self.config.addr,
            state: MemberState::Alive,
            incarnation: 0,
        };
        std::iter::once(me)
            .chain(self.foca.iter_membership_state().map(|m| MemberInfo {
                node_id: m.id().node_id.clone(),
                addr: m.id().addr,
                state: match m.state() {
                    State::Alive => MemberState::Alive,
                    State::Suspect => MemberState::Suspect,
                    State::Down => MemberState::Down,
                },
                incarnation: m.incarnation(),
            }))
            .collect()
    }

    /// The networks a node is on, as the membership table says.
    pub fn networks_of(&self, node: &str) -> Vec<String> {
        self.net_members
            .iter()
            .filter(|(_, members)| members.contains(node))
            .map(|(net, _)| net.clone())
            .collect()
    }

    /// The networks this node is on.
    pub fn my_networks(&self) -> Vec<String> {
        self.my_networks.iter().cloned().collect()
    }

    /// The live endpoints of a network whose owner is on the network and not withdrawn (Down
    /// with a host that does not answer, or past the grace).
    pub fn view(&self, net: &str) -> Vec<(String, EndpointRecord)> {
        let Some(table) = self.tables.get(net) else {
            return Vec::new();
        };
        table
            .entries()
            .filter(|(_, e)| self.visible(net, e))
            .filter_map(|(k, e)| e.value.clone().map(|v| (k.to_owned(), v)))
            .collect()
    }

    /// One endpoint of the view, if visible.
    pub fn lookup(&self, net: &str, key: &str) -> Option<&EndpointRecord> {
        let entry = self.tables.get(net)?.entry(key)?;
        if self.visible(net, entry) {
            entry.value.as_ref()
        } else {
            None
        }
    }

    fn visible(&self, net: &str, entry: &Entry<EndpointRecord>) -> bool {
        let owner = &entry.version.node;
        let on_net = self.net_members.get(net).is_some_and(|m| m.contains(owner));
        on_net && !self.owner_is_withdrawn(owner)
    }

    /// Every entry of a network's table, tombstones and versions included (debugging).
    pub fn entries(&self, net: &str) -> Vec<(String, Entry<EndpointRecord>)> {
        self.tables
            .get(net)
            .map(|t| {
                t.entries()
                    .map(|(k, e)| (k.to_owned(), e.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The network-membership table (`net/node` keys), tombstones included.
    pub fn membership_entries(&self) -> Vec<(String, Entry<()>)> {
        self.membership
            .entries()
            .map(|(k, e)| (k.to_owned(), e.clone()))
            .collect()
    }

    pub fn stats(&self) -> GossipStats {
        let mut stats = self.stats.clone();
        for member in self.foca.iter_membership_state() {
            match member.state() {
                State::Alive => stats.members_alive += 1,
                State::Suspect => stats.members_suspect += 1,
                State::Down => stats.members_down += 1,
            }
        }
        stats
    }

    /// Counts input a driver rejected before it reached the core (an oversized sync frame).
    pub fn count_malformed(&mut self) {
        self.stats.malformed_dropped += 1;
    }

    /// Table writes waiting for retransmission (for tests and benchmarks).
    pub fn queued_writes(&self) -> usize {
        self.queue.len()
    }
}
