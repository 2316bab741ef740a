//! Helpers of the many-node test and bench: seeded random picks, connections timed by curl,
//! and waiting until gossip has reached every node.

use crate::{RunningTask, TestLab};

/// A small seeded generator (xorshift64*): the seed is printed, so a run's picks can be
/// replayed with SHOAL_SCALE_SEED.
pub struct Picker(u64);

impl Picker {
    pub fn seeded() -> Self {
        let seed = std::env::var("SHOAL_SCALE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("picks seeded with SHOAL_SCALE_SEED={seed}");
        Self(seed | 1)
    }

    /// A number in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

/// The underlay address of the lab's node `index` (from 0).
pub fn node_address(index: usize) -> String {
    format!("192.168.77.{}", 11 + index)
}

/// A shell line that opens one connection with curl and prints `LABEL TIME_CONNECT CODE`:
/// how long the TCP handshake took, in seconds.
pub fn curl_line(label: &str, url: &str, local_port: Option<u16>) -> String {
    let port = local_port.map_or(String::new(), |p| format!("--local-port {p} "));
    format!(
        "curl -s -o /dev/null {port}--connect-timeout 3 --max-time 5 \
         -w '{label} %{{time_connect}} %{{http_code}}\\n' {url}\n"
    )
}

/// One connection as `curl_line` printed it.
#[derive(Clone, Debug)]
pub struct Connection {
    pub line: String,
    /// None when it never connected.
    pub connect_secs: Option<f64>,
    pub answered: bool,
}

/// The output of `curl_line`s, which must hold `expected` connections.
pub fn connections(output: &str, expected: usize) -> Vec<Connection> {
    let found: Vec<Connection> = output
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let connect = fields
                .len()
                .checked_sub(2)
                .and_then(|i| fields[i].parse::<f64>().ok())
                .filter(|secs| *secs > 0.0);
            Connection {
                line: line.to_owned(),
                connect_secs: connect,
                answered: fields.last() == Some(&"200"),
            }
        })
        .collect();
    assert_eq!(found.len(), expected, "one line a connection:\n{output}");
    found
}

/// Whether every node of the lab (`nodes` of them) forwards to, and answers ARP for, every
/// task of `network` on the other nodes: gossip has reached everyone.
pub fn peers_programmed(lab: &TestLab, network: &str, tasks: &[RunningTask], nodes: u8) -> bool {
    (1..=nodes).all(|index| {
        let node = format!("node{index}");
        let remote = tasks.iter().filter(|t| t.node != node).count();
        lab.try_json(&node, &["network", "inspect", network])
            .and_then(|view| Some(view["local"]["neighbours"].as_array()?.len()))
            == Some(remote)
    })
}
