//! Golden documents (Docker's field names), templates as Docker prints them, and Docker's
//! requests read as shoal's.

use serde_json::json;
use shoal_cluster::{
    protocol::{NetworkView, NodeView, ServiceView, TaskView},
    state::{EndpointMode, PortConfig, ServiceMode, TaskState},
};

use crate::{convert, models, spec, template::Format};

fn web() -> ServiceView {
    ServiceView {
        id: "s1d".into(),
        name: "web".into(),
        mode: ServiceMode::Replicated { replicas: 3 },
        running: 2,
        desired: 3,
        command: vec!["shoal".into(), "whoami".into()],
        env: vec!["A=1".into()],
        constraints: vec!["node.role==worker".into()],
        placement_prefs: vec![],
        max_replicas_per_node: 0,
        version: 7,
        update_parallelism: 1,
        update_delay_secs: 10,
        restart_policy: Default::default(),
        update_config: Box::new(shoal_cluster::update::UpdateConfig {
            parallelism: 1,
            delay_secs: 10,
            control: Default::default(),
        }),
        rollback_config: Box::default(),
        update_status: None,
        previous_version: None,
        healthcheck: Some(Box::new(shoal_cluster::health::HealthCheck {
            test: shoal_cluster::health::HealthTest::Command("test -e /tmp/ok".into()),
            interval_ms: 1_000,
            timeout_ms: 2_000,
            retries: 3,
            start_period_ms: 0,
        })),
        networks: vec!["front".into()],
        endpoint_mode: EndpointMode::Vip,
        vips: vec![("front".into(), "10.0.1.2".parse().unwrap())],
        ports: vec![PortConfig::parse("8080:80").unwrap()],
        containment: Box::default(),
        created_at: 0,
        updated_at: 60,
    }
}

fn networks() -> convert::Networks {
    convert::Networks::new(vec![NetworkView {
        id: "n1d".into(),
        name: "front".into(),
        driver: "overlay".into(),
        scope: "swarm".into(),
        subnet: "10.0.1.0/24".parse().unwrap(),
        gateway: "10.0.1.1".parse().unwrap(),
        vni: 4097,
        attachable: false,
        internal: false,
        mtu: None,
        ingress: false,
        services: vec!["web".into()],
        created_at: 0,
    }])
}

#[test]
fn a_service_is_dockers_document() {
    let document = serde_json::to_value(convert::service(&web(), &networks())).unwrap();
    assert_eq!(
        document,
        json!({
            "ID": "s1d",
            "Version": { "Index": 7 },
            "CreatedAt": "1970-01-01T00:00:00Z",
            "UpdatedAt": "1970-01-01T00:01:00Z",
            "Spec": {
                "Name": "web",
                "Labels": {},
                "TaskTemplate": {
                    "ContainerSpec": {
                        "Image": "shoal", "Args": ["whoami"], "Env": ["A=1"],
                        "Healthcheck": {
                            "Test": ["CMD-SHELL", "test -e /tmp/ok"],
                            "Interval": 1_000_000_000u64, "Timeout": 2_000_000_000u64,
                            "Retries": 3
                        }
                    },
                    "Placement": { "Constraints": ["node.role==worker"] },
                    "RestartPolicy": {
                        "Condition": "any", "Delay": 5_000_000_000u64, "MaxAttempts": 0
                    },
                    "Networks": [{ "Target": "n1d" }],
                    "ForceUpdate": 0
                },
                "Mode": { "Replicated": { "Replicas": 3 } },
                "UpdateConfig": {
                    "Parallelism": 1, "Delay": 10_000_000_000u64, "FailureAction": "pause",
                    "Monitor": 5_000_000_000u64, "MaxFailureRatio": 0.0, "Order": "stop-first"
                },
                "RollbackConfig": {
                    "Parallelism": 1, "FailureAction": "pause",
                    "Monitor": 5_000_000_000u64, "MaxFailureRatio": 0.0, "Order": "stop-first"
                },
                "EndpointSpec": {
                    "Mode": "vip",
                    "Ports": [{ "Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress" }]
                }
            },
            "Endpoint": {
                "Spec": {
                    "Mode": "vip",
                    "Ports": [{ "Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress" }]
                },
                "Ports": [{ "Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress" }],
                "VirtualIPs": [{ "NetworkID": "n1d", "Addr": "10.0.1.2/24" }]
            },
            "Shoal": { "Running": 2, "Desired": 3 }
        })
    );
}

fn leader() -> NodeView {
    NodeView {
        id: "m1d".into(),
        hostname: "node1".into(),
        addr: "192.168.77.11".parse().unwrap(),
        role: shoal_api::Role::Manager,
        status: shoal_cluster::state::NodeStatus::Ready,
        availability: shoal_cluster::state::Availability::Drain,
        manager_status: "Leader".into(),
        labels: [("zone".to_owned(), "a".to_owned())].into(),
        created_at: 0,
        resources: shoal_dataplane::limits::Resources {
            nano_cpus: 2_000_000_000,
            memory_bytes: 1 << 30,
            pids: 0,
        },
        platform: shoal_cluster::state::Platform {
            os: "linux".into(),
            arch: "x86_64".into(),
        },
    }
}

#[test]
fn a_node_is_dockers_document() {
    let document =
        serde_json::to_value(convert::node(&leader(), Some("192.168.77.11:2377".into()))).unwrap();
    assert_eq!(
        document,
        json!({
            "ID": "m1d",
            "Version": { "Index": 0 },
            "CreatedAt": "1970-01-01T00:00:00Z",
            "UpdatedAt": "1970-01-01T00:00:00Z",
            "Spec": { "Labels": { "zone": "a" }, "Role": "manager", "Availability": "drain" },
            "Description": {
                "Hostname": "node1",
                "Platform": { "Architecture": "x86_64", "OS": "linux" },
                "Resources": { "NanoCPUs": 2_000_000_000u64, "MemoryBytes": 1u64 << 30 },
                "Engine": { "EngineVersion": env!("CARGO_PKG_VERSION") }
            },
            "Status": { "State": "ready", "Addr": "192.168.77.11" },
            "ManagerStatus": { "Leader": true, "Reachability": "reachable", "Addr": "192.168.77.11:2377" }
        })
    );
}

#[test]
fn a_network_and_a_task_use_dockers_names() {
    let networks = networks();
    let network = serde_json::to_value(convert::network(&networks.0["front"], None)).unwrap();
    assert_eq!(network["Id"], "n1d");
    assert_eq!(
        network["IPAM"]["Config"],
        json!([{ "Subnet": "10.0.1.0/24", "Gateway": "10.0.1.1" }])
    );
    assert_eq!(
        network["Options"]["com.docker.network.driver.overlay.vxlanid_list"],
        "4097"
    );
    assert_eq!(network["Shoal"]["Services"], json!(["web"]));

    let task = TaskView {
        id: "t1d".into(),
        name: "web.1".into(),
        service: "web".into(),
        slot: 1,
        service_version: 7,
        node_id: Some("m1d".into()),
        node: "node1".into(),
        desired: TaskState::Running,
        state: TaskState::Running,
        state_since: 0,
        message: "started".into(),
        error: String::new(),
        created_at: 0,
        addresses: vec![("front".into(), "10.0.1.3".parse().unwrap())],
        host_ports: vec![],
        health: None,
    };
    let services = [("web".to_owned(), web())].into();
    let task = serde_json::to_value(convert::task(&task, &services, &networks)).unwrap();
    assert_eq!(task["ServiceID"], "s1d");
    assert_eq!(task["NodeID"], "m1d");
    assert_eq!(task["Status"]["State"], "running");
    assert_eq!(task["DesiredState"], "running");
    assert_eq!(task["Spec"]["ContainerSpec"]["Image"], "shoal");
    assert_eq!(
        task["NetworksAttachments"],
        json!([{ "Network": { "ID": "n1d", "Spec": { "Name": "front" } }, "Addresses": ["10.0.1.3/24"] }])
    );
}

#[test]
fn the_seeds_templates_print_what_docker_prints() {
    let service = convert::service(&web(), &networks());
    let ports = Format::parse("{{json .Endpoint.Spec.Ports}}", "").unwrap();
    // Fields in Docker's order (Go's encoder writes a struct's fields as declared).
    assert_eq!(
        ports.render_one(&service).unwrap(),
        r#"[{"Protocol":"tcp","TargetPort":80,"PublishedPort":8080,"PublishMode":"ingress"}]"#
    );
    let node = convert::node(&leader(), None);
    let reachability = Format::parse("{{ .ManagerStatus.Reachability }}", "").unwrap();
    assert_eq!(reachability.render_one(&node).unwrap(), "reachable");
    let labels = Format::parse("{{range $k, $v := .Spec.Labels}}{{$k}}={{$v}}{{end}}", "").unwrap();
    assert_eq!(labels.render_one(&node).unwrap(), "zone=a");
    // Maps print sorted, as Go's encoder writes them.
    // Maps sorted, structs in their fields' order, as Go's encoder writes them.
    let json = Format::parse("{{json .Spec.Labels}} {{json .Spec}}", "").unwrap();
    assert_eq!(
        json.render_one(&node).unwrap(),
        r#"{"zone":"a"} {"Labels":{"zone":"a"},"Role":"manager","Availability":"drain"}"#
    );
}

#[test]
fn table_templates_have_a_header_and_aligned_columns() {
    #[derive(serde::Serialize)]
    struct Row {
        #[serde(rename = "Name")]
        name: &'static str,
        #[serde(rename = "Replicas")]
        replicas: &'static str,
    }
    let rows = [
        Row {
            name: "web",
            replicas: "3/3",
        },
        Row {
            name: "a-longer-name",
            replicas: "0/1",
        },
    ];
    let headers = [("Name", "NAME"), ("Replicas", "REPLICAS")];
    let table = Format::parse(r"table {{.Name}}\t{{.Replicas}}", "").unwrap();
    assert_eq!(
        table.render(&rows, &headers).unwrap(),
        "NAME            REPLICAS\nweb             3/3\na-longer-name   0/1\n"
    );
    let plain = Format::parse("{{.Name}}", "").unwrap();
    assert_eq!(
        plain.render(&rows, &headers).unwrap(),
        "web\na-longer-name\n"
    );
    assert!(Format::parse("{{.Name", "").is_err());
}

/// What `docker service create --name web --replicas 3 --publish 8080:80 --no-resolve-image
/// shoal whoami` sends (Docker CLI 28), defaults included.
fn create_body() -> serde_json::Value {
    json!({
        "Name": "web", "Labels": {},
        "TaskTemplate": {
            "ContainerSpec": { "Image": "shoal:latest", "Args": ["whoami"], "Init": false,
                               "DNSConfig": {}, "Isolation": "default" },
            "Resources": { "Limits": {}, "Reservations": {} },
            "RestartPolicy": { "Condition": "any", "Delay": 5_000_000_000u64, "MaxAttempts": 0 },
            "Placement": {}, "ForceUpdate": 0, "Runtime": ""
        },
        "Mode": { "Replicated": { "Replicas": 3 } },
        "UpdateConfig": { "Parallelism": 1, "FailureAction": "pause", "Monitor": 5_000_000_000u64,
                          "MaxFailureRatio": 0, "Order": "stop-first" },
        "RollbackConfig": { "Parallelism": 1, "FailureAction": "pause", "Monitor": 5_000_000_000u64,
                            "MaxFailureRatio": 0, "Order": "stop-first" },
        "EndpointSpec": { "Mode": "vip", "Ports": [
            { "Protocol": "tcp", "TargetPort": 80, "PublishedPort": 8080, "PublishMode": "ingress" }
        ] }
    })
}

#[test]
fn dockers_create_is_shoals_with_the_image_as_the_program() {
    let docker: models::ServiceSpec = spec::parse_strict(&create_body()).unwrap();
    let shoal = spec::service_spec(&docker).unwrap();
    assert_eq!(shoal.command, ["shoal", "whoami"]);
    assert_eq!(shoal.mode, ServiceMode::Replicated { replicas: 3 });
    assert_eq!(shoal.ports, [PortConfig::parse("8080:80").unwrap()]);
}

#[test]
fn options_shoal_lacks_are_refused_by_name() {
    let refused = |change: &dyn Fn(&mut serde_json::Value)| {
        let mut body = create_body();
        change(&mut body);
        let result = spec::parse_strict::<models::ServiceSpec>(&body)
            .and_then(|docker| spec::service_spec(&docker));
        let err = result.expect_err("refused");
        assert_eq!(
            shoal_api::ApiError::of(&err).kind,
            shoal_api::ErrorKind::Invalid
        );
        format!("{err:#}")
    };
    let mounts = refused(&|b| {
        b["TaskTemplate"]["ContainerSpec"]["Mounts"] = json!([{ "Type": "tmpfs", "Target": "/x" }])
    });
    assert!(
        mounts.contains("TaskTemplate.ContainerSpec.Mounts"),
        "{mounts}"
    );
    let log_driver = refused(&|b| b["TaskTemplate"]["LogDriver"] = json!({ "Name": "syslog" }));
    assert!(
        log_driver.contains("TaskTemplate.LogDriver"),
        "{log_driver}"
    );
    let restart =
        refused(&|b| b["TaskTemplate"]["RestartPolicy"]["Condition"] = json!("sometimes"));
    assert!(
        restart.contains("TaskTemplate.RestartPolicy.Condition"),
        "{restart}"
    );
    let tag = refused(&|b| b["TaskTemplate"]["ContainerSpec"]["Image"] = json!("nginx:1.25"));
    assert!(tag.contains("a tag or digest"), "{tag}");
    let entrypoint = refused(&|b| b["TaskTemplate"]["ContainerSpec"]["Command"] = json!(["sh"]));
    assert!(entrypoint.contains("--entrypoint"), "{entrypoint}");
}

#[test]
fn dockers_update_is_the_changes_from_the_current_spec() {
    let current = web();
    let mut new = convert::service(&current, &networks()).spec;
    new.mode.replicated = Some(models::Replicated { replicas: Some(5) });
    let ports = &mut new.endpoint_spec.as_mut().unwrap().ports;
    ports.push(models::PortConfig {
        protocol: "udp".into(),
        target_port: 53,
        published_port: 5353,
        publish_mode: "host".into(),
        ..Default::default()
    });
    let changes = spec::service_changes(&current, &networks(), &new).unwrap();
    assert_eq!(changes.replicas, Some(5));
    assert_eq!(
        changes.publish_add,
        [PortConfig::parse("published=5353,target=53,protocol=udp,mode=host").unwrap()]
    );
    assert!(
        changes.publish_rm.is_empty()
            && changes.network_add.is_empty()
            && changes.network_rm.is_empty()
    );
    assert!(changes.env_add.is_empty() && !changes.force);

    let mut renamed = convert::service(&current, &networks()).spec;
    renamed.task_template.container_spec.args = vec!["other".into()];
    let err = spec::service_changes(&current, &networks(), &renamed).unwrap_err();
    assert!(format!("{err:#}").contains("image or arguments"), "{err:#}");
}
