//! Dense linear-algebra building blocks for the math core, on `faer`.
//!
//! Owns the symmetric eigendecomposition (with eigenvectors, faer's; the
//! eigenvalues alone by this crate's two-stage reduction, `eigenvalues`),
//! the Cholesky factorisation and the tolerance rule of `docs/metrics.md`
//! ("Tolerance") that decides which eigenvalues count as non-zero (and so
//! defines pseudo-inverses and ranks). Pure computation: no I/O, no
//! logging, no global state (the parallelism is always passed in, never
//! read from faer's global setting).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::evd::{self, ComputeEigenvectors};
use faer::{Mat, MatRef, Par};

mod eigenvalues;

/// The eigensolver did not converge (faer's, or the QL iteration of the
/// eigenvalues alone, gave up after its iteration limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the symmetric eigensolver did not converge on a {order}x{order} matrix")]
pub struct EigenError {
    /// Order of the matrix that failed.
    pub order: usize,
}

/// `A = V diag(values) Vᵀ` of a symmetric matrix, eigenvalues ascending.
#[derive(Debug, Clone)]
pub struct SymmetricEigen {
    /// Eigenvalues in non-decreasing order.
    pub values: Vec<f64>,
    /// Orthonormal eigenvectors, column `i` belongs to `values[i]`.
    pub vectors: Mat<f64>,
}

impl SymmetricEigen {
    /// Decomposes the symmetric matrix whose lower triangle (diagonal
    /// included) is stored in `lower`; the strict upper triangle is never
    /// read.
    pub fn of_lower(lower: MatRef<'_, f64>, par: Par) -> Result<Self, EigenError> {
        let order = lower.nrows();
        let mut vectors = Mat::<f64>::zeros(order, order);
        let values = decompose(lower, &mut vectors, par)?;
        Ok(Self { values, vectors })
    }

    /// The eigenvalues alone (ascending) of the symmetric matrix whose lower
    /// triangle is stored in `lower` (n × n, taken as workspace; the strict
    /// upper triangle is never read), by a two-stage reduction to
    /// tridiagonal form (`linalg::eigenvalues`): 1.2× faster than faer's
    /// one-stage reduction (which [`SymmetricEigen::of_lower`] uses) at
    /// n = 2048 on a 2-core Xeon (BENCHMARKS.md).
    ///
    /// # Panics
    /// When `lower` is not square.
    pub fn values_of_lower(lower: Mat<f64>, par: Par) -> Result<Vec<f64>, EigenError> {
        eigenvalues::symmetric_eigenvalues(lower, par)
    }

    /// Indices of the eigenvalues that count as non-zero under the tolerance
    /// for a matrix of order `order` (usually the matrix's own order).
    pub fn kept(&self, order: usize) -> Vec<usize> {
        let threshold = nonzero_threshold(&self.values, order);
        (0..self.values.len())
            .filter(|&i| self.values[i] > threshold)
            .collect()
    }
}

/// faer's symmetric eigensolver on the lower triangle of `lower`, writing
/// the eigenvectors into `vectors`.
fn decompose(
    lower: MatRef<'_, f64>,
    vectors: &mut Mat<f64>,
    par: Par,
) -> Result<Vec<f64>, EigenError> {
    let order = lower.nrows();
    assert_eq!(
        order,
        lower.ncols(),
        "eigendecomposition of a non-square matrix"
    );
    let mut values = faer::diag::Diag::<f64>::zeros(order);
    let params = Default::default();
    let mut scratch = MemBuffer::new(evd::self_adjoint_evd_scratch::<f64>(
        order,
        ComputeEigenvectors::Yes,
        par,
        params,
    ));
    evd::self_adjoint_evd(
        lower,
        values.as_mut(),
        Some(vectors.as_mut()),
        par,
        MemStack::new(&mut scratch),
        params,
    )
    .map_err(|_| EigenError { order })?;
    Ok((0..order).map(|i| values[i]).collect())
}

/// `A = L Lᵀ` of the symmetric matrix whose lower triangle `a` holds
/// (overwritten by `L`; the strict upper triangle is left as it is), or
/// `None` when `A` is not numerically positive definite.
pub fn cholesky_lower(mut a: Mat<f64>, par: Par) -> Option<Mat<f64>> {
    let order = a.nrows();
    let params = Default::default();
    let mut scratch = MemBuffer::new(cholesky_in_place_scratch::<f64>(order, par, params));
    cholesky_in_place(
        a.as_mut(),
        Default::default(),
        par,
        MemStack::new(&mut scratch),
        params,
    )
    .ok()?;
    Some(a)
}

/// The tolerance (`docs/metrics.md`): an eigenvalue of a PSD matrix of
/// order `order` counts as non-zero when it exceeds `λ_max · order · ε`. For the zero matrix the
/// threshold is 0 and nothing is kept.
pub fn nonzero_threshold(eigenvalues: &[f64], order: usize) -> f64 {
    let largest = eigenvalues.iter().copied().fold(0.0_f64, f64::max);
    largest * order as f64 * f64::EPSILON
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eigen_of_a_known_matrix_reconstructs_it_and_ignores_the_upper_triangle() {
        // [[2, 1], [1, 2]] has eigenvalues 1 and 3; the upper triangle holds
        // garbage that must not be read.
        let lower = faer::mat![[2.0, 99.0], [1.0, 2.0]];
        let eig = SymmetricEigen::of_lower(lower.as_ref(), Par::Seq).unwrap();
        assert!((eig.values[0] - 1.0).abs() < 1e-14);
        assert!((eig.values[1] - 3.0).abs() < 1e-14);
        let v = &eig.vectors;
        for (i, j, expected) in [(0, 0, 2.0), (1, 0, 1.0), (0, 1, 1.0), (1, 1, 2.0)] {
            let rebuilt: f64 = (0..2).map(|k| v[(i, k)] * eig.values[k] * v[(j, k)]).sum();
            assert!((rebuilt - expected).abs() < 1e-14, "({i},{j}) = {rebuilt}");
        }
    }

    #[test]
    fn tolerance_follows_spec_rule() {
        let values = [1e-20, 1e-15, 2.0];
        let threshold = nonzero_threshold(&values, 10);
        assert_eq!(threshold, 2.0 * 10.0 * f64::EPSILON);
        let eig = SymmetricEigen {
            values: values.to_vec(),
            vectors: Mat::zeros(3, 3),
        };
        // 1e-15 > 4.4e-15 is false: dropped; only 2.0 is kept.
        assert_eq!(eig.kept(10), vec![2]);
        assert_eq!(nonzero_threshold(&[0.0, 0.0], 2), 0.0);
    }
}
