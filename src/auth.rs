//! Bearer tokens of the gRPC API, for both ends: the token's format and
//! reading it from a file, the client interceptor that sends it
//! ([`AttachToken`]) and the daemon's interceptor that checks it on every
//! call (the VciMonitor service, health checking and reflection alike).
//!
//! A token is the content of its file without surrounding whitespace:
//! non-empty printable ASCII, as it travels in the header
//! `authorization: Bearer <token>`. The daemon compares tokens in time
//! independent of where they differ, so a token cannot be guessed byte by
//! byte. This module must not decide where a token file is named (flags and
//! environment are the command line's) nor log a token (`Debug` hides it).

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

use crate::server::ServerError;

/// Why a token was refused before use.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read it: {0}")]
    Read(#[from] std::io::Error),
    /// Nothing but whitespace.
    #[error("expected a token, received only whitespace")]
    Empty,
    /// Characters a header value cannot carry.
    #[error("expected a token of printable ASCII characters, received other characters")]
    NotAscii,
}

/// A validated bearer token.
#[derive(Clone)]
pub struct BearerToken {
    token: Arc<str>,
    /// `Bearer <token>`, ready for the `authorization` header.
    header: MetadataValue<Ascii>,
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<hidden>)")
    }
}

impl BearerToken {
    /// A token as written in a token file: surrounding whitespace (the
    /// trailing newline) is ignored.
    pub fn new(text: &str) -> Result<BearerToken, TokenError> {
        let token = text.trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        if !token.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) {
            return Err(TokenError::NotAscii);
        }
        let header = format!("Bearer {token}")
            .parse()
            .map_err(|_| TokenError::NotAscii)?;
        Ok(BearerToken {
            token: Arc::from(token),
            header,
        })
    }

    /// Reads a token file.
    pub fn read_file(path: &Path) -> Result<BearerToken, TokenError> {
        BearerToken::new(&std::fs::read_to_string(path)?)
    }

    /// The token itself.
    pub fn as_str(&self) -> &str {
        &self.token
    }
}

/// Client side: adds `authorization: Bearer <token>` to every request when
/// a token is set, e.g.
/// `VciMonitorClient::with_interceptor(channel, AttachToken::new(Some(token)))`.
#[derive(Clone, Debug, Default)]
pub struct AttachToken {
    token: Option<BearerToken>,
}

impl AttachToken {
    /// `None`: requests go out unchanged (for a daemon with auth off).
    pub fn new(token: Option<BearerToken>) -> AttachToken {
        AttachToken { token }
    }
}

impl Interceptor for AttachToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.header.clone());
        }
        Ok(request)
    }
}

/// Daemon side: accepts every call when no token is configured; otherwise
/// requires `authorization: Bearer <token>`.
#[derive(Clone, Debug, Default)]
pub(crate) struct RequireToken {
    token: Option<Arc<[u8]>>,
}

impl RequireToken {
    /// `None` turns authentication off.
    pub(crate) fn new(token: Option<&str>) -> RequireToken {
        RequireToken {
            token: token.map(|t| Arc::from(t.as_bytes())),
        }
    }

    /// Whether a token is required.
    pub(crate) fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Checks an `authorization` header value.
    pub(crate) fn check(&self, header: Option<&[u8]>) -> Result<(), ServerError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let Some(value) = header else {
            return Err(ServerError::Unauthenticated("no authorization header"));
        };
        let Some(presented) = value.strip_prefix(b"Bearer ") else {
            return Err(ServerError::Unauthenticated(
                "an authorization header that is not a Bearer token",
            ));
        };
        if constant_time_eq(presented, token) {
            Ok(())
        } else {
            Err(ServerError::Unauthenticated("a wrong token"))
        }
    }
}

impl Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        self.check(header)?;
        Ok(request)
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_trimmed_and_validated() {
        let token = BearerToken::new("  abc123\n").unwrap();
        assert_eq!(token.as_str(), "abc123");
        assert_eq!(token.header.to_str().unwrap(), "Bearer abc123");
        assert!(!format!("{token:?}").contains("abc123"));
        assert!(matches!(BearerToken::new(" \n"), Err(TokenError::Empty)));
        assert!(matches!(
            BearerToken::new("tok\u{e9}n"),
            Err(TokenError::NotAscii)
        ));
        assert!(matches!(
            BearerToken::new("a\u{7}b"),
            Err(TokenError::NotAscii)
        ));
        let missing = BearerToken::read_file(Path::new("/nonexistent/vcid-token"));
        assert!(matches!(missing, Err(TokenError::Read(_))));
    }

    #[test]
    fn the_client_sends_what_the_daemon_accepts() {
        let token = BearerToken::new("s3cret\n").unwrap();
        let sent = AttachToken::new(Some(token))
            .call(Request::new(()))
            .unwrap();
        let mut daemon = RequireToken::new(Some("s3cret"));
        assert!(daemon.call(sent).is_ok());
        let unsent = AttachToken::default().call(Request::new(())).unwrap();
        assert_eq!(
            daemon.call(unsent).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }

    #[test]
    fn checks_tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        let off = RequireToken::new(None);
        assert!(off.check(None).is_ok());
        let on = RequireToken::new(Some("s3cret"));
        assert!(on.check(Some(b"Bearer s3cret")).is_ok());
        for bad in [
            None,
            Some(&b"Bearer nope"[..]),
            Some(&b"s3cret"[..]),
            Some(&b"Basic s3cret"[..]),
        ] {
            let err = on.check(bad).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated);
        }
    }
}
