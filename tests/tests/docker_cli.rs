//! The unmodified `docker` CLI drives the swarm through node1's Engine API socket: the seeds'
//! walkthrough done with `docker` commands, their two `--format` commands printing what
//! Docker prints, options shoal lacks refused with a 400 that names them, and `shoal X
//! inspect` printing the API's own documents. Needs root, curl and the docker CLI
//! (scripts/setup.sh installs it; no Docker daemon is ever started).

use std::{path::PathBuf, process::Command, time::Duration};

use serde_json::Value;
use shoal_tests::{require_tools, wait_for, TestLab};

struct Docker {
    socket: PathBuf,
    /// The CLI's config dir, so the host's (contexts, credentials) plays no part.
    config: tempfile::TempDir,
}

impl Docker {
    fn of(lab: &TestLab, node: &str) -> Self {
        Self {
            socket: lab.run_dir().join(node).join("docker.sock"),
            config: tempfile::tempdir().unwrap(),
        }
    }

    /// `docker ARGS`: whether it succeeded, its stdout and stderr.
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_CONFIG", self.config.path())
            .output()
            .expect("running docker");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        eprintln!("$ docker {}\n{stdout}{stderr}", args.join(" "));
        (out.status.success(), stdout, stderr)
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.run(args);
        assert!(ok, "docker {args:?} failed: {stderr}");
        stdout
    }

    /// `METHOD PATH` on the socket with curl: the status and the body.
    fn call(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        let out = Command::new("curl")
            // -g: a `filters` query's braces are not a URL pattern.
            .args([
                "-s",
                "-g",
                "-X",
                method,
                "-H",
                "content-type: application/json",
            ])
            .args([
                "--data-binary",
                body,
                "-w",
                "\n%{http_code}",
                "--unix-socket",
            ])
            .arg(&self.socket)
            .arg(format!("http://docker{path}"))
            .output()
            .expect("running curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, status) = stdout
            .rsplit_once('\n')
            .unwrap_or_else(|| panic!("curl {path}: {}", String::from_utf8_lossy(&out.stderr)));
        (status.parse().expect("status"), body.to_owned())
    }

    fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, "");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).expect("JSON")
    }

    /// The nodes running `service`'s tasks that should run, once `replicas` of them run.
    fn running_on(&self, service: &str, replicas: usize) -> Vec<String> {
        let format = "{{.Node}} {{.CurrentState}}";
        wait_for(
            &format!("{replicas} running tasks of {service}"),
            Duration::from_secs(60),
            || {
                let (ok, out, _) = self.run(&[
                    "service",
                    "ps",
                    service,
                    "--filter",
                    "desired-state=running",
                    "--format",
                    format,
                ]);
                let nodes: Vec<String> = out
                    .lines()
                    .filter(|l| l.contains(" Running "))
                    .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
                    .collect();
                (ok && nodes.len() == replicas && out.lines().count() == replicas).then_some(nodes)
            },
        )
    }
}

#[test]
fn the_docker_cli_drives_the_swarm() {
    require_tools(&["docker", "curl"]);
    let lab = TestLab::up("docker-cli", 3);
    let docker = Docker::of(&lab, "node1");

    let version = docker.ok(&["version", "--format", "{{.Server.APIVersion}}"]);
    assert_eq!(version.trim(), "1.47", "negotiated down to shoal's newest");
    let nodes = docker.ok(&["node", "ls"]);
    for expected in ["HOSTNAME", "node1", "node2", "node3", "Leader"] {
        assert!(nodes.contains(expected), "{nodes}");
    }

    docker.ok(&["network", "create", "--driver", "overlay", "front"]);
    assert!(docker.ok(&["network", "ls"]).contains("front"));
    docker.ok(&[
        "service",
        "create",
        "--name",
        "web",
        "--replicas",
        "3",
        "--publish",
        "8080:80",
        "--network",
        "front",
        "--no-resolve-image",
        "--detach",
        "shoal",
        "whoami",
    ]);
    docker.running_on("web", 3);
    let ps = docker.ok(&["service", "ps", "web"]);
    for expected in ["web.1", "web.2", "web.3", "Running", "shoal"] {
        assert!(ps.contains(expected), "{ps}");
    }
    // The routing mesh answers on every node.
    let answer = wait_for("the published port", Duration::from_secs(30), || {
        lab.client_get("http://192.168.77.12:8080/", 5)
    });
    assert!(answer.contains("Hostname: web."), "{answer}");

    docker.ok(&["service", "scale", "--detach", "web=5"]);
    docker.running_on("web", 5);
    let replicas = docker.ok(&["service", "ls", "--format", "{{.Name}} {{.Replicas}}"]);
    assert_eq!(replicas.trim(), "web 5/5");

    docker.ok(&[
        "service",
        "update",
        "--detach",
        "--publish-add",
        "9090:80",
        "web",
    ]);
    // The seeds' two templates print what Docker prints.
    let ports = docker.ok(&[
        "service",
        "inspect",
        "--format",
        "{{json .Endpoint.Spec.Ports}}",
        "web",
    ]);
    assert_eq!(
        ports.trim(),
        r#"[{"Protocol":"tcp","TargetPort":80,"PublishedPort":8080,"PublishMode":"ingress"},{"Protocol":"tcp","TargetPort":80,"PublishedPort":9090,"PublishMode":"ingress"}]"#
    );
    let reachability = docker.ok(&[
        "node",
        "inspect",
        "node1",
        "--format",
        "{{ .ManagerStatus.Reachability }}",
    ]);
    assert_eq!(reachability.trim(), "reachable");
    wait_for("the added port", Duration::from_secs(30), || {
        lab.client_get("http://192.168.77.13:9090/", 5)
    });

    docker.ok(&["node", "update", "--availability", "drain", "node2"]);
    let availability = docker.ok(&["node", "ls", "--format", "{{.Hostname}}={{.Availability}}"]);
    assert!(availability.contains("node2=Drain"), "{availability}");
    wait_for(
        "web's tasks to leave node2",
        Duration::from_secs(60),
        || {
            let nodes = docker.running_on("web", 5);
            (!nodes.iter().any(|n| n == "node2")).then_some(())
        },
    );

    // `shoal X inspect` prints the Engine API's documents.
    let tasks = docker.get_json(&format!(
        "/v1.47/tasks?filters={}",
        r#"{"service":{"web":true},"desired-state":{"running":true}}"#.replace('"', "%22")
    ));
    let task = tasks[0]["ID"].as_str().expect("a task").to_owned();
    for (shoal_args, api_path) in [
        (
            vec!["service", "inspect", "web"],
            "/v1.47/services/web".to_owned(),
        ),
        (
            vec!["node", "inspect", "node2"],
            "/v1.41/nodes/node2".to_owned(),
        ),
        (
            vec!["network", "inspect", "front"],
            "/networks/front".to_owned(),
        ),
        (
            vec!["task", "inspect", &task],
            format!("/v1.47/tasks/{task}"),
        ),
    ] {
        let (printed, served) = same_document(&lab, &docker, &shoal_args, &api_path);
        assert_eq!(printed, Value::Array(vec![served]), "{shoal_args:?}");
    }
    let web = docker.get_json("/v1.47/services/web");
    assert_eq!(
        web["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"],
        "shoal"
    );

    // Options shoal lacks: a 400 naming them, through the CLI and on the wire.
    let (ok, _, stderr) = docker.run(&[
        "service",
        "create",
        "--name",
        "bad",
        "--mount",
        "type=tmpfs,destination=/x",
        "--no-resolve-image",
        "--detach",
        "shoal",
        "whoami",
    ]);
    assert!(
        !ok && stderr.contains("TaskTemplate.ContainerSpec.Mounts"),
        "{stderr}"
    );
    let (status, body) = docker.call(
        "POST",
        "/v1.47/services/create",
        r#"{"Name":"bad","TaskTemplate":{"ContainerSpec":{"Image":"shoal","Hostname":"x"}}}"#,
    );
    assert_eq!(status, 400, "{body}");
    let message: Value = serde_json::from_str(&body).unwrap();
    assert!(
        message["message"]
            .as_str()
            .unwrap()
            .contains("TaskTemplate.ContainerSpec.Hostname"),
        "{body}"
    );
    let (status, body) = docker.call("GET", "/v1.99/version", "");
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("Maximum supported API version is 1.47"),
        "{body}"
    );
    // Back to the spec before `--publish-add`: the added port goes.
    docker.ok(&["service", "rollback", "--detach", "web"]);
    wait_for("the rollback", Duration::from_secs(60), || {
        let ports = docker.ok(&[
            "service",
            "inspect",
            "--format",
            "{{json .Endpoint.Spec.Ports}} {{.UpdateStatus.State}}",
            "web",
        ]);
        (ports.trim()
            == r#"[{"Protocol":"tcp","TargetPort":80,"PublishedPort":8080,"PublishMode":"ingress"}] rollback_completed"#)
            .then_some(())
    });

    docker.ok(&["service", "rm", "web"]);
    assert_eq!(docker.ok(&["service", "ls", "-q"]).trim(), "");
    docker.ok(&["network", "rm", "front"]);
    lab.down_clean();
}

/// `shoal ARGS` on node1 and the API's document at `path`, read while the object stood still:
/// the API is read before and after, and the three reads are retried until those two agree
/// (a rolling update or a task's state may move between two reads).
fn same_document(lab: &TestLab, docker: &Docker, args: &[&str], path: &str) -> (Value, Value) {
    let mut all = vec!["shoal"];
    all.extend_from_slice(args);
    wait_for(
        &format!("{path} to stand still"),
        Duration::from_secs(60),
        || {
            let before = docker.get_json(path);
            let printed: Value = serde_json::from_str(&lab.exec("node1", &all)).expect("JSON");
            (docker.get_json(path) == before).then_some((printed, before))
        },
    )
}
