//! Client of the local agent's API over its Unix socket.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use http_body_util::{BodyExt as _, Full};
use hyper::{body::Bytes, Request};
use hyper_util::rt::TokioIo;
use serde::{de::DeserializeOwned, Serialize};
use tokio::net::UnixStream;

use shoal_api::ApiError;

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: PathBuf) -> Self {
        Self { socket }
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Request::get(path), Vec::new()).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call(Request::post(path), serde_json::to_vec(body)?)
            .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        request: hyper::http::request::Builder,
        body: Vec<u8>,
    ) -> Result<T> {
        let path = request
            .uri_ref()
            .map(|u| u.path().to_owned())
            .unwrap_or_default();
        let stream = UnixStream::connect(&self.socket).await.map_err(|err| {
            anyhow::anyhow!(
                "no shoal agent is answering on {} ({err}); start one (systemctl start shoal) \
                 or point --socket / SHOAL_SOCKET at a running agent",
                self.socket.display()
            )
        })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talking to the agent")?;
        tokio::spawn(connection);
        let request = request
            .header(hyper::header::HOST, "shoal")
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let response = sender
            .send_request(request)
            .await
            .context("the agent closed the connection")?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            match serde_json::from_slice::<ApiError>(&body) {
                // The error itself, so a caller can tell its kind (its message is the same).
                Ok(err) => return Err(err.into()),
                Err(_) => bail!("the agent answered {status}"),
            }
        }
        serde_json::from_slice(&body).with_context(|| {
            format!(
                "the agent's answer to {path} is not what this client understands (version skew?)"
            )
        })
    }
}

/// The CLI reaches the managers through its agent, as every other command does.
impl shoal_docker::Cluster for Client {
    async fn control(
        &self,
        request: shoal_cluster::protocol::ControlRequest,
    ) -> Result<shoal_cluster::protocol::ControlResponse> {
        self.post("/v1/control", &request).await
    }

    async fn managers(&self) -> Result<Vec<String>> {
        let info: crate::server::AgentInfo = self.get("/v1/info").await?;
        Ok(info.swarm.map(|s| s.managers).unwrap_or_default())
    }

    async fn local_network(
        &self,
        network: &str,
    ) -> Result<Option<shoal_dataplane::overlay::NetworkDataplane>> {
        self.get(&format!("/v1/networks/{network}/dataplane")).await
    }
}
