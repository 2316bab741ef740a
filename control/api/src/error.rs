//! The one error body of the API, and what kind of failure it reports: the kind decides the
//! HTTP status, the message is what the CLI prints.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What went wrong, as far as the caller is concerned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request names a node, service, network, task or endpoint that does not exist.
    NotFound,
    /// The request clashes with the swarm's current state (a name or port in use, the last
    /// manager, a node already in a swarm, ...).
    Conflict,
    /// This node cannot answer now: not in a swarm, not a manager, no quorum, not ready.
    Unavailable,
    /// The request itself is malformed or asks for something impossible.
    Invalid,
    /// The caller may not ask this (the manager port: no or the wrong node certificate).
    Forbidden,
    /// The node failed at the request's work: the kernel, the disk, a bug.
    #[default]
    Internal,
}

impl ErrorKind {
    /// The HTTP status the API answers with.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::NotFound => 404,
            ErrorKind::Conflict => 409,
            ErrorKind::Unavailable => 503,
            ErrorKind::Invalid => 400,
            ErrorKind::Forbidden => 403,
            ErrorKind::Internal => 500,
        }
    }

    /// The kind an error answer's status stands for (a body without a kind).
    pub fn from_status(status: u16) -> Self {
        match status {
            404 => ErrorKind::NotFound,
            409 => ErrorKind::Conflict,
            503 => ErrorKind::Unavailable,
            403 => ErrorKind::Forbidden,
            400..=499 => ErrorKind::Invalid,
            _ => ErrorKind::Internal,
        }
    }
}

/// The body of every error answer, and the error the cluster raises for a request it refuses:
/// `error` is one line saying what went wrong (the CLI prints it as it is).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
    /// Absent from agents that predate kinds: then the HTTP status tells.
    #[serde(default)]
    pub kind: ErrorKind,
}

impl ApiError {
    pub fn new(kind: ErrorKind, error: impl Into<String>) -> Self {
        Self {
            error: error.into(),
            kind,
        }
    }

    pub fn not_found(error: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, error)
    }

    pub fn conflict(error: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, error)
    }

    pub fn unavailable(error: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, error)
    }

    pub fn invalid(error: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, error)
    }

    pub fn forbidden(error: impl Into<String>) -> Self {
        Self::new(ErrorKind::Forbidden, error)
    }

    pub fn internal(error: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, error)
    }

    /// The answer for any error: the kind of the first `ApiError` in its chain (Internal when
    /// none says), the whole chain as the message.
    pub fn of(err: &anyhow::Error) -> Self {
        let kind = err
            .chain()
            .find_map(|cause| cause.downcast_ref::<ApiError>())
            .map_or(ErrorKind::Internal, |tagged| tagged.kind);
        Self::new(kind, format!("{err:#}"))
    }

    /// The kind of an error, as `of` finds it.
    pub fn kind_of(err: &anyhow::Error) -> ErrorKind {
        Self::of(err).kind
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.error)
    }
}

impl std::error::Error for ApiError {}

/// Tags a result's error with a kind, keeping its message.
pub trait Kind<T> {
    fn kind(self, kind: ErrorKind) -> anyhow::Result<T>;
}

impl<T> Kind<T> for anyhow::Result<T> {
    fn kind(self, kind: ErrorKind) -> anyhow::Result<T> {
        self.map_err(|err| match err.downcast_ref::<ApiError>() {
            Some(_) => err,
            None => ApiError::new(kind, format!("{err:#}")).into(),
        })
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn each_kind_has_its_status() {
        let expected = [
            (ErrorKind::NotFound, 404),
            (ErrorKind::Conflict, 409),
            (ErrorKind::Unavailable, 503),
            (ErrorKind::Invalid, 400),
            (ErrorKind::Forbidden, 403),
            (ErrorKind::Internal, 500),
        ];
        for (kind, status) in expected {
            assert_eq!(kind.status(), status, "{kind:?}");
            assert_eq!(ErrorKind::from_status(status), kind, "{status}");
        }
        assert_eq!(ErrorKind::from_status(422), ErrorKind::Invalid);
        assert_eq!(ErrorKind::from_status(502), ErrorKind::Internal);
    }

    #[test]
    fn the_body_names_its_kind_and_old_bodies_still_read() {
        let body = serde_json::to_value(ApiError::conflict("port 8080/tcp is taken")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({ "error": "port 8080/tcp is taken", "kind": "conflict" })
        );
        let old: ApiError = serde_json::from_str(r#"{"error":"boom"}"#).unwrap();
        assert_eq!(old, ApiError::internal("boom"));
    }

    #[test]
    fn a_kind_survives_context_and_the_message_keeps_it() {
        let err = anyhow::Error::from(ApiError::not_found("service web not found"))
            .context("forwarding to the leader");
        let answer = ApiError::of(&err);
        assert_eq!(answer.kind, ErrorKind::NotFound);
        assert_eq!(
            answer.error,
            "forwarding to the leader: service web not found"
        );
        let untagged = anyhow::anyhow!("reading /proc/net/stat/arp_cache");
        assert_eq!(ApiError::kind_of(&untagged), ErrorKind::Internal);
        let tagged: anyhow::Result<()> = Err(untagged).kind(ErrorKind::Invalid);
        let tagged = tagged.unwrap_err();
        assert_eq!(ApiError::kind_of(&tagged), ErrorKind::Invalid);
        assert_eq!(tagged.to_string(), "reading /proc/net/stat/arp_cache");
        let kept: anyhow::Result<()> =
            Err(anyhow::Error::from(ApiError::conflict("taken"))).kind(ErrorKind::Invalid);
        assert_eq!(ApiError::kind_of(&kept.unwrap_err()), ErrorKind::Conflict);
    }
}
