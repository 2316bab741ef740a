//! Raft network over an abstract request/response [`Transport`].
//!
//! Client side: [`NetworkFactory`] / [`NetworkClient`] serialize RPCs with serde_json and
//! `post` them to `Member::addr` at one of the `PATH_*` paths.
//! Server side: feed the received `(path, body)` to [`handle_rpc`] and send back its bytes.
//!
//! Wire format of a response: serde_json of `Result<Resp, RaftError<..>>`, i.e. remote Raft
//! errors travel inside a successful transport reply. A transport `Err(String)` means the peer
//! could not be reached (mapped to `Unreachable`, so openraft backs off before retrying).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::InstallSnapshotError;
use openraft::error::NetworkError;
use openraft::error::RPCError;
use openraft::error::RaftError;
use openraft::error::RemoteError;
use openraft::error::Unreachable;
use openraft::network::Backoff;
use openraft::network::RPCOption;
use openraft::network::RaftNetwork;
use openraft::network::RaftNetworkFactory;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::InstallSnapshotRequest;
use openraft::raft::InstallSnapshotResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use openraft::AnyError;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::Member;
use super::NodeId;
use super::Raft;
use super::TypeConfig;

pub const PATH_APPEND: &str = "/raft/append";
pub const PATH_VOTE: &str = "/raft/vote";
pub const PATH_SNAPSHOT: &str = "/raft/snapshot";

/// The only thing an application must provide: deliver `body` to `addr` + `path`
/// and return the peer's reply bytes. `Err` = peer not reachable / transport failure.
///
/// Implement it with `async fn post(...)` in your impl; the returned future must be `Send`.
/// (openraft already wraps each RPC in its own timeout and drops the future on expiry.)
pub trait Transport: Send + Sync + 'static {
    fn post(
        &self,
        addr: &str,
        path: &str,
        body: Vec<u8>,
    ) -> impl Future<Output = Result<Vec<u8>, String>> + Send;
}

/// `RaftNetworkFactory`: one `NetworkClient` per target node.
pub struct NetworkFactory<T: Transport> {
    transport: Arc<T>,
}

impl<T: Transport> NetworkFactory<T> {
    pub fn new(transport: Arc<T>) -> Self {
        Self { transport }
    }
}

impl<T: Transport> RaftNetworkFactory<TypeConfig> for NetworkFactory<T> {
    type Network = NetworkClient<T>;

    async fn new_client(&mut self, target: NodeId, node: &Member) -> Self::Network {
        NetworkClient {
            transport: self.transport.clone(),
            target,
            node: node.clone(),
        }
    }
}

pub struct NetworkClient<T: Transport> {
    transport: Arc<T>,
    target: NodeId,
    node: Member,
}

impl<T: Transport> NetworkClient<T> {
    async fn call<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = self
            .transport
            .post(&self.node.addr, path, body)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::from(AnyError::error(e))))?;
        let res: Result<Resp, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        res.map_err(|e| {
            RPCError::RemoteError(RemoteError::new_with_node(
                self.target,
                self.node.clone(),
                e,
            ))
        })
    }
}

impl<T: Transport> RaftNetwork<TypeConfig> for NetworkClient<T> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(PATH_APPEND, &rpc).await
    }

    // `full_snapshot()` keeps its default impl, which chunks the snapshot and calls this.
    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(PATH_SNAPSHOT, &rpc).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.call(PATH_VOTE, &rpc).await
    }

    /// Default is 500ms, which is close to the election timeout; retry sooner on a LAN.
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

/// Server side: dispatch one received RPC to the local `Raft` and return the reply bytes.
///
/// `Err` only for a bad path or undecodable body (answer it as a transport error,
/// e.g. HTTP 400); Raft-level errors are encoded inside the `Ok` bytes.
pub async fn handle_rpc(raft: &Raft, path: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    fn de<T: DeserializeOwned>(b: &[u8]) -> Result<T, String> {
        serde_json::from_slice(b).map_err(|e| format!("bad raft rpc body: {e}"))
    }
    let out = match path {
        PATH_APPEND => serde_json::to_vec(&raft.append_entries(de(body)?).await),
        PATH_VOTE => serde_json::to_vec(&raft.vote(de(body)?).await),
        PATH_SNAPSHOT => serde_json::to_vec(&raft.install_snapshot(de(body)?).await),
        other => return Err(format!("unknown raft rpc path: {other}")),
    };
    out.map_err(|e| e.to_string())
}
