//! What the daemon holds back while a gRPC request message arrives: its
//! deadline and its in-flight bytes.
//!
//! * Deadline (`--message-timeout-seconds`): once the first byte of a
//!   message is in (and its in-flight bytes are granted), the whole message
//!   must arrive within the timeout, or the request body fails with
//!   DEADLINE_EXCEEDED and the partial message is freed. Between messages a
//!   stream may be idle as long as it likes (a training script pushes
//!   between steps; HTTP/2 keep-alive finds dead peers).
//! * In-flight bytes (`--max-inflight-bytes`, `state::budget`): when a
//!   message's 5-byte prefix declares its length, its charge ([`charge`]:
//!   the message, its decoded form and what applying it allocates, and the
//!   request's buffers as they grow to it, [`REQUEST_BUFFERS`]) is
//!   taken from the daemon's [`Inflight`] budget *before* the prefix's last
//!   byte or any payload is passed on (tonic reserves the declared length
//!   when it parses the prefix). While the budget is full the body is not
//!   polled, so HTTP/2 flow control holds the client back. The permit goes
//!   to the handler through the request's [`Permits`] (one per message, in
//!   order), which drops it when it is done with that message. A message
//!   charged more than the whole budget is refused with
//!   RESOURCE_EXHAUSTED; one above `--max-message-bytes` is passed on
//!   uncharged for tonic to refuse.
//!
//! Owns only the framing count of the request body (the prefix: flag and
//! big-endian length); decoding stays tonic's.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use super::error::ServerError;
use super::state::{Inflight, InflightPermit};
use crate::proto::vci_monitor_server::SERVICE_NAME;

/// How many times its encoded size a `Push` message may hold: its bytes
/// (copied once out of tonic's receive buffer by `proto::codec`; prost's
/// `bytes` field is a slice of that copy, and the fold reads float32
/// values there), the fold's centred f64 copy (2× a float32 value, at
/// most 2.5× with the padding of `stats::operand_stride`), and the batch's
/// class tables (16 bytes per value of each class present: at most 4× a
/// float32 batch), 7.5× in all for float32. Only the first fold that
/// grows a shard's buffers allocates them (they are then reserved in the
/// accumulator budget); a float16 batch, widened to f64 in the shard's
/// buffer first, with a distinct class on most rows can briefly hold up
/// to 18× then (README "Limits").
const PUSH_CHARGE: u64 = 10;
/// A `PushStats` block: the received bytes, the decoded block, the
/// accumulator built from it.
const STATS_CHARGE: u64 = 3;
/// Any other message: the received bytes and the decoded message.
const OTHER_CHARGE: u64 = 2;
/// Buffers a request keeps as large as its largest message until it ends:
/// tonic's receive buffer, and the codec's (`proto::codec`), into which
/// each message is copied out of tonic's and which a stream reuses once
/// its message is gone. Charged once per request, for what they grow by.
const REQUEST_BUFFERS: u64 = 2;

/// The in-flight charge of one request message of `len` bytes to the
/// gRPC method at `path`. Its first `len` bytes are the received bytes,
/// charged with the request's buffers ([`REQUEST_BUFFERS`]); the rest goes
/// with the message to its handler.
fn charge(path: &str, len: u64) -> u64 {
    let method = path
        .strip_prefix('/')
        .and_then(|p| p.strip_prefix(SERVICE_NAME))
        .and_then(|p| p.strip_prefix('/'));
    let factor = match method {
        Some("Push") => PUSH_CHARGE,
        Some("PushStats") => STATS_CHARGE,
        _ => OTHER_CHARGE,
    };
    len.saturating_mul(factor)
}

/// The in-flight permits of one request's messages, in arrival order (a
/// request extension shared by the body, which adds them, and the handler,
/// which takes one per message it receives).
#[derive(Clone, Debug, Default)]
pub(crate) struct Permits(Arc<Mutex<VecDeque<InflightPermit>>>);

impl Permits {
    /// The request's permits (none for a request that did not come
    /// through the body wrapper).
    pub(crate) fn of(extensions: &tonic::Extensions) -> Permits {
        extensions.get::<Permits>().cloned().unwrap_or_default()
    }

    /// The permit of the oldest message not yet taken.
    pub(crate) fn pop(&self) -> Option<InflightPermit> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop_front()
    }

    fn push(&self, permit: InflightPermit) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push_back(permit);
    }
}

/// What a body wrapper needs from the daemon.
#[derive(Clone, Debug)]
pub(crate) struct Gate {
    pub(crate) inflight: Arc<Inflight>,
    pub(crate) timeout: Duration,
    pub(crate) max_message_bytes: usize,
}

/// A request body whose messages are charged to the in-flight budget
/// before they are passed on and must each arrive within the timeout.
pub(crate) struct DeadlineBody {
    inner: tonic::body::Body,
    gate: Gate,
    /// The request's path (the method, for [`charge`]).
    path: String,
    permits: Permits,
    /// Bytes of the current message's 5-byte prefix seen so far.
    prefix: [u8; 5],
    prefix_len: usize,
    /// Payload bytes of the current message still to come.
    remaining: u64,
    /// Size of the current message (for the error).
    size: u64,
    /// Armed while a message is partly received (not while it waits for
    /// in-flight bytes: that wait is the daemon's, not the client's).
    deadline: Option<Pin<Box<Sleep>>>,
    /// Received data not yet passed on; its first `counted` bytes went
    /// through the framing count.
    held: Bytes,
    counted: usize,
    /// The in-flight bytes of the message whose prefix was just counted,
    /// with the bytes the request's buffers grow by.
    acquiring: Option<BoxFuture<'static, InflightPermit>>,
    /// What the message being received adds to the request's buffers.
    growth: u64,
    /// The request's buffers ([`REQUEST_BUFFERS`]), charged here until the
    /// request ends.
    buffer: Option<InflightPermit>,
    /// A refusal to report instead of passing the message on.
    refused: Option<ServerError>,
}

impl DeadlineBody {
    /// Wraps `request`'s body and gives the request its [`Permits`].
    pub(crate) fn wrap(
        mut request: tonic::codegen::http::Request<tonic::body::Body>,
        gate: &Gate,
    ) -> tonic::codegen::http::Request<tonic::body::Body> {
        let permits = Permits::default();
        request.extensions_mut().insert(permits.clone());
        let path = request.uri().path().to_owned();
        request.map(|inner| {
            tonic::body::Body::new(DeadlineBody::new(inner, gate.clone(), path, permits))
        })
    }

    fn new(inner: tonic::body::Body, gate: Gate, path: String, permits: Permits) -> DeadlineBody {
        DeadlineBody {
            inner,
            gate,
            path,
            permits,
            prefix: [0; 5],
            prefix_len: 0,
            remaining: 0,
            size: 0,
            deadline: None,
            held: Bytes::new(),
            counted: 0,
            acquiring: None,
            growth: 0,
            buffer: None,
            refused: None,
        }
    }

    /// Counts `data` through the framing; re-arms the deadline when a
    /// message starts, disarms it when none is in progress. Stops right
    /// after a prefix whose message must first get its in-flight bytes
    /// (then `acquiring` or `refused` is set); returns the bytes counted.
    fn advance(&mut self, data: &[u8]) -> usize {
        let mut used = 0;
        while used < data.len() {
            let rest = &data[used..];
            if self.remaining > 0 {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(rest.len());
                self.remaining -= take as u64;
                used += take;
                continue;
            }
            if self.prefix_len == 0 {
                // A new message starts here.
                self.deadline = Some(Box::pin(tokio::time::sleep(self.gate.timeout)));
            }
            let take = (5 - self.prefix_len).min(rest.len());
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&rest[..take]);
            self.prefix_len += take;
            used += take;
            if self.prefix_len == 5 {
                self.prefix_len = 0;
                let len = &self.prefix[1..5];
                self.remaining = u64::from(u32::from_be_bytes([len[0], len[1], len[2], len[3]]));
                self.size = self.remaining;
                // tonic refuses a message above its limit by itself.
                if self.size <= self.gate.max_message_bytes as u64 {
                    self.admit();
                    return used;
                }
            }
        }
        if self.remaining == 0 && self.prefix_len == 0 {
            self.deadline = None;
        }
        used
    }

    /// Starts taking the in-flight bytes of the message whose prefix was
    /// just counted, or refuses it when they exceed the whole budget.
    fn admit(&mut self) {
        // What the message holds with buffers of its size (its request's
        // first message needs all of it).
        let buffers = REQUEST_BUFFERS.saturating_mul(self.size);
        let handed = charge(&self.path, self.size).saturating_sub(self.size);
        let charge = handed.saturating_add(buffers);
        let inflight = &self.gate.inflight;
        if charge > inflight.limit() {
            self.refused = Some(ServerError::InflightTooLarge {
                len: self.size,
                charge,
                limit: inflight.limit(),
            });
            return;
        }
        let held = self.buffer.as_ref().map_or(0, InflightPermit::bytes);
        self.growth = buffers.saturating_sub(held);
        let needed = handed + self.growth;
        self.deadline = None;
        self.acquiring = Some(Box::pin(Arc::clone(inflight).acquire(needed)));
    }

    fn expired(&self) -> tonic::Status {
        let received = self.size - self.remaining;
        tonic::Status::deadline_exceeded(format!(
            "message: expected each message to arrive within {} s of its first byte \
             (--message-timeout-seconds), received {received} of its {} bytes",
            self.gate.timeout.as_secs_f64(),
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
        loop {
            if let Some(acquiring) = this.acquiring.as_mut() {
                // Not polling the inner body meanwhile is the back-pressure.
                let mut permit = std::task::ready!(acquiring.as_mut().poll(cx));
                this.acquiring = None;
                let growth = permit.split(this.growth);
                match this.buffer.as_mut() {
                    Some(buffer) => buffer.absorb(growth),
                    None => this.buffer = Some(growth),
                }
                this.permits.push(permit);
                if this.remaining > 0 {
                    this.deadline = Some(Box::pin(tokio::time::sleep(this.gate.timeout)));
                }
            }
            if this.counted < this.held.len() {
                let held = this.held.clone();
                this.counted += this.advance(&held[this.counted..]);
            }
            if let Some(err) = this.refused.take() {
                // Nothing more of this body is read.
                this.inner = tonic::body::Body::empty();
                this.held = Bytes::new();
                this.counted = 0;
                this.remaining = 0;
                return Poll::Ready(Some(Err(err.into())));
            }
            // Pass on what is counted, but keep the last prefix byte while
            // its message waits for in-flight bytes.
            let ready = this.counted - usize::from(this.acquiring.is_some());
            if ready > 0 {
                this.counted -= ready;
                return Poll::Ready(Some(Ok(Frame::data(this.held.split_to(ready)))));
            }
            if this.acquiring.is_some() {
                continue;
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        this.held = data;
                        this.counted = 0;
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                Poll::Ready(other) => return Poll::Ready(other),
                Poll::Pending => {
                    let expired = this
                        .deadline
                        .as_mut()
                        .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                    if expired {
                        this.deadline = None;
                        return Poll::Ready(Some(Err(this.expired())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.acquiring.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for DeadlineBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadlineBody")
            .field("remaining", &self.remaining)
            .field("waiting", &self.acquiring.is_some())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const PUSH: &str = "/vcid.v1.VciMonitor/Push";

    /// A body of `chunks` to `path` under an in-flight budget of `limit`.
    fn body(chunks: Vec<Vec<u8>>, path: &str, limit: u64) -> (DeadlineBody, Arc<Inflight>) {
        let frames = chunks
            .into_iter()
            .map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(c))));
        let inner = tonic::body::Body::new(http_body_util::StreamBody::new(
            futures::stream::iter(frames).chain(futures::stream::pending()),
        ));
        let inflight = Arc::new(Inflight::new(limit));
        let gate = Gate {
            inflight: Arc::clone(&inflight),
            timeout: Duration::from_secs(1),
            max_message_bytes: 64 << 20,
        };
        let b = DeadlineBody::new(inner, gate, path.to_owned(), Permits::default());
        (b, inflight)
    }

    /// The data passed on until the body waits (10 ms without a frame).
    async fn drain(b: &mut DeadlineBody) -> Vec<u8> {
        let mut out = Vec::new();
        while let Ok(frame) =
            tokio::time::timeout(Duration::from_millis(10), BodyExt::frame(b)).await
        {
            out.extend_from_slice(&frame.unwrap().unwrap().into_data().unwrap());
        }
        out
    }

    use futures::StreamExt as _;

    #[tokio::test]
    async fn messages_pass_on_whole_each_with_its_permit() {
        // A 3-byte message with its prefix split across chunks, then a
        // 1-byte and an empty message in one chunk.
        let chunks = vec![
            vec![0, 0, 0],
            vec![0, 3, 1],
            vec![2, 3, 0, 0, 0, 0, 1, 9, 0, 0, 0, 0, 0],
        ];
        let sent: Vec<u8> = chunks.concat();
        let (mut b, inflight) = body(chunks, "/vcid.v1.VciMonitor/GetRun", 100);
        assert_eq!(drain(&mut b).await, sent);
        assert!(b.deadline.is_none(), "idle between messages");
        // The request's two buffers, each of the largest message (3), and,
        // per message, the decoded message (3, 1 and 0).
        assert_eq!(inflight.used(), 10);
        let handed: Vec<u64> = b
            .permits
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|p| p.bytes())
            .collect();
        assert_eq!(handed, vec![3, 1, 0]);
        b.permits.0.lock().unwrap().clear();
        assert_eq!(inflight.used(), 6);
        drop(b);
        assert_eq!(inflight.used(), 0);
    }

    #[tokio::test]
    async fn a_message_waits_for_in_flight_room_before_its_prefix_ends() {
        // Two 8-byte Push messages under a budget of 100: 72 bytes each
        // for its handler, 16 for the stream's buffers.
        let message = |v: u8| [vec![0, 0, 0, 0, 8], vec![v; 8]].concat();
        let (mut b, inflight) = body(vec![[message(1), message(2)].concat()], PUSH, 100);
        let first = drain(&mut b).await;
        // The first message whole and the second's prefix but its last byte.
        assert_eq!(first, [message(1), vec![0, 0, 0, 0]].concat());
        assert_eq!(inflight.used(), 88);
        assert!(
            b.deadline.is_none(),
            "waiting for room is not the client's delay"
        );
        // The handler is done with the first: the second passes on.
        drop(b.permits.pop());
        assert_eq!(drain(&mut b).await, [vec![8], vec![2; 8]].concat());
        assert_eq!(inflight.used(), 88);
    }

    #[tokio::test]
    async fn a_message_charged_beyond_the_budget_is_refused() {
        // 90 bytes for its handler and 20 for the stream's buffers.
        let (mut b, inflight) = body(vec![vec![0, 0, 0, 0, 10, 1]], PUSH, 100);
        let status = BodyExt::frame(&mut b).await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(
            BodyExt::frame(&mut b).await.is_none(),
            "nothing after the refusal"
        );
        assert!(
            status
                .message()
                .contains("a message of 10 bytes holds up to 110 bytes")
                && status.message().contains("--max-inflight-bytes"),
            "{}",
            status.message()
        );
        assert_eq!(inflight.used(), 0);
    }

    #[tokio::test]
    async fn the_deadline_runs_inside_a_message_once_admitted() {
        let (mut b, _) = body(vec![vec![0, 0x03, 0xC0, 0, 0, 7]], PUSH, 1 << 30);
        assert_eq!(drain(&mut b).await, vec![0, 0x03, 0xC0, 0, 0, 7]);
        assert_eq!((b.remaining, b.size), ((60 << 20) - 1, 60 << 20));
        assert!(b.deadline.is_some());
        assert!(b
            .expired()
            .message()
            .contains("received 1 of its 62914560 bytes"));
    }
}
