//! Deterministic random inputs for the unit tests (no zeros: values are drawn from
//! non-degenerate ranges).

pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

pub fn random_codes(len: usize, bits: u32, seed: u64) -> Vec<u8> {
    let mut r = SplitMix::new(seed);
    (0..len).map(|_| (r.next_u64() % (1 << bits)) as u8).collect()
}

pub fn random_f32(len: usize, seed: u64) -> Vec<f32> {
    let mut r = SplitMix::new(seed);
    (0..len).map(|_| r.uniform()).collect()
}
