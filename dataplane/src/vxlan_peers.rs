//! The nodes each overlay network accepts VXLAN from (`VXLAN_PEERS`, read by the ingress
//! classifier): a datagram to the data-path port passes only when its source is the VTEP of
//! a node gossip lists on the datagram's VNI. The agent keeps the map equal to its peers
//! per network; the map is pinned, so a restarting agent's node keeps accepting its peers
//! until the new agent has caught up.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::Path,
};

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, Map, MapData, MapError},
    sys::SyscallError,
};
use shoal_common::{names, VxlanPeer};

pub struct VxlanPeers {
    map: HashMap<MapData, VxlanPeer, u32>,
    /// What the map holds, by VNI.
    programmed: BTreeMap<u32, BTreeSet<Ipv4Addr>>,
}

impl VxlanPeers {
    /// Opens the pinned map and reads what a previous agent left in it.
    pub fn open(maps_dir: &Path) -> Result<Self> {
        let pin = maps_dir.join(names::VXLAN_PEERS);
        let data = MapData::from_pin(&pin)
            .with_context(|| format!("opening pinned map {}", pin.display()))?;
        let map: HashMap<MapData, VxlanPeer, u32> = HashMap::try_from(Map::from_map_data(data)?)?;
        let mut programmed: BTreeMap<u32, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for key in map.keys() {
            let key = key?;
            programmed
                .entry(key.vni)
                .or_default()
                .insert(Ipv4Addr::from(key.vtep.to_ne_bytes()));
        }
        Ok(Self { map, programmed })
    }

    /// Makes `vteps` the nodes VNI `vni` accepts. With `only_add`, nodes no longer listed
    /// stay (an agent that just started has not heard from every peer yet). Returns what
    /// changed as (added, removed).
    pub fn sync(
        &mut self,
        vni: u32,
        vteps: &BTreeSet<Ipv4Addr>,
        only_add: bool,
    ) -> Result<(usize, usize)> {
        let current = self.programmed.entry(vni).or_default();
        let mut added = 0;
        for vtep in vteps.difference(&current.clone()) {
            self.map
                .insert(key(vni, *vtep), 1, 0)
                .with_context(|| format!("accepting VXLAN from {vtep} on VNI {vni}"))?;
            current.insert(*vtep);
            added += 1;
        }
        let mut removed = 0;
        if !only_add {
            for vtep in current.difference(vteps).copied().collect::<Vec<_>>() {
                match self.map.remove(&key(vni, vtep)) {
                    Ok(()) => {}
                    // Gone already: what we want.
                    Err(MapError::SyscallError(SyscallError { io_error, .. }))
                        if io_error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(err) => {
                        return Err(err)
                            .with_context(|| format!("refusing VXLAN from {vtep} on VNI {vni}"))
                    }
                }
                current.remove(&vtep);
                removed += 1;
            }
        }
        if current.is_empty() {
            self.programmed.remove(&vni);
        }
        Ok((added, removed))
    }

    /// The nodes each VNI accepts now.
    pub fn programmed(&self) -> &BTreeMap<u32, BTreeSet<Ipv4Addr>> {
        &self.programmed
    }
}

fn key(vni: u32, vtep: Ipv4Addr) -> VxlanPeer {
    VxlanPeer {
        vni,
        vtep: u32::from_ne_bytes(vtep.octets()),
    }
}
