//! The request's random stream behind `computepool:host/random`: xoshiro256** seeded through SplitMix64,
//! bit for bit the engine's `sampling::Rng`, so a seeded request draws the same numbers with a plugin as
//! with native sampling. The host keeps it per request, outside any instance: replacing a trapped instance
//! does not rewind or reset it.

/// One request's random stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRandom {
    state: [u64; 4],
    draws: u64,
}

impl RequestRandom {
    pub fn new(seed: u64) -> Self {
        let mut splitmix = seed;
        let mut next = || {
            splitmix = splitmix.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = splitmix;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Self { state: [next(), next(), next(), next()], draws: 0 }
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        self.draws += 1;
        result
    }

    /// A uniform number in `[0, 1)` with 53 random bits; one `next_u64`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// How many u64 have been drawn from this stream.
    pub fn draws(&self) -> u64 {
        self.draws
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeding_matches_the_published_splitmix64_output() {
        // SplitMix64's first output for seed 0 is 0xE220A8397B1DCDAF.
        assert_eq!(RequestRandom::new(0).state[0], 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn streams_repeat_per_seed_and_count_draws() {
        let (mut a, mut b) = (RequestRandom::new(42), RequestRandom::new(42));
        let xs: Vec<u64> = (0..10).map(|_| a.next_u64()).collect();
        assert_eq!(xs, (0..10).map(|_| b.next_u64()).collect::<Vec<_>>());
        assert_ne!(xs, (0..10).map(|_| RequestRandom::new(43).next_u64()).collect::<Vec<_>>());
        assert_eq!(a.draws(), 10);
        let u = a.next_f64();
        assert!((0.0..1.0).contains(&u));
    }
}
