//! The local API's error answers: each kind of failure has its HTTP status and names its kind
//! in the body, so a script can tell "no such service" from "conflict" from "not a manager".
//! Needs root and curl.

use serde_json::Value;
use shoal_tests::{require_tools, TestLab};

/// `METHOD PATH` with `body` on `node`'s agent socket: the status and the JSON answer.
fn call(lab: &TestLab, node: &str, method: &str, path: &str, body: &str) -> (u16, Value) {
    let script = format!(
        "curl -s -X {method} -H 'content-type: application/json' --data-binary @- \
         -w '\\n%{{http_code}}' --unix-socket \"$SHOAL_SOCKET\" http://shoal{path} <<'EOF'\n\
         {body}\nEOF"
    );
    let out = lab.exec(node, &["sh", "-c", &script]);
    let (answer, status) = out.trim_end().rsplit_once('\n').expect("body and status");
    let answer = serde_json::from_str(answer).unwrap_or(Value::Null);
    (status.parse().expect("status"), answer)
}

fn control(lab: &TestLab, node: &str, request: &str) -> (u16, Value) {
    call(lab, node, "POST", "/v1/control", request)
}

/// The status and kind of an error answer, its message printed for the log.
fn refusal((status, body): (u16, Value)) -> (u16, String) {
    eprintln!("{status} {body}");
    assert!(
        body["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{body}"
    );
    (status, body["kind"].as_str().unwrap_or_default().to_owned())
}

#[test]
fn each_kind_of_error_has_its_status() {
    require_tools(&["curl"]);
    let lab = TestLab::up("api-errors", 2);

    // Reads and writes that work answer 200.
    let (status, nodes) = control(&lab, "node1", r#""NodeList""#);
    assert_eq!(status, 200, "{nodes}");

    // No such service, node or endpoint: 404.
    let missing = refusal(control(
        &lab,
        "node1",
        r#"{"ServiceInspect":{"service":"nope"}}"#,
    ));
    assert_eq!(missing, (404, "not_found".into()));
    let missing = refusal(call(&lab, "node1", "GET", "/v1/nope", ""));
    assert_eq!(missing, (404, "not_found".into()));

    // A name in use, refused by the state machine after Raft ordered it: 409.
    let network = |name: &str| {
        format!(
            r#"{{"NetworkCreate":{{"name":"{name}","subnet":null,"gateway":null,"attachable":false,"internal":false,"mtu":null}}}}"#
        )
    };
    let taken = refusal(control(&lab, "node1", &network("ingress")));
    assert_eq!(taken, (409, "conflict".into()));
    let joined = refusal(call(
        &lab,
        "node1",
        "POST",
        "/v1/swarm/init",
        r#"{"advertise_addr":null,"force_new_cluster":false,"default_addr_pool":null,"default_addr_pool_mask_length":null,"data_path_port":null}"#,
    ));
    assert_eq!(joined, (409, "conflict".into()), "already in a swarm");

    // Bad input: 400.
    let bad = refusal(control(&lab, "node1", &network("bad name")));
    assert_eq!(bad, (400, "invalid".into()));

    // A worker asked for what only managers hold: 503 (ask another node).
    let worker = refusal(control(&lab, "node2", r#""ServiceList""#));
    assert_eq!(worker, (503, "unavailable".into()));

    // The CLI prints the same message as before, whatever the status.
    let out = lab.run(&["exec", "node1", "--", "shoal", "service", "inspect", "nope"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|line| line
            == "shoal: service nope not found: `shoal service ls` lists them (by name, ID or ID prefix)"),
        "{stderr}"
    );
    lab.down_clean();
}
