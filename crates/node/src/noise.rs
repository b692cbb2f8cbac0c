//! The noise a node adds to its share: drawn ahead, added after.
//!
//! The exact discrete Gaussian sampler's running time depends on the values
//! it draws (its rejection loop runs longer for some outcomes). So a node
//! draws a query's noise on a separate thread the moment the query is
//! charged, while the protocol runs, and only *adds* it once its share is
//! ready: the time from "share ready" to "share released" is a fixed
//! sequence of wrapping additions and an encoding of fixed size, whatever
//! the noise. `tests::release_time_does_not_follow_the_noise` measures it.
//!
//! The draws are fixed per query and node: they come from a 256-bit seed
//! drawn from the OS generator when the query is charged and stored in the
//! same transaction as the charge (`State::noise_seed`), expanded with
//! ChaCha20. A rerun of the query (after the other node lost its share)
//! therefore adds exactly the same noise, so it releases nothing new; a
//! fresh draw would let a peer that knows its own un-noised share average
//! the noise away.
//!
//! No floating point here (checked by clippy): the sampler and the addition
//! are integer arithmetic.
#![deny(clippy::float_arithmetic)]

use cleanroom_crypto::dp::DiscreteGaussian;
use cleanroom_crypto::rng::seeded_rng;
use cleanroom_crypto::shares::Share;
use zeroize::Zeroize;

use crate::NodeError;

/// Noise drawn for one share, redacted in `Debug` and zeroized on drop.
pub struct DrawnNoise(Vec<i64>);

impl std::fmt::Debug for DrawnNoise {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DrawnNoise({} cells, <redacted>)", self.0.len())
    }
}

impl Drop for DrawnNoise {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl DrawnNoise {
    /// Draws `cells` values of the discrete Gaussian with `σ² = Δ²/(2ρ)`
    /// (`ρ` in millionths), expanded from the query's noise `seed`: the
    /// same seed and parameters always give the same values.
    ///
    /// # Errors
    /// [`NodeError::Crypto`] for unusable parameters.
    pub fn draw(seed: &[u8; 32], delta_squared: u128, rho_micro: u64, cells: usize) -> Result<Self, NodeError> {
        let gauss = DiscreteGaussian::for_zcdp(delta_squared, rho_micro, 1_000_000)?;
        let mut rng = seeded_rng(seed);
        let noise = (0..cells)
            .map(|_| gauss.sample(&mut rng))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self(noise))
    }

    /// Cells drawn.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether no cell was drawn.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds the noise to `share`, cell by cell.
    ///
    /// # Errors
    /// [`NodeError::Internal`] when the widths differ.
    pub fn add_to(&self, share: &mut Share) -> Result<(), NodeError> {
        if share.width() != self.0.len() {
            return Err(NodeError::Internal("noise and share widths differ"));
        }
        share.add_signed(&self.0);
        Ok(())
    }

    /// The drawn values (tests only: they are secret).
    #[cfg(test)]
    fn values(&self) -> &[i64] {
        &self.0
    }
}

#[cfg(test)]
#[allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn fresh() -> [u8; 32] {
        let mut seed = [0u8; 32];
        cleanroom_crypto::rng::SystemRng::new().try_fill(&mut seed).unwrap();
        seed
    }

    /// The same seed gives the same noise; another seed, other noise.
    #[test]
    fn a_seed_fixes_the_noise() {
        let seed = fresh();
        let a = DrawnNoise::draw(&seed, 4, 1000, 64).unwrap();
        let b = DrawnNoise::draw(&seed, 4, 1000, 64).unwrap();
        assert_eq!(a.values(), b.values());
        let c = DrawnNoise::draw(&fresh(), 4, 1000, 64).unwrap();
        assert_ne!(a.values(), c.values());
        // σ ≈ 44.7 here: 64 cells are not all equal.
        assert!(a.values().iter().any(|v| *v != a.values()[0]));
    }

    fn pearson(x: &[f64], y: &[f64]) -> f64 {
        let n = x.len() as f64;
        let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
        let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
        let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
        cov / (vx * vy).sqrt()
    }

    /// The release path (add the pre-drawn noise, encode the share) takes
    /// the same time whatever the noise; the sampler itself is timed too,
    /// to show what drawing at release time would expose. Both correlations
    /// are printed (`cargo test -p cleanroom-node release_time -- --nocapture`).
    #[test]
    fn release_time_does_not_follow_the_noise() {
        // One cell of a count at ρ = 0.001 (σ ≈ 22): a wide spread of |noise|.
        let trials = 2000;
        let (mut magnitude, mut release, mut sampling) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..trials {
            let t = Instant::now();
            let noise = DrawnNoise::draw(&fresh(), 1, 1000, 1).unwrap();
            sampling.push(t.elapsed().as_nanos() as f64);
            magnitude.push(noise.values()[0].unsigned_abs() as f64);
            let mut share = Share::from_words(vec![7u64; 1]);
            let t = Instant::now();
            noise.add_to(&mut share).unwrap();
            let encoded: Vec<u8> = share.words().iter().flat_map(|w| w.to_le_bytes()).collect();
            std::hint::black_box(&encoded);
            release.push(t.elapsed().as_nanos() as f64);
        }
        let r_release = pearson(&magnitude, &release);
        let r_sampling = pearson(&magnitude, &sampling);
        println!(
            "correlation of |noise| with: release time {r_release:+.3}, sampling time {r_sampling:+.3} ({trials} draws)"
        );
        // With 2000 independent pairs the correlation's standard error is
        // about 0.022: 0.15 is far outside chance.
        assert!(
            r_release.abs() < 0.15,
            "release time follows the noise: r = {r_release}"
        );
    }

    #[test]
    fn widths_must_match_and_debug_redacts() {
        let noise = DrawnNoise::draw(&fresh(), 1, 1_000_000, 3).unwrap();
        assert_eq!(noise.len(), 3);
        let mut share = Share::from_words(vec![0; 2]);
        assert!(noise.add_to(&mut share).is_err());
        let mut share = Share::from_words(vec![0; 3]);
        noise.add_to(&mut share).unwrap();
        let added: Vec<i64> = share.words().iter().map(|w| *w as i64).collect();
        assert_eq!(added, noise.values());
        assert_eq!(format!("{noise:?}"), "DrawnNoise(3 cells, <redacted>)");
    }
}
