//! Random queries in the SQL dialect, run through the protocol in memory
//! (no noise): the cells, before noise, equal the plaintext SQL semantics
//! exactly. The holder's vectors and the matcher's blocks are computed by
//! the node's own code from the loaded CSV files; the truth is computed
//! row by row from the synthetic data (`cleanroom_sim::oracle::truth`).

mod common;

use cleanroom_crypto::normalize::IdKind;
use cleanroom_node::config::{CollaborationConfig, DataConfig};
use cleanroom_node::data::{load_holder, load_matcher, write_synthetic};
use cleanroom_node::server::{holder_values, matcher_blocks};
use cleanroom_protocol::aggregate::{CellBits, HolderAggregate, RowValues};
use cleanroom_protocol::join::{MatcherJoin, MatcherPolicy};
use cleanroom_query::{Clip, Domains, Template};
use cleanroom_sim::driver::{run_aggregate_with_bits, run_join, shared};
use cleanroom_sim::oracle::{truth, truth_multi};
use cleanroom_sim::synth::{COUNTRIES, SEGMENTS, SynthConfig, generate};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

#[derive(Debug, Clone)]
struct Q {
    group_category: bool,
    group_segment: bool,
    group_country: bool,
    measures: Vec<usize>,
    date: Option<(u8, u8)>,
    categories: Option<Vec<usize>>,
    min_amount: Option<u32>,
    segments: Option<Vec<usize>>,
    country: Option<usize>,
}

fn q_strategy() -> impl Strategy<Value = Q> {
    (
        any::<(bool, bool, bool)>(),
        proptest::sample::subsequence(vec![0usize, 1, 2, 3], 1..=4),
        proptest::option::of((0u8..90, 0u8..90)),
        proptest::option::of(proptest::sample::subsequence((0usize..17).collect::<Vec<_>>(), 1..=4)),
        proptest::option::of(0u32..20_000),
        proptest::option::of(proptest::sample::subsequence((0usize..6).collect::<Vec<_>>(), 1..=3)),
        proptest::option::of(0usize..7),
    )
        .prop_map(
            |((gc, gs, gn), measures, date, categories, min_amount, segments, country)| Q {
                group_category: gc,
                group_segment: gs,
                group_country: gn,
                measures,
                date,
                categories,
                min_amount,
                segments,
                country,
            },
        )
}

fn sql(q: &Q, cats: &[String], segs: &[String], countries: &[String]) -> String {
    let mut select = Vec::new();
    let mut group = Vec::new();
    if q.group_category {
        select.push("b.category".to_string());
        group.push("b.category");
    }
    if q.group_segment {
        group.push("p.segment");
    }
    if q.group_country {
        select.push("p.country".to_string());
        group.push("p.country");
    }
    let m = [
        "COUNT(DISTINCT b.customer) AS c",
        "COUNT(*) AS n",
        "SUM(b.amount) AS s",
        "AVG(b.amount) AS a",
    ];
    select.extend(q.measures.iter().map(|i| m[*i].to_string()));
    let mut conds = Vec::new();
    if let Some((a, b)) = q.date {
        let (lo, hi) = (a.min(b), a.max(b));
        conds.push(format!(
            "b.date BETWEEN '{}' AND '{}'",
            cleanroom_query::format_date(20_454 + i32::from(lo)),
            cleanroom_query::format_date(20_454 + i32::from(hi) + 60)
        ));
    }
    let list = |v: &[usize], d: &[String]| {
        v.iter()
            .map(|i| format!("'{}'", d[*i % d.len()]))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(c) = &q.categories {
        conds.push(format!("b.category IN ({})", list(c, cats)));
    }
    if let Some(a) = q.min_amount {
        conds.push(format!("b.amount >= {}.{:02}", a / 100, a % 100));
    }
    if let Some(s) = &q.segments {
        conds.push(format!("p.segment IN ({})", list(s, segs)));
    }
    if let Some(c) = q.country {
        conds.push(format!("p.country = '{}'", countries[c % countries.len()]));
    }
    let mut text = format!("SELECT {} FROM bank b JOIN platform p", select.join(", "));
    if !conds.is_empty() {
        text.push_str(&format!(" WHERE {}", conds.join(" AND ")));
    }
    if !group.is_empty() {
        text.push_str(&format!(" GROUP BY {}", group.join(", ")));
    }
    text
}

struct World {
    _dir: tempfile::TempDir,
    data: cleanroom_sim::synth::SynthData,
    holder: cleanroom_node::data::HolderData,
    matcher: cleanroom_node::data::MatcherData,
    domains: Domains,
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let data = generate(&SynthConfig {
        holder_customers: 300,
        matcher_users: 300,
        overlap: 0.6,
        categories: 16,
        seed: 5,
    });
    write_synthetic(dir.path(), &data).unwrap();
    let mut cats = data.categories.clone();
    cats.push("other".into());
    let mut segs: Vec<String> = SEGMENTS.iter().map(|s| s.to_string()).collect();
    segs.push("other".into());
    let mut countries: Vec<String> = COUNTRIES.iter().map(|s| s.to_string()).collect();
    countries.push("other".into());
    let collab = CollaborationConfig {
        id: common::COLLAB.into(),
        default_country_code: "44".into(),
        categories: cats.clone(),
        segments: segs.clone(),
        countries: countries.clone(),
    };
    let dc = |file: &str| DataConfig {
        path: dir.path().join(file),
        id_column: Some("email".into()),
        id_kind: Some("email".into()),
        keys: Vec::new(),
        customer_column: None,
        max_bad_row_share: 0.0,
        category_column: Some("category".into()),
        amount_column: Some("amount".into()),
        date_column: Some("date".into()),
        segment_column: Some("segment".into()),
        country_column: Some("country".into()),
        progress: false,
        source: cleanroom_node::config::SourceKind::Csv,
        postgres: None,
    };
    let holder = load_holder(&dc("bank.csv"), &collab).unwrap();
    let matcher = load_matcher(&dc("platform.csv"), &collab).unwrap();
    World {
        _dir: dir,
        data,
        holder,
        matcher,
        domains: Domains {
            categories: cats,
            segments: segs,
            countries,
            key_slots: 1,
        },
    }
}

fn run(w: &World, q: &Q, seed: u64) {
    let text = sql(q, &w.domains.categories, &w.domains.segments, &w.domains.countries);
    let t = Template {
        name: "q".into(),
        sql: text.clone(),
        params: vec![],
        rho_micro: 1,
        min_count: 0,
        analysts: vec!["a".into()],
        clip: Clip::new(3, 20_000),
    };
    t.check(&w.domains).unwrap_or_else(|e| panic!("{text}: {e}"));
    let plan = t.bind("a", &[], &w.domains).unwrap();
    let values = holder_values(&plan, &w.holder, &w.domains.categories);
    let blocks = matcher_blocks(&plan, &w.matcher, &w.domains);
    let h = common::holder(w.holder.ids.to_vec(), 64);
    let m = MatcherJoin::grouped(
        common::params(64),
        MatcherPolicy {
            peer_set: common::limits(),
            max_dummy_rows: 1000,
            block_padding: Some(cleanroom_crypto::dp::ShiftedTruncatedLaplace::new(1, 1, 1000).unwrap()),
        },
        blocks,
    )
    .unwrap();
    let mut rng_h = ChaCha20Rng::seed_from_u64(seed);
    let mut rng_m = ChaCha20Rng::seed_from_u64(seed + 1);
    let (hj, mj, _) = run_join(h, m, &mut rng_h, &mut rng_m, |_| {}).unwrap();
    let hj = shared(hj);
    let width = plan.width();
    // The nodes' share widths: each cell in Z_{2^b} for the plan's b.
    let bits = CellBits::new(plan.batch_bits()).unwrap();
    let mut words = Vec::new();
    for g in 0..mj.blocks() as u32 {
        let agg = HolderAggregate::new(
            hj.clone(),
            RowValues::new(width, values.clone()).unwrap(),
            cleanroom_wire::QueryId([1; 16]),
            plan.digest(),
            g,
        )
        .unwrap()
        .with_cell_bits(bits.clone())
        .unwrap();
        let (hs, ms, _) = run_aggregate_with_bits(
            agg,
            &mj,
            &mj.choices_for_block(g),
            bits.clone(),
            (cleanroom_wire::QueryId([1; 16]), plan.digest(), g),
            &mut rng_h,
            &mut rng_m,
            &mut |_, f| vec![f],
        )
        .unwrap();
        for ((a, b), w) in hs.words().iter().zip(ms.words()).zip(bits.bits()) {
            assert!(
                *w == 64 || (a >> w == 0 && b >> w == 0),
                "{text}: a share has bits beyond its cell"
            );
            words.push(cleanroom_wire::signed_in_bits(a.wrapping_add(*b), *w));
        }
    }
    let cells = plan.cells();
    let want = truth(&w.data, &plan);
    // The multi-key reference on one key is the single-key one (the
    // synthetic data's e-mails are distinct on each side).
    assert_eq!(truth_multi(&w.data, &plan, &[IdKind::Email]), want, "{text}");
    assert_eq!(words.len(), cells.len(), "{text}");
    for ((got, cell), want) in words.iter().zip(&cells).zip(&want) {
        assert!(cell.bits < 64, "{text}: {} is not narrowed", cell.name);
        #[allow(clippy::cast_precision_loss)]
        let got = *got as f64;
        assert_eq!(got, *want, "{text}: {}", cell.name);
    }
}

#[test]
fn the_product_example_is_exact() {
    let w = world();
    let q = Q {
        group_category: true,
        group_segment: false,
        group_country: true,
        measures: vec![0, 2],
        date: Some((0, 60)),
        categories: None,
        min_amount: None,
        segments: Some(vec![0]),
        country: None,
    };
    run(&w, &q, 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn random_queries_are_exact_before_noise(q in q_strategy(), seed: u64) {
        thread_local! { static W: World = world(); }
        W.with(|w| run(w, &q, seed));
    }
}
