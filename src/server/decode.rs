//! Turns wire messages into validated values: names (README "API"), the
//! `FeatureBatch` bytes into checked [`WireRows`] (widened to f64 only when
//! folded, into the folding shard's reused buffer), a `StatsBlock` into
//! [`AccumulatorParts`].
//!
//! Pure functions without locks or I/O, so they run outside any lock (and
//! off the async runtime). Every error names the field, the expected and the
//! received value. Checks that need the statistics themselves (labels below
//! K, a consistent `StatsBlock`) are the math core's
//! (`Accumulator::check_labels` / `from_parts`), not repeated here.

use bytes::Bytes;
use half::{bf16, f16};
use ndarray::ArrayView2;

use crate::proto::{Encoding, FeatureBatch, StatsBlock};
use crate::stats::{simd, AccumulatorParts, StatsError};

use super::config::Limits;
use super::error::{shown, ServerError};

/// Longest `run_id`.
pub const MAX_RUN_ID_LEN: usize = 128;
/// Longest `split` or `layer`.
pub const MAX_NAME_LEN: usize = 64;
/// Longest `writer_id` (bounds the memory of the duplicate filter).
pub const MAX_WRITER_ID_LEN: usize = 128;
/// `split` used when the request leaves it empty.
pub const DEFAULT_SPLIT: &str = "train";
/// `layer` used when the request leaves it empty.
pub const DEFAULT_LAYER: &str = "penultimate";

/// The `(split, layer)` part of a stream; the run is held separately.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamKey {
    pub split: String,
    pub layer: String,
}

impl StreamKey {
    /// `run/split/layer`, how messages and logs name a stream.
    pub fn display(&self, run_id: &str) -> String {
        format!("{run_id}/{}/{}", self.split, self.layer)
    }
}

fn check_name(field: &str, value: &str, max_len: usize) -> Result<(), ServerError> {
    let ok_chars = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-'));
    if value.is_empty() || value.len() > max_len || !ok_chars {
        return Err(ServerError::invalid(
            field,
            format!("1-{max_len} characters of [A-Za-z0-9_.:-]"),
            shown(value),
        ));
    }
    Ok(())
}

/// Checks a `run_id` (1–128 characters of `[A-Za-z0-9_.:-]`).
pub fn check_run_id(run_id: &str) -> Result<(), ServerError> {
    check_name("run_id", run_id, MAX_RUN_ID_LEN)
}

/// Longest metadata key.
pub const MAX_METADATA_KEY_LEN: usize = 128;
/// Longest metadata value.
pub const MAX_METADATA_VALUE_LEN: usize = 1024;

/// Checks a run's metadata: at most `--max-metadata-entries` entries and
/// `--max-metadata-bytes` bytes (keys plus values), keys of 1–128 bytes,
/// values of at most 1024 bytes.
pub fn check_metadata<'a>(
    metadata: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
    limits: &Limits,
) -> Result<(), ServerError> {
    if metadata.len() > limits.max_metadata_entries {
        return Err(ServerError::invalid(
            "metadata",
            format!(
                "at most {} entries (--max-metadata-entries)",
                limits.max_metadata_entries
            ),
            format!("{} entries", metadata.len()),
        ));
    }
    let mut bytes = 0usize;
    for (key, value) in metadata {
        if key.is_empty()
            || key.len() > MAX_METADATA_KEY_LEN
            || value.len() > MAX_METADATA_VALUE_LEN
        {
            return Err(ServerError::invalid(
                format!("metadata[{}]", shown(key)),
                format!(
                    "a key of 1-{MAX_METADATA_KEY_LEN} bytes and a value of at most \
                     {MAX_METADATA_VALUE_LEN} bytes"
                ),
                format!("a {}-byte key and a {}-byte value", key.len(), value.len()),
            ));
        }
        bytes += key.len() + value.len();
    }
    if bytes > limits.max_metadata_bytes {
        return Err(ServerError::invalid(
            "metadata",
            format!(
                "at most {} bytes of keys and values (--max-metadata-bytes)",
                limits.max_metadata_bytes
            ),
            format!("{bytes} bytes"),
        ));
    }
    Ok(())
}

/// The stream key of a request: empty `split`/`layer` become
/// `train`/`penultimate`; others must be 1–64 characters of
/// `[A-Za-z0-9_.:-]`.
pub fn stream_key(split: &str, layer: &str) -> Result<StreamKey, ServerError> {
    let split = if split.is_empty() {
        DEFAULT_SPLIT
    } else {
        split
    };
    let layer = if layer.is_empty() {
        DEFAULT_LAYER
    } else {
        layer
    };
    check_name("split", split, MAX_NAME_LEN)?;
    check_name("layer", layer, MAX_NAME_LEN)?;
    Ok(StreamKey {
        split: split.to_owned(),
        layer: layer.to_owned(),
    })
}

/// Optional filter of `GetHistory`/`Watch`: empty means "any".
pub fn name_filter(field: &str, value: &str) -> Result<Option<String>, ServerError> {
    if value.is_empty() {
        return Ok(None);
    }
    check_name(field, value, MAX_NAME_LEN)?;
    Ok(Some(value.to_owned()))
}

/// The idempotence key of a batch: `None` when `writer_id` is empty.
pub fn dedup_key(writer_id: &str, sequence: u64) -> Result<Option<(String, u64)>, ServerError> {
    if writer_id.is_empty() {
        return Ok(None);
    }
    if writer_id.len() > MAX_WRITER_ID_LEN {
        return Err(ServerError::invalid(
            "writer_id",
            format!("at most {MAX_WRITER_ID_LEN} bytes"),
            format!("{} bytes", writer_id.len()),
        ));
    }
    Ok(Some((writer_id.to_owned(), sequence)))
}

/// Bytes per value of an encoding.
pub fn encoding_width(encoding: Encoding) -> usize {
    match encoding {
        Encoding::Float32 => 4,
        Encoding::Float16 | Encoding::Bfloat16 => 2,
    }
}

/// The features of a checked `FeatureBatch`: `rows × d` little-endian
/// values of one encoding, still the received bytes (prost's `bytes`
/// option makes them a slice of the message's buffer, `proto::codec`, not
/// a copy). Float32
/// values are folded where they lie ([`WireRows::float32`]); the 16-bit
/// encodings are widened by [`WireRows::widen_into`] into a buffer the
/// caller reuses, so a batch allocates nothing of size rows × d once that
/// buffer has grown to the batches' size.
#[derive(Clone, Debug)]
pub struct WireRows {
    bytes: Bytes,
    encoding: Encoding,
    rows: usize,
    dim: usize,
}

impl WireRows {
    /// `bytes` as `rows × dim` values of `encoding`; the error names the
    /// `features` field when the length is not `rows·dim·width`.
    pub fn new(
        bytes: Bytes,
        encoding: Encoding,
        rows: usize,
        dim: usize,
    ) -> Result<WireRows, ServerError> {
        let width = encoding_width(encoding);
        // rows and d fit in u32 on the wire, so this cannot overflow u128;
        // it can exceed usize on 32-bit targets, which the comparison handles.
        let expected_len = rows as u128 * dim as u128 * width as u128;
        if expected_len != bytes.len() as u128 {
            return Err(ServerError::invalid(
                "features",
                format!(
                    "rows·feature_dim·{width} = {rows}·{dim}·{width} = {expected_len} bytes of {}",
                    encoding.as_str_name()
                ),
                format!("{} bytes", bytes.len()),
            ));
        }
        Ok(WireRows {
            bytes,
            encoding,
            rows,
            dim,
        })
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The values where they lie when they are float32: the fold reads
    /// them in place (`stats::Value` for `[u8; 4]`); `None` for the 16-bit
    /// encodings, which [`WireRows::widen_into`] widens first.
    pub fn float32(&self) -> Option<&[[u8; 4]]> {
        (self.encoding == Encoding::Float32).then(|| self.bytes.as_chunks::<4>().0)
    }

    /// The values as a `rows × d` f64 matrix (row-major) in `buffer`,
    /// which grows only when it is too small (its values are overwritten,
    /// never cleared first).
    pub fn widen_into<'b>(
        &self,
        buffer: &'b mut Vec<f64>,
    ) -> Result<ArrayView2<'b, f64>, ServerError> {
        let len = self.rows * self.dim;
        if buffer.len() < len {
            buffer.resize(len, 0.0);
        }
        let (out, b) = (&mut buffer[..len], &self.bytes[..]);
        match self.encoding {
            Encoding::Float32 => simd::widen_f32(out, b),
            Encoding::Bfloat16 => simd::widen_bf16(out, b),
            Encoding::Float16 => {
                for (d, b) in out.iter_mut().zip(b.chunks_exact(2)) {
                    *d = widen_one(Encoding::Float16, b);
                }
            }
        }
        ArrayView2::from_shape((self.rows, self.dim), &buffer[..len]).map_err(|err| {
            ServerError::Internal(format!(
                "features of {}x{} do not fit a matrix: {err}",
                self.rows, self.dim
            ))
        })
    }

    /// Refuses the batch at its first NaN or infinite value (in row
    /// order), with the error the math core gives, without widening it: a
    /// value is NaN or infinite exactly when its exponent bits are all
    /// ones, which one vectorised pass over the bytes looks for; only a
    /// batch that has one is searched value by value for the first.
    pub fn check_finite(&self) -> Result<(), StatsError> {
        let b = &self.bytes[..];
        let all_ones = match self.encoding {
            Encoding::Float32 => simd::max_masked_u32(b, F32_EXPONENT) == F32_EXPONENT,
            Encoding::Float16 => simd::max_masked_u16(b, F16_EXPONENT) == F16_EXPONENT,
            Encoding::Bfloat16 => simd::max_masked_u16(b, BF16_EXPONENT) == BF16_EXPONENT,
        };
        if !all_ones {
            return Ok(());
        }
        let first_bad = self
            .bytes
            .chunks_exact(encoding_width(self.encoding))
            .map(|value| widen_one(self.encoding, value))
            .enumerate()
            .find(|(_, value)| !value.is_finite());
        match first_bad {
            None => Ok(()),
            Some((i, value)) => Err(StatsError::NonFinite {
                row: i / self.dim,
                column: i % self.dim,
                value,
            }),
        }
    }
}

/// One value of `encoding` (its `encoding_width` little-endian bytes),
/// widened exactly.
fn widen_one(encoding: Encoding, b: &[u8]) -> f64 {
    match encoding {
        Encoding::Float32 => f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        Encoding::Float16 => f16::from_le_bytes([b[0], b[1]]).to_f64(),
        Encoding::Bfloat16 => bf16::from_le_bytes([b[0], b[1]]).to_f64(),
    }
}

/// The exponent bits of IEEE binary32, float16 and bfloat16: all ones
/// exactly for NaN and ±∞.
const F32_EXPONENT: u32 = 0x7f80_0000;
const F16_EXPONENT: u16 = 0x7c00;
const BF16_EXPONENT: u16 = 0x7f80;

/// A `FeatureBatch` whose names and shape have been checked; labels are
/// still unchecked against K and values against NaN/Inf.
#[derive(Debug)]
pub struct DecodedBatch {
    pub key: StreamKey,
    pub epoch: u64,
    pub features: WireRows,
    pub labels: Vec<u32>,
    pub dedup: Option<(String, u64)>,
}

/// Validates a batch's names and shape against its run (`feature_dim`
/// fixes the byte length); the features stay in their encoding.
pub fn decode_batch(
    batch: FeatureBatch,
    feature_dim: u32,
    max_rows: u32,
) -> Result<DecodedBatch, ServerError> {
    let key = stream_key(&batch.split, &batch.layer)?;
    let dedup = dedup_key(&batch.writer_id, batch.sequence)?;
    if batch.rows == 0 {
        return Err(ServerError::invalid("rows", "at least 1", "0"));
    }
    if batch.rows > max_rows {
        return Err(ServerError::TooManyRows {
            rows: u64::from(batch.rows),
            max: max_rows,
        });
    }
    let encoding = Encoding::try_from(batch.encoding).map_err(|_| {
        ServerError::invalid(
            "encoding",
            "ENCODING_FLOAT32 (0), ENCODING_FLOAT16 (1) or ENCODING_BFLOAT16 (2)",
            batch.encoding.to_string(),
        )
    })?;
    let rows = batch.rows as usize;
    let features = WireRows::new(batch.features, encoding, rows, feature_dim as usize)?;
    if batch.labels.len() != rows {
        return Err(ServerError::invalid(
            "labels",
            format!("{rows} labels (one per row)"),
            format!("{} labels", batch.labels.len()),
        ));
    }
    Ok(DecodedBatch {
        key,
        epoch: batch.epoch,
        features,
        labels: batch.labels,
        dedup,
    })
}

/// A `StatsBlock` with checked names, as parts of the run's shape (the
/// math core's `Accumulator::from_parts` validates the values).
#[derive(Debug)]
pub struct DecodedStats {
    pub key: StreamKey,
    pub epoch: u64,
    pub parts: AccumulatorParts,
    pub dedup: Option<(String, u64)>,
}

/// Checks a `StatsBlock`'s names and that it holds at least one sample.
pub fn decode_stats(
    block: StatsBlock,
    num_classes: u32,
    feature_dim: u32,
) -> Result<DecodedStats, ServerError> {
    let key = stream_key(&block.split, &block.layer)?;
    let dedup = dedup_key(&block.writer_id, block.sequence)?;
    let samples: u128 = block.class_counts.iter().map(|&n| u128::from(n)).sum();
    if samples == 0 {
        return Err(ServerError::invalid(
            "class_counts",
            "at least one sample",
            format!(
                "{} classes with 0 samples in total",
                block.class_counts.len()
            ),
        ));
    }
    Ok(DecodedStats {
        key,
        epoch: block.epoch,
        parts: block.into_parts(num_classes, feature_dim),
        dedup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Value;

    #[test]
    fn names_follow_the_spec() {
        assert!(check_run_id("run-1_a.b:c").is_ok());
        assert!(check_run_id("").is_err());
        assert!(check_run_id("a b").is_err());
        assert!(check_run_id(&"x".repeat(129)).is_err());
        assert!(check_run_id(&"x".repeat(128)).is_ok());
        let key = stream_key("", "").unwrap();
        assert_eq!(
            (key.split.as_str(), key.layer.as_str()),
            ("train", "penultimate")
        );
        let err = stream_key("val/x", "").unwrap_err().to_string();
        assert!(err.contains("split") && err.contains("val/x"), "{err}");
        assert!(stream_key(&"s".repeat(65), "").is_err());
    }

    #[test]
    fn decodes_all_encodings() {
        let vals = [1.5f32, -2.25, 0.0, 1024.0];
        let mut b32 = Vec::new();
        let mut b16 = Vec::new();
        let mut bb16 = Vec::new();
        for v in vals {
            b32.extend_from_slice(&v.to_le_bytes());
            b16.extend_from_slice(&f16::from_f32(v).to_le_bytes());
            bb16.extend_from_slice(&bf16::from_f32(v).to_le_bytes());
        }
        for (bytes, enc) in [
            (b32, Encoding::Float32),
            (b16, Encoding::Float16),
            (bb16, Encoding::Bfloat16),
        ] {
            let batch = FeatureBatch {
                run_id: "r".into(),
                rows: 2,
                features: bytes.into(),
                encoding: enc as i32,
                labels: vec![0, 1],
                ..Default::default()
            };
            let out = decode_batch(batch, 2, 10).unwrap();
            let mut buffer = vec![7.0; 9];
            let got = out.features.widen_into(&mut buffer).unwrap();
            assert_eq!(got.shape(), [2, 2]);
            let got: Vec<f64> = got.iter().copied().collect();
            assert_eq!(got, vec![1.5, -2.25, 0.0, 1024.0], "{enc:?}");
            assert!(out.features.check_finite().is_ok());
            // Float32 is also read in place, as the same values.
            let in_place = out
                .features
                .float32()
                .map(|v| v.iter().map(|&b| b.wide()).collect());
            let expected = (enc == Encoding::Float32).then_some(got);
            assert_eq!(in_place, expected, "{enc:?}");
        }
    }

    #[test]
    fn the_first_non_finite_value_is_named_in_every_encoding() {
        let vals = [1.0f32, 2.0, f32::INFINITY, f32::NAN];
        let encoded: [(Encoding, Vec<u8>); 3] = [
            (
                Encoding::Float32,
                vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            (
                Encoding::Float16,
                vals.iter()
                    .flat_map(|&v| f16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
            (
                Encoding::Bfloat16,
                vals.iter()
                    .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                    .collect(),
            ),
        ];
        for (enc, bytes) in encoded {
            let rows = WireRows::new(bytes.into(), enc, 2, 2).unwrap();
            match rows.check_finite() {
                Err(StatsError::NonFinite {
                    row: 1,
                    column: 0,
                    value,
                }) => {
                    assert_eq!(value, f64::INFINITY, "{enc:?}")
                }
                other => panic!("{enc:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_largest_finite_values_pass_and_a_last_non_finite_one_is_found() {
        // The largest finite value of each encoding has every exponent bit
        // but the lowest set; a NaN with any payload or ±∞ has them all.
        let cases: [(Encoding, Vec<u8>, Vec<u8>); 3] = [
            (
                Encoding::Float32,
                f32::MAX.to_le_bytes().to_vec(),
                f32::from_bits(0xffc0_1234).to_le_bytes().to_vec(),
            ),
            (
                Encoding::Float16,
                f16::MAX.to_le_bytes().to_vec(),
                f16::NEG_INFINITY.to_le_bytes().to_vec(),
            ),
            (
                Encoding::Bfloat16,
                bf16::MIN.to_le_bytes().to_vec(),
                bf16::from_bits(0x7f81).to_le_bytes().to_vec(),
            ),
        ];
        for (enc, largest, bad) in cases {
            let dim = 37;
            let finite: Vec<u8> = largest.repeat(3 * dim);
            let rows = WireRows::new(finite.clone().into(), enc, 3, dim).unwrap();
            assert!(rows.check_finite().is_ok(), "{enc:?}");
            let mut last_bad = finite;
            let width = bad.len();
            let at = last_bad.len() - width;
            last_bad[at..].copy_from_slice(&bad);
            let rows = WireRows::new(last_bad.into(), enc, 3, dim).unwrap();
            match rows.check_finite() {
                Err(StatsError::NonFinite {
                    row: 2,
                    column,
                    value,
                }) => {
                    assert_eq!(column, dim - 1, "{enc:?}");
                    assert!(!value.is_finite(), "{enc:?}");
                }
                other => panic!("{enc:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn shape_errors_name_the_field() {
        let base = FeatureBatch {
            run_id: "r".into(),
            rows: 2,
            features: vec![0; 16].into(),
            labels: vec![0, 1],
            ..Default::default()
        };
        let err = decode_batch(
            FeatureBatch {
                features: vec![0; 15].into(),
                ..base.clone()
            },
            2,
            10,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("features") && err.contains("16") && err.contains("15"),
            "{err}"
        );
        let err = decode_batch(
            FeatureBatch {
                labels: vec![0],
                ..base.clone()
            },
            2,
            10,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("labels") && err.contains("2 labels"), "{err}");
        let err = decode_batch(
            FeatureBatch {
                encoding: 7,
                ..base.clone()
            },
            2,
            10,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("encoding") && err.contains('7'), "{err}");
        let err = decode_batch(
            FeatureBatch {
                rows: 0,
                ..base.clone()
            },
            2,
            10,
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let err = decode_batch(base, 2, 1).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    }
}
