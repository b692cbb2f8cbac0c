//! The node's durable state in SQLite (WAL, `synchronous=FULL`): the
//! privacy-budget ledger (with the noisy share of each query, so a retry
//! returns the same share), the holder's cardinality ledger, the
//! append-only hash-chained audit log, and the join cache.
//!
//! What is stored: per query the analyst, template, plan digest, ρ and this
//! node's noisy share; per join the holder's row order or the matcher's bit
//! vector (the state PROTOCOL.md says each node keeps). Never an
//! identifier, a value or the other node's data.

use cleanroom_wire::QueryId;
use std::path::Path;

use ring::digest::{Context, SHA256, digest};
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use zeroize::Zeroizing;

use crate::NodeError;

/// The outcome of a charge attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Charge {
    /// Newly charged; compute the share.
    New,
    /// This query id was already charged. If its share was stored, here it is.
    Existing(Option<Vec<u8>>),
    /// Refused: the charge would pass the limit.
    OverBudget {
        /// Spent this period, millionths.
        spent: u64,
        /// The limit, millionths.
        limit: u64,
    },
    /// Refused: the analyst already ran this many queries today (UTC).
    TooManyRuns {
        /// The limit.
        limit: u32,
    },
}

/// A charged query as the ledger has it.
#[derive(Clone, PartialEq, Eq)]
pub struct ChargedQuery {
    /// The analyst.
    pub analyst: String,
    /// The template.
    pub template: String,
    /// The plan digest.
    pub plan: Vec<u8>,
    /// The parameters, JSON (absent in ledgers from before they were kept).
    pub params: Option<String>,
    /// The stored share (an encoded `AnalystResponse`), once stored.
    pub share: Option<Vec<u8>>,
    /// ρ charged, millionths.
    pub rho_micro: u64,
    /// What the stored share was computed over (absent before the first
    /// store, and in ledgers from before it was kept).
    pub binding: Option<RunBinding>,
    /// How often the stored share was replaced by a rerun.
    pub reruns: u32,
}

/// What a query's released share was computed over (see
/// `cleanroom_protocol::ledger`, whose rules decide when a query may run
/// again).
pub use cleanroom_protocol::ledger::RunBinding;

impl std::fmt::Debug for ChargedQuery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChargedQuery")
            .field("analyst", &self.analyst)
            .field("template", &self.template)
            .field("share", &self.share.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// A cached join: its session id and stored payload.
pub type CachedJoin = (cleanroom_wire::SessionId, Vec<u8>);

/// The state database.
#[derive(Debug)]
pub struct State {
    conn: Connection,
}

/// How the state database failed, or what it holds that it should not.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// SQLite failed a statement.
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The state directory cannot be made.
    #[error("{path}: {source}")]
    Directory {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database file cannot be opened.
    #[error("{path}: {source}")]
    Open {
        /// The file.
        path: String,
        /// Why.
        source: rusqlite::Error,
    },
    /// The file is not a usable state database.
    #[error(
        "{path} is not a usable state database ({source}); restore it from a backup, or move it away to start empty (budgets and the audit log would restart)"
    )]
    Unusable {
        /// The file.
        path: String,
        /// Why.
        source: rusqlite::Error,
    },
    /// SQLite's integrity check fails.
    #[error("{path} failed its integrity check: {result}")]
    Integrity {
        /// The file.
        path: String,
        /// What `PRAGMA quick_check` said.
        result: String,
    },
    /// The ledger does not match the audit log (the file was edited).
    #[error("the ledger does not match the audit log ({0}): the state file was edited; restore it from a backup")]
    LedgerMismatch(String),
    /// An audit entry's hash does not follow from the one before.
    #[error("the audit log's hash chain breaks at entry {entry}")]
    AuditChain {
        /// The entry's sequence number.
        entry: i64,
    },
    /// A row that the code's own writes never leave (a share, a seed, a
    /// key of the wrong form; a row missing that must be there).
    #[error("{0}")]
    Inconsistent(&'static str),
}

fn db(e: rusqlite::Error) -> NodeError {
    NodeError::State(StateError::Sqlite(e))
}

/// Seconds since the epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The budget period containing `secs`.
pub fn period_of(secs: i64, period_days: u32) -> i64 {
    secs.div_euclid(86_400 * i64::from(period_days.max(1)))
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS charges (
    query_id BLOB PRIMARY KEY,
    analyst TEXT NOT NULL,
    template TEXT NOT NULL,
    plan BLOB NOT NULL,
    rho_micro INTEGER NOT NULL,
    period INTEGER NOT NULL,
    charged_at INTEGER NOT NULL,
    share BLOB,
    released_at INTEGER,
    params TEXT,
    noise_seed BLOB,
    join_session BLOB,
    data_version BLOB,
    reruns INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS charges_by_analyst ON charges (analyst, period);
CREATE TABLE IF NOT EXISTS cardinality (
    session BLOB PRIMARY KEY,
    eps_micro INTEGER NOT NULL,
    period INTEGER NOT NULL,
    charged_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    at INTEGER NOT NULL,
    event TEXT NOT NULL,
    analyst TEXT NOT NULL,
    template TEXT NOT NULL,
    plan BLOB NOT NULL,
    params TEXT NOT NULL,
    rho_micro INTEGER NOT NULL,
    result_digest BLOB NOT NULL,
    prev BLOB NOT NULL,
    hash BLOB NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_append_only_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TABLE IF NOT EXISTS join_inputs (
    filter TEXT PRIMARY KEY,
    fingerprints BLOB NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS node_secrets (
    name TEXT PRIMARY KEY,
    secret BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS shard_joins (
    part BLOB PRIMARY KEY,
    charged_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS joins (
    session BLOB PRIMARY KEY,
    filter TEXT NOT NULL,
    data_version BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    payload BLOB NOT NULL
);
";

/// One audit entry's fields (what was run, never data).
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    /// `query` or `join`.
    pub event: &'a str,
    /// The analyst (empty for joins).
    pub analyst: &'a str,
    /// Template name (the join filter for joins).
    pub template: &'a str,
    /// Plan digest (join session for joins).
    pub plan: &'a [u8],
    /// Parameters as text.
    pub params: &'a str,
    /// ρ (or ε for joins), millionths.
    pub rho_micro: u64,
    /// Digest of the released share (empty for joins).
    pub result_digest: &'a [u8],
}

fn entry_hash(prev: &[u8], at: i64, e: &AuditEntry<'_>) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    let mut put = |b: &[u8]| {
        ctx.update(&(b.len() as u64).to_le_bytes());
        ctx.update(b);
    };
    put(b"cleanroom-audit-v1");
    put(prev);
    put(&at.to_le_bytes());
    put(e.event.as_bytes());
    put(e.analyst.as_bytes());
    put(e.template.as_bytes());
    put(e.plan);
    put(e.params.as_bytes());
    put(&e.rho_micro.to_le_bytes());
    put(e.result_digest);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn append_audit(tx: &rusqlite::Transaction<'_>, e: &AuditEntry<'_>) -> Result<(), NodeError> {
    let prev: Vec<u8> = tx
        .query_row("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1", [], |r| r.get(0))
        .optional()
        .map_err(db)?
        .unwrap_or_else(|| vec![0u8; 32]);
    let at = now_secs();
    let hash = entry_hash(&prev, at, e);
    tx.execute(
        "INSERT INTO audit (at, event, analyst, template, plan, params, rho_micro, result_digest, prev, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            at,
            e.event,
            e.analyst,
            e.template,
            e.plan,
            e.params,
            e.rho_micro as i64,
            e.result_digest,
            prev,
            hash.to_vec()
        ],
    )
    .map_err(db)?;
    Ok(())
}

/// 32 bytes from the OS generator, zeroized on drop.
fn fresh_seed() -> Result<Zeroizing<[u8; 32]>, NodeError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    cleanroom_crypto::rng::SystemRng::new().try_fill(seed.as_mut_slice())?;
    Ok(seed)
}

fn query_in(conn: &Connection, query_id: &QueryId) -> Result<Option<ChargedQuery>, NodeError> {
    conn.query_row(
        "SELECT analyst, template, plan, params, share, rho_micro, join_session, data_version, reruns FROM charges WHERE query_id = ?1",
        params![query_id.0.to_vec()],
        |r| {
            let join: Option<Vec<u8>> = r.get(6)?;
            let version: Option<Vec<u8>> = r.get(7)?;
            let binding = match (join, version) {
                (Some(j), Some(v)) => match (<[u8; 16]>::try_from(j.as_slice()), <[u8; 32]>::try_from(v.as_slice())) {
                    (Ok(join), Ok(data_version)) => Some(RunBinding { join: cleanroom_wire::SessionId(join), data_version }),
                    _ => None,
                },
                _ => None,
            };
            Ok(ChargedQuery {
                analyst: r.get(0)?,
                template: r.get(1)?,
                plan: r.get(2)?,
                params: r.get(3)?,
                share: r.get(4)?,
                rho_micro: r.get::<_, i64>(5)?.max(0) as u64,
                binding,
                reruns: u32::try_from(r.get::<_, i64>(8)?.max(0)).unwrap_or(u32::MAX),
            })
        },
    )
    .optional()
    .map_err(db)
}

/// Why a rerun of `q` over `binding` may not replace its released share, if so.
/// The rerun rules (`cleanroom_protocol::ledger::check_rerun`) on a
/// charged query as stored (its share opaque).
fn check_rerun(q: &ChargedQuery, binding: &RunBinding, max_reruns: u32) -> Result<(), NodeError> {
    let record = cleanroom_protocol::ledger::RerunRecord {
        released: q.share.is_some(),
        binding: q.binding,
        reruns: q.reruns,
    };
    cleanroom_protocol::ledger::check_rerun(&record, binding, max_reruns)
        .map_err(|why| NodeError::refused(cleanroom_wire::RefusalCode::RerunRefused, why.to_string()))
}

impl State {
    /// Opens (or creates) `state.db` in `dir`.
    ///
    /// # Errors
    /// [`NodeError::State`] when the file cannot be opened, is not a
    /// database, or fails its integrity check.
    pub fn open(dir: &Path) -> Result<Self, NodeError> {
        std::fs::create_dir_all(dir).map_err(|source| StateError::Directory {
            path: dir.display().to_string(),
            source,
        })?;
        let path = dir.join("state.db");
        let conn = Connection::open(&path).map_err(|source| StateError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let corrupt = |source: rusqlite::Error| StateError::Unusable {
            path: path.display().to_string(),
            source,
        };
        let check: String = conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))
            .map_err(corrupt)?;
        if check != "ok" {
            return Err(StateError::Integrity {
                path: path.display().to_string(),
                result: check,
            }
            .into());
        }
        conn.pragma_update(None, "journal_mode", "WAL").map_err(corrupt)?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(corrupt)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(corrupt)?;
        // Databases from before these columns were kept: a charge without a
        // noise seed gets one when it first runs, unless its share was
        // already released (then it cannot be run again; see `noise_seed`).
        for (column, ddl) in [
            ("params", "ALTER TABLE charges ADD COLUMN params TEXT"),
            ("noise_seed", "ALTER TABLE charges ADD COLUMN noise_seed BLOB"),
            ("join_session", "ALTER TABLE charges ADD COLUMN join_session BLOB"),
            ("data_version", "ALTER TABLE charges ADD COLUMN data_version BLOB"),
            (
                "reruns",
                "ALTER TABLE charges ADD COLUMN reruns INTEGER NOT NULL DEFAULT 0",
            ),
        ] {
            let has: i64 = conn
                .query_row(
                    "SELECT COUNT(*) FROM pragma_table_info('charges') WHERE name = ?1",
                    [column],
                    |r| r.get(0),
                )
                .map_err(corrupt)?;
            if has == 0 {
                conn.execute_batch(ddl).map_err(corrupt)?;
            }
        }
        let state = Self { conn };
        state.verify_audit()?;
        state.verify_ledger()?;
        Ok(state)
    }

    /// Checks the ledger against the audit log, which is written in the same
    /// transactions: per analyst, as many first-run audit entries (`query`),
    /// with the same total ρ, as charged queries with a stored share; the
    /// digest of every stored share in a `query` or `query-rerun` entry; and
    /// the cardinality charges exactly the `join` entries. So a charge
    /// deleted, lowered or emptied with a database tool (which would give
    /// budget back) stops the node, unless the audit chain is rebuilt too.
    /// Not covered: charges not yet released (they have no audit entry yet)
    /// and the charges' times and periods.
    ///
    /// # Errors
    /// [`NodeError::State`] saying what does not match.
    pub fn verify_ledger(&self) -> Result<(), NodeError> {
        let broken = |what: String| NodeError::State(StateError::LedgerMismatch(what));
        let analyst: Option<String> = self
            .conn
            .query_row(
                "WITH a AS (SELECT analyst, COUNT(*) AS n, SUM(rho_micro) AS rho FROM audit WHERE event = 'query' GROUP BY analyst),
                      c AS (SELECT analyst, COUNT(*) AS n, SUM(rho_micro) AS rho FROM charges WHERE share IS NOT NULL GROUP BY analyst)
                 SELECT COALESCE(a.analyst, c.analyst) FROM a FULL OUTER JOIN c ON a.analyst = c.analyst
                 WHERE a.n IS NOT c.n OR a.rho IS NOT c.rho LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        if let Some(a) = analyst {
            return Err(broken(format!("the released queries of analyst {a:?}")));
        }
        let mut stmt = self
            .conn
            .prepare("SELECT result_digest FROM audit WHERE event IN ('query', 'query-rerun')")
            .map_err(db)?;
        let digests = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))
            .map_err(db)?
            .collect::<Result<std::collections::HashSet<_>, _>>()
            .map_err(db)?;
        let mut stmt = self
            .conn
            .prepare("SELECT share FROM charges WHERE share IS NOT NULL")
            .map_err(db)?;
        let mut rows = stmt.query([]).map_err(db)?;
        while let Some(r) = rows.next().map_err(db)? {
            let share: Vec<u8> = r.get(0).map_err(db)?;
            if !digests.contains(digest(&SHA256, &share).as_ref()) {
                return Err(broken("a stored share has no audit entry".into()));
            }
        }
        let unmatched: i64 = self
            .conn
            .query_row(
                "SELECT (SELECT COUNT(*) FROM (SELECT session, eps_micro FROM cardinality
                                               EXCEPT SELECT plan, rho_micro FROM audit WHERE event = 'join'))
                      + (SELECT COUNT(*) FROM (SELECT plan, rho_micro FROM audit WHERE event = 'join'
                                               EXCEPT SELECT session, eps_micro FROM cardinality))",
                [],
                |r| r.get(0),
            )
            .map_err(db)?;
        if unmatched != 0 {
            return Err(broken("the cardinality charges".into()));
        }
        Ok(())
    }

    /// Checks the audit log's hash chain from the first entry.
    ///
    /// # Errors
    /// [`NodeError::State`] naming the first entry that does not verify.
    pub fn verify_audit(&self) -> Result<u64, NodeError> {
        let mut stmt = self
            .conn
            .prepare("SELECT seq, at, event, analyst, template, plan, params, rho_micro, result_digest, prev, hash FROM audit ORDER BY seq")
            .map_err(db)?;
        let mut rows = stmt.query([]).map_err(db)?;
        let mut prev = vec![0u8; 32];
        let mut n = 0;
        while let Some(r) = rows.next().map_err(db)? {
            let seq: i64 = r.get(0).map_err(db)?;
            let event: String = r.get(2).map_err(db)?;
            let analyst: String = r.get(3).map_err(db)?;
            let template: String = r.get(4).map_err(db)?;
            let plan: Vec<u8> = r.get(5).map_err(db)?;
            let params_text: String = r.get(6).map_err(db)?;
            let rho: i64 = r.get(7).map_err(db)?;
            let digest: Vec<u8> = r.get(8).map_err(db)?;
            let stored_prev: Vec<u8> = r.get(9).map_err(db)?;
            let hash: Vec<u8> = r.get(10).map_err(db)?;
            let e = AuditEntry {
                event: &event,
                analyst: &analyst,
                template: &template,
                plan: &plan,
                params: &params_text,
                rho_micro: rho as u64,
                result_digest: &digest,
            };
            if stored_prev != prev || hash != entry_hash(&prev, r.get(1).map_err(db)?, &e) {
                return Err(StateError::AuditChain { entry: seq }.into());
            }
            prev = hash;
            n += 1;
        }
        Ok(n)
    }

    /// Charges `rho_micro` to `analyst` for `query_id`, durably, unless the
    /// period's limit would be passed. A query id already charged is never
    /// charged again; if it belongs to another analyst or plan it is refused.
    /// `params` (the query's parameters, JSON) are kept so the query can be
    /// run again for the peer after a crash.
    ///
    /// # Errors
    /// [`NodeError::Refused`] for a reused query id; [`NodeError::State`].
    #[allow(clippy::too_many_arguments)]
    pub fn charge(
        &mut self,
        query_id: &QueryId,
        analyst: &str,
        template: &str,
        plan: &[u8; 32],
        params: &str,
        rho_micro: u64,
        limit_micro: u64,
        period_days: u32,
        runs_per_day: u32,
    ) -> Result<Charge, NodeError> {
        self.charge_or_check(
            query_id,
            analyst,
            template,
            plan,
            params,
            rho_micro,
            limit_micro,
            period_days,
            runs_per_day,
            true,
        )
    }

    /// With `write`, [`State::charge`]. Without, what it would answer now,
    /// writing nothing: `New` where it would charge. The admission check
    /// both nodes make before either charges (`AnalystRequest::Admit`); the
    /// charge itself checks again, in its transaction.
    ///
    /// # Errors
    /// As [`State::charge`].
    #[allow(clippy::too_many_arguments)]
    pub fn charge_or_check(
        &mut self,
        query_id: &QueryId,
        analyst: &str,
        template: &str,
        plan: &[u8; 32],
        params: &str,
        rho_micro: u64,
        limit_micro: u64,
        period_days: u32,
        runs_per_day: u32,
        write: bool,
    ) -> Result<Charge, NodeError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let existing: Option<(String, Vec<u8>, Option<Vec<u8>>)> = tx
            .query_row(
                "SELECT analyst, plan, share FROM charges WHERE query_id = ?1",
                params![query_id.0.to_vec()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(db)?;
        if let Some((a, p, share)) = existing {
            if a != analyst || p != plan.to_vec() {
                return Err(NodeError::refused(
                    cleanroom_wire::RefusalCode::QueryIdReused,
                    "this query id was already used for another query; choose a new id",
                ));
            }
            return Ok(Charge::Existing(share));
        }
        let now = now_secs();
        let period = period_of(now, period_days);
        let day_start = now.div_euclid(86_400) * 86_400;
        let runs: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM charges WHERE analyst = ?1 AND charged_at >= ?2",
                params![analyst, day_start],
                |r| r.get(0),
            )
            .map_err(db)?;
        if runs.max(0) as u64 >= u64::from(runs_per_day) {
            return Ok(Charge::TooManyRuns { limit: runs_per_day });
        }
        let spent: i64 = tx
            .query_row(
                "SELECT COALESCE(SUM(rho_micro), 0) FROM charges WHERE analyst = ?1 AND period = ?2",
                params![analyst, period],
                |r| r.get(0),
            )
            .map_err(db)?;
        let spent = spent.max(0) as u64;
        if spent.saturating_add(rho_micro) > limit_micro {
            return Ok(Charge::OverBudget {
                spent,
                limit: limit_micro,
            });
        }
        if !write {
            // Dropping the transaction rolls it back: nothing was written.
            return Ok(Charge::New);
        }
        // The query's noise is fixed here, in the charge's transaction: every
        // run of this query id on this node draws it from this seed.
        let seed = fresh_seed()?;
        tx.execute(
            "INSERT INTO charges (query_id, analyst, template, plan, rho_micro, period, charged_at, params, noise_seed) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![query_id.0.to_vec(), analyst, template, plan.to_vec(), rho_micro as i64, period, now, params, seed.as_slice()],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(Charge::New)
    }

    /// Stores the noisy share of a charged query and appends the audit
    /// entry, in one transaction, before the share is released.
    ///
    /// The first store records `binding` (the join and data version the share
    /// was computed over). With `replace`, the query already has a stored
    /// share (from a run the peer lost) and this one, of a new run, takes its
    /// place: only over the same binding and while fewer than `max_reruns`
    /// reruns were stored; each rerun is counted and has its audit entry.
    ///
    /// # Errors
    /// [`NodeError::Refused`] for a rerun over another join or data, or over
    /// the cap; [`NodeError::State`].
    pub fn store_share(
        &mut self,
        query_id: &QueryId,
        share: &[u8],
        entry: &AuditEntry<'_>,
        binding: &RunBinding,
        replace: bool,
        max_reruns: u32,
    ) -> Result<(), NodeError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        // The entry must describe this charge and this share (checked again
        // at every start by `verify_ledger`).
        let charged: Option<(String, i64)> = tx
            .query_row(
                "SELECT analyst, rho_micro FROM charges WHERE query_id = ?1",
                params![query_id.0.to_vec()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        let event = if replace { "query-rerun" } else { "query" };
        if let Some(charged) = charged
            && (charged != (entry.analyst.to_string(), entry.rho_micro as i64)
                || entry.event != event
                || entry.result_digest != digest(&SHA256, share).as_ref())
        {
            return Err(NodeError::Internal(
                "an audit entry that does not match its charge and share",
            ));
        }
        let n = if replace {
            let q =
                query_in(&tx, query_id)?.ok_or(StateError::Inconsistent("share replaced for a query that has none"))?;
            check_rerun(&q, binding, max_reruns)?;
            tx.execute(
                "UPDATE charges SET share = ?2, released_at = ?3, reruns = reruns + 1 WHERE query_id = ?1 AND share IS NOT NULL",
                params![query_id.0.to_vec(), share, now_secs()],
            )
            .map_err(db)?
        } else {
            tx.execute(
                "UPDATE charges SET share = ?2, released_at = ?3, join_session = ?4, data_version = ?5 WHERE query_id = ?1 AND share IS NULL",
                params![
                    query_id.0.to_vec(),
                    share,
                    now_secs(),
                    binding.join.0.to_vec(),
                    binding.data_version.to_vec()
                ],
            )
            .map_err(db)?
        };
        if n != 1 {
            return Err(StateError::Inconsistent(if replace {
                "share replaced for a query that has none"
            } else {
                "share stored for a query that was not charged, or twice"
            })
            .into());
        }
        append_audit(&tx, entry)?;
        tx.commit().map_err(db)?;
        Ok(())
    }

    /// Whether the released share of `query_id` may be replaced by a rerun
    /// over `binding` (see [`Self::store_share`]), asked before starting one.
    ///
    /// # Errors
    /// [`NodeError::Refused`] saying why not; [`NodeError::State`].
    pub fn may_rerun(&self, query_id: &QueryId, binding: &RunBinding, max_reruns: u32) -> Result<(), NodeError> {
        let q = self.charged_query(query_id)?.ok_or_else(|| {
            NodeError::refused(
                cleanroom_wire::RefusalCode::RerunRefused,
                "this query id was not charged here",
            )
        })?;
        check_rerun(&q, binding, max_reruns)
    }

    /// The seed of this query's noise on this node, fixed with its charge.
    /// A charge from a ledger that predates seeds gets one now, unless its
    /// share was already released: that share's noise cannot be drawn
    /// again, so the query cannot be run again.
    ///
    /// # Errors
    /// [`NodeError::Refused`] for a released query without a seed;
    /// [`NodeError::State`] for a query that was not charged.
    pub fn noise_seed(&mut self, query_id: &QueryId) -> Result<Zeroizing<[u8; 32]>, NodeError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let row: Option<(Option<Vec<u8>>, bool)> = tx
            .query_row(
                "SELECT noise_seed, share IS NOT NULL FROM charges WHERE query_id = ?1",
                params![query_id.0.to_vec()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        let Some((stored, released)) = row else {
            return Err(StateError::Inconsistent("noise asked for a query that was not charged").into());
        };
        let mut stored = stored.map(Zeroizing::new);
        if let Some(bytes) = &stored {
            let mut seed = Zeroizing::new([0u8; 32]);
            if bytes.len() != 32 {
                return Err(StateError::Inconsistent("a stored noise seed is not 32 bytes").into());
            }
            seed.copy_from_slice(bytes);
            return Ok(seed);
        }
        stored.take();
        if released {
            return Err(NodeError::refused(
                cleanroom_wire::RefusalCode::RerunRefused,
                "this query's share was released before noise seeds were kept; it cannot be run again",
            ));
        }
        let seed = fresh_seed()?;
        tx.execute(
            "UPDATE charges SET noise_seed = ?2 WHERE query_id = ?1 AND noise_seed IS NULL",
            params![query_id.0.to_vec(), seed.as_slice()],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(seed)
    }

    /// This node's own 256-bit key, drawn from the OS generator the first
    /// time and kept in the state file (it never leaves the node). Keys for
    /// one purpose are derived from it ([`derive`]): the churn fingerprints,
    /// the platform's block padding. Created along with it, the churn
    /// baselines from before it existed (unkeyed fingerprints) are dropped.
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn node_key(&mut self) -> Result<Zeroizing<[u8; 32]>, NodeError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let stored: Option<Vec<u8>> = tx
            .query_row("SELECT secret FROM node_secrets WHERE name = 'node-key'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(db)?;
        let stored = stored.map(Zeroizing::new);
        let mut key = Zeroizing::new([0u8; 32]);
        match stored {
            Some(bytes) if bytes.len() == 32 => key.copy_from_slice(&bytes),
            Some(_) => return Err(StateError::Inconsistent("the stored node key is not 32 bytes").into()),
            None => {
                key = fresh_seed()?;
                tx.execute(
                    "INSERT INTO node_secrets (name, secret) VALUES ('node-key', ?1)",
                    params![key.as_slice()],
                )
                .map_err(db)?;
                tx.execute("DELETE FROM join_inputs", []).map_err(db)?;
            }
        }
        tx.commit().map_err(db)?;
        Ok(key)
    }

    /// A charged query: who ran what, and its stored share if any.
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn charged_query(&self, query_id: &QueryId) -> Result<Option<ChargedQuery>, NodeError> {
        query_in(&self.conn, query_id)
    }

    /// ρ spent by `analyst` in the current period, millionths.
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn spent(&self, analyst: &str, period_days: u32) -> Result<u64, NodeError> {
        let period = period_of(now_secs(), period_days);
        let spent: i64 = self
            .conn
            .query_row(
                "SELECT COALESCE(SUM(rho_micro), 0) FROM charges WHERE analyst = ?1 AND period = ?2",
                params![analyst, period],
                |r| r.get(0),
            )
            .map_err(db)?;
        Ok(spent.max(0) as u64)
    }

    /// Number of charges recorded (all periods).
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn charge_count(&self) -> Result<u64, NodeError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM charges", [], |r| r.get(0))
            .map_err(db)?;
        Ok(n.max(0) as u64)
    }

    /// Charges `eps_micro` of cardinality budget for a join, durably, unless
    /// the period's limit would be passed; appends an audit entry.
    ///
    /// # Errors
    /// [`NodeError::Refused`] over the limit; [`NodeError::State`].
    pub fn charge_cardinality(
        &mut self,
        session: &cleanroom_wire::SessionId,
        filter: &str,
        eps_micro: u64,
        limit_micro: u64,
        period_days: u32,
    ) -> Result<(), NodeError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let now = now_secs();
        let period = period_of(now, period_days);
        let spent: i64 = tx
            .query_row(
                "SELECT COALESCE(SUM(eps_micro), 0) FROM cardinality WHERE period = ?1",
                params![period],
                |r| r.get(0),
            )
            .map_err(db)?;
        if (spent.max(0) as u64).saturating_add(eps_micro) > limit_micro {
            return Err(NodeError::refused(
                cleanroom_wire::RefusalCode::BudgetExhausted,
                format!(
                    "the cardinality budget of this period is spent ({} of {}); it frees up when the period ends",
                    cleanroom_query::format_micro(spent.max(0) as u64),
                    cleanroom_query::format_micro(limit_micro)
                ),
            ));
        }
        tx.execute(
            "INSERT INTO cardinality (session, eps_micro, period, charged_at) VALUES (?1, ?2, ?3, ?4)",
            params![session.0.to_vec(), eps_micro as i64, period, now],
        )
        .map_err(db)?;
        append_audit(
            &tx,
            &AuditEntry {
                event: "join",
                analyst: "",
                template: filter,
                plan: session.as_ref(),
                params: "",
                rho_micro: eps_micro,
                result_digest: &[],
            },
        )?;
        tx.commit().map_err(db)?;
        Ok(())
    }

    /// Charges the cardinality epsilon of a set of shard joins (one
    /// query's `S` joins, named by the platform's random `set`): `eps_micro`
    /// at the set's first join, nothing at its others (the shards partition
    /// this node's identifiers, so the set's counts together cost one
    /// epsilon: parallel composition). A second join of the same shard of a
    /// set is refused, so a platform cannot buy `S` looks at one shard for
    /// the price of one. Durable before it returns.
    ///
    /// # Errors
    /// [`NodeError::Refused`] over the budget or for a shard of the set
    /// joined before; [`NodeError::State`].
    #[allow(clippy::too_many_arguments)]
    pub fn charge_shard_join(
        &mut self,
        split: &ShardSplit,
        set: &[u8; 16],
        shard: u32,
        eps_micro: u64,
        limit_micro: u64,
        period_days: u32,
    ) -> Result<(), NodeError> {
        // A set is one split's: the same set id under another count or key
        // is another set (else a platform could join some shards of a set,
        // wait for the operators to change the split, and join the rest of
        // it, over other customers, for nothing).
        let key = |tag: &[u8], shard: Option<u32>| {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            ctx.update(tag);
            ctx.update(&split.key_id);
            ctx.update(&split.shards.to_le_bytes());
            ctx.update(set);
            if let Some(s) = shard {
                ctx.update(&s.to_le_bytes());
            }
            let d = ctx.finish();
            d.as_ref().get(..16).map(<[u8]>::to_vec).unwrap_or_default()
        };
        let set_key = key(b"cleanroom-v1-shard-set", None);
        let part_key = key(b"cleanroom-v1-shard-part", Some(shard));
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let joined: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM shard_joins WHERE part = ?1",
                params![part_key],
                |r| r.get(0),
            )
            .map_err(db)?;
        if joined > 0 {
            return Err(NodeError::refused(
                cleanroom_wire::RefusalCode::PeerRefused,
                "a second join of the same shard of a set of shard joins",
            ));
        }
        let now = now_secs();
        let period = period_of(now, period_days);
        let charged: Option<(i64, i64)> = tx
            .query_row(
                "SELECT period, charged_at FROM cardinality WHERE session = ?1",
                params![set_key],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        // One query's set of joins runs in one go: a set charged in another
        // period, or longer ago than a join lives, is over.
        if let Some((at_period, at)) = charged
            && (at_period != period || now.saturating_sub(at) > split.max_age_secs)
        {
            return Err(NodeError::refused(
                cleanroom_wire::RefusalCode::PeerRefused,
                "a shard join of a set of shard joins that is over",
            ));
        }
        if charged.is_none() {
            let spent: i64 = tx
                .query_row(
                    "SELECT COALESCE(SUM(eps_micro), 0) FROM cardinality WHERE period = ?1",
                    params![period],
                    |r| r.get(0),
                )
                .map_err(db)?;
            if (spent.max(0) as u64).saturating_add(eps_micro) > limit_micro {
                return Err(NodeError::refused(
                    cleanroom_wire::RefusalCode::BudgetExhausted,
                    format!(
                        "the cardinality budget of this period is spent ({} of {}); it frees up when the period ends",
                        cleanroom_query::format_micro(spent.max(0) as u64),
                        cleanroom_query::format_micro(limit_micro)
                    ),
                ));
            }
            tx.execute(
                "INSERT INTO cardinality (session, eps_micro, period, charged_at) VALUES (?1, ?2, ?3, ?4)",
                params![set_key, eps_micro as i64, period, now],
            )
            .map_err(db)?;
            append_audit(
                &tx,
                &AuditEntry {
                    event: "join",
                    analyst: "",
                    template: "shard-set",
                    plan: &set_key,
                    params: "",
                    rho_micro: eps_micro,
                    result_digest: &[],
                },
            )?;
        }
        // Sets past their age are over (refused by their charge's age), so
        // their shards' records are no longer needed.
        tx.execute(
            "DELETE FROM shard_joins WHERE charged_at < ?1",
            params![now.saturating_sub(split.max_age_secs.max(0)).saturating_sub(1)],
        )
        .map_err(db)?;
        // The shard joined, costing nothing more (kept apart from the
        // charges, which match the audit log's `join` entries one to one).
        tx.execute(
            "INSERT INTO shard_joins (part, charged_at) VALUES (?1, ?2)",
            params![part_key, now],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(())
    }

    /// Checks this node's own input for a join against the input of the last
    /// join for the same filter: the share of identifiers added or removed
    /// (`|A Δ B| / |B|`, fingerprints sorted) may not exceed `max_ppm`
    /// millionths. The baseline lasts until that join expires.
    ///
    /// # Errors
    /// [`NodeError::Refused`] naming the limit and when it frees up.
    pub fn check_churn(&self, filter: &str, fingerprints: &[u64], max_ppm: u64) -> Result<(), NodeError> {
        let prev: Option<(Vec<u8>, i64)> = self
            .conn
            .query_row(
                "SELECT fingerprints, expires_at FROM join_inputs WHERE filter = ?1 AND expires_at > ?2",
                params![filter, now_secs()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        let Some((bytes, expires)) = prev else {
            return Ok(());
        };
        let old: Vec<u64> = bytes
            .chunks_exact(8)
            .filter_map(|c| <[u8; 8]>::try_from(c).ok().map(u64::from_le_bytes))
            .collect();
        let changed = symmetric_difference(&old, fingerprints);
        let base = old.len().max(1) as u128;
        if u128::from(changed) * 1_000_000 > u128::from(max_ppm) * base {
            // The refusal reaches the analyst: it names the limit, never the
            // node's own counts (those go to the operator's log only).
            tracing::warn!(changed, baseline = old.len(), "input churn limit reached");
            return Err(NodeError::refused(
                cleanroom_wire::RefusalCode::InputLimit,
                format!(
                    "input churn limit: more than {:.1}% of this node's identifiers for this input changed since the last join; it frees up when that join expires on {}",
                    max_ppm as f64 / 10_000.0,
                    cleanroom_query::format_date(i32::try_from(expires.div_euclid(86_400)).unwrap_or(i32::MAX))
                ),
            ));
        }
        Ok(())
    }

    /// Records this node's input to a join, as the baseline for the churn limit.
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn record_inputs(&mut self, filter: &str, fingerprints: &[u64], ttl_secs: u64) -> Result<(), NodeError> {
        let mut bytes = Vec::with_capacity(fingerprints.len() * 8);
        for f in fingerprints {
            bytes.extend_from_slice(&f.to_le_bytes());
        }
        self.conn
            .execute(
                "INSERT OR REPLACE INTO join_inputs (filter, fingerprints, expires_at) VALUES (?1, ?2, ?3)",
                params![filter, bytes, now_secs().saturating_add(ttl_secs as i64)],
            )
            .map_err(db)?;
        Ok(())
    }

    /// Caches a join.
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn put_join(
        &mut self,
        session: &cleanroom_wire::SessionId,
        filter: &str,
        data_version: &[u8; 32],
        ttl_secs: u64,
        payload: &[u8],
    ) -> Result<(), NodeError> {
        let now = now_secs();
        self.conn
            .execute(
                "INSERT OR REPLACE INTO joins (session, filter, data_version, created_at, expires_at, payload) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![session.0.to_vec(), filter, data_version.to_vec(), now, now.saturating_add(ttl_secs as i64), payload],
            )
            .map_err(db)?;
        Ok(())
    }

    /// Deletes expired joins and joins of other data versions.
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn expire_joins(&mut self, data_version: &[u8; 32]) -> Result<usize, NodeError> {
        self.conn
            .execute(
                "DELETE FROM joins WHERE expires_at <= ?1 OR data_version != ?2",
                params![now_secs(), data_version.to_vec()],
            )
            .map_err(db)
    }

    /// The newest live join for `filter` (matcher side): `(session, payload)`.
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn join_for_filter(&self, filter: &str, data_version: &[u8; 32]) -> Result<Option<CachedJoin>, NodeError> {
        let row: Option<(Vec<u8>, Vec<u8>)> = self
            .conn
            .query_row(
                "SELECT session, payload FROM joins WHERE filter = ?1 AND data_version = ?2 AND expires_at > ?3 ORDER BY created_at DESC LIMIT 1",
                params![filter, data_version.to_vec(), now_secs()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)?;
        Ok(row.and_then(|(s, p)| {
            <[u8; 16]>::try_from(s.as_slice())
                .ok()
                .map(|s| (cleanroom_wire::SessionId(s), p))
        }))
    }

    /// A live join by session (holder side).
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn join_by_session(
        &self,
        session: &cleanroom_wire::SessionId,
        data_version: &[u8; 32],
    ) -> Result<Option<Vec<u8>>, NodeError> {
        self.conn
            .query_row(
                "SELECT payload FROM joins WHERE session = ?1 AND data_version = ?2 AND expires_at > ?3",
                params![session.0.to_vec(), data_version.to_vec(), now_secs()],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)
    }

    /// A live join by session with the filter it was stored under (holder
    /// side: a shard's join is stored under its shard's name).
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn join_entry_by_session(
        &self,
        session: &cleanroom_wire::SessionId,
        data_version: &[u8; 32],
    ) -> Result<Option<(String, Vec<u8>)>, NodeError> {
        self.conn
            .query_row(
                "SELECT filter, payload FROM joins WHERE session = ?1 AND data_version = ?2 AND expires_at > ?3",
                params![session.0.to_vec(), data_version.to_vec(), now_secs()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(db)
    }

    /// Forgets a join.
    ///
    /// # Errors
    /// [`NodeError::State`].
    pub fn drop_join(&mut self, session: &cleanroom_wire::SessionId) -> Result<(), NodeError> {
        self.conn
            .execute("DELETE FROM joins WHERE session = ?1", params![session.0.to_vec()])
            .map_err(db)?;
        Ok(())
    }
}

/// A node's split into shards as the cardinality ledger keys its sets of
/// shard joins (see [`State::charge_shard_join`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSplit {
    /// `S`.
    pub shards: u32,
    /// The shard key's id.
    pub key_id: [u8; 32],
    /// How long after its first join a set may still be joined (the join
    /// cache's lifetime).
    pub max_age_secs: i64,
}

/// Sorted 8-byte fingerprints of identifiers, for the churn limit: the
/// first 8 bytes of HMAC-SHA256 under the node's own key (see
/// [`State::node_key`]), so they cannot be enumerated back (phone numbers
/// could be, from an unkeyed hash) without that key. They are this node's
/// own input, kept on its own disk.
pub fn fingerprints(key: &[u8; 32], ids: &[&[u8]]) -> Vec<u64> {
    use rayon::prelude::*;
    let mut out = fingerprints_by_id(key, ids);
    out.par_sort_unstable();
    out
}

/// Each identifier's fingerprint, in the identifiers' order (a node
/// computes them once for its data; [`sorted_fingerprints`] picks a join's).
pub fn fingerprints_by_id<T: AsRef<[u8]> + Sync>(key: &[u8; 32], ids: &[T]) -> Vec<u64> {
    use rayon::prelude::*;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, derive(key, b"cleanroom-v1-churn").as_slice());
    ids.par_iter()
        .map(|id| {
            let tag = ring::hmac::sign(&key, id.as_ref());
            let mut b = [0u8; 8];
            b.copy_from_slice(tag.as_ref().get(..8).unwrap_or(&[0u8; 8]));
            u64::from_le_bytes(b)
        })
        .collect()
}

/// The sorted fingerprints of the identifiers at `indices`, `by_id` being
/// those of the node's `ids` identifiers.
///
/// # Errors
/// [`NodeError::Internal`] if `by_id` is not one per identifier or an index
/// is out of range (the churn limit must never be checked on a part of
/// the input).
pub fn sorted_fingerprints(
    by_id: &[u64],
    ids: usize,
    indices: impl Iterator<Item = usize>,
) -> Result<Vec<u64>, NodeError> {
    use rayon::prelude::*;
    let lost = || NodeError::Internal("churn fingerprints do not cover the input");
    if by_id.len() != ids {
        return Err(lost());
    }
    let mut out: Vec<u64> = indices
        .map(|k| by_id.get(k).copied())
        .collect::<Option<_>>()
        .ok_or_else(lost)?;
    out.par_sort_unstable();
    Ok(out)
}

/// A 32-byte key for one purpose (`label`), derived from the node key with
/// HMAC-SHA256; zeroized on drop.
pub fn derive(node_key: &[u8; 32], label: &[u8]) -> Zeroizing<[u8; 32]> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, node_key);
    let tag = ring::hmac::sign(&key, label);
    let mut out = Zeroizing::new([0u8; 32]);
    out.copy_from_slice(tag.as_ref().get(..32).unwrap_or(&[0u8; 32]));
    out
}

/// `|A Δ B|` of two sorted lists.
fn symmetric_difference(a: &[u64], b: &[u64]) -> u64 {
    let (mut i, mut j, mut n) = (0, 0, 0u64);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                n += 1;
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                n += 1;
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                i += 1;
                j += 1;
            }
        }
    }
    n + (a.len() - i) as u64 + (b.len() - j) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node key is made once and kept; fingerprints under it are
    /// keyed (another key gives others) and do not equal an unkeyed hash.
    #[test]
    fn the_node_key_is_kept_and_keys_the_fingerprints() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        let key = *s.node_key().unwrap();
        s.record_inputs("f", &[1, 2, 3], 3600).unwrap();
        assert_eq!(*s.node_key().unwrap(), key);
        drop(s);
        let mut s = State::open(dir.path()).unwrap();
        assert_eq!(*s.node_key().unwrap(), key);
        let other = *State::open(tempfile::tempdir().unwrap().path())
            .unwrap()
            .node_key()
            .unwrap();
        assert_ne!(key, other);
        let ids: Vec<&[u8]> = vec![b"phone:+447700900123", b"phone:+447700900124"];
        let mine = fingerprints(&key, &ids);
        assert_ne!(mine, fingerprints(&other, &ids));
        let unkeyed: Vec<u64> = {
            let mut v: Vec<u64> = ids
                .iter()
                .map(|id| {
                    let mut ctx = Context::new(&SHA256);
                    ctx.update(b"cleanroom-churn-v1");
                    ctx.update(id);
                    u64::from_le_bytes(ctx.finish().as_ref()[..8].try_into().unwrap())
                })
                .collect();
            v.sort_unstable();
            v
        };
        assert_ne!(mine, unkeyed);
        // The baseline written before the key existed stays (made with it).
        assert!(s.check_churn("f", &[1, 2, 3], 0).is_ok());
    }

    #[test]
    fn fingerprints_by_id_pick_the_same_sorted_set() {
        let key = [9u8; 32];
        let ids: Vec<Vec<u8>> = (0..300u32).map(|i| format!("id-{i}").into_bytes()).collect();
        let by_id = fingerprints_by_id(&key, &ids);
        // Aligned with the identifiers: each is the identifier's own HMAC.
        let one = |id: &[u8]| fingerprints(&key, &[id])[0];
        assert!(ids.iter().zip(&by_id).all(|(id, f)| one(id) == *f));
        let all: Vec<&[u8]> = ids.iter().map(Vec::as_slice).collect();
        assert_eq!(
            sorted_fingerprints(&by_id, 300, 0..ids.len()).unwrap(),
            fingerprints(&key, &all)
        );
        let odd: Vec<usize> = (1..300).step_by(2).collect();
        let some: Vec<&[u8]> = odd.iter().map(|k| ids[*k].as_slice()).collect();
        assert_eq!(
            sorted_fingerprints(&by_id, 300, odd.iter().copied()).unwrap(),
            fingerprints(&key, &some)
        );
        // Never a part of the input: an index past the end, or fingerprints
        // of another input's size, is an error.
        assert!(sorted_fingerprints(&by_id, 300, [0, 300].into_iter()).is_err());
        assert!(sorted_fingerprints(&by_id, 301, 0..300).is_err());
    }

    #[test]
    fn churn_limit_at_its_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        let ids: Vec<Vec<u8>> = (0..100u32).map(|i| i.to_le_bytes().to_vec()).collect();
        let key = s.node_key().unwrap();
        let fps = |ids: &[Vec<u8>]| fingerprints(&key, &ids.iter().map(Vec::as_slice).collect::<Vec<_>>());
        let base = fps(&ids);
        s.check_churn("f", &base, 100_000).unwrap(); // no baseline yet
        s.record_inputs("f", &base, 3600).unwrap();
        // 5 removed and 5 added: 10 of 100 changed = exactly 10%: allowed at 10%.
        let mut changed = ids.clone();
        changed.truncate(95);
        changed.extend((1000..1005u32).map(|i| i.to_le_bytes().to_vec()));
        let fp = fps(&changed);
        s.check_churn("f", &fp, 100_000).unwrap();
        // One more change is over the limit.
        changed.push(2000u32.to_le_bytes().to_vec());
        let fp = fps(&changed);
        let e = s.check_churn("f", &fp, 100_000).unwrap_err().to_string();
        assert!(
            e.contains("input churn limit: more than 10.0%")
                && e.contains("frees up")
                && !e.contains("11 of")
                && !e.contains("of 100"),
            "{e}"
        );
        // Another filter has its own baseline.
        s.check_churn("g", &fp, 100_000).unwrap();
    }

    #[test]
    fn runs_per_day_at_their_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        for q in 0..3u8 {
            assert_eq!(
                s.charge(&QueryId([q; 16]), "alice", "t", &[0; 32], "[]", 1, 1000, 30, 3)
                    .unwrap(),
                Charge::New
            );
        }
        assert_eq!(
            s.charge(&QueryId([9; 16]), "alice", "t", &[0; 32], "[]", 1, 1000, 30, 3)
                .unwrap(),
            Charge::TooManyRuns { limit: 3 }
        );
        // A retry of an existing id is not a new run.
        assert_eq!(
            s.charge(&QueryId([0; 16]), "alice", "t", &[0; 32], "[]", 1, 1000, 30, 3)
                .unwrap(),
            Charge::Existing(None)
        );
        // Another analyst has their own count.
        assert_eq!(
            s.charge(&QueryId([8; 16]), "bob", "t", &[0; 32], "[]", 1, 1000, 30, 3)
                .unwrap(),
            Charge::New
        );
    }

    /// The admission check answers what the charge would, and writes nothing.
    #[test]
    fn would_charge_answers_as_charge_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        let check = |s: &mut State, q: u8, rho: u64| {
            s.charge_or_check(&QueryId([q; 16]), "alice", "t", &[0; 32], "[]", rho, 1000, 30, 2, false)
                .unwrap()
        };
        assert_eq!(check(&mut s, 1, 600), Charge::New);
        assert_eq!(s.charge_count().unwrap(), 0);
        assert_eq!(check(&mut s, 1, 1001), Charge::OverBudget { spent: 0, limit: 1000 });
        s.charge(&QueryId([1; 16]), "alice", "t", &[0; 32], "[]", 600, 1000, 30, 2)
            .unwrap();
        assert_eq!(check(&mut s, 1, 600), Charge::Existing(None));
        assert_eq!(
            check(&mut s, 2, 600),
            Charge::OverBudget {
                spent: 600,
                limit: 1000
            }
        );
        assert_eq!(check(&mut s, 2, 400), Charge::New);
        s.charge(&QueryId([2; 16]), "alice", "t", &[0; 32], "[]", 400, 1000, 30, 2)
            .unwrap();
        assert_eq!(check(&mut s, 3, 0), Charge::TooManyRuns { limit: 2 });
        assert!(matches!(
            s.charge_or_check(&QueryId([1; 16]), "bob", "t", &[0; 32], "[]", 1, 1000, 30, 2, false),
            Err(NodeError::Refused(_))
        ));
        assert_eq!(s.charge_count().unwrap(), 2);
        assert!(s.noise_seed(&QueryId([3; 16])).is_err());
    }

    const BOUND: RunBinding = RunBinding {
        join: cleanroom_wire::SessionId([5; 16]),
        data_version: [6; 32],
    };

    /// A query's noise seed is drawn with its charge, stays the same across
    /// restarts and retries; a rerun must be over the join and data of the
    /// released share, and at most `max_reruns` times.
    #[test]
    fn a_charge_fixes_its_noise_seed_and_binds_its_reruns() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        let (q1, q2) = (QueryId([1u8; 16]), QueryId([2u8; 16]));
        s.charge(&q1, "alice", "t", &[0; 32], "[]", 1, 1000, 30, 100).unwrap();
        s.charge(&q2, "alice", "t", &[0; 32], "[]", 1, 1000, 30, 100).unwrap();
        let seed = *s.noise_seed(&q1).unwrap();
        assert_ne!(seed, *s.noise_seed(&q2).unwrap());
        assert!(matches!(
            s.noise_seed(&QueryId([9; 16])),
            Err(NodeError::State(StateError::Inconsistent(_)))
        ));
        // Not released yet: nothing to run again.
        assert!(matches!(s.may_rerun(&q1, &BOUND, 2), Err(NodeError::Refused(_))));
        s.store_share(&q1, b"first", &entry(&sha(b"first"), 1, "query"), &BOUND, false, 2)
            .unwrap();
        drop(s);
        let mut s = State::open(dir.path()).unwrap();
        assert_eq!(*s.noise_seed(&q1).unwrap(), seed);
        let other_join = RunBinding {
            join: cleanroom_wire::SessionId([7; 16]),
            ..BOUND
        };
        let other_data = RunBinding {
            data_version: [8; 32],
            ..BOUND
        };
        for wrong in [other_join, other_data] {
            assert!(matches!(s.may_rerun(&q1, &wrong, 2), Err(NodeError::Refused(_))));
            assert!(matches!(
                s.store_share(&q1, b"x", &entry(&sha(b"x"), 1, "query-rerun"), &wrong, true, 2),
                Err(NodeError::Refused(_))
            ));
        }
        for k in 0..2u8 {
            s.may_rerun(&q1, &BOUND, 2).unwrap();
            let share = [b'r', k];
            s.store_share(&q1, &share, &entry(&sha(&share), 1, "query-rerun"), &BOUND, true, 2)
                .unwrap();
        }
        let q = s.charged_query(&q1).unwrap().unwrap();
        assert_eq!((q.reruns, q.binding), (2, Some(BOUND)));
        // Over the cap: refused, and the stored share stays.
        assert!(matches!(s.may_rerun(&q1, &BOUND, 2), Err(NodeError::Refused(_))));
        assert!(matches!(
            s.store_share(&q1, b"r9", &entry(&sha(b"r9"), 1, "query-rerun"), &BOUND, true, 2),
            Err(NodeError::Refused(_))
        ));
        assert_eq!(
            s.charged_query(&q1).unwrap().unwrap().share.as_deref(),
            Some(&b"r\x01"[..])
        );
        assert_eq!(*s.noise_seed(&q1).unwrap(), seed);
        // Three audit entries: the release and its two reruns.
        assert_eq!(s.verify_audit().unwrap(), 3);
    }

    /// A ledger from before seeds were kept: an unreleased charge gets a
    /// seed when it first runs (and keeps it); a released one cannot run again.
    #[test]
    fn charges_from_before_noise_seeds() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        for q in [1u8, 2] {
            s.charge(&QueryId([q; 16]), "alice", "t", &[0; 32], "[]", 1, 1000, 30, 100)
                .unwrap();
        }
        s.store_share(
            &QueryId([2; 16]),
            b"old",
            &entry(&sha(b"old"), 1, "query"),
            &BOUND,
            false,
            2,
        )
        .unwrap();
        s.conn
            .execute_batch("UPDATE charges SET noise_seed = NULL, join_session = NULL, data_version = NULL")
            .unwrap();
        drop(s);
        let mut s = State::open(dir.path()).unwrap();
        let seed = *s.noise_seed(&QueryId([1; 16])).unwrap();
        assert_eq!(*s.noise_seed(&QueryId([1; 16])).unwrap(), seed);
        assert!(matches!(s.noise_seed(&QueryId([2; 16])), Err(NodeError::Refused(_))));
        assert!(matches!(
            s.may_rerun(&QueryId([2; 16]), &BOUND, 2),
            Err(NodeError::Refused(_))
        ));
    }

    fn sha(b: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, b).as_ref());
        out
    }

    /// The audit entry of alice's share with digest `d`, charged `rho`.
    fn entry<'a>(d: &'a [u8; 32], rho: u64, event: &'a str) -> AuditEntry<'a> {
        AuditEntry {
            event,
            analyst: "alice",
            template: "overlap",
            plan: &[1; 32],
            params: "",
            rho_micro: rho,
            result_digest: d,
        }
    }

    #[test]
    fn charges_are_once_per_query_and_within_budget() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        let q1 = QueryId([1u8; 16]);
        assert_eq!(
            s.charge(&q1, "alice", "t", &[0; 32], "[]", 400, 1000, 30, 100).unwrap(),
            Charge::New
        );
        assert_eq!(
            s.charge(&q1, "alice", "t", &[0; 32], "[]", 400, 1000, 30, 100).unwrap(),
            Charge::Existing(None)
        );
        assert!(matches!(
            s.charge(&q1, "bob", "t", &[0; 32], "[]", 400, 1000, 30, 100),
            Err(NodeError::Refused(_))
        ));
        assert_eq!(
            s.charge(&QueryId([2; 16]), "alice", "t", &[0; 32], "[]", 600, 1000, 30, 100)
                .unwrap(),
            Charge::New
        );
        // Exactly at the limit was allowed; one more millionth is not.
        assert_eq!(
            s.charge(&QueryId([3; 16]), "alice", "t", &[0; 32], "[]", 1, 1000, 30, 100)
                .unwrap(),
            Charge::OverBudget {
                spent: 1000,
                limit: 1000
            }
        );
        assert_eq!(s.spent("alice", 30).unwrap(), 1000);
        // An entry that does not describe the charge and the share is refused.
        for wrong in [
            entry(&sha(b"share"), 399, "query"),
            entry(&sha(b"other"), 400, "query"),
            entry(&sha(b"share"), 400, "query-rerun"),
        ] {
            assert!(s.store_share(&q1, b"share", &wrong, &BOUND, false, 2).is_err());
        }
        s.store_share(&q1, b"share", &entry(&sha(b"share"), 400, "query"), &BOUND, false, 2)
            .unwrap();
        assert!(
            s.store_share(&q1, b"again", &entry(&sha(b"again"), 400, "query"), &BOUND, false, 2)
                .is_err()
        );
        drop(s);
        // After a restart: the same share comes back, the budget is still spent.
        let mut s = State::open(dir.path()).unwrap();
        assert_eq!(
            s.charge(&q1, "alice", "t", &[0; 32], "[]", 400, 1000, 30, 100).unwrap(),
            Charge::Existing(Some(b"share".to_vec()))
        );
        assert_eq!(s.spent("alice", 30).unwrap(), 1000);
        assert_eq!(s.verify_audit().unwrap(), 1);
        // A rerun replaces a stored share (never a missing one), with its own
        // audit entry and no new charge.
        assert!(
            s.store_share(
                &cleanroom_wire::QueryId([2; 16]),
                b"rerun",
                &entry(&sha(b"rerun"), 600, "query-rerun"),
                &BOUND,
                true,
                2
            )
            .is_err()
        );
        s.store_share(
            &q1,
            b"rerun",
            &entry(&sha(b"rerun"), 400, "query-rerun"),
            &BOUND,
            true,
            2,
        )
        .unwrap();
        let q = s.charged_query(&q1).unwrap().unwrap();
        assert_eq!((q.analyst.as_str(), q.share.as_deref()), ("alice", Some(&b"rerun"[..])));
        assert_eq!(q.params.as_deref(), Some("[]"));
        assert_eq!(s.spent("alice", 30).unwrap(), 1000);
        assert_eq!(s.verify_audit().unwrap(), 2);
        assert!(s.charged_query(&QueryId([7; 16])).unwrap().is_none());
    }

    #[test]
    fn audit_log_is_append_only_and_chained() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        for q in 0..3u8 {
            s.charge(&QueryId([q; 16]), "alice", "t", &[0; 32], "[]", 1, 1000, 30, 100)
                .unwrap();
            s.store_share(
                &QueryId([q; 16]),
                b"x",
                &entry(&sha(b"x"), 1, "query"),
                &BOUND,
                false,
                2,
            )
            .unwrap();
        }
        assert_eq!(s.verify_audit().unwrap(), 3);
        assert!(s.conn.execute("DELETE FROM audit", []).is_err());
        assert!(s.conn.execute("UPDATE audit SET analyst = 'mallory'", []).is_err());
        // Tampering behind the triggers' back (dropping them) is caught by the chain.
        s.conn
            .execute_batch("DROP TRIGGER audit_append_only_update; UPDATE audit SET analyst = 'mallory' WHERE seq = 2;")
            .unwrap();
        let e = s.verify_audit().unwrap_err().to_string();
        assert!(e.contains("breaks at entry 2"), "{e}");
        drop(s);
        assert!(State::open(dir.path()).is_err());
    }

    /// Budget given back with a database tool (sqlite3) behind the node's
    /// back: each edit stops the node at its next start.
    #[test]
    fn a_ledger_edited_with_a_database_tool_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = State::open(dir.path()).unwrap();
            for (q, share) in [(1u8, &b"one"[..]), (2, b"two")] {
                s.charge(&QueryId([q; 16]), "alice", "t", &[0; 32], "[]", 300, 1000, 30, 100)
                    .unwrap();
                s.store_share(
                    &QueryId([q; 16]),
                    share,
                    &entry(&sha(share), 300, "query"),
                    &BOUND,
                    false,
                    2,
                )
                .unwrap();
            }
            s.store_share(
                &cleanroom_wire::QueryId([2; 16]),
                b"again",
                &entry(&sha(b"again"), 300, "query-rerun"),
                &BOUND,
                true,
                2,
            )
            .unwrap();
            // Charged, not yet released: no audit entry yet.
            s.charge(&QueryId([3; 16]), "alice", "t", &[0; 32], "[]", 300, 1000, 30, 100)
                .unwrap();
            s.charge_cardinality(&cleanroom_wire::SessionId([9; 16]), "all", 500_000, 1_000_000, 30)
                .unwrap();
        }
        let file = dir.path().join("state.db");
        for (edit, ok) in [
            ("SELECT 1", true),
            (
                "DELETE FROM charges WHERE query_id = X'01010101010101010101010101010101'",
                false,
            ),
            ("UPDATE charges SET rho_micro = 0 WHERE share IS NOT NULL", false),
            ("UPDATE charges SET share = NULL", false),
            (
                "UPDATE charges SET share = X'00' WHERE query_id = X'02020202020202020202020202020202'",
                false,
            ),
            ("DELETE FROM cardinality", false),
            ("UPDATE cardinality SET eps_micro = 1", false),
        ] {
            let copy = tempfile::tempdir().unwrap();
            std::fs::copy(&file, copy.path().join("state.db")).unwrap();
            let c = Connection::open(copy.path().join("state.db")).unwrap();
            c.execute_batch(edit).unwrap();
            drop(c);
            match State::open(copy.path()) {
                Ok(_) => assert!(ok, "{edit}: not detected"),
                Err(e) => {
                    assert!(!ok, "{edit}: {e}");
                    assert!(e.to_string().contains("does not match the audit log"), "{e}");
                }
            }
        }
    }

    #[test]
    fn a_corrupt_file_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("state.db"), vec![0x42u8; 8192]).unwrap();
        let e = State::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a usable state database"), "{e}");
    }

    #[test]
    fn a_set_of_shard_joins_is_charged_once_and_each_shard_joins_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        let spent = |s: &State| -> i64 {
            s.conn
                .query_row("SELECT SUM(eps_micro) FROM cardinality", [], |r| r.get(0))
                .unwrap()
        };
        let (a, b) = ([1u8; 16], [2u8; 16]);
        let split = ShardSplit {
            shards: 7,
            key_id: [5; 32],
            max_age_secs: 3600,
        };
        for shard in 0..7 {
            s.charge_shard_join(&split, &a, shard, 500_000, 1_000_000, 30).unwrap();
        }
        assert_eq!(spent(&s), 500_000);
        // A second look at a shard of the set is refused, and costs nothing.
        for shard in [0, 3, 6] {
            let e = s
                .charge_shard_join(&split, &a, shard, 500_000, 1_000_000, 30)
                .unwrap_err();
            assert!(e.to_string().contains("second join of the same shard"), "{e}");
        }
        assert_eq!(spent(&s), 500_000);
        // Another set is charged again: here up to the budget, then refused.
        s.charge_shard_join(&split, &b, 3, 500_000, 1_000_000, 30).unwrap();
        assert_eq!(spent(&s), 1_000_000);
        let e = s
            .charge_shard_join(&split, &[3u8; 16], 0, 1, 1_000_000, 30)
            .unwrap_err();
        assert!(
            matches!(e, NodeError::Refused(ref r) if r.code == cleanroom_wire::RefusalCode::BudgetExhausted),
            "{e}"
        );
        // Durable: the refusals hold after the state is opened again.
        drop(s);
        let mut s = State::open(dir.path()).unwrap();
        assert!(s.charge_shard_join(&split, &a, 5, 500_000, 1_000_000, 30).is_err());
        assert!(s.charge_shard_join(&split, &b, 3, 500_000, 1_000_000, 30).is_err());
        assert_eq!(spent(&s), 1_000_000);
        // The same set id under another split is another set: charged anew
        // (here over the budget, so refused), never joined for free.
        for other in [
            ShardSplit { shards: 8, ..split },
            ShardSplit {
                key_id: [6; 32],
                ..split
            },
        ] {
            let e = s.charge_shard_join(&other, &a, 5, 500_000, 1_000_000, 30).unwrap_err();
            assert!(e.to_string().contains("budget"), "{e}");
        }
        // A set is over once older than a join lives.
        let fresh_dir = tempfile::tempdir().unwrap();
        let mut fresh = State::open(fresh_dir.path()).unwrap();
        let short = ShardSplit {
            max_age_secs: -1,
            ..split
        };
        fresh.charge_shard_join(&short, &a, 0, 500_000, 1_000_000, 30).unwrap();
        let e = fresh
            .charge_shard_join(&short, &a, 1, 500_000, 1_000_000, 30)
            .unwrap_err();
        assert!(e.to_string().contains("is over"), "{e}");
    }

    #[test]
    fn cardinality_budget_and_joins() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::open(dir.path()).unwrap();
        s.charge_cardinality(&cleanroom_wire::SessionId([1; 16]), "all", 500_000, 1_000_000, 30)
            .unwrap();
        s.charge_cardinality(&cleanroom_wire::SessionId([2; 16]), "all", 500_000, 1_000_000, 30)
            .unwrap();
        assert!(matches!(
            s.charge_cardinality(&cleanroom_wire::SessionId([3; 16]), "all", 1, 1_000_000, 30),
            Err(NodeError::Refused(_))
        ));
        let v = [9u8; 32];
        s.put_join(&cleanroom_wire::SessionId([1; 16]), "all", &v, 3600, b"payload")
            .unwrap();
        assert_eq!(
            s.join_for_filter("all", &v).unwrap(),
            Some((cleanroom_wire::SessionId([1; 16]), b"payload".to_vec()))
        );
        assert_eq!(
            s.join_by_session(&cleanroom_wire::SessionId([1; 16]), &v).unwrap(),
            Some(b"payload".to_vec())
        );
        assert_eq!(
            s.join_by_session(&cleanroom_wire::SessionId([1; 16]), &[8; 32])
                .unwrap(),
            None
        );
        assert_eq!(s.expire_joins(&[8; 32]).unwrap(), 1);
        assert_eq!(s.join_for_filter("all", &v).unwrap(), None);
    }
}
