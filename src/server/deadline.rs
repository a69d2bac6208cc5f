//! The deadline of a gRPC message that stops arriving
//! (`--message-timeout-seconds`): once the first byte of a message is in,
//! the whole message must arrive within the timeout, or the request body
//! fails with DEADLINE_EXCEEDED and the partial message is freed. Between
//! messages a stream may be idle as long as it likes (a training script
//! pushes between steps; HTTP/2 keep-alive finds dead peers).
//!
//! Owns only the framing count of the request body (the 5-byte gRPC
//! prefix: flag and big-endian length); decoding stays tonic's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// A request body whose messages must each arrive within `timeout`.
pub(crate) struct DeadlineBody {
    inner: tonic::body::Body,
    timeout: Duration,
    /// Bytes of the current message's 5-byte prefix seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Payload bytes of the current message still to come.
    remaining: u64,
    /// Size of the current message (for the error).
    size: u64,
    /// Armed while a message is partly received.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl DeadlineBody {
    pub(crate) fn wrap(inner: tonic::body::Body, timeout: Duration) -> tonic::body::Body {
        tonic::body::Body::new(DeadlineBody {
            inner,
            timeout,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
            size: 0,
            deadline: None,
        })
    }

    /// Counts `data` through the framing; re-arms the deadline when a
    /// message starts, disarms it when none is in progress.
    fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.remaining -= take as u64;
                data.advance(take);
                continue;
            }
            if self.prefix_len == 0 {
                // A new message starts here.
                self.deadline = Some(Box::pin(tokio::time::sleep(self.timeout)));
            }
            let take = (5 - self.prefix_len).min(data.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            data.advance(take);
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let len = &self.prefix[1..5];
                self.remaining = u64::from(u32::from_be_bytes([len[0], len[1], len[2], len[3]]));
                self.size = self.remaining;
            }
        }
        if self.remaining == 0 && self.prefix_len == 0 {
            self.deadline = None;
        }
    }

    fn expired(&self) -> tonic::Status {
        let received = self.size - self.remaining;
        tonic::Status::deadline_exceeded(format!(
            "message: expected each message to arrive within {} s of its first byte \
             (--message-timeout-seconds), received {received} of its {} bytes",
            self.timeout.as_secs_f64(),
            self.size
        ))
    }
}

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.advance(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other),
            Poll::Pending => {
                let expired = this
                    .deadline
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if expired {
                    this.deadline = None;
                    Poll::Ready(Some(Err(this.expired())))
                } else {
                    Poll::Pending
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for DeadlineBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineBody")
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> DeadlineBody {
        DeadlineBody {
            inner: tonic::body::Body::empty(),
            timeout: Duration::from_secs(1),
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
            size: 0,
            deadline: None,
        }
    }

    #[tokio::test]
    async fn the_deadline_is_armed_only_inside_a_message() {
        let mut b = body();
        // Prefix split across chunks: a 3-byte message.
        b.advance(&[0, 0, 0]);
        assert!(b.deadline.is_some());
        b.advance(&[0, 3, 1]);
        assert_eq!((b.remaining, b.size), (2, 3));
        assert!(b.deadline.is_some());
        // The rest, then a whole second message and an empty third.
        b.advance(&[2, 3, 0, 0, 0, 0, 1, 9, 0, 0, 0, 0, 0]);
        assert_eq!(b.remaining, 0);
        assert!(b.deadline.is_none(), "idle between messages");
        // A large declared length keeps it armed.
        b.advance(&[0, 0x03, 0xC0, 0, 0, 7]);
        assert_eq!((b.remaining, b.size), ((60 << 20) - 1, 60 << 20));
        assert!(b.deadline.is_some());
        assert!(b
            .expired()
            .message()
            .contains("received 1 of its 62914560 bytes"));
    }
}
