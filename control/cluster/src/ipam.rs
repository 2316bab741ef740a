//! Address management for overlay networks: subnets carved from the swarm's default pool,
//! and addresses within a subnet. Pure functions over the replicated state's allocations, so
//! every manager computes the same answer. Also what a node's kernel already addresses or
//! routes (`host_claims`), which overlay subnets must stay clear of.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use anyhow::{bail, Context as _, Result};
use shoal_dataplane::{
    netlink::{Netlink, MAIN_TABLE},
    overlay::INGRESS_ENDPOINT,
};

pub use shoal_api::Subnet;

use crate::state::Timestamp;

/// The first `prefix`-sized subnet of `pool` that overlaps none of `used`.
pub fn allocate_subnet(pool: Subnet, prefix: u8, used: &[Subnet]) -> Result<Subnet> {
    if prefix < pool.prefix || prefix > 30 {
        bail!(
            "subnets of /{prefix} cannot be carved from the pool {pool} (need /{}../30)",
            pool.prefix
        );
    }
    let step = 1u64 << (32 - u32::from(prefix));
    let mut start = u64::from(pool.start());
    while start + step - 1 <= u64::from(pool.end()) {
        let candidate = Subnet::new(Ipv4Addr::from(start as u32), prefix)?;
        match used
            .iter()
            .filter(|u| u.overlaps(candidate))
            .map(|u| u64::from(u.end()))
            .max()
        {
            None => return Ok(candidate),
            // Skip past the overlapping allocation, aligned to the step.
            Some(end) => start = (end + 1).div_ceil(step) * step,
        }
    }
    bail!("the address pool {pool} has no free /{prefix} left: give --subnet or a larger pool")
}

/// The addresses of one network as the orchestrator gives them out in a pass: never the
/// gateway or one in use; of the rest, the lowest no task held lately, else the one freed
/// the longest ago. An address given again at once reaches the new task from whatever
/// still points at the old one (a client's DNS cache, a node a step behind, an interface
/// left over): Swarm allocates serially for the same reason. Each address costs O(log n),
/// however many are taken or freed (a scale to thousands makes one pass).
pub struct AddressBook {
    subnet: Subnet,
    gateway: Ipv4Addr,
    used: BTreeSet<Ipv4Addr>,
    /// Address -> when the last task that held it ended.
    freed: BTreeMap<Ipv4Addr, Timestamp>,
    freed_by_age: BTreeSet<(Timestamp, Ipv4Addr)>,
    /// Below it, every address never held is taken.
    scan_from: u32,
}

impl AddressBook {
    pub fn new(
        subnet: Subnet,
        gateway: Ipv4Addr,
        used: BTreeSet<Ipv4Addr>,
        freed: BTreeMap<Ipv4Addr, Timestamp>,
    ) -> Self {
        let freed_by_age = freed.iter().map(|(a, at)| (*at, *a)).collect();
        Self {
            subnet,
            gateway,
            used,
            freed,
            freed_by_age,
            scan_from: subnet.start() + 1,
        }
    }

    /// The next address, taken.
    pub fn take(&mut self) -> Result<Ipv4Addr> {
        let never_held = (self.scan_from..self.subnet.end())
            .map(Ipv4Addr::from)
            .find(|a| *a != self.gateway && !self.used.contains(a) && !self.freed.contains_key(a));
        let address = match never_held {
            Some(address) => {
                self.scan_from = u32::from(address) + 1;
                Some(address)
            }
            None => {
                self.scan_from = self.subnet.end();
                std::iter::from_fn(|| self.freed_by_age.pop_first())
                    .map(|(_, a)| a)
                    .find(|a| *a != self.gateway && !self.used.contains(a))
            }
        };
        let address =
            address.with_context(|| format!("no free address left in {}", self.subnet))?;
        self.used.insert(address);
        Ok(address)
    }
}

/// A subnet the node's kernel already uses. An overlay subnet overlapping it would cut the
/// overlay's tasks off from those addresses (their own route to the subnet wins).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostClaim {
    pub subnet: Subnet,
    /// An interface's own network or a link route, not a destination through a gateway.
    pub connected: bool,
    /// Where the kernel has it, for errors: `address 192.168.77.11/24 on eth0`.
    pub source: String,
}

impl fmt::Display for HostClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.subnet, self.source)
    }
}

/// The IPv4 addresses and routes of the agent's network namespace, which is the node's.
/// Default routes never count; nor does shoal's own endpoint on the ingress network, which
/// sits in the ingress subnet by design.
pub fn host_claims() -> Result<Vec<HostClaim>> {
    let mut netlink = Netlink::open()?;
    let links = netlink.links()?;
    let name = |index: Option<u32>| -> String {
        links
            .iter()
            .find(|link| Some(link.index) == index)
            .map(|link| link.name.clone())
            .unwrap_or_default()
    };
    let addresses: Vec<HostAddress> = netlink
        .addresses()?
        .into_iter()
        .map(|a| (name(Some(a.index)), a.ip, a.prefix))
        .collect();
    let routes: Vec<HostRoute> = netlink
        .routes(MAIN_TABLE)?
        .into_iter()
        .map(|r| (name(r.oif), r.destination, r.prefix, r.gateway))
        .collect();
    let mut claims = address_claims(&addresses);
    claims.extend(route_claims(&routes));
    Ok(claims)
}

/// An address of the host: (device, address, prefix length).
type HostAddress = (String, Ipv4Addr, u8);
/// A unicast route of the host's main table: (device, destination, prefix length, gateway).
type HostRoute = (String, Ipv4Addr, u8, Option<Ipv4Addr>);

/// The first of `claims` that `subnet` overlaps.
pub fn first_overlap(subnet: Subnet, claims: &[HostClaim]) -> Option<&HostClaim> {
    claims.iter().find(|claim| claim.subnet.overlaps(subnet))
}

/// Each address's network.
fn address_claims(addresses: &[HostAddress]) -> Vec<HostClaim> {
    addresses
        .iter()
        .filter(|(device, _, _)| device != INGRESS_ENDPOINT)
        .filter_map(|(device, address, prefix)| {
            Some(HostClaim {
                subnet: Subnet::new(*address, *prefix).ok()?,
                connected: true,
                source: format!("address {address}/{prefix} on {device}"),
            })
        })
        .collect()
}

/// Each unicast route but the default (blackhole, unreachable and the like reach nothing, and
/// are not listed).
fn route_claims(routes: &[HostRoute]) -> Vec<HostClaim> {
    routes
        .iter()
        .filter(|(device, _, prefix, _)| device != INGRESS_ENDPOINT && *prefix != 0)
        .filter_map(|(device, destination, prefix, gateway)| {
            Some(HostClaim {
                subnet: Subnet::new(*destination, *prefix).ok()?,
                connected: gateway.is_none(),
                source: match gateway {
                    Some(gateway) => format!("route via {gateway} dev {device}"),
                    None => format!("route on {device}"),
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> Subnet {
        text.parse().unwrap()
    }

    #[test]
    fn parses_and_normalises() {
        assert_eq!(net("10.0.1.7/24").to_string(), "10.0.1.0/24");
        assert_eq!(
            net("0.0.0.0/0").hosts().next(),
            Some(Ipv4Addr::new(0, 0, 0, 1))
        );
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/24",
            "fd00::/64",
            "10.0.0.0/x",
        ] {
            assert!(bad.parse::<Subnet>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&net("10.0.1.0/24")).unwrap();
        assert_eq!(json, "\"10.0.1.0/24\"");
        assert!(serde_json::from_str::<Subnet>("\"nope\"").is_err());
    }

    #[test]
    fn subnets_fill_the_pool_in_order_around_existing_ones() {
        let pool = net("10.0.0.0/8");
        let first = allocate_subnet(pool, 24, &[net("10.0.0.0/24")]).unwrap();
        assert_eq!(first, net("10.0.1.0/24"));
        // A user-chosen /16 in the way is skipped as a whole.
        let used = [
            net("10.0.0.0/24"),
            net("10.0.1.0/24"),
            net("10.0.2.0/23"),
            net("10.0.4.0/22"),
            net("10.0.8.0/21"),
            net("10.0.16.0/20"),
            net("10.0.32.0/19"),
            net("10.0.64.0/18"),
            net("10.0.128.0/17"),
        ];
        assert_eq!(
            allocate_subnet(pool, 24, &used).unwrap(),
            net("10.1.0.0/24")
        );
        let tiny = net("192.168.0.0/30");
        assert_eq!(allocate_subnet(tiny, 30, &[]).unwrap(), tiny);
        assert!(allocate_subnet(tiny, 30, &[tiny]).is_err(), "exhausted");
        assert!(
            allocate_subnet(tiny, 24, &[]).is_err(),
            "larger than the pool"
        );
    }

    #[test]
    fn host_claims_are_addresses_and_routes_but_not_defaults_or_the_ingress_endpoint() {
        let ip = |text: &str| text.parse::<Ipv4Addr>().unwrap();
        let links: Vec<HostAddress> = vec![
            ("lo".into(), ip("127.0.0.1"), 8),
            ("eth0".into(), ip("192.168.77.11"), 24),
            ("shoal_ing".into(), ip("10.0.0.3"), 24),
        ];
        let routes: Vec<HostRoute> = vec![
            ("eth0".into(), ip("0.0.0.0"), 0, Some(ip("192.168.77.1"))),
            ("eth0".into(), ip("10.97.0.5"), 32, None),
            (
                "eth0".into(),
                ip("10.99.0.0"),
                16,
                Some(ip("192.168.77.100")),
            ),
            ("shoal_ing".into(), ip("10.0.0.0"), 24, None),
            ("eth0".into(), ip("192.168.77.0"), 24, None),
        ];
        let shown: Vec<(String, bool)> = address_claims(&links)
            .into_iter()
            .chain(route_claims(&routes))
            .map(|c| (c.to_string(), c.connected))
            .collect();
        let expected = [
            ("127.0.0.0/8 (address 127.0.0.1/8 on lo)", true),
            ("192.168.77.0/24 (address 192.168.77.11/24 on eth0)", true),
            ("10.97.0.5/32 (route on eth0)", true),
            ("10.99.0.0/16 (route via 192.168.77.100 dev eth0)", false),
            ("192.168.77.0/24 (route on eth0)", true),
        ];
        assert_eq!(
            shown,
            expected.map(|(text, connected)| (text.to_owned(), connected))
        );
        let claims = route_claims(&routes);
        assert_eq!(
            first_overlap(net("10.99.4.0/24"), &claims).map(|c| c.subnet),
            Some(net("10.99.0.0/16"))
        );
        assert_eq!(first_overlap(net("10.0.0.0/24"), &claims), None);
        // The pool's subnets are carved around what the host uses.
        let used: Vec<Subnet> = claims.iter().map(|c| c.subnet).collect();
        assert_eq!(
            allocate_subnet(net("10.98.0.0/15"), 24, &used).unwrap(),
            net("10.98.0.0/24"),
            "a blackhole route reaches nothing"
        );
        assert_eq!(
            allocate_subnet(net("10.99.0.0/16"), 24, &used)
                .unwrap_err()
                .to_string(),
            "the address pool 10.99.0.0/16 has no free /24 left: give --subnet or a larger pool"
        );
    }

    #[test]
    fn addresses_skip_network_gateway_broadcast_and_used() {
        let subnet = net("10.0.1.0/29");
        let gateway = subnet.first_host();
        assert_eq!(gateway, Ipv4Addr::new(10, 0, 1, 1));
        let used = [Ipv4Addr::new(10, 0, 1, 3)].into();
        let mut book = AddressBook::new(subnet, gateway, used, BTreeMap::new());
        let mut got = Vec::new();
        while let Ok(addr) = book.take() {
            got.push(addr.to_string());
        }
        assert_eq!(got, ["10.0.1.2", "10.0.1.4", "10.0.1.5", "10.0.1.6"]);
        assert!(subnet.contains(Ipv4Addr::new(10, 0, 1, 7)));
        assert!(!subnet.contains(Ipv4Addr::new(10, 0, 1, 8)));
    }

    #[test]
    fn freed_addresses_are_given_last_the_longest_freed_first() {
        let subnet = net("10.0.1.0/29");
        let gateway = subnet.first_host();
        let used: BTreeSet<Ipv4Addr> = [Ipv4Addr::new(10, 0, 1, 2)].into();
        let freed: BTreeMap<Ipv4Addr, Timestamp> = [
            (Ipv4Addr::new(10, 0, 1, 3), 50),
            (Ipv4Addr::new(10, 0, 1, 4), 40),
            (Ipv4Addr::new(10, 0, 1, 6), 45),
            // Held by a live task again: in use, whatever its history.
            (Ipv4Addr::new(10, 0, 1, 2), 10),
        ]
        .into();
        let mut book = AddressBook::new(subnet, gateway, used, freed);
        let mut got = Vec::new();
        while let Ok(addr) = book.take() {
            got.push(addr.to_string());
        }
        assert_eq!(got, ["10.0.1.5", "10.0.1.4", "10.0.1.6", "10.0.1.3"]);
    }
}
