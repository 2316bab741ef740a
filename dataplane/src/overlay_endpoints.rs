//! The endpoints on other nodes whose ARP the VIP echo program answers
//! (`OVERLAY_ENDPOINTS`, IPv4 -> VNI), in place of a permanent neighbour entry per remote
//! endpoint and network in the kernel's one neighbour table. The overlay writes it from its
//! peer database; the map is pinned, so a restarting agent's tasks keep resolving their peers.

use std::{net::Ipv4Addr, path::Path};

use anyhow::{Context as _, Result};
use aya::{
    maps::{HashMap, Map, MapData, MapError},
    sys::SyscallError,
};
use shoal_common::names;

pub struct OverlayEndpoints {
    map: HashMap<MapData, u32, u32>,
}

impl OverlayEndpoints {
    pub fn open(maps_dir: &Path) -> Result<Self> {
        let pin = maps_dir.join(names::OVERLAY_ENDPOINTS);
        let data = MapData::from_pin(&pin)
            .with_context(|| format!("opening pinned map {}", pin.display()))?;
        Ok(Self {
            map: HashMap::try_from(Map::from_map_data(data)?)?,
        })
    }

    /// Answers ARP for `ip`, an endpoint of network `vni` on another node.
    pub fn set(&mut self, ip: Ipv4Addr, vni: u32) -> Result<()> {
        self.map
            .insert(key(ip), vni, 0)
            .with_context(|| format!("answering ARP for {ip} (VNI {vni})"))
    }

    /// Stops answering for `ip`.
    pub fn remove(&mut self, ip: Ipv4Addr) -> Result<()> {
        match self.map.remove(&key(ip)) {
            Ok(()) => Ok(()),
            // Gone already: what we want.
            Err(MapError::SyscallError(SyscallError { io_error, .. }))
                if io_error.kind() == std::io::ErrorKind::NotFound =>
            {
                Ok(())
            }
            Err(err) => Err(err).with_context(|| format!("no longer answering ARP for {ip}")),
        }
    }

    /// The addresses answered for on network `vni`, in order.
    pub fn of_network(&self, vni: u32) -> Result<Vec<Ipv4Addr>> {
        let mut ips: Vec<Ipv4Addr> = self
            .entries()?
            .into_iter()
            .filter(|(_, of)| *of == vni)
            .map(|(ip, _)| ip)
            .collect();
        ips.sort();
        Ok(ips)
    }

    /// Removes the entries `keep(ip, vni)` refuses; returns how many.
    pub fn retain(&mut self, keep: impl Fn(Ipv4Addr, u32) -> bool) -> Result<usize> {
        let gone: Vec<Ipv4Addr> = self
            .entries()?
            .into_iter()
            .filter(|(ip, vni)| !keep(*ip, *vni))
            .map(|(ip, _)| ip)
            .collect();
        for ip in &gone {
            self.remove(*ip)?;
        }
        Ok(gone.len())
    }

    fn entries(&self) -> Result<Vec<(Ipv4Addr, u32)>> {
        self.map
            .iter()
            .map(|entry| {
                let (ip, vni) = entry.context("reading the overlay endpoints map")?;
                Ok((Ipv4Addr::from(ip.to_ne_bytes()), vni))
            })
            .collect()
    }
}

/// The map's key: the address as the program reads it from the packet.
fn key(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}
