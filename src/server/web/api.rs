//! The JSON/CSV handlers of the HTTP API (`/api/v1/runs`,
//! `/api/v1/runs/{run}`, `/api/v1/runs/{run}/history`) and the one mapping
//! of a [`ServerError`] to an HTTP response: the status that matches its
//! gRPC code and a JSON body `{"code": "NOT_FOUND", "message": "..."}` with
//! the gRPC code name and the very message gRPC sends.
//!
//! Every handler calls the same [`Daemon`](crate::server::Daemon) method as
//! the gRPC service, so validation and messages are shared; it must not
//! change daemon state.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::proto::GetHistoryRequest;
use crate::server::error::ServerError;
use crate::server::http::HttpState;

use super::format;

/// The gRPC code name (`NOT_FOUND`, …), as gRPC clients print it.
pub(crate) fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The HTTP status of a gRPC code (the mapping of Google's HTTP/JSON
/// transcoding, `google.rpc.Code`).
pub(crate) fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code::*;
    match code {
        Ok => StatusCode::OK,
        Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        InvalidArgument | FailedPrecondition | OutOfRange => StatusCode::BAD_REQUEST,
        DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        NotFound => StatusCode::NOT_FOUND,
        AlreadyExists | Aborted => StatusCode::CONFLICT,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Unknown | Internal | DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A [`ServerError`] answered over HTTP.
#[derive(Debug)]
pub(crate) struct ApiError(pub ServerError);

impl From<ServerError> for ApiError {
    fn from(err: ServerError) -> Self {
        ApiError(err)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = self.0.code();
        let body = serde_json::json!({
            "code": code_name(code),
            "message": self.0.to_string(),
        });
        json_response(http_status(code), &body)
    }
}

/// `value` as an `application/json` response.
pub(crate) fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response {
    let mut body = match serde_json::to_string(value) {
        Ok(body) => body,
        Err(err) => {
            let err = ServerError::Internal(format!("encoding JSON: {err}"));
            return ApiError(err).into_response();
        }
    };
    body.push('\n');
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

/// The query parameters of a request, checked against the names a route
/// accepts: an unknown or repeated parameter is INVALID_ARGUMENT.
pub(crate) fn query_params(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    allowed: &[&str],
) -> Result<Vec<(String, String)>, ServerError> {
    let Query(pairs) = query.map_err(|rejection| {
        ServerError::invalid(
            "query string",
            "URL-encoded UTF-8 name=value pairs",
            rejection.body_text(),
        )
    })?;
    let mut seen: Vec<&str> = Vec::new();
    for (name, _) in &pairs {
        if !allowed.contains(&name.as_str()) {
            return Err(ServerError::invalid(
                "query string",
                format!("parameters among {}", allowed.join(", ")),
                format!("{name:?}"),
            ));
        }
        if seen.contains(&name.as_str()) {
            return Err(ServerError::invalid(
                name.clone(),
                "at most one value",
                "the parameter twice",
            ));
        }
        seen.push(name);
    }
    Ok(pairs)
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> &'a str {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

/// `GET /api/v1/runs`: `{"runs": [...]}` ordered by run id, each with its
/// `latest` results.
pub(crate) async fn runs(State(state): State<HttpState>) -> Response {
    let runs: Vec<serde_json::Value> = state
        .daemon
        .list_runs()
        .iter()
        .map(|run| {
            // A run deleted in between simply has no latest results.
            let latest = state.daemon.latest_results(&run.run_id).unwrap_or_default();
            format::run_json(run, Some(&latest))
        })
        .collect();
    json_response(StatusCode::OK, &serde_json::json!({ "runs": runs }))
}

/// `GET /api/v1/runs/{run}`: the run (as `GetRun`) with its `latest`
/// results; NOT_FOUND (404) for an unknown run.
pub(crate) async fn run(
    State(state): State<HttpState>,
    Path(run_id): Path<String>,
) -> Result<Response, ApiError> {
    let run = state.daemon.get_run(&run_id)?;
    let latest = state.daemon.latest_results(&run_id)?;
    Ok(json_response(
        StatusCode::OK,
        &format::run_json(&run, Some(&latest)),
    ))
}

/// `GET /api/v1/runs/{run}/history?split=&layer=&format=json|csv`: the
/// results `GetHistory` returns, in its order (split, layer, epoch).
pub(crate) async fn history(
    State(state): State<HttpState>,
    Path(run_id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = query_params(query, &["split", "layer", "format"])?;
    let csv = match param(&params, "format") {
        "" | "json" => false,
        "csv" => true,
        other => {
            return Err(ServerError::invalid("format", "json or csv", format!("{other:?}")).into())
        }
    };
    let request = GetHistoryRequest {
        run_id: run_id.clone(),
        split: param(&params, "split").to_owned(),
        layer: param(&params, "layer").to_owned(),
    };
    let daemon = std::sync::Arc::clone(&state.daemon);
    // Cloning a long history is O(results): off the async runtime.
    let history = tokio::task::spawn_blocking(move || daemon.history(&request))
        .await
        .map_err(|e| ServerError::Internal(format!("history task failed: {e}")))??;
    if csv {
        let body = format::history_csv(&history.results);
        let disposition = format!("inline; filename=\"{run_id}-history.csv\"");
        return Ok((
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/csv; charset=utf-8"),
                ),
                (
                    header::CONTENT_DISPOSITION,
                    HeaderValue::from_str(&disposition)
                        .unwrap_or_else(|_| HeaderValue::from_static("inline")),
                ),
            ],
            body,
        )
            .into_response());
    }
    Ok(json_response(
        StatusCode::OK,
        &format::HistoryJson::new(&run_id, &history.results),
    ))
}

/// Any other path under `/api/`: NOT_FOUND as JSON.
pub(crate) async fn unknown_route(uri: axum::http::Uri) -> Response {
    let message = format!(
        "path: expected /api/v1/runs, /api/v1/runs/{{run}}, /api/v1/runs/{{run}}/history or \
         /api/v1/events, received {:?}",
        uri.path()
    );
    let body = serde_json::json!({ "code": code_name(tonic::Code::NotFound), "message": message });
    json_response(StatusCode::NOT_FOUND, &body)
}
