//! The eigenvalues of a symmetric matrix without its eigenvectors, by a
//! two-stage reduction to tridiagonal form (as LAPACK's `dsytrd_2stage`
//! and `dsterf`).
//!
//! Owns the three steps, for a matrix of order n:
//! 1. **Dense to band** (bandwidth [`BAND`] = b): each panel of b columns is
//!    QR-factored below the band, and its block reflector `Q = I − V T Vᵀ`
//!    is applied to both sides of the trailing matrix as one symmetric
//!    rank-2b update, `A ← A − V Zᵀ − Z Vᵀ`. Every flop of this step (4n³/3)
//!    is one of faer's matrix products, in parallel. The one-stage
//!    reduction instead reads the whole trailing matrix for every column (n
//!    matrix–vector products, half its flops), bound by memory.
//! 2. **Band to tridiagonal** by bulge chasing (Lang's scheme, LAPACK's
//!    `dsb2st`): sweep j annihilates column j below its subdiagonal with one
//!    reflector of length ≤ b, and chases the bulge this creates down the
//!    band, one b × b block at a time, with reflectors of length ≤ b. The
//!    band and its bulges live in a compact store of 2b rows per column
//!    (n · 2b values, in cache); about 6n²b flops, sequential.
//! 3. **Tridiagonal eigenvalues** by the implicit QL algorithm with
//!    Wilkinson shifts, O(n²).
//!
//! Every step is orthogonal (reflectors and rotations), so the eigenvalues
//! are those of the input up to a backward error of a small multiple of
//! ε‖A‖, as with the one-stage reduction.
//!
//! Pure computation: no I/O, no global state; the parallelism of step 1 is
//! passed in. Must not compute eigenvectors (the caller's
//! `SymmetricEigen::of_lower` does, with faer).

use faer::linalg::householder::make_householder_in_place;
use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::{matmul as triangular_matmul, BlockStructure};
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, ColMut, Mat, MatRef, Par};

use super::EigenError;
use crate::cpu::dispatched;

/// The bandwidth of step 1's output: panels of this many columns. Step 1
/// wants wide panels (its products' inner dimension is 2b), step 2 narrow
/// ones (its cost grows with b); 32 balances them at d = 2048 (BENCHMARKS.md,
/// "The close's eigenvalues in two stages").
pub(crate) const BAND: usize = 32;

/// QL iterations allowed per eigenvalue before giving up.
const MAX_ITERATIONS: usize = 60;

dispatched! {
    /// The eigenvalues, ascending, of the symmetric matrix whose lower triangle
    /// (diagonal included) `a` holds; `a` (n × n) is used as workspace and its
    /// strict upper triangle is never read.
    ///
    /// # Errors
    /// [`EigenError`] when the QL iteration needs more than 60 iterations for
    /// one eigenvalue (not seen on finite input; NaN or infinity ends there).
    ///
    /// # Panics
    /// When `a` is not square.
    pub(crate) fn symmetric_eigenvalues(a: Mat<f64>, par: Par) -> Result<Vec<f64>, EigenError> {
        // The loops of steps 1 (the panels' QR), 2 and 3 are this crate's
        // own: compiled once per level, run at the widest (faer dispatches
        // its products itself). Every variant gives the same bits (no loop
        // here reassociates a sum).
        eigenvalues(a, par)
    }
}

/// The body of [`symmetric_eigenvalues`], inlined into each level's variant.
#[inline(always)]
fn eigenvalues(mut a: Mat<f64>, par: Par) -> Result<Vec<f64>, EigenError> {
    let order = a.nrows();
    assert_eq!(order, a.ncols(), "eigenvalues of a non-square matrix");
    let band = BAND.min(order.saturating_sub(1)).max(1);
    to_band(&mut a, band, par);
    let (mut diagonal, mut off) = if band > 1 {
        Band::of_lower(a.as_ref(), band).into_tridiagonal()
    } else {
        let diagonal = (0..order).map(|i| a[(i, i)]).collect();
        let off = (0..order)
            .map(|i| if i + 1 < order { a[(i + 1, i)] } else { 0.0 })
            .collect();
        (diagonal, off)
    };
    drop(a);
    tridiagonal_eigenvalues(&mut diagonal, &mut off).map_err(|()| EigenError { order })?;
    diagonal.sort_by(f64::total_cmp);
    Ok(diagonal)
}

/// Step 1: reduces the symmetric matrix in `a`'s lower triangle to
/// bandwidth `band` in place, by orthogonal similarity; below the band the
/// lower triangle is left zero.
#[inline(always)]
fn to_band(a: &mut Mat<f64>, band: usize, par: Par) {
    let n = a.nrows();
    let mut first = 0;
    // Panel: columns first..first + band, rows from first + band down.
    while first + band + 1 < n {
        let top = first + band;
        let rows = n - top;
        let count = band.min(rows);
        // Unblocked Householder QR of the panel; tau[i] is LAPACK's τ
        // (H_i = I − τ v vᵀ, v_0 = 1), 0 for an identity.
        let mut tau = Vec::with_capacity(count);
        let mut v = Mat::<f64>::zeros(rows, count);
        for i in 0..count {
            let x = &mut a.col_as_slice_mut(first + i)[top + i..];
            let (head, tail) = x.split_at_mut(1);
            let info = make_householder_in_place(&mut head[0], ColMut::from_slice_mut(tail));
            let tau_i = info.tau.recip();
            tau.push(tau_i);
            let v_i = &mut v.col_as_slice_mut(i)[i..];
            v_i[0] = 1.0;
            v_i[1..].copy_from_slice(tail);
            tail.fill(0.0);
            // H_i on the rest of the panel.
            let v_i = &v.col_as_slice(i)[i..];
            for c in first + i + 1..first + band {
                let x = &mut a.col_as_slice_mut(c)[top + i..];
                let scale = tau_i * dot(v_i, x);
                axpy(x, v_i, -scale);
            }
        }
        // T of Q = H_0 ⋯ H_{count−1} = I − V T Vᵀ (LAPACK's dlarft,
        // forward, columnwise).
        let mut vtv = Mat::<f64>::zeros(count, count);
        matmul(
            vtv.as_mut(),
            Accum::Replace,
            v.transpose(),
            v.as_ref(),
            1.0,
            par,
        );
        let mut t = Mat::<f64>::zeros(count, count);
        for (i, &tau_i) in tau.iter().enumerate() {
            t[(i, i)] = tau_i;
            for r in 0..i {
                let sum: f64 = (r..i).map(|k| t[(r, k)] * vtv[(k, i)]).sum();
                t[(r, i)] = -tau_i * sum;
            }
        }
        // Qᵀ A Q = A − V Zᵀ − Z Vᵀ on the trailing matrix, with Y = A V T
        // and Z = Y − ½ V (Tᵀ Vᵀ Y).
        let mut trailing = a.as_mut().submatrix_mut(top, top, rows, rows);
        let av = symmetric_times(trailing.rb(), v.as_ref(), par);
        let mut z = Mat::<f64>::zeros(rows, count);
        matmul(
            z.as_mut(),
            Accum::Replace,
            av.as_ref(),
            t.as_ref(),
            1.0,
            par,
        );
        let mut vty = Mat::<f64>::zeros(count, count);
        matmul(
            vty.as_mut(),
            Accum::Replace,
            v.transpose(),
            z.as_ref(),
            1.0,
            par,
        );
        let mut s = Mat::<f64>::zeros(count, count);
        matmul(
            s.as_mut(),
            Accum::Replace,
            t.transpose(),
            vty.as_ref(),
            1.0,
            par,
        );
        matmul(z.as_mut(), Accum::Add, v.as_ref(), s.as_ref(), -0.5, par);
        // One rank-2b product: [V Z] [Z V]ᵀ = V Zᵀ + Z Vᵀ.
        let vz = Mat::from_fn(rows, 2 * count, |r, c| {
            if c < count {
                v[(r, c)]
            } else {
                z[(r, c - count)]
            }
        });
        let zv = Mat::from_fn(rows, 2 * count, |r, c| {
            if c < count {
                z[(r, c)]
            } else {
                v[(r, c - count)]
            }
        });
        triangular_matmul(
            trailing.rb_mut(),
            BlockStructure::TriangularLower,
            Accum::Add,
            vz.as_ref(),
            BlockStructure::Rectangular,
            zv.transpose(),
            BlockStructure::Rectangular,
            -1.0,
            par,
        );
        first += band;
    }
}

/// Block columns of [`symmetric_times`]: wide enough for the products'
/// kernels, narrow enough that the diagonal blocks' triangular products
/// stay a small share.
const SYMMETRIC_BLOCK: usize = 256;

/// `A V` for the symmetric `A` whose lower triangle `lower` holds (m × m)
/// and `V` (m × k), by block columns of the lower triangle: each block
/// below the diagonal serves twice, as `B V_J` and `Bᵀ V_below`, in two
/// dense products (faer's triangular products on the whole triangle ran
/// at two thirds of the dense rate for k = 32).
#[inline(always)]
fn symmetric_times(lower: MatRef<'_, f64>, v: MatRef<'_, f64>, par: Par) -> Mat<f64> {
    let (m, k) = v.shape();
    let mut out = Mat::<f64>::zeros(m, k);
    let mut start = 0;
    while start < m {
        let width = SYMMETRIC_BLOCK.min(m - start);
        let below = start + width;
        let diagonal = lower.submatrix(start, start, width, width);
        let block_v = v.subrows(start, width);
        for (lhs, structure) in [
            (diagonal, BlockStructure::TriangularLower),
            (diagonal.transpose(), BlockStructure::StrictTriangularUpper),
        ] {
            triangular_matmul(
                out.as_mut().subrows_mut(start, width),
                BlockStructure::Rectangular,
                Accum::Add,
                lhs,
                structure,
                block_v,
                BlockStructure::Rectangular,
                1.0,
                par,
            );
        }
        if below < m {
            let block = lower.submatrix(below, start, m - below, width);
            matmul(
                out.as_mut().subrows_mut(below, m - below),
                Accum::Add,
                block,
                block_v,
                1.0,
                par,
            );
            matmul(
                out.as_mut().subrows_mut(start, width),
                Accum::Add,
                block.transpose(),
                v.subrows(below, m - below),
                1.0,
                par,
            );
        }
        start = below;
    }
    out
}

/// A symmetric band matrix with its bulges: the lower triangle at distances
/// 0..2b below the diagonal, column by column (column c holds rows
/// c..c + 2b, contiguous).
struct Band {
    order: usize,
    band: usize,
    height: usize,
    values: Vec<f64>,
}

impl Band {
    /// The band of width `band` of the matrix whose lower triangle `a` holds.
    #[inline(always)]
    fn of_lower(a: faer::MatRef<'_, f64>, band: usize) -> Self {
        let order = a.nrows();
        let height = 2 * band;
        let mut values = vec![0.0; order * height];
        for c in 0..order {
            for r in c..order.min(c + band + 1) {
                values[(r - c) + c * height] = a[(r, c)];
            }
        }
        Self {
            order,
            band,
            height,
            values,
        }
    }

    /// Rows `first..first + len` of column `c` (`first ≥ c`, within 2b).
    #[inline(always)]
    fn col(&self, c: usize, first: usize, len: usize) -> &[f64] {
        let start = (first - c) + c * self.height;
        &self.values[start..start + len]
    }

    #[inline(always)]
    fn col_mut(&mut self, c: usize, first: usize, len: usize) -> &mut [f64] {
        let start = (first - c) + c * self.height;
        &mut self.values[start..start + len]
    }

    /// Step 2: the diagonal and subdiagonal (its last entry 0) of a
    /// tridiagonal matrix similar to this one.
    #[inline(always)]
    fn into_tridiagonal(mut self) -> (Vec<f64>, Vec<f64>) {
        let (n, b) = (self.order, self.band);
        let mut v = vec![0.0; b];
        let mut work = vec![0.0; b];
        for j in 0..n.saturating_sub(2) {
            // Column j below its subdiagonal.
            let len = b.min(n - j - 1);
            let tau = self.reflector(j, j + 1, len, &mut v);
            self.two_sided(j + 1, &v[..len], tau, &mut work);
            let (mut cols, mut cols_len) = (j + 1, len);
            let mut rows = cols + cols_len;
            self.right(rows, b.min(n - rows), cols, &v[..len], tau, &mut work);
            // Chase the bulge: annihilate the first column of each block
            // below, then apply that reflector to the rest of the block
            // row, the diagonal block, and the block below.
            while rows + 1 < n {
                let rows_len = b.min(n - rows);
                let tau = self.reflector(cols, rows, rows_len, &mut v);
                let v = &v[..rows_len];
                for c in cols + 1..cols + cols_len {
                    let x = self.col_mut(c, rows, rows_len);
                    let scale = tau * dot(v, x);
                    axpy(x, v, -scale);
                }
                self.two_sided(rows, v, tau, &mut work);
                let below = rows + rows_len;
                self.right(below, b.min(n - below), rows, v, tau, &mut work);
                (cols, cols_len) = (rows, rows_len);
                rows = below;
            }
        }
        let diagonal = (0..n).map(|i| self.values[i * self.height]).collect();
        let off = (0..n)
            .map(|i| {
                if i + 1 < n {
                    self.values[1 + i * self.height]
                } else {
                    0.0
                }
            })
            .collect();
        (diagonal, off)
    }

    /// Makes the reflector that maps rows `first..first + len` of column `c`
    /// to a multiple of their first entry: writes that entry, zeros the
    /// rest, leaves `v[..len]` (v_0 = 1) and returns τ.
    #[inline(always)]
    fn reflector(&mut self, c: usize, first: usize, len: usize, v: &mut [f64]) -> f64 {
        let x = self.col_mut(c, first, len);
        let (head, tail) = x.split_at_mut(1);
        let info = make_householder_in_place(&mut head[0], ColMut::from_slice_mut(tail));
        v[0] = 1.0;
        v[1..len].copy_from_slice(tail);
        tail.fill(0.0);
        info.tau.recip()
    }

    /// `A ← H A H` on the diagonal block at `first..first + v.len()`, with
    /// `H = I − τ v vᵀ` (lower triangle only).
    #[inline(always)]
    fn two_sided(&mut self, first: usize, v: &[f64], tau: f64, p: &mut [f64]) {
        let len = v.len();
        let p = &mut p[..len];
        p.fill(0.0);
        for c in 0..len {
            let col = self.col(first + c, first + c, len - c);
            axpy(&mut p[c..], col, v[c]);
            p[c] += dot(&col[1..], &v[c + 1..]);
        }
        p.iter_mut().for_each(|x| *x *= tau);
        let alpha = -0.5 * tau * dot(p, v);
        axpy(p, v, alpha);
        for c in 0..len {
            let (vc, pc) = (v[c], p[c]);
            let col = self.col_mut(first + c, first + c, len - c);
            for ((a, &vr), &pr) in col.iter_mut().zip(&v[c..]).zip(&p[c..]) {
                *a -= vr * pc + pr * vc;
            }
        }
    }

    /// `B ← B H` for the block B of rows `first..first + len` and the
    /// columns `cols..cols + v.len()`.
    #[inline(always)]
    fn right(&mut self, first: usize, len: usize, cols: usize, v: &[f64], tau: f64, d: &mut [f64]) {
        if len == 0 {
            return;
        }
        let d = &mut d[..len];
        d.fill(0.0);
        for (c, &vc) in v.iter().enumerate() {
            axpy(d, self.col(cols + c, first, len), vc);
        }
        for (c, &vc) in v.iter().enumerate() {
            axpy(self.col_mut(cols + c, first, len), d, -tau * vc);
        }
    }
}

/// `y += a · x`: the loop of `stats::simd::add_scaled` without its
/// per-call dispatch, which here would cost a call per short slice (≤ 2b)
/// inside a routine already compiled per level (as is `dot`).
#[inline(always)]
fn axpy(y: &mut [f64], x: &[f64], a: f64) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `xᵀ y` with four partial sums (so that it vectorises).
#[inline(always)]
fn dot(x: &[f64], y: &[f64]) -> f64 {
    let mut sums = [0.0; 4];
    let (xs, ys) = (x.chunks_exact(4), y.chunks_exact(4));
    let tail: f64 = xs
        .remainder()
        .iter()
        .zip(ys.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in xs.zip(ys) {
        for k in 0..4 {
            sums[k] += a[k] * b[k];
        }
    }
    (sums[0] + sums[1]) + (sums[2] + sums[3]) + tail
}

/// Step 3: the eigenvalues of the symmetric tridiagonal matrix with
/// `diagonal` and `off` (`off[i]` couples i and i + 1; its last entry is
/// ignored), by the implicit QL algorithm with Wilkinson shifts (the
/// `tqli` of Numerical Recipes, without vectors). Leaves them, unsorted, in
/// `diagonal`.
#[inline(always)]
fn tridiagonal_eigenvalues(diagonal: &mut [f64], off: &mut [f64]) -> Result<(), ()> {
    let (d, e) = (diagonal, off);
    let n = d.len();
    if n == 0 {
        return Ok(());
    }
    e[n - 1] = 0.0;
    // A coupling is negligible beside its two diagonal entries, or beside
    // the whole matrix (a Gershgorin bound of its norm): the eigenvalues
    // carry an error of ε‖A‖ from steps 1 and 2 anyway, and without this
    // floor a cluster of eigenvalues near 0 can stall on that rounding
    // noise instead of converging.
    let norm = (0..n).fold(0.0_f64, |m, i| {
        let left = if i > 0 { e[i - 1].abs() } else { 0.0 };
        m.max(d[i].abs() + e[i].abs() + left)
    });
    let floor = f64::EPSILON * norm;
    for l in 0..n {
        let mut iterations = 0;
        loop {
            // The first negligible coupling at or after l splits the matrix.
            let mut m = l;
            while m + 1 < n {
                let scale = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * scale || e[m].abs() <= floor {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iterations += 1;
            if iterations > MAX_ITERATIONS {
                return Err(());
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + r.copysign(g));
            let (mut s, mut c, mut p) = (1.0_f64, 1.0_f64, 0.0_f64);
            let mut deflated = false;
            for i in (l..m).rev() {
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    deflated = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
            }
            if deflated {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::SymmetricEigen;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Eigenvalues by faer's one-stage dense solver (the reference).
    fn reference(a: &Mat<f64>) -> Vec<f64> {
        SymmetricEigen::of_lower(a.as_ref(), Par::Seq)
            .unwrap_or_else(|e| panic!("{e}"))
            .values
    }

    fn assert_close(got: &[f64], want: &[f64], scale: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-12 * scale.max(f64::MIN_POSITIVE),
                "{what}: eigenvalue {i}: {g} against {w} (scale {scale})"
            );
        }
    }

    fn random_symmetric(rng: &mut StdRng, n: usize) -> Mat<f64> {
        let mut a = Mat::<f64>::zeros(n, n);
        for c in 0..n {
            for r in c..n {
                a[(r, c)] = rng.random::<f64>() * 2.0 - 1.0;
            }
        }
        a
    }

    #[test]
    fn match_the_dense_solver_at_every_order_around_the_band() {
        // Orders below, at and above one and several panels, so that the
        // last panel, the last chase block and the short sweeps are all
        // partial somewhere.
        let mut rng = StdRng::seed_from_u64(11);
        for n in (0..=3 * BAND + 3).chain([5 * BAND - 1, 7 * BAND + 5]) {
            let a = random_symmetric(&mut rng, n);
            let want = reference(&a);
            let scale = want.iter().fold(0.0_f64, |m, v| m.max(v.abs()));
            let got = symmetric_eigenvalues(a, Par::Seq).unwrap_or_else(|e| panic!("{e}"));
            assert_close(&got, &want, scale, &format!("n = {n}"));
        }
    }

    #[test]
    fn known_spectra_and_degenerate_input() {
        // The path graph's Laplacian-like matrix 2 on the diagonal, −1 off
        // it: eigenvalues 2 − 2 cos(kπ/(n + 1)). Already tridiagonal.
        let n = 150;
        let a = Mat::from_fn(n, n, |i, j| match i.abs_diff(j) {
            0 => 2.0,
            1 => -1.0,
            _ => 0.0,
        });
        let want: Vec<f64> = (1..=n)
            .map(|k| 2.0 - 2.0 * (k as f64 * std::f64::consts::PI / (n as f64 + 1.0)).cos())
            .collect();
        let got = symmetric_eigenvalues(a, Par::rayon(2)).unwrap_or_else(|e| panic!("{e}"));
        assert_close(&got, &want, 4.0, "path");

        // Diagonal (every panel below the band is zero: identity
        // reflectors), repeated eigenvalues, and the zero matrix.
        let n = 100;
        let diagonal = Mat::from_fn(n, n, |i, j| if i == j { (i % 7) as f64 } else { 0.0 });
        let mut want: Vec<f64> = (0..n).map(|i| (i % 7) as f64).collect();
        want.sort_by(f64::total_cmp);
        let got = symmetric_eigenvalues(diagonal, Par::Seq).unwrap_or_else(|e| panic!("{e}"));
        assert_close(&got, &want, 6.0, "diagonal");
        let got =
            symmetric_eigenvalues(Mat::zeros(n, n), Par::Seq).unwrap_or_else(|e| panic!("{e}"));
        assert!(got.iter().all(|&v| v == 0.0), "zero matrix: {got:?}");

        // Low-rank Gram matrices XXᵀ: a cluster of n − r zero eigenvalues
        // (to rounding; without the absolute floor of the QL test it
        // stalled) and the r of the r × r XᵀX.
        let mut rng = StdRng::seed_from_u64(5);
        for (n, rank) in [(90, 3), (8 * BAND + 3, 10)] {
            let x = Mat::from_fn(n, rank, |_, _| rng.random::<f64>() - 0.5);
            let mut gram = Mat::<f64>::zeros(n, n);
            matmul(
                gram.as_mut(),
                Accum::Replace,
                x.as_ref(),
                x.transpose(),
                1.0,
                Par::Seq,
            );
            let mut small = Mat::<f64>::zeros(rank, rank);
            matmul(
                small.as_mut(),
                Accum::Replace,
                x.transpose(),
                x.as_ref(),
                1.0,
                Par::Seq,
            );
            let mut want = vec![0.0; n - rank];
            want.extend(reference(&small));
            let scale = want[n - 1];
            let got = symmetric_eigenvalues(gram, Par::Seq).unwrap_or_else(|e| panic!("{e}"));
            assert_close(&got, &want, scale, &format!("rank {rank} of {n}"));
        }
    }

    #[test]
    fn every_level_gives_the_same_bits() {
        let mut rng = StdRng::seed_from_u64(21);
        let a = random_symmetric(&mut rng, 5 * BAND + 7);
        crate::cpu::assert_the_same_bits_at_every_level(|| {
            symmetric_eigenvalues(a.clone(), Par::Seq).unwrap_or_else(|e| panic!("{e}"))
        });
    }

    #[test]
    fn the_strict_upper_triangle_is_never_read() {
        let mut rng = StdRng::seed_from_u64(8);
        let a = random_symmetric(&mut rng, 2 * BAND + 9);
        let want = reference(&a);
        let mut garbage = a.clone();
        for c in 0..garbage.ncols() {
            for r in 0..c {
                garbage[(r, c)] = f64::NAN;
            }
        }
        let got = symmetric_eigenvalues(garbage, Par::Seq).unwrap_or_else(|e| panic!("{e}"));
        assert_close(&got, &want, 2.0 * a.nrows() as f64, "upper NaN");
    }
}
