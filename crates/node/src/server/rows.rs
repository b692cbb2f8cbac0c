//! Which rows each side brings to a query: the platform's users per group
//! and the bank's per-customer values.

use super::*;
use cleanroom_protocol::aggregate::RowSource as _;

/// Which of the matcher's users go into which block for a plan: indices of
/// the users that pass the WHERE clause's platform conditions, one list per
/// matcher group (one list when the query does not group by platform columns).
/// Users are counted by their segments (one per user; a sharded node
/// holds its identifiers in shard files, not in `data.ids`).
pub fn matcher_block_indices(plan: &Plan, data: &MatcherData, domains: &Domains) -> Vec<Vec<usize>> {
    let groups = plan.matcher_groups().len().max(1);
    let mut blocks: Vec<Vec<usize>> = vec![Vec::new(); groups];
    for k in 0..data.segments.len() {
        let value = |column: &str| match column {
            "segment" => data
                .segments
                .get(k)
                .and_then(|s| domains.segments.get(usize::from(*s)))
                .cloned(),
            "country" => data
                .countries
                .get(k)
                .and_then(|c| domains.countries.get(usize::from(*c)))
                .cloned(),
            _ => None,
        };
        if !plan.matcher_user_passes(&value) {
            continue;
        }
        if let Some(block) = plan.matcher_group_of(&value).and_then(|g| blocks.get_mut(g)) {
            block.push(k);
        }
    }
    blocks
}

/// The matcher's input to the join for a plan: the identifiers of
/// [`matcher_block_indices`], block by block.
pub fn matcher_blocks(plan: &Plan, data: &MatcherData, domains: &Domains) -> Vec<Vec<Vec<u8>>> {
    matcher_block_indices(plan, data, domains)
        .into_iter()
        .map(|b| b.into_iter().filter_map(|k| data.ids.get(k).cloned()).collect())
        .collect()
}

/// The bank's per-customer vectors for a plan (one matcher group's width:
/// holder groups times cells per group), clipped (not weighted: the weights
/// scale each cell's noise instead, see `CellSpec::weight`), computed from
/// each customer's transactions when asked.
pub struct HolderRows {
    data: Arc<HolderData>,
    plan: Plan,
    cells: Vec<cleanroom_query::CellSpec>,
    /// Holder group of each category index (a row's group depends on its
    /// category only).
    group_of: Vec<Option<usize>>,
    /// The WHERE clause's holder conjuncts, compiled for category indices.
    filter: cleanroom_query::HolderFilter,
    groups: usize,
    width: usize,
}

impl std::fmt::Debug for HolderRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HolderRows {{ customers: {}, width: {} }}",
            self.data.customers(),
            self.width
        )
    }
}

impl HolderRows {
    /// The vectors of `data`'s customers for `plan`.
    pub fn new(plan: &Plan, data: Arc<HolderData>, categories: &[String]) -> Self {
        let group_of = categories
            .iter()
            .map(|c| {
                plan.holder_group_of(&HolderRow {
                    category: c,
                    cents: 0,
                    day: 0,
                })
            })
            .collect();
        Self {
            data,
            plan: plan.clone(),
            cells: plan.cells(),
            group_of,
            filter: plan.holder_filter(categories),
            groups: plan.holder_groups().len().max(1),
            width: plan.width(),
        }
    }
}

impl cleanroom_protocol::aggregate::RowSource for HolderRows {
    fn width(&self) -> usize {
        self.width
    }

    fn customers(&self) -> usize {
        self.data.customers()
    }

    fn prefetch(&self, customer: usize) {
        // A customer's transactions are contiguous: their first and last
        // cache lines (usually all of them) and the vector's header.
        if let Some(txns) = self.data.txns.get(customer) {
            std::hint::black_box((txns.first().map(|t| t.day), txns.last().map(|t| t.day)));
        }
    }

    fn scratch_words(&self) -> usize {
        2 * self.groups
    }

    fn fill(&self, customer: usize, out: &mut [u64], scratch: &mut [u64]) -> bool {
        let Some(txns) = self.data.txns.get(customer) else {
            return false;
        };
        if out.len() != self.width {
            return false;
        }
        // The customer's count and sum of each group, side by side (the
        // sum an i64 in two's complement): its row values, in the caller's
        // scratch, which the caller wipes (SECURITY.md).
        let Some(acc) = scratch.get_mut(..2 * self.groups) else {
            return false;
        };
        acc.fill(0);
        for t in txns {
            if !self.filter.passes(usize::from(t.category), t.cents, t.day) {
                continue;
            }
            if let Some(g) = self.group_of.get(usize::from(t.category)).copied().flatten()
                && let Some([n, s]) = acc.get_mut(2 * g..2 * g + 2)
            {
                *n += 1;
                *s = (*s as i64).saturating_add(t.cents) as u64;
            }
        }
        // Every cell is written: a group without transactions has zeros.
        let per = self.width / self.groups;
        let spend_cap = i64::try_from(self.plan.clip.spend_cents).unwrap_or(i64::MAX);
        let cells = self.cells.iter().map(|c| c.kind);
        let counts = acc.chunks_exact(2).flat_map(|ns| std::iter::repeat_n(ns, per));
        let mut written = 0;
        for ((x, kind), ns) in out.iter_mut().zip(cells).zip(counts) {
            let (n, s) = match ns {
                [n, s] => (*n, *s as i64),
                _ => (0, 0),
            };
            *x = if n == 0 {
                0
            } else {
                match kind {
                    CellKind::Customers => 1,
                    CellKind::Rows => n.min(self.plan.clip.transactions),
                    CellKind::Sum => s.clamp(0, spend_cap) as u64,
                }
            };
            written += 1;
        }
        out.iter_mut().skip(written).for_each(|x| *x = 0);
        true
    }
}

/// All of [`HolderRows`] at once, customer after customer (for tests and
/// tools; the node computes them row by row).
pub fn holder_values(plan: &Plan, data: &HolderData, categories: &[String]) -> Vec<u64> {
    let rows = HolderRows::new(plan, Arc::new(data.clone()), categories);
    let width = rows.width();
    let mut out = vec![0u64; data.customers() * width];
    out.par_chunks_mut(width.max(1)).enumerate().for_each_init(
        || Zeroizing::new(vec![0u64; rows.scratch_words()]),
        |scratch, (c, row)| {
            rows.fill(c, row, scratch);
        },
    );
    out
}
