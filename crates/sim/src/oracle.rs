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
    cells_of(&per, plan)
}

/// The plaintext truth of a plan under **multi-key** matching, on the key
/// kinds `kinds` (the semantics of docs/protocol.md, "Multi-key matching";
/// not yet run by the nodes, issue 17), written row by row in the clear:
///
/// - a record's key of each kind is its e-mail or phone, normalised; one
///   that does not normalise is missing;
/// - a key several platform users hold belongs to the first of them (in
///   the platform's order); a key two or more bank customers hold is
///   dropped from all of them;
/// - a customer matches user `u` when one of its remaining keys is one of
///   `u`'s. It is in the intersection when it matches a user who passes
///   the WHERE clause's platform conditions and falls in one of the plan's
///   matcher groups, and it counts once, in the lowest-numbered such group
///   (the order of `Plan::matcher_groups`), however many of its keys and
///   users match;
/// - its transactions then go through the bank's conditions and groups and
///   are clipped per customer and group, as in [`truth`].
///
/// With `kinds = [Email]` and e-mails that no two customers or users share,
/// this is [`truth`] (the random-query tests check it).
pub fn truth_multi(data: &SynthData, plan: &Plan, kinds: &[IdKind]) -> Vec<f64> {
    let rules = NormalizationRules::v1("44");
    let keys = |email: &str, phone: &str| -> Vec<Vec<u8>> {
        let mut k: Vec<Vec<u8>> = kinds
            .iter()
            .filter_map(|kind| {
                let raw = match kind {
                    IdKind::Email => email,
                    IdKind::Phone => phone,
                };
                rules.normalize(*kind, raw).ok()
            })
            .collect();
        k.sort();
        k.dedup();
        k
    };
    let on = |side: Side| plan.query.filters.iter().filter(move |p| p.column().side == side);
    let mcols: Vec<String> = plan.matcher_group_columns().iter().map(|c| c.name.clone()).collect();
    let hcols: Vec<String> = plan.holder_group_columns().iter().map(|c| c.name.clone()).collect();
    let groups = plan.matcher_groups();
    // Each platform key's first holder's group: `None` when that user fails
    // the platform conditions or is in no group of the plan.
    let mut first_holder: HashMap<Vec<u8>, Option<usize>> = HashMap::new();
    for u in &data.platform {
        let segment = SEGMENTS.get(u.segment).copied().unwrap_or("other");
        let country = COUNTRIES.get(u.country).copied().unwrap_or("other");
        let value = |column: &str| if column == "segment" { segment } else { country };
        let passes = on(Side::Matcher).all(|p| satisfies(p, value(&p.column().name), 0, 0));
        let key: Vec<String> = mcols.iter().map(|c| value(c).to_string()).collect();
        let group = if passes {
            groups.iter().position(|g| *g == key)
        } else {
            None
        };
        for k in keys(&u.email, &u.phone) {
            first_holder.entry(k).or_insert(group);
        }
    }
    // Each customer's keys (all its records carry them), and how many
    // customers hold each key.
    let mut customer_keys: HashMap<u64, Vec<Vec<u8>>> = HashMap::new();
    for t in &data.bank {
        customer_keys
            .entry(t.customer)
            .or_insert_with(|| keys(&t.email, &t.phone));
    }
    let mut holders: HashMap<&[u8], usize> = HashMap::new();
    for k in customer_keys.values().flatten() {
        *holders.entry(k.as_slice()).or_insert(0) += 1;
    }
    // The group each matched customer counts in: the lowest it matched.
    let group_of: HashMap<u64, usize> = customer_keys
        .iter()
        .filter_map(|(c, ks)| {
            ks.iter()
                .filter(|k| holders.get(k.as_slice()) == Some(&1))
                .filter_map(|k| first_holder.get(k).copied().flatten())
                .min()
                .map(|g| (*c, g))
        })
        .collect();
    let mut per: HashMap<(u64, Vec<String>), (u64, i64)> = HashMap::new();
    for t in &data.bank {
        let Some(mkey) = group_of.get(&t.customer).and_then(|g| groups.get(*g)) else {
            continue;
        };
        let category = data.categories.get(t.category).map_or("other", String::as_str);
        let text = |column: &str| if column == "category" { category } else { "" };
        if !on(Side::Holder).all(|p| satisfies(p, text(&p.column().name), t.amount_cents, t.day)) {
            continue;
        }
        let mut key = mkey.clone();
        key.extend(hcols.iter().map(|_| category.to_string()));
        let e = per.entry((t.customer, key)).or_insert((0, 0));
        e.0 += 1;
        e.1 += t.amount_cents;
    }
    cells_of(&per, plan)
}

/// The plan's cells (unweighted) from each customer's transaction count and
/// spend per group key (matcher groups' values, then holder groups'),
/// clipped as the nodes clip them.
fn cells_of<C>(per: &HashMap<(C, Vec<String>), (u64, i64)>, plan: &Plan) -> Vec<f64> {
    let cells = plan.cells();
    let mut out = vec![0f64; cells.len()];
    let width = plan.width();
    let hgroups = plan.holder_groups();
    let per_group = width / hgroups.len().max(1);
    for (mi, m) in plan.matcher_groups().iter().enumerate() {
        for (hi, h) in hgroups.iter().enumerate() {
            let mut key = m.clone();
            key.extend(h.iter().cloned());
            for ((_, k), (rows, sum)) in per {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{BankTxn, FIRST_DAY, PlatformUser};
    use cleanroom_query::{Clip, Domains, Template};

    fn txn(customer: u64, email: &str, phone: &str, amount_cents: i64) -> BankTxn {
        BankTxn {
            customer,
            email: email.into(),
            phone: phone.into(),
            category: 0,
            amount_cents,
            day: FIRST_DAY,
        }
    }

    fn user(email: &str, phone: &str, segment: usize) -> PlatformUser {
        PlatformUser {
            email: email.into(),
            phone: phone.into(),
            segment,
            country: 0,
        }
    }

    /// Customers and users built so that each multi-key rule decides a
    /// case (segments are `SEGMENTS` indices: 0 is the lowest group).
    fn data() -> SynthData {
        SynthData {
            categories: vec!["food".into()],
            bank: vec![
                // 1: e-mail matches user A (segment 1), phone user B
                // (segment 0): counts once, in segment 0.
                txn(1, "one@bank.test", "07700900001", 100),
                txn(1, "one@bank.test", "07700900001", 200),
                // 2: no usable e-mail; its phone matches user C (segment 2).
                txn(2, "not an e-mail", "07700900002", 400),
                // 3 and 4 share a phone, which user D holds: dropped from
                // both. 3 matches nothing else; 4's e-mail matches user E
                // (segment 3).
                txn(3, "three@bank.test", "07700900034", 800),
                txn(4, "four@bank.test", "07700900034", 1_600),
                // 5: both keys match user F (segment 4): counts once.
                txn(5, "five@bank.test", "07700900005", 3_200),
                // 6: its e-mail is held by users G (segment 2) then H
                // (segment 0): G, the first, has it.
                txn(6, "six@bank.test", "07700900006", 6_400),
                // 7: no match.
                txn(7, "seven@bank.test", "07700900007", 12_800),
            ],
            platform: vec![
                user("ONE@bank.test", "+44 7700 900999", 1),    // A
                user("b@platform.test", "+44 7700 900001", 0),  // B
                user("c@platform.test", "0044 7700 900002", 2), // C
                user("d@platform.test", "07700 900034", 1),     // D
                user("four@bank.test", "07700 900444", 3),      // E
                user("Five@Bank.test", "07700-900005", 4),      // F
                user(" six@bank.test ", "07700 900666", 2),     // G
                user("six@bank.test", "07700 900667", 0),       // H
            ],
            shared_customers: 0,
        }
    }

    fn plan(sql: &str) -> Plan {
        let domains = Domains {
            categories: vec!["food".into(), "other".into()],
            segments: SEGMENTS.iter().map(|s| s.to_string()).collect(),
            countries: COUNTRIES.iter().map(|s| s.to_string()).collect(),
            key_slots: 1,
        };
        let t = Template {
            name: "t".into(),
            sql: sql.into(),
            params: vec![],
            rho_micro: 1,
            min_count: 0,
            analysts: vec!["a".into()],
            clip: Clip::new(3, 20_000),
        };
        t.check(&domains).unwrap_or_else(|e| panic!("{sql}: {e}"));
        t.bind("a", &[], &domains).unwrap()
    }

    const BY_SEGMENT: &str = "SELECT COUNT(DISTINCT b.customer) AS c, SUM(b.amount) AS s \
                              FROM bank b JOIN platform p GROUP BY p.segment";

    /// (customers, spend) per segment, in `SEGMENTS` order.
    fn by_segment(cells: &[f64]) -> Vec<(f64, f64)> {
        cells.chunks(2).map(|c| (c[0], c[1])).collect()
    }

    #[test]
    fn any_key_matches_once_in_the_lowest_group() {
        let p = plan(BY_SEGMENT);
        let got = by_segment(&truth_multi(&data(), &p, &[IdKind::Email, IdKind::Phone]));
        // Worked out by hand from the rules, customer by customer (above).
        let want = vec![
            (1.0, 300.0),   // customer 1 (via B's phone)
            (0.0, 0.0),     // A's match of customer 1 counts in segment 0
            (2.0, 6_800.0), // customers 2 (via C's phone) and 6 (via G)
            (1.0, 1_600.0), // customer 4 (via E's e-mail)
            (1.0, 3_200.0), // customer 5 (via F, once)
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn one_key_kind_is_the_single_key_join() {
        let p = plan(BY_SEGMENT);
        let got = by_segment(&truth_multi(&data(), &p, &[IdKind::Email]));
        // E-mail alone: 1 via A (segment 1), 4 via E, 5 via F, 6 via G; 2
        // has no usable e-mail, 3 and 7 no match.
        let want = vec![(0.0, 0.0), (1.0, 300.0), (1.0, 6_400.0), (1.0, 1_600.0), (1.0, 3_200.0)];
        assert_eq!(got, want);
        // Phone alone: 1 via B, 2 via C, 5 via F; 3 and 4's shared phone
        // is dropped, so D matches no one.
        let got = by_segment(&truth_multi(&data(), &p, &[IdKind::Phone]));
        let want = vec![(1.0, 300.0), (0.0, 0.0), (1.0, 400.0), (0.0, 0.0), (1.0, 3_200.0)];
        assert_eq!(got, want);
    }

    #[test]
    fn platform_conditions_pick_among_the_matched_users() {
        // Without segment 0 (B's and H's), customer 1 counts in A's segment
        // 1 and customer 6 stays with G: the lowest group among the users
        // that pass, never a user the WHERE clause removed.
        let p = plan(
            "SELECT COUNT(DISTINCT b.customer) AS c FROM bank b JOIN platform p \
             WHERE p.segment IN ('marketplace_buyer', 'creator', 'gamer', 'casual') GROUP BY p.segment",
        );
        let got = truth_multi(&data(), &p, &[IdKind::Email, IdKind::Phone]);
        assert_eq!(p.matcher_groups().len(), 4);
        assert_eq!(got, vec![1.0, 2.0, 1.0, 1.0]);
        // Ungrouped, each matched customer once: 1, 2, 4, 5 and 6.
        let p = plan("SELECT COUNT(DISTINCT b.customer) AS c FROM bank b JOIN platform p");
        assert_eq!(truth_multi(&data(), &p, &[IdKind::Email, IdKind::Phone]), vec![5.0]);
    }
}
