//! The gRPC codec of the generated client and server (`build.rs` names it):
//! prost encoding as tonic's own, and decoding from a buffer that each
//! stream recycles.
//!
//! Owns only how a message's bytes reach prost; it must not look at fields
//! (`server::decode` checks them) or hold anything beyond one spare buffer
//! per stream.
//!
//! Why: a `FeatureBatch`'s `features` are a zero-copy `Bytes` slice of the
//! buffer the message was decoded from, and live until the batch is folded.
//! With tonic's decoder that buffer is tonic's own receive buffer, so every
//! message made tonic allocate a fresh one (a 2 MiB batch: about 500 page
//! faults as it was filled, from memory the allocator had just returned).
//! Here each message is copied once into a buffer of the stream's own: the
//! one a folded batch gave back when there is one, so in a long `Push`
//! stream neither buffer is allocated again. A buffer whose stream has ended
//! is freed with its last batch.

use std::marker::PhantomData;
use std::sync::{Arc, Mutex, Weak};

use bytes::{Buf, Bytes};
use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// A message's buffer is a multiple of this many bytes.
const PAGE: usize = 4096;

/// [`tonic::codec::Codec`] of every vcid method: [`ProstEncoder`] to encode,
/// [`RecyclingDecoder`] to decode.
#[derive(Debug)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RecyclingDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        RecyclingDecoder {
            spare: Arc::new(Mutex::new(None)),
            _message: PhantomData,
        }
    }
}

/// Decodes the messages of one stream, each from a copy in a buffer that
/// returns to `spare` when the last `Bytes` of the message drops (at most
/// one is kept: a `Push` stream's next message reuses the buffer of the
/// batch folded before it).
#[derive(Debug)]
pub struct RecyclingDecoder<U> {
    spare: Arc<Mutex<Option<Vec<u8>>>>,
    _message: PhantomData<U>,
}

impl<U: Message + Default> Decoder for RecyclingDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let spare = self.spare.lock().ok().and_then(|mut slot| slot.take());
        let mut bytes = spare.unwrap_or_default();
        bytes.clear();
        // Rounded up, so that the stream's next message fits too when it is
        // a little longer (a batch's sequence number takes one more byte).
        bytes.reserve_exact(buf.remaining().next_multiple_of(PAGE));
        while buf.has_remaining() {
            let chunk = buf.chunk();
            let len = chunk.len();
            bytes.extend_from_slice(chunk);
            buf.advance(len);
        }
        let owner = Recycled {
            bytes,
            home: Arc::downgrade(&self.spare),
        };
        // Tonic's mapping of a malformed message (as its own prost codec).
        U::decode(Bytes::from_owner(owner))
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

/// A message's buffer; dropped with its last `Bytes`, it goes back to its
/// stream's empty spare slot, or is freed.
struct Recycled {
    bytes: Vec<u8>,
    home: Weak<Mutex<Option<Vec<u8>>>>,
}

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let Some(home) = self.home.upgrade() else {
            return;
        };
        let Ok(mut slot) = home.lock() else {
            return;
        };
        slot.get_or_insert_with(|| std::mem::take(&mut self.bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::FeatureBatch;
    use futures::StreamExt;
    use tonic::codec::{Codec as _, Streaming};

    fn batch(sequence: u64, fill: u8) -> FeatureBatch {
        FeatureBatch {
            run_id: "run".into(),
            rows: 64,
            features: Bytes::from(vec![fill; 64 * 1024]),
            sequence,
            ..FeatureBatch::default()
        }
    }

    /// `messages` framed as a gRPC request body: each behind its
    /// uncompressed flag and big-endian length.
    fn request_body(messages: &[Vec<u8>]) -> axum::body::Body {
        let mut body = Vec::new();
        for m in messages {
            body.push(0u8);
            body.extend_from_slice(&u32::try_from(m.len()).unwrap().to_be_bytes());
            body.extend_from_slice(m);
        }
        axum::body::Body::from(body)
    }

    #[tokio::test]
    async fn a_stream_reuses_the_buffer_of_a_dropped_message_and_decodes_like_prost() {
        // The last one a byte longer (its sequence number is 128).
        let sent: Vec<FeatureBatch> = [1, 2, 3, 128].map(|i| batch(i, i as u8)).to_vec();
        let encoded: Vec<Vec<u8>> = sent.iter().map(Message::encode_to_vec).collect();
        let decoder = Codec::<FeatureBatch, FeatureBatch>::default().decoder();
        let spare = Arc::clone(&decoder.spare);
        let spare_buffer = || {
            let slot = spare.lock().unwrap();
            slot.as_ref().map(|v| (v.as_ptr() as usize, v.capacity()))
        };
        let mut stream = Streaming::new_request(decoder, request_body(&encoded), None, None);
        let mut next = async || stream.next().await.unwrap().unwrap();

        let first = next().await;
        let second = next().await;
        let third = next().await;
        assert_eq!([&first, &second, &third], [&sent[0], &sent[1], &sent[2]]);
        assert_eq!(spare_buffer(), None, "every buffer is held by its message");
        drop(first);
        let (at, capacity) = spare_buffer().expect("the first message's buffer is the spare");
        assert!(
            capacity >= encoded[3].len(),
            "{capacity} bytes hold the longer message"
        );
        let fourth = next().await;
        assert_eq!(fourth, sent[3]);
        assert_eq!(spare_buffer(), None, "the spare was taken");
        let features = fourth.features.as_ptr() as usize;
        assert!(
            (at..at + capacity).contains(&features),
            "decoded into the spare"
        );
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_malformed_message_is_tonics_internal_error() {
        let valid = batch(7, 9).encode_to_vec();
        // A field header with a length past the end of the message.
        let malformed = vec![0x32, 0x7f, 1, 2];
        let decoder = Codec::<FeatureBatch, FeatureBatch>::default().decoder();
        let body = request_body(&[valid, malformed]);
        let mut stream = Streaming::new_request(decoder, body, None, None);
        assert_eq!(stream.next().await.unwrap().unwrap(), batch(7, 9));
        let status = stream.next().await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
        assert!(status.message().contains("buffer underflow"), "{status:?}");
    }

    #[test]
    fn a_buffer_outliving_its_stream_is_freed_with_it() {
        let decoder = Codec::<FeatureBatch, FeatureBatch>::default().decoder();
        let message = Recycled {
            bytes: vec![1; 16],
            home: Arc::downgrade(&decoder.spare),
        };
        drop(decoder);
        assert!(
            message.home.upgrade().is_none(),
            "a message keeps no slot alive"
        );
        drop(message);
    }
}
