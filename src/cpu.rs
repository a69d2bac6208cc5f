//! The widest vector instruction set of the CPU the process runs on,
//! detected once at run time.
//!
//! Owns the detection, and the [`dispatched`] macro that compiles a
//! function once per level, that every run-time-dispatched loop of the math
//! core shares (`stats::simd`'s kernels, `linalg`'s band reduction): each such
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

/// Defines each function so that it runs its body compiled for the level
/// [`level`] picks (the body's loops, and what it inlines, vectorise at that
/// width). A function may take one type parameter bounded by `Value` (the
/// rows `stats::simd`'s kernels read), monomorphised per level like the
/// rest.
macro_rules! dispatched {
    ($(
        $(#[doc = $doc:literal])*
        pub(crate) fn $name:ident $(<$t:ident: Value>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block
    )*) => {$(
        $(#[doc = $doc])*
        #[inline]
        pub(crate) fn $name $(<$t: Value>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic $(<$t: Value>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512 $(<$t: Value>)? ($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2 $(<$t: Value>)? ($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                match $crate::cpu::level() {
                    // SAFETY: `level` saw AVX-512F on this CPU.
                    $crate::cpu::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: `level` saw AVX2 on this CPU.
                    $crate::cpu::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::cpu::Level::Baseline => {}
                }
            }
            generic($($arg),*)
        }
    )*};
}

pub(crate) use dispatched;

/// Runs `run` at every level this CPU supports, and asserts that each
/// gives the same bits as the baseline (test only: every dispatched loop
/// must, as none reassociates a sum). Other tests running meanwhile just
/// use another level, which by this very property gives them the same
/// numbers.
#[cfg(test)]
pub(crate) fn assert_the_same_bits_at_every_level(run: impl Fn() -> Vec<f64>) {
    // The CPU's own level, not `level()`, which another such test may have
    // lowered meanwhile.
    let detected = detect();
    let mut results = Vec::new();
    for forced in [Level::Baseline, Level::Avx2, Level::Avx512] {
        if forced as u8 <= detected as u8 {
            LEVEL.store(forced as u8, Ordering::Relaxed);
            results.push((forced, run()));
        }
    }
    LEVEL.store(detected as u8, Ordering::Relaxed);
    for (forced, values) in &results[1..] {
        let same = values.len() == results[0].1.len()
            && values
                .iter()
                .zip(&results[0].1)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{forced:?} differs from the baseline");
    }
}
