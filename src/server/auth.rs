//! Optional bearer-token check on every gRPC call (the VciMonitor service,
//! health checking and reflection alike), as a tonic interceptor.
//!
//! Owns token comparison only; it must not read files (the CLI reads
//! `--auth-token-file`). The comparison takes time independent of where
//! the tokens differ, so the token cannot be guessed byte by byte.

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

use super::error::ServerError;

/// Accepts every call when no token is configured; otherwise requires
/// `authorization: Bearer <token>`.
#[derive(Clone, Debug, Default)]
pub struct BearerAuth {
    token: Option<Arc<[u8]>>,
}

impl BearerAuth {
    /// `None` turns authentication off.
    pub fn new(token: Option<&str>) -> BearerAuth {
        BearerAuth {
            token: token.map(|t| Arc::from(t.as_bytes())),
        }
    }

    /// Whether a token is required.
    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// Checks an `authorization` header value.
    pub fn check(&self, header: Option<&[u8]>) -> Result<(), ServerError> {
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

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    let n = a.len().max(b.len());
    for i in 0..n {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

impl Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        self.check(header)?;
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        let off = BearerAuth::new(None);
        assert!(off.check(None).is_ok());
        let on = BearerAuth::new(Some("s3cret"));
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
