//! Workers (issue 16, docs/protocol.md "Workers"): a sharded platform node
//! as a coordinator and `N` worker processes. The coordinator keeps all
//! that is per query (admission, ledger, audit, the attempt machine, the
//! noise, the release) and hands worker `w` the joins and aggregate batches
//! of the shards `s` with `s mod N = w`; the worker runs them with the bank
//! itself, over its own QUIC connection under its own certificate, keeps
//! its shards' joins, and returns each join's session and each batch's
//! words. Two request/response pairs (`WorkerJoin`/`WorkerJoined`,
//! `WorkerBatch`/`WorkerBatchDone`, or `WorkerFailed`) over QUIC with
//! mutual TLS; the peer protocol does not change.

use super::platform::{AggregateRun, WorkerPart};
use super::*;
use cleanroom_wire::{WorkerBatch, WorkerBatchDone, WorkerFailed, WorkerHolds, WorkerJoin, WorkerJoined};
use std::collections::VecDeque;

/// A coordinator's view of its workers: where each listens, and the
/// connection to each once made (through an endpoint whose idle timeout
/// is short, so a worker that dies is noticed within seconds).
pub(super) struct WorkerPool {
    addresses: Vec<crate::config::HostPort>,
    endpoint: quinn::Endpoint,
    conns: tokio::sync::Mutex<Vec<Option<quinn::Connection>>>,
}

/// The idle timeout of the coordinator's connections to its workers.
const WORKER_IDLE: Duration = Duration::from_secs(6);

impl WorkerPool {
    /// A pool for `addresses`, connecting as `identity`.
    pub(super) fn new(
        addresses: Vec<crate::config::HostPort>,
        identity: &Identity,
        ca: &cleanroom_transport::TrustAnchors,
    ) -> Result<Self, NodeError> {
        let settings = TransportSettings {
            idle_timeout: WORKER_IDLE,
            keep_alive: Duration::from_secs(1),
            ..TransportSettings::default()
        };
        let endpoint = cleanroom_transport::client_endpoint(identity, ca, &settings)?;
        let conns = tokio::sync::Mutex::new(vec![None; addresses.len()]);
        Ok(Self {
            addresses,
            endpoint,
            conns,
        })
    }

    /// `N`.
    pub(super) fn count(&self) -> u32 {
        u32::try_from(self.addresses.len()).unwrap_or(u32::MAX)
    }

    /// The worker that runs shard `s`.
    fn of(&self, shard: u32) -> u32 {
        shard % self.count().max(1)
    }

    async fn connection(&self, w: u32) -> Result<quinn::Connection, NodeError> {
        let failed = |what: String| NodeError::Worker { worker: w, what };
        let addr = self
            .addresses
            .get(w as usize)
            .ok_or_else(|| failed("no such worker in [workers] addresses".into()))?;
        let mut conns = self.conns.lock().await;
        let slot = conns
            .get_mut(w as usize)
            .ok_or_else(|| failed("no such worker in [workers] addresses".into()))?;
        if let Some(c) = slot.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let ip = addr
            .resolve()
            .await
            .map_err(|e| failed(format!("cannot resolve {addr}: {e}")))?;
        let conn = connect(&self.endpoint, ip, &pki::worker_name("platform", w))
            .await
            .map_err(|e| failed(format!("cannot connect to {addr}: {e}")))?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Sends worker `w` one request and reads its answer (within `wait`);
    /// a `WorkerFailed` answer is an error: the peer's abort as a protocol
    /// error (so the attempt machine handles it as it does the bank's),
    /// anything else as [`NodeError::Worker`].
    async fn ask(&self, w: u32, request: &Message, wait: Duration) -> Result<Message, NodeError> {
        let failed = |what: String| NodeError::Worker { worker: w, what };
        let conn = self.connection(w).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| failed(e.to_string()))?;
        write_one(&mut send, request).await.map_err(|e| failed(e.to_string()))?;
        let _ = send.finish();
        let frame = read_one(&mut recv, wait).await.map_err(|e| failed(e.to_string()))?;
        match Message::decode(&frame).map_err(|e| failed(format!("an answer that does not decode: {e}")))? {
            Message::WorkerFailed(WorkerFailed { abort: Some(code), .. }) => {
                Err(ProtocolError::PeerAborted { code }.into())
            }
            Message::WorkerFailed(WorkerFailed { abort: None, message }) => Err(failed(message)),
            answer => Ok(answer),
        }
    }
}

/// What the coordinator asks a worker to join: one shard.
pub(super) struct JoinAsk {
    pub(super) header: cleanroom_wire::ShardJoin,
    pub(super) shard_users: u32,
    pub(super) blocks: Vec<Vec<usize>>,
    pub(super) padding: Zeroizing<[u8; 32]>,
}

/// This process is worker `index` of `count`.
#[derive(Clone, Copy, Debug)]
pub(super) struct WorkerRole {
    pub(super) index: u32,
    pub(super) count: u32,
}

/// The shard joins a worker holds, by session, oldest first out.
#[derive(Default)]
pub(super) struct HeldJoins {
    by_session: HashMap<SessionId, (u32, Arc<MatcherJoined>)>,
    order: VecDeque<SessionId>,
}

/// The shard joins a worker keeps, per shard it owns (the coordinator
/// caches a join per filter: a few filters' joins of each shard).
const HELD_PER_SHARD: usize = 8;

impl HeldJoins {
    fn insert(&mut self, session: SessionId, shard: u32, joined: Arc<MatcherJoined>, cap: usize) {
        if self.by_session.insert(session, (shard, joined)).is_none() {
            self.order.push_back(session);
        }
        while self.order.len() > cap.max(1) {
            if let Some(old) = self.order.pop_front() {
                self.by_session.remove(&old);
            }
        }
    }

    fn get(&self, session: &SessionId) -> Option<(u32, Arc<MatcherJoined>)> {
        self.by_session.get(session).cloned()
    }
}

impl Platform {
    /// The coordinator: every shard's join on its worker, the workers at
    /// once, each running its shards one after the other; the parts in
    /// shard order, the summed timings and matching seconds.
    pub(super) async fn joins_on_workers(
        &self,
        pool: &WorkerPool,
        asks: Vec<JoinAsk>,
    ) -> Result<(Vec<WorkerPart>, pump::PumpStats, f64), NodeError> {
        let shards = asks.len();
        let mut by_worker: Vec<Vec<JoinAsk>> = (0..pool.count()).map(|_| Vec::new()).collect();
        for ask in asks {
            let w = pool.of(ask.header.shard) as usize;
            by_worker
                .get_mut(w)
                .ok_or(NodeError::Internal("a shard of no worker"))?
                .push(ask);
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (w, asks) in (0u32..).zip(by_worker) {
            let me = self.clone();
            tasks.spawn(async move {
                let mut done = Vec::with_capacity(asks.len());
                for ask in asks {
                    let shard = ask.header.shard;
                    done.push((shard, me.join_on_worker(w, ask).await?));
                }
                Ok::<_, NodeError>(done)
            });
        }
        let mut parts: Vec<Option<WorkerPart>> = vec![None; shards];
        let mut stats = pump::PumpStats::default();
        let mut match_secs = 0.0;
        // The first failure ends the set: dropping the tasks drops the
        // other workers' requests.
        while let Some(done) = tasks.join_next().await {
            let done = done.map_err(|_| NodeError::Internal("a worker's task failed"))??;
            for (shard, (part, joined)) in done {
                let [own, peer, wait, matching] = joined.seconds;
                stats.own += seconds(own);
                stats.peer += seconds(peer);
                stats.wait_in += seconds(wait);
                match_secs += matching;
                *parts
                    .get_mut(shard as usize)
                    .ok_or(NodeError::Internal("a worker answered for no shard"))? = Some(part);
            }
        }
        let parts = parts
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or(NodeError::Internal("a shard no worker joined"))?;
        Ok((parts, stats, match_secs))
    }

    /// The coordinator: whether each worker still holds its parts of a
    /// stored set of shard joins (a worker that restarted has lost them;
    /// the set is then joined again before any batch runs, rather than
    /// found missing half way through the query's batches).
    pub(super) async fn workers_hold(&self, parts: &[WorkerPart]) -> Result<bool, NodeError> {
        let pool = self
            .inner
            .workers
            .as_ref()
            .ok_or(NodeError::Internal("a worker's join on a node without workers"))?;
        for w in 0..pool.count() {
            let joins: Vec<SessionId> = parts.iter().filter(|p| p.worker == w).map(|p| p.session).collect();
            if joins.is_empty() {
                continue;
            }
            let wait = self.inner.limits.timeouts.peer_frame;
            match pool
                .ask(w, &Message::WorkerHolds(WorkerHolds { joins: joins.clone() }), wait)
                .await?
            {
                Message::WorkerHolds(held) if held.joins == joins => {}
                Message::WorkerHolds(_) => {
                    info!(
                        worker = w,
                        "a worker no longer holds its part of a stored join; joining again"
                    );
                    return Ok(false);
                }
                other => {
                    return Err(NodeError::Worker {
                        worker: w,
                        what: format!("answered a check of its joins with {}", other.kind()),
                    });
                }
            }
        }
        Ok(parts.iter().all(|p| p.worker < pool.count()))
    }

    /// The coordinator: one shard's join on worker `w`.
    async fn join_on_worker(&self, w: u32, ask: JoinAsk) -> Result<(WorkerPart, WorkerJoined), NodeError> {
        let pool = self
            .inner
            .workers
            .as_ref()
            .ok_or(NodeError::Internal("a worker's join on a node without workers"))?;
        let shard = ask.header.shard;
        let groups = ask.blocks.len();
        let blocks = ask
            .blocks
            .iter()
            .map(|b| b.iter().map(|k| u32::try_from(*k)).collect::<Result<Vec<_>, _>>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| NodeError::Internal("a shard too large"))?;
        let request = Message::WorkerJoin(WorkerJoin {
            data_version: self.inner.data_version,
            header: ask.header,
            shard_users: ask.shard_users,
            blocks,
            padding_seed: cleanroom_wire::Secret32(*ask.padding),
        });
        let wait = self.inner.limits.query_timeout;
        match pool.ask(w, &request, wait).await {
            Ok(Message::WorkerJoined(j)) if j.groups as usize == groups => {
                let part = WorkerPart {
                    worker: w,
                    session: j.session,
                    groups: j.groups,
                    rows: j.rows,
                };
                Ok((part, j))
            }
            Ok(Message::WorkerJoined(j)) => Err(NodeError::Worker {
                worker: w,
                what: format!("joined shard {shard} in {} groups, not {groups}", j.groups),
            }),
            Ok(other) => Err(NodeError::Worker {
                worker: w,
                what: format!("answered shard {shard}'s join with {}", other.kind()),
            }),
            Err(NodeError::Worker { worker, what }) => Err(NodeError::Worker {
                worker,
                what: format!("shard {shard}'s join: {what}"),
            }),
            Err(e) => Err(e),
        }
    }

    /// The coordinator: one aggregate batch over a shard's join its worker
    /// holds; its session and this node's words.
    pub(super) async fn batch_on_worker(
        &self,
        part: WorkerPart,
        plan: &Plan,
        qid: &QueryId,
        (k, g): (u32, u32),
        header: cleanroom_wire::ShardBatch,
        aggregate: &mut AggregateRun,
    ) -> Result<(SessionId, Vec<u64>), NodeError> {
        let pool = self
            .inner
            .workers
            .as_ref()
            .ok_or(NodeError::Internal("a worker's batch on a node without workers"))?;
        if k == 0 || aggregate.started.is_none() {
            *aggregate = AggregateRun {
                conn: None,
                started: Some(Instant::now()),
                stats: pump::PumpStats::default(),
            };
        }
        if part.worker >= pool.count() {
            // Joined by a worker this node no longer has: join again.
            return Err(ProtocolError::PeerAborted {
                code: AbortCode::UnknownJoin,
            }
            .into());
        }
        let request = Message::WorkerBatch(WorkerBatch {
            data_version: self.inner.data_version,
            join: part.session,
            query_id: *qid,
            plan_digest: plan.digest(),
            bits: plan.batch_bits(),
            batch: k,
            group: g,
            header,
        });
        // As for a batch of its own: not dropped when the analyst goes.
        let wait = self.inner.limits.query_timeout;
        match pool.ask(part.worker, &request, wait).await? {
            Message::WorkerBatchDone(done) if done.words.0.len() == plan.batch_bits().len() => {
                let [own, peer, wait] = done.seconds;
                aggregate.stats.own += seconds(own);
                aggregate.stats.peer += seconds(peer);
                aggregate.stats.wait_in += seconds(wait);
                Ok((done.session, done.words.0.clone()))
            }
            Message::WorkerBatchDone(done) => Err(NodeError::Worker {
                worker: part.worker,
                what: format!(
                    "returned {} words for a batch of {} cells",
                    done.words.0.len(),
                    plan.batch_bits().len()
                ),
            }),
            other => Err(NodeError::Worker {
                worker: part.worker,
                what: format!("answered a batch with {}", other.kind()),
            }),
        }
    }

    /// A worker: one request of its coordinator, answered on the same
    /// stream (`WorkerFailed` with the reason when it cannot be done).
    pub(super) async fn serve_worker_stream(
        &self,
        role: WorkerRole,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), NodeError> {
        let first = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
        let answer = match Message::decode(&first) {
            Ok(Message::WorkerJoin(j)) => self.work_join(role, j).await,
            Ok(Message::WorkerBatch(b)) => self.work_batch(role, b).await,
            Ok(Message::WorkerHolds(h)) => self.holds(role, h.joins),
            Ok(other) => Err(PeerError::Unexpected {
                expected: "a worker join or batch",
                got: other.kind(),
            }
            .into()),
            Err(e) => Err(NodeError::Protocol(e.into())),
        };
        let reply = match answer {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "a request of the coordinator failed");
                let abort = match &e {
                    NodeError::Protocol(ProtocolError::PeerAborted { code }) => Some(*code),
                    NodeError::UnknownJoin => Some(AbortCode::UnknownJoin),
                    _ => None,
                };
                let message = truncated(e.to_string());
                Message::WorkerFailed(WorkerFailed { abort, message })
            }
        };
        write_one(&mut send, &reply).await?;
        let _ = send.finish();
        let _ = send.stopped().await;
        Ok(())
    }

    /// A worker: which of `joins` it holds.
    fn holds(&self, role: WorkerRole, joins: Vec<SessionId>) -> Result<Message, NodeError> {
        let mut held = Vec::with_capacity(joins.len());
        for j in joins {
            if self.held_join(role, &j)?.is_some() {
                held.push(j);
            }
        }
        Ok(Message::WorkerHolds(WorkerHolds { joins: held }))
    }

    /// A worker: keeps a shard's join in memory (a few per shard it owns).
    fn hold(&self, session: SessionId, shard: u32, joined: Arc<MatcherJoined>, role: WorkerRole) {
        let shards = self.inner.sharding.as_ref().map_or(1, Sharding::len);
        let owned = shards.div_ceil(role.count.max(1) as usize);
        lock(&self.side.held).insert(session, shard, joined, owned * HELD_PER_SHARD);
    }

    /// A worker: a shard join it ran, from memory or its state file (with
    /// its shard); `None` if it has none by that session (or the stored
    /// one does not decode, or is of another split: dropped).
    fn held_join(&self, role: WorkerRole, session: &SessionId) -> Result<Option<(u32, Arc<MatcherJoined>)>, NodeError> {
        if let Some(j) = lock(&self.side.held).get(session) {
            return Ok(Some(j));
        }
        let Some(sh) = &self.inner.sharding else {
            return Ok(None);
        };
        let entry = lock(&self.inner.state).join_entry_by_session(session, &self.inner.data_version)?;
        let Some((name, payload)) = entry else {
            return Ok(None);
        };
        let suffix = format!(" of {} key {}", sh.count, hex(&sh.key_id));
        let shard = name
            .strip_prefix("worker-shard ")
            .and_then(|n| n.strip_suffix(suffix.as_str()))
            .and_then(|s| s.parse::<u32>().ok())
            .filter(|s| *s < sh.count && s % role.count.max(1) == role.index);
        match (shard, MatcherJoined::decode(*session, &payload)) {
            (Some(shard), Ok(j)) => {
                let j = Arc::new(j);
                self.hold(*session, shard, j.clone(), role);
                Ok(Some((shard, j)))
            }
            _ => {
                warn!("a stored shard join does not decode or is of another split; dropped");
                lock(&self.inner.state).drop_join(session)?;
                Ok(None)
            }
        }
    }

    /// A worker: checks that a request is for its data and one of its shards.
    fn check_work(
        &self,
        role: WorkerRole,
        version: &[u8; 32],
        shards: u32,
        shard: u32,
    ) -> Result<&Sharding, NodeError> {
        let refused = |what: String| NodeError::Worker {
            worker: role.index,
            what,
        };
        if *version != self.inner.data_version {
            return Err(refused(
                "the coordinator's input data is not this worker's (another data version): start both on the same data"
                    .into(),
            ));
        }
        let sh = self
            .inner
            .sharding
            .as_ref()
            .ok_or_else(|| refused("this worker's data is not split into shards".into()))?;
        if sh.count != shards {
            return Err(refused(format!(
                "the coordinator splits into {shards} shards, this worker into {}",
                sh.count
            )));
        }
        if shard % role.count != role.index {
            return Err(refused(format!(
                "shard {shard} is not this worker's (worker {} of {} runs the shards s with s mod {} = {})",
                role.index, role.count, role.count, role.index
            )));
        }
        Ok(sh)
    }

    /// A worker: one shard's join with the bank, kept here.
    async fn work_join(&self, role: WorkerRole, j: WorkerJoin) -> Result<Message, NodeError> {
        let WorkerJoin {
            data_version,
            header,
            shard_users,
            blocks,
            padding_seed,
        } = j;
        let sh = self.check_work(role, &data_version, header.shards, header.shard)?;
        if header.shard_key_id != sh.key_id {
            return Err(NodeError::Worker {
                worker: role.index,
                what: "the coordinator's shard key is not this worker's".into(),
            });
        }
        let users = sh.store.range(header.shard).map_or(0, |r| r.len());
        if users != shard_users as usize {
            return Err(NodeError::Worker {
                worker: role.index,
                what: format!(
                    "shard {} holds {users} users here and {shard_users} on the coordinator: not the same split",
                    header.shard
                ),
            });
        }
        let ids = sh.matcher(header.shard).await?;
        let blocks: Vec<Vec<usize>> = blocks
            .into_iter()
            .map(|b| b.into_iter().map(|k| k as usize).collect())
            .collect();
        let context = cleanroom_protocol::queries::shard_join_context(&header.base_context, sh.count, header.shard);
        let padding = Zeroizing::new(padding_seed.0);
        drop(padding_seed);
        let shard = header.shard;
        let (joined, stats, matching) = self.one_join(&ids, context, &blocks, Some(header), padding).await?;
        let joined = Arc::new(joined);
        let answer = WorkerJoined {
            session: joined.session(),
            groups: u32::try_from(joined.blocks()).map_err(|_| NodeError::Internal("too many groups"))?,
            rows: joined.rows() as u64,
            seconds: [
                stats.own.as_secs_f64(),
                stats.peer.as_secs_f64(),
                (stats.wait_in + stats.wait_out).as_secs_f64(),
                matching,
            ],
        };
        // Stored, as the unsharded platform stores its joins: a worker that
        // restarts (or is killed) still has the joins its coordinator's
        // stored sets name, so a query's batches can run again over the
        // same join (the bank runs a query again only over the join of its
        // released share).
        let name = format!("worker-shard {shard} of {} key {}", sh.count, hex(&sh.key_id));
        let ttl = self.inner.limits.join_ttl_secs;
        lock(&self.inner.state).put_join(&answer.session, &name, &self.inner.data_version, ttl, &joined.encode())?;
        self.hold(answer.session, shard, joined, role);
        info!(shard, rows = answer.rows, "shard join done for the coordinator");
        Ok(Message::WorkerJoined(answer))
    }

    /// A worker: one aggregate batch over a shard's join it holds.
    async fn work_batch(&self, role: WorkerRole, b: WorkerBatch) -> Result<Message, NodeError> {
        self.check_work(role, &b.data_version, b.header.shards, b.header.shard)?;
        let Some((shard, joined)) = self.held_join(role, &b.join)? else {
            // Gone (expired, or this worker's state was lost): the
            // coordinator joins again.
            return Err(NodeError::UnknownJoin);
        };
        if shard != b.header.shard || b.header.joins.get(shard as usize) != Some(&b.join) {
            return Err(NodeError::Worker {
                worker: role.index,
                what: "a batch whose shard header does not name this join".into(),
            });
        }
        let bits = CellBits::new(b.bits)?;
        let mut run = AggregateRun::default();
        let (session, words) = self
            .matcher_batch(
                &joined,
                bits,
                b.plan_digest,
                &b.query_id,
                (b.batch, b.group),
                Some(b.header),
                &mut run,
            )
            .await?;
        let s = &run.stats;
        Ok(Message::WorkerBatchDone(WorkerBatchDone {
            session,
            words: cleanroom_wire::ShareWords(words),
            seconds: [
                s.own.as_secs_f64(),
                s.peer.as_secs_f64(),
                (s.wait_in + s.wait_out).as_secs_f64(),
            ],
        }))
    }
}

/// Seconds another process reported, as a duration (the wire bounds them).
pub(super) fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or_default()
}

/// A message cut to what a `WorkerFailed` carries.
pub(super) fn truncated(mut message: String) -> String {
    if message.len() > cleanroom_wire::MAX_WORKER_MESSAGE_LEN {
        let mut end = cleanroom_wire::MAX_WORKER_MESSAGE_LEN;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}
