//! The widest vector instruction set of the CPU the process runs on,
//! detected once at run time.
//!
//! Owns the detection that every run-time-dispatched loop of the math core
//! shares (`stats::simd`'s kernels, `linalg`'s band reduction): each such
//! loop is compiled once per [`Level`] and runs the widest variant this CPU
//! supports, so the binary stays built for baseline x86-64 and runs
//! anywhere.
//!
//! Must not: hold state beyond the detected level, or decide anything
//! about the loops themselves.

use std::sync::atomic::{AtomicU8, Ordering};

/// Which variant of a dispatched loop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Level {
    Baseline = 1,
    Avx2 = 2,
    Avx512 = 3,
}

/// The detected level (0 until the first call).
static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The widest level the CPU supports, detected on first use.
#[inline]
pub(crate) fn level() -> Level {
    match LEVEL.load(Ordering::Relaxed) {
        1 => Level::Baseline,
        2 => Level::Avx2,
        3 => Level::Avx512,
        _ => {
            let detected = detect();
            LEVEL.store(detected as u8, Ordering::Relaxed);
            detected
        }
    }
}

fn detect() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return Level::Avx512;
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// Makes every dispatched loop run at `level` from now on (tests compare
/// the levels; a level above the detected one must not be forced).
#[cfg(test)]
pub(crate) fn force(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
}
