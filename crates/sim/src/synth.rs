//! Synthetic data for both parties: card transactions with log-normal
//! amounts and Zipf-distributed merchant categories for the bank, users with
//! segments and countries for the platform, with a chosen overlap and
//! identifiers written the messy ways real systems write them.
//!
//! Floating point is used here to shape synthetic data only; nothing here
//! touches the protocol's secrets or noise.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Merchant categories used by default (the first `C` are taken; more are numbered).
pub const DEFAULT_CATEGORIES: [&str; 16] = [
    "groceries",
    "restaurants",
    "fuel",
    "travel",
    "airlines",
    "hotels",
    "electronics",
    "clothing",
    "pharmacy",
    "entertainment",
    "utilities",
    "telecom",
    "home_improvement",
    "education",
    "health",
    "gifts",
];

/// Platform segments.
pub const SEGMENTS: [&str; 5] = ["messenger_active", "marketplace_buyer", "creator", "gamer", "casual"];
/// Platform countries.
pub const COUNTRIES: [&str; 6] = ["GB", "FR", "DE", "ES", "IT", "NL"];

/// What to generate.
#[derive(Clone, Debug)]
pub struct SynthConfig {
    /// Distinct bank customers.
    pub holder_customers: usize,
    /// Distinct platform users.
    pub matcher_users: usize,
    /// Share of the bank's customers the platform also has (0..=1).
    pub overlap: f64,
    /// Number of merchant categories.
    pub categories: usize,
    /// Seed: the same seed gives the same data.
    pub seed: u64,
}

/// One card transaction: `bank(customer, email, phone, category, amount, date)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BankTxn {
    /// The bank's customer number.
    pub customer: u64,
    /// The customer's e-mail, as the bank stores it.
    pub email: String,
    /// The customer's phone, as the bank stores it.
    pub phone: String,
    /// Index into the category list.
    pub category: usize,
    /// Amount in cents.
    pub amount_cents: i64,
    /// Days since 1970-01-01.
    pub day: i32,
}

/// One platform user: `platform(email, phone, segment, country)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformUser {
    /// E-mail as the platform stores it.
    pub email: String,
    /// Phone as the platform stores it.
    pub phone: String,
    /// Index into [`SEGMENTS`].
    pub segment: usize,
    /// Index into [`COUNTRIES`].
    pub country: usize,
}

/// The generated data of both parties.
#[derive(Clone, Debug)]
pub struct SynthData {
    /// Category names.
    pub categories: Vec<String>,
    /// Bank transactions, grouped by customer.
    pub bank: Vec<BankTxn>,
    /// Platform users.
    pub platform: Vec<PlatformUser>,
    /// How many bank customers the platform has (by construction).
    pub shared_customers: usize,
}

/// The first day of generated transactions (2026-01-01).
pub const FIRST_DAY: i32 = 20_454;
/// Days covered.
pub const DAYS: i32 = 181;

const FIRST_NAMES: [&str; 12] = [
    "alice", "bob", "chloe", "david", "emma", "farid", "grace", "hugo", "ines", "jonas", "keiko", "liam",
];
const DOMAINS: [&str; 6] = [
    "example.com",
    "mail.example",
    "post.example.org",
    "inbox.example.net",
    "corp.example",
    "web.example",
];

fn canonical_email(person: u64) -> String {
    let first = FIRST_NAMES[(person % FIRST_NAMES.len() as u64) as usize];
    let domain = DOMAINS[((person / 7) % DOMAINS.len() as u64) as usize];
    format!("{first}.{person}@{domain}")
}

fn canonical_phone_digits(person: u64) -> String {
    // UK mobile range 7700 900000..=7700 999999 is reserved for drama; we
    // spread over 74xx-79xx to have room for millions of people.
    format!("7{:09}", 400_000_000 + person)
}

/// Writes an e-mail the way some system might: random capitals, stray spaces.
fn messy_email<R: RngCore>(rng: &mut R, email: &str) -> String {
    let mut s: String = email
        .chars()
        .map(|c| {
            if rng.random_bool(0.2) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    if rng.random_bool(0.2) {
        s = format!("  {s}");
    }
    if rng.random_bool(0.2) {
        s.push(' ');
    }
    s
}

/// Writes a UK number in one of the usual national or international forms.
fn messy_phone<R: RngCore>(rng: &mut R, digits: &str) -> String {
    let (a, b) = digits.split_at(4);
    match rng.random_range(0..5) {
        0 => format!("+44{digits}"),
        1 => format!("+44 {a} {b}"),
        2 => format!("0{a} {b}"),
        3 => format!("0044-{a}-{b}"),
        _ => format!("(0{a}) {b}"),
    }
}

fn standard_normal<R: RngCore>(rng: &mut R) -> f64 {
    // Box–Muller.
    let u1: f64 = rng.random_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn zipf_table(n: usize, s: f64) -> Vec<f64> {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    weights
        .iter()
        .map(|w| {
            acc += w / total;
            acc
        })
        .collect()
}

fn sample_cdf<R: RngCore>(rng: &mut R, cdf: &[f64]) -> usize {
    let u: f64 = rng.random();
    cdf.iter().position(|c| u < *c).unwrap_or(cdf.len().saturating_sub(1))
}

/// Category names for `c` categories.
pub fn category_names(c: usize) -> Vec<String> {
    (0..c)
        .map(|i| {
            DEFAULT_CATEGORIES
                .get(i)
                .map_or_else(|| format!("category_{i}"), |s| (*s).to_string())
        })
        .collect()
}

/// Generates both parties' data.
pub fn generate(cfg: &SynthConfig) -> SynthData {
    let mut rng = ChaCha20Rng::seed_from_u64(cfg.seed);
    let categories = category_names(cfg.categories.max(1));
    let cdf = zipf_table(categories.len(), 1.1);
    let overlap = cfg.overlap.clamp(0.0, 1.0);
    let shared = ((cfg.holder_customers as f64 * overlap).round() as usize).min(cfg.matcher_users);

    // People 0..n are the bank's customers; people n.. are platform-only.
    // The platform has bank customers 0..shared (the bank's customer order is
    // shuffled below, so "first" means nothing).
    let mut bank = Vec::with_capacity(cfg.holder_customers * 4);
    let mut customer_ids: Vec<u64> = (0..cfg.holder_customers as u64).collect();
    cleanroom_crypto::rng::shuffle(&mut customer_ids, &mut rng);
    for (customer_no, &person) in customer_ids.iter().enumerate() {
        let email = canonical_email(person);
        let digits = canonical_phone_digits(person);
        let txns = 1 + (standard_normal(&mut rng).abs() * 3.0) as usize;
        for _ in 0..txns {
            let amount = (8.0 + 1.0 * standard_normal(&mut rng))
                .exp()
                .round()
                .clamp(1.0, 5_000_000.0) as i64;
            bank.push(BankTxn {
                customer: 100_000 + customer_no as u64,
                email: email.clone(),
                phone: format!("0{digits}"),
                category: sample_cdf(&mut rng, &cdf),
                amount_cents: amount,
                day: FIRST_DAY + rng.random_range(0..DAYS),
            });
        }
    }
    let mut platform = Vec::with_capacity(cfg.matcher_users);
    let seg_cdf = zipf_table(SEGMENTS.len(), 0.8);
    let country_cdf = zipf_table(COUNTRIES.len(), 0.6);
    let mut people: Vec<u64> = (0..shared as u64).collect();
    people.extend((0..(cfg.matcher_users - shared) as u64).map(|k| cfg.holder_customers as u64 + k));
    cleanroom_crypto::rng::shuffle(&mut people, &mut rng);
    for person in people {
        let email = canonical_email(person);
        let digits = canonical_phone_digits(person);
        platform.push(PlatformUser {
            email: messy_email(&mut rng, &email),
            phone: messy_phone(&mut rng, &digits),
            segment: sample_cdf(&mut rng, &seg_cdf),
            country: sample_cdf(&mut rng, &country_cdf),
        });
    }
    SynthData {
        categories,
        bank,
        platform,
        shared_customers: shared,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_crypto::normalize::{IdKind, NormalizationRules};
    use std::collections::HashSet;

    #[test]
    fn overlap_and_normalisation() {
        let cfg = SynthConfig {
            holder_customers: 500,
            matcher_users: 400,
            overlap: 0.3,
            categories: 16,
            seed: 9,
        };
        let d = generate(&cfg);
        assert_eq!(d.platform.len(), 400);
        let rules = NormalizationRules::v1("44");
        let bank: HashSet<Vec<u8>> = d
            .bank
            .iter()
            .map(|t| rules.normalize(IdKind::Email, &t.email).unwrap())
            .collect();
        assert_eq!(bank.len(), 500);
        let plat: HashSet<Vec<u8>> = d
            .platform
            .iter()
            .map(|u| rules.normalize(IdKind::Email, &u.email).unwrap())
            .collect();
        assert_eq!(plat.len(), 400);
        assert_eq!(bank.intersection(&plat).count(), 150);
        // The raw strings mostly differ: normalisation is doing the matching.
        let raw_bank: HashSet<&str> = d.bank.iter().map(|t| t.email.as_str()).collect();
        let raw_hits = d
            .platform
            .iter()
            .filter(|u| raw_bank.contains(u.email.as_str()))
            .count();
        assert!(raw_hits < 150, "{raw_hits}");
        // Phones normalise to the same E.164 number on both sides.
        let bank_phones: HashSet<Vec<u8>> = d
            .bank
            .iter()
            .map(|t| rules.normalize(IdKind::Phone, &t.phone).unwrap())
            .collect();
        let plat_phones: HashSet<Vec<u8>> = d
            .platform
            .iter()
            .map(|u| rules.normalize(IdKind::Phone, &u.phone).unwrap())
            .collect();
        assert_eq!(bank_phones.intersection(&plat_phones).count(), 150);
        // Same seed, same data.
        assert_eq!(generate(&cfg).bank, d.bank);
    }
}
