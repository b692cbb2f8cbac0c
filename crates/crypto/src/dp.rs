//! Exact samplers for differential privacy (Canonne, Kamath, Steinke 2020,
//! "The Discrete Gaussian for Differential Privacy", algorithms 1–3).
//!
//! Every parameter is a rational number and every step is integer arithmetic
//! on big integers with uniform draws by rejection: no floating point is used
//! to sample or add noise. The generator is any `CryptoRng`: for a query's
//! Gaussian noise a node passes ChaCha20 keyed with the query's stored seed
//! (256 bits from the OS generator, [`crate::rng::seeded_rng`]); for the
//! cardinality noise and the padding, a session's ChaCha20 stream; tests
//! pass a seeded ChaCha20.
//! Clippy refuses floating point in this module, except in the one function
//! that derives the public shift `μ` from public parameters (and in tests).
#![deny(clippy::float_arithmetic)]

use num_bigint::BigUint;
use num_integer::Integer;
use num_traits::{One, ToPrimitive, Zero};
use rand_core::{CryptoRng, RngCore};

use crate::CryptoError;

/// A uniform integer in `[0, bound)`, by rejection on the bit length.
fn uniform_below<R: RngCore + CryptoRng>(rng: &mut R, bound: &BigUint) -> BigUint {
    let bits = bound.bits();
    let nbytes = bits.div_ceil(8) as usize;
    let top_mask: u8 = match bits % 8 {
        0 => 0xff,
        r => (1u8 << r) - 1,
    };
    let mut buf = vec![0u8; nbytes];
    loop {
        rng.fill_bytes(&mut buf);
        if let Some(last) = buf.last_mut() {
            *last &= top_mask;
        }
        let v = BigUint::from_bytes_le(&buf);
        if &v < bound {
            return v;
        }
    }
}

/// Bernoulli(num/den), `0 <= num <= den`, `den > 0`.
fn bernoulli<R: RngCore + CryptoRng>(rng: &mut R, num: &BigUint, den: &BigUint) -> bool {
    &uniform_below(rng, den) < num
}

/// Bernoulli(exp(-num/den)) for `num/den` in `[0, 1]` (CKS20 algorithm 1).
fn bernoulli_exp_small<R: RngCore + CryptoRng>(rng: &mut R, num: &BigUint, den: &BigUint) -> bool {
    let mut k = BigUint::one();
    loop {
        let kd = den * &k;
        if !bernoulli(rng, num, &kd) {
            break;
        }
        k += 1u32;
    }
    k.is_odd()
}

/// Bernoulli(exp(-num/den)) for any `num/den >= 0`.
pub fn bernoulli_exp<R: RngCore + CryptoRng>(rng: &mut R, num: &BigUint, den: &BigUint) -> bool {
    let (whole, frac) = num.div_rem(den);
    let one = BigUint::one();
    let mut i = BigUint::zero();
    while i < whole {
        if !bernoulli_exp_small(rng, &one, &one) {
            return false;
        }
        i += 1u32;
    }
    bernoulli_exp_small(rng, &frac, den)
}

/// The discrete Laplace distribution with scale `b = s/t`:
/// `P[X = x] ∝ exp(-|x| / b)` (CKS20 algorithm 2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscreteLaplace {
    // Scale `num/den`; CKS20 call these `t` and `s` (their output is `Lap_Z(t/s)`).
    num: BigUint,
    den: BigUint,
}

impl DiscreteLaplace {
    /// Scale `s/t`.
    ///
    /// # Errors
    /// [`CryptoError::NoiseParameter`] when `s` or `t` is zero.
    pub fn new(s: u64, t: u64) -> Result<Self, CryptoError> {
        if s == 0 || t == 0 {
            return Err(CryptoError::NoiseParameter);
        }
        Ok(Self {
            num: BigUint::from(s),
            den: BigUint::from(t),
        })
    }

    fn from_big(num: BigUint, den: BigUint) -> Self {
        Self { num, den }
    }

    /// One draw.
    ///
    /// # Errors
    /// [`CryptoError::NoiseOverflow`] if a draw does not fit an i64 (its
    /// probability is below 2^-60 for any scale under 2^50).
    pub fn sample<R: RngCore + CryptoRng>(&self, rng: &mut R) -> Result<i64, CryptoError> {
        let one = BigUint::one();
        loop {
            let u = uniform_below(rng, &self.num);
            if !bernoulli_exp_small(rng, &u, &self.num) {
                continue;
            }
            let mut v = BigUint::zero();
            while bernoulli_exp_small(rng, &one, &one) {
                v += 1u32;
            }
            let x = u + &self.num * v;
            let y = x / &self.den;
            let negative = bernoulli(rng, &one, &BigUint::from(2u32));
            if negative && y.is_zero() {
                continue;
            }
            let y = y.to_i64().ok_or(CryptoError::NoiseOverflow)?;
            return Ok(if negative { -y } else { y });
        }
    }
}

/// The discrete Gaussian `N_Z(0, σ²)`: `P[X = x] ∝ exp(-x² / (2σ²))`, with
/// `σ² = num/den` (CKS20 algorithm 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscreteGaussian {
    num: BigUint,
    den: BigUint,
    t: BigUint,
}

impl DiscreteGaussian {
    /// `σ² = num / den`.
    ///
    /// # Errors
    /// [`CryptoError::NoiseParameter`] when either is zero.
    pub fn new(num: BigUint, den: BigUint) -> Result<Self, CryptoError> {
        if num.is_zero() || den.is_zero() {
            return Err(CryptoError::NoiseParameter);
        }
        let t = (&num / &den).sqrt() + 1u32; // floor(σ) + 1
        Ok(Self { num, den, t })
    }

    /// The calibration of PROTOCOL.md: `σ² = Δ² / (2ρ)` for an L2
    /// sensitivity with `Δ² = delta_squared` and `ρ = rho_num / rho_den`
    /// (zero-concentrated DP).
    ///
    /// # Errors
    /// [`CryptoError::NoiseParameter`] for a zero sensitivity or budget.
    pub fn for_zcdp(delta_squared: u128, rho_num: u64, rho_den: u64) -> Result<Self, CryptoError> {
        if rho_num == 0 || rho_den == 0 {
            return Err(CryptoError::NoiseParameter);
        }
        Self::new(
            BigUint::from(delta_squared) * BigUint::from(rho_den),
            BigUint::from(2u32) * BigUint::from(rho_num),
        )
    }

    /// [`Self::for_zcdp`] in units `scale` times coarser: `σ² = Δ² / (2ρ·scale²)`.
    /// For a cell whose contribution counts `scale` times in `Δ` but which is
    /// itself unscaled: the same ρ as scaling the cell and noising it with
    /// [`Self::for_zcdp`], on the integers instead of a lattice `1/scale`.
    ///
    /// # Errors
    /// [`CryptoError::NoiseParameter`] for a zero sensitivity, budget or scale.
    pub fn for_zcdp_scaled(delta_squared: u128, rho_num: u64, rho_den: u64, scale: u64) -> Result<Self, CryptoError> {
        if rho_num == 0 || rho_den == 0 || scale == 0 {
            return Err(CryptoError::NoiseParameter);
        }
        Self::new(
            BigUint::from(delta_squared) * BigUint::from(rho_den),
            BigUint::from(2u32) * BigUint::from(rho_num) * BigUint::from(scale) * BigUint::from(scale),
        )
    }

    /// `σ²` as a rational `(num, den)`.
    pub fn variance(&self) -> (&BigUint, &BigUint) {
        (&self.num, &self.den)
    }

    /// One draw.
    ///
    /// # Errors
    /// [`CryptoError::NoiseOverflow`] as for [`DiscreteLaplace::sample`].
    pub fn sample<R: RngCore + CryptoRng>(&self, rng: &mut R) -> Result<i64, CryptoError> {
        let lap = DiscreteLaplace::from_big(self.t.clone(), BigUint::one());
        // γ = (|Y| - σ²/t)² / (2σ²) = (|Y|·t·den - num)² / (2·num·den·t²)
        let gamma_den = BigUint::from(2u32) * &self.num * &self.den * &self.t * &self.t;
        loop {
            let y = lap.sample(rng)?;
            let abs = BigUint::from(y.unsigned_abs()) * &self.t * &self.den;
            let diff = if abs >= self.num {
                abs - &self.num
            } else {
                &self.num - abs
            };
            let gamma_num = &diff * &diff;
            if bernoulli_exp(rng, &gamma_num, &gamma_den) {
                return Ok(y);
            }
        }
    }
}

/// The cardinality noise of the private join: a discrete Laplace of scale
/// `1/ε` shifted by `μ` and clamped to `[0, 2μ]`, with
/// `μ = ceil(ln(2/δ)/ε) + 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShiftedTruncatedLaplace {
    lap: DiscreteLaplace,
    mu: u64,
}

impl ShiftedTruncatedLaplace {
    /// `ε = eps_num / eps_den` and `δ = 1 / delta_inv`.
    ///
    /// `μ` is a public parameter derived from public configuration; it is
    /// computed once with floating point (then rounded up with a margin),
    /// which is safe: no secret enters it and no sample depends on it beyond
    /// this public integer.
    ///
    /// # Errors
    /// [`CryptoError::NoiseParameter`] for a zero ε, `δ >= 1/2`, or `μ` over 2^20.
    pub fn new(eps_num: u64, eps_den: u64, delta_inv: u64) -> Result<Self, CryptoError> {
        if eps_num == 0 || eps_den == 0 || delta_inv < 2 {
            return Err(CryptoError::NoiseParameter);
        }
        let mu = public_mu(eps_num, eps_den, delta_inv)?;
        Ok(Self {
            lap: DiscreteLaplace::new(eps_den, eps_num)?,
            mu,
        })
    }

    /// For a histogram of counts (one draw per bin) whose neighbouring
    /// inputs differ by at most `l1` in all bins together and by at most
    /// `linf` in any one bin: scale `l1/ε` and
    /// `μ = ceil((l1/ε) · ln(2·l1/δ)) + linf`, so the privacy loss over the
    /// bins is at most `ε` and the truncation at `0` and `2μ` costs at most
    /// `δ/l1` in each of the at most `l1` bins that change. With
    /// `l1 = linf = 1` this is [`ShiftedTruncatedLaplace::new`]. A
    /// multi-key join's match patterns take `l1 = 2K`, `linf = K`
    /// (docs/protocol.md, "Multi-key matching").
    ///
    /// # Errors
    /// As [`ShiftedTruncatedLaplace::new`], and for `linf` of 0 or above
    /// `l1`.
    pub fn for_histogram(eps_num: u64, eps_den: u64, delta_inv: u64, l1: u64, linf: u64) -> Result<Self, CryptoError> {
        if linf == 0 || linf > l1 {
            return Err(CryptoError::NoiseParameter);
        }
        let (Some(den), Some(inv)) = (eps_den.checked_mul(l1), delta_inv.checked_mul(l1)) else {
            return Err(CryptoError::NoiseParameter);
        };
        let mut st = Self::new(eps_num, den, inv)?;
        st.mu = st
            .mu
            .checked_add(linf - 1)
            .filter(|mu| *mu <= 1 << 20)
            .ok_or(CryptoError::NoiseParameter)?;
        Ok(st)
    }

    /// The shift `μ`.
    pub fn mu(&self) -> u64 {
        self.mu
    }

    /// `D_max = 2μ`: the number of dummy rows and dummy tokens.
    pub fn d_max(&self) -> u64 {
        2 * self.mu
    }

    /// One draw of `D` in `[0, D_max]`.
    ///
    /// # Errors
    /// As [`DiscreteLaplace::sample`].
    pub fn sample<R: RngCore + CryptoRng>(&self, rng: &mut R) -> Result<u64, CryptoError> {
        let x = self.lap.sample(rng)?;
        let shifted = i128::from(self.mu) + i128::from(x);
        Ok(shifted.clamp(0, i128::from(self.d_max())) as u64)
    }
}

#[allow(clippy::float_arithmetic, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn public_mu(eps_num: u64, eps_den: u64, delta_inv: u64) -> Result<u64, CryptoError> {
    let eps = eps_num as f64 / eps_den as f64;
    let ln = (2.0 * delta_inv as f64).ln();
    let v = (ln / eps * (1.0 + 1e-9)).ceil() + 1.0;
    if !(1.0..=f64::from(1u32 << 20)).contains(&v) {
        return Err(CryptoError::NoiseParameter);
    }
    Ok(v as u64)
}

#[cfg(test)]
#[allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    /// Pearson's chi-square statistic of `samples` against the pmf `p` on the
    /// support `[-range, range]`, with both tails pooled into one bin each.
    /// Returns (statistic, degrees of freedom).
    fn chi_square(samples: &[i64], range: i64, p: impl Fn(i64) -> f64) -> (f64, usize) {
        let norm: f64 = (-range * 20..=range * 20).map(&p).sum();
        let n = samples.len() as f64;
        let mut bins: Vec<(f64, f64)> = Vec::new(); // (observed, expected)
        let lower_tail: f64 = (-range * 20..-range).map(&p).sum::<f64>() / norm;
        bins.push((samples.iter().filter(|&&x| x < -range).count() as f64, lower_tail * n));
        for x in -range..=range {
            bins.push((samples.iter().filter(|&&s| s == x).count() as f64, p(x) / norm * n));
        }
        let upper_tail: f64 = (range + 1..=range * 20).map(&p).sum::<f64>() / norm;
        bins.push((samples.iter().filter(|&&x| x > range).count() as f64, upper_tail * n));
        // Pool bins with small expectations into their neighbours.
        let mut pooled: Vec<(f64, f64)> = Vec::new();
        let mut acc = (0.0, 0.0);
        for b in bins {
            acc.0 += b.0;
            acc.1 += b.1;
            if acc.1 >= 10.0 {
                pooled.push(acc);
                acc = (0.0, 0.0);
            }
        }
        if let Some(last) = pooled.last_mut() {
            last.0 += acc.0;
            last.1 += acc.1;
        }
        let stat = pooled.iter().map(|(o, e)| (o - e) * (o - e) / e).sum();
        (stat, pooled.len() - 1)
    }

    /// The chi-square quantile at 1 - 1e-4 (Wilson–Hilferty approximation).
    fn chi_square_critical(df: usize) -> f64 {
        let k = df as f64;
        let z = 3.719; // standard normal quantile at 1 - 1e-4
        k * (1.0 - 2.0 / (9.0 * k) + z * (2.0 / (9.0 * k)).sqrt()).powi(3)
    }

    fn moments(samples: &[i64]) -> (f64, f64) {
        let n = samples.len() as f64;
        let mean = samples.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = samples.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    #[test]
    fn bernoulli_exp_frequencies() {
        let mut rng = ChaCha20Rng::seed_from_u64(21);
        for (num, den) in [(1u32, 2u32), (1, 1), (5, 2), (0, 1)] {
            let n = 40_000;
            let hits = (0..n)
                .filter(|_| bernoulli_exp(&mut rng, &BigUint::from(num), &BigUint::from(den)))
                .count() as f64;
            let p = (-(f64::from(num) / f64::from(den))).exp();
            let sd = (p * (1.0 - p) / n as f64).sqrt().max(1e-9);
            assert!((hits / n as f64 - p).abs() <= 5.0 * sd + 1e-9, "{num}/{den}: {hits}");
        }
    }

    #[test]
    fn discrete_laplace_matches_its_pmf() {
        for (seed, s, t) in [(1u64, 1u64, 1u64), (2, 5, 2), (3, 20, 1), (4, 1, 3)] {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let d = DiscreteLaplace::new(s, t).unwrap();
            let samples: Vec<i64> = (0..20_000).map(|_| d.sample(&mut rng).unwrap()).collect();
            let b = s as f64 / t as f64;
            // Exact moments: mean 0, variance 2 e^{-1/b} / (1 - e^{-1/b})^2.
            let q = (-1.0 / b).exp();
            let var = 2.0 * q / (1.0 - q).powi(2);
            let (mean, v) = moments(&samples);
            let n = samples.len() as f64;
            assert!(mean.abs() <= 5.0 * (var / n).sqrt(), "scale {b}: mean {mean}");
            assert!((v - var).abs() <= 0.1 * var + 0.05, "scale {b}: var {v} vs {var}");
            let range = (6.0 * b).ceil() as i64 + 2;
            let (stat, df) = chi_square(&samples, range, |x| (-(x.abs() as f64) / b).exp());
            assert!(stat < chi_square_critical(df), "scale {b}: chi2 {stat} df {df}");
        }
    }

    #[test]
    fn discrete_gaussian_matches_its_pmf() {
        for (seed, num, den) in [(7u64, 1u32, 2u32), (8, 4, 1), (9, 100, 1), (10, 1000, 3)] {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let g = DiscreteGaussian::new(BigUint::from(num), BigUint::from(den)).unwrap();
            let samples: Vec<i64> = (0..20_000).map(|_| g.sample(&mut rng).unwrap()).collect();
            let s2 = f64::from(num) / f64::from(den);
            let range = (6.0 * s2.sqrt()).ceil() as i64 + 2;
            let pmf = |x: i64| (-((x * x) as f64) / (2.0 * s2)).exp();
            let norm: f64 = (-range * 20..=range * 20).map(pmf).sum();
            let var: f64 = (-range * 20..=range * 20).map(|x| (x * x) as f64 * pmf(x)).sum::<f64>() / norm;
            let (mean, v) = moments(&samples);
            let n = samples.len() as f64;
            assert!(mean.abs() <= 5.0 * (var / n).sqrt(), "σ²={s2}: mean {mean}");
            assert!((v - var).abs() <= 0.1 * var + 0.02, "σ²={s2}: var {v} vs {var}");
            let (stat, df) = chi_square(&samples, range, pmf);
            assert!(stat < chi_square_critical(df), "σ²={s2}: chi2 {stat} df {df}");
        }
    }

    #[test]
    fn the_goodness_of_fit_test_can_fail() {
        // A sampler of the wrong scale must be caught by the same test.
        let mut rng = ChaCha20Rng::seed_from_u64(11);
        let g = DiscreteGaussian::new(BigUint::from(5u32), BigUint::one()).unwrap();
        let samples: Vec<i64> = (0..20_000).map(|_| g.sample(&mut rng).unwrap()).collect();
        let (stat, df) = chi_square(&samples, 16, |x| (-((x * x) as f64) / 8.0).exp());
        assert!(stat > chi_square_critical(df), "chi2 {stat} df {df}");
    }

    #[test]
    fn large_scales_do_not_overflow() {
        let mut rng = ChaCha20Rng::seed_from_u64(12);
        // σ = 10^7 (cents), as a spend sum with a large clip bound gets.
        let g = DiscreteGaussian::for_zcdp(100_000_000_000_000, 1, 2).unwrap();
        let xs: Vec<i64> = (0..200).map(|_| g.sample(&mut rng).unwrap()).collect();
        let (_, v) = moments(&xs);
        assert!(v > 1e13 && v < 1e15, "variance {v}");
    }

    #[test]
    fn shifted_truncated_laplace() {
        let st = ShiftedTruncatedLaplace::new(1, 2, 1_000_000).unwrap();
        // μ = ceil(ln(2e6) / 0.5) + 1 = ceil(29.02) + 1 = 31.
        assert_eq!(st.mu(), 31);
        assert_eq!(st.d_max(), 62);
        let mut rng = ChaCha20Rng::seed_from_u64(13);
        let ds: Vec<i64> = (0..20_000).map(|_| st.sample(&mut rng).unwrap() as i64).collect();
        assert!(ds.iter().all(|&d| (0..=62).contains(&d)));
        let shifted: Vec<i64> = ds.iter().map(|d| d - 31).collect();
        let (stat, df) = chi_square(&shifted, 20, |x| (-(x.abs() as f64) * 0.5).exp());
        assert!(stat < chi_square_critical(df), "chi2 {stat} df {df}");
        assert!(ShiftedTruncatedLaplace::new(0, 1, 100).is_err());
        assert!(ShiftedTruncatedLaplace::new(1, 1, 1).is_err());
    }

    #[test]
    fn histogram_calibration() {
        // One bin, sensitivity 1: the single-key noise.
        assert_eq!(
            ShiftedTruncatedLaplace::for_histogram(1, 2, 1_000_000, 1, 1).unwrap(),
            ShiftedTruncatedLaplace::new(1, 2, 1_000_000).unwrap()
        );
        // Two keys (l1 = 4, linf = 2) at ε = 1/2, δ = 10^-6: scale 8 and
        // μ = ceil(8 · ln(8·10^6)) + 2 = ceil(127.16) + 2 = 130.
        let st = ShiftedTruncatedLaplace::for_histogram(1, 2, 1_000_000, 4, 2).unwrap();
        let want = (8.0 * (2.0 * 4.0 * 1e6f64).ln()).ceil() as u64 + 2;
        assert_eq!(st.mu(), want);
        assert_eq!(st.mu(), 130);
        assert_eq!(st.d_max(), 260);
        // The draws have scale l1/ε = 8 around μ.
        let mut rng = ChaCha20Rng::seed_from_u64(17);
        let ds: Vec<i64> = (0..20_000).map(|_| st.sample(&mut rng).unwrap() as i64 - 130).collect();
        let (stat, df) = chi_square(&ds, 32, |x| (-(x.abs() as f64) / 8.0).exp());
        assert!(stat < chi_square_critical(df), "chi2 {stat} df {df}");
        assert!(ShiftedTruncatedLaplace::for_histogram(1, 2, 1_000_000, 5, 0).is_err());
        assert!(ShiftedTruncatedLaplace::for_histogram(1, 2, 1_000_000, 2, 3).is_err());
        assert!(ShiftedTruncatedLaplace::for_histogram(1, u64::MAX, 1_000_000, 5, 3).is_err());
        assert!(DiscreteGaussian::for_zcdp(0, 1, 1).is_err());
        assert!(DiscreteLaplace::new(0, 1).is_err());
    }
}
