//! Seeded xorshift generators: the same seed gives the same sequence on every machine, so a
//! failing seeded run can be replayed from the seed it prints.

/// Marsaglia's xorshift64 (shifts 13, 7, 17): the plain generator the tests draw garbage,
/// bit flips and kill moments from. Returns its state.
#[derive(Clone, Debug)]
pub struct XorShift64(u64);

impl XorShift64 {
    /// A generator from `seed`; 0 (which would stay 0 for ever) is taken as 1.
    pub fn new(seed: u64) -> XorShift64 {
        XorShift64(seed.max(1))
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// xorshift64* (shifts 12, 25, 27, then a multiply): better low bits, for the perf suite's
/// load generator.
#[derive(Clone, Debug)]
pub struct XorShift64Star(u64);

impl XorShift64Star {
    /// A generator from `seed`; 0 is taken as 1.
    pub fn new(seed: u64) -> XorShift64Star {
        XorShift64Star(seed.max(1))
    }

    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first<const N: usize>(mut next: impl FnMut() -> u64) -> [u64; N] {
        std::array::from_fn(|_| next())
    }

    #[test]
    fn xorshift64_first_values_are_pinned() {
        // Computed independently (Python, 64-bit masks).
        let mut r = XorShift64::new(42);
        let want = [45_454_805_674, 11_532_217_803_599_905_471, 10_021_416_941_527_320_954];
        assert_eq!(first::<3>(|| r.next()), want);
    }

    #[test]
    fn xorshift64_star_first_values_are_pinned() {
        let mut r = XorShift64Star::new(42);
        let want =
            [6_255_019_084_209_693_600, 14_430_073_426_741_505_498, 14_575_455_857_230_217_846];
        assert_eq!(first::<3>(|| r.next()), want);
    }

    #[test]
    fn a_zero_seed_does_not_stick_at_zero() {
        assert_eq!(XorShift64::new(0).next(), XorShift64::new(1).next());
        assert_ne!(XorShift64Star::new(0).next(), 0);
    }
}
