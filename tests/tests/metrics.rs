//! The agent's metrics and health endpoints, scraped inside lab nodes as a local Prometheus
//! would: every line must be valid text exposition format, and the numbers must match what
//! the cluster really does. Needs root.

use std::{collections::BTreeMap, time::Duration};

use shoal_tests::{wait_for, TestLab};

/// The lab agents' default `metrics_addr` (each node has its own loopback).
const ENDPOINT: &str = "http://127.0.0.1:9323";

#[derive(Debug)]
struct Family {
    kind: String,
}

#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, Default)]
struct Scrape {
    families: BTreeMap<String, Family>,
    samples: Vec<Sample>,
}

impl Scrape {
    /// Samples of `name` whose labels include `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        assert!(self.families.contains_key(name), "no family {name}");
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(v))
            })
            .collect()
    }

    /// The one sample of `name` with `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.find(name, labels).as_slice() {
            [one] => one.value,
            other => panic!("{} samples of {name}{labels:?}: {other:?}", other.len()),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.families.contains_key(name)
    }
}

fn valid_name(name: &str, metric: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic()
            || c == '_'
            || (metric && c == ':')
            || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

fn parse_value(text: &str) -> Result<f64, String> {
    match text {
        "NaN" => Ok(f64::NAN),
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        _ => text
            .parse::<f64>()
            .map_err(|e| format!("value {text:?}: {e}")),
    }
}

/// `{a="x",b="y"}` at the start of `text`: the labels and the rest after `}`.
fn parse_labels(text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    let mut rest = text.strip_prefix('{').ok_or("labels must start with {")?;
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest.split_once("=\"").ok_or("label without =\"")?;
        if !valid_name(name, false) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                    '\\' => value.push('\\'),
                    '"' => value.push('"'),
                    'n' => value.push('\n'),
                    c => return Err(format!("bad escape \\{c}")),
                },
                (_, '\n') => return Err("raw newline in a label value".into()),
                (_, c) => value.push(c),
            }
        };
        if labels.insert(name.to_owned(), value).is_some() {
            return Err(format!("label {name} given twice"));
        }
        rest = &after[end + 1..];
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
        } else if !rest.starts_with('}') {
            return Err("labels must be separated by commas".into());
        }
    }
}

/// The text exposition format 0.0.4, strictly and as shoal writes it: `# HELP` then
/// `# TYPE` for each family, declared once, then its samples (no timestamps, no other
/// comments, no blank lines); every sample belongs to the family declared last; counters
/// end in `_total` and never go negative; no sample is given twice.
fn parse(text: &str) -> Result<Scrape, String> {
    let mut scrape = Scrape::default();
    let body = text
        .strip_suffix('\n')
        .ok_or("the exposition must end with a newline")?;
    let mut current: Option<String> = None;
    let mut lines = body.split('\n').enumerate().peekable();
    while let Some((number, line)) = lines.next() {
        let context = |e: String| format!("line {}: {e}: {line:?}", number + 1);
        if let Some(help) = line.strip_prefix("# HELP ") {
            let (name, _text) = help.split_once(' ').unwrap_or((help, ""));
            if !valid_name(name, true) {
                return Err(context("bad metric name".into()));
            }
            if scrape.families.contains_key(name) {
                return Err(context("family declared twice".into()));
            }
            let (_, type_line) = lines
                .next()
                .ok_or_else(|| context("HELP without TYPE".into()))?;
            let kind = type_line
                .strip_prefix(&format!("# TYPE {name} "))
                .ok_or_else(|| context(format!("TYPE of {name} must follow its HELP")))?;
            if !["counter", "gauge"].contains(&kind) {
                return Err(context(format!("unexpected type {kind}")));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(context("a counter's name must end in _total".into()));
            }
            scrape.families.insert(
                name.to_owned(),
                Family {
                    kind: kind.to_owned(),
                },
            );
            current = Some(name.to_owned());
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(context("unexpected comment or blank line".into()));
        }
        let name_end = line
            .find(['{', ' '])
            .ok_or_else(|| context("no value".into()))?;
        let name = &line[..name_end];
        let (labels, rest) = if line[name_end..].starts_with('{') {
            parse_labels(&line[name_end..]).map_err(context)?
        } else {
            (BTreeMap::new(), &line[name_end..])
        };
        let value = rest
            .strip_prefix(' ')
            .ok_or_else(|| context("one space before the value".into()))?;
        if value.contains(' ') {
            return Err(context("timestamps or extra fields".into()));
        }
        let value = parse_value(value).map_err(context)?;
        if current.as_deref() != Some(name) {
            return Err(context(format!(
                "sample of {name} outside its family's block ({current:?})"
            )));
        }
        if scrape.families[name].kind == "counter" && (value < 0.0 || value.is_nan()) {
            return Err(context("a counter must be a number, at least 0".into()));
        }
        let sample = Sample {
            name: name.to_owned(),
            labels,
            value,
        };
        if scrape
            .samples
            .iter()
            .any(|s| s.name == sample.name && s.labels == sample.labels)
        {
            return Err(context("sample given twice".into()));
        }
        scrape.samples.push(sample);
    }
    Ok(scrape)
}

/// `curl` inside the node's namespace: (HTTP status, content type, body).
fn get(lab: &TestLab, node: &str, path: &str) -> (u16, String, String) {
    let url = format!("{ENDPOINT}{path}");
    let out = lab.exec(
        node,
        &[
            "curl",
            "-s",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code} %{content_type}",
            &url,
        ],
    );
    let (body, tail) = out.rsplit_once('\n').expect("curl's status line");
    let (code, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    (
        code.parse().expect("an HTTP status"),
        content_type.to_owned(),
        body.to_owned(),
    )
}

fn scrape(lab: &TestLab, node: &str) -> Scrape {
    let (code, content_type, body) = get(lab, node, "/metrics");
    assert_eq!(code, 200, "{body}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    parse(&body).unwrap_or_else(|e| panic!("{node}'s metrics are not valid: {e}\n{body}"))
}

#[test]
fn nodes_export_real_metrics_and_health() {
    let lab = TestLab::up("e2e-metrics", 2);
    let nodes = ["node1", "node2"];
    for node in nodes {
        let (code, _, body) = get(&lab, node, "/healthz");
        assert_eq!((code, body.as_str()), (200, "ok\n"), "{node}");
        wait_for(&format!("{node} ready"), Duration::from_secs(15), || {
            (get(&lab, node, "/readyz").0 == 200).then_some(())
        });
        let (code, _, _) = get(&lab, node, "/nope");
        assert_eq!(code, 404);
    }

    // Gossip: both nodes see both alive.
    for node in nodes {
        wait_for(
            &format!("{node} sees 2 gossip members alive"),
            Duration::from_secs(15),
            || {
                let m = scrape(&lab, node);
                (m.has("shoal_gossip_members")
                    && m.value("shoal_gossip_members", &[("state", "alive")]) == 2.0)
                    .then_some(())
            },
        );
    }

    let client_version = lab.node_json("node1", &["version"])["client"]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    let scrapes: Vec<Scrape> = nodes.iter().map(|n| scrape(&lab, n)).collect();
    for (node, m) in nodes.iter().zip(&scrapes) {
        assert_eq!(
            m.value("shoal_build_info", &[("version", &client_version)]),
            1.0
        );
        assert_eq!(
            m.value(
                "shoal_dataplane_program_attached",
                &[("program", "shoal_ingress"), ("interface", "eth0")]
            ),
            1.0,
            "{node}"
        );
        // Gossip and heartbeats reach every node on its control ports.
        assert!(
            m.value(
                "shoal_dataplane_ingress_packets_total",
                &[("verdict", "control")]
            ) > 0.0
        );
        assert!(m.value("shoal_gossip_packets_total", &[("direction", "received")]) > 0.0);
        assert_eq!(
            m.value(
                "shoal_gossip_dropped_packets_total",
                &[("reason", "auth_failure")]
            ),
            0.0
        );
        for collector in m.find("shoal_scrape_collector_success", &[]) {
            assert_eq!(collector.value, 1.0, "{node}: {collector:?}");
        }
        // The kernel's neighbour table, read in the initial namespace from the node's.
        let kernel = std::fs::read_to_string("/proc/net/stat/arp_cache").unwrap();
        let kernel = shoal_dataplane::neighbours::parse_arp_cache(&kernel).unwrap();
        assert!(
            m.value("shoal_neighbour_table_entries", &[]) > 0.0,
            "{node}"
        );
        let fulls = m.value("shoal_neighbour_table_fulls_total", &[]);
        assert!(fulls <= kernel.table_fulls as f64, "{node}: {fulls}");
        let demand = m.value("shoal_neighbour_table_demand_entries", &[("scope", "node")]);
        assert!(demand >= 16.0, "{node}: {demand}");
        let hard = m.value(
            "shoal_neighbour_table_threshold",
            &[("threshold", "gc_thresh3")],
        );
        assert!(
            hard >= 2.0 * demand,
            "{node}: gc_thresh3 {hard} for {demand}"
        );
        let status = lab.node_json(node, &["dataplane", "status"]);
        assert_eq!(status["neighbour_table"]["overflowing"], false, "{node}");
        assert!(
            status["neighbour_table"]["entries"].as_u64() > Some(0),
            "{status}"
        );
    }
    // Raft: node1 is the only manager, and it leads; the worker has no Raft at all.
    let leaders: f64 = scrapes
        .iter()
        .filter(|m| m.has("shoal_raft_is_leader"))
        .map(|m| m.value("shoal_raft_is_leader", &[]))
        .sum();
    assert_eq!(leaders, 1.0);
    assert_eq!(scrapes[0].value("shoal_raft_is_leader", &[]), 1.0);
    assert!(scrapes[0].value("shoal_raft_last_applied_index", &[]) >= 1.0);
    assert!(!scrapes[1].has("shoal_raft_is_leader"));
    assert_eq!(
        scrapes[1].value("shoal_swarm_node_info", &[("role", "worker")]),
        1.0
    );

    // Tasks, VIPs and DNS follow a service.
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    let whoami = ["shoal", "whoami", "--listen", "0.0.0.0:80"];
    lab.create_service("web", &["--replicas", "3", "--network", "front"], &whoami);
    let tasks = lab.running_tasks("web", 3);
    for node in nodes {
        let here = tasks.iter().filter(|t| t.node == node).count() as f64;
        wait_for(
            &format!("{node} reports {here} running tasks and web's VIP"),
            Duration::from_secs(10),
            || {
                let m = scrape(&lab, node);
                let running = m.value("shoal_tasks", &[("state", "running")]);
                let backends = m.find("shoal_lb_vip_backends", &[("service", "web")]);
                let vip_ok = here == 0.0 || backends.first().is_some_and(|b| b.value == 3.0);
                (running == here && vip_ok).then_some(())
            },
        );
    }
    let asker = &tasks[0];
    let before = scrape(&lab, &asker.node).value(
        "shoal_dns_queries_total",
        &[("outcome", "answered_locally")],
    );
    let out = lab.in_task(asker, &["getent", "ahostsv4", "web"]);
    assert!(out.status.success(), "{out:?}");
    let after = scrape(&lab, &asker.node).value(
        "shoal_dns_queries_total",
        &[("outcome", "answered_locally")],
    );
    assert!(after > before, "DNS answers counted: {before} -> {after}");
    let m = scrape(&lab, &asker.node);
    let front: serde_json::Value = serde_json::from_str(&lab.exec(
        "node1",
        &["shoal", "network", "inspect", "front", "--format", "json"],
    ))
    .unwrap();
    let front_id = front["id"].as_str().unwrap();
    let live = m
        .find(
            "shoal_gossip_table_entries",
            &[("network_id", front_id), ("state", "live")],
        )
        .iter()
        .map(|s| s.value)
        .sum::<f64>();
    assert_eq!(live, 3.0, "web's 3 endpoints in the front table");

    // With the only manager gone, the worker stays healthy (its tasks run) but not ready.
    lab.ok(&["stop", "node1"]);
    wait_for("node2 not ready", Duration::from_secs(15), || {
        let (code, _, body) = get(&lab, "node2", "/readyz");
        (code == 503 && body.contains("heartbeat")).then_some(())
    });
    assert_eq!(get(&lab, "node2", "/healthz").0, 200);
    lab.down_clean();
}

#[test]
fn the_parser_is_strict() {
    let good = "# HELP a_total A\n# TYPE a_total counter\na_total{x=\"q\\\"\\\\\\n\"} 1\n\
                # HELP b B\n# TYPE b gauge\nb -1.5e3\nb{y=\"\"} NaN\n";
    let m = parse(good).unwrap();
    assert_eq!(m.value("a_total", &[("x", "q\"\\\n")]), 1.0);
    assert!(m.value("b", &[("y", "")]).is_nan());
    for bad in [
        "a 1\n",                                                         // no family
        "# HELP a A\n# TYPE a gauge\na 1",                               // no final newline
        "# HELP a A\n# TYPE a counter\na 1\n",                           // counter without _total
        "# HELP a A\n# TYPE a gauge\na{x=\"1\"} 1 123\n",                // timestamp
        "# HELP a A\n# TYPE a gauge\na{x=\"\\t\"} 1\n",                  // bad escape
        "# HELP a A\n# TYPE a gauge\na{x=\"1\" 1\n",                     // unterminated labels
        "# HELP a A\n# TYPE a gauge\na 1\na 2\n",                        // duplicate sample
        "# HELP a A\n# TYPE a gauge\na one\n",                           // not a number
        "# HELP a A\n# TYPE a gauge\n# HELP a A\n# TYPE a gauge\n",      // declared twice
        "# HELP a A\n# TYPE a gauge\n# HELP b B\n# TYPE b gauge\na 1\n", // outside its block
    ] {
        assert!(parse(bad).is_err(), "accepted: {bad:?}");
    }
}
