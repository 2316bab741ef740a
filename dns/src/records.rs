//! The cluster's names as one immutable snapshot, rebuilt from the endpoint tables and swapped
//! atomically: a lookup never waits for gossip, and gossip never waits for a lookup.
//!
//! The crate keeps its own record type ([`TaskEndpoint`]) instead of gossip's `EndpointRecord`:
//! DNS needs five fields of it plus the network name (which the endpoint tables keep as their
//! key, not in the record), and the agent converts at one place.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rand::seq::SliceRandom;

/// One running task's attachment to one network, as DNS sees it. The agent passes running tasks
/// only: every endpoint here is answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskEndpoint {
    pub network: String,
    /// Full task name, `web.1.<task id>`.
    pub task_name: String,
    pub service_name: String,
    pub ip: Ipv4Addr,
    /// The service's virtual IP on this network; `None` in dnsrr mode.
    pub vip: Option<Ipv4Addr>,
    /// Whether the task takes new flows (healthy, or unchecked): only those are answered for
    /// `tasks.SERVICE` and a dnsrr `SERVICE`. Its own name and the VIP resolve either way.
    pub serving: bool,
}

impl TaskEndpoint {
    /// A task endpoint from plain parts (tests and tools).
    pub fn new(
        network: &str,
        task: &str,
        service: &str,
        ip: [u8; 4],
        vip: Option<[u8; 4]>,
    ) -> Self {
        Self {
            network: network.into(),
            task_name: task.into(),
            service_name: service.into(),
            ip: ip.into(),
            vip: vip.map(Into::into),
            serving: true,
        }
    }
}

/// What the cluster says about a name, for the networks of the asking task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolution {
    /// A records, in random order.
    Addresses(Vec<Ipv4Addr>),
    /// A PTR answer: the fully qualified task or service name (with its trailing dot).
    Pointer(String),
    /// The name is the cluster's but has no record of the asked type (AAAA, MX, …).
    NoData,
    /// The name is in the cluster's namespace (a bare name, or `NAME.NETWORK`) but unknown.
    NxDomain,
    /// Not a cluster name: forward it upstream.
    NotOurs,
}

/// The query types the resolution distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueryKind {
    A,
    Ptr,
    Other,
}

/// The names of one network: lower-cased name → addresses, address → name.
#[derive(Debug, Default)]
struct NetworkNames {
    addresses: HashMap<String, Vec<Ipv4Addr>>,
    pointers: HashMap<Ipv4Addr, String>,
}

/// An immutable snapshot of every network's names.
#[derive(Debug, Default)]
pub struct Records {
    networks: HashMap<String, NetworkNames>,
}

impl Records {
    pub fn from_endpoints<'a>(endpoints: impl IntoIterator<Item = &'a TaskEndpoint>) -> Self {
        struct Service {
            vip: Option<Ipv4Addr>,
            tasks: Vec<Ipv4Addr>,
        }
        let mut services: HashMap<(String, String), Service> = HashMap::new();
        let mut records = Records::default();
        for endpoint in endpoints {
            let network = endpoint.network.to_ascii_lowercase();
            let service_name = endpoint.service_name.to_ascii_lowercase();
            let names = records.networks.entry(network.clone()).or_default();
            push_unique(
                names
                    .addresses
                    .entry(endpoint.task_name.to_ascii_lowercase())
                    .or_default(),
                endpoint.ip,
            );
            names
                .pointers
                .insert(endpoint.ip, format!("{}.", endpoint.task_name));
            if let Some(vip) = endpoint.vip {
                names
                    .pointers
                    .insert(vip, format!("{}.", endpoint.service_name));
            }
            let service = services.entry((network, service_name)).or_insert(Service {
                vip: None,
                tasks: Vec::new(),
            });
            service.vip = service.vip.or(endpoint.vip);
            if endpoint.serving {
                push_unique(&mut service.tasks, endpoint.ip);
            }
        }
        for ((network, service_name), service) in services {
            let names = records.networks.entry(network).or_default();
            // A service none of whose tasks serves is known by its VIP only, if it has one.
            if service.tasks.is_empty() {
                if let Some(vip) = service.vip {
                    names.addresses.insert(service_name, vec![vip]);
                }
                continue;
            }
            let service_addresses = match service.vip {
                Some(vip) => vec![vip],
                None => service.tasks.clone(),
            };
            names
                .addresses
                .insert(format!("tasks.{service_name}"), service.tasks);
            names.addresses.insert(service_name, service_addresses);
        }
        records
    }

    /// Resolves `name` (any case, trailing dot or not) for a task attached to `scope`.
    pub fn resolve(&self, scope: &[String], name: &str, kind: QueryKind) -> Resolution {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if let Some(reversed) = name.strip_suffix(".in-addr.arpa") {
            return self.resolve_reverse(scope, reversed, kind);
        }
        let mut addresses = Vec::new();
        // A bare name (`web`) is the cluster's: upstreams cannot answer it, and asking them leaks it.
        let mut in_cluster_namespace = !name.is_empty() && !name.contains('.');
        for network in scope {
            let network = network.to_ascii_lowercase();
            let Some(names) = self.networks.get(&network) else {
                continue;
            };
            let qualified = name
                .strip_suffix(network.as_str())
                .and_then(|prefix| prefix.strip_suffix('.'));
            for candidate in [Some(name.as_str()), qualified].into_iter().flatten() {
                if let Some(found) = names.addresses.get(candidate) {
                    found.iter().for_each(|ip| push_unique(&mut addresses, *ip));
                }
            }
            in_cluster_namespace |= qualified.is_some();
        }
        match (addresses.is_empty(), kind) {
            (false, QueryKind::A) => {
                addresses.shuffle(&mut rand::rng());
                Resolution::Addresses(addresses)
            }
            (false, _) => Resolution::NoData,
            (true, _) if in_cluster_namespace => Resolution::NxDomain,
            (true, _) => Resolution::NotOurs,
        }
    }

    fn resolve_reverse(&self, scope: &[String], reversed: &str, kind: QueryKind) -> Resolution {
        let Some(ip) = parse_reversed_ipv4(reversed) else {
            return Resolution::NotOurs;
        };
        let found = scope.iter().find_map(|network| {
            self.networks
                .get(&network.to_ascii_lowercase())
                .and_then(|names| names.pointers.get(&ip))
        });
        match (found, kind) {
            (Some(name), QueryKind::Ptr) => Resolution::Pointer(name.clone()),
            (Some(_), _) => Resolution::NoData,
            (None, _) => Resolution::NotOurs,
        }
    }
}

/// `4.3.2.1` → 1.2.3.4; anything else (partial zones, IPv6) is not a host address.
fn parse_reversed_ipv4(reversed: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut labels = reversed.split('.');
    for octet in octets.iter_mut().rev() {
        let label = labels.next()?;
        // Reject "01": the reverse name of an address is written without leading zeros.
        if label.len() > 1 && label.starts_with('0') {
            return None;
        }
        *octet = label.parse().ok()?;
    }
    labels.next().is_none().then_some(Ipv4Addr::from(octets))
}

fn push_unique(addresses: &mut Vec<Ipv4Addr>, ip: Ipv4Addr) {
    if !addresses.contains(&ip) {
        addresses.push(ip);
    }
}

/// The current snapshot, shared by every task's server and replaced whole by the agent.
#[derive(Clone, Debug, Default)]
pub struct SharedRecords(Arc<ArcSwap<Records>>);

impl SharedRecords {
    pub fn new(records: Records) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(records)))
    }

    /// Publishes a new snapshot; lookups in flight finish on the old one.
    pub fn replace(&self, records: Records) {
        self.0.store(Arc::new(records));
    }

    pub fn load(&self) -> Arc<Records> {
        self.0.load_full()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    /// `web` (VIP) with two tasks and `cache` (dnsrr) on `front`; `db` on `back` only.
    fn sample() -> Records {
        Records::from_endpoints(&[
            TaskEndpoint::new(
                "front",
                "web.1.aaa",
                "web",
                [10, 0, 1, 3],
                Some([10, 0, 1, 2]),
            ),
            TaskEndpoint::new(
                "front",
                "web.2.bbb",
                "web",
                [10, 0, 1, 4],
                Some([10, 0, 1, 2]),
            ),
            TaskEndpoint::new("front", "cache.1.ccc", "cache", [10, 0, 1, 5], None),
            TaskEndpoint::new("front", "cache.2.ddd", "cache", [10, 0, 1, 6], None),
            TaskEndpoint::new("back", "db.1.eee", "db", [10, 0, 2, 3], Some([10, 0, 2, 2])),
        ])
    }

    fn front() -> Vec<String> {
        vec!["front".into()]
    }

    fn addresses(resolution: Resolution) -> HashSet<Ipv4Addr> {
        match resolution {
            Resolution::Addresses(ips) => ips.into_iter().collect(),
            other => panic!("expected addresses, got {other:?}"),
        }
    }

    fn ips(list: &[[u8; 4]]) -> HashSet<Ipv4Addr> {
        list.iter().map(|ip| Ipv4Addr::from(*ip)).collect()
    }

    #[test]
    fn service_with_vip_answers_the_vip_and_tasks_answers_every_task() {
        let records = sample();
        assert_eq!(
            addresses(records.resolve(&front(), "web", QueryKind::A)),
            ips(&[[10, 0, 1, 2]])
        );
        assert_eq!(
            addresses(records.resolve(&front(), "tasks.web", QueryKind::A)),
            ips(&[[10, 0, 1, 3], [10, 0, 1, 4]])
        );
    }

    #[test]
    fn tasks_that_do_not_serve_are_left_out_of_service_answers_but_keep_their_names() {
        let not_serving = |task: &str, service: &str, ip, vip| TaskEndpoint {
            serving: false,
            ..TaskEndpoint::new("front", task, service, ip, vip)
        };
        let records = Records::from_endpoints(&[
            TaskEndpoint::new(
                "front",
                "web.1.aaa",
                "web",
                [10, 0, 1, 3],
                Some([10, 0, 1, 2]),
            ),
            not_serving("web.2.bbb", "web", [10, 0, 1, 4], Some([10, 0, 1, 2])),
            not_serving("api.1.ccc", "api", [10, 0, 1, 7], Some([10, 0, 1, 8])),
            TaskEndpoint::new("front", "cache.1.ddd", "cache", [10, 0, 1, 5], None),
            not_serving("cache.2.eee", "cache", [10, 0, 1, 6], None),
        ]);
        let resolve = |name| records.resolve(&front(), name, QueryKind::A);
        assert_eq!(addresses(resolve("tasks.web")), ips(&[[10, 0, 1, 3]]));
        assert_eq!(addresses(resolve("cache")), ips(&[[10, 0, 1, 5]]));
        assert_eq!(addresses(resolve("web.2.bbb")), ips(&[[10, 0, 1, 4]]));
        // No task of api serves: its VIP still resolves (and refuses connections meanwhile).
        assert_eq!(addresses(resolve("api")), ips(&[[10, 0, 1, 8]]));
        assert!(!matches!(resolve("tasks.api"), Resolution::Addresses(_)));
    }

    #[test]
    fn dnsrr_service_answers_its_task_ips() {
        let records = sample();
        let expected = ips(&[[10, 0, 1, 5], [10, 0, 1, 6]]);
        assert_eq!(
            addresses(records.resolve(&front(), "cache", QueryKind::A)),
            expected
        );
        assert_eq!(
            addresses(records.resolve(&front(), "tasks.cache", QueryKind::A)),
            expected
        );
    }

    #[test]
    fn task_name_answers_its_ip() {
        assert_eq!(
            addresses(sample().resolve(&front(), "web.2.bbb", QueryKind::A)),
            ips(&[[10, 0, 1, 4]])
        );
    }

    #[test]
    fn other_networks_are_invisible() {
        let records = sample();
        assert_eq!(
            records.resolve(&front(), "db", QueryKind::A),
            Resolution::NxDomain
        );
        assert_eq!(
            records.resolve(&front(), "db.back", QueryKind::A),
            Resolution::NotOurs
        );
        assert_eq!(
            records.resolve(&front(), "tasks.db", QueryKind::A),
            Resolution::NotOurs
        );
        let both = vec!["front".to_string(), "back".to_string()];
        assert_eq!(
            addresses(records.resolve(&both, "db", QueryKind::A)),
            ips(&[[10, 0, 2, 2]])
        );
    }

    #[test]
    fn name_dot_network_restricts_to_that_network() {
        let records = sample();
        let both = vec!["front".to_string(), "back".to_string()];
        assert_eq!(
            addresses(records.resolve(&both, "web.front", QueryKind::A)),
            ips(&[[10, 0, 1, 2]])
        );
        assert_eq!(
            addresses(records.resolve(&both, "tasks.web.front", QueryKind::A)),
            ips(&[[10, 0, 1, 3], [10, 0, 1, 4]])
        );
        assert_eq!(
            addresses(records.resolve(&both, "web.1.aaa.front", QueryKind::A)),
            ips(&[[10, 0, 1, 3]])
        );
        // Known network, unknown name: ours to deny, never forwarded.
        assert_eq!(
            records.resolve(&both, "web.back", QueryKind::A),
            Resolution::NxDomain
        );
    }

    #[test]
    fn ptr_answers_task_and_service_names_in_scope_only() {
        let records = sample();
        assert_eq!(
            records.resolve(&front(), "3.1.0.10.in-addr.arpa", QueryKind::Ptr),
            Resolution::Pointer("web.1.aaa.".into())
        );
        assert_eq!(
            records.resolve(&front(), "2.1.0.10.IN-ADDR.ARPA.", QueryKind::Ptr),
            Resolution::Pointer("web.".into())
        );
        assert_eq!(
            records.resolve(&front(), "3.2.0.10.in-addr.arpa", QueryKind::Ptr),
            Resolution::NotOurs
        );
        assert_eq!(
            records.resolve(&front(), "1.0.10.in-addr.arpa", QueryKind::Ptr),
            Resolution::NotOurs
        );
        assert_eq!(
            records.resolve(&front(), "3.1.0.010.in-addr.arpa", QueryKind::Ptr),
            Resolution::NotOurs
        );
        assert_eq!(
            records.resolve(&front(), "3.1.0.10.in-addr.arpa", QueryKind::A),
            Resolution::NoData
        );
    }

    #[test]
    fn other_types_for_cluster_names_are_nodata() {
        let records = sample();
        for name in ["web", "tasks.web", "web.1.aaa", "cache.front"] {
            assert_eq!(
                records.resolve(&front(), name, QueryKind::Other),
                Resolution::NoData
            );
            assert_eq!(
                records.resolve(&front(), name, QueryKind::Ptr),
                Resolution::NoData
            );
        }
    }

    #[test]
    fn case_and_trailing_dot_do_not_matter() {
        let records = sample();
        for name in ["WEB", "Web.", "TASKS.web.FRONT.", "web.1.AAA."] {
            assert!(matches!(
                records.resolve(&front(), name, QueryKind::A),
                Resolution::Addresses(_)
            ));
        }
    }

    #[test]
    fn external_names_are_not_ours() {
        let records = sample();
        for name in ["example.com", "web.example.com", "tasks.com", ""] {
            assert_eq!(
                records.resolve(&front(), name, QueryKind::A),
                Resolution::NotOurs,
                "{name}"
            );
        }
    }

    #[test]
    fn answers_are_shuffled() {
        let endpoints: Vec<_> = (1..=8)
            .map(|i| TaskEndpoint::new("front", &format!("w.{i}.x"), "w", [10, 0, 0, i], None))
            .collect();
        let records = Records::from_endpoints(&endpoints);
        let firsts: HashSet<Ipv4Addr> = (0..400)
            .map(|_| match records.resolve(&front(), "w", QueryKind::A) {
                Resolution::Addresses(ips) => ips[0],
                other => panic!("{other:?}"),
            })
            .collect();
        // Each of 8 addresses comes first with p = 1/8; all 8 within 400 draws fails < 1e-20.
        assert_eq!(firsts.len(), 8);
    }

    #[test]
    fn shared_records_swap_whole_snapshots() {
        let shared = SharedRecords::default();
        assert_eq!(
            shared.load().resolve(&front(), "web", QueryKind::A),
            Resolution::NxDomain
        );
        shared.replace(sample());
        assert!(matches!(
            shared.load().resolve(&front(), "web", QueryKind::A),
            Resolution::Addresses(_)
        ));
    }
}
