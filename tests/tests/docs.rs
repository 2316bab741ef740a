//! The docs cannot rot: every read-only `shoal` command written in the README and `docs/`
//! (in code blocks and in inline code) runs against a lab with the docs' own names (a network
//! `front`, a service `web` publishing 8080) and must succeed. Commands that change the swarm
//! (create, scale, update, rm, drain, init, join) are played by `shoal lab demo` and the
//! end-to-end tests; every command, of either kind, is parsed by the CLI's own unit test
//! (`control`'s docs test). Needs root.

use std::path::Path;

use shoal_tests::TestLab;

#[path = "../../control/src/doc_commands.rs"]
mod doc_commands;

use doc_commands::{command_of, commands_in, documented_commands, fill_task, DocCommand};

/// Subcommands that only read state, and may run as often as the test likes.
const READ_ONLY: [&[&str]; 21] = [
    &["version"],
    &["info"],
    &["dataplane", "status"],
    &["node", "ls"],
    &["node", "inspect"],
    &["node", "ps"],
    &["service", "ls"],
    &["service", "ps"],
    &["service", "inspect"],
    &["service", "logs"],
    &["network", "ls"],
    &["network", "inspect"],
    &["gossip", "members"],
    &["gossip", "tables"],
    &["lb", "ls"],
    &["dns", "lookup"],
    &["dns", "stats"],
    &["ingress", "ls"],
    &["ingress", "trace"],
    &["conntrack", "ls"],
    &["task", "exec"],
];

/// Programs a documented `task exec` may run: they only look.
const TASK_PROGRAMS: [&str; 4] = ["ip", "ss", "getent", "curl"];

fn read_only(command: &DocCommand) -> bool {
    let words: Vec<&str> = command.words.iter().map(String::as_str).collect();
    READ_ONLY.iter().any(|prefix| words.starts_with(prefix))
        && (words.first() != Some(&"task")
            || words
                .iter()
                .position(|w| *w == "--")
                .and_then(|i| words.get(i + 1))
                .is_some_and(|program| TASK_PROGRAMS.contains(program)))
}

#[test]
fn commands_are_found_in_blocks_and_spans_with_their_node() {
    let text = "Run `shoal lb ls web` or:\n```sh\ns1 shoal node ls   # the nodes\n\
                $shoal lab exec node2 -- shoal dataplane status [--format json]\n\
                shoal service logs web [--tail N]\nip route\n```\n";
    let words = |c: &DocCommand| c.words.join(" ");
    let found = commands_in("t.md", text);
    assert_eq!(
        found.iter().map(words).collect::<Vec<_>>(),
        [
            "lb ls web",
            "node ls",
            "dataplane status",
            "service logs web"
        ]
    );
    assert_eq!(found[1].node.as_deref(), Some("node1"));
    assert_eq!(found[2].node.as_deref(), Some("node2"));
    assert!(found.iter().all(read_only));
    let exec = |line: &str| read_only(&command_of("t.md", line, false).unwrap());
    assert!(exec("shoal task exec web.1.<id> -- ip rule"));
    assert!(!exec("shoal task exec web.1.<id> -- sh"));
    assert!(!exec("shoal service rm web"));
    // The README's `$shoal` and the built binary are commands too; lab ones are not read-only.
    for line in [
        "$shoal lab up --nodes 3   # node1..3",
        "target/release/shoal lab down",
        "$ sudo shoal lab exec client -- curl -s 192.168.77.13:8080",
    ] {
        let command = command_of("t.md", line, false).unwrap();
        assert_eq!(command.node, None, "{line}");
        assert!(command.words.starts_with(&["lab".to_owned()]), "{line}");
        assert!(!read_only(&command), "{line}");
    }
}

#[test]
fn every_read_only_command_in_the_docs_runs_in_a_lab() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let commands: Vec<DocCommand> = documented_commands(&root)
        .into_iter()
        .filter(read_only)
        .collect();
    // The docs show far more than this; fewer means the extraction broke.
    assert!(
        commands.len() >= 30,
        "only {} commands found",
        commands.len()
    );

    for command in &commands {
        let (line, _) = fill_task(&command.words.join(" "), "web.1.x");
        assert!(
            !line.contains('<'),
            "{}: `shoal {line}` has a placeholder the test cannot fill; write a real value",
            command.source
        );
    }

    let lab = TestLab::up("docs", 3);
    lab.exec("node1", &["shoal", "network", "create", "front"]);
    lab.create_service(
        "web",
        &[
            "--replicas",
            "3",
            "--network",
            "front",
            "--publish",
            "8080:8080",
        ],
        &["shoal", "whoami", "--listen", "0.0.0.0:8080"],
    );
    let tasks = lab.running_tasks("web", 3);
    // Commands naming a task run on its node: `task exec` and `dns lookup --task` are local.
    let task = tasks
        .iter()
        .find(|t| t.node == "node1")
        .unwrap_or(&tasks[0]);

    let mut failures = Vec::new();
    for command in &commands {
        let (line, names_task) = fill_task(&command.words.join(" "), &task.name);
        let node = if names_task {
            task.node.clone()
        } else {
            command.node.clone().unwrap_or_else(|| "node1".to_owned())
        };
        let mut args = vec!["exec", node.as_str(), "--", "shoal"];
        args.extend(line.split(' '));
        let out = lab.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mentioned = command.inline
            && out.status.code() == Some(2)
            && stderr.contains("required arguments were not provided");
        if !out.status.success() && !mentioned {
            failures.push(format!(
                "{} on {node}: shoal {line}\n  {}",
                command.source,
                stderr.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "documented commands failed:\n{}",
        failures.join("\n")
    );
    lab.down_clean();
}
