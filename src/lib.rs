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
//! wire (proto) -> decode (server) -> batch statistics (stats)
//!   -> accumulator (stats, held by the server's state) -> close (metrics)
//!   -> export and store (server)
//! ```
//!
//! The public API: the math core (`stats`, `metrics`, `linalg`: pure
//! computation with no I/O), `npy` files, the wire types (`proto`), bearer
//! tokens (`auth`), synthetic collapsing data (`synthetic`), the daemon's
//! small embedding API (`server`: configure, run or spawn, stop) and the
//! command line's entry point (`cli::main`). Everything else is internal.

pub mod auth;
pub mod cli;
mod cpu;
pub mod linalg;
pub mod metrics;
pub mod npy;
pub mod proto;
pub mod server;
pub mod stats;
pub mod synthetic;

#[cfg(test)]
mod fuzz;
