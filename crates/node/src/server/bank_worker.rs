//! The bank's workers (issue 16, docs/protocol.md "Workers"): a sharded
//! bank node as a coordinator and `N` worker processes. Bank worker `w`
//! serves the platform's shard joins and aggregate batches of the shards
//! `s` with `s mod N = w` (from platform worker `w`, under its own
//! certificate), over its own copy of those shards' customers; what is per
//! query stays with the coordinator, which the worker asks over QUIC with
//! mutual TLS:
//!
//! - `WorkerCharge` before a shard join's accept leaves: the coordinator
//!   charges the set of shard joins (`charge_shard_join`, durable) and
//!   answers `WorkerDone`, or refuses;
//! - `WorkerClaim` when a batch arrives: the coordinator runs what the
//!   one-process bank runs (a rerun for a platform that lost its share,
//!   the claim of the analyst's registration, the batch's place) and
//!   answers `WorkerClaimed` with what the worker binds the plan from;
//!   then, on the same stream, `WorkerBatchShare` with the batch's outcome
//!   (its words), which the coordinator adds to the query's registration
//!   as the one-process bank does, answered `WorkerDone`.
//!
//! A claim lives as long as its stream: a stream that ends (or does not
//! bring the outcome within the query timeout) before its outcome fails
//! the batch, as a platform that leaves mid-batch fails it on the
//! one-process bank. A worker that dies is noticed when its connection
//! times out (the transport's idle timeout, 30 s by default).

use super::bank::{Bank, ShardPlace};
use super::worker::{WorkerRole, seconds, truncated};
use super::*;
use cleanroom_wire::{ShareWords, WorkerBatchShare, WorkerClaim, WorkerClaimed, WorkerFailed, WorkerOutcome};

/// A bank worker's way to its coordinator.
pub(super) struct CoordinatorLink {
    address: crate::config::HostPort,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
}

/// What the coordinator answered: its message, or its refusal (the abort
/// code to give the platform, and why).
type Answer = Result<Message, (AbortCode, String)>;

impl CoordinatorLink {
    pub(super) fn new(address: crate::config::HostPort) -> Self {
        Self {
            address,
            conn: tokio::sync::Mutex::new(None),
        }
    }

    async fn connection(&self, endpoint: &quinn::Endpoint) -> Result<quinn::Connection, NodeError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let conn = connect(endpoint, self.address.resolve().await?, &pki::node_name("bank")).await?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// One request and its answer, within `wait`.
    async fn ask(&self, endpoint: &quinn::Endpoint, request: &Message, wait: Duration) -> Result<Answer, NodeError> {
        let conn = self.connection(endpoint).await?;
        let (mut send, mut recv) = tokio::time::timeout(wait, conn.open_bi())
            .await
            .map_err(|_| PeerError::NoAnswer { secs: wait.as_secs() })?
            .map_err(|e| PeerError::Transport(e.to_string()))?;
        write_one(&mut send, request).await?;
        let _ = send.finish();
        let frame = read_one(&mut recv, wait).await?;
        match Message::decode(&frame).map_err(|e| NodeError::Protocol(e.into()))? {
            Message::WorkerFailed(WorkerFailed { abort, message }) => {
                Ok(Err((abort.unwrap_or(AbortCode::Internal), message)))
            }
            m => Ok(Ok(m)),
        }
    }
}

impl Bank {
    /// The coordinator: a connection of its bank worker `w`; each stream
    /// one request (a claim: its claim and the batch's outcome).
    pub(super) async fn serve_bank_worker(&self, conn: quinn::Connection, w: u32) {
        info!(worker = w, "bank worker connected");
        while let Ok((send, recv)) = conn.accept_bi().await {
            let bank = self.clone();
            tokio::spawn(async move {
                if let Err(e) = bank.serve_bank_worker_stream(w, send, recv).await {
                    warn!(worker = w, error = %e, "a bank worker's request failed");
                }
            });
        }
    }

    async fn serve_bank_worker_stream(
        &self,
        w: u32,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), NodeError> {
        let first = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
        let request = Message::decode(&first).map_err(|e| NodeError::Protocol(e.into()))?;
        let answer = match request {
            Message::WorkerCharge(h) => self.charge_for_worker(w, &h).await,
            Message::WorkerClaim(c) => return self.claim_for_worker(w, &c, send, recv).await,
            other => Err((
                AbortCode::Internal,
                format!("a bank worker sent {}, not a charge or a claim", other.kind()),
            )),
        };
        let reply = answer.unwrap_or_else(failed);
        write_one(&mut send, &reply).await?;
        let _ = send.finish();
        let _ = send.stopped().await;
        Ok(())
    }

    /// The coordinator: a worker's shard join is about to be accepted:
    /// the set is charged (as the one-process bank charges it).
    async fn charge_for_worker(&self, w: u32, h: &cleanroom_wire::ShardJoin) -> Answer {
        let refused = |why: String| (AbortCode::Refused, why);
        let Some(sh) = &self.inner.sharding else {
            return Err(refused("this node is not split into shards".into()));
        };
        let n = self.inner.workers_count.max(1);
        if h.shards != sh.count || h.shard_key_id != sh.key_id || h.shard % n != w {
            return Err(refused(format!(
                "a charge for shard {} of {}, not one of bank worker {w}'s under this split",
                h.shard, h.shards
            )));
        }
        let place = ShardPlace::for_charge(h);
        match self.charge_cardinality(SessionId([0; 16]), Some(&place)).await {
            Ok(Ok(())) => Ok(Message::WorkerDone),
            Ok(Err(e)) => Err(refused(e.to_string())),
            Err(e) => Err((AbortCode::Internal, e.to_string())),
        }
    }

    /// The coordinator: a worker's batch arrived: the query is claimed as
    /// the one-process bank claims it, the worker told how to bind the
    /// plan, and the batch's outcome read from the same stream and added
    /// to the query; a stream that ends first fails the batch.
    async fn claim_for_worker(
        &self,
        w: u32,
        c: &WorkerClaim,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), NodeError> {
        let n = self.inner.workers_count.max(1);
        let refuse = |code, why: String| {
            Message::WorkerFailed(WorkerFailed {
                abort: Some(code),
                message: truncated(why),
            })
        };
        let fits = match &self.inner.sharding {
            Some(sh) if c.shards == sh.count && c.shard % n == w => None,
            Some(_) => Some(format!(
                "a batch of shard {} of {}, not one of bank worker {w}'s",
                c.shard, c.shards
            )),
            None => Some("this node is not split into shards".into()),
        };
        if let Some(why) = fits {
            write_one(&mut send, &refuse(AbortCode::Refused, why)).await?;
            let _ = send.finish();
            return Ok(());
        }
        // The worker drops the request when the platform leaves: stop
        // waiting then.
        let claimed = tokio::select! {
            c = self.claim_batch(&c.query_id, c.join) => c,
            _ = send.stopped() => return Err(PeerError::Left.into()),
        };
        let (reg, plan, _, analyst) = match claimed {
            Ok(x) => x,
            Err((code, e)) => {
                write_one(&mut send, &refuse(code, e.to_string())).await?;
                let _ = send.finish();
                return Ok(());
            }
        };
        let groups = plan.matcher_groups().len().max(1);
        if c.group as usize >= groups {
            let why = "an aggregate batch for a group the query does not have".to_string();
            self.record_batch(&c.query_id, reg, c.join, usize::MAX, Batch::Failed(why.clone()), None);
            write_one(&mut send, &refuse(AbortCode::Refused, why)).await?;
            let _ = send.finish();
            return Ok(());
        }
        let k = c.shard as usize * groups + c.group as usize;
        let cells = plan.batch_bits().len();
        let told = Message::WorkerClaimed(WorkerClaimed {
            template: plan.template.clone(),
            analyst,
            params: plan.params.clone(),
            plan_digest: plan.digest(),
        });
        // From here the batch is this stream's: whatever ends it without an
        // outcome fails the batch.
        let outcome = match write_one(&mut send, &told).await {
            Ok(()) => read_one(&mut recv, self.inner.limits.query_timeout)
                .await
                .and_then(|f| Message::decode(&f).map_err(|e| NodeError::Protocol(e.into()))),
            Err(e) => Err(e),
        };
        let (batch, stats) = match outcome {
            Ok(Message::WorkerBatchShare(b)) => {
                let stats = pump::PumpStats {
                    peer: seconds(b.seconds[0]),
                    wait_in: seconds(b.seconds[1]),
                    ..pump::PumpStats::default()
                };
                match b.outcome {
                    WorkerOutcome::Share { session, words } if words.0.len() == cells => {
                        (Batch::Share(Share::from_words(words.0.clone()), session), Some(stats))
                    }
                    WorkerOutcome::Share { words, .. } => (
                        Batch::Failed(format!(
                            "bank worker {w} returned {} words for {cells} cells",
                            words.0.len()
                        )),
                        None,
                    ),
                    WorkerOutcome::UnknownJoin => (Batch::UnknownJoin, None),
                    WorkerOutcome::Failed(why) => (Batch::Failed(format!("bank worker {w}: {why}")), None),
                }
            }
            Ok(other) => (
                Batch::Failed(format!("bank worker {w} sent {} for a batch's outcome", other.kind())),
                None,
            ),
            Err(e) => {
                warn!(worker = w, error = %e, "a bank worker's batch ended without its outcome; the batch fails");
                (Batch::Failed(format!("bank worker {w} stopped during the batch")), None)
            }
        };
        self.record_batch(&c.query_id, reg, c.join, k, batch, stats.as_ref());
        let _ = write_one(&mut send, &Message::WorkerDone).await;
        let _ = send.finish();
        let _ = send.stopped().await;
        Ok(())
    }

    /// A worker: asks its coordinator to charge the set this shard join
    /// belongs to; the inner result is the refusal, if any.
    pub(super) async fn charge_at_coordinator(&self, place: &ShardPlace) -> Result<Result<(), NodeError>, NodeError> {
        let link = self
            .inner
            .coordinator
            .as_ref()
            .ok_or(NodeError::Internal("a bank worker without its coordinator"))?;
        let request = Message::WorkerCharge(place.header());
        let wait = self.inner.limits.timeouts.join_accept;
        match link.ask(&self.inner.endpoint, &request, wait).await? {
            Ok(Message::WorkerDone) => Ok(Ok(())),
            Ok(other) => Err(PeerError::Unexpected {
                expected: "the coordinator's answer to a charge",
                got: other.kind(),
            }
            .into()),
            // The coordinator's refusal (a spent budget, a second join of a
            // shard of a set, ...), as it said it.
            Err((_, why)) => Ok(Err(NodeError::refused(RefusalCode::PeerRefused, why))),
        }
    }

    /// A worker: one aggregate batch of the platform over one of its
    /// shards: claimed at the coordinator, run here, its outcome reported.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn worker_aggregate_batch(
        &self,
        role: WorkerRole,
        data: &HolderData,
        setup: &cleanroom_wire::OtSetup,
        first: &[u8],
        (shard, joins): (u32, &[SessionId]),
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), NodeError> {
        let link = self
            .inner
            .coordinator
            .as_ref()
            .ok_or(NodeError::Internal("a bank worker without its coordinator"))?;
        let sh = self
            .inner
            .sharding
            .as_ref()
            .ok_or(NodeError::Internal("a bank worker without shards"))?;
        if shard % role.count != role.index {
            abort(&mut send, setup.session, AbortCode::Refused).await;
            return Err(not_its_shard(role, shard));
        }
        let join = cleanroom_protocol::queries::sharded_join_id(joins);
        let request = Message::WorkerClaim(WorkerClaim {
            query_id: setup.query_id,
            join,
            shards: sh.count,
            shard,
            group: setup.group,
        });
        // The claim and the batch's outcome travel on one stream: if this
        // worker stops before the outcome, its coordinator fails the batch.
        let opened = async {
            let conn = link.connection(&self.inner.endpoint).await?;
            let (mut to, from) = tokio::time::timeout(self.inner.limits.timeouts.peer_frame, conn.open_bi())
                .await
                .map_err(|_| PeerError::NoAnswer {
                    secs: self.inner.limits.timeouts.peer_frame.as_secs(),
                })?
                .map_err(|e| PeerError::Transport(e.to_string()))?;
            write_one(&mut to, &request).await?;
            Ok::<_, NodeError>((to, from))
        };
        let (mut to, mut from) = match opened.await {
            Ok(x) => x,
            Err(e) => {
                abort(&mut send, setup.session, AbortCode::Internal).await;
                return Err(e);
            }
        };
        // The claim may wait for the analyst's request; the platform may
        // leave meanwhile (dropping the stream ends the claim).
        let answer = tokio::select! {
            a = read_one(&mut from, self.inner.limits.query_timeout) => a,
            _ = send.stopped() => return Err(PeerError::Left.into()),
        };
        let claimed = match answer.and_then(|f| Message::decode(&f).map_err(|e| NodeError::Protocol(e.into()))) {
            Ok(Message::WorkerClaimed(c)) => c,
            Ok(Message::WorkerFailed(WorkerFailed { abort: code, message })) => {
                abort(&mut send, setup.session, code.unwrap_or(AbortCode::Internal)).await;
                return Err(NodeError::refused(RefusalCode::PeerRefused, message));
            }
            Ok(other) => {
                abort(&mut send, setup.session, AbortCode::Internal).await;
                return Err(PeerError::Unexpected {
                    expected: "the coordinator's claim",
                    got: other.kind(),
                }
                .into());
            }
            Err(e) => {
                abort(&mut send, setup.session, AbortCode::Internal).await;
                return Err(e);
            }
        };
        let report = |outcome: WorkerOutcome, stats: Option<&pump::PumpStats>| {
            let seconds = stats.map_or([0.0; 2], |s| {
                [s.peer.as_secs_f64(), (s.wait_in + s.wait_out).as_secs_f64()]
            });
            Message::WorkerBatchShare(WorkerBatchShare { outcome, seconds })
        };
        // The plan, bound here from this node's own copy of the template.
        let plan = self.template(&claimed.template).and_then(|t| {
            t.bind(&claimed.analyst, &claimed.params, &self.inner.domains)
                .map_err(|e| NodeError::refused(RefusalCode::BadParameters, e.to_string()))
        });
        let plan = match plan {
            Ok(p) if p.digest() == claimed.plan_digest => p,
            other => {
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(_) => "the query's plan here is not the coordinator's (the templates differ)".into(),
                };
                abort(&mut send, setup.session, AbortCode::Internal).await;
                let _ = write_one(&mut to, &report(WorkerOutcome::Failed(truncated(why.clone())), None)).await;
                return Err(NodeError::Worker {
                    worker: role.index,
                    what: why,
                });
            }
        };
        let values = match self.shard_rows(sh, &plan, shard).await {
            Ok(values) => values,
            Err(e) => {
                warn!(error = %e, "a shard's input could not be read back");
                abort(&mut send, setup.session, AbortCode::Internal).await;
                let _ = write_one(&mut to, &report(WorkerOutcome::Failed(truncated(e.to_string())), None)).await;
                return Err(e);
            }
        };
        let result = self
            .holder_aggregate(
                data,
                &plan,
                values,
                &setup.query_id,
                setup.join_session,
                setup.group,
                Some(shard),
                first,
                send,
                recv,
            )
            .await;
        let outcome = match &result {
            Ok((share, stats, session)) => report(
                WorkerOutcome::Share {
                    session: *session,
                    words: ShareWords(share.words().to_vec()),
                },
                Some(stats),
            ),
            Err(NodeError::UnknownJoin) => report(WorkerOutcome::UnknownJoin, None),
            Err(e) => report(WorkerOutcome::Failed(truncated(e.to_string())), None),
        };
        write_one(&mut to, &outcome).await?;
        let done = read_one(&mut from, self.inner.limits.timeouts.peer_frame).await?;
        if !matches!(Message::decode(&done), Ok(Message::WorkerDone)) {
            warn!("the coordinator did not acknowledge a batch's outcome");
        }
        let _ = to.finish();
        result.map(|_| ())
    }
}

/// A bank worker's refusal of a shard that is not its own.
pub(super) fn not_its_shard(role: WorkerRole, shard: u32) -> NodeError {
    NodeError::refused(
        RefusalCode::PeerRefused,
        format!(
            "shard {shard} is not this bank worker's (worker {} of {} serves the shards s with s mod {} = {}): both nodes need the same number of workers",
            role.index, role.count, role.count, role.index
        ),
    )
}

/// A `WorkerFailed` for a refusal.
fn failed((code, message): (AbortCode, String)) -> Message {
    Message::WorkerFailed(WorkerFailed {
        abort: Some(code),
        message: truncated(message),
    })
}
