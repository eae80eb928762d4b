//! Deterministic data for tests and load generators: a xorshift generator, so that a writer
//! and a checker (or two contenders in a benchmark) derive the same bytes from the same seed.

/// Marsaglia's xorshift64 (13, 7, 17). Not for anything that needs real randomness.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value; zero is mapped away, as xorshift would stick at it).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// The next value.
    #[allow(clippy::should_implement_trait)] // infinite and infallible: no Iterator needed
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `len` bytes derived from `seed`: the low byte of each step.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = XorShift::new(seed);
    (0..len).map(|_| x.next().to_le_bytes()[0]).collect()
}
