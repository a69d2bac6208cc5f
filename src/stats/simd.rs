//! The slice kernels of the per-row passes and merges, at the machine's
//! vector width.
//!
//! Owns every loop over a row of d values that the statistics run per row or
//! per class, and the loops over a batch's encoded bytes that the server's
//! decoder runs (exact widening to f64, and the masked maximum that finds a
//! NaN or infinity without decoding). Each kernel is compiled three times,
//! for AVX-512F, for AVX2 and for baseline x86-64, and every call runs the
//! widest variant the CPU supports (detected once at run time), so the
//! binary stays built for the baseline target and runs anywhere.
//!
//! The kernels that read a batch's rows take them as any [`Value`] type
//! (f64, or little-endian float32 bytes read in place) and widen each
//! value exactly where it is read, so both give the same bits.
//!
//! The kernels are plain loops that vectorise at any width with the same
//! result: element-wise updates, and sums with eight fixed partial sums
//! (IEEE rules forbid reordering one running sum). Rust never contracts
//! `a * b + c` into an FMA, so every variant computes bit-for-bit the same
//! numbers.
//!
//! Must not: hold state (the level is `crate::cpu`'s), allocate, or know
//! what the slices mean.

use crate::cpu::dispatched;

/// Partial sums per reduction: one 512-bit vector of f64, two of 256 bits.
const LANES: usize = 8;

/// A feature value as a batch's rows hold it, read as the f64 it stands
/// for (exactly: every implementation widens without rounding).
pub trait Value: Copy + Send + Sync + 'static {
    /// The value as f64.
    fn wide(self) -> f64;
}

impl Value for f64 {
    #[inline(always)]
    fn wide(self) -> f64 {
        self
    }
}

/// Four bytes are a little-endian IEEE binary32 value, as a batch arrives
/// on the wire (no alignment: `bytes.as_chunks::<4>()` reads a received
/// buffer in place).
impl Value for [u8; 4] {
    #[inline(always)]
    fn wide(self) -> f64 {
        f64::from(f32::from_le_bytes(self))
    }
}

dispatched! {
    /// `dst += src`.
    pub(crate) fn add_assign(dst: &mut [f64], src: &[f64]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }

    /// `dst += a · src`.
    pub(crate) fn add_scaled<T: Value>(dst: &mut [f64], src: &[T], a: f64) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += a * s.wide();
        }
    }

    /// `dst += src + a · v` (one column of a scatter merge).
    pub(crate) fn add_with_scaled(dst: &mut [f64], src: &[f64], v: &[f64], a: f64) {
        for ((d, &s), &x) in dst.iter_mut().zip(src).zip(v) {
            *d += s + a * x;
        }
    }

    /// `dst = x − y`.
    pub(crate) fn difference<T: Value>(dst: &mut [f64], x: &[T], y: &[f64]) {
        for ((d, &a), &b) in dst.iter_mut().zip(x).zip(y) {
            *d = a.wide() - b;
        }
    }

    /// `dst += src`; returns the sum of `src − src`, NaN exactly when `src`
    /// holds a NaN or an infinity (the class sums double as the finiteness
    /// check), and `Σ src²` with the partial sums of
    /// [`squared_difference`]`(src, 1, src, 0)` (the same bits for finite
    /// values).
    pub(crate) fn add_assign_checked<T: Value>(dst: &mut [f64], src: &[T]) -> (f64, f64) {
        let mut poison = [0.0; LANES];
        let mut squares = [0.0; LANES];
        let n = src.len() - src.len() % LANES;
        for (ds, ss) in dst[..n]
            .chunks_exact_mut(LANES)
            .zip(src[..n].chunks_exact(LANES))
        {
            for lane in 0..LANES {
                let s = ss[lane].wide();
                ds[lane] += s;
                poison[lane] += finiteness(s);
                squares[lane] += s * s;
            }
        }
        let (mut rest, mut rest_squares) = (0.0, 0.0);
        for (d, &s) in dst[n..].iter_mut().zip(&src[n..]) {
            let s = s.wide();
            *d += s;
            rest += finiteness(s);
            rest_squares += s * s;
        }
        (
            poison.iter().sum::<f64>() + rest,
            squares.iter().sum::<f64>() + rest_squares,
        )
    }

    /// The sums of [`add_assign_checked`] without the addition: the sum of
    /// `src − src` (NaN exactly when `src` holds a NaN or an infinity) and
    /// `Σ src²`, with the same bits.
    pub(crate) fn checked_sums<T: Value>(src: &[T]) -> (f64, f64) {
        let mut poison = [0.0; LANES];
        let mut squares = [0.0; LANES];
        let n = src.len() - src.len() % LANES;
        for ss in src[..n].chunks_exact(LANES) {
            for lane in 0..LANES {
                let s = ss[lane].wide();
                poison[lane] += finiteness(s);
                squares[lane] += s * s;
            }
        }
        let (mut rest, mut rest_squares) = (0.0, 0.0);
        for &s in &src[n..] {
            let s = s.wide();
            rest += finiteness(s);
            rest_squares += s * s;
        }
        (
            poison.iter().sum::<f64>() + rest,
            squares.iter().sum::<f64>() + rest_squares,
        )
    }

    /// The Chan merge of a class's only row `h` of a batch into the class's
    /// running mean and unit-vector sum, in one pass: `mean += (x − mean) ·
    /// step` and `unit += a·x + 0`, where `x = h + 0`. Returns `‖x − mean‖²`
    /// and `Σ (a·x + 0 − b·unit)²`, both before the update. These are the
    /// bits of [`move_mean`], [`squared_difference`] (with 1 for the row's
    /// weight) and [`add_assign`] on a compact slot holding the mean `x` and
    /// the unit sum `a·x + 0` (the `+ 0`s make −0 into +0, as adding into
    /// zeros does).
    pub(crate) fn merge_row<T: Value>(
        mean: &mut [f64],
        unit: &mut [f64],
        h: &[T],
        step: f64,
        a: f64,
        b: f64,
    ) -> (f64, f64) {
        let mut moved = [0.0; LANES];
        let mut spread = [0.0; LANES];
        let n = h.len() - h.len() % LANES;
        for ((ms, us), hs) in mean[..n]
            .chunks_exact_mut(LANES)
            .zip(unit[..n].chunks_exact_mut(LANES))
            .zip(h[..n].chunks_exact(LANES))
        {
            for lane in 0..LANES {
                let x = hs[lane].wide() + 0.0;
                let d = x - ms[lane];
                moved[lane] += d * d;
                ms[lane] += d * step;
                let u = a * x + 0.0;
                let e = 1.0 * u - b * us[lane];
                spread[lane] += e * e;
                us[lane] += u;
            }
        }
        let (mut rest_moved, mut rest_spread) = (0.0, 0.0);
        for ((m, u_sum), &x) in mean[n..].iter_mut().zip(&mut unit[n..]).zip(&h[n..]) {
            let x = x.wide() + 0.0;
            let d = x - *m;
            rest_moved += d * d;
            *m += d * step;
            let u = a * x + 0.0;
            let e = 1.0 * u - b * *u_sum;
            rest_spread += e * e;
            *u_sum += u;
        }
        (
            moved.iter().sum::<f64>() + rest_moved,
            spread.iter().sum::<f64>() + rest_spread,
        )
    }

    /// `Σ_i (a·x_i − b·y_i)²`.
    pub(crate) fn squared_difference<T: Value>(x: &[T], a: f64, y: &[f64], b: f64) -> f64 {
        let mut partial = [0.0; LANES];
        let n = x.len() - x.len() % LANES;
        for (xs, ys) in x[..n].chunks_exact(LANES).zip(y[..n].chunks_exact(LANES)) {
            for lane in 0..LANES {
                let e = a * xs[lane].wide() - b * ys[lane];
                partial[lane] += e * e;
            }
        }
        let rest: f64 = x[n..]
            .iter()
            .zip(&y[n..])
            .map(|(&x, &y)| (a * x.wide() - b * y) * (a * x.wide() - b * y))
            .sum();
        partial.iter().sum::<f64>() + rest
    }

    /// `Σ_i (a·x_i)²`: the bits of [`squared_difference`]`(x, a, x, 0)`.
    pub(crate) fn scaled_squares<T: Value>(x: &[T], a: f64) -> f64 {
        let mut partial = [0.0; LANES];
        let n = x.len() - x.len() % LANES;
        for xs in x[..n].chunks_exact(LANES) {
            for lane in 0..LANES {
                let e = a * xs[lane].wide();
                partial[lane] += e * e;
            }
        }
        let rest: f64 = x[n..].iter().map(|&x| (a * x.wide()) * (a * x.wide())).sum();
        partial.iter().sum::<f64>() + rest
    }

    /// `residual += h − m`; returns `Σ(h − m)²`.
    pub(crate) fn residual_pass<T: Value>(residual: &mut [f64], h: &[T], m: &[f64]) -> f64 {
        let mut partial = [0.0; LANES];
        let n = h.len() - h.len() % LANES;
        for ((rs, hs), ms) in residual[..n]
            .chunks_exact_mut(LANES)
            .zip(h[..n].chunks_exact(LANES))
            .zip(m[..n].chunks_exact(LANES))
        {
            for lane in 0..LANES {
                let e = hs[lane].wide() - ms[lane];
                rs[lane] += e;
                partial[lane] += e * e;
            }
        }
        let mut rest = 0.0;
        for ((r, &x), &y) in residual[n..].iter_mut().zip(&h[n..]).zip(&m[n..]) {
            let e = x.wide() - y;
            *r += e;
            rest += e * e;
        }
        partial.iter().sum::<f64>() + rest
    }

    /// [`residual_pass`] and [`add_scaled`]`(unit, h, a)` in one pass over
    /// `h` (the same bits as the two).
    pub(crate) fn residual_unit_pass<T: Value>(
        residual: &mut [f64],
        unit: &mut [f64],
        h: &[T],
        m: &[f64],
        a: f64,
    ) -> f64 {
        let mut partial = [0.0; LANES];
        let n = h.len() - h.len() % LANES;
        for (((rs, us), hs), ms) in residual[..n]
            .chunks_exact_mut(LANES)
            .zip(unit[..n].chunks_exact_mut(LANES))
            .zip(h[..n].chunks_exact(LANES))
            .zip(m[..n].chunks_exact(LANES))
        {
            for lane in 0..LANES {
                let x = hs[lane].wide();
                let e = x - ms[lane];
                rs[lane] += e;
                partial[lane] += e * e;
                us[lane] += a * x;
            }
        }
        let mut rest = 0.0;
        for (((r, u), &x), &y) in residual[n..]
            .iter_mut()
            .zip(&mut unit[n..])
            .zip(&h[n..])
            .zip(&m[n..])
        {
            let x = x.wide();
            let e = x - y;
            *r += e;
            rest += e * e;
            *u += a * x;
        }
        partial.iter().sum::<f64>() + rest
    }

    /// `mean += residual · scale`; returns `Σ(residual · scale)²`.
    pub(crate) fn shift_mean(mean: &mut [f64], residual: &[f64], scale: f64) -> f64 {
        let mut partial = [0.0; LANES];
        let n = mean.len() - mean.len() % LANES;
        for (ms, rs) in mean[..n]
            .chunks_exact_mut(LANES)
            .zip(residual[..n].chunks_exact(LANES))
        {
            for lane in 0..LANES {
                let shift = rs[lane] * scale;
                ms[lane] += shift;
                partial[lane] += shift * shift;
            }
        }
        let mut rest = 0.0;
        for (m, &r) in mean[n..].iter_mut().zip(&residual[n..]) {
            let shift = r * scale;
            *m += shift;
            rest += shift * shift;
        }
        partial.iter().sum::<f64>() + rest
    }

    /// The Chan update of a mean: `mean += (theirs − mean)·step`; returns
    /// `‖theirs − mean‖²` (before the update).
    pub(crate) fn move_mean(mean: &mut [f64], theirs: &[f64], step: f64) -> f64 {
        let mut partial = [0.0; LANES];
        let n = mean.len() - mean.len() % LANES;
        for (ms, ts) in mean[..n]
            .chunks_exact_mut(LANES)
            .zip(theirs[..n].chunks_exact(LANES))
        {
            for lane in 0..LANES {
                let d = ts[lane] - ms[lane];
                partial[lane] += d * d;
                ms[lane] += d * step;
            }
        }
        let mut rest = 0.0;
        for (m, &t) in mean[n..].iter_mut().zip(&theirs[n..]) {
            let d = t - *m;
            rest += d * d;
            *m += d * step;
        }
        partial.iter().sum::<f64>() + rest
    }

    /// `dst[i]` = the little-endian IEEE binary32 value in
    /// `src[4i..4i + 4]`, widened exactly.
    pub(crate) fn widen_f32(dst: &mut [f64], src: &[u8]) {
        for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d = f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        }
    }

    /// `dst[i]` = the little-endian bfloat16 value in `src[2i..2i + 2]`,
    /// widened exactly (its bits are the high half of a binary32).
    pub(crate) fn widen_bf16(dst: &mut [f64], src: &[u8]) {
        for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
            *d = f64::from(f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16));
        }
    }

    /// The largest `w & mask` over the little-endian 32-bit words of `src`
    /// (0 if there are none).
    pub(crate) fn max_masked_u32(src: &[u8], mask: u32) -> u32 {
        src.chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & mask)
            .fold(0, u32::max)
    }

    /// The largest `w & mask` over the little-endian 16-bit words of `src`
    /// (0 if there are none).
    pub(crate) fn max_masked_u16(src: &[u8], mask: u16) -> u16 {
        src.chunks_exact(2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) & mask)
            .fold(0, u16::max)
    }
}

/// `x − x`: NaN exactly for NaN and ±∞, else 0 (the finiteness term of
/// the checked sums). Not `x · 0`, which is NaN for the same values: with
/// the product LLVM paired the two sums into 128-bit vectors.
#[inline(always)]
#[allow(
    clippy::eq_op,
    reason = "x − x is the finiteness test: NaN exactly for NaN and ±∞"
)]
fn finiteness(x: f64) -> f64 {
    x - x
}

/// `‖x‖₂` of `values` given `squared`, their plain sum of squares as
/// [`squared_difference`]`(values, 1, values, 0)` or
/// [`add_assign_checked`] computes it; rescaled only when that sum over-
/// or underflows.
pub(crate) fn norm_from_squares<T: Value>(squared: f64, values: &[T]) -> f64 {
    if squared.is_finite() && squared > f64::MIN_POSITIVE {
        return squared.sqrt();
    }
    let scale = values.iter().fold(0.0_f64, |m, v| m.max(v.wide().abs()));
    if scale == 0.0 || !scale.is_finite() {
        return scale;
    }
    scale * scaled_squares(values, 1.0 / scale).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(values: &[f64]) -> f64 {
        norm_from_squares(squared_difference(values, 1.0, values, 0.0), values)
    }

    /// Every kernel once, at whatever level is set.
    fn all_kernels(x: &[f64], y: &[f64]) -> Vec<f64> {
        let mut out = y.to_vec();
        add_assign(&mut out, x);
        add_scaled(&mut out, x, 0.3);
        add_with_scaled(&mut out, y, x, -1.7);
        let mut diff = vec![0.0; x.len()];
        difference(&mut diff, x, y);
        let (poison, squares) = add_assign_checked(&mut out, &diff);
        let mut unit = y.to_vec();
        let fused = residual_unit_pass(&mut diff.clone(), &mut unit, x, y, 0.7);
        let mut residual = vec![0.5; x.len()];
        let spread = residual_pass(&mut residual, x, y);
        let shifted = shift_mean(&mut out, &residual, 0.01);
        let moved = move_mean(&mut out, x, 0.25);
        let (merged, merged_spread) = merge_row(&mut out, &mut unit, y, 0.5, 0.3, 0.2);
        let (checked, checked_squares) = checked_sums(&out);
        let scalars = [
            merged,
            merged_spread,
            checked,
            checked_squares,
            poison,
            squares,
            fused,
            spread,
            shifted,
            moved,
            squared_difference(x, 0.5, y, 2.0),
            norm(x),
        ];
        out.into_iter()
            .chain(diff)
            .chain(residual)
            .chain(unit)
            .chain(scalars)
            .collect()
    }

    #[test]
    fn every_level_gives_the_same_bits() {
        let x: Vec<f64> = (0..1003).map(|i| (i as f64 * 0.37).sin() * 1e3).collect();
        let y: Vec<f64> = (0..1003).map(|i| (i as f64 * 0.11).cos()).collect();
        crate::cpu::assert_the_same_bits_at_every_level(|| all_kernels(&x, &y));
        // The fused pass computes the same spread as its parts.
        let mut residual = vec![0.0; x.len()];
        assert_eq!(
            residual_pass(&mut residual, &x, &y),
            squared_difference(&x, 1.0, &y, 1.0)
        );
        // The fused passes give the same bits as the kernels they replace.
        let (mut sum, mut fused_sum) = (y.clone(), y.clone());
        add_assign(&mut sum, &x);
        let (_, squares) = add_assign_checked(&mut fused_sum, &x);
        assert_eq!(sum, fused_sum);
        assert_eq!(
            squares.to_bits(),
            squared_difference(&x, 1.0, &x, 0.0).to_bits()
        );
        assert_eq!(norm_from_squares(squares, &x), norm(&x));
        let (mut r1, mut r2) = (vec![0.25; x.len()], vec![0.25; x.len()]);
        let (mut u1, mut u2) = (y.clone(), y.clone());
        let spread = residual_pass(&mut r1, &x, &y);
        add_scaled(&mut u1, &x, 0.7);
        assert_eq!(
            residual_unit_pass(&mut r2, &mut u2, &x, &y, 0.7).to_bits(),
            spread.to_bits()
        );
        assert_eq!((r1, u1), (r2, u2));
        // The row merge gives the bits of the slot kernels it replaces on
        // a slot holding the row added into zeros, −0 included.
        let signed: Vec<f64> = x.iter().map(|&v| if v < 0.0 { -0.0 } else { v }).collect();
        let bits = |v: &[f64]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for values in [&x, &signed] {
            let mut slot_mean = vec![0.0; x.len()];
            let sums = add_assign_checked(&mut slot_mean, values);
            let only_sums = checked_sums(values);
            assert_eq!(sums.0.to_bits(), only_sums.0.to_bits());
            assert_eq!(sums.1.to_bits(), only_sums.1.to_bits());
            for (a, b) in [(1.5, 0.25), (-0.5, 1.0)] {
                let mut slot_unit = vec![0.0; x.len()];
                add_scaled(&mut slot_unit, &slot_mean, a);
                let (mut mean, mut unit) = (y.clone(), x.clone());
                let moved = move_mean(&mut mean, &slot_mean, 0.125);
                let spread = squared_difference(&slot_unit, 1.0, &unit, b);
                add_assign(&mut unit, &slot_unit);
                let (mut fused_mean, mut fused_unit) = (y.clone(), x.clone());
                let fused = merge_row(&mut fused_mean, &mut fused_unit, values, 0.125, a, b);
                assert_eq!(
                    (bits(&mean), bits(&unit)),
                    (bits(&fused_mean), bits(&fused_unit))
                );
                assert_eq!(
                    (moved.to_bits(), spread.to_bits()),
                    (fused.0.to_bits(), fused.1.to_bits())
                );
            }
        }
    }

    #[test]
    fn wire_kernels_agree_with_scalar_decoding_at_every_level() {
        let specials = [0.0f32, -0.0, 1.5, -2.0e-40, f32::MAX, f32::MIN_POSITIVE];
        let values: Vec<f32> = (0..1001)
            .map(|i| specials[i % specials.len()] * (1.0 + i as f32 / 7.0))
            .collect();
        let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let bf16_bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
            .collect();
        crate::cpu::assert_the_same_bits_at_every_level(|| {
            let mut out = vec![0.0; values.len()];
            widen_f32(&mut out, &f32_bytes);
            assert!(out
                .iter()
                .zip(&values)
                .all(|(&o, &v)| o.to_bits() == f64::from(v).to_bits()));
            let mut out16 = vec![0.0; values.len()];
            widen_bf16(&mut out16, &bf16_bytes);
            for (&o, v) in out16.iter().zip(&values) {
                let truncated = f32::from_bits(v.to_bits() & 0xffff_0000);
                assert_eq!(o.to_bits(), f64::from(truncated).to_bits());
            }
            let most = values.iter().map(|v| v.to_bits() & 0x7f80_0000).max();
            assert_eq!(Some(max_masked_u32(&f32_bytes, 0x7f80_0000)), most);
            let most16 = values
                .iter()
                .map(|v| (v.to_bits() >> 16) as u16 & 0x7f80)
                .max();
            assert_eq!(Some(max_masked_u16(&bf16_bytes, 0x7f80)), most16);
            assert_eq!(max_masked_u32(&[], 0x7f80_0000), 0);
            out.extend(out16);
            out
        });
    }

    #[test]
    fn checked_sum_flags_exactly_non_finite_values() {
        let mut sum = vec![0.0; 11];
        let finite: Vec<f64> = (0..11).map(|i| i as f64 * 1e300).collect();
        assert_eq!(add_assign_checked(&mut sum, &finite).0, 0.0);
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            for at in [0, 7, 10] {
                let mut row = finite.clone();
                row[at] = bad;
                assert!(
                    add_assign_checked(&mut sum, &row).0.is_nan(),
                    "{bad} at {at}"
                );
            }
        }
    }

    #[test]
    fn norm_survives_overflow_and_underflow() {
        assert!((norm(&[3e200, 4e200]) / 5e200 - 1.0).abs() < 1e-15);
        assert!((norm(&[3e-200, 4e-200]) - 5e-200).abs() < 1e-214);
        assert_eq!(norm(&[0.0, 0.0]), 0.0);
    }
}
