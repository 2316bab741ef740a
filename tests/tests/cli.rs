//! The CLI's answers when something is wrong: one line that says what to do.

use std::fs;

use shoal_tests::shoal;

fn stderr_of(args: &[&str]) -> String {
    let out = shoal(args);
    assert!(!out.status.success(), "shoal {args:?} should fail");
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn no_agent_running_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    for command in [&["version"][..], &["info"], &["dataplane", "status"]] {
        let mut args = vec!["--socket", socket.to_str().unwrap()];
        args.extend_from_slice(command);
        let stderr = stderr_of(&args);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("shoal: no shoal agent is answering on "),
            "{stderr}"
        );
        assert!(stderr.contains("SHOAL_SOCKET"), "{stderr}");
    }
}

#[test]
fn bad_agent_config_is_refused_before_anything_starts() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    fs::write(&config, "gossip_prot = 7946\n").unwrap();
    let stderr = stderr_of(&["agent", "--config", config.to_str().unwrap()]);
    assert!(stderr.contains("invalid config file"), "{stderr}");
    assert!(stderr.contains("unknown field `gossip_prot`"), "{stderr}");

    let missing = dir.path().join("missing.toml");
    let stderr = stderr_of(&["agent", "--config", missing.to_str().unwrap()]);
    assert!(
        stderr.contains("reading") && stderr.contains("missing.toml"),
        "{stderr}"
    );

    let stderr = stderr_of(&[
        "agent",
        "--config",
        config.to_str().unwrap(),
        "--gossip-port",
        "4789",
    ]);
    assert!(
        stderr.contains("invalid config file"),
        "file errors come first: {stderr}"
    );
}

#[test]
fn bad_lab_names_and_sizes_are_refused() {
    let stderr = stderr_of(&["lab", "--name", "Bad/Name", "status"]);
    assert!(stderr.contains("must be 1-16 characters"), "{stderr}");
    let out = shoal(&["lab", "--name", "nope", "up", "--nodes", "0"]);
    assert_eq!(out.status.code(), Some(2), "clap refuses it as usage");
    let stderr = stderr_of(&["lab", "--name", "never-made", "status"]);
    assert!(stderr.contains("is not up"), "{stderr}");
}

#[test]
fn completion_scripts_know_the_subcommands() {
    let bash = shoal_tests::shoal_ok(&["completion", "bash"]);
    for word in [
        "swarm",
        "service",
        "network",
        "lab",
        "dataplane",
        "--metrics-addr",
    ] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    // The script loads in bash and registers itself for `shoal`.
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("shoal.bash");
    fs::write(&script, &bash).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p shoal", script.display()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("_shoal"));

    assert!(shoal_tests::shoal_ok(&["completion", "zsh"]).starts_with("#compdef shoal"));
    assert!(shoal_tests::shoal_ok(&["completion", "fish"]).contains("complete -c shoal"));
    let out = shoal(&["completion", "tcsh"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

/// Every command that lists or shows state offers the same `--format table|json`, as its
/// help says (no agent needed).
#[test]
fn listings_offer_format_table_or_json() {
    const LISTINGS: [&[&str]; 20] = [
        &["version"],
        &["info"],
        &["node", "ls"],
        &["node", "inspect"],
        &["node", "ps"],
        &["service", "ls"],
        &["service", "ps"],
        &["service", "inspect"],
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
        &["dataplane", "status"],
        &["lab", "status"],
    ];
    for command in LISTINGS {
        let help = shoal_tests::shoal_ok(&[command, &["--help"]].concat());
        // The option's text: one line in short help, a paragraph in long help.
        let mut lines = help
            .lines()
            .map(str::trim)
            .skip_while(|line| !line.starts_with("--format <FORMAT>"));
        let first = lines.next().unwrap_or_default();
        let more = lines.take_while(|line| !line.is_empty() && !line.starts_with('-'));
        let format = more.fold(first.to_owned(), |text, line| text + " " + line);
        assert!(
            format.contains("[possible values: table, json]"),
            "shoal {command:?} has no --format table|json:\n{help}"
        );
    }
}

/// A bad `--publish` is a usage error (2) caught before any agent is asked, naming the form.
#[test]
fn bad_publish_spec_shows_the_form() {
    for (spec, expected) in [
        ("8080", "expected PUBLISHED:TARGET[/udp] (e.g. 8080:80)"),
        ("8080:0", "is not a port (1-65535)"),
        ("8080:80/sctp", "expected tcp or udp"),
        ("published=80,taget=8", "unknown field \"taget\""),
    ] {
        let out = shoal(&[
            "service",
            "create",
            "--name",
            "web",
            "--publish",
            spec,
            "--",
            "x",
        ]);
        assert_eq!(out.status.code(), Some(2), "{spec}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains(expected), "{spec}: {stderr}");
    }
}
