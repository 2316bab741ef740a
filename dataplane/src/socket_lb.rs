//! User side of the socket load balancer (`ebpf/src/programs/socket_lb.rs`): attaching its programs
//! to the tasks' cgroup, and the VIP -> backends table they read.
//!
//! The programs are attached through pinned links (`links/lb-*`), so they keep balancing
//! while the agent is down; a new agent attaches its programs next to the old ones, then
//! unpins the old links (a connect sees either program, never none).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{links::FdLink, CgroupAttachMode, CgroupSockAddr},
    Ebpf,
};
use serde::{Deserialize, Serialize};
use shoal_common::{names, BackendSlot, VipService, LB_MAX_BACKEND_SLOTS};

/// The three programs and the name of each one's pinned link.
const PROGRAMS: [(&str, &str); 3] = [
    (names::LB_CONNECT4, "lb-connect4"),
    (names::LB_SENDMSG4, "lb-sendmsg4"),
    (names::LB_RECVMSG4, "lb-recvmsg4"),
];

/// The routing mesh's connect program for the node's own processes, on the node's root
/// cgroup.
const NODE_PROGRAM: (&str, &str) = (names::MESH_NODE_CONNECT4, "mesh-node-connect4");

pub fn link_pins(links_dir: &Path) -> Vec<PathBuf> {
    PROGRAMS
        .iter()
        .chain([&NODE_PROGRAM])
        .map(|(_, pin)| links_dir.join(pin))
        .collect()
}

/// Loads the socket programs and attaches them: the VIP ones to `task_cgroup` (every
/// task's parent), the mesh's to `node_cgroup`.
pub fn attach(
    ebpf: &mut Ebpf,
    task_cgroup: &Path,
    node_cgroup: &Path,
    links_dir: &Path,
) -> Result<()> {
    let cgroups = [task_cgroup, node_cgroup];
    for (cgroup, programs) in cgroups
        .iter()
        .zip([&PROGRAMS[..], std::slice::from_ref(&NODE_PROGRAM)])
    {
        attach_to(ebpf, cgroup, programs, links_dir)?;
    }
    Ok(())
}

fn attach_to(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    programs: &[(&str, &str)],
    links_dir: &Path,
) -> Result<()> {
    let cgroup_dir =
        File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
    for &(name, pin) in programs {
        let program: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .with_context(|| format!("program {name} missing from the eBPF object"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("loading {name} into the kernel (verifier)"))?;
        // Through a bpf_link (kernel 5.7+) programs always stack, and the kernel wants no
        // attach flags: `Single` here means "no flags", not "alone".
        let id = program
            .attach(&cgroup_dir, CgroupAttachMode::Single)
            .with_context(|| format!("attaching {name} to {}", cgroup.display()))?;
        let link: FdLink = program.take_link(id)?.try_into()?;
        repin(link, &links_dir.join(pin))?;
    }
    Ok(())
}

/// Pins a cgroup program's link at `pin`, in place of the previous agent's: dropping that
/// one's pin detaches its program, now that ours runs next to it.
fn repin(link: FdLink, pin: &Path) -> Result<()> {
    match fs::remove_file(pin) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", pin.display())),
    }
    link.pin(pin)
        .with_context(|| format!("pinning {}", pin.display()))?;
    Ok(())
}

/// One VIP as the kernel sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipEntry {
    pub vip: Ipv4Addr,
    pub id: u32,
    pub generation: u32,
    pub backends: Vec<Ipv4Addr>,
}

/// The pinned VIP and backend maps of one agent, opened by path so any part of the agent
/// can program them.
pub struct VipTable {
    services: HashMap<MapData, u32, VipService>,
    backends: HashMap<MapData, BackendSlot, u32>,
}

impl VipTable {
    pub fn open(maps_dir: &Path) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = maps_dir.join(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("opening pinned map {}", path.display()))?;
            Ok(Map::from_map_data(data)?)
        };
        Ok(Self {
            services: HashMap::try_from(open(names::LB_SERVICES)?)?,
            backends: HashMap::try_from(open(names::LB_BACKENDS)?)?,
        })
    }

    /// Points `vip` at `backends` (an empty list refuses connections to it). The new list is
    /// written as a new generation before the VIP entry switches to it, then the old
    /// generation's slots are removed.
    pub fn set(&mut self, vip: Ipv4Addr, backends: &[Ipv4Addr]) -> Result<()> {
        let key = to_key(vip);
        let current = self.services.get(&key, 0).ok();
        let id = match current {
            Some(entry) => entry.id,
            None => self.free_id()?,
        };
        let generation = current.map_or(0, |entry| entry.generation.wrapping_add(1));
        let entry = VipService {
            id,
            count: backends.len() as u32,
            generation,
            _pad: 0,
        };
        // A full map refuses the insert; the partial new generation is then removed, and the
        // VIP keeps its previous one.
        let written = backends.iter().enumerate().try_for_each(|(slot, backend)| {
            let slot = BackendSlot {
                service: id,
                generation,
                slot: slot as u32,
            };
            self.backends.insert(slot, to_key(*backend), 0)
        });
        if let Err(err) = written.and_then(|()| self.services.insert(key, entry, 0)) {
            self.remove_slots(&entry);
            return Err(err).with_context(|| {
                format!(
                    "programming VIP {vip} (the maps hold {LB_MAX_BACKEND_SLOTS} backend slots)"
                )
            });
        }
        if let Some(old) = current {
            self.remove_slots(&old);
        }
        Ok(())
    }

    pub fn remove(&mut self, vip: Ipv4Addr) -> Result<()> {
        let key = to_key(vip);
        if let Ok(old) = self.services.get(&key, 0) {
            self.services.remove(&key)?;
            self.remove_slots(&old);
        }
        Ok(())
    }

    /// Every VIP with its backends, read from the kernel.
    pub fn list(&self) -> Result<Vec<VipEntry>> {
        let mut slots: BTreeMap<(u32, u32), BTreeMap<u32, Ipv4Addr>> = BTreeMap::new();
        for item in self.backends.iter() {
            let (slot, backend) = item?;
            slots
                .entry((slot.service, slot.generation))
                .or_default()
                .insert(slot.slot, from_key(backend));
        }
        let mut entries = Vec::new();
        for item in self.services.keys() {
            let key = item?;
            let Ok(entry) = self.services.get(&key, 0) else {
                continue;
            };
            let backends = slots
                .get(&(entry.id, entry.generation))
                .map(|s| s.values().copied().take(entry.count as usize).collect())
                .unwrap_or_default();
            entries.push(VipEntry {
                vip: from_key(key),
                id: entry.id,
                generation: entry.generation,
                backends,
            });
        }
        entries.sort_by_key(|e| e.vip);
        Ok(entries)
    }

    fn remove_slots(&mut self, entry: &VipService) {
        for slot in 0..entry.count {
            let _ = self.backends.remove(&BackendSlot {
                service: entry.id,
                generation: entry.generation,
                slot,
            });
        }
    }

    fn free_id(&self) -> Result<u32> {
        let used: BTreeSet<u32> = self
            .services
            .iter()
            .filter_map(|item| item.ok().map(|(_, entry)| entry.id))
            .collect();
        (0..u32::MAX)
            .find(|id| !used.contains(id))
            .context("no VIP id left")
    }
}

/// Addresses as the kernel's `user_ip4` holds them: network byte order in memory.
fn to_key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}
