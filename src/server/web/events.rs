//! `GET /api/v1/events[?run=RUN]`: the live stream of the web view as
//! server-sent events, fed by the daemon's broadcast of results and run
//! changes (the machinery behind gRPC `Watch`).
//!
//! Events (`event:` name, `data:` one JSON document):
//!
//! | event | data |
//! |---|---|
//! | `hello` | `{"version": ...}`, first, once the subscription is in place: re-read state now and nothing is missed |
//! | `result` | an epoch result (as in `/history`) as soon as its epoch closed |
//! | `run` | a run (as in `/runs/{run}`, without `latest`) when it is created or finished |
//! | `run_deleted` | `{"run_id": ...}`; with `?run=` the stream then ends |
//! | `resync` | `{"missed": n}`: this subscriber fell behind and lost `n` events; re-read state |
//!
//! The stream ends when the daemon shuts down (browsers reconnect by
//! themselves). Owns the event names and framing; it must not change
//! daemon state.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::{broadcast, watch};

use crate::server::daemon::{Daemon, WatchEvent};
use crate::server::http::HttpState;

use super::api::{query_params, ApiError};
use super::format;

/// How often an idle stream sends a comment, so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

struct Subscriber {
    rx: broadcast::Receiver<WatchEvent>,
    shutdown: watch::Receiver<bool>,
    daemon: Arc<Daemon>,
    /// Only this run's events (id and uid), when set.
    run: Option<String>,
    uid: Option<u64>,
    hello: bool,
    done: bool,
}

fn event<T: serde::Serialize>(name: &str, data: &T) -> Event {
    let data = serde_json::to_string(data).unwrap_or_else(|_| "null".to_owned());
    Event::default().event(name).data(data)
}

async fn next_event(mut sub: Subscriber) -> Option<(Result<Event, Infallible>, Subscriber)> {
    if sub.hello {
        sub.hello = false;
        let hello = serde_json::json!({ "version": env!("CARGO_PKG_VERSION"), "run": sub.run });
        return Some((Ok(event("hello", &hello)), sub));
    }
    if sub.done {
        return None;
    }
    let wanted = |sub: &Subscriber, run_id: &str| sub.run.as_deref().is_none_or(|r| r == run_id);
    // A result or deletion of the run subscribed to, or (subscribed to
    // every run) of a run that is still current: never one of an earlier
    // run of the same id.
    let of_run = |sub: &Subscriber, run_id: &str, uid: u64| {
        wanted(sub, run_id)
            && match sub.uid {
                Some(own) => own == uid,
                None => sub.daemon.is_current(run_id, uid),
            }
    };
    loop {
        let received = tokio::select! {
            _ = sub.shutdown.wait_for(|stopping| *stopping) => return None,
            received = sub.rx.recv() => received,
        };
        let out = match received {
            Ok(WatchEvent::Result { uid, result }) if of_run(&sub, &result.run_id, uid) => {
                event("result", &format::ResultJson(result.as_ref()))
            }
            Ok(WatchEvent::RunChanged(run)) if wanted(&sub, &run.run_id) => {
                event("run", &format::run_json(&run, None))
            }
            Ok(WatchEvent::RunDeleted { run_id, uid })
                if wanted(&sub, &run_id) && sub.uid.is_none_or(|own| own == uid) =>
            {
                sub.done = sub.run.is_some();
                event("run_deleted", &serde_json::json!({ "run_id": run_id }))
            }
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                event("resync", &serde_json::json!({ "missed": missed }))
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        return Some((Ok(out), sub));
    }
}

/// `GET /api/v1/events`: NOT_FOUND for `?run=` naming an unknown run (as
/// `Watch`).
pub(crate) async fn events(
    State(state): State<HttpState>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = query_params(query, &["run"])?;
    let run = params
        .into_iter()
        .next()
        .map(|(_, run)| run)
        .filter(|run| !run.is_empty());
    let (rx, uid) = match &run {
        Some(run) => {
            let (rx, uid) = state.daemon.subscribe(run)?;
            (rx, Some(uid))
        }
        None => (state.daemon.subscribe_all(), None),
    };
    let subscriber = Subscriber {
        rx,
        shutdown: state.shutdown.clone(),
        daemon: Arc::clone(&state.daemon),
        run,
        uid,
        hello: true,
        done: false,
    };
    let stream = futures::stream::unfold(subscriber, next_event);
    let mut response = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    // Reverse proxies (nginx) must not buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}
