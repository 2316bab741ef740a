//! The agent's built-in health probes: a TCP connect or an HTTP GET to a port of a task, from
//! inside the task's network namespace (so they need nothing in the task, and reach a server
//! listening on 127.0.0.1 too). Each runs on a short-lived thread that entered the namespace.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::netns::{self, Netns};

/// Most bytes of an answer read: enough for the status line and a short body.
const ANSWER_MAX: usize = 4096;

/// What a probe that ran saw: Ok when it passed, Err when it failed, each with what it saw
/// (the outer `Result` of a probe is whether it could run at all).
pub type Verdict = std::result::Result<String, String>;

/// Connects to `port` on the task's loopback; Ok says what answered.
pub fn tcp(pid: u32, port: u16, timeout: Duration) -> Result<Verdict> {
    in_task(pid, || {
        connect(port, timeout)?;
        Ok(format!("connected to port {port}"))
    })
}

/// `GET path` on `port` of the task's loopback: passed with the status line and the start of
/// the body when the status is 2xx or 3xx, failed with what went wrong otherwise.
pub fn http(pid: u32, port: u16, path: &str, timeout: Duration) -> Result<Verdict> {
    in_task(pid, || {
        let deadline = Instant::now() + timeout;
        let mut stream = connect(port, timeout)?;
        stream.set_write_timeout(Some(timeout))?;
        // One write: a server may answer (and close) on the first bytes it reads.
        let request = format!(
            "GET {path} HTTP/1.0\r\nHost: localhost:{port}\r\nUser-Agent: shoal-health\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes())?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while answer.len() < ANSWER_MAX {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no complete answer within {timeout:?}");
            }
            stream.set_read_timeout(Some(left))?;
            match stream.read(&mut buf)? {
                0 => break,
                n => answer.extend_from_slice(&buf[..n]),
            }
        }
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status = http_status(&answer).with_context(|| {
            format!(
                "not an HTTP answer: {:?}",
                answer.lines().next().unwrap_or("")
            )
        })?;
        if !(200..400).contains(&status) {
            bail!("{}", answer.trim_end());
        }
        Ok(answer.trim_end().to_owned())
    })
}

/// Runs `probe` in the task's network namespace: an error entering it is the probe's own,
/// one of `probe` is its verdict (without the namespace, which says nothing to the user).
fn in_task(pid: u32, probe: impl FnOnce() -> Result<String> + Send) -> Result<Verdict> {
    netns::run_in(&Netns::Process(pid), || {
        Ok(probe().map_err(|err| format!("{err:#}")))
    })
}

fn connect(port: u16, timeout: Duration) -> Result<TcpStream> {
    let target = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&target, timeout)
        .with_context(|| format!("connecting to port {port}"))
}

/// The status code of an HTTP/1.x answer.
fn http_status(answer: &str) -> Option<u16> {
    let line = answer.lines().next()?;
    let mut words = line.split_whitespace();
    words.next().filter(|v| v.starts_with("HTTP/1."))?;
    words.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_read() {
        assert_eq!(http_status("HTTP/1.1 200 OK\r\n\r\nhi"), Some(200));
        assert_eq!(
            http_status("HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(http_status("SSH-2.0-OpenSSH"), None);
        assert_eq!(http_status(""), None);
    }
}
