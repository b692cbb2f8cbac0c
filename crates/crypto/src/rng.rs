//! Randomness. Every secret and every noise draw starts from the operating
//! system's CSPRNG (through ring's `SystemRandom`); bulk randomness for one
//! session (shuffles, dummy points) comes from a ChaCha20 stream keyed with 256
//! bits from it.

use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};
use ring::rand::{SecureRandom, SystemRandom};

use crate::CryptoError;

/// The OS CSPRNG as a `rand_core` generator. Each call is a system call:
/// use it for keys and noise, and [`session_rng`] for bulk randomness.
#[derive(Debug, Clone)]
pub struct SystemRng(SystemRandom);

impl Default for SystemRng {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemRng {
    /// The OS generator.
    pub fn new() -> Self {
        Self(SystemRandom::new())
    }

    /// Fills `dest`, reporting a failure of the OS generator.
    ///
    /// # Errors
    /// [`CryptoError::Randomness`] when the OS refuses.
    pub fn try_fill(&self, dest: &mut [u8]) -> Result<(), CryptoError> {
        self.0.fill(dest).map_err(|_| CryptoError::Randomness)
    }
}

impl RngCore for SystemRng {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        // The OS generator does not fail on any supported platform once
        // initialised; if it ever did, continuing with predictable bytes
        // would be worse than stopping.
        if self.0.fill(dest).is_err() {
            panic!("the operating system's random number generator failed");
        }
    }
}

impl CryptoRng for SystemRng {}

/// A ChaCha20 stream whose state is wiped when it is dropped: its key (and
/// buffered output) determine a session's secrets (`kb`, the dummies, `D`,
/// the permutations) or a query's noise.
pub struct SessionRng(ChaCha20Rng);

impl SessionRng {
    /// ChaCha20 keyed with `seed`.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Self(ChaCha20Rng::from_seed(seed))
    }
}

impl Drop for SessionRng {
    fn drop(&mut self) {
        // Overwrites key, counter and buffer in place (no `unsafe`); the
        // `black_box` keeps the store from being dropped as dead.
        self.0 = ChaCha20Rng::from_seed([0u8; 32]);
        std::hint::black_box(&self.0);
    }
}

impl std::fmt::Debug for SessionRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionRng(<redacted>)")
    }
}

impl RngCore for SessionRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest);
    }
}

impl CryptoRng for SessionRng {}

/// A ChaCha20 generator keyed with 32 fresh bytes from the OS.
///
/// # Errors
/// [`CryptoError::Randomness`] when the OS refuses.
pub fn session_rng() -> Result<SessionRng, CryptoError> {
    let mut seed = [0u8; 32];
    SystemRng::new().try_fill(&mut seed)?;
    let rng = SessionRng::from_seed(seed);
    zeroize::Zeroize::zeroize(&mut seed);
    Ok(rng)
}

/// The generator that expands a stored 256-bit seed into one query's noise:
/// ChaCha20 keyed with the seed, so the same seed gives the same draws.
/// Each node draws its seed from the OS generator when it charges the query
/// and keeps it with the charge (see the node's state).
pub fn seeded_rng(seed: &[u8; 32]) -> SessionRng {
    SessionRng::from_seed(*seed)
}

/// A uniform integer in `[0, bound)` by rejection (no modulo bias).
/// `bound` must be non-zero.
pub fn uniform_below<R: RngCore + ?Sized>(rng: &mut R, bound: u64) -> u64 {
    debug_assert!(bound > 0);
    let bound = bound.max(1);
    let zone = u64::MAX - (u64::MAX - bound + 1) % bound;
    loop {
        let v = rng.next_u64();
        if v <= zone {
            return v % bound;
        }
    }
}

/// Fisher–Yates shuffle with unbiased indices.
pub fn shuffle<T, R: RngCore + ?Sized>(items: &mut [T], rng: &mut R) {
    for i in (1..items.len()).rev() {
        let j = uniform_below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_and_shuffle() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut counts = [0u32; 3];
        for _ in 0..30_000 {
            counts[uniform_below(&mut rng, 3) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        let mut v: Vec<u32> = (0..1000).collect();
        shuffle(&mut v, &mut rng);
        let mut sorted = v.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(v, sorted);
        let mut os = SystemRng::new();
        assert_ne!(os.next_u64(), os.next_u64());
        assert!(session_rng().is_ok());
        // The same seed, the same stream; wiped on drop (nothing to see but
        // that it is still usable until then).
        let (mut a, mut b) = (seeded_rng(&[5; 32]), seeded_rng(&[5; 32]));
        assert_eq!(a.next_u64(), b.next_u64());
        assert_eq!(format!("{a:?}"), "SessionRng(<redacted>)");
    }
}
