//! A DNS server per task namespace, on sockets the caller opened (in the task's namespace, at
//! [`crate::EMBEDDED_DNS_ADDR`]) and on the caller's tokio runtime.
//!
//! The serving loops are written here on tokio rather than with hickory-server's `Server`: that
//! one answers undecodable queries itself (so FORMERR could not be counted), spawns a task per
//! UDP query without a bound, and can only send re-encoded records, where a forwarder should
//! relay the upstream's bytes. hickory-proto still does all message parsing and encoding.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::timeout;

use crate::forward::Forwarder;
use crate::query::{handle, ForwardRequest, Step, Transport};
use crate::records::SharedRecords;
use crate::stats::{Counters, DnsStats, Outcome};

/// A TCP client that sends nothing for this long is disconnected.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP connections open at once per task; more are closed at accept.
const MAX_TCP_CONNECTIONS: usize = 64;

/// The networks the task is attached to: it sees the cluster names of these only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskScope {
    pub networks: Vec<String>,
}

/// The node's DNS: one per agent, shared by every task's server. Clones share everything.
#[derive(Clone, Debug)]
pub struct DnsServer {
    records: SharedRecords,
    forwarder: Forwarder,
    counters: Arc<Counters>,
    runtime: Arc<DnsRuntime>,
}

/// A thread of its own with a single-threaded runtime for every task's queries: answers do
/// not wait behind the agent's other work, and no worker is woken to hand a reply over. It
/// stops when the last clone of the server is dropped.
#[derive(Debug)]
struct DnsRuntime {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl DnsRuntime {
    fn start() -> io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("shoal-dns".into())
            .spawn(move || {
                let _ = runtime.block_on(stopped);
            })?;
        Ok(Self {
            handle,
            _stop: stop,
        })
    }
}

impl DnsServer {
    /// Starts the DNS thread; fails only if the system cannot make a thread or an epoll.
    pub fn new(records: SharedRecords, forwarder: Forwarder) -> io::Result<Self> {
        Ok(Self {
            records,
            forwarder,
            counters: Arc::default(),
            runtime: Arc::new(DnsRuntime::start()?),
        })
    }

    /// Serves one task on its sockets, on the DNS thread, until the handle is stopped or
    /// dropped; the sockets are switched to non-blocking mode.
    pub fn serve(
        &self,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        scope: TaskScope,
    ) -> io::Result<ServeHandle> {
        let runtime = self.runtime.handle.clone();
        let _entered = runtime.enter();
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        // SAFETY: a std `UdpSocket` owns its descriptor and always returns that one; it lives as
        // long as the `AsyncFd` that owns it.
        let udp = Arc::new(unsafe { AsyncFd::register_with_interest(udp, Interest::READABLE) }?);
        let tcp = TcpListener::from_std(tcp)?;
        let task = Arc::new(TaskServer {
            node: self.clone(),
            scope: scope.networks,
        });
        Ok(ServeHandle {
            loops: vec![
                runtime.spawn(serve_udp(udp, task.clone())),
                runtime.spawn(serve_tcp(tcp, task)),
            ],
        })
    }

    /// The resolvers names outside the cluster go to.
    pub fn upstreams(&self) -> Arc<Vec<std::net::SocketAddr>> {
        self.forwarder.upstreams()
    }

    /// Counters by outcome since the server was made, all tasks together.
    pub fn stats(&self) -> DnsStats {
        self.counters.snapshot()
    }
}

/// Stops the task's server when stopped or dropped; queries in flight are abandoned.
#[derive(Debug)]
pub struct ServeHandle {
    loops: Vec<JoinHandle<()>>,
}

impl ServeHandle {
    pub fn stop(self) {}
}

impl Drop for ServeHandle {
    fn drop(&mut self) {
        // Aborting a loop drops its JoinSet, which aborts the queries and connections it owns.
        self.loops.iter().for_each(JoinHandle::abort);
    }
}

#[derive(Debug)]
struct TaskServer {
    node: DnsServer,
    scope: Vec<String>,
}

impl TaskServer {
    /// Decides locally, counting what ends here.
    fn step(&self, wire: &[u8], transport: Transport) -> Step {
        let records = self.node.records.load();
        let step = handle(&records, &self.scope, wire, transport);
        match &step {
            Step::Reply(_, outcome) => self.node.counters.count(*outcome),
            Step::Drop => self.node.counters.count(Outcome::Dropped),
            Step::Forward(_) => {}
        }
        step
    }

    async fn forward(&self, request: &ForwardRequest) -> Vec<u8> {
        let upstream = self.node.forwarder.forward(&request.wire).await;
        let (reply, outcome) = request.reply(upstream);
        self.node.counters.count(outcome);
        reply
    }

    fn overloaded(&self, request: &ForwardRequest) -> Vec<u8> {
        tracing::debug!("too many forwarded queries in flight");
        self.node.counters.count(Outcome::ServFail);
        request.servfail()
    }
}

/// The UDP socket is registered for readability only. With write interest too (as tokio's
/// `UdpSocket` registers it), every reply wakes the runtime once more when the kernel frees its
/// buffer (an EPOLLOUT edge): a context switch per query, most of the cost under load. Replies
/// are sent directly on the non-blocking socket instead (see [`send_udp`]).
async fn serve_udp(socket: Arc<AsyncFd<std::net::UdpSocket>>, task: Arc<TaskServer>) {
    let mut buffer = vec![0u8; usize::from(u16::MAX)];
    let mut forwards = JoinSet::new();
    loop {
        let mut ready = match socket.readable().await {
            Ok(ready) => ready,
            Err(error) => {
                tracing::warn!(%error, "DNS UDP socket failed; no more UDP queries for this task");
                return;
            }
        };
        let (len, client) = match ready.try_io(|socket| socket.get_ref().recv_from(&mut buffer)) {
            Ok(Ok(received)) => received,
            Ok(Err(error)) if is_transient(&error) => continue,
            Ok(Err(error)) => {
                tracing::warn!(%error, "DNS UDP socket failed; no more UDP queries for this task");
                return;
            }
            // Drained: wait for the next datagram.
            Err(_would_block) => continue,
        };
        while forwards.try_join_next().is_some() {}
        match task.step(&buffer[..len], Transport::Udp) {
            Step::Reply(reply, _) => send_udp(socket.get_ref(), &reply, client),
            Step::Drop => {}
            Step::Forward(request) => match task.node.forwarder.reserve() {
                None => send_udp(socket.get_ref(), &task.overloaded(&request), client),
                Some(permit) => {
                    let (socket, task) = (socket.clone(), task.clone());
                    forwards.spawn(async move {
                        let reply = task.forward(&request).await;
                        drop(permit);
                        send_udp(socket.get_ref(), &reply, client);
                    });
                }
            },
        }
    }
}

/// A non-blocking send: a UDP send does not wait for the peer, only for room in the socket's
/// send buffer. Should that be full, the reply is lost as the network could lose it, and the
/// client asks again.
fn send_udp(socket: &std::net::UdpSocket, reply: &[u8], client: SocketAddr) {
    if let Err(error) = socket.send_to(reply, client) {
        tracing::debug!(%error, %client, "could not send a DNS reply");
    }
}

/// Errors a datagram socket reports for one peer (an ICMP error from an earlier send), after
/// which it still works.
fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    ) || error.raw_os_error() == Some(nix::libc::EHOSTUNREACH)
}

async fn serve_tcp(listener: TcpListener, task: Arc<TaskServer>) {
    let mut connections = JoinSet::new();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors, mostly: wait instead of spinning on accept.
                tracing::debug!(%error, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_TCP_CONNECTIONS {
            continue;
        }
        connections.spawn(serve_tcp_connection(stream, task.clone()));
    }
}

/// Length-prefixed queries (RFC 1035 4.2.2), answered in order, until idle or closed.
async fn serve_tcp_connection(mut stream: TcpStream, task: Arc<TaskServer>) {
    loop {
        let mut length = [0u8; 2];
        if !matches!(
            timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut length)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(length))];
        if !matches!(
            timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut query)).await,
            Ok(Ok(_))
        ) {
            return;
        }
        let reply = match task.step(&query, Transport::Tcp) {
            Step::Reply(reply, _) => reply,
            Step::Drop => return,
            Step::Forward(request) => match task.node.forwarder.reserve() {
                None => task.overloaded(&request),
                Some(_permit) => task.forward(&request).await,
            },
        };
        let Ok(length) = u16::try_from(reply.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}
