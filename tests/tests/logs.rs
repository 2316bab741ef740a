//! `service logs --follow`, through shoal's CLI and the unmodified docker CLI: every line a
//! task writes is printed once, in order, tasks started meanwhile too, and following ends
//! by itself when the service is removed; a node that cannot be read is named, once, and the
//! rest still comes. Needs root and the docker CLI (scripts/setup.sh installs it).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use shoal_tests::{require_tools, shoal_bin, wait_for, TestLab};

/// Counts to 600 at 10 lines a second (bounded), then idles.
const TICKER: &str = "i=0; while [ $i -lt 600 ]; do echo tick $i; i=$((i+1)); sleep 0.1; done; \
                      exec sleep 100000";

/// A follower's output, line by line, read on a thread so the test can wait with a bound.
struct Follower {
    child: Child,
    lines: mpsc::Receiver<String>,
    /// Tick numbers by task (`web.1.<id>`), in the order they came.
    ticks: BTreeMap<String, Vec<u32>>,
}

impl Follower {
    fn start(mut command: Command) -> Self {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the follower");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            ticks: BTreeMap::new(),
        }
    }

    /// Reads until `done` holds for the ticks seen so far (within `timeout`).
    fn until(
        &mut self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, Vec<u32>>) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while !done(&self.ticks) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{what}: not within {timeout:?}: {:?}", self.ticks));
            // `web.1.<id>@node2 | tick 7`; docker's task IDs are cut short, so the task is
            // named by service and slot.
            let Some((source, text)) = line.split_once(" | ") else {
                panic!("not a log line: {line:?}");
            };
            let task = source.trim().split('@').next().unwrap_or_default();
            let slot: Vec<&str> = task.splitn(3, '.').collect();
            let tick = text.strip_prefix("tick ").and_then(|t| t.parse().ok());
            if let Some(tick) = tick {
                let key = format!("{}.{}", slot[0], slot.get(1).unwrap_or(&""));
                self.ticks.entry(key).or_default().push(tick);
            }
        }
    }

    /// Each task's ticks one after the other, from its first: none twice, none skipped.
    fn assert_each_line_once(&self) {
        for (task, ticks) in &self.ticks {
            let first = ticks[0];
            let expected: Vec<u32> = (first..first + ticks.len() as u32).collect();
            assert_eq!(ticks, &expected, "{task}'s lines in order, once each");
        }
    }

    /// Waits (bounded) for the follower to end by itself; whether it succeeded.
    fn ended(mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting") {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the follower did not end within {timeout:?} of the service's removal");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn at_least(count: usize, tasks: usize) -> impl Fn(&BTreeMap<String, Vec<u32>>) -> bool {
    move |ticks| ticks.len() >= tasks && ticks.values().all(|t| t.len() >= count)
}

#[test]
fn following_prints_every_line_once_new_tasks_too_and_ends_with_the_service() {
    require_tools(&["docker"]);
    let lab = TestLab::up("logs", 2);
    lab.create_service("web", &["--replicas", "2"], &["sh", "-c", TICKER]);
    lab.running_tasks("web", 2);
    // Both tasks wrote ten lines or more before anyone follows.
    wait_for("10 lines of each task", Duration::from_secs(30), || {
        let logs = lab.exec("node1", &["shoal", "service", "logs", "web"]);
        (logs.matches("| tick 9\n").count() == 2).then_some(())
    });

    let mut shoal = Command::new(shoal_bin());
    shoal.args(["lab", "--name", &lab.name, "exec", "node1", "--"]);
    shoal.args(["shoal", "service", "logs", "--follow", "--tail", "3", "web"]);
    let mut follower = Follower::start(shoal);
    follower.until(
        "20 lines of each task",
        Duration::from_secs(30),
        at_least(20, 2),
    );
    assert!(
        follower.ticks.values().all(|t| t[0] >= 7),
        "--tail 3 starts at one of the last three lines: {:?}",
        follower.ticks
    );
    // A task started meanwhile is followed from its first line.
    lab.exec("node1", &["shoal", "service", "scale", "--detach", "web=3"]);
    follower.until(
        "the new task's lines",
        Duration::from_secs(30),
        at_least(10, 3),
    );
    assert_eq!(
        follower.ticks.get("web.3").map(|t| t[0]),
        Some(0),
        "{:?}",
        follower.ticks
    );
    follower.assert_each_line_once();

    // The docker CLI follows through the Engine API's stream.
    {
        let config = tempfile::tempdir().unwrap();
        let mut docker = Command::new("docker");
        docker
            .args(["service", "logs", "--follow", "--tail", "1", "web"])
            .env(
                "DOCKER_HOST",
                format!(
                    "unix://{}",
                    lab.run_dir().join("node1/docker.sock").display()
                ),
            )
            .env("DOCKER_CONFIG", config.path());
        let mut docker = Follower::start(docker);
        docker.until(
            "10 lines of each task through docker",
            Duration::from_secs(30),
            at_least(10, 3),
        );
        docker.assert_each_line_once();
        lab.exec("node1", &["shoal", "service", "rm", "web"]);
        assert!(
            docker.ended(Duration::from_secs(10)),
            "docker's follow ends cleanly"
        );
    }
    assert!(
        follower.ended(Duration::from_secs(10)),
        "shoal's follow ends cleanly"
    );
    lab.down_clean();
}

/// A node whose agent is down: its tasks' output cannot be read. `service logs` prints the
/// rest and fails naming it; following says so once and goes on; the docker CLI gets Swarm's
/// "incomplete log stream" warning.
#[test]
fn a_node_that_cannot_be_read_is_named_once_and_the_rest_still_comes() {
    require_tools(&["docker", "timeout"]);
    let lab = TestLab::up("logsdown", 2);
    lab.create_service("web", &["--replicas", "2"], &["sh", "-c", TICKER]);
    let tasks = lab.running_tasks("web", 2);
    assert!(tasks.iter().any(|t| t.node == "node2"), "{tasks:?}");
    lab.ok(&["stop", "node2"]);

    let logs = lab.run(&["exec", "node1", "--", "shoal", "service", "logs", "web"]);
    let (out, err) = (
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr),
    );
    assert!(!logs.status.success(), "incomplete logs fail: {out}");
    assert!(
        err.contains("incomplete logs: logs of node2's tasks unavailable"),
        "{err}"
    );
    assert!(
        out.contains("@node1 | tick "),
        "node1's task still comes: {out}"
    );

    // Six polls or so, one message.
    let follow = lab.run(&[
        "exec", "node1", "--", "timeout", "3", "shoal", "service", "logs", "--follow", "web",
    ]);
    let (out, err) = (
        String::from_utf8_lossy(&follow.stdout),
        String::from_utf8_lossy(&follow.stderr),
    );
    assert_eq!(
        err.matches("logs of node2's tasks unavailable").count(),
        1,
        "said once: {err}"
    );
    assert!(out.contains("@node1 | tick "), "{out}");

    let config = tempfile::tempdir().unwrap();
    let docker = Command::new("docker")
        .args(["service", "logs", "web"])
        .env(
            "DOCKER_HOST",
            format!(
                "unix://{}",
                lab.run_dir().join("node1/docker.sock").display()
            ),
        )
        .env("DOCKER_CONFIG", config.path())
        .output()
        .expect("docker");
    let err = String::from_utf8_lossy(&docker.stderr);
    assert!(!docker.status.success(), "{err}");
    assert!(
        err.contains("incomplete log stream") && err.contains("node node2 is not available"),
        "{err}"
    );
    assert!(String::from_utf8_lossy(&docker.stdout).contains("| tick "));
    lab.ok(&["start", "node2"]);
    lab.down_clean();
}
