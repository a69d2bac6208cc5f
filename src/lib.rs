//! vcid: a streaming monitor of neural collapse.
//!
//! Training processes push the features of one layer and their labels; vcid
//! keeps exact single-pass class statistics per (run, split, layer, epoch)
//! and, when an epoch closes, computes the Variability Collapse Index (Xu &
//! Liu, ICML 2023) and companion metrics.
//!
//! Data flows one way, and the modules follow it:
//!
//! ```text
//! wire (proto) -> decode (server::decode) -> batch statistics (stats)
//!   -> accumulator (stats, held by server::state) -> close (metrics)
//!   -> export (server::export) and store (server::store)
//! ```
//!
//! `stats`, `metrics` and `linalg` are pure computation with no I/O; the
//! server and the command line only wire them up.

pub mod cli;
pub mod linalg;
pub mod metrics;
pub mod npy;
pub mod proto;
pub mod server;
pub mod stats;
