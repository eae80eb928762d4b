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
