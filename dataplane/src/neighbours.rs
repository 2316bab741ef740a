//! The kernel's IPv4 neighbour (ARP) table. There is one for the whole machine, shared by
//! every network namespace, and its limits `net.ipv4.neigh.default.gc_thresh1/2/3` and its
//! statistics (`/proc/net/stat/arp_cache`) exist only in the initial namespace. When the
//! dynamic entries reach gc_thresh3 and nothing can be collected, new entries fail: the
//! kernel counts a `table_fulls` and the packet waiting for the address is lost (a SYN is
//! retried a second later). Permanent entries are exempt from the limits (Linux 4.20+) but
//! count in `entries`.
//!
//! What lives here: reading and raising the limits (`KernelNeighbourTable`), the sizing
//! policy (`NeighbourDemand`, `sized_for`), and the ledger through which every agent on one
//! kernel adds its demand to the others' (`DemandLedger`).

use std::{
    fs::{self, File, OpenOptions},
    io::ErrorKind,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use anyhow::{bail, Context as _, Result};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

/// The limit that refuses new entries, for messages that tell the operator what to raise.
pub const HARD_LIMIT_SETTING: &str = "net.ipv4.neigh.default.gc_thresh3";
const THRESHOLD_DIR: &str = "/proc/sys/net/ipv4/neigh/default";
/// `thread-self`: `/proc/net` is the main thread's view, and the thread that opens this may
/// have entered another namespace.
const ARP_CACHE_STATS: &str = "/proc/thread-self/net/stat/arp_cache";
/// Namespaces that are the initial one on a normal host: PID 1's, and kthreadd's (always
/// in the initial namespace; readable where PID 1 is not, as in some sandboxes).
const INITIAL_NETNS_CANDIDATES: [&str; 2] = ["/proc/1/ns/net", "/proc/2/ns/net"];

/// Room for the underlay's other hosts (routers, a lab's client) besides cluster nodes.
const UNDERLAY_SLACK: u32 = 16;
/// A task's ARP cache on one network: the peers it talks to, at most this many counted.
const TASK_PEERS_PER_NETWORK: u32 = 64;
/// Sizes are rounded up to this step so that a task more or less does not rewrite them;
/// a demand of one step gives the kernel's own defaults (128/512/1024).
const SIZE_STEP: u32 = 512;

/// The three limits of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Below it, entries are never collected.
    pub gc_thresh1: u32,
    /// Above it for 5 s, collection gets aggressive.
    pub gc_thresh2: u32,
    /// The hard limit on dynamic entries.
    pub gc_thresh3: u32,
}

impl Thresholds {
    fn as_array(self) -> [u32; 3] {
        [self.gc_thresh1, self.gc_thresh2, self.gc_thresh3]
    }

    fn from_array([gc_thresh1, gc_thresh2, gc_thresh3]: [u32; 3]) -> Self {
        Self {
            gc_thresh1,
            gc_thresh2,
            gc_thresh3,
        }
    }
}

/// The table's fill and overflow count, from `/proc/net/stat/arp_cache`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArpCacheStats {
    /// Entries in every namespace, permanent ones included.
    pub entries: u64,
    /// Entries refused because the table was full, since boot.
    pub table_fulls: u64,
}

/// Parses `/proc/net/stat/arp_cache`: a header, then one row of hex columns per CPU;
/// `entries` is table-wide (repeated on each row), the counters are per CPU.
pub fn parse_arp_cache(text: &str) -> Result<ArpCacheStats> {
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| *h == name)
            .with_context(|| format!("no {name} column in {ARP_CACHE_STATS}"))
    };
    let (entries, fulls) = (column("entries")?, column("table_fulls")?);
    let mut stats = ArpCacheStats::default();
    for (row, line) in lines.enumerate() {
        let values = line
            .split_whitespace()
            .map(|v| u64::from_str_radix(v, 16))
            .collect::<Result<Vec<u64>, _>>()
            .with_context(|| format!("a row of {ARP_CACHE_STATS} is not hex: {line:?}"))?;
        let value = |i: usize| values.get(i).copied().context("a short row");
        if row == 0 {
            stats.entries = value(entries)?;
        }
        stats.table_fulls += value(fulls)?;
    }
    Ok(stats)
}

/// One overlay network as it weighs on the table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkDemand {
    /// Endpoints on the network, this node's included.
    pub endpoints: u32,
    /// This node's tasks on it.
    pub local_tasks: u32,
    /// The routing mesh's network, where this node's own endpoint forwards to backends.
    pub ingress: bool,
}

/// What one node puts in the table: dynamic entries only (its static ones are permanent).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeighbourDemand {
    /// Nodes in the cluster, this one included: the underlay holds one entry for each other.
    pub cluster_nodes: u32,
    /// Tasks on this node with a way out: each end of their gateway veth holds the other.
    pub local_tasks: u32,
    pub networks: Vec<NetworkDemand>,
}

impl NeighbourDemand {
    /// The entries this node may hold at once.
    pub fn entries(&self) -> u32 {
        let underlay = UNDERLAY_SLACK + self.cluster_nodes.saturating_sub(1);
        let gateway = 2 * self.local_tasks;
        let overlays: u32 = self.networks.iter().map(NetworkDemand::entries).sum();
        underlay + gateway + overlays
    }
}

impl NetworkDemand {
    fn entries(&self) -> u32 {
        let peers = self.endpoints.saturating_sub(1);
        if self.ingress {
            // The node's endpoint reaches any backend; a task there only answers through
            // the node its flow came from (its MAC is written in eBPF, not looked up).
            peers + 2 * self.local_tasks
        } else {
            self.local_tasks * peers.min(TASK_PEERS_PER_NETWORK)
        }
    }
}

/// The limits for `demand` entries, never below `current` (an operator's higher values
/// stay): gc_thresh2 at the demand, gc_thresh3 twice that (room for bursts: it is the
/// hard limit), gc_thresh1 a quarter of it; the kernel's own ratios. The demand is rounded
/// up to a step, so the limits do not move with every task.
pub fn sized_for(demand: u32, current: Thresholds) -> Thresholds {
    let soft = demand.max(1).div_ceil(SIZE_STEP).saturating_mul(SIZE_STEP);
    let wanted = [soft / 4, soft, soft.saturating_mul(2)];
    let mut sized = current.as_array();
    for (value, want) in sized.iter_mut().zip(wanted) {
        *value = (*value).max(want);
    }
    Thresholds::from_array(sized)
}

/// The table's files in the initial namespace, opened once: a sysctl or proc file keeps
/// the namespace it was opened in, so they are read and written from any thread after.
pub struct KernelNeighbourTable {
    stats: File,
    /// gc_thresh1, 2 and 3.
    thresholds: [File; 3],
}

impl KernelNeighbourTable {
    /// Opens the files here if this is the initial namespace (an agent on a host), else
    /// from a short-lived thread that enters it (an agent in a lab node's namespace).
    pub fn open() -> Result<Self> {
        if Path::new(THRESHOLD_DIR).exists() {
            return Self::open_here();
        }
        let mut failures = Vec::new();
        for candidate in INITIAL_NETNS_CANDIDATES {
            match open_in_netns(Path::new(candidate)) {
                Ok(table) => return Ok(table),
                Err(err) => failures.push(format!("{candidate}: {err:#}")),
            }
        }
        bail!(
            "cannot reach the initial network namespace, where the kernel's neighbour table \
             is sized ({})",
            failures.join("; ")
        )
    }

    fn open_here() -> Result<Self> {
        let stats =
            File::open(ARP_CACHE_STATS).with_context(|| format!("opening {ARP_CACHE_STATS}"))?;
        let threshold = |n: u8| {
            let path = Path::new(THRESHOLD_DIR).join(format!("gc_thresh{n}"));
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .with_context(|| format!("opening {}", path.display()))
        };
        Ok(Self {
            stats,
            thresholds: [threshold(1)?, threshold(2)?, threshold(3)?],
        })
    }

    pub fn stats(&self) -> Result<ArpCacheStats> {
        parse_arp_cache(&read_whole(&self.stats)?)
    }

    pub fn thresholds(&self) -> Result<Thresholds> {
        let mut values = [0; 3];
        for (value, file) in values.iter_mut().zip(&self.thresholds) {
            let text = read_whole(file)?;
            *value = text
                .trim()
                .parse()
                .with_context(|| format!("a gc_thresh reads {text:?}"))?;
        }
        Ok(Thresholds::from_array(values))
    }

    /// Writes the limits that differ, the hard limit first so that they stay ordered while
    /// they rise.
    pub fn write(&self, wanted: Thresholds) -> Result<()> {
        let current = self.thresholds()?.as_array();
        for index in (0..3).rev() {
            let value = wanted.as_array()[index];
            if value != current[index] {
                self.thresholds[index]
                    .write_at(format!("{value}\n").as_bytes(), 0)
                    .with_context(|| format!("writing gc_thresh{} = {value}", index + 1))?;
            }
        }
        Ok(())
    }
}

fn open_in_netns(netns: &Path) -> Result<KernelNeighbourTable> {
    let netns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    crate::netns::run_in_file(&netns, || {
        if !Path::new(THRESHOLD_DIR).exists() {
            bail!("not the initial namespace (no {THRESHOLD_DIR})");
        }
        KernelNeighbourTable::open_here()
    })
}

/// A proc or sysctl file from its start (pread: no shared file position to race on).
fn read_whole(file: &File) -> Result<String> {
    let mut text = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = file.read_at(&mut buffer, text.len() as u64)?;
        if read == 0 {
            break;
        }
        text.extend_from_slice(&buffer[..read]);
    }
    String::from_utf8(text).context("not UTF-8")
}

/// Where every agent on this kernel records its demand. Not per agent: the table is shared
/// by every agent on the machine (all of a lab's, and a host's own).
pub const DEFAULT_LEDGER_DIR: &str = "/run/shoal/neighbour-demand";

/// The agents' demands, one file each, named by process ID and locked (flock) by its agent
/// for as long as it lives: a file nobody holds is a dead agent's, and is removed. So the
/// sum always counts each live agent once, however often they restart.
pub struct DemandLedger {
    dir: PathBuf,
    own: Flock<File>,
    own_name: String,
}

/// Width of a recorded number: written whole at offset 0, so a reader never sees a mix.
const RECORD_WIDTH: usize = 10;

impl DemandLedger {
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let own_name = std::process::id().to_string();
        // Made and locked under a hidden name, then renamed: no reader ever sees it unlocked.
        let hidden = dir.join(format!(".{own_name}.new"));
        let file =
            File::create(&hidden).with_context(|| format!("creating {}", hidden.display()))?;
        let own = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("locking {}", hidden.display()))?;
        fs::rename(&hidden, dir.join(&own_name))?;
        Ok(Self {
            dir: dir.to_owned(),
            own,
            own_name,
        })
    }

    /// Records this agent's demand, then runs `then` with the live agents' total while
    /// holding the ledger's lock, so two agents sizing at once cannot undo each other.
    pub fn record<T>(&self, entries: u32, then: impl FnOnce(u32) -> Result<T>) -> Result<T> {
        let lock_path = self.dir.join(".lock");
        let lock = File::create(&lock_path)
            .with_context(|| format!("creating {}", lock_path.display()))?;
        let _held = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .with_context(|| format!("locking {}", lock_path.display()))?;
        self.own
            .write_at(format!("{entries:0RECORD_WIDTH$}").as_bytes(), 0)
            .context("recording this agent's neighbour demand")?;
        let total = self.others()?.saturating_add(entries);
        then(total)
    }

    /// The live other agents' demands, removing the records of dead ones.
    fn others(&self) -> Result<u32> {
        let mut total = 0u32;
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || name == self.own_name {
                continue;
            }
            let file = match File::open(entry.path()) {
                Ok(file) => file,
                Err(err) if err.kind() == ErrorKind::NotFound => continue,
                Err(err) => return Err(err).context("reading the neighbour demand ledger"),
            };
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(_orphan) => {
                    let _ = fs::remove_file(entry.path());
                }
                Err((file, nix::errno::Errno::EWOULDBLOCK)) => {
                    let text = read_whole(&file)?;
                    total = total.saturating_add(text.trim().parse().unwrap_or(0));
                }
                Err((_, errno)) => return Err(errno).context("locking a ledger record"),
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULTS: Thresholds = Thresholds {
        gc_thresh1: 128,
        gc_thresh2: 512,
        gc_thresh3: 1024,
    };

    #[test]
    fn a_small_demand_keeps_the_kernel_defaults() {
        assert_eq!(sized_for(0, DEFAULTS), DEFAULTS);
        assert_eq!(sized_for(300, DEFAULTS), DEFAULTS);
        assert_eq!(sized_for(512, DEFAULTS), DEFAULTS);
    }

    #[test]
    fn a_large_demand_raises_all_three_in_the_kernel_ratios() {
        assert_eq!(
            sized_for(12_000, DEFAULTS),
            Thresholds {
                gc_thresh1: 3072,
                gc_thresh2: 12_288,
                gc_thresh3: 24_576,
            }
        );
    }

    #[test]
    fn an_operators_higher_values_are_never_lowered() {
        let operator = Thresholds {
            gc_thresh1: 8192,
            gc_thresh2: 1024,
            gc_thresh3: 65_536,
        };
        assert_eq!(
            sized_for(2000, operator),
            Thresholds {
                gc_thresh1: 8192,
                gc_thresh2: 2048,
                gc_thresh3: 65_536,
            }
        );
    }

    #[test]
    fn sizes_move_in_steps_and_never_overflow() {
        assert_eq!(sized_for(513, DEFAULTS), sized_for(1024, DEFAULTS));
        assert_eq!(sized_for(u32::MAX, DEFAULTS).gc_thresh3, u32::MAX);
    }

    #[test]
    fn demand_counts_underlay_gateways_task_peers_and_the_mesh() {
        // A 32-node cluster: this node runs 3 tasks of a 96-replica service on `front`,
        // published through ingress (96 tasks + 32 nodes).
        let node = NeighbourDemand {
            cluster_nodes: 32,
            local_tasks: 3,
            networks: vec![
                NetworkDemand {
                    endpoints: 96,
                    local_tasks: 3,
                    ingress: false,
                },
                NetworkDemand {
                    endpoints: 128,
                    local_tasks: 3,
                    ingress: true,
                },
            ],
        };
        let underlay = 16 + 31;
        let gateway = 2 * 3;
        let front = 3 * 64;
        let ingress = 127 + 2 * 3;
        assert_eq!(node.entries(), underlay + gateway + front + ingress);
    }

    #[test]
    fn a_node_outside_a_swarm_needs_little() {
        assert_eq!(NeighbourDemand::default().entries(), UNDERLAY_SLACK);
    }

    #[test]
    fn arp_cache_counters_are_summed_over_cpus() {
        let text = "entries  allocs   destroys hash_grows lookups  hits     res_failed rcv_probes_mcast rcv_probes_ucast periodic_gc_runs forced_gc_runs unresolved_discards table_fulls\n\
                    00001f17 00000001 00000000 00000000   00000004 00000000 00000000   00000000         00000000         00000000         00000000       00000000            00000a00\n\
                    00001f17 00000001 00000000 00000000   00000005 00000005 00000000   00000000         00000000         00000018         00000000       00000000            0000000b\n";
        assert_eq!(
            parse_arp_cache(text).unwrap(),
            ArpCacheStats {
                entries: 0x1f17,
                table_fulls: 0xa0b,
            }
        );
        assert!(parse_arp_cache("entries\nzz\n").is_err());
    }

    #[test]
    fn the_ledger_sums_live_agents_and_forgets_dead_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ours = DemandLedger::open(dir.path()).unwrap();
        // Another live agent: a record someone holds locked.
        let live = File::create(dir.path().join("1")).unwrap();
        live.write_at(b"0000000300", 0).unwrap();
        let _live = Flock::lock(live, FlockArg::LockExclusiveNonblock).unwrap();
        // A dead agent's record: nobody holds it.
        fs::write(dir.path().join("2"), "0000005000").unwrap();
        let total = ours.record(200, Ok).unwrap();
        assert_eq!(total, 500);
        assert!(
            !dir.path().join("2").exists(),
            "the dead agent's record is removed"
        );
        assert_eq!(
            ours.record(100, Ok).unwrap(),
            400,
            "a new record replaces ours"
        );
    }
}
