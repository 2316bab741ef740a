//! The `shoal` commands written in the README and `docs/`: in code blocks and in inline
//! code, with the lab node they are shown on. Shared by the CLI's parse test (`control`) and
//! the lab test that runs them (`tests/tests/docs.rs`, which includes this file).

use std::{fs, path::Path};

/// A command as the docs write it: the lab node it is shown on (if the docs say), and the
/// words after `shoal`.
#[derive(Debug, PartialEq)]
pub struct DocCommand {
    pub source: String,
    /// In inline code, where prose may name a command without its arguments.
    pub inline: bool,
    pub node: Option<String>,
    pub words: Vec<String>,
}

/// Every `shoal` command in a Markdown text: lines of fenced blocks and inline code spans
/// (which may wrap onto the next line).
pub fn commands_in(source: &str, text: &str) -> Vec<DocCommand> {
    let mut found = Vec::new();
    let mut fenced = false;
    let mut drawing = false;
    let mut prose = String::new();
    let spans_of = |prose: &mut String, found: &mut Vec<DocCommand>| {
        let spans = prose.split('`').skip(1).step_by(2);
        found.extend(spans.filter_map(|span| command_of(source, span, true)));
        prose.clear();
    };
    for line in text.lines() {
        if let Some(info) = line.trim_start().strip_prefix("```") {
            // Drawings (`text` blocks) and code in other languages hold no commands.
            spans_of(&mut prose, &mut found);
            fenced = !fenced;
            drawing = fenced && !info.is_empty() && !matches!(info, "sh" | "bash" | "console");
        } else if fenced {
            if !drawing {
                found.extend(command_of(source, line, false));
            }
        } else {
            prose.push_str(line);
            prose.push(' ');
        }
    }
    spans_of(&mut prose, &mut found);
    found
}

/// The command on one line or code span, without prompt, lab prefix, comment and optional
/// `[...]` parts.
pub fn command_of(source: &str, line: &str, inline: bool) -> Option<DocCommand> {
    // What a shell would do with the output is not the command's.
    let line = [" #", " > ", " | ", " && "]
        .iter()
        .fold(line, |line, cut| line.split(cut).next().unwrap_or(line))
        .trim();
    let line = line.strip_prefix("$ ").unwrap_or(line);
    let line = line.strip_prefix("sudo ").unwrap_or(line);
    // The README's `$shoal` variable and the built binary are `shoal` too.
    let line = line.strip_prefix('$').unwrap_or(line);
    let line = line.strip_prefix("target/release/").unwrap_or(line);
    let (node, rest) = if let Some(rest) = line.strip_prefix("s1 shoal ") {
        (Some("node1".to_owned()), rest)
    } else {
        let rest = line.strip_prefix("shoal ")?;
        // A command run on a lab node is that command; anything else run there is `lab exec`'s.
        let on_node = rest.strip_prefix("lab exec ");
        match on_node.and_then(|exec| exec.split_once(" -- shoal ")) {
            Some((node, command)) => (Some(node.to_owned()), command),
            None => (None, rest),
        }
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

/// `line` with every task of `web` the docs name (`web.N.<id>`) replaced by `task`, and
/// whether there was one.
pub fn fill_task(line: &str, task: &str) -> (String, bool) {
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

/// Every command in the repository's docs; `root` is the repository.
pub fn documented_commands(root: &Path) -> Vec<DocCommand> {
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
            let name = path.strip_prefix(root).unwrap().display().to_string();
            commands_in(&name, &fs::read_to_string(path).unwrap())
        })
        .collect()
}
