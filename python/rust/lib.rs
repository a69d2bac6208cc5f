//! `vcid._native`: the vcid crate inside the Python package.
//!
//! Owns the conversions between numpy arrays and the crate's types, and
//! nothing else: the statistics (`vcid::stats`), their validation
//! (`Accumulator::from_parts`), the all-reduce rounds (`vcid::stats::reduce`),
//! the metrics (`vcid::metrics`) and the command line (`vcid::cli::run`) are
//! the crate's, so Python and the daemon compute every number with the same
//! code. Every call that computes releases the GIL. Errors in the caller's
//! data become `vcid.ArgumentError` (a `ValueError` naming the field); the
//! Python modules check argument types and shapes before calling in.

use std::ffi::OsString;
use std::io::Write as _;
use std::path::PathBuf;

use ndarray::{s, Array1, Array2, ArrayView1};
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use vcid::metrics;
use vcid::stats::{reduce, Accumulator, AccumulatorParts, Par, StatsError};

/// Rows folded per step by `compute` (a bounded copy of the centred batch,
/// as `vcid compute --batch-rows` does).
const COMPUTE_BATCH_ROWS: usize = 4096;

/// Runs the `vcid` command line with `argv` (program name first) and
/// returns its exit status.
#[pyfunction]
fn run_cli(py: Python<'_>, argv: Vec<OsString>) -> u8 {
    py.detach(|| {
        let code = vcid::cli::run(argv);
        // Rust's stdout is line-buffered and never flushed at exit from a
        // library: flush before Python takes over.
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        code
    })
}

/// The per-user data directory of a daemon a client starts by itself
/// (`$XDG_DATA_HOME/vcid`, else `~/.local/share/vcid`), or None.
#[pyfunction]
fn user_data_dir() -> Option<PathBuf> {
    vcid::server::discovery::user_data_dir()
}

/// The metrics of `features` (rows × d, float64) with `labels` (uint32) and
/// `num_classes` classes, as the JSON document of `vcid compute --format
/// json`.
#[pyfunction]
fn compute(
    py: Python<'_>,
    features: PyReadonlyArray2<'_, f64>,
    labels: PyReadonlyArray1<'_, u32>,
    num_classes: usize,
) -> PyResult<String> {
    let (x, y) = (features.as_array(), labels.as_array());
    let labels = contiguous(&y);
    let result = py.detach(|| {
        let mut acc = Accumulator::new(num_classes, x.ncols());
        for start in (0..x.nrows()).step_by(COMPUTE_BATCH_ROWS) {
            let stop = (start + COMPUTE_BATCH_ROWS).min(x.nrows());
            acc.fold_batch(
                x.slice(s![start..stop, ..]),
                &labels[start..stop],
                Par::rayon(0),
            )
            .map_err(Failure::Stats)?;
        }
        metrics_json(&acc)
    });
    result.map_err(|e| e.into_py(py))
}

/// `vcid.LocalAccumulator`'s engine: one `vcid::stats::Accumulator`.
#[pyclass(name = "Accumulator", module = "vcid._native")]
struct PyAccumulator {
    inner: Accumulator,
}

#[pymethods]
impl PyAccumulator {
    #[new]
    fn new(num_classes: usize, feature_dim: usize) -> Self {
        Self {
            inner: Accumulator::new(num_classes, feature_dim),
        }
    }

    /// Folds in one batch (validated whole first; unchanged on error).
    fn fold(
        &mut self,
        py: Python<'_>,
        features: PyReadonlyArray2<'_, f64>,
        labels: PyReadonlyArray1<'_, u32>,
    ) -> PyResult<()> {
        let (x, y) = (features.as_array(), labels.as_array());
        let labels = contiguous(&y);
        let inner = &mut self.inner;
        py.detach(|| inner.fold_batch(x, &labels, Par::rayon(0)))
            .map_err(|e| Failure::Stats(e).into_py(py))
    }

    /// Folds in another accumulator (Chan merge).
    fn merge(&mut self, py: Python<'_>, other: PyRef<'_, PyAccumulator>) -> PyResult<()> {
        let theirs = other.inner.clone();
        let inner = &mut self.inner;
        py.detach(|| inner.merge(&theirs))
            .map_err(|e| Failure::Stats(e).into_py(py))
    }

    fn copy(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }

    #[getter]
    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }

    #[getter]
    fn feature_dim(&self) -> usize {
        self.inner.feature_dim()
    }

    #[getter]
    fn samples(&self) -> u64 {
        self.inner.samples()
    }

    fn class_counts<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        self.inner.class_counts().to_vec().into_pyarray(py)
    }

    fn unit_count<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        self.inner.unit_count().to_vec().into_pyarray(py)
    }

    fn within_trace<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.within_trace().to_vec().into_pyarray(py)
    }

    fn unit_within_trace<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.unit_within_trace().to_vec().into_pyarray(py)
    }

    fn global_mean<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        self.inner.global_mean().into_pyarray(py)
    }

    fn class_means<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        let (k, d) = (self.inner.num_classes(), self.inner.feature_dim());
        Array2::from_shape_fn((k, d), |(c, j)| self.inner.class_mean(c)[j]).into_pyarray(py)
    }

    fn unit_sum<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray2<f64>> {
        let (k, d) = (self.inner.num_classes(), self.inner.feature_dim());
        Array2::from_shape_fn((k, d), |(c, j)| self.inner.unit_sum(c)[j]).into_pyarray(py)
    }

    /// The full symmetric d × d scatter.
    fn scatter<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray2<f64>>> {
        let d = self.inner.feature_dim();
        let flat = self.inner.to_parts().scatter;
        let matrix = Array2::from_shape_vec((d, d), flat)
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?;
        Ok(matrix.into_pyarray(py))
    }

    /// An accumulator from statistics computed elsewhere, checked by
    /// `Accumulator::from_parts` (the check `PushStats` applies). Matrices
    /// come row-major and flat; an empty `unit_within_trace` is derived.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    fn from_parts(
        py: Python<'_>,
        num_classes: usize,
        feature_dim: usize,
        class_counts: PyReadonlyArray1<'_, u64>,
        class_means: PyReadonlyArray1<'_, f64>,
        scatter: PyReadonlyArray1<'_, f64>,
        within_trace: PyReadonlyArray1<'_, f64>,
        unit_sum: PyReadonlyArray1<'_, f64>,
        unit_count: PyReadonlyArray1<'_, u64>,
        unit_within_trace: PyReadonlyArray1<'_, f64>,
    ) -> PyResult<Self> {
        let parts = AccumulatorParts {
            num_classes,
            feature_dim,
            class_counts: contiguous(&class_counts.as_array()),
            class_means: contiguous(&class_means.as_array()),
            scatter: contiguous(&scatter.as_array()),
            within_trace: contiguous(&within_trace.as_array()),
            unit_sum: contiguous(&unit_sum.as_array()),
            unit_count: contiguous(&unit_count.as_array()),
            unit_within_trace: contiguous(&unit_within_trace.as_array()),
        };
        py.detach(|| Accumulator::from_parts(parts))
            .map(|inner| Self { inner })
            .map_err(|e| Failure::Stats(e).into_py(py))
    }

    /// The metrics of the statistics so far, as the JSON document of
    /// `vcid compute --format json`.
    fn metrics(&self, py: Python<'_>) -> PyResult<String> {
        let inner = &self.inner;
        py.detach(|| metrics_json(inner)).map_err(|e| e.into_py(py))
    }

    /// This rank's vector of all-reduce round 1 (`vcid::stats::reduce`).
    fn reduce_round1<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<f64>> {
        reduce::round1(&self.inner).into_pyarray(py)
    }

    /// This rank's vector of round 2, given the summed round 1.
    fn reduce_round2<'py>(
        &self,
        py: Python<'py>,
        total1: PyReadonlyArray1<'_, f64>,
    ) -> PyResult<Bound<'py, PyArray1<f64>>> {
        let total1 = contiguous(&total1.as_array());
        let inner = &self.inner;
        py.detach(|| reduce::round2(inner, &total1))
            .map(|v| Array1::from(v).into_pyarray(py))
            .map_err(|e| Failure::Stats(e).into_py(py))
    }

    /// The combined accumulator from both summed rounds.
    #[staticmethod]
    fn reduce_combine(
        py: Python<'_>,
        num_classes: usize,
        feature_dim: usize,
        total1: PyReadonlyArray1<'_, f64>,
        total2: PyReadonlyArray1<'_, f64>,
    ) -> PyResult<Self> {
        let (total1, total2) = (
            contiguous(&total1.as_array()),
            contiguous(&total2.as_array()),
        );
        py.detach(|| reduce::combine(num_classes, feature_dim, &total1, &total2))
            .map(|inner| Self { inner })
            .map_err(|e| Failure::Stats(e).into_py(py))
    }
}

/// Why a computation failed, before it becomes a Python exception (built
/// with the GIL held).
enum Failure {
    /// The caller's data: `vcid.ArgumentError` naming the field.
    Stats(StatsError),
    /// Anything else: `RuntimeError`.
    Other(String),
}

impl Failure {
    fn into_py(self, py: Python<'_>) -> PyErr {
        match self {
            Failure::Stats(err) => argument_error(py, &err),
            Failure::Other(message) => PyRuntimeError::new_err(message),
        }
    }
}

fn metrics_json(acc: &Accumulator) -> Result<String, Failure> {
    let computed =
        metrics::compute(acc, Par::rayon(0)).map_err(|e| Failure::Other(e.to_string()))?;
    serde_json::to_string(&computed).map_err(|e| Failure::Other(e.to_string()))
}

/// `vcid.ArgumentError(field, problem)` for a statistics error; its
/// message is the crate's (field, expected and received value).
fn argument_error(py: Python<'_>, err: &StatsError) -> PyErr {
    let field = match err {
        StatsError::EmptyBatch => "rows",
        StatsError::NoFeatures => "feature_dim",
        StatsError::LabelCount { .. } | StatsError::LabelOutOfRange { .. } => "labels",
        StatsError::NonFinite { .. } => "features",
        StatsError::ShapeMismatch { field, .. } | StatsError::InvalidPart { field, .. } => field,
    };
    let text = err.to_string();
    let problem = text
        .strip_prefix(field)
        .and_then(|rest| rest.strip_prefix(": "))
        .unwrap_or(&text);
    let made = py
        .import("vcid._errors")
        .and_then(|module| module.getattr("ArgumentError"))
        .and_then(|class| class.call1((field, problem)));
    match made {
        Ok(exception) => PyErr::from_value(exception),
        Err(import_failed) => import_failed,
    }
}

/// The elements of a 1-D array in order (a copy, so the GIL can go).
fn contiguous<T: Copy>(values: &ArrayView1<'_, T>) -> Vec<T> {
    values.iter().copied().collect()
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(run_cli, m)?)?;
    m.add_function(wrap_pyfunction!(user_data_dir, m)?)?;
    m.add_function(wrap_pyfunction!(compute, m)?)?;
    m.add_class::<PyAccumulator>()?;
    Ok(())
}
