//! The plaintext oracle: what a plan's cells are on the synthetic data,
//! computed row by row in the clear, independently of the nodes' code path
//! (no curve, no shares, no noise). The tests and the demo check the nodes'
//! answers against it.

use std::collections::HashMap;

use cleanroom_crypto::normalize::{IdKind, NormalizationRules};
use cleanroom_query::CellKind;
use cleanroom_query::Plan;
use cleanroom_query::sql::{Cmp, Literal, Predicate, Side};

use crate::synth::{COUNTRIES, SEGMENTS, SynthData};

fn holds<T: Ord>(a: &T, cmp: Cmp, b: &T) -> bool {
    match cmp {
        Cmp::Eq => a == b,
        Cmp::Ne => a != b,
        Cmp::Lt => a < b,
        Cmp::Le => a <= b,
        Cmp::Gt => a > b,
        Cmp::Ge => a >= b,
    }
}

/// Plaintext SQL semantics for one column value against one conjunct.
fn satisfies(p: &Predicate, text: &str, cents: i64, day: i32) -> bool {
    let one = |lit: &Literal, cmp: Cmp| match lit {
        Literal::Text(t) => holds(&text, cmp, &t.as_str()),
        Literal::Cents(c) => holds(&cents, cmp, c),
        Literal::Day(d) => holds(&day, cmp, d),
    };
    match p {
        Predicate::Compare(_, cmp, lit) => one(lit, *cmp),
        Predicate::In(_, lits) => lits.iter().any(|l| one(l, Cmp::Eq)),
        Predicate::Between(_, lo, hi) => one(lo, Cmp::Ge) && one(hi, Cmp::Le),
    }
}

/// The plaintext truth of a plan on the synthetic data, cell by cell in the
/// plan's order (unweighted): the inner join of bank rows with platform
/// users on the normalised e-mail, the WHERE clause, the groups, and each
/// customer's contribution per group clipped as the nodes clip it. Written
/// independently of the nodes' code path (row-level, in the clear).
pub fn truth(data: &SynthData, plan: &Plan) -> Vec<f64> {
    let rules = NormalizationRules::v1("44");
    let users: HashMap<Vec<u8>, (&str, &str)> = data
        .platform
        .iter()
        .filter_map(|u| {
            let id = rules.normalize(IdKind::Email, &u.email).ok()?;
            Some((
                id,
                (
                    SEGMENTS.get(u.segment).copied().unwrap_or("other"),
                    COUNTRIES.get(u.country).copied().unwrap_or("other"),
                ),
            ))
        })
        .collect();
    let hcols: Vec<String> = plan.holder_group_columns().iter().map(|c| c.name.clone()).collect();
    let mcols: Vec<String> = plan.matcher_group_columns().iter().map(|c| c.name.clone()).collect();
    // (customer, group key) -> (rows, sum)
    let mut per: HashMap<(Vec<u8>, Vec<String>), (u64, i64)> = HashMap::new();
    for t in &data.bank {
        let Ok(id) = rules.normalize(IdKind::Email, &t.email) else {
            continue;
        };
        let Some((segment, country)) = users.get(&id) else {
            continue;
        };
        let category = data.categories.get(t.category).map_or("other", String::as_str);
        let ok = plan.query.filters.iter().all(|p| {
            let c = p.column();
            let text = match (c.side, c.name.as_str()) {
                (Side::Holder, "category") => category,
                (Side::Matcher, "segment") => segment,
                (Side::Matcher, "country") => country,
                _ => "",
            };
            satisfies(p, text, t.amount_cents, t.day)
        });
        if !ok {
            continue;
        }
        let mut key: Vec<String> = mcols
            .iter()
            .map(|c| {
                if c == "segment" {
                    (*segment).to_string()
                } else {
                    (*country).to_string()
                }
            })
            .collect();
        key.extend(hcols.iter().map(|_| category.to_string()));
        let e = per.entry((id, key)).or_insert((0, 0));
        e.0 += 1;
        e.1 += t.amount_cents;
    }
    let cells = plan.cells();
    let mut out = vec![0f64; cells.len()];
    let width = plan.width();
    let hgroups = plan.holder_groups();
    let per_group = width / hgroups.len().max(1);
    for (mi, m) in plan.matcher_groups().iter().enumerate() {
        for (hi, h) in hgroups.iter().enumerate() {
            let mut key = m.clone();
            key.extend(h.iter().cloned());
            for ((_, k), (rows, sum)) in &per {
                if *k != key {
                    continue;
                }
                for j in 0..per_group {
                    let idx = mi * width + hi * per_group + j;
                    #[allow(clippy::cast_precision_loss)]
                    let v = match cells[idx].kind {
                        CellKind::Customers => 1.0,
                        CellKind::Rows => (*rows).min(plan.clip.transactions) as f64,
                        CellKind::Sum => (*sum).clamp(0, plan.clip.spend_cents as i64) as f64,
                    };
                    out[idx] += v;
                }
            }
        }
    }
    out
}
