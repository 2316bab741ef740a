//! The docs cannot rot: every read-only `shoal` command written in the README and `docs/`
//! (in code blocks and in inline code) runs against a lab with the docs' own names (a network
//! `front`, a service `web` publishing 8080) and must succeed. Commands that change the swarm
//! (create, scale, update, rm, drain, init, join) are played by `shoal lab demo` and the
//! end-to-end tests; every command, of either kind, is parsed by the CLI's own unit test
//! (`control`'s docs test). Needs root.

use std::{fs, path::Path};

use shoal_tests::TestLab;

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

/// A command as the docs write it: the lab node it is shown on (if the docs say), and the
/// words after `shoal`.
#[derive(Debug, PartialEq)]
struct DocCommand {
    source: String,
    /// In inline code, where prose may name a command without its arguments.
    inline: bool,
    node: Option<String>,
    words: Vec<String>,
}

/// Every `shoal` command in a Markdown text: lines of fenced blocks and inline code spans.
fn commands_in(source: &str, text: &str) -> Vec<DocCommand> {
    let mut found = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            found.extend(command_of(source, line, false));
        } else {
            let spans = line.split('`').skip(1).step_by(2);
            found.extend(spans.filter_map(|span| command_of(source, span, true)));
        }
    }
    found
}

/// The command on one line or code span, without prompt, lab prefix, comment and optional
/// `[...]` parts.
fn command_of(source: &str, line: &str, inline: bool) -> Option<DocCommand> {
    let line = line.split(" #").next()?.trim();
    let line = line
        .strip_prefix("$ ")
        .or_else(|| line.strip_prefix("sudo "))
        .unwrap_or(line);
    let (node, rest) = if let Some(rest) = line.strip_prefix("s1 shoal ") {
        (Some("node1".to_owned()), rest)
    } else if let Some(rest) = line
        .strip_prefix("$shoal lab exec ")
        .or_else(|| line.strip_prefix("shoal lab exec "))
    {
        let (node, command) = rest.split_once(" -- shoal ")?;
        (Some(node.to_owned()), command)
    } else {
        (None, line.strip_prefix("shoal ")?)
    };
    let mut words = Vec::new();
    let mut optional = 0;
    for word in rest.split_whitespace() {
        optional += word.matches('[').count();
        if optional == 0 {
            words.push(word.to_owned());
        }
        optional -= word.matches(']').count();
    }
    Some(DocCommand {
        source: source.to_owned(),
        inline,
        node,
        words,
    })
}

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

/// `line` with every task of `web` the docs name (`web.N.<id>`) replaced by `task`, and
/// whether there was one.
fn fill_task(line: &str, task: &str) -> (String, bool) {
    let mut named = false;
    let words = line.split(' ').map(|word| {
        let slot = word
            .strip_prefix("web.")
            .and_then(|w| w.strip_suffix(".<id>"));
        if slot.is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            named = true;
            task
        } else {
            word
        }
    });
    let line = words.collect::<Vec<_>>().join(" ");
    (line, named)
}

fn documented_commands() -> Vec<DocCommand> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = vec![root.join("README.md")];
    for dir in ["docs", "docs/paths"] {
        for entry in fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .iter()
        .flat_map(|path| {
            let name = path.strip_prefix(&root).unwrap().display().to_string();
            commands_in(&name, &fs::read_to_string(path).unwrap())
        })
        .collect()
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
}

#[test]
fn every_read_only_command_in_the_docs_runs_in_a_lab() {
    let commands: Vec<DocCommand> = documented_commands()
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
