//! What Docker's clients ask for, as shoal's requests: a service spec to create, the new spec
//! of `docker service update`/`scale` as the changes from the current one, a node spec as a
//! node update. Whatever shoal cannot do is refused with the field named, never dropped:
//! any field of the request that is set and that the models here do not carry, and values
//! of the fields they carry that shoal has no equivalent for.

use anyhow::{bail, Result};
use serde_json::Value;
use shoal_api::ApiError;
use shoal_cluster::{
    health::{self, HealthCheck, HealthTest},
    protocol::{ServiceChanges, ServiceView},
    resources::{Containment, ContainmentUpdate},
    state::{
        Constraint, EndpointMode, PlacementPref, PlacementUpdate, PortConfig as ShoalPort,
        PublishMode, ServiceMode as ShoalMode, ServiceSpec as ShoalSpec, SourceMode,
    },
    update,
};

use crate::{
    convert::{self, Networks, NANOS},
    models::*,
};

fn refuse(what: impl std::fmt::Display) -> anyhow::Error {
    ApiError::invalid(format!("{what} is not supported by shoal")).into()
}

/// Parses a request body, refusing the set fields the model does not carry (`Mounts`,
/// `TaskTemplate.LogDriver`, ...), each named by its path.
pub fn parse_strict<T: serde::de::DeserializeOwned + serde::Serialize>(body: &Value) -> Result<T> {
    let parsed: T = serde_json::from_value(body.clone())
        .map_err(|e| ApiError::invalid(format!("invalid request body: {e}")))?;
    let understood = serde_json::to_value(&parsed)?;
    let mut unknown = Vec::new();
    unsupported_fields(body, &understood, "", &mut unknown);
    if !unknown.is_empty() {
        return Err(refuse(format!("setting {}", unknown.join(", "))));
    }
    Ok(parsed)
}

/// The fields of `input` that are set and differ from `reference`, by path: what a request
/// would change that shoal has no way to.
pub fn changed_fields(input: &Value, reference: &Value) -> Vec<String> {
    let mut out = Vec::new();
    differences(input, reference, "", &mut out);
    out
}

fn differences(input: &Value, reference: &Value, path: &str, out: &mut Vec<String>) {
    if is_empty(input) || input == reference {
        return;
    }
    match input {
        Value::Object(fields) => {
            for (key, value) in fields {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                differences(
                    value,
                    reference.get(key).unwrap_or(&Value::Null),
                    &here,
                    out,
                );
            }
        }
        _ => out.push(path.to_owned()),
    }
}

/// Docker's zero values: a field holding one was not set.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_empty),
    }
}

fn unsupported_fields(input: &Value, understood: &Value, path: &str, out: &mut Vec<String>) {
    match (input, understood) {
        (Value::Object(fields), Value::Object(known)) => {
            for (key, value) in fields {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match known.get(key) {
                    _ if is_empty(value) => {}
                    None => out.push(here),
                    Some(known) => unsupported_fields(value, known, &here, out),
                }
            }
        }
        (Value::Array(items), Value::Array(known)) => {
            for (i, (item, known)) in items.iter().zip(known).enumerate() {
                unsupported_fields(item, known, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Docker's defaults for the settings shoal has no knob for: accepted, as they describe what
/// shoal does; anything else is refused.
fn check_defaults(spec: &ServiceSpec) -> Result<()> {
    let container = &spec.task_template.container_spec;
    if !container.command.is_empty() {
        bail!(refuse(
            "ContainerSpec.Command (--entrypoint): the image is the program"
        ));
    }
    if !["", "default"].contains(&container.isolation.as_str()) {
        bail!(refuse(format!("Isolation {:?}", container.isolation)));
    }
    if !spec.task_template.runtime.is_empty() && spec.task_template.runtime != "container" {
        bail!(refuse(format!(
            "TaskTemplate.Runtime {:?}",
            spec.task_template.runtime
        )));
    }
    if !spec.labels.is_empty() {
        bail!(refuse("service labels (--label)"));
    }
    for port in spec.endpoint_spec.iter().flat_map(|e| &e.ports) {
        if !port.name.is_empty() {
            bail!(refuse("a port's Name"));
        }
    }
    Ok(())
}

fn shoal_port(port: &PortConfig) -> Result<ShoalPort> {
    let protocol = match port.protocol.as_str() {
        "" | "tcp" => "tcp",
        "udp" => "udp",
        other => bail!(refuse(format!("protocol {other:?}"))),
    };
    let mode = match port.publish_mode.as_str() {
        "" | "ingress" => PublishMode::Ingress,
        "host" => PublishMode::Host,
        other => bail!(refuse(format!("publish mode {other:?}"))),
    };
    if port.published_port == 0 {
        bail!(refuse(format!(
            "publishing target port {} without a published port",
            port.target_port
        )));
    }
    Ok(ShoalPort {
        protocol: ShoalPort::parse(&format!("1:1/{protocol}"))?.protocol,
        published: port.published_port,
        target: port.target_port,
        mode,
        source: SourceMode::Client,
    })
}

fn containment(spec: &TaskSpec) -> Result<Containment> {
    let c = &spec.container_spec;
    let resources = spec.resources.clone().unwrap_or_default();
    let limits = resources.limits.unwrap_or_default();
    let reserve = resources.reservations.unwrap_or_default();
    let containment = Containment {
        user: (!c.user.is_empty()).then(|| c.user.clone()),
        cap_add: c.capability_add.clone(),
        cap_drop: c.capability_drop.clone(),
        limits: shoal_dataplane::limits::Resources {
            nano_cpus: limits.nano_cpus,
            memory_bytes: limits.memory_bytes,
            pids: limits.pids,
        },
        reservations: shoal_dataplane::limits::Resources {
            nano_cpus: reserve.nano_cpus,
            memory_bytes: reserve.memory_bytes,
            pids: reserve.pids,
        },
    };
    containment
        .validate()
        .map_err(|e| ApiError::invalid(format!("{e:#}")))?;
    Ok(containment)
}

/// The program an image names. Docker's CLI writes `shoal` as `shoal:latest`; other tags and
/// digests name nothing shoal has.
fn program(image: &str) -> Result<String> {
    let name = image.strip_suffix(":latest").unwrap_or(image);
    if name.contains('@')
        || name
            .rsplit('/')
            .next()
            .is_some_and(|last| last.contains(':'))
    {
        bail!(refuse(format!(
            "image {image:?}: a tag or digest (the image is the program tasks run, a name in \
             the nodes' PATH)"
        )));
    }
    Ok(name.to_owned())
}

/// `POST /services/create`: the image is the program, `Args` its arguments.
pub fn service_spec(spec: &ServiceSpec) -> Result<ShoalSpec> {
    check_defaults(spec)?;
    let task = &spec.task_template;
    let container = &task.container_spec;
    if container.image.is_empty() {
        bail!(ApiError::invalid(
            "ContainerSpec.Image is required: the program tasks run"
        ));
    }
    let program = program(&container.image)?;
    let mode = match (&spec.mode.replicated, &spec.mode.global) {
        (Some(_), Some(_)) => bail!(ApiError::invalid("Mode is both Replicated and Global")),
        (_, Some(_)) => ShoalMode::Global,
        (Some(r), None) => ShoalMode::Replicated {
            replicas: r.replicas.unwrap_or(1),
        },
        (None, None) => ShoalMode::Replicated { replicas: 1 },
    };
    let placement = task.placement.clone().unwrap_or_default();
    let update = match &spec.update_config {
        Some(config) => rollout_config("UpdateConfig", config)?,
        None => update::UpdateConfig::default(),
    };
    let rollback = match &spec.rollback_config {
        Some(config) => rollout_config("RollbackConfig", config)?,
        None => update::UpdateConfig::default(),
    };
    let endpoint = spec.endpoint_spec.clone().unwrap_or_default();
    let invalid = |e: anyhow::Error| anyhow::Error::from(ApiError::invalid(format!("{e:#}")));
    let shoal = ShoalSpec {
        name: spec.name.clone(),
        mode,
        command: std::iter::once(program)
            .chain(container.args.iter().cloned())
            .collect(),
        env: container.env.clone(),
        constraints: placement
            .constraints
            .iter()
            .map(|c| Constraint::parse(c))
            .collect::<Result<_>>()
            .map_err(invalid)?,
        update_parallelism: update.parallelism,
        update_delay_secs: update.delay_secs,
        restart: match &task.restart_policy {
            Some(policy) => restart_policy(policy)?,
            None => update::RestartPolicy::default(),
        },
        update_control: update.control,
        rollback_config: rollback,
        healthcheck: match &container.healthcheck {
            Some(config) => health_check(config)?.map(Box::new),
            None => None,
        },
        networks: task
            .networks
            .iter()
            .map(|n| {
                if n.aliases.is_empty() {
                    Ok(n.target.clone())
                } else {
                    Err(refuse("network aliases"))
                }
            })
            .collect::<Result<_>>()?,
        endpoint_mode: match endpoint.mode.as_str() {
            "" | "vip" => EndpointMode::Vip,
            "dnsrr" => EndpointMode::Dnsrr,
            other => bail!(ApiError::invalid(format!(
                "unknown endpoint mode {other:?}"
            ))),
        },
        ports: endpoint
            .ports
            .iter()
            .map(shoal_port)
            .collect::<Result<_>>()?,
        containment: containment(task)?,
        placement_prefs: placement
            .preferences
            .iter()
            .map(|p| PlacementPref::parse(&format!("spread={}", p.spread.spread_descriptor)))
            .collect::<Result<_>>()
            .map_err(invalid)?,
        max_replicas_per_node: placement.max_replicas,
    };
    shoal.validate().map_err(invalid)?;
    Ok(shoal)
}

/// `POST /services/{id}/update`: Docker's CLI sends the whole new spec; shoal's update takes
/// the changes from the current one.
pub fn service_changes(
    current: &ServiceView,
    networks: &Networks,
    new: &ServiceSpec,
) -> Result<ServiceChanges> {
    let wanted = service_spec(new)?;
    if wanted.command != current.command {
        bail!(refuse("changing a service's image or arguments"));
    }
    if wanted.name != current.name {
        bail!(refuse("renaming a service"));
    }
    if wanted.endpoint_mode != current.endpoint_mode {
        bail!(refuse("changing the endpoint mode"));
    }
    let mut changes = ServiceChanges {
        policy: Box::new(policy_update(current, &wanted)),
        health: Box::new(health_update(
            current.healthcheck.as_deref(),
            wanted.healthcheck.as_deref(),
        )),
        ..ServiceChanges::default()
    };
    match (&current.mode, &wanted.mode) {
        (ShoalMode::Replicated { replicas: a }, ShoalMode::Replicated { replicas: b }) => {
            if a != b {
                changes.replicas = Some(*b);
            }
        }
        (ShoalMode::Global, ShoalMode::Global) => {}
        _ => bail!(refuse("changing a service's mode")),
    }
    if let Some(gone) = current.env.iter().find(|e| !wanted.env.contains(e)) {
        bail!(refuse(format!(
            "removing environment variable {gone:?} (--env-rm)"
        )));
    }
    changes.env_add = wanted
        .env
        .iter()
        .filter(|e| !current.env.contains(e))
        .cloned()
        .collect();
    let old_targets: Vec<String> = convert::task_spec(current, networks)
        .networks
        .into_iter()
        .map(|n| n.target)
        .collect();
    let same_network = |target: &str, other: &str| {
        target == other
            || networks.0.get(other).is_some_and(|n| n.id == target)
            || networks.0.get(target).is_some_and(|n| n.id == other)
    };
    changes.network_add = wanted
        .networks
        .iter()
        .filter(|n| !old_targets.iter().any(|o| same_network(o, n)))
        .cloned()
        .collect();
    changes.network_rm = old_targets
        .iter()
        .filter(|o| !wanted.networks.iter().any(|n| same_network(o, n)))
        .cloned()
        .collect();
    changes.publish_add = wanted
        .ports
        .iter()
        .filter(|p| !current.ports.contains(p))
        .cloned()
        .collect();
    changes.publish_rm = current
        .ports
        .iter()
        .filter(|p| {
            !wanted
                .ports
                .iter()
                .any(|w| w.published == p.published && w.protocol == p.protocol)
        })
        .map(|p| format!("{}/{}", p.published, p.protocol.name()))
        .collect();
    changes.force = new.task_template.force_update != 0;
    changes.containment = containment_update(&current.containment, &wanted.containment);
    let old_constraints: Vec<String> = current.constraints.clone();
    let new_constraints: Vec<String> = wanted.constraints.iter().map(ToString::to_string).collect();
    let new_prefs: Vec<String> = wanted
        .placement_prefs
        .iter()
        .map(ToString::to_string)
        .collect();
    changes.placement = Box::new(PlacementUpdate {
        constraint_add: new_constraints
            .iter()
            .filter(|c| !old_constraints.contains(c))
            .cloned()
            .collect(),
        constraint_rm: old_constraints
            .iter()
            .filter(|c| !new_constraints.contains(c))
            .cloned()
            .collect(),
        pref_add: new_prefs
            .iter()
            .filter(|p| !current.placement_prefs.contains(p))
            .cloned()
            .collect(),
        pref_rm: current
            .placement_prefs
            .iter()
            .filter(|p| !new_prefs.contains(p))
            .cloned()
            .collect(),
        max_replicas_per_node: (wanted.max_replicas_per_node != current.max_replicas_per_node)
            .then_some(wanted.max_replicas_per_node),
    });
    Ok(changes)
}

/// `ContainerSpec.Healthcheck`: None for `["NONE"]` (or no test: shoal has no image to take
/// one from); unset durations and retries take Docker's defaults.
fn health_check(config: &HealthConfig) -> Result<Option<HealthCheck>> {
    let invalid = |what: String| anyhow::Error::from(ApiError::invalid(what));
    let port = |rest: &[String]| -> Result<Option<u16>> {
        match rest {
            [] => Ok(None),
            [port] => port
                .parse()
                .map(Some)
                .map_err(|_| invalid(format!("Healthcheck.Test: bad port {port:?}"))),
            _ => Err(invalid("Healthcheck.Test: too many words".into())),
        }
    };
    let test = match config.test.as_slice() {
        [] => return Ok(None),
        [none] if none == "NONE" => return Ok(None),
        [kind, command] if kind == "CMD-SHELL" => HealthTest::Command(command.clone()),
        [kind, words @ ..] if kind == "CMD" && !words.is_empty() => HealthTest::Command(
            words
                .iter()
                .map(|w| format!("'{}'", w.replace('\'', r"'\''")))
                .collect::<Vec<_>>()
                .join(" "),
        ),
        [kind, path, rest @ ..] if kind == "SHOAL-HTTP" => HealthTest::Http {
            path: path.clone(),
            port: port(rest)?,
        },
        [kind, rest @ ..] if kind == "SHOAL-TCP" => HealthTest::Tcp { port: port(rest)? },
        other => bail!(invalid(format!(
            "Healthcheck.Test {other:?}: CMD-SHELL, CMD or NONE (or shoal's SHOAL-HTTP, SHOAL-TCP)"
        ))),
    };
    let ms = |nanos: u64, default: std::time::Duration| match nanos {
        0 => default.as_millis() as u64,
        nanos => nanos.div_ceil(1_000_000),
    };
    Ok(Some(HealthCheck {
        test,
        interval_ms: ms(config.interval, health::DEFAULT_INTERVAL),
        timeout_ms: ms(config.timeout, health::DEFAULT_TIMEOUT),
        retries: match config.retries {
            0 => health::DEFAULT_RETRIES,
            n => n,
        },
        start_period_ms: config.start_period.div_ceil(1_000_000),
    }))
}

fn health_update(old: Option<&HealthCheck>, new: Option<&HealthCheck>) -> health::HealthUpdate {
    match new {
        _ if old == new => health::HealthUpdate::default(),
        None => health::HealthUpdate {
            disable: true,
            ..health::HealthUpdate::default()
        },
        Some(check) => health::HealthUpdate {
            test: Some(check.test.clone()),
            interval_ms: Some(check.interval_ms),
            timeout_ms: Some(check.timeout_ms),
            retries: Some(check.retries),
            start_period_ms: Some(check.start_period_ms),
            disable: false,
        },
    }
}

/// Docker's nanoseconds as shoal's whole seconds (rounded up: a delay is never shortened).
fn secs(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS)
}

fn restart_policy(policy: &RestartPolicy) -> Result<update::RestartPolicy> {
    let default = update::RestartPolicy::default();
    let condition = match policy.condition.as_str() {
        "" => default.condition,
        text => text.parse().map_err(|e: anyhow::Error| {
            ApiError::invalid(format!("TaskTemplate.RestartPolicy.Condition: {e:#}"))
        })?,
    };
    Ok(update::RestartPolicy {
        condition,
        delay_secs: policy.delay.map_or(default.delay_secs, secs),
        max_attempts: policy.max_attempts.unwrap_or(default.max_attempts),
        window_secs: policy.window.map_or(default.window_secs, secs),
    })
}

/// `UpdateConfig` / `RollbackConfig` (`name`, for errors); unset fields take shoal's (which
/// are Docker's) defaults.
fn rollout_config(name: &str, config: &UpdateConfig) -> Result<update::UpdateConfig> {
    let default = update::UpdateControl::default();
    let invalid = |field: &str, e: anyhow::Error| {
        anyhow::Error::from(ApiError::invalid(format!("{name}.{field}: {e:#}")))
    };
    Ok(update::UpdateConfig {
        parallelism: config.parallelism,
        delay_secs: secs(config.delay),
        control: update::UpdateControl {
            failure_action: match config.failure_action.as_str() {
                "" => default.failure_action,
                text => text.parse().map_err(|e| invalid("FailureAction", e))?,
            },
            monitor_secs: match config.monitor {
                0 => default.monitor_secs,
                nanos => secs(nanos),
            },
            max_failure_ratio: config
                .max_failure_ratio
                .to_string()
                .parse()
                .map_err(|e| invalid("MaxFailureRatio", e))?,
            order: match config.order.as_str() {
                "" => default.order,
                text => text.parse().map_err(|e| invalid("Order", e))?,
            },
        },
    })
}

/// The `--restart-*`, `--update-*` and `--rollback-*` settings that differ from the service's.
fn policy_update(current: &ServiceView, wanted: &ShoalSpec) -> update::PolicyUpdate {
    fn changed<T: PartialEq + Copy>(old: T, new: T) -> Option<T> {
        (old != new).then_some(new)
    }
    let config = |old: &update::UpdateConfig, new: &update::UpdateConfig| update::ConfigUpdate {
        parallelism: changed(old.parallelism, new.parallelism),
        delay_secs: changed(old.delay_secs, new.delay_secs),
        failure_action: changed(old.control.failure_action, new.control.failure_action),
        monitor_secs: changed(old.control.monitor_secs, new.control.monitor_secs),
        max_failure_ratio: changed(old.control.max_failure_ratio, new.control.max_failure_ratio),
        order: changed(old.control.order, new.control.order),
    };
    let (old, new) = (&current.restart_policy, &wanted.restart);
    update::PolicyUpdate {
        restart_condition: changed(old.condition, new.condition),
        restart_delay_secs: changed(old.delay_secs, new.delay_secs),
        restart_max_attempts: changed(old.max_attempts, new.max_attempts),
        restart_window_secs: changed(old.window_secs, new.window_secs),
        update: config(&current.update_config, &wanted.update_config()),
        rollback: config(&current.rollback_config, &wanted.rollback_config),
    }
}

fn containment_update(old: &Containment, new: &Containment) -> ContainmentUpdate {
    let changed = |a: u64, b: u64| (a != b).then_some(b);
    ContainmentUpdate {
        user: (old.user != new.user).then(|| new.user.clone().unwrap_or_default()),
        cap_add: (old.cap_add != new.cap_add).then(|| new.cap_add.clone()),
        cap_drop: (old.cap_drop != new.cap_drop).then(|| new.cap_drop.clone()),
        limit_cpu: changed(old.limits.nano_cpus, new.limits.nano_cpus),
        limit_memory: changed(old.limits.memory_bytes, new.limits.memory_bytes),
        limit_pids: changed(old.limits.pids, new.limits.pids),
        reserve_cpu: changed(old.reservations.nano_cpus, new.reservations.nano_cpus),
        reserve_memory: changed(old.reservations.memory_bytes, new.reservations.memory_bytes),
    }
}

/// `POST /nodes/{id}/update`: availability, role and labels, as changes from the node's.
pub struct NodeChanges {
    pub availability: Option<shoal_cluster::state::Availability>,
    pub role: Option<shoal_api::Role>,
    pub label_add: Vec<String>,
    pub label_rm: Vec<String>,
}

pub fn node_changes(current: &Node, new: &NodeSpec) -> Result<NodeChanges> {
    if !new.name.is_empty() {
        bail!(refuse("naming a node (Spec.Name)"));
    }
    let availability = serde_json::from_value(Value::String(new.availability.clone()))
        .map_err(|_| ApiError::invalid(format!("unknown availability {:?}", new.availability)))?;
    let role = serde_json::from_value(Value::String(new.role.clone()))
        .map_err(|_| ApiError::invalid(format!("unknown role {:?}", new.role)))?;
    let old = &current.spec;
    Ok(NodeChanges {
        availability: (new.availability != old.availability).then_some(availability),
        role: (new.role != old.role).then_some(role),
        label_add: new
            .labels
            .iter()
            .filter(|(k, v)| old.labels.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        label_rm: old
            .labels
            .keys()
            .filter(|k| !new.labels.contains_key(*k))
            .cloned()
            .collect(),
    })
}
