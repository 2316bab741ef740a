//! An error as an HTTP answer, for both of the agent's servers (the local API on its Unix
//! socket and the manager port): the status its kind stands for and the `shoal-api` body.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use shoal_api::ApiError;

#[derive(Debug)]
pub struct Failure(pub ApiError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure(ApiError::of(&err))
    }
}

impl From<ApiError> for Failure {
    fn from(err: ApiError) -> Self {
        Failure(err)
    }
}

#[cfg(test)]
mod tests {
    use shoal_api::ErrorKind;

    use super::*;

    #[tokio::test]
    async fn each_kind_answers_its_status_with_the_body() {
        for (kind, status) in [
            (ErrorKind::NotFound, StatusCode::NOT_FOUND),
            (ErrorKind::Conflict, StatusCode::CONFLICT),
            (ErrorKind::Unavailable, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorKind::Invalid, StatusCode::BAD_REQUEST),
            (ErrorKind::Forbidden, StatusCode::FORBIDDEN),
            (ErrorKind::Internal, StatusCode::INTERNAL_SERVER_ERROR),
        ] {
            let err = anyhow::Error::from(ApiError::new(kind, "what went wrong"))
                .context("doing the work");
            let response = Failure::from(err).into_response();
            assert_eq!(response.status(), status, "{kind:?}");
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            let body: ApiError = serde_json::from_slice(&body).unwrap();
            assert_eq!(
                body,
                ApiError::new(kind, "doing the work: what went wrong"),
                "{kind:?}"
            );
        }
    }

    #[test]
    fn an_error_nobody_classified_is_internal() {
        let failure = Failure::from(anyhow::anyhow!("reading /sys/fs/bpf/shoal: EPERM"));
        assert_eq!(
            failure.into_response().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
