//! `--help` examples, one entry per command, kept in one table so a test can check that every
//! command has some and that every one of them still parses.

use clap::Command;

/// (command path, example lines). Every visible command has an entry: `""` is `shoal` itself,
/// a group's examples show its most common subcommands.
const EXAMPLES: &[(&str, &str)] = &[
    (
        "",
        "shoal swarm init --advertise-addr 192.168.56.10\n\
         shoal service create --name web --replicas 3 --publish 8080:80 -- shoal whoami\n\
         shoal service ps web",
    ),
    (
        "agent",
        "shoal agent --config /etc/shoal/agent.toml\n\
         shoal agent --advertise-addr 192.168.56.10 --metrics-addr 127.0.0.1:9323",
    ),
    ("version", "shoal version\nshoal version --format json"),
    ("info", "shoal info\nshoal info --format json"),
    (
        "swarm",
        "shoal swarm init --advertise-addr 192.168.56.10\n\
         shoal swarm join-token worker\nshoal swarm leave",
    ),
    (
        "swarm init",
        "shoal swarm init --advertise-addr 192.168.56.10\n\
         shoal swarm init --default-addr-pool 10.20.0.0/16 --default-addr-pool-mask-length 24\n\
         shoal swarm init --force-new-cluster",
    ),
    (
        "swarm join",
        "shoal swarm join --token SWMTKN-1-3pu6hszjas19xyp7ghgosyx9k8atbfcr8p2is99znpy26u2lkl-1awxwuwd3z9j1z3puu7rcgdbx 192.168.56.10:2377",
    ),
    (
        "swarm join-token",
        "shoal swarm join-token worker\nshoal swarm join-token -q manager\n\
         shoal swarm join-token --rotate worker",
    ),
    ("swarm update", "shoal swarm update --rotate-gossip-key"),
    ("swarm leave", "shoal swarm leave\nshoal swarm leave --force"),
    (
        "node",
        "shoal node ls\nshoal node update --availability drain node2\nshoal node ps node2",
    ),
    ("node ls", "shoal node ls\nshoal node ls --format json"),
    (
        "node inspect",
        "shoal node inspect self --pretty\nshoal node inspect node2 --format table\n\
         shoal node inspect node1 --format '{{ .ManagerStatus.Reachability }}'",
    ),
    (
        "node update",
        "shoal node update --availability drain node2\n\
         shoal node update --label-add zone=a node3\nshoal node update --role manager node2",
    ),
    ("node promote", "shoal node promote node2 node3"),
    ("node demote", "shoal node demote node3"),
    ("node rm", "shoal node rm node3\nshoal node rm --force node3"),
    (
        "node ps",
        "shoal node ps\nshoal node ps node2 --format json",
    ),
    (
        "service",
        "shoal service create --name web --replicas 3 --network front --publish 8080:80 -- shoal whoami\n\
         shoal service scale web=5\nshoal service ps web",
    ),
    (
        "service create",
        "shoal service create --name web --replicas 3 --network front --publish 8080:80 -- shoal whoami\n\
         shoal service create --name dns --mode global --publish 53:53/udp -- my-resolver\n\
         shoal service create --name api --network front --publish published=9090,target=90,source=snat --constraint node.labels.zone==a -- ./api\n\
         shoal service create --name job --user nobody --cap-drop ALL --limit-memory 512M --limit-cpu 1.5 --reserve-cpu 0.5 -- ./job\n\
         shoal service create --name once --restart-condition on-failure --restart-max-attempts 3 --restart-delay 1m30s -- ./migrate",
    ),
    (
        "service ls",
        "shoal service ls\nshoal service ls --format json\n\
         shoal service ls --format 'table {{.Name}}\\t{{.Replicas}}'",
    ),
    (
        "service ps",
        "shoal service ps web\nshoal service ps web --format json",
    ),
    (
        "service inspect",
        "shoal service inspect web\nshoal service inspect web --pretty\n\
         shoal service inspect web --format '{{json .Endpoint.Spec.Ports}}'",
    ),
    (
        "service scale",
        "shoal service scale web=5\nshoal service scale web=2 api=4 --detach",
    ),
    (
        "service update",
        "shoal service update --replicas 4 web\n\
         shoal service update --publish-add 8443:443 --publish-rm 8080 web\n\
         shoal service update --env-add LOG=debug --network-add back web\n\
         shoal service update --limit-memory 1G --cap-add NET_ADMIN web\n\
         shoal service update --env-add V=2 --update-order start-first --update-failure-action rollback web\n\
         shoal service update --rollback web",
    ),
    (
        "service rollback",
        "shoal service rollback web\nshoal service rollback --detach web",
    ),
    (
        "service logs",
        "shoal service logs web\nshoal service logs web --tail 20",
    ),
    ("service rm", "shoal service rm web api"),
    (
        "network",
        "shoal network create front\nshoal network ls\nshoal network inspect front",
    ),
    (
        "network create",
        "shoal network create front\n\
         shoal network create --subnet 10.30.0.0/24 --opt mtu=1400 --internal back",
    ),
    ("network ls", "shoal network ls\nshoal network ls --format json"),
    ("network inspect", "shoal network inspect front\nshoal network inspect ingress --pretty"),
    ("network rm", "shoal network rm back"),
    (
        "task",
        "shoal task exec web.1.pq8sp0ctahwlmq8ia29o6zl4r -- ip addr\nshoal task inspect web.1",
    ),
    (
        "task inspect",
        "shoal task inspect web.1\nshoal task inspect pq8sp0ctahwl --pretty",
    ),
    (
        "task exec",
        "shoal task exec web.1.pq8sp0ctahwlmq8ia29o6zl4r -- ip addr\n\
         shoal task exec pq8sp0ctahwl -- getent hosts tasks.web",
    ),
    (
        "task inspect",
        "shoal task inspect web.1\nshoal task inspect pq8sp0ctahwl --format '{{.Status.State}}'",
    ),
    ("gossip", "shoal gossip members\nshoal gossip tables front"),
    (
        "gossip members",
        "shoal gossip members\nshoal gossip members --format json",
    ),
    (
        "gossip tables",
        "shoal gossip tables front\nshoal gossip tables ingress --format json",
    ),
    ("lb", "shoal lb ls\nshoal lb ls web"),
    ("lb ls", "shoal lb ls\nshoal lb ls web --format json"),
    (
        "dns",
        "shoal dns lookup web --task web.1.pq8sp0ctahwlmq8ia29o6zl4r\nshoal dns stats",
    ),
    (
        "dns lookup",
        "shoal dns lookup web --task web.1.pq8sp0ctahwlmq8ia29o6zl4r\n\
         shoal dns lookup tasks.web --task pq8sp0ctahwl --format json",
    ),
    ("dns stats", "shoal dns stats\nshoal dns stats --format json"),
    (
        "ingress",
        "shoal ingress ls\nshoal ingress trace --dst 192.168.77.11:8080 --src 192.168.77.100:40000",
    ),
    ("ingress ls", "shoal ingress ls\nshoal ingress ls --format json"),
    (
        "ingress trace",
        "shoal ingress trace --dst 192.168.77.11:8080 --src 192.168.77.100:40000\n\
         shoal ingress trace --proto udp --dst 192.168.77.11:53 --src 192.168.77.100:5353 --format json",
    ),
    (
        "conntrack",
        "shoal conntrack ls\nshoal conntrack ls --format json",
    ),
    (
        "conntrack ls",
        "shoal conntrack ls\nshoal conntrack ls --format json",
    ),
    (
        "whoami",
        "shoal whoami --listen 0.0.0.0:8080",
    ),
    (
        "dataplane",
        "shoal dataplane status",
    ),
    (
        "dataplane status",
        "shoal dataplane status\nshoal dataplane status --format json",
    ),
    (
        "completion",
        "source <(shoal completion bash)\nshoal completion zsh > \"${fpath[1]}/_shoal\"",
    ),
    (
        "lab",
        "shoal lab up --nodes 3\nshoal lab exec node1 -- shoal node ls\nshoal lab down",
    ),
    (
        "lab up",
        "shoal lab up\nshoal lab up --nodes 5 --managers 3\nshoal lab --name ci up --nodes 2",
    ),
    ("lab down", "shoal lab down\nshoal lab --name ci down"),
    ("lab status", "shoal lab status\nshoal lab status --format json"),
    (
        "lab exec",
        "shoal lab exec node1 -- shoal node ls\nshoal lab exec client -- curl -s 192.168.77.12:8080",
    ),
    ("lab stop", "shoal lab stop node2\nshoal lab stop node2 --kill"),
    ("lab start", "shoal lab start node2"),
    ("lab demo", "shoal lab demo\nshoal lab --name tour demo"),
];

/// `command` with each command's examples as the end of its `--help`.
pub fn with_examples(command: Command) -> Command {
    add(command, "")
}

fn add(mut command: Command, path: &str) -> Command {
    if let Some((_, lines)) = EXAMPLES.iter().find(|(p, _)| *p == path) {
        let indented: Vec<String> = lines.lines().map(|l| format!("  {l}")).collect();
        command = command.after_help(format!("Examples:\n{}", indented.join("\n")));
    }
    let names: Vec<String> = command
        .get_subcommands()
        .map(|sub| sub.get_name().to_owned())
        .collect();
    for name in names {
        let sub_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path} {name}")
        };
        command = command.mut_subcommand(&name, |sub| add(sub, &sub_path));
    }
    command
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    /// Every visible command under `command` (groups and `command` itself too), by path.
    fn commands<'a>(command: &'a Command, path: &str, out: &mut Vec<(String, &'a Command)>) {
        out.push((path.to_owned(), command));
        for sub in command.get_subcommands() {
            if sub.is_hide_set() || sub.get_name() == "help" {
                continue;
            }
            let sub_path = format!("{path} {}", sub.get_name());
            commands(sub, sub_path.trim_start(), out);
        }
    }

    /// Paths of every visible command that takes no subcommand.
    fn leaves(cli: &Command) -> Vec<String> {
        let mut all = Vec::new();
        commands(cli, "", &mut all);
        all.into_iter()
            .filter(|(_, command)| !command.has_subcommands())
            .map(|(path, _)| path)
            .collect()
    }

    /// The `shoal` lines of a command's `--help` examples; `None` without an Examples section.
    fn examples_in_help(command: &Command) -> Option<Vec<String>> {
        let help = command.get_after_help()?.to_string();
        let examples = help.strip_prefix("Examples:\n")?;
        let lines = examples.lines().map(str::trim);
        Some(
            lines
                .filter(|l| l.contains("shoal "))
                .map(String::from)
                .collect(),
        )
    }

    /// Splits like a shell for the examples' needs: words, single and double quotes.
    fn shell_words(line: &str) -> Vec<String> {
        let mut words = Vec::new();
        let mut word = String::new();
        let mut quote = None;
        let mut in_word = false;
        for c in line.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), c) => word.push(c),
                (None, '\'' | '"') => {
                    quote = Some(c);
                    in_word = true;
                }
                (None, c) if c.is_whitespace() => {
                    if in_word {
                        words.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                }
                (None, c) => {
                    word.push(c);
                    in_word = true;
                }
            }
        }
        if in_word {
            words.push(word);
        }
        words
    }

    /// An example's `shoal` invocation, without what a shell would do around it.
    fn invocation(line: &str) -> Vec<String> {
        let line = line
            .strip_prefix("source <(")
            .map_or(line, |l| l.trim_end_matches(')'));
        let line = line.split(" > ").next().unwrap();
        shell_words(line)
    }

    /// The command an example line runs, as its path of subcommands.
    fn runs(cli: &Command, line: &str) -> Result<String, clap::Error> {
        let matches = cli.clone().try_get_matches_from(invocation(line))?;
        let mut ran = Vec::new();
        let mut next = matches.subcommand();
        while let Some((name, sub)) = next {
            ran.push(name);
            next = sub.subcommand();
        }
        Ok(ran.join(" "))
    }

    #[test]
    fn every_command_has_examples_and_every_example_parses() {
        let cli = with_examples(crate::Cli::command());
        let mut all = Vec::new();
        commands(&cli, "", &mut all);
        assert!(all.len() > 50, "only {} commands", all.len());
        for (path, command) in &all {
            let lines = examples_in_help(command)
                .unwrap_or_else(|| panic!("`shoal {path} --help` has no Examples section"));
            assert!(!lines.is_empty(), "`shoal {path}` has no example");
            for line in lines {
                let ran = runs(&cli, &line)
                    .unwrap_or_else(|err| panic!("example `{line}` does not parse:\n{err}"));
                // A group's examples run one of its subcommands.
                let own = path.is_empty() || ran == *path || ran.starts_with(&format!("{path} "));
                assert!(
                    own,
                    "an example of `shoal {path}` runs `shoal {ran}`: {line}"
                );
            }
        }
        for (path, _) in EXAMPLES {
            assert!(
                all.iter().any(|(p, _)| p == path),
                "examples of unknown `{path}`"
            );
        }
        let help = cli
            .find_subcommand("service")
            .and_then(|s| s.find_subcommand("create"))
            .unwrap()
            .get_after_help()
            .unwrap()
            .to_string();
        assert!(
            help.starts_with("Examples:\n  shoal service create --name web"),
            "{help}"
        );
    }

    /// Every command that shows state offers the same `--format table|json`.
    #[test]
    fn every_listing_takes_format_table_or_json() {
        const SHOWS_STATE: [&str; 11] = [
            "ls", "ps", "inspect", "status", "stats", "members", "tables", "trace", "lookup",
            "version", "info",
        ];
        let cli = crate::Cli::command();
        let mut checked = 0;
        for path in leaves(&cli) {
            let leaf = path.rsplit(' ').next().unwrap();
            if !SHOWS_STATE.contains(&leaf) {
                continue;
            }
            let command = path
                .split(' ')
                .try_fold(&cli, |command, name| command.find_subcommand(name))
                .unwrap();
            let format = command
                .get_arguments()
                .find(|a| a.get_id() == "format")
                .unwrap_or_else(|| panic!("`shoal {path}` has no --format"));
            let values: Vec<String> = format
                .get_possible_values()
                .iter()
                .map(|v| v.get_name().to_owned())
                .collect();
            assert_eq!(values, ["table", "json"], "`shoal {path}`");
            assert_eq!(format.get_long(), Some("format"));
            checked += 1;
        }
        assert!(checked >= 20, "only {checked} listings found");
        // `--pretty` is Docker's `--format table`: asking for both is a usage error.
        let both = [
            "shoal", "node", "inspect", "self", "--pretty", "--format", "json",
        ];
        assert!(cli.try_get_matches_from(both).is_err());
    }

    #[test]
    fn a_wrong_flag_or_command_in_an_example_is_caught() {
        let cli = with_examples(crate::Cli::command());
        assert!(runs(&cli, "shoal service scale web=5 --detatch").is_err());
        assert!(runs(&cli, "shoal service scael web=5").is_err());
        assert_eq!(
            runs(&cli, "shoal service scale web=5 -d").unwrap(),
            "service scale"
        );
    }

    /// Every `shoal` command in the README and `docs/` parses: a renamed flag or command
    /// breaks this test, not a reader's copy and paste. (`tests/tests/docs.rs` runs the
    /// read-only ones in a lab.)
    #[test]
    fn every_documented_command_parses() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let cli = with_examples(crate::Cli::command());
        let commands = crate::doc_commands::documented_commands(&root);
        assert!(
            commands.len() > 60,
            "only {} commands found",
            commands.len()
        );
        let mut broken = Vec::new();
        for command in commands {
            let (line, _) = crate::doc_commands::fill_task(&command.words.join(" "), "web.1");
            let mut words = vec!["shoal".to_owned()];
            words.extend(shell_words(&line));
            if let Err(err) = cli.clone().try_get_matches_from(&words) {
                use clap::error::ErrorKind;
                // `--help` and `--version` parse, and end in what they print.
                let prints = matches!(
                    err.kind(),
                    ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
                );
                // Prose may name a command without its arguments.
                let mention = command.inline && err.kind() == ErrorKind::MissingRequiredArgument;
                if !prints && !mention {
                    broken.push(format!("{}: shoal {line}: {}", command.source, err.kind()));
                }
            }
        }
        assert!(
            broken.is_empty(),
            "commands in the docs that do not parse:\n{}",
            broken.join("\n")
        );
    }

    #[test]
    fn shell_words_keep_quoted_text_together() {
        assert_eq!(
            shell_words(r#"shoal x "a b" 'c' d"#),
            ["shoal", "x", "a b", "c", "d"]
        );
    }
}
