//! shoal's views (what the managers answer) in Docker's shapes. One function per object; a
//! field shoal gains is mapped here, next to its Docker name.

use std::collections::BTreeMap;

use shoal_cluster::{
    health::{HealthCheck, HealthTest},
    protocol::{NetworkView, NodeView, ServiceView, TaskView},
    state::{
        EndpointMode, PortConfig as ShoalPort, PublishMode, ServiceMode as ShoalMode, SourceMode,
    },
    update,
};
use shoal_dataplane::overlay::NetworkDataplane;

use crate::models::*;

pub const NANOS: u64 = 1_000_000_000;

/// RFC 3339 in UTC, as Docker writes times.
pub fn time(unix_secs: u64) -> String {
    chrono::DateTime::from_timestamp(unix_secs as i64, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

pub fn port(port: &ShoalPort) -> PortConfig {
    PortConfig {
        name: String::new(),
        protocol: port.protocol.name().to_owned(),
        target_port: port.target,
        published_port: port.published,
        publish_mode: match port.mode {
            PublishMode::Ingress => "ingress",
            PublishMode::Host => "host",
        }
        .to_owned(),
    }
}

/// The networks of the swarm by name: their IDs and subnets, for documents that name them.
#[derive(Clone, Debug, Default)]
pub struct Networks(pub BTreeMap<String, NetworkView>);

impl Networks {
    pub fn new(views: Vec<NetworkView>) -> Self {
        Self(views.into_iter().map(|n| (n.name.clone(), n)).collect())
    }

    fn id(&self, name: &str) -> String {
        self.0
            .get(name)
            .map_or_else(|| name.to_owned(), |n| n.id.clone())
    }

    /// `10.0.1.5/24`: an address with its network's prefix length.
    fn cidr(&self, name: &str, address: std::net::Ipv4Addr) -> String {
        let prefix = self.0.get(name).map_or(32, |n| n.subnet.prefix);
        format!("{address}/{prefix}")
    }
}

pub fn task_spec(view: &ServiceView, networks: &Networks) -> TaskSpec {
    let c = &view.containment;
    let limit = |r: &shoal_dataplane::limits::Resources| {
        let limit = Limit {
            nano_cpus: r.nano_cpus,
            memory_bytes: r.memory_bytes,
            pids: r.pids,
        };
        (limit != Limit::default()).then_some(limit)
    };
    let resources = ResourceRequirements {
        limits: limit(&c.limits),
        reservations: limit(&c.reservations),
    };
    let placement = Placement {
        constraints: view.constraints.clone(),
        preferences: view
            .placement_prefs
            .iter()
            .map(|p| PlacementPreference {
                spread: SpreadOver {
                    spread_descriptor: p.trim_start_matches("spread=").to_owned(),
                },
            })
            .collect(),
        max_replicas: view.max_replicas_per_node,
    };
    let image = view.command.first().cloned().unwrap_or_default();
    let args = view.command.get(1..).unwrap_or_default().to_vec();
    TaskSpec {
        container_spec: ContainerSpec {
            image,
            command: Vec::new(),
            args,
            env: view.env.clone(),
            user: c.user.clone().unwrap_or_default(),
            capability_add: c.cap_add.clone(),
            capability_drop: c.cap_drop.clone(),
            isolation: String::new(),
            healthcheck: view.healthcheck.as_deref().map(health_config),
        },
        resources: (resources != ResourceRequirements::default()).then_some(resources),
        restart_policy: Some(restart_policy(&view.restart_policy)),
        placement: (placement != Placement::default()).then_some(placement),
        networks: view
            .networks
            .iter()
            .map(|name| NetworkAttachmentConfig {
                target: networks.id(name),
                aliases: Vec::new(),
            })
            .collect(),
        force_update: 0,
        runtime: String::new(),
    }
}

/// `ContainerSpec.Healthcheck` (see `HealthConfig` for the built-in probes' `Test`).
pub fn health_config(check: &HealthCheck) -> HealthConfig {
    let with_port = |mut test: Vec<String>, port: Option<u16>| {
        test.extend(port.map(|p| p.to_string()));
        test
    };
    HealthConfig {
        test: match &check.test {
            HealthTest::Command(command) => vec!["CMD-SHELL".into(), command.clone()],
            HealthTest::Http { path, port } => {
                with_port(vec!["SHOAL-HTTP".into(), path.clone()], *port)
            }
            HealthTest::Tcp { port } => with_port(vec!["SHOAL-TCP".into()], *port),
        },
        interval: check.interval_ms * 1_000_000,
        timeout: check.timeout_ms * 1_000_000,
        start_period: check.start_period_ms * 1_000_000,
        retries: check.retries,
    }
}

pub fn restart_policy(policy: &update::RestartPolicy) -> RestartPolicy {
    RestartPolicy {
        condition: match policy.condition {
            update::RestartCondition::None => "none",
            update::RestartCondition::OnFailure => "on-failure",
            update::RestartCondition::Any => "any",
        }
        .to_owned(),
        delay: Some(policy.delay_secs * NANOS),
        max_attempts: Some(policy.max_attempts),
        // Docker leaves a zero window out.
        window: (policy.window_secs != 0).then_some(policy.window_secs * NANOS),
    }
}

/// `UpdateConfig` or `RollbackConfig`.
pub fn update_config(config: &update::UpdateConfig) -> UpdateConfig {
    let control = &config.control;
    UpdateConfig {
        parallelism: config.parallelism,
        delay: config.delay_secs * NANOS,
        failure_action: match control.failure_action {
            update::FailureAction::Pause => "pause",
            update::FailureAction::Continue => "continue",
            update::FailureAction::Rollback => "rollback",
        }
        .to_owned(),
        monitor: control.monitor_secs * NANOS,
        max_failure_ratio: control.max_failure_ratio.get(),
        order: match control.order {
            update::UpdateOrder::StopFirst => "stop-first",
            update::UpdateOrder::StartFirst => "start-first",
        }
        .to_owned(),
    }
}

fn update_status(status: &update::UpdateStatus) -> UpdateStatus {
    UpdateStatus {
        state: serde_json::to_value(status.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        started_at: time(status.started_at),
        completed_at: status.completed_at.map(time),
        message: status.message.clone(),
    }
}

pub fn service(view: &ServiceView, networks: &Networks) -> Service {
    let endpoint_spec = EndpointSpec {
        mode: match view.endpoint_mode {
            EndpointMode::Vip => "vip",
            EndpointMode::Dnsrr => "dnsrr",
        }
        .to_owned(),
        ports: view.ports.iter().map(port).collect(),
    };
    Service {
        id: view.id.clone(),
        version: ObjectVersion {
            index: view.version,
        },
        created_at: time(view.created_at),
        updated_at: time(view.updated_at),
        spec: ServiceSpec {
            name: view.name.clone(),
            labels: BTreeMap::new(),
            task_template: task_spec(view, networks),
            mode: match view.mode {
                ShoalMode::Replicated { replicas } => ServiceMode {
                    replicated: Some(Replicated {
                        replicas: Some(replicas),
                    }),
                    global: None,
                },
                ShoalMode::Global => ServiceMode {
                    replicated: None,
                    global: Some(Global {}),
                },
            },
            update_config: Some(update_config(&view.update_config)),
            rollback_config: Some(update_config(&view.rollback_config)),
            endpoint_spec: Some(endpoint_spec.clone()),
        },
        endpoint: Endpoint {
            ports: endpoint_spec.ports.clone(),
            spec: endpoint_spec,
            virtual_ips: view
                .vips
                .iter()
                .map(|(network, addr)| VirtualIp {
                    network_id: networks.id(network),
                    addr: networks.cidr(network, *addr),
                })
                .collect(),
        },
        service_status: None,
        update_status: view.update_status.as_deref().map(update_status),
        shoal: Some(ServiceExtras {
            running: view.running,
            desired: view.desired,
            snat_ports: view
                .ports
                .iter()
                .filter(|p| p.source == SourceMode::Snat)
                .map(|p| format!("{}/{}", p.published, p.protocol.name()))
                .collect(),
        }),
    }
}

/// `manager_addr`: the node's manager API endpoint, from the swarm's list of managers.
pub fn node(view: &NodeView, manager_addr: Option<String>) -> Node {
    let manager_status = (view.role == shoal_api::Role::Manager).then(|| ManagerStatus {
        leader: view.manager_status == "Leader",
        reachability: if view.manager_status == "Unavailable" {
            "unreachable"
        } else {
            "reachable"
        }
        .into(),
        addr: manager_addr.unwrap_or_else(|| {
            format!(
                "{}:{}",
                view.addr,
                shoal_cluster::state::DEFAULT_MANAGER_PORT
            )
        }),
    });
    Node {
        id: view.id.clone(),
        version: ObjectVersion::default(),
        created_at: time(view.created_at),
        updated_at: time(view.created_at),
        spec: NodeSpec {
            name: String::new(),
            labels: view.labels.clone(),
            role: view.role.to_string(),
            availability: serde_plain(&view.availability),
        },
        description: NodeDescription {
            hostname: view.hostname.clone(),
            platform: Platform {
                architecture: view.platform.arch.clone(),
                os: view.platform.os.clone(),
            },
            resources: Limit {
                nano_cpus: view.resources.nano_cpus,
                memory_bytes: view.resources.memory_bytes,
                pids: 0,
            },
            engine: Engine {
                engine_version: env!("CARGO_PKG_VERSION").into(),
            },
        },
        status: NodeStatus {
            state: serde_plain(&view.status),
            addr: view.addr.to_string(),
        },
        manager_status,
    }
}

/// A unit enum's serde name (`drain`, `ready`, `running`): the words Docker uses too.
pub fn serde_plain<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(text)) => text,
        _ => String::new(),
    }
}

pub fn network(view: &NetworkView, local: Option<NetworkDataplane>) -> Network {
    let mut options = BTreeMap::from([(
        "com.docker.network.driver.overlay.vxlanid_list".to_owned(),
        view.vni.to_string(),
    )]);
    if let Some(mtu) = view.mtu {
        options.insert("com.docker.network.driver.mtu".into(), mtu.to_string());
    }
    let mut vteps: Vec<String> = local
        .iter()
        .flat_map(|l| l.peers.iter().map(|p| p.vtep.to_string()))
        .collect();
    vteps.sort();
    vteps.dedup();
    Network {
        name: view.name.clone(),
        id: view.id.clone(),
        created: time(view.created_at),
        scope: view.scope.clone(),
        driver: view.driver.clone(),
        enable_ipv6: false,
        ipam: Ipam {
            driver: "default".into(),
            config: vec![IpamConfig {
                subnet: view.subnet.to_string(),
                gateway: view.gateway.to_string(),
            }],
        },
        internal: view.internal,
        attachable: view.attachable,
        ingress: view.ingress,
        containers: BTreeMap::new(),
        options,
        labels: BTreeMap::new(),
        peers: vteps
            .into_iter()
            .map(|ip| PeerInfo {
                name: ip.clone(),
                ip,
            })
            .collect(),
        shoal: NetworkExtras {
            vni: view.vni,
            services: view.services.clone(),
            local,
        },
    }
}

/// `services`: the swarm's services by name (a task names its service by name).
pub fn task(
    view: &TaskView,
    services: &BTreeMap<String, ServiceView>,
    networks: &Networks,
) -> Task {
    let service = services.get(&view.service);
    Task {
        id: view.id.clone(),
        version: ObjectVersion {
            index: view.service_version,
        },
        created_at: time(view.created_at),
        updated_at: time(view.state_since),
        name: view.name.clone(),
        labels: BTreeMap::new(),
        spec: service.map(|s| task_spec(s, networks)).unwrap_or_default(),
        service_id: service.map(|s| s.id.clone()).unwrap_or_default(),
        slot: view.slot,
        node_id: view.node_id.clone().unwrap_or_default(),
        status: TaskStatus {
            timestamp: time(view.state_since),
            state: serde_plain(&view.state),
            message: view.message.clone(),
            err: view.error.clone(),
            port_status: PortStatus {
                ports: view.host_ports.iter().map(port).collect(),
            },
        },
        desired_state: serde_plain(&view.desired),
        networks_attachments: view
            .addresses
            .iter()
            .map(|(network, addr)| NetworkAttachment {
                network: AttachedNetwork {
                    id: networks.id(network),
                    spec: AttachedNetworkSpec {
                        name: network.clone(),
                    },
                },
                addresses: vec![networks.cidr(network, *addr)],
            })
            .collect(),
    }
}
