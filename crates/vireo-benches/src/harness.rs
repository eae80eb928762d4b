//! A small measurement harness: interleaved runs of the compared variants (A B A B …), every
//! run's figure kept, the median reported. Two shared cores are noisy; interleaving spreads the
//! noise over both sides instead of handing it to whichever ran second.

use std::time::Instant;

use serde_json::{json, Value};

/// The figures of one variant over all runs, in nanoseconds per operation.
#[derive(Debug, Clone, Default)]
pub struct Runs(pub Vec<f64>);

impl Runs {
    /// The median run.
    pub fn median(&self) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    /// The runs, rounded for JSON.
    pub fn json(&self) -> Value {
        json!(self.0.iter().map(|x| round(*x)).collect::<Vec<_>>())
    }
}

/// Rounds to two decimals.
pub fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Times `ops` calls of `f` and returns nanoseconds per call.
pub fn time_per_op(ops: u64, mut f: impl FnMut(u64)) -> f64 {
    let start = Instant::now();
    for i in 0..ops {
        f(i);
    }
    start.elapsed().as_nanos() as f64 / ops as f64
}

/// A timer for short intervals (a few hundred nanoseconds) measured many times: the time stamp
/// counter where the CPU has an invariant one (x86-64: about 10 ns a reading here, against about
/// 26 ns for `Instant::now` in this VM, whose cost would otherwise be a fixed share of every
/// interval), converted to nanoseconds with a rate measured against the monotonic clock.
/// Elsewhere, `Instant`.
#[derive(Debug, Clone, Copy)]
pub struct IntervalTimer {
    /// Nanoseconds per counter tick (1 for `Instant`).
    ns_per_tick: f64,
    tsc: bool,
}

impl IntervalTimer {
    /// Calibrates the counter against the monotonic clock over `calibrate` (20 ms or so).
    pub fn new(calibrate: std::time::Duration) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let invariant = std::fs::read_to_string("/proc/cpuinfo")
                .map(|c| c.contains(" constant_tsc") && c.contains(" nonstop_tsc"))
                .unwrap_or(false);
            if invariant {
                let (t0, c0) = (Instant::now(), Self::tsc());
                while t0.elapsed() < calibrate {
                    std::hint::spin_loop();
                }
                let (ns, ticks) = (t0.elapsed().as_nanos() as f64, Self::tsc().wrapping_sub(c0) as f64);
                if ticks > 0.0 {
                    return Self { ns_per_tick: ns / ticks, tsc: true };
                }
            }
        }
        let _ = calibrate;
        Self { ns_per_tick: 1.0, tsc: false }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn tsc() -> u64 {
        // SAFETY: `lfence` and `rdtsc` have no memory effects; every x86-64 CPU has both. The
        // fence keeps the reading from moving before the work it delimits.
        unsafe {
            core::arch::x86_64::_mm_lfence();
            let t = core::arch::x86_64::_rdtsc();
            core::arch::x86_64::_mm_lfence();
            t
        }
    }

    /// Runs `f` and returns how long it took, in nanoseconds.
    #[inline(always)]
    pub fn time(&self, f: impl FnOnce()) -> f64 {
        #[cfg(target_arch = "x86_64")]
        if self.tsc {
            let c0 = Self::tsc();
            f();
            return Self::tsc().wrapping_sub(c0) as f64 * self.ns_per_tick;
        }
        let t = Instant::now();
        f();
        t.elapsed().as_nanos() as f64
    }
}

/// Runs every variant `rounds` times, interleaved, and returns each variant's runs.
pub fn interleave(rounds: usize, variants: &mut [&mut dyn FnMut() -> f64]) -> Vec<Runs> {
    // One unmeasured warm-up of each.
    for v in variants.iter_mut() {
        v();
    }
    let mut out = vec![Runs::default(); variants.len()];
    for _ in 0..rounds {
        for (i, v) in variants.iter_mut().enumerate() {
            out[i].0.push(v());
        }
    }
    out
}

/// Percentile `p` (0..=100) of `samples` (sorted in place).
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[idx.min(samples.len() - 1)]
}
