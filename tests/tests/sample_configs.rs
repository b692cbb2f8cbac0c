//! Every sample configuration in `examples/` parses and passes its checks,
//! and points at the development certificates in `certs/`.

use std::path::Path;

use cleanroom_client::config::AnalystConfig;
use cleanroom_node::config::{NodeConfig, Role};
use cleanroom_transport::{Identity, TrustAnchors, certificate_is_for, pki};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn sample_node_configs_parse() {
    for (file, role) in [("bank.toml", Role::Bank), ("platform.toml", Role::Platform)] {
        let path = root().join("examples").join(file);
        let cfg = NodeConfig::load(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(cfg.role, role);
        assert_eq!(cfg.templates(&path).unwrap().len(), 3);
        // The development certificate it names is for this role and chains to the CA.
        let id = Identity::load(&cfg.identity.cert, &cfg.identity.key).unwrap();
        assert!(certificate_is_for(id.leaf().unwrap(), &pki::node_name(role.as_str())));
        TrustAnchors::load(&cfg.identity.ca).unwrap();
        // The committed signed policy verifies and approves every template.
        let policy = cleanroom_node::policy::load_verified(&cfg.policy.signed, &cfg.policy.public_key).unwrap();
        for t in cfg.templates(&path).unwrap() {
            assert!(
                policy.approves(&t),
                "{file}: {} not signed (run cleanroom policy sign)",
                t.name
            );
        }
    }
    let analyst = AnalystConfig::load(&root().join("examples/analyst.toml")).unwrap();
    assert_eq!(analyst.name, "alice");
    let id = Identity::load(&analyst.identity.cert, &analyst.identity.key).unwrap();
    assert!(certificate_is_for(id.leaf().unwrap(), &pki::analyst_name("alice")));
}

#[test]
fn bad_configs_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root().join("examples/bank.toml")).unwrap();
    let cases = [
        (
            good.replace("role = \"bank\"", "role = \"bank\"\nsurprise = 1"),
            "unknown field",
        ),
        (good.replace("rho = \"0.1\"", "rho = \"-1\""), "rho"),
        (good.replace("period_days = 30", "period_days = 0"), "period_days"),
        (good.replace("category_column = \"category\"\n", ""), "category_column"),
        (good.replace("id_kind = \"email\"", "id_kind = \"fax\""), "id_kind"),
        (
            good.replace(
                "dates = [\"2026-01-01\", \"2026-12-31\"]",
                "dates = [\"2026-12-31\", \"2026-01-01\"]",
            ),
            "window",
        ),
        (
            format!("{good}\n[timeouts]\nstream_idle_secs = 0\n"),
            "timeouts.stream_idle_secs is 0",
        ),
        (
            format!("{good}\n[timeouts]\npeer_frame_secs = 86401\n"),
            "timeouts.peer_frame_secs is 86401",
        ),
        (
            format!("{good}\n[timeouts]\nconnect_attempts = 0\n"),
            "timeouts.connect_attempts",
        ),
        (format!("{good}\n[timeouts]\npeer_frame = 5\n"), "unknown field"),
        (
            good.replace(
                "path = \"../data/bank.csv\"",
                "source = \"postgres\"\npostgres = { host = \"db\", dbname = \"bank\", user = \"reader\", password = \"hunter2\", table = \"txns\" }",
            ),
            "a password is never written in the config",
        ),
        (
            good.replace(
                "path = \"../data/bank.csv\"",
                "source = \"postgres\"\npostgres = { host = \"db\", dbname = \"bank\", user = \"reader\" }",
            ),
            "exactly one of query and table",
        ),
        (
            good.replace(
                "path = \"../data/bank.csv\"",
                "source = \"postgres\"\npostgres = { host = \"db\", dbname = \"bank\", user = \"reader\", table = \"t\", tls = \"verify-full\" }",
            ),
            "needs ca",
        ),
        (
            good.replace(
                "path = \"../data/bank.csv\"",
                "source = \"postgres\"\npostgres = { host = \"db\", dbname = \"bank\", user = \"reader\", table = \"t\", password_file = \"a\", password_env = \"B\" }",
            ),
            "not both",
        ),
        (good.replace("path = \"../data/bank.csv\"", "source = \"postgres\""), "needs [data.postgres]"),
        (good.replace("path = \"../data/bank.csv\"", "source = \"parquet\""), "needs path"),
        (good.replace("path = \"../data/bank.csv\"", "source = \"excel\"\npath = \"x\""), "unknown variant"),
        (
            format!("{good}\n[workers]\naddresses = [\"127.0.0.1:7501\"]\n"),
            "[workers] needs [shards] count of 2 or more",
        ),
        (
            format!("{good}\n[shards]\ncount = 4\nkey = \"k\"\n\n[workers]\naddresses = [\"w-0.workers:7501\"]\n"),
            "give [workers] listen",
        ),
        (
            format!("{good}\n[shards]\ncount = 4\nkey = \"k\"\n\n[workers]\naddresses = [\"w_0:7501\"]\n"),
            "is not host:port",
        ),
        (
            format!("{good}\n[shards]\ncount = 2\nkey = \"k\"\n\n[workers]\naddresses = [\"127.0.0.1:7501\", \"127.0.0.1:7502\", \"127.0.0.1:7503\"]\n"),
            "more than the 2 shards",
        ),
        (
            format!("{good}\n[workers]\ncoordinator = \"127.0.0.1:7401\"\n"),
            "coordinator without [workers] addresses",
        ),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&p, text).unwrap();
        let e = NodeConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains(needle), "case {i}: {e}");
        assert!(!e.contains("hunter2"), "case {i}: {e}");
    }
}

/// `source = "parquet"` and `"postgres"` configs parse; relative files
/// (the Parquet file, the password file, the database's CA) are taken
/// relative to the config's directory.
#[test]
fn parquet_and_postgres_sources_parse() {
    use cleanroom_node::config::{PgTls, SourceKind};
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(root().join("examples/bank.toml")).unwrap();
    let p = dir.path().join("bank.toml");
    std::fs::write(
        &p,
        good.replace(
            "path = \"../data/bank.csv\"",
            "source = \"parquet\"\npath = \"data/bank.parquet\"",
        ),
    )
    .unwrap();
    let cfg = NodeConfig::load(&p).unwrap();
    assert_eq!(cfg.data.source, SourceKind::Parquet);
    assert_eq!(cfg.data.path, dir.path().join("data/bank.parquet"));
    std::fs::write(
        &p,
        good.replace(
            "path = \"../data/bank.csv\"",
            "source = \"postgres\"\n\
             postgres = { host = \"db.internal\", dbname = \"cards\", user = \"cleanroom_reader\", password_file = \"secrets/pg\", \
             tls = \"verify-full\", ca = \"db-ca.pem\", query = \"SELECT email, category, amount, date FROM txns\" }",
        ),
    )
    .unwrap();
    let cfg = NodeConfig::load(&p).unwrap();
    assert_eq!(cfg.data.source, SourceKind::Postgres);
    let pg = cfg.data.postgres.unwrap();
    assert_eq!((pg.port, pg.fetch_rows, pg.tls), (5432, 10_000, PgTls::VerifyFull));
    assert_eq!(pg.password_file.unwrap(), dir.path().join("secrets/pg"));
    assert_eq!(pg.ca.unwrap(), dir.path().join("db-ca.pem"));
}

/// `[timeouts]` sets the named waits; what it leaves out keeps its default.
#[test]
fn timeouts_are_configurable_by_name() {
    use cleanroom_node::config::Timeouts;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let path = root().join("examples/bank.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    let defaults = NodeConfig::load(&path).unwrap().limits(&path).unwrap().timeouts;
    assert_eq!(defaults, Timeouts::default());
    let p = dir.path().join("bank.toml");
    std::fs::write(
        &p,
        format!("{good}\n[timeouts]\npeer_frame_secs = 7\nstream_idle_secs = 9\nconnect_attempts = 3\n"),
    )
    .unwrap();
    let set = NodeConfig::load(&p).unwrap().limits(&p).unwrap().timeouts;
    assert_eq!(
        set,
        Timeouts {
            peer_frame: Duration::from_secs(7),
            stream_idle: Duration::from_secs(9),
            connect_attempts: 3,
            ..Timeouts::default()
        }
    );
}
