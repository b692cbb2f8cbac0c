#![forbid(unsafe_code)]
//! The analyst's client: connect to both nodes with the analyst
//! certificate, ask both to admit a query, submit the same query id to
//! each, reconstruct the cells from the two noisy shares, and report each
//! with its noise and a 95% interval.
//!
//! An analyst's program depends on this crate alone (with `cleanroom-wire`
//! for the messages, `cleanroom-transport` for QUIC with mutual TLS and
//! `cleanroom-query` to match ad hoc SQL to a signed template): no SQLite,
//! CSV, curve arithmetic or protocol machines. Errors are typed
//! ([`ClientError`]); a refusal carries its code on the wire
//! ([`RefusalCode`]), which programs match on rather than on the message.

use std::net::SocketAddr;
use std::time::Duration;

pub use cleanroom_transport::Role;
use cleanroom_transport::{
    Identity, TransportError, TransportSettings, client_endpoint, connect, pki, read_frame, write_frame,
};
use cleanroom_wire::{
    AnalystRequest, AnalystResponse, BudgetInfo, MAX_MESSAGE_LEN, Message, QueryId, QueryRequest, QueryShare,
    TemplateInfo, signed_in_bits,
};
pub use cleanroom_wire::{Phase, Refusal, RefusalCode};
use serde::Serialize;

pub mod config;

use config::AnalystConfig;

/// What went wrong for the analyst. Messages never carry an identifier, a
/// value or a share.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The analyst's configuration file is unusable.
    #[error("config {path}: {what}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The configuration lists no node of this role.
    #[error("the analyst config lists no {0} node")]
    MissingNode(Role),
    /// The analyst's certificate, key or CA could not be loaded, or its
    /// endpoint not made.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// A node could not be reached, or did not answer as asked.
    #[error("{role} node at {address}: {problem}")]
    Node {
        /// Which node.
        role: Role,
        /// Where the analyst looked for it.
        address: SocketAddr,
        /// What happened.
        problem: NodeProblem,
    },
    /// A node (or both) refused: the code, and each refusing node's message.
    #[error("refused: {0}")]
    Refused(Refusal),
    /// The two nodes' shares do not belong together.
    #[error("{0}")]
    Shares(#[from] SharesMismatch),
    /// The OS random generator failed (a new query id).
    #[error("the OS random generator failed")]
    Random,
}

impl ClientError {
    /// The refusal's code, if this is a refusal.
    pub fn refusal_code(&self) -> Option<RefusalCode> {
        match self {
            Self::Refused(r) => Some(r.code),
            _ => None,
        }
    }

    fn refused(code: RefusalCode, message: impl Into<String>) -> Self {
        Self::Refused(Refusal::new(code, message))
    }
}

/// How talking to one node failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeProblem {
    /// No connection (the transport's reason).
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The connection or stream failed, or ended before the answer.
    #[error("{0} (if this persists, check that this analyst's certificate is accepted by the node)")]
    Stream(String),
    /// No answer within the wait.
    #[error("no answer within {0} s (if this persists, check that this analyst's certificate is accepted by the node)")]
    NoAnswer(u64),
    /// A frame that is not an analyst response.
    #[error("answered with something other than an analyst response")]
    NotAResponse,
    /// An analyst response of another kind than the request asks for.
    #[error("answered out of turn")]
    OutOfTurn,
}

/// Why two shares cannot be added up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SharesMismatch {
    /// Not one share from each node.
    #[error("expected one share from each node")]
    Count,
    /// The nodes computed different plans (their templates differ).
    #[error("the two nodes computed different plans; their templates differ")]
    Plans,
    /// The shares come from different runs of the query.
    #[error(
        "the two nodes' shares come from different runs of this query (a node restarted while it ran); ask again with the same query id"
    )]
    Runs,
    /// The shares have different widths.
    #[error("the shares have different widths")]
    Widths,
}

/// One reconstructed cell.
#[derive(Clone, Debug, Serialize)]
pub struct CellResult {
    /// Name.
    pub name: String,
    /// `count`, `cents`, or `ratio` (an AVG: cents per row).
    pub unit: String,
    /// The noisy value, in the cell's unit (count, cents...).
    pub value: f64,
    /// The noise's standard deviation (both nodes' noise together).
    pub sigma: f64,
    /// 95% interval: value ± 1.96 sigma.
    pub low: f64,
    /// Upper end.
    pub high: f64,
    /// Why the cell is not shown, if it is suppressed.
    pub suppressed: Option<String>,
}

/// A query's result as the analyst sees it.
#[derive(Clone, Debug, Serialize)]
pub struct QueryResult {
    /// The query id (hex).
    pub query_id: String,
    /// Template.
    pub template: String,
    /// Cells.
    pub cells: Vec<CellResult>,
    /// The larger of the two nodes' minimum counts.
    pub min_count: u64,
    /// ρ charged by each node.
    pub rho: Vec<(String, String)>,
    /// Seconds per phase per node (node, phase, seconds), when the nodes
    /// report them.
    pub timings: Vec<(String, Phase, f64)>,
    /// Whether both shares were stored ones returned for a retried id.
    pub replayed: bool,
}

/// A connected analyst.
#[derive(Debug)]
pub struct Analyst {
    name: String,
    endpoint: quinn::Endpoint,
    bank: SocketAddr,
    platform: SocketAddr,
}

impl Analyst {
    /// Loads the analyst's certificate and prepares an endpoint.
    ///
    /// # Errors
    /// [`ClientError::Transport`] for the certificate, key or CA;
    /// [`ClientError::MissingNode`].
    pub fn new(cfg: &AnalystConfig) -> Result<Self, ClientError> {
        let address = |r: Role| {
            cfg.nodes
                .iter()
                .find(|n| n.role == r)
                .map(|n| n.address)
                .ok_or(ClientError::MissingNode(r))
        };
        let (bank, platform) = (address(Role::Bank)?, address(Role::Platform)?);
        let identity = Identity::load(&cfg.identity.cert, &cfg.identity.key)?;
        let ca = cfg.identity.trust_anchors()?;
        let endpoint = client_endpoint(&identity, &ca, &TransportSettings::default())?;
        Ok(Self {
            name: cfg.name.clone(),
            endpoint,
            bank,
            platform,
        })
    }

    fn address(&self, role: Role) -> SocketAddr {
        match role {
            Role::Bank => self.bank,
            Role::Platform => self.platform,
        }
    }

    fn node_error(&self, role: Role, problem: NodeProblem) -> ClientError {
        ClientError::Node {
            role,
            address: self.address(role),
            problem,
        }
    }

    /// The analyst's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Closes every connection of this analyst and waits (at most 2 s) until
    /// the nodes have been told, so each node frees the connection at once
    /// instead of at its idle timeout. A process should call this before it
    /// exits: otherwise its last connections stay counted against
    /// `max_connections_per_analyst` for 30 s.
    pub async fn close(&self) {
        self.endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    async fn ask(&self, role: Role, req: AnalystRequest, timeout: Duration) -> Result<AnalystResponse, ClientError> {
        let what = |p: NodeProblem| self.node_error(role, p);
        // A node under a burst of handshakes refuses new connections for a
        // moment: try again a few times before giving up.
        let mut attempt = 0u64;
        let conn = loop {
            match connect(&self.endpoint, self.address(role), &pki::node_name(role.as_str())).await {
                Ok(c) => break c,
                Err(TransportError::Connection(quinn::ConnectionError::ConnectionClosed(c)))
                    if c.error_code == quinn::TransportErrorCode::CONNECTION_REFUSED && attempt < 4 =>
                {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
                }
                Err(e) => return Err(what(NodeProblem::Connect(e.to_string()))),
            }
        };
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| what(NodeProblem::Stream(e.to_string())))?;
        let request = Message::AnalystRequest(req)
            .encode()
            .map_err(|e| what(NodeProblem::Stream(format!("encoding the request: {e}"))))?;
        write_frame(&mut send, request, MAX_MESSAGE_LEN)
            .await
            .map_err(|e| what(NodeProblem::Stream(e.to_string())))?;
        let _ = send.finish();
        let frame = match tokio::time::timeout(timeout, read_frame(&mut recv, MAX_MESSAGE_LEN)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) => return Err(what(NodeProblem::Stream("the stream ended".into()))),
            Ok(Err(e)) => return Err(what(NodeProblem::Stream(e.to_string()))),
            Err(_) => return Err(what(NodeProblem::NoAnswer(timeout.as_secs()))),
        };
        conn.close(0u32.into(), b"done");
        match Message::decode(&frame) {
            Ok(Message::AnalystResponse(r)) => Ok(r),
            _ => Err(what(NodeProblem::NotAResponse)),
        }
    }

    async fn ask_both(
        &self,
        req: AnalystRequest,
        timeout: Duration,
    ) -> Vec<(Role, Result<AnalystResponse, ClientError>)> {
        self.ask_both_until(req, timeout, true).await
    }

    /// [`Analyst::ask_both`]; with `stop_at_refusal` false it waits for both
    /// answers even when one node refuses.
    async fn ask_both_until(
        &self,
        req: AnalystRequest,
        timeout: Duration,
        stop_at_refusal: bool,
    ) -> Vec<(Role, Result<AnalystResponse, ClientError>)> {
        // Both at once; if one node refuses, answer at once rather than wait
        // for the other (which then times out on its own).
        let fb = self.ask(Role::Bank, req.clone(), timeout);
        let fp = self.ask(Role::Platform, req, timeout);
        tokio::pin!(fb, fp);
        let refused = |r: &Result<AnalystResponse, ClientError>| {
            stop_at_refusal && matches!(r, Ok(AnalystResponse::Refused(_)) | Err(_))
        };
        let (mut b, mut p) = (None, None);
        while b.is_none() || p.is_none() {
            tokio::select! {
                r = &mut fb, if b.is_none() => {
                    if refused(&r) && p.is_none() {
                        return vec![(Role::Bank, r)];
                    }
                    b = Some(r);
                }
                r = &mut fp, if p.is_none() => {
                    if refused(&r) && b.is_none() {
                        return vec![(Role::Platform, r)];
                    }
                    p = Some(r);
                }
            }
        }
        // Both are set when the loop ends.
        b.map(|b| (Role::Bank, b))
            .into_iter()
            .chain(p.map(|p| (Role::Platform, p)))
            .collect()
    }

    /// Templates runnable by this analyst: those both nodes offer with the
    /// same kind, ρ and parameters.
    ///
    /// # Errors
    /// A node's refusal or a transport error.
    pub async fn templates(&self) -> Result<Vec<(TemplateInfo, TemplateInfo)>, ClientError> {
        let answers = self.ask_both(AnalystRequest::Templates, Duration::from_secs(30)).await;
        let mut lists = Vec::new();
        for (role, a) in answers {
            match a? {
                AnalystResponse::Templates(t) => lists.push((role, t)),
                AnalystResponse::Refused(m) => {
                    return Err(ClientError::refused(
                        m.code,
                        format!("{}: {}", role.as_str(), m.message),
                    ));
                }
                _ => return Err(self.node_error(role, NodeProblem::OutOfTurn)),
            }
        }
        let bank = lists
            .iter()
            .find(|(r, _)| *r == Role::Bank)
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        let platform = lists
            .iter()
            .find(|(r, _)| *r == Role::Platform)
            .map(|(_, t)| t.clone())
            .unwrap_or_default();
        Ok(bank
            .into_iter()
            .filter_map(|b| {
                platform
                    .iter()
                    .find(|p| p.name == b.name && p.kind == b.kind)
                    .map(|p| (b, p.clone()))
            })
            .collect())
    }

    /// This analyst's budget on each node.
    ///
    /// # Errors
    /// A node's refusal or a transport error.
    pub async fn budget(&self) -> Result<Vec<BudgetInfo>, ClientError> {
        let mut out = Vec::new();
        for (role, a) in self.ask_both(AnalystRequest::Budget, Duration::from_secs(30)).await {
            match a? {
                AnalystResponse::Budget(b) => out.push(b),
                AnalystResponse::Refused(m) => {
                    return Err(ClientError::refused(
                        m.code,
                        format!("{}: {}", role.as_str(), m.message),
                    ));
                }
                _ => return Err(self.node_error(role, NodeProblem::OutOfTurn)),
            }
        }
        Ok(out)
    }

    /// Runs a template on both nodes under `query_id` and reconstructs the result.
    ///
    /// # Errors
    /// [`ClientError::Refused`] with each node's message when either
    /// refuses (or cannot be reached); [`ClientError::Shares`].
    pub async fn query(
        &self,
        template: &str,
        params: &[(String, String)],
        query_id: QueryId,
        timeout: Duration,
    ) -> Result<QueryResult, ClientError> {
        let request = QueryRequest {
            query_id,
            template: template.to_string(),
            params: params.to_vec(),
        };
        // Every admission check of both nodes before either charges: a
        // query one node would refuse is sent to neither.
        self.admit_both(&request, timeout).await?;
        let req = AnalystRequest::Query(request);
        // Shares of different runs: a node restarted while the query ran,
        // and the two ran its aggregate again; the node that answered from
        // its old run is storing the new share. Ask again, a few times.
        let mut attempt = 0u64;
        loop {
            let mut shares = Vec::new();
            let mut refusals = Vec::new();
            let answers = self.ask_both(req.clone(), timeout).await;
            // One node refused at once: the other may have accepted (and
            // charged) the query id and be waiting for, or queued behind,
            // its peer; let it go now rather than at its timeout.
            if let [(refusing, Ok(AnalystResponse::Refused(_)) | Err(_))] = &answers[..] {
                self.cancel_at(refusing.peer(), query_id).await;
            }
            for (role, a) in answers {
                match a.map(AnalystResponse::into_share) {
                    Ok(Ok(s)) => shares.push(s),
                    Ok(Err(other)) => refusals.push(refusal_of(role, Ok(other))),
                    Err(e) => refusals.push(refusal_of(role, Err(e))),
                }
            }
            if !refusals.is_empty() {
                return Err(joined(refusals));
            }
            if shares.len() != 2 {
                return Err(SharesMismatch::Count.into());
            }
            let same_run = matches!(&shares[..], [a, b] if a.run == b.run);
            if same_run || attempt >= RUN_RETRIES {
                return reconstruct(template, query_id, &shares);
            }
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(250 * attempt)).await;
        }
    }
}

/// One node's answer that is not what was asked for, as a refusal naming
/// the node: its own refusal's code, `Failed` for a transport error or an
/// answer out of turn.
fn refusal_of(role: Role, answer: Result<AnalystResponse, ClientError>) -> Refusal {
    match answer {
        Ok(AnalystResponse::Refused(r)) => Refusal::new(r.code, format!("{} node: {}", role.as_str(), r.message)),
        Ok(_) => Refusal::new(
            RefusalCode::Failed,
            format!("{} node answered out of turn", role.as_str()),
        ),
        Err(ClientError::Refused(r)) => Refusal::new(r.code, format!("{} node: {}", role.as_str(), r.message)),
        Err(e) => Refusal::new(RefusalCode::Failed, e.to_string()),
    }
}

/// The nodes' refusals as one: the first's code (a node's own refusal
/// before a transport failure), every message.
fn joined(mut refusals: Vec<Refusal>) -> ClientError {
    refusals.sort_by_key(|r| r.code == RefusalCode::Failed);
    let code = refusals.first().map_or(RefusalCode::Failed, |r| r.code);
    let message = refusals
        .iter()
        .map(|r| r.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    ClientError::refused(code, message)
}

impl Analyst {
    /// Asks both nodes whether they would run `request` now
    /// (`AnalystRequest::Admit`); each holds its admission for the query.
    /// If either refuses, the other's admission is dropped and nothing was
    /// charged anywhere.
    async fn admit_both(&self, request: &QueryRequest, timeout: Duration) -> Result<(), ClientError> {
        // Both answers, so that a node's admission is cancelled only after
        // it was made.
        let answers = self
            .ask_both_until(AnalystRequest::Admit(request.clone()), timeout, false)
            .await;
        let mut refusals = Vec::new();
        let mut admitted = Vec::new();
        for (role, a) in answers {
            match a {
                Ok(AnalystResponse::Admitted) => admitted.push(role),
                other => refusals.push(refusal_of(role, other)),
            }
        }
        if refusals.is_empty() && admitted.len() == 2 {
            return Ok(());
        }
        // A node that admitted frees its slot now rather than when the
        // admission expires.
        for role in admitted {
            self.cancel_at(role, request.query_id).await;
        }
        if refusals.is_empty() {
            refusals.push(Refusal::new(RefusalCode::Failed, "a node did not answer"));
        }
        Err(joined(refusals))
    }

    /// Tells the `role` node to drop what it holds or runs for `query_id`.
    async fn cancel_at(&self, role: Role, query_id: QueryId) {
        let _ = self
            .ask(role, AnalystRequest::Cancel(query_id), Duration::from_secs(5))
            .await;
    }
}

impl Analyst {
    /// Runs an ad hoc query: it must be an instance of a template both
    /// operators signed (the same text, with literals where the template
    /// has parameters); it then runs as that template with those parameters.
    ///
    /// # Errors
    /// [`ClientError::Refused`] when no signed template matches, or a node refuses.
    pub async fn query_sql(
        &self,
        sql: &str,
        query_id: QueryId,
        timeout: Duration,
    ) -> Result<(String, QueryResult), ClientError> {
        let templates = self.templates().await?;
        for (bank, platform) in &templates {
            if bank.kind != platform.kind {
                continue;
            }
            if let Some(params) = cleanroom_query::sql::match_instance(&bank.kind, sql) {
                let r = self.query(&bank.name, &params, query_id, timeout).await?;
                return Ok((bank.name.clone(), r));
            }
        }
        Err(ClientError::refused(
            RefusalCode::UnknownTemplate,
            "this query is not an instance of any template both operators signed; `cleanroom templates` lists them (use the same text, with literal values where a template has :parameters)",
        ))
    }
}

/// Reconstructs cells from the two nodes' shares.
///
/// # Errors
/// [`ClientError::Shares`] when the shares do not belong together.
pub fn reconstruct(template: &str, query_id: QueryId, shares: &[QueryShare]) -> Result<QueryResult, ClientError> {
    let [a, b] = shares else {
        return Err(SharesMismatch::Count.into());
    };
    if a.plan != b.plan || a.cells != b.cells || a.weights != b.weights || a.bits != b.bits || a.query_id != b.query_id
    {
        return Err(SharesMismatch::Plans.into());
    }
    if a.run != b.run {
        return Err(SharesMismatch::Runs.into());
    }
    let n = a.cells.len();
    let lens = [
        &a.bits.len(),
        &a.weights.len(),
        &a.words.len(),
        &b.words.len(),
        &a.sigmas.len(),
        &b.sigmas.len(),
    ];
    if lens.iter().any(|l| **l != n) || a.bits.iter().any(|b| *b == 0 || *b > 64) {
        return Err(SharesMismatch::Widths.into());
    }
    // Additive shares mod 2^bits; a cell's sum is a signed bits-bit number
    // (noise can take it below zero).
    let words: Vec<i64> = a
        .words
        .iter()
        .zip(&b.words)
        .zip(&a.bits)
        .map(|((x, y), bits)| signed_in_bits(x.wrapping_add(*y), *bits))
        .collect();
    let min_count = a.min_count.max(b.min_count);
    #[allow(clippy::cast_precision_loss)]
    let values: Vec<f64> = words
        .iter()
        .zip(&a.weights)
        .map(|(w, k)| *w as f64 / (*k).max(1) as f64)
        .collect();
    let mut cells = Vec::with_capacity(values.len());
    for (i, name) in a.cells.iter().enumerate() {
        let value = values.get(i).copied().unwrap_or(0.0);
        let (sa, sb) = (
            a.sigmas.get(i).copied().unwrap_or(0.0),
            b.sigmas.get(i).copied().unwrap_or(0.0),
        );
        let sigma = (sa * sa + sb * sb).sqrt();
        let count_cell = a.count_cells.get(i).copied().unwrap_or(0) as usize;
        let count = values.get(count_cell).copied().unwrap_or(0.0);
        let suppressed =
            (count < min_count as f64).then(|| format!("noisy count {count:.2} is below the minimum of {min_count}"));
        cells.push(CellResult {
            name: name.clone(),
            unit: a.units.get(i).cloned().unwrap_or_else(|| "count".into()),
            value,
            sigma,
            low: value - 1.96 * sigma,
            high: value + 1.96 * sigma,
            suppressed,
        });
    }
    // AVG: the ratio of two noisy cells, with a first-order (delta-method)
    // standard deviation; suppressed with its count cell.
    for (name, num, den) in &a.ratios {
        let (Some(n), Some(d)) = (cells.get(*num as usize), cells.get(*den as usize)) else {
            continue;
        };
        let suppressed = n
            .suppressed
            .clone()
            .or_else(|| (d.value < 1.0).then(|| "no rows".to_string()));
        let r = if d.value.abs() < 1e-9 { 0.0 } else { n.value / d.value };
        let sigma = if d.value.abs() < 1e-9 {
            f64::INFINITY
        } else {
            (n.sigma * n.sigma + r * r * d.sigma * d.sigma).sqrt() / d.value.abs()
        };
        cells.push(CellResult {
            name: name.clone(),
            unit: "ratio".into(),
            value: r,
            sigma,
            low: r - 1.96 * sigma,
            high: r + 1.96 * sigma,
            suppressed,
        });
    }
    let mut timings = Vec::new();
    for s in [a, b] {
        for (phase, secs) in &s.timings {
            timings.push((s.node.clone(), phase.clone(), *secs));
        }
    }
    Ok(QueryResult {
        query_id: query_id.0.iter().map(|x| format!("{x:02x}")).collect(),
        template: template.to_string(),
        cells,
        min_count,
        rho: vec![(a.node.clone(), a.rho.clone()), (b.node.clone(), b.rho.clone())],
        timings,
        replayed: a.replayed && b.replayed,
    })
}

/// How often [`Analyst::query`] asks again when the two shares come from
/// different runs (about 4 s in all).
const RUN_RETRIES: u64 = 5;

/// Parses a query id given as 32 hex digits.
///
/// # Errors
/// A message naming the expected form.
pub fn parse_query_id(s: &str) -> Result<QueryId, String> {
    let bad = || format!("{s:?} is not a query id (32 hex digits)");
    if s.len() != 32 {
        return Err(bad());
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
    }
    Ok(QueryId(out))
}

/// A fresh random query id.
///
/// # Errors
/// [`ClientError::Random`] when the OS generator fails.
pub fn new_query_id() -> Result<QueryId, ClientError> {
    use ring::rand::SecureRandom;
    let mut id = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut id)
        .map_err(|_| ClientError::Random)?;
    Ok(QueryId(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(node: &str, word: u64) -> QueryShare {
        QueryShare {
            node: node.into(),
            query_id: QueryId([1; 16]),
            plan: [2; 32],
            cells: vec!["customers".into()],
            bits: vec![64],
            weights: vec![100],
            count_cells: vec![0],
            units: vec!["count".into()],
            ratios: vec![],
            words: vec![word],
            sigmas: vec![0.01],
            min_count: 20,
            rho: "0.1".into(),
            timings: vec![],
            replayed: false,
            run: cleanroom_wire::RunId([3; 16]),
        }
    }

    /// A suppressed cell says what was compared: 19.68 against 20, not a
    /// count rounded to the minimum ("noisy count 20 is below ... 20").
    #[test]
    fn a_suppressed_cell_names_the_noisy_count_it_compared() {
        let shares = [share("bank", 1000u64.wrapping_sub(32)), share("platform", 1000)];
        let r = reconstruct("t", QueryId([1; 16]), &shares).unwrap();
        assert!((r.cells[0].value - 19.68).abs() < 1e-9);
        assert_eq!(
            r.cells[0].suppressed.as_deref(),
            Some("noisy count 19.68 is below the minimum of 20")
        );
        let shares = [share("bank", 1000), share("platform", 1000)];
        assert_eq!(
            reconstruct("t", QueryId([1; 16]), &shares).unwrap().cells[0].suppressed,
            None
        );
    }

    /// Shares that do not belong together are refused with what is wrong,
    /// as a type, before anything is added up.
    #[test]
    fn shares_that_do_not_belong_together_are_told_apart() {
        let q = QueryId([1; 16]);
        let ok = [share("bank", 5), share("platform", 7)];
        assert!(reconstruct("t", q, &ok).is_ok());
        let one = [share("bank", 5)];
        assert!(matches!(
            reconstruct("t", q, &one),
            Err(ClientError::Shares(SharesMismatch::Count))
        ));
        let mut other_run = share("platform", 7);
        other_run.run = cleanroom_wire::RunId([4; 16]);
        assert!(matches!(
            reconstruct("t", q, &[share("bank", 5), other_run]),
            Err(ClientError::Shares(SharesMismatch::Runs))
        ));
        let mut other_plan = share("platform", 7);
        other_plan.plan = [9; 32];
        assert!(matches!(
            reconstruct("t", q, &[share("bank", 5), other_plan]),
            Err(ClientError::Shares(SharesMismatch::Plans))
        ));
        let mut wider = share("platform", 7);
        wider.words.push(1);
        assert!(matches!(
            reconstruct("t", q, &[share("bank", 5), wider]),
            Err(ClientError::Shares(SharesMismatch::Widths))
        ));
        // Words add mod 2^64 and read as signed: a negative noisy count.
        let r = reconstruct("t", q, &[share("bank", u64::MAX - 99), share("platform", 0)]).unwrap();
        assert!((r.cells[0].value - (-1.0)).abs() < 1e-12);
        let mut other_bits = share("platform", 7);
        other_bits.bits = vec![20];
        assert!(matches!(
            reconstruct("t", q, &[share("bank", 5), other_bits]),
            Err(ClientError::Shares(SharesMismatch::Plans))
        ));
        let (mut a, mut b) = (share("bank", 5), share("platform", 7));
        a.bits = vec![0];
        b.bits = vec![0];
        assert!(matches!(
            reconstruct("t", q, &[a, b]),
            Err(ClientError::Shares(SharesMismatch::Widths))
        ));
    }

    /// Narrow shares add up mod 2^bits and read as `bits`-bit signed
    /// numbers: bits above the ring never reach the value.
    #[test]
    fn narrow_shares_add_up_in_their_ring() {
        let narrow = |node: &str, word: u64| {
            let mut s = share(node, word);
            s.bits = vec![20];
            s.weights = vec![1];
            s
        };
        let q = QueryId([1; 16]);
        // 1,000 = 0xF_FC18 + 0x7D0 mod 2^20 (the sum carries into bit 20).
        let r = reconstruct("t", q, &[narrow("bank", 0xF_FC18), narrow("platform", 0x7D0)]).unwrap();
        assert!((r.cells[0].value - 1000.0).abs() < 1e-12, "{}", r.cells[0].value);
        // -3 = 0xF_FFFD mod 2^20.
        let r = reconstruct("t", q, &[narrow("bank", 0xF_FFFC), narrow("platform", 1)]).unwrap();
        assert!((r.cells[0].value - (-3.0)).abs() < 1e-12);
    }

    /// A share in the format before narrow shares (a stored one a node
    /// replays) converts with 64-bit cells, its weights, and σ per cell.
    #[test]
    fn a_legacy_share_reads_as_before() {
        let legacy = cleanroom_wire::LegacyQueryShare {
            node: "bank".into(),
            query_id: QueryId([1; 16]),
            plan: [2; 32],
            cells: vec!["customers".into()],
            weights: vec![100],
            count_cells: vec![0],
            units: vec!["count".into()],
            ratios: vec![],
            words: vec![2500u64.wrapping_neg()],
            sigma: 3.0,
            min_count: 20,
            rho: "0.1".into(),
            timings: vec![],
            replayed: false,
            run: cleanroom_wire::RunId([3; 16]),
        };
        let mut other = legacy.clone();
        other.node = "platform".into();
        other.words = vec![10_000];
        other.sigma = 4.0;
        let shares = [QueryShare::from(legacy), QueryShare::from(other)];
        assert_eq!(shares[0].bits, vec![64]);
        let r = reconstruct("t", QueryId([1; 16]), &shares).unwrap();
        assert!((r.cells[0].value - 75.0).abs() < 1e-12);
        assert!((r.cells[0].sigma - 0.05).abs() < 1e-12, "sqrt(3² + 4²) / 100");
    }
}
