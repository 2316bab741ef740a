//! Forwarding to the node's upstream resolvers: the client's query goes out as it came (under a
//! fresh random id), over UDP, then over TCP when the UDP answer is truncated. One forwarder is
//! shared by every task's server so the in-flight cap holds node-wide.
//!
//! Upstream sockets are opened by the agent's runtime threads, so in the agent's (host)
//! namespace: the node's resolvers are reachable from there whatever the task's network allows.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{timeout_at, Instant};

use crate::upstreams::parse_resolv_conf;

/// Every upstream is tried this many times at most, round robin, within the overall timeout.
const ATTEMPTS_PER_UPSTREAM: usize = 2;

#[derive(Clone, Debug)]
pub struct ForwarderConfig {
    pub upstreams: Vec<SocketAddr>,
    /// How long one upstream gets (UDP plus any TCP retry) before the next is asked.
    pub try_timeout: Duration,
    /// How long a client waits at most before SERVFAIL. Below glibc's 5 s so the client gets
    /// our SERVFAIL instead of timing out and retrying on top of us.
    pub overall_timeout: Duration,
    /// Queries being forwarded at once, node-wide; beyond it clients get SERVFAIL at once.
    pub max_in_flight: usize,
}

impl Default for ForwarderConfig {
    fn default() -> Self {
        Self {
            upstreams: Vec::new(),
            try_timeout: Duration::from_secs(2),
            overall_timeout: Duration::from_secs(4),
            max_in_flight: 1024,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum ForwardError {
    NoUpstreams,
    /// Every upstream failed, timed out or answered SERVFAIL/REFUSED.
    AllUpstreamsFailed,
}

#[derive(Clone, Debug)]
pub struct Forwarder {
    config: Arc<ForwarderConfig>,
    /// The resolvers asked now: the configured ones, replaced when the node's resolv.conf
    /// changes ([`crate::follow_resolv_conf`]).
    upstreams: Arc<ArcSwap<Vec<SocketAddr>>>,
    in_flight: Arc<Semaphore>,
}

impl Forwarder {
    pub fn new(config: ForwarderConfig) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
            upstreams: Arc::new(ArcSwap::from_pointee(config.upstreams.clone())),
            config: Arc::new(config),
        }
    }

    /// A forwarder to the resolvers of a resolv.conf (normally `/etc/resolv.conf`), with the
    /// default timeouts and cap.
    pub fn from_resolv_conf(path: &Path) -> io::Result<Self> {
        let upstreams = parse_resolv_conf(&std::fs::read_to_string(path)?);
        Ok(Self::new(ForwarderConfig {
            upstreams: upstreams.servers,
            ..ForwarderConfig::default()
        }))
    }

    pub fn config(&self) -> &ForwarderConfig {
        &self.config
    }

    /// The resolvers queries go to now.
    pub fn upstreams(&self) -> Arc<Vec<SocketAddr>> {
        self.upstreams.load_full()
    }

    /// Replaces the resolvers; queries in flight finish with the old ones.
    pub fn set_upstreams(&self, upstreams: Vec<SocketAddr>) {
        self.upstreams.store(Arc::new(upstreams));
    }

    /// A slot for one forwarded query, or `None` when the cap is reached.
    pub(crate) fn reserve(&self) -> Option<OwnedSemaphorePermit> {
        self.in_flight.clone().try_acquire_owned().ok()
    }

    /// The upstream's answer to `query` (a whole DNS message), with the query's id.
    pub async fn forward(&self, query: &[u8]) -> Result<Vec<u8>, ForwardError> {
        let upstreams = self.upstreams.load_full();
        if upstreams.is_empty() {
            return Err(ForwardError::NoUpstreams);
        }
        if query.len() < 2 {
            return Err(ForwardError::AllUpstreamsFailed);
        }
        let deadline = Instant::now() + self.config.overall_timeout;
        let attempts = upstreams.len() * ATTEMPTS_PER_UPSTREAM;
        for upstream in upstreams.iter().cycle().take(attempts) {
            let try_deadline = deadline.min(Instant::now() + self.config.try_timeout);
            if try_deadline <= Instant::now() {
                break;
            }
            match timeout_at(try_deadline, exchange(*upstream, query)).await {
                Ok(Ok(mut reply)) if !is_server_failure(&reply) => {
                    reply[..2].copy_from_slice(&query[..2]);
                    return Ok(reply);
                }
                Ok(Ok(_)) => tracing::debug!(%upstream, "upstream answered SERVFAIL or REFUSED"),
                Ok(Err(error)) => tracing::debug!(%upstream, %error, "upstream failed"),
                Err(_) => tracing::debug!(%upstream, "upstream timed out"),
            }
        }
        Err(ForwardError::AllUpstreamsFailed)
    }
}

/// One exchange with one upstream: UDP, then TCP if the UDP answer is truncated.
async fn exchange(upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
    let id: u16 = rand::random();
    let mut query = query.to_vec();
    query[..2].copy_from_slice(&id.to_be_bytes());

    let local: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from anyone but this upstream.
    socket.connect(upstream).await?;
    socket.send(&query).await?;
    let mut buffer = vec![0u8; usize::from(u16::MAX)];
    loop {
        let len = socket.recv(&mut buffer).await?;
        let reply = &buffer[..len];
        if !answers(reply, id) {
            continue;
        }
        if reply[2] & 0x02 != 0 {
            return exchange_tcp(upstream, &query, id).await;
        }
        return Ok(reply.to_vec());
    }
}

async fn exchange_tcp(upstream: SocketAddr, query: &[u8], id: u16) -> io::Result<Vec<u8>> {
    let length = u16::try_from(query.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    let mut length = [0u8; 2];
    stream.read_exact(&mut length).await?;
    let mut reply = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut reply).await?;
    if answers(&reply, id) {
        Ok(reply)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "reply does not answer the query",
        ))
    }
}

/// A response (QR set) with our id and a whole header.
fn answers(reply: &[u8], id: u16) -> bool {
    reply.len() >= 12 && reply[..2] == id.to_be_bytes() && reply[2] & 0x80 != 0
}

fn is_server_failure(reply: &[u8]) -> bool {
    let code = ResponseCode::from_low(reply[3] & 0x0f);
    code == ResponseCode::ServFail || code == ResponseCode::Refused
}
