//! The real I/O driver: one tokio task owns the `Gossip` core and feeds it UDP datagrams,
//! TCP sync frames, timer ticks and commands from `GossipHandle`.
//!
//! TCP sync: one request and one answer per connection, each a frame of a 4-byte big-endian
//! length and a sealed packet, at most `MAX_FRAME` bytes; connecting, reading and writing
//! time out after `IO_TIMEOUT`; at most `MAX_CONNECTIONS` syncs run at once each way (more
//! are refused). Anything malformed closes the connection and is counted.
//!
//! Host probes (`Output::ProbeHost`): a TCP connect to the member's gossip address; accepted
//! or refused means its kernel answered, so the host is there whether or not its agent runs.
//! At most `MAX_HOST_PROBES` run at once (more wait for the next round).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{broadcast, mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::core::{Error, Gossip, GossipStats, MemberInfo, Output};
use crate::record::EndpointRecord;
use crate::table::Entry;
use crate::wire::Keyring;

pub const MAX_FRAME: usize = 16 << 20;
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
pub const MAX_CONNECTIONS: usize = 16;
pub const MAX_HOST_PROBES: usize = 64;
/// The core is ticked at least this often even with nothing due (clock steps, safety).
const MAX_SLEEP: Duration = Duration::from_secs(1);
const MAX_DATAGRAM: usize = 65_536;

/// Wall-clock UNIX milliseconds, the core's notion of time in the agent.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What changed, for whoever renders views (the agent's data path, DNS).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Network(String),
    Members,
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the gossip service has stopped")]
    Stopped,
    #[error(transparent)]
    Gossip(#[from] Error),
}

type Job = Box<dyn FnOnce(&mut Gossip, u64) + Send>;

enum Command {
    Run(Job),
    Stop,
}

/// The driver's server and worker tasks.
type DriverTasks = (JoinHandle<()>, JoinHandle<()>);

pub struct GossipService;

impl GossipService {
    /// Binds UDP and TCP on `bind` (the same port) and starts the task that owns `core`.
    pub async fn start(core: Gossip, bind: SocketAddr) -> io::Result<GossipHandle> {
        let udp = UdpSocket::bind(bind).await?;
        enlarge_receive_buffer(&udp);
        let udp = Arc::new(udp);
        let tcp = TcpListener::bind(udp.local_addr()?).await?;
        let local_addr = udp.local_addr()?;
        let (commands, inbox) = mpsc::channel(1_024);
        let (changes, _) = broadcast::channel(256);
        let server = tokio::spawn(serve_syncs(tcp, commands.clone()));
        let task = tokio::spawn(run(core, udp, inbox, commands.clone(), changes.clone()));
        Ok(GossipHandle {
            commands,
            changes,
            local_addr,
            tasks: Arc::new(std::sync::Mutex::new(Some((server, task)))),
        })
    }
}

/// Room for bursts: the default (208 KiB) holds about 90 datagrams, and in a 32-node lab
/// announcing 96 tasks at once a quarter of them were dropped there, each missed write then
/// waiting for the next full sync (30 s). memberlist asks for 2 MiB for the same reason.
const UDP_RECEIVE_BUFFER: libc::c_int = 4 << 20;

/// Asks for `UDP_RECEIVE_BUFFER`, beyond `net.core.rmem_max` where the agent may
/// (SO_RCVBUFFORCE, CAP_NET_ADMIN), else up to it; a refusal leaves the default.
fn enlarge_receive_buffer(udp: &UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let set = |option| {
        // SAFETY: a valid socket and an int option of its size, read by the kernel only.
        unsafe {
            libc::setsockopt(
                udp.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&UDP_RECEIVE_BUFFER as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ) == 0
        }
    };
    if !set(libc::SO_RCVBUFFORCE) && !set(libc::SO_RCVBUF) {
        tracing::warn!(error = %io::Error::last_os_error(), "gossip keeps the default UDP receive buffer");
    }
}

/// A cheap handle on the running service; clones share it.
#[derive(Clone)]
pub struct GossipHandle {
    commands: mpsc::Sender<Command>,
    changes: broadcast::Sender<Change>,
    local_addr: SocketAddr,
    /// The sync server and the core's task, taken by the first `shutdown`.
    tasks: Arc<std::sync::Mutex<Option<DriverTasks>>>,
}

impl GossipHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Change notifications; a lagging receiver should re-read everything.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Runs `act` on the core inside its task and returns the result.
    async fn call<R: Send + 'static>(
        &self,
        act: impl FnOnce(&mut Gossip, u64) -> R + Send + 'static,
    ) -> Result<R, ServiceError> {
        call(&self.commands, act).await
    }

    pub async fn join(&self, seeds: Vec<SocketAddr>) -> Result<(), ServiceError> {
        self.call(move |g, now| g.join(&seeds, now)).await
    }

    pub async fn join_network(&self, net: &str) -> Result<(), ServiceError> {
        let net = net.to_owned();
        Ok(self.call(move |g, now| g.join_network(&net, now)).await??)
    }

    pub async fn leave_network(&self, net: &str) -> Result<(), ServiceError> {
        let net = net.to_owned();
        self.call(move |g, now| g.leave_network(&net, now)).await
    }

    pub async fn publish(
        &self,
        net: &str,
        key: &str,
        value: EndpointRecord,
    ) -> Result<(), ServiceError> {
        let (net, key) = (net.to_owned(), key.to_owned());
        Ok(self
            .call(move |g, now| g.publish(&net, &key, value, now))
            .await??)
    }

    pub async fn withdraw(&self, net: &str, key: &str) -> Result<(), ServiceError> {
        let (net, key) = (net.to_owned(), key.to_owned());
        self.call(move |g, now| g.withdraw(&net, &key, now)).await
    }

    pub async fn set_keyring(&self, keyring: Keyring) -> Result<(), ServiceError> {
        self.call(move |g, _| g.set_keyring(keyring)).await
    }

    pub async fn members(&self) -> Result<Vec<MemberInfo>, ServiceError> {
        self.call(|g, _| g.members()).await
    }

    /// The networks this node is on.
    pub async fn my_networks(&self) -> Result<Vec<String>, ServiceError> {
        self.call(|g, _| g.my_networks()).await
    }

    pub async fn networks_of(&self, node: &str) -> Result<Vec<String>, ServiceError> {
        let node = node.to_owned();
        self.call(move |g, _| g.networks_of(&node)).await
    }

    pub async fn view(&self, net: &str) -> Result<Vec<(String, EndpointRecord)>, ServiceError> {
        let net = net.to_owned();
        self.call(move |g, _| g.view(&net)).await
    }

    pub async fn entries(
        &self,
        net: &str,
    ) -> Result<Vec<(String, Entry<EndpointRecord>)>, ServiceError> {
        let net = net.to_owned();
        self.call(move |g, _| g.entries(&net)).await
    }

    pub async fn stats(&self) -> Result<GossipStats, ServiceError> {
        self.call(|g, _| g.stats()).await
    }

    /// Stops the service and waits for its tasks to end.
    pub async fn shutdown(&self) {
        let tasks = self.tasks.lock().expect("gossip tasks").take();
        let Some((server, task)) = tasks else {
            return;
        };
        let _ = self.commands.send(Command::Stop).await;
        server.abort();
        let _ = server.await;
        let _ = task.await;
    }
}

async fn call<R: Send + 'static>(
    commands: &mpsc::Sender<Command>,
    act: impl FnOnce(&mut Gossip, u64) -> R + Send + 'static,
) -> Result<R, ServiceError> {
    let (reply, answer) = oneshot::channel();
    let job: Job = Box::new(move |g, now| {
        let _ = reply.send(act(g, now));
    });
    commands
        .send(Command::Run(job))
        .await
        .map_err(|_| ServiceError::Stopped)?;
    answer.await.map_err(|_| ServiceError::Stopped)
}

/// The task that owns the core.
async fn run(
    mut core: Gossip,
    udp: Arc<UdpSocket>,
    mut inbox: mpsc::Receiver<Command>,
    commands: mpsc::Sender<Command>,
    changes: broadcast::Sender<Change>,
) {
    let outgoing_syncs = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let host_probes = Arc::new(Semaphore::new(MAX_HOST_PROBES));
    let mut buf = vec![0; MAX_DATAGRAM];
    loop {
        while let Some(output) = core.poll_output() {
            match output {
                Output::Datagram { to, bytes } => {
                    // UDP is lossy anyway: a failed send is a lost packet.
                    let _ = udp.try_send_to(&bytes, to);
                }
                Output::SyncRequest { to, bytes } => {
                    if let Ok(permit) = outgoing_syncs.clone().try_acquire_owned() {
                        let commands = commands.clone();
                        tokio::spawn(async move {
                            sync_with(to, bytes, &commands).await;
                            drop(permit);
                        });
                    }
                }
                Output::Changed { net } => {
                    let _ = changes.send(Change::Network(net));
                }
                Output::MembersChanged => {
                    let _ = changes.send(Change::Members);
                }
                Output::ProbeHost {
                    node,
                    to,
                    timeout_ms,
                } => {
                    if let Ok(permit) = host_probes.clone().try_acquire_owned() {
                        let commands = commands.clone();
                        tokio::spawn(async move {
                            let answering =
                                host_answers(to, Duration::from_millis(timeout_ms)).await;
                            let _ = call(&commands, move |g, _| g.host_answered(&node, answering))
                                .await;
                            drop(permit);
                        });
                    }
                }
            }
        }
        let sleep = core
            .next_deadline()
            .map_or(MAX_SLEEP, |d| {
                Duration::from_millis(d.saturating_sub(now_ms()))
            })
            .min(MAX_SLEEP);
        tokio::select! {
            received = udp.recv_from(&mut buf) => {
                if let Ok((len, from)) = received {
                    core.handle_datagram(from, &buf[..len], now_ms());
                }
            }
            command = inbox.recv() => match command {
                Some(Command::Run(job)) => job(&mut core, now_ms()),
                Some(Command::Stop) | None => break,
            },
            _ = tokio::time::sleep(sleep) => core.tick(now_ms()),
        }
    }
}

/// Sends a sync request to a peer and hands its answer to the core.
async fn sync_with(to: SocketAddr, request: Vec<u8>, commands: &mpsc::Sender<Command>) {
    let exchange = async {
        let mut stream = TcpStream::connect(to).await?;
        write_frame(&mut stream, &request).await?;
        read_frame(&mut stream).await
    };
    match timeout(IO_TIMEOUT, exchange).await {
        Ok(Ok(answer)) => {
            // The core counts an answer that does not open.
            let _ = call(commands, move |g, now| {
                let _ = g.handle_sync_response(to, &answer, now);
            })
            .await;
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            let _ = call(commands, |g, _| g.count_malformed()).await;
        }
        // An unreachable or slow peer: the next periodic sync picks another.
        _ => {}
    }
}

/// Whether the host at `addr` answers a TCP connect within `limit`: accepted or refused both
/// come from its kernel; silence or an unreachable host says it is gone.
async fn host_answers(addr: SocketAddr, limit: Duration) -> bool {
    match timeout(limit, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == io::ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

async fn serve_syncs(listener: TcpListener, commands: mpsc::Sender<Command>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        // Over the limit: refuse by closing at once.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let commands = commands.clone();
        tokio::spawn(async move {
            serve_sync(stream, peer, &commands).await;
            drop(permit);
        });
    }
}

async fn serve_sync(mut stream: TcpStream, peer: SocketAddr, commands: &mpsc::Sender<Command>) {
    let request = match timeout(IO_TIMEOUT, read_frame(&mut stream)).await {
        Ok(Ok(request)) => request,
        Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => {
            let _ = call(commands, |g, _| g.count_malformed()).await;
            return;
        }
        _ => return,
    };
    let answer = call(commands, move |g, now| {
        g.handle_sync_request(peer, &request, now).ok()
    })
    .await;
    if let Ok(Some(answer)) = answer {
        let _ = timeout(IO_TIMEOUT, write_frame(&mut stream, &answer)).await;
    }
}

async fn write_frame(stream: &mut TcpStream, frame: &[u8]) -> io::Result<()> {
    let len = u32::try_from(frame.len())
        .ok()
        .filter(|&l| l as usize <= MAX_FRAME)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "sync frame too large"))?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(frame).await?;
    stream.flush().await
}

/// Reads one frame; a length over `MAX_FRAME` is `InvalidData`.
async fn read_frame(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut len = [0; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "sync frame too large",
        ));
    }
    let mut frame = vec![0; len];
    stream.read_exact(&mut frame).await?;
    Ok(frame)
}
