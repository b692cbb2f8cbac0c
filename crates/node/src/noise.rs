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
    /// Draws one value per cell of `cells` (each a `(weight, limit)`): a
    /// discrete Gaussian with `σ² = Δ²/(2ρ·weight²)` (`ρ` in millionths),
    /// in the cell's own units (see `CellSpec::weight`), expanded from the
    /// query's noise `seed`: the same seed and parameters always give the
    /// same values.
    ///
    /// # Errors
    /// [`NodeError::Crypto`] for unusable parameters;
    /// [`NodeError::Internal`] for a draw beyond its cell's `limit` (the
    /// room the share widths leave for one node's noise: a draw past it has
    /// probability below `2·exp(-128)`, and is refused rather than wrapped).
    pub fn draw(seed: &[u8; 32], delta_squared: u128, rho_micro: u64, cells: &[(u64, u64)]) -> Result<Self, NodeError> {
        let mut rng = seeded_rng(seed);
        let mut noise = Vec::with_capacity(cells.len());
        // One sampler per weight (a plan has three kinds of cell).
        let mut samplers: Vec<(u64, DiscreteGaussian)> = Vec::new();
        for &(weight, limit) in cells {
            if !samplers.iter().any(|(w, _)| *w == weight) {
                samplers.push((
                    weight,
                    DiscreteGaussian::for_zcdp_scaled(delta_squared, rho_micro, 1_000_000, weight)?,
                ));
            }
            let Some((_, g)) = samplers.iter().find(|(w, _)| *w == weight) else {
                return Err(NodeError::Internal("no sampler for a cell"));
            };
            let x = g.sample(&mut rng)?;
            if x.unsigned_abs() > limit {
                noise.zeroize();
                return Err(NodeError::Internal(
                    "a noise draw is beyond the room its cell's shares leave",
                ));
            }
            noise.push(x);
        }
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

    /// Adds the noise to `share`, cell by cell, and reduces each cell to its
    /// share ring `Z_{2^b}` (`bits`, one per cell).
    ///
    /// # Errors
    /// [`NodeError::Internal`] when the widths differ.
    pub fn add_to(&self, share: &mut Share, bits: &[u8]) -> Result<(), NodeError> {
        if share.width() != self.0.len() || bits.len() != self.0.len() {
            return Err(NodeError::Internal("noise and share widths differ"));
        }
        share.add_signed(&self.0);
        share.reduce_bits(bits);
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
        let a = DrawnNoise::draw(&seed, 4, 1000, &[(1, u64::MAX); 64]).unwrap();
        let b = DrawnNoise::draw(&seed, 4, 1000, &[(1, u64::MAX); 64]).unwrap();
        assert_eq!(a.values(), b.values());
        let c = DrawnNoise::draw(&fresh(), 4, 1000, &[(1, u64::MAX); 64]).unwrap();
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
        let (mut magnitude, mut sampling, mut drawn) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..trials {
            let t = Instant::now();
            let noise = DrawnNoise::draw(&fresh(), 1, 1000, &[(1, u64::MAX)]).unwrap();
            sampling.push(t.elapsed().as_nanos() as f64);
            magnitude.push(noise.values()[0].unsigned_abs() as f64);
            drawn.push(noise);
        }
        // The release path timed apart from the draws, as a node runs it
        // (its noise is drawn on another thread while the protocol runs):
        // timed right after its own draw, a long draw warmed the core for
        // it and the two correlated (r = -0.24 once, on a busy host). The
        // least of three runs, so a preemption does not count.
        let release: Vec<f64> = drawn
            .iter()
            .map(|noise| {
                (0..3)
                    .map(|_| {
                        let mut share = Share::from_words(vec![7u64; 1]);
                        let t = Instant::now();
                        noise.add_to(&mut share, &[64]).unwrap();
                        let encoded: Vec<u8> = share.words().iter().flat_map(|w| w.to_le_bytes()).collect();
                        std::hint::black_box(&encoded);
                        t.elapsed().as_nanos() as f64
                    })
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
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
        let noise = DrawnNoise::draw(&fresh(), 1, 1_000_000, &[(1, u64::MAX); 3]).unwrap();
        assert_eq!(noise.len(), 3);
        let mut share = Share::from_words(vec![0; 2]);
        assert!(noise.add_to(&mut share, &[64; 2]).is_err());
        let mut share = Share::from_words(vec![0; 3]);
        assert!(noise.add_to(&mut share, &[64; 2]).is_err());
        noise.add_to(&mut share, &[64; 3]).unwrap();
        let added: Vec<i64> = share.words().iter().map(|w| *w as i64).collect();
        assert_eq!(added, noise.values());
        assert_eq!(format!("{noise:?}"), "DrawnNoise(3 cells, <redacted>)");
        // Reduced to each cell's ring: the low bits, read back signed.
        let mut share = Share::from_words(vec![u64::MAX << 20; 3]);
        noise.add_to(&mut share, &[20; 3]).unwrap();
        for (w, n) in share.words().iter().zip(noise.values()) {
            assert_eq!(*w >> 20, 0);
            assert_eq!(cleanroom_wire::signed_in_bits(*w, 20), *n);
        }
    }

    /// A cell of weight `w` gets noise `w` times smaller (σ² = Δ²/(2ρw²)),
    /// and a draw beyond its limit is refused, not released.
    #[test]
    fn weights_scale_the_noise_and_limits_hold() {
        // Δ² = 10^10, ρ = 1: σ ≈ 70,711; at weight 1,000, σ ≈ 70.7.
        let cells: Vec<(u64, u64)> = (0..4000)
            .map(|i| if i % 2 == 0 { (1, u64::MAX) } else { (1000, u64::MAX) })
            .collect();
        let noise = DrawnNoise::draw(&fresh(), 10_000_000_000, 1_000_000, &cells).unwrap();
        let sd = |k: usize| {
            let v: Vec<f64> = noise.values().iter().skip(k).step_by(2).map(|x| *x as f64).collect();
            (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt()
        };
        let (wide, narrow) = (sd(0), sd(1));
        assert!((wide / 70_711.0 - 1.0).abs() < 0.1, "sd {wide}");
        assert!((narrow / 70.711 - 1.0).abs() < 0.1, "sd {narrow}");
        // A limit of 0 on a cell with σ ≈ 70: some draw among 100 is not 0.
        assert!(DrawnNoise::draw(&fresh(), 10_000_000_000, 1_000_000, &[(1000, 0); 100]).is_err());
    }
}
