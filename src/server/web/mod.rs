//! The web view and the HTTP API, served on the HTTP listener beside
//! `/metrics`:
//!
//! | route | what |
//! |---|---|
//! | `GET /` | the web view (one page: runs, epoch-indexed charts, live) |
//! | `GET /assets/*` | its script and styles and the vendored uPlot, embedded in the binary |
//! | `GET /api/v1/runs`, `/api/v1/runs/{run}`, `/api/v1/runs/{run}/history` | [`api`] |
//! | `GET /api/v1/events` | [`events`] (server-sent events) |
//! | `POST /login`, `POST /logout` | the token form of a daemon with `--auth-token-file` |
//!
//! With a bearer token configured, `/` and `/api/*` require it, either as
//! `Authorization: Bearer <token>` (scripts) or as the `HttpOnly`,
//! `SameSite=Strict` cookie that the login form sets (browsers:
//! `EventSource` cannot send headers). Both are checked by the same
//! constant-time [`RequireToken::check`] as gRPC calls, with the same
//! UNAUTHENTICATED messages. `/metrics`, `/healthz`, `/readyz` and the
//! static assets stay open.
//!
//! Owns routes and authentication of HTTP requests; it must not change
//! daemon state (every handler is a read).

pub mod api;
pub mod events;
pub mod format;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{any, get, post};
use axum::{Form, Router};

use super::error::ServerError;
use super::http::HttpState;
use crate::auth::RequireToken;
use crate::metrics::registry::METRICS;

/// Name of the cookie holding the (hex-encoded) token.
const COOKIE: &str = "vcid_token";

const INDEX_HTML: &str = include_str!("assets/index.html");
const LOGIN_HTML: &str = include_str!("assets/login.html");
const APP_JS: &str = include_str!("assets/app.js");
const APP_CSS: &str = include_str!("assets/app.css");
const UPLOT_JS: &str = include_str!("assets/vendor/uplot/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("assets/vendor/uplot/uPlot.min.css");

/// Headers of every page: no framing by other sites, no inline scripts,
/// nothing fetched from elsewhere.
const CSP: &str = "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The web view's routes, merged into the HTTP listener's router.
pub(crate) fn router(state: &HttpState) -> Router<HttpState> {
    let guarded = Router::new()
        .route("/", get(index))
        .route("/api/v1/runs", get(api::runs))
        .route("/api/v1/runs/{run}", get(api::run))
        .route("/api/v1/runs/{run}/history", get(api::history))
        .route("/api/v1/events", get(events::events))
        .route("/api/{*rest}", any(api::unknown_route))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .merge(guarded)
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/app.js", get(|| asset("text/javascript", APP_JS)))
        .route("/assets/app.css", get(|| asset("text/css", APP_CSS)))
        .route(
            "/assets/uPlot.iife.min.js",
            get(|| asset("text/javascript", UPLOT_JS)),
        )
        .route(
            "/assets/uPlot.min.css",
            get(|| asset("text/css", UPLOT_CSS)),
        )
}

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
        ],
        body,
    )
        .into_response()
}

fn page(status: StatusCode, html: String) -> Response {
    (
        status,
        [
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        Html(html),
    )
        .into_response()
}

/// The page's configuration, read by `app.js` from a JSON script element:
/// the chartable metrics (the registry's [`METRICS`]), the version, whether a
/// token is in use (to offer "log out").
fn page_config(auth: bool) -> String {
    let metrics: Vec<serde_json::Value> = METRICS
        .iter()
        .map(|m| serde_json::json!({ "name": m.name, "label": m.label, "log": m.log_scale }))
        .collect();
    let config = serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "auth": auth,
        "metrics": metrics,
    });
    // Inside <script>, "</" would end the element.
    config.to_string().replace("</", "<\\/")
}

async fn index(State(state): State<HttpState>) -> Response {
    let html = INDEX_HTML.replace("{{CONFIG}}", &page_config(state.auth.enabled()));
    page(StatusCode::OK, html)
}

fn login_html(message: &str) -> String {
    LOGIN_HTML.replace("{{MESSAGE}}", message)
}

async fn login_page(State(state): State<HttpState>) -> Response {
    if !state.auth.enabled() {
        return Redirect::to("/").into_response();
    }
    page(StatusCode::OK, login_html(""))
}

/// The token from `Authorization` or, failing that, the cookie; checked
/// like a gRPC call's.
fn authorize(auth: &RequireToken, headers: &HeaderMap) -> Result<(), ServerError> {
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        return auth.check(Some(value.as_bytes()));
    }
    match cookie_token(headers) {
        Some(token) => {
            let mut presented = b"Bearer ".to_vec();
            presented.extend_from_slice(&token);
            auth.check(Some(&presented))
        }
        None => auth.check(None),
    }
}

/// The middleware in front of `/` and `/api/*`.
async fn require_token(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    match authorize(&state.auth, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(err) if request.uri().path().starts_with("/api/") => api::ApiError(err).into_response(),
        Err(_) => {
            let mut response = page(
                StatusCode::UNAUTHORIZED,
                login_html("This daemon requires its access token."),
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"vcid\""),
            );
            response
        }
    }
}

#[derive(Debug, serde::Deserialize)]
struct LoginForm {
    token: String,
}

/// `POST /login`: a right token sets the cookie and goes to the page; a
/// wrong one shows the form again (401).
async fn login(State(state): State<HttpState>, Form(form): Form<LoginForm>) -> Response {
    let token = form.token.trim();
    let presented = format!("Bearer {token}");
    if !state.auth.enabled() || state.auth.check(Some(presented.as_bytes())).is_err() {
        let message = if state.auth.enabled() {
            "Wrong token."
        } else {
            "This daemon has no access token."
        };
        return page(StatusCode::UNAUTHORIZED, login_html(message));
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
        hex_encode(token.as_bytes())
    );
    let mut response = Redirect::to("/").into_response();
    if let Ok(value) = HeaderValue::from_str(&cookie) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

/// `POST /logout`: forgets the cookie.
async fn logout() -> Response {
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("vcid_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    response
}

/// The token in the `vcid_token` cookie, if there is a well-formed one.
fn cookie_token(headers: &HeaderMap) -> Option<Vec<u8>> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then(|| hex_decode(value)).flatten()
        })
}

/// Lower-case hex: any token is a valid cookie value this way.
fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_round_trips_any_token() {
        for token in ["s3cret", "a b;c=\"d\",é"] {
            let mut headers = HeaderMap::new();
            let value = format!("other=1; {COOKIE}={}; x=y", hex_encode(token.as_bytes()));
            headers.insert(header::COOKIE, HeaderValue::from_str(&value).unwrap());
            assert_eq!(cookie_token(&headers).unwrap(), token.as_bytes());
        }
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("vcid_token=zz"));
        assert_eq!(cookie_token(&headers), None);
        assert_eq!(hex_decode("abc"), None);
    }

    #[test]
    fn header_wins_over_cookie_and_both_are_checked() {
        let auth = RequireToken::new(Some("tok"));
        let mut headers = HeaderMap::new();
        assert!(authorize(&auth, &headers).is_err());
        let cookie = format!("{COOKIE}={}", hex_encode(b"tok"));
        headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert!(authorize(&auth, &headers).is_ok());
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer no"));
        assert!(authorize(&auth, &headers).is_err());
        assert!(authorize(&RequireToken::new(None), &HeaderMap::new()).is_ok());
    }
}
