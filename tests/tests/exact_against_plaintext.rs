//! Both parties in one process, checked against a plaintext computation:
//! the join plus aggregate gives exactly the sums over the intersection; the
//! matcher's count is the intersection plus the sampled dummies; dummy rows
//! change no cell, and cost the bank the same work as a customer's row.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use cleanroom_crypto::shares::Share;
use cleanroom_protocol::aggregate::{HolderAggregate, RowSource, RowValues};
use cleanroom_sim::driver::{run_aggregate, run_join, shared};
use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Scratch words [`Counted`] asks for.
const COUNTED_SCRATCH: usize = 5;

/// The holder's values, counting how many rows asked for them.
struct Counted {
    values: RowValues,
    fills: Arc<AtomicUsize>,
    prefetches: Arc<AtomicUsize>,
}

impl RowSource for Counted {
    fn width(&self) -> usize {
        self.values.width()
    }
    fn customers(&self) -> usize {
        self.values.customers()
    }
    /// Asks for scratch and scribbles on it: a caller that gave less, or
    /// read it back, would get wrong sums.
    fn scratch_words(&self) -> usize {
        COUNTED_SCRATCH
    }
    fn fill(&self, customer: usize, out: &mut [u64], scratch: &mut [u64]) -> bool {
        self.fills.fetch_add(1, Ordering::Relaxed);
        let Some(scratch) = scratch.get_mut(..COUNTED_SCRATCH) else {
            return false;
        };
        scratch.fill(customer as u64 ^ 0xa5a5);
        self.values.fill(customer, out, &mut [])
    }
    fn prefetch(&self, customer: usize) {
        self.prefetches.fetch_add(1, Ordering::Relaxed);
        self.values.prefetch(customer);
    }
}

/// Runs the whole protocol on `holder_ids` (with `values`, `width` words per
/// customer) and `matcher_ids`, and checks every property against plaintext.
fn check(holder_ids: Vec<Vec<u8>>, matcher_ids: Vec<Vec<u8>>, values: Vec<u64>, width: usize, seed: u64, chunk: usize) {
    let mut rng_h = ChaCha20Rng::seed_from_u64(seed);
    let mut rng_m = ChaCha20Rng::seed_from_u64(seed ^ 0x5555);

    // Plaintext reference.
    let mset: HashSet<&[u8]> = matcher_ids.iter().map(Vec::as_slice).collect();
    let mut truth = vec![0u64; width];
    let mut intersection = 0u64;
    for (k, id) in holder_ids.iter().enumerate() {
        if mset.contains(id.as_slice()) {
            intersection += 1;
            for (t, v) in truth.iter_mut().zip(&values[k * width..(k + 1) * width]) {
                *t = t.wrapping_add(*v);
            }
        }
    }
    let truth: Vec<i64> = truth.into_iter().map(|x| x as i64).collect();

    let h = common::holder(holder_ids.clone(), chunk);
    let m = common::matcher(matcher_ids.clone(), chunk);
    let mut charged = 0;
    let (hj, mj, _) = run_join(h, m, &mut rng_h, &mut rng_m, |_| charged += 1).unwrap();
    assert_eq!(charged, 1);
    let d = hj.matching_dummies();
    assert!(d <= hj.dummy_rows());
    assert_eq!(hj.rows() as u64, holder_ids.len() as u64 + hj.dummy_rows());
    assert_eq!(mj.rows(), hj.rows());
    // The matcher learns |X ∩ Y| + D, nothing less, nothing more.
    assert_eq!(mj.matched_count(), intersection + d);
    // Row by row: a matched row is a shared customer or one of the D matching dummies.
    let mut matched_dummies = 0;
    let mut matched_customers = HashSet::new();
    for (i, &e) in mj.matched().iter().enumerate() {
        match hj.customer_of_row(i) {
            None if e => matched_dummies += 1,
            Some(c) if e => {
                assert!(
                    mset.contains(holder_ids[c].as_slice()),
                    "row {i} matched a non-shared customer"
                );
                matched_customers.insert(c);
            }
            Some(c) => assert!(
                !mset.contains(holder_ids[c].as_slice()),
                "row {i}: shared customer not matched"
            ),
            None => {}
        }
    }
    assert_eq!(matched_dummies, d);
    assert_eq!(matched_customers.len() as u64, intersection);

    let mut qid = [0u8; 16];
    rng_m.fill_bytes(&mut qid);
    let rows = hj.rows();
    let fills = Arc::new(AtomicUsize::new(0));
    let prefetches = Arc::new(AtomicUsize::new(0));
    let agg = HolderAggregate::new(
        shared(hj),
        Counted {
            values: RowValues::new(width, values).unwrap(),
            fills: fills.clone(),
            prefetches: prefetches.clone(),
        },
        cleanroom_wire::QueryId(qid),
        [2; 32],
        0,
    )
    .unwrap();
    let (hs, ms, _) = run_aggregate(
        agg,
        &mj,
        mj.matched(),
        width,
        cleanroom_wire::QueryId(qid),
        [2; 32],
        0,
        &mut rng_h,
        &mut rng_m,
    )
    .unwrap();
    // Exact, although D dummies were selected: dummy rows contribute nothing.
    assert_eq!(Share::reconstruct(&hs, &ms).unwrap(), truth);
    // Every row, dummy or not, computed and read ahead one customer's
    // values (a stand-in's for a dummy): the bank's work does not follow
    // the dummies. (A holder without customers has nothing to compute.)
    let per_row = if holder_ids.is_empty() { 0 } else { rows };
    assert_eq!(fills.load(Ordering::Relaxed), per_row, "values computed per row");
    assert_eq!(prefetches.load(Ordering::Relaxed), per_row, "values read ahead per row");
}

fn random_values(rng: &mut ChaCha20Rng, n: usize, width: usize) -> Vec<u64> {
    (0..n * width)
        .map(|k| match k % 3 {
            0 => 1,
            1 => rng.next_u64() % 1_000_000,
            _ => rng.next_u64(), // full 64-bit words: sums wrap
        })
        .collect()
}

fn case(only_h: usize, only_m: usize, both: usize, width: usize, seed: u64, chunk: usize) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let mut h = common::ids("shared", 0..both);
    h.extend(common::ids("bank", 0..only_h));
    let mut m = common::ids("shared", 0..both);
    m.extend(common::ids("platform", 0..only_m));
    // Neither side's order reveals anything: shuffle both.
    cleanroom_crypto::rng::shuffle(&mut h, &mut rng);
    cleanroom_crypto::rng::shuffle(&mut m, &mut rng);
    let values = random_values(&mut rng, h.len(), width);
    check(h, m, values, width, seed, chunk);
}

#[test]
fn both_sets_empty() {
    case(0, 0, 0, 3, 1, 64);
}

#[test]
fn holder_empty() {
    case(0, 50, 0, 3, 2, 64);
}

#[test]
fn matcher_empty() {
    case(50, 0, 0, 3, 3, 64);
}

#[test]
fn no_overlap() {
    case(300, 200, 0, 5, 4, 64);
}

#[test]
fn full_overlap() {
    case(0, 0, 400, 5, 5, 64);
}

#[test]
fn holder_row_equal_to_nothing() {
    // One holder customer, whom the matcher does not have.
    case(1, 100, 0, 1, 6, 64);
    // One shared customer and nothing else.
    case(0, 0, 1, 1, 7, 64);
}

#[test]
fn chunk_boundaries() {
    // Sizes around chunk and OT block (128 rows) boundaries.
    for (k, total) in [127usize, 128, 129, 255, 257].into_iter().enumerate() {
        case(total / 3, total / 2, total - total / 3, 4, 100 + k as u64, 32);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20, .. ProptestConfig::default() })]

    #[test]
    fn random_sets_match_plaintext(
        n in 0usize..2000,
        m in 0usize..2000,
        overlap in 0.0f64..=1.0,
        width in 1usize..12,
        chunk in prop::sample::select(vec![16usize, 100, 1024, 16_384]),
        seed: u64,
    ) {
        let both = ((n.min(m) as f64) * overlap) as usize;
        case(n - both, m - both, both, width, seed, chunk);
    }
}

/// Each cell's share in its own ring `Z_{2^b}` (`CellBits`): over the same
/// join, the shares add up to the plaintext sums mod `2^b` (64-bit cells
/// exactly as before, sums that wrap included), the masked rows shrink with
/// the widths, and a matcher that uses other widths than the holder is
/// refused at the setup.
#[test]
fn narrow_cells_add_up_mod_their_widths_and_shrink_the_rows() {
    use cleanroom_protocol::aggregate::CellBits;
    use cleanroom_sim::driver::run_aggregate_with_bits;
    let mut rng = ChaCha20Rng::seed_from_u64(77);
    let mut h = common::ids("shared", 0..400);
    h.extend(common::ids("bank", 0..300));
    let mut m = common::ids("shared", 0..400);
    m.extend(common::ids("platform", 0..250));
    cleanroom_crypto::rng::shuffle(&mut h, &mut rng);
    cleanroom_crypto::rng::shuffle(&mut m, &mut rng);
    let bits = [1u8, 7, 20, 33, 63, 64, 12, 8, 9];
    let width = bits.len();
    let values = random_values(&mut rng, h.len(), width);
    // Plaintext sums mod 2^64.
    let mset: HashSet<&[u8]> = m.iter().map(Vec::as_slice).collect();
    let mut truth = vec![0u64; width];
    for (k, id) in h.iter().enumerate() {
        if mset.contains(id.as_slice()) {
            for (t, v) in truth.iter_mut().zip(&values[k * width..(k + 1) * width]) {
                *t = t.wrapping_add(*v);
            }
        }
    }
    let (mut rng_h, mut rng_m) = (ChaCha20Rng::seed_from_u64(1), ChaCha20Rng::seed_from_u64(2));
    let (hj, mj, _) = run_join(
        common::holder(h, 256),
        common::matcher(m, 256),
        &mut rng_h,
        &mut rng_m,
        |_| {},
    )
    .unwrap();
    let hj = shared(hj);
    let qid = cleanroom_wire::QueryId([4; 16]);
    let mut honest = |_: cleanroom_sim::driver::Direction, f: Vec<u8>| vec![f];
    let mut run_over = |holder_bits: CellBits, matcher_bits: CellBits, wire: cleanroom_sim::driver::Wire<'_>| {
        let agg = HolderAggregate::new(
            hj.clone(),
            RowValues::new(width, values.clone()).unwrap(),
            qid,
            [2; 32],
            0,
        )
        .unwrap()
        .with_cell_bits(holder_bits)
        .unwrap();
        run_aggregate_with_bits(
            agg,
            &mj,
            mj.matched(),
            matcher_bits,
            (qid, [2; 32], 0),
            &mut rng_h,
            &mut rng_m,
            wire,
        )
    };
    let mut run = |holder_bits: CellBits, matcher_bits: CellBits| run_over(holder_bits, matcher_bits, &mut honest);
    let narrow = CellBits::new(bits.to_vec()).unwrap();
    let (hs, ms, narrow_traffic) = run(narrow.clone(), narrow.clone()).unwrap();
    for (c, ((&b, t), (x, y))) in bits
        .iter()
        .zip(&truth)
        .zip(hs.words().iter().zip(ms.words()))
        .enumerate()
    {
        let mask = if b == 64 { u64::MAX } else { (1u64 << b) - 1 };
        assert!(*x <= mask && *y <= mask, "cell {c}: a share outside Z_2^{b}");
        assert_eq!(x.wrapping_add(*y) & mask, t & mask, "cell {c} ({b} bits)");
    }
    let (hs, ms, full_traffic) = run(CellBits::full(width).unwrap(), CellBits::full(width).unwrap()).unwrap();
    let sums: Vec<u64> = hs
        .words()
        .iter()
        .zip(ms.words())
        .map(|(x, y)| x.wrapping_add(*y))
        .collect();
    assert_eq!(sums, truth, "64-bit cells: the plaintext sums mod 2^64");
    // 9 cells of 64 bits are 72 bytes a row; these widths, 217 bits: 28.
    let row_bits: u64 = bits.iter().map(|&b| u64::from(b)).sum();
    assert_eq!(narrow.row_bytes() as u64, row_bits.div_ceil(8));
    let (n, f) = (
        narrow_traffic.holder_to_matcher_bytes,
        full_traffic.holder_to_matcher_bytes,
    );
    let rows = mj.rows() as u64;
    assert!(
        f - n >= rows * (72 - 28) && f - n <= rows * (72 - 28) + 1024,
        "masked rows: {n} bytes narrow against {f} full over {rows} rows"
    );
    // Widths that differ between the sides: the holder refuses the setup.
    let mut other = bits.to_vec();
    other[3] = 34;
    let refused = run(narrow.clone(), CellBits::new(other).unwrap());
    assert!(
        matches!(
            refused,
            Err(cleanroom_sim::driver::DriverError::Holder(
                cleanroom_protocol::ProtocolError::WrongSession
            ))
        ),
        "{refused:?}"
    );
    // A chunk with a bit set beyond its rows' cells (217 bits a row leave
    // 7 unused bits in each row's last byte; the chunk's last byte is one of
    // those or padding): the matcher refuses it.
    let mut tamper = |d: cleanroom_sim::driver::Direction, mut f: Vec<u8>| {
        if matches!(d, cleanroom_sim::driver::Direction::HolderToMatcher)
            && matches!(
                cleanroom_wire::Message::decode(&f),
                Ok(cleanroom_wire::Message::MaskedRows(_))
            )
            && let Some(last) = f.last_mut()
        {
            *last |= 0x80;
        }
        vec![f]
    };
    let tampered = run_over(narrow.clone(), narrow, &mut tamper);
    assert!(
        matches!(
            tampered,
            Err(cleanroom_sim::driver::DriverError::Matcher(
                cleanroom_protocol::ProtocolError::NonCanonical { .. }
            ))
        ),
        "{tampered:?}"
    );
}
