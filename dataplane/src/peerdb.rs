//! Which remote endpoints one overlay network's VXLAN device knows: the single owner of the
//! static FDB (MAC -> remote VTEP) entries and of the neighbours (IP -> MAC) whose ARP the
//! node answers (in eBPF, from `OVERLAY_ENDPOINTS`). Like moby's peerdb,
//! entries are reference-counted: while an address moves between tasks (an old endpoint's
//! withdrawal arriving after the new one's announcement) several endpoints may claim one
//! IP or MAC; the first claim is programmed, and when it goes the next one takes over, so
//! removing a stale endpoint never removes the live one's entries.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
};

/// A remote endpoint as gossip announced it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Peer {
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// The data-path address of the node the endpoint lives on.
    pub vtep: IpAddr,
}

/// A change to make in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerOp {
    SetFdb { mac: [u8; 6], vtep: IpAddr },
    DelFdb { mac: [u8; 6], vtep: IpAddr },
    SetNeigh { ip: Ipv4Addr, mac: [u8; 6] },
    DelNeigh { ip: Ipv4Addr, mac: [u8; 6] },
}

/// The endpoints of one network and what is programmed for them.
#[derive(Debug, Default)]
pub struct PeerDb {
    endpoints: BTreeMap<String, Peer>,
    /// MAC -> endpoint keys claiming it, oldest (programmed) first.
    fdb: HashMap<[u8; 6], Vec<String>>,
    /// IP -> endpoint keys claiming it, oldest (programmed) first.
    neigh: HashMap<Ipv4Addr, Vec<String>>,
}

impl PeerDb {
    /// Brings the programmed set to `desired` (endpoint key -> peer); returns the kernel
    /// changes, removals before additions.
    pub fn sync(&mut self, desired: &BTreeMap<String, Peer>) -> Vec<PeerOp> {
        let mut ops = Vec::new();
        let gone: Vec<String> = self
            .endpoints
            .iter()
            .filter(|(key, peer)| desired.get(*key) != Some(peer))
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            ops.extend(self.remove(&key));
        }
        for (key, peer) in desired {
            if !self.endpoints.contains_key(key) {
                ops.extend(self.add(key, *peer));
            }
        }
        ops
    }

    pub fn peers(&self) -> impl Iterator<Item = (&str, &Peer)> {
        self.endpoints.iter().map(|(k, p)| (k.as_str(), p))
    }

    fn add(&mut self, key: &str, peer: Peer) -> Vec<PeerOp> {
        self.endpoints.insert(key.to_owned(), peer);
        let mut ops = Vec::new();
        let macs = self.fdb.entry(peer.mac).or_default();
        macs.push(key.to_owned());
        if macs.len() == 1 {
            ops.push(PeerOp::SetFdb {
                mac: peer.mac,
                vtep: peer.vtep,
            });
        }
        let ips = self.neigh.entry(peer.ip).or_default();
        ips.push(key.to_owned());
        if ips.len() == 1 {
            ops.push(PeerOp::SetNeigh {
                ip: peer.ip,
                mac: peer.mac,
            });
        }
        ops
    }

    fn remove(&mut self, key: &str) -> Vec<PeerOp> {
        let Some(peer) = self.endpoints.remove(key) else {
            return vec![];
        };
        let mut ops = Vec::new();
        if let Some(next) = release(&mut self.fdb, peer.mac, key) {
            ops.push(match next.and_then(|k| self.endpoints.get(&k)) {
                Some(heir) => PeerOp::SetFdb {
                    mac: heir.mac,
                    vtep: heir.vtep,
                },
                None => PeerOp::DelFdb {
                    mac: peer.mac,
                    vtep: peer.vtep,
                },
            });
        }
        if let Some(next) = release(&mut self.neigh, peer.ip, key) {
            ops.push(match next.and_then(|k| self.endpoints.get(&k)) {
                Some(heir) => PeerOp::SetNeigh {
                    ip: heir.ip,
                    mac: heir.mac,
                },
                None => PeerOp::DelNeigh {
                    ip: peer.ip,
                    mac: peer.mac,
                },
            });
        }
        ops
    }
}

/// Drops `key`'s claim on `item`. Returns None when the programmed entry stays as it is,
/// Some(None) when nobody claims the item any more, Some(Some(heir)) when another claim
/// becomes the programmed one.
fn release<T: std::hash::Hash + Eq + Copy>(
    claims: &mut HashMap<T, Vec<String>>,
    item: T,
    key: &str,
) -> Option<Option<String>> {
    let keys = claims.get_mut(&item)?;
    let position = keys.iter().position(|k| k == key)?;
    keys.remove(position);
    let heir = keys.first().cloned();
    if keys.is_empty() {
        claims.remove(&item);
    }
    (position == 0).then_some(heir)
}

/// The MAC an endpoint gets: derived from its IP as Docker does (02:42 + the 4 bytes), so
/// every node computes the same one without asking.
pub fn mac_for(ip: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = ip.octets();
    [0x02, 0x42, a, b, c, d]
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(ip: [u8; 4], node: u8) -> Peer {
        let ip = Ipv4Addr::from(ip);
        Peer {
            ip,
            mac: mac_for(ip),
            vtep: IpAddr::V4(Ipv4Addr::new(192, 168, 77, node)),
        }
    }

    fn desired(entries: &[(&str, Peer)]) -> BTreeMap<String, Peer> {
        entries.iter().map(|(k, p)| (k.to_string(), *p)).collect()
    }

    #[test]
    fn new_endpoints_are_programmed_and_gone_ones_removed() {
        let mut db = PeerDb::default();
        let a = peer([10, 0, 1, 2], 12);
        let ops = db.sync(&desired(&[("a", a)]));
        assert_eq!(
            ops,
            [
                PeerOp::SetFdb {
                    mac: a.mac,
                    vtep: a.vtep
                },
                PeerOp::SetNeigh {
                    ip: a.ip,
                    mac: a.mac
                }
            ]
        );
        assert!(db.sync(&desired(&[("a", a)])).is_empty(), "idempotent");
        let ops = db.sync(&desired(&[]));
        assert_eq!(
            ops,
            [
                PeerOp::DelFdb {
                    mac: a.mac,
                    vtep: a.vtep
                },
                PeerOp::DelNeigh {
                    ip: a.ip,
                    mac: a.mac
                }
            ]
        );
        assert_eq!(db.peers().count(), 0);
    }

    #[test]
    fn a_stale_claim_going_away_keeps_the_live_entries() {
        let mut db = PeerDb::default();
        // The address moved from a task on node 12 to a new task on node 13; gossip has
        // both for a moment.
        let old = peer([10, 0, 1, 2], 12);
        let new = peer([10, 0, 1, 2], 13);
        db.sync(&desired(&[("old", old)]));
        let ops = db.sync(&desired(&[("old", old), ("new", new)]));
        assert!(ops.is_empty(), "the first claim stays programmed: {ops:?}");
        let ops = db.sync(&desired(&[("new", new)]));
        assert_eq!(
            ops,
            [
                PeerOp::SetFdb {
                    mac: new.mac,
                    vtep: new.vtep
                },
                PeerOp::SetNeigh {
                    ip: new.ip,
                    mac: new.mac
                }
            ],
            "the heir takes over, nothing is deleted"
        );
    }

    #[test]
    fn removing_a_later_claim_changes_nothing() {
        let mut db = PeerDb::default();
        let first = peer([10, 0, 1, 2], 12);
        let second = peer([10, 0, 1, 2], 13);
        db.sync(&desired(&[("first", first), ("second", second)]));
        assert!(db.sync(&desired(&[("first", first)])).is_empty());
    }

    #[test]
    fn an_endpoint_that_moved_nodes_is_reprogrammed() {
        let mut db = PeerDb::default();
        let before = peer([10, 0, 1, 2], 12);
        let after = peer([10, 0, 1, 2], 13);
        db.sync(&desired(&[("t", before)]));
        let ops = db.sync(&desired(&[("t", after)]));
        assert_eq!(
            ops.last(),
            Some(&PeerOp::SetNeigh {
                ip: after.ip,
                mac: after.mac
            })
        );
        assert!(ops.contains(&PeerOp::SetFdb {
            mac: after.mac,
            vtep: after.vtep
        }));
        assert_eq!(db.peers().next(), Some(("t", &after)));
    }

    #[test]
    fn macs_follow_docker_convention() {
        assert_eq!(
            format_mac(&mac_for(Ipv4Addr::new(10, 0, 1, 2))),
            "02:42:0a:00:01:02"
        );
    }
}
