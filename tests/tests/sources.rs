//! Issue 17, data sources: one data set loaded from a CSV file, a Parquet
//! file and a real PostgreSQL server (started here by `initdb` and
//! `pg_ctl` on a free loopback port) gives the same customers, the same
//! transactions and the same users, hence the same join and aggregates;
//! and each bad PostgreSQL source (unreachable, wrong password, missing or
//! mistyped column, empty result, a write in the query, TLS with the wrong
//! CA) is refused with a message naming the source.
//!
//! Without PostgreSQL's binaries these tests say so and pass, unless
//! `CLEANROOM_REQUIRE_POSTGRES=1` (which `.ci/run` sets, after installing
//! Debian's `postgresql` when they are missing).

use std::collections::BTreeMap;
use std::path::Path;

use cleanroom_lab::pg::{TempPostgres, write_secret};
use cleanroom_node::config::{CollaborationConfig, DataConfig, PgTls, PostgresConfig, SourceKind};
use cleanroom_node::data::{
    HolderData, MatcherData, Txn, load_holder, load_matcher, write_synthetic, write_synthetic_parquet,
};
use cleanroom_sim::synth::{COUNTRIES, SEGMENTS, SynthConfig, SynthData, generate};

/// A server, or `None` (with a message) when PostgreSQL is not installed
/// and not required.
fn server(start: impl FnOnce() -> Result<TempPostgres, cleanroom_lab::LabError>) -> Option<TempPostgres> {
    have_postgres().then(|| start().unwrap())
}

/// Whether PostgreSQL's binaries are here; when they are not, says so,
/// and fails if `CLEANROOM_REQUIRE_POSTGRES=1`.
fn have_postgres() -> bool {
    if let Err(e) = cleanroom_lab::pg::binaries() {
        assert!(
            std::env::var("CLEANROOM_REQUIRE_POSTGRES").as_deref() != Ok("1"),
            "CLEANROOM_REQUIRE_POSTGRES=1: {e}"
        );
        eprintln!("SKIPPED: {e} (CLEANROOM_REQUIRE_POSTGRES=1 makes this a failure)");
        return false;
    }
    true
}

fn synth() -> SynthData {
    generate(&SynthConfig {
        holder_customers: 400,
        matcher_users: 500,
        overlap: 0.5,
        categories: 6,
        seed: 11,
    })
}

fn collab(data: &SynthData) -> CollaborationConfig {
    let with_other = |mut v: Vec<String>| {
        v.push("other".into());
        v
    };
    CollaborationConfig {
        id: "sources".into(),
        default_country_code: "44".into(),
        categories: with_other(data.categories.clone()),
        segments: with_other(SEGMENTS.iter().map(|s| s.to_string()).collect()),
        countries: with_other(COUNTRIES.iter().map(|s| s.to_string()).collect()),
    }
}

fn data_config(source: SourceKind, path: &Path, bank: bool) -> DataConfig {
    DataConfig {
        source,
        path: path.to_path_buf(),
        id_column: Some("email".into()),
        id_kind: Some("email".into()),
        keys: Vec::new(),
        customer_column: None,
        max_bad_row_share: 0.0,
        category_column: bank.then(|| "category".into()),
        amount_column: bank.then(|| "amount".into()),
        date_column: bank.then(|| "date".into()),
        segment_column: (!bank).then(|| "segment".into()),
        country_column: (!bank).then(|| "country".into()),
        progress: false,
        postgres: None,
    }
}

fn pg_config(pg: &TempPostgres, password_file: &Path, what: (&str, &str), bank: bool) -> DataConfig {
    let mut c = data_config(SourceKind::Postgres, Path::new(""), bank);
    let (query, table) = match what {
        ("query", q) => (Some(q.to_string()), None),
        (_, t) => (None, Some(t.to_string())),
    };
    c.postgres = Some(PostgresConfig {
        host: "127.0.0.1".into(),
        port: pg.port,
        dbname: "postgres".into(),
        user: pg.user.clone(),
        password_file: Some(password_file.to_path_buf()),
        password_env: None,
        password: None,
        tls: PgTls::Disable,
        ca: None,
        query,
        table,
        // Small, so the cursor is read in many fetches.
        fetch_rows: 37,
        connect_timeout_secs: 10,
    });
    c
}

/// Customer -> transactions, in a form independent of the row order a
/// table scan returns.
fn by_customer(h: &HolderData) -> BTreeMap<Vec<u8>, Vec<(u16, i64, i32)>> {
    h.ids
        .to_vec()
        .into_iter()
        .zip(&h.txns)
        .map(|(id, t)| {
            let mut t: Vec<(u16, i64, i32)> = t.iter().map(|x: &Txn| (x.category, x.cents, x.day)).collect();
            t.sort_unstable();
            (id, t)
        })
        .collect()
}

fn by_user(m: &MatcherData) -> BTreeMap<Vec<u8>, (u16, u16)> {
    m.ids
        .to_vec()
        .into_iter()
        .zip(m.segments.iter().zip(&m.countries))
        .map(|(id, (s, c))| (id, (*s, *c)))
        .collect()
}

const TABLES: &str =
    "CREATE TABLE bank (customer bigint, email text, phone text, category text, amount numeric(14,2), date date);
                      CREATE TABLE platform (email text, phone text, segment varchar(40), country char(2));";

#[test]
fn one_data_set_from_csv_parquet_and_postgres_loads_the_same() {
    let Some(pg) = server(TempPostgres::start) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = synth();
    write_synthetic(dir.path(), &data).unwrap();
    write_synthetic_parquet(dir.path(), &data, 100).unwrap();
    pg.execute(TABLES).unwrap();
    assert_eq!(
        pg.copy_csv("bank", &dir.path().join("bank.csv")).unwrap() as usize,
        data.bank.len()
    );
    assert_eq!(
        pg.copy_csv("platform", &dir.path().join("platform.csv")).unwrap() as usize,
        data.platform.len()
    );
    let pw = dir.path().join("pw");
    write_secret(&pw, &pg.password).unwrap();
    let collab = collab(&data);

    let csv = load_holder(
        &data_config(SourceKind::Csv, &dir.path().join("bank.csv"), true),
        &collab,
    )
    .unwrap();
    let parquet = load_holder(
        &data_config(SourceKind::Parquet, &dir.path().join("bank.parquet"), true),
        &collab,
    )
    .unwrap();
    let table = load_holder(&pg_config(&pg, &pw, ("table", "public.bank"), true), &collab).unwrap();
    let query = load_holder(
        &pg_config(
            &pg,
            &pw,
            (
                "query",
                "SELECT email, category, amount, date FROM bank ORDER BY customer DESC",
            ),
            true,
        ),
        &collab,
    )
    .unwrap();
    assert_eq!(csv.ids.len(), 400);
    assert_eq!(csv.report.loaded as usize, data.bank.len());
    let reference = by_customer(&csv);
    for (name, h) in [
        ("parquet", &parquet),
        ("postgres table", &table),
        ("postgres query", &query),
    ] {
        assert_eq!(by_customer(h), reference, "{name}");
        assert_eq!(h.report.rows, csv.report.rows, "{name}");
        assert_eq!(h.report.loaded, csv.report.loaded, "{name}");
        assert_eq!(h.report.bad_rows(), 0, "{name}");
    }
    // The version follows the rows, not the order the server returns them
    // in: the node reads them sorted (the query's own ORDER BY does not
    // matter), and rewriting the table in another physical order leaves it.
    assert_eq!(table.version, query.version);
    pg.execute("CREATE INDEX bank_phone ON bank (phone); CLUSTER bank USING bank_phone;")
        .unwrap();
    let again = load_holder(&pg_config(&pg, &pw, ("table", "public.bank"), true), &collab).unwrap();
    assert_eq!(again.version, table.version);
    assert_eq!(again.ids.to_vec(), table.ids.to_vec());
    // ... and a changed amount changes it.
    pg.execute("UPDATE bank SET amount = amount + 0.01 WHERE ctid = (SELECT min(ctid) FROM bank)")
        .unwrap();
    let changed = load_holder(&pg_config(&pg, &pw, ("table", "public.bank"), true), &collab).unwrap();
    assert_ne!(changed.version, table.version);

    let csv = load_matcher(
        &data_config(SourceKind::Csv, &dir.path().join("platform.csv"), false),
        &collab,
    )
    .unwrap();
    let parquet = load_matcher(
        &data_config(SourceKind::Parquet, &dir.path().join("platform.parquet"), false),
        &collab,
    )
    .unwrap();
    let table = load_matcher(&pg_config(&pg, &pw, ("table", "platform"), false), &collab).unwrap();
    assert_eq!(csv.ids.len(), 500);
    let reference = by_user(&csv);
    assert_eq!(by_user(&parquet), reference);
    assert_eq!(by_user(&table), reference);
}

/// Each bad PostgreSQL source: refused, the message names the source and
/// the problem and holds no row's content.
#[test]
fn bad_postgres_sources_are_refused_by_name() {
    let Some(pg) = server(TempPostgres::start) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = synth();
    let collab = collab(&data);
    let pw = dir.path().join("pw");
    write_secret(&pw, &pg.password).unwrap();
    pg.execute(
        "CREATE TABLE good (email text, category text, amount numeric(14,3), date date);
         INSERT INTO good VALUES
           ('a@x.com', 'fuel', 12.340, '2026-01-02'),
           (NULL, 'fuel', 1, '2026-01-02'),
           ('b@x.com', 'fuel', 1.005, '2026-01-02'),
           ('c@x.com', NULL, 1, '2026-01-02'),
           ('d@x.com', 'fuel', 1, '10000-01-01'),
           ('e@x.com', 'fuel', 1, '0044-03-15 BC'),
           ('SECRET-not-an-email', 'fuel', 1, '2026-01-02'),
           ('f@x.com', 'fuel', NULL, NULL);
         CREATE TABLE floaty (email text, category text, amount double precision, date date);
         CREATE TABLE stamped (email text, category text, amount numeric, date timestamp);
         CREATE SEQUENCE s;",
    )
    .unwrap();
    let label = format!("postgres://{}@127.0.0.1:{}/postgres", pg.user, pg.port);
    let refused = |c: &DataConfig| load_holder(c, &collab).unwrap_err().to_string();

    // Bad rows: counted by reason with row numbers (in the order the node
    // reads them: sorted, byte order, nulls last), never their content.
    let mut c = pg_config(&pg, &pw, ("table", "good"), true);
    c.max_bad_row_share = 0.5;
    let e = refused(&c);
    assert!(e.contains(&label), "{e}");
    assert!(e.contains("7 of 8 rows are bad"), "{e}");
    assert!(e.contains("identifier is null: 1 rows (rows 8)"), "{e}");
    assert!(
        e.contains("amount is not a decimal with at most 2 places: 1 rows (rows 3)"),
        "{e}"
    );
    assert!(e.contains("category is null: 1 rows (rows 4)"), "{e}");
    assert!(
        e.contains("date outside the years 0000 to 9999: 2 rows (rows 5, 6)"),
        "{e}"
    );
    assert!(e.contains("identifier does not normalise: 1 rows (rows 1)"), "{e}");
    assert!(e.contains("amount is null: 1 rows (rows 7)"), "{e}");
    assert!(!e.contains("SECRET") && !e.contains("x.com"), "{e}");
    c.max_bad_row_share = 0.9;
    let ok = load_holder(&c, &collab).unwrap();
    let fuel = collab.categories.iter().position(|c| c == "fuel").unwrap() as u16;
    assert_eq!(
        ok.txns,
        vec![vec![Txn {
            category: fuel,
            cents: 1234,
            day: cleanroom_query::parse_date("2026-01-02").unwrap()
        }]]
    );

    // Unreachable: a port nothing listens on.
    let mut c = pg_config(&pg, &pw, ("table", "good"), true);
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    if let Some(p) = c.postgres.as_mut() {
        p.port = closed;
        p.connect_timeout_secs = 5;
    }
    let e = refused(&c);
    assert!(
        e.contains(&format!(":{closed}/postgres")) && e.contains("cannot connect"),
        "{e}"
    );

    // Wrong password; a password variable that is not set.
    let wrong = dir.path().join("wrong");
    write_secret(&wrong, "not-the-password").unwrap();
    let e = refused(&pg_config(&pg, &wrong, ("table", "good"), true));
    assert!(
        e.contains(&label) && e.contains("password authentication failed"),
        "{e}"
    );
    assert!(!e.contains("not-the-password"), "{e}");
    let mut c = pg_config(&pg, &pw, ("table", "good"), true);
    if let Some(p) = c.postgres.as_mut() {
        p.password_file = None;
        p.password_env = Some("CLEANROOM_TEST_NO_SUCH_VARIABLE".into());
    }
    let e = refused(&c);
    assert!(e.contains("CLEANROOM_TEST_NO_SUCH_VARIABLE is not set"), "{e}");

    // A missing column, a missing table, mistyped columns.
    let e = refused(&pg_config(
        &pg,
        &pw,
        ("query", "SELECT email, category, amount FROM good"),
        true,
    ));
    assert!(
        e.contains(&label) && e.contains("the query has no column named \"date\""),
        "{e}"
    );
    let e = refused(&pg_config(&pg, &pw, ("table", "nope"), true));
    assert!(e.contains("relation \"nope\" does not exist"), "{e}");
    let e = refused(&pg_config(&pg, &pw, ("table", "floaty"), true));
    assert!(e.contains("column \"amount\" is float8: amounts must be exact"), "{e}");
    let e = refused(&pg_config(&pg, &pw, ("table", "stamped"), true));
    assert!(
        e.contains("column \"date\" is timestamp; it must be date or text"),
        "{e}"
    );

    // An empty result.
    let e = refused(&pg_config(&pg, &pw, ("query", "SELECT * FROM good WHERE false"), true));
    assert!(e.contains(&label) && e.contains("no rows: the source is empty"), "{e}");

    // A query that would write: refused, and the table is unchanged. The
    // first two never run (PostgreSQL refuses them as written); the third
    // runs and the read-only transaction refuses its write.
    for (q, why) in [
        ("SELECT * FROM good; DELETE FROM good", "multiple commands"),
        (
            "WITH d AS (DELETE FROM good RETURNING *) SELECT * FROM d",
            "data-modifying statement",
        ),
        (
            "SELECT email, category, amount, date FROM good, LATERAL (SELECT nextval('s')) n",
            "read-only transaction",
        ),
    ] {
        let e = refused(&pg_config(&pg, &pw, ("query", q), true));
        assert!(e.contains(&label) && e.contains(why), "{q}: {e}");
    }
    // A query that ends in a comment still runs.
    let mut c = pg_config(
        &pg,
        &pw,
        (
            "query",
            "SELECT email, category, amount, date FROM good -- the good rows",
        ),
        true,
    );
    c.max_bad_row_share = 0.9;
    assert_eq!(load_holder(&c, &collab).unwrap().ids.len(), 1);
    let mut client = pg.client().unwrap();
    let n: i64 = client.query_one("SELECT count(*) FROM good", &[]).unwrap().get(0);
    assert_eq!(n, 8);
}

#[test]
fn postgres_over_tls_checks_the_server_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let make_ca = || {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        (cert, key)
    };
    let (ca, ca_key) = make_ca();
    let server_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key).unwrap();
    let server_cert = p.signed_by(&server_key, &issuer).unwrap();
    let Some(pg) = server(|| TempPostgres::start_tls(&server_cert.pem(), &server_key.serialize_pem())) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = synth();
    write_synthetic(dir.path(), &data).unwrap();
    pg.execute(TABLES).unwrap_err(); // plain connections are rejected
    let pw = dir.path().join("pw");
    write_secret(&pw, &pg.password).unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let tls = |c: &mut DataConfig, ca: &Path| {
        if let Some(p) = c.postgres.as_mut() {
            p.tls = PgTls::VerifyFull;
            p.ca = Some(ca.to_path_buf());
        }
    };
    // Over TLS, checked against the right CA: the table does not exist,
    // which is the server's answer on an established session.
    let mut c = pg_config(&pg, &pw, ("table", "bank"), true);
    tls(&mut c, &ca_file);
    let collab = collab(&data);
    let e = load_holder(&c, &collab).unwrap_err().to_string();
    assert!(
        e.contains("relation \"public.bank\" does not exist") || e.contains("relation \"bank\" does not exist"),
        "{e}"
    );
    // Without TLS: refused by the server.
    let e = load_holder(&pg_config(&pg, &pw, ("table", "bank"), true), &collab)
        .unwrap_err()
        .to_string();
    assert!(e.contains("cannot connect") && e.contains("no encryption"), "{e}");
    // The right CA, but the server's certificate names 127.0.0.1, not
    // localhost: refused.
    let mut c = pg_config(&pg, &pw, ("table", "bank"), true);
    tls(&mut c, &ca_file);
    if let Some(p) = c.postgres.as_mut() {
        p.host = "localhost".into();
    }
    let e = load_holder(&c, &collab).unwrap_err().to_string();
    assert!(
        e.contains("cannot connect") && e.to_lowercase().contains("certificate"),
        "{e}"
    );
    // Another CA: the certificate is refused.
    let (other, _) = make_ca();
    let other_file = dir.path().join("other.pem");
    std::fs::write(&other_file, other.pem()).unwrap();
    let mut c = pg_config(&pg, &pw, ("table", "bank"), true);
    tls(&mut c, &other_file);
    let e = load_holder(&c, &collab).unwrap_err().to_string();
    assert!(
        e.contains("cannot connect") && e.to_lowercase().contains("certificate"),
        "{e}"
    );
}

/// A node whose table lost a column refuses to start, naming the source
/// and the column; nothing is charged (its ledger is never opened for a
/// query).
#[test]
fn a_node_with_a_broken_table_refuses_to_start() {
    let Some(pg) = server(TempPostgres::start) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut fixture = cleanroom_lab::demo::Fixture::create(dir.path(), 300, 4, &["alice"]).unwrap();
    fixture.use_postgres(&pg).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // As set up, the bank starts from its table.
    let bank = rt.block_on(fixture.start_bank()).unwrap();
    assert_eq!(bank.charge_count().unwrap(), 0);
    rt.block_on(bank.shutdown());
    drop(bank);
    pg.execute("ALTER TABLE bank DROP COLUMN date").unwrap();
    let e = rt.block_on(fixture.start_bank()).unwrap_err().to_string();
    assert!(
        e.contains(&format!("postgres://cleanroom_reader@127.0.0.1:{}/postgres", pg.port))
            && e.contains("no column named \"date\""),
        "{e}"
    );
}

/// `cleanroom demo --source parquet` and `--source postgres` end to end:
/// both nodes start from the source, and every cell of the three
/// templates is within 6 sigma of the plaintext truth of the same
/// synthetic data (what the CSV demo checks in `nodes.rs`).
#[test]
fn the_demo_from_parquet_and_from_postgres_is_within_its_noise_of_the_truth() {
    use cleanroom_lab::demo::{DemoSource, run};
    let mut sources = vec![DemoSource::Parquet];
    if have_postgres() {
        sources.push(DemoSource::Postgres);
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    for source in sources {
        let report = rt.block_on(run(600, 9, None, None, source, false)).unwrap();
        assert_eq!(report.queries.len(), 3, "{source:?}");
        for q in &report.queries {
            assert_eq!(q.result.cells.len(), q.truth.len(), "{source:?} {}", q.template);
            for (c, truth) in q.result.cells.iter().zip(&q.truth) {
                assert!(
                    (c.value - truth).abs() <= 6.0 * c.sigma,
                    "{source:?} {} {}: {} vs {truth} (sd {})",
                    q.template,
                    c.name,
                    c.value,
                    c.sigma
                );
            }
        }
    }
}
