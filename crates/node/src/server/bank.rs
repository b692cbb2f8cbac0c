//! The bank (holder): the platform's streams (policy, join, aggregate
//! batches, share checks), the registration an analyst's request makes in
//! `BankQueries` and the wait for its batches, and the rerun for a
//! platform that lost its share.

use super::*;
use cleanroom_protocol::aggregate::RowSource;

/// What only the bank has.
pub(super) struct BankSide {
    /// Its customers.
    pub(super) data: Arc<HolderData>,
    /// Joins by session (with the shard each is of, when sharded), until
    /// stored in the state file.
    joins: Mutex<HashMap<SessionId, ShardJoined>>,
    /// Its query ids between the nodes (registered, running, completing,
    /// refused lately), and a wake-up when they change.
    pub(super) queries: Mutex<BankQueries<BankShell>>,
    pub(super) changed: Notify,
    /// A join was stored (see `holder_aggregate`).
    join_stored: Notify,
    /// Streams of the platform being served.
    pub(super) peer_streams: std::sync::atomic::AtomicUsize,
    /// The set of the last shard join (its phases add up in `last_join`).
    last_set: Mutex<Option<[u8; 16]>>,
}

impl BankSide {
    pub(super) fn new(data: Arc<HolderData>, timeouts: cleanroom_protocol::queries::QueryTimeouts) -> Self {
        Self {
            data,
            joins: Mutex::new(HashMap::new()),
            queries: Mutex::new(BankQueries::new(timeouts)),
            changed: Notify::new(),
            join_stored: Notify::new(),
            peer_streams: std::sync::atomic::AtomicUsize::new(0),
            last_set: Mutex::new(None),
        }
    }
}

/// A bank node: the node's shared state and the bank's own. Only
/// `Node::sided` makes one, for a bank.
#[derive(Clone)]
pub(super) struct Bank {
    pub(super) node: Node,
    pub(super) side: Arc<BankSide>,
}

impl std::ops::Deref for Bank {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Bank {
    /// Bank: whether this node stored a share of `run` of the query.
    pub(super) fn holds_share(&self, qid: &QueryId, run: &Run) -> Result<bool, NodeError> {
        let stored = lock(&self.inner.state).charged_query(qid)?.and_then(|q| q.share);
        Ok(stored
            .as_deref()
            .and_then(super::analyst::stored_share)
            .is_some_and(|s| s.run == *run))
    }

    /// Bank: the platform opened an aggregate for a query id this node has
    /// already answered (stored a share of) but that no analyst request is
    /// waiting on: the platform lost its share of that run in a crash, so
    /// the aggregate runs again and its share replaces the stored one.
    ///
    /// Only over the join the stored share came from, on the same data, with
    /// the same noise (drawn from the seed stored with the charge) and at
    /// most `max_reruns_per_query` times: the new share differs from the
    /// old only by the platform's new mask, so a platform that knows its own
    /// un-noised share of each run learns the same noisy result again and
    /// nothing more. Returns whether a rerun was started; an error says why
    /// it may not run again.
    pub(super) fn rerun_for_peer(&self, qid: &QueryId, join: SessionId) -> Result<bool, NodeError> {
        let Some(q) = lock(&self.inner.state).charged_query(qid)? else {
            return Ok(false);
        };
        let charged = self.charged(qid)?;
        let l = &self.inner.limits;
        let binding =
            match ledger::bank_peer_batch(Some(&charged), join, self.inner.data_version, l.max_reruns_per_query) {
                // Charged, not stored: the analyst's request runs it.
                Ok(PeerBatch::Unregistered) => return Ok(false),
                Ok(PeerBatch::Rerun(binding)) => binding,
                Err(why) => return Err(NodeError::refused(RefusalCode::RerunRefused, why.to_string())),
            };
        let mut template = self.template(&q.template)?.clone();
        // As charged (see `run_query_serialised`).
        template.rho_micro = q.rho_micro;
        let params: Vec<(String, String)> = q
            .params
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok())
            .ok_or(StateError::Inconsistent("the ledger has no parameters for this query"))?;
        let plan = template
            .bind(&q.analyst, &params, &self.inner.domains)
            .map_err(|e| NodeError::refused(RefusalCode::BadParameters, e.to_string()))?;
        if plan.digest().as_slice() != q.plan.as_slice() {
            return Err(NodeError::refused(
                RefusalCode::RerunRefused,
                "this query's template changed since it ran; it cannot be run again",
            ));
        }
        let seed = lock(&self.inner.state).noise_seed(qid)?;
        let Some(awaiting) = self.holder_register(&plan, qid, &q.analyst, Some(join))? else {
            return Ok(true);
        };
        info!(
            "the platform lost its share of this query's run; running the aggregate again over the same join, with the same noise"
        );
        let node = self.clone();
        let request = QueryRequest {
            query_id: *qid,
            template: q.template.clone(),
            params,
        };
        tokio::spawn(
            async move {
                let noise = draw_noise(&plan, &template, seed);
                let mut timings = Vec::new();
                let done = match node
                    .holder_await(&request.query_id, awaiting, &mut timings, &Requester::default())
                    .await
                {
                    Ok((share, run, _waiter, join)) => match noise.await {
                        Ok(Ok(noise)) => node
                            .noise_and_store(
                                share,
                                run,
                                &noise,
                                &plan,
                                &template,
                                &q.analyst,
                                &request,
                                timings,
                                &RunBinding {
                                    join,
                                    data_version: binding.data_version,
                                },
                                true,
                            )
                            .map(|_| ()),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(NodeError::Internal("noise task failed")),
                    },
                    Err(e) => Err(e),
                };
                match done {
                    Ok(()) => info!("share of the rerun stored"),
                    Err(e) => warn!(error = %e, "rerun of a query failed"),
                }
            }
            .instrument(info_span!("rerun", query = %hex(&qid.0))),
        );
        Ok(true)
    }

    /// Bank: the steps of an analyst's request after its charge
    /// (`ledger::bank_after_charge`): return the stored share, or register
    /// the query, wait for the platform's batches and release the share.
    pub(super) async fn answer_charged(
        &self,
        charged: &ledger::Charged,
        r: &ChargedRequest<'_>,
    ) -> Result<QueryShare, NodeError> {
        let qid = &r.q.query_id;
        match ledger::bank_after_charge(charged) {
            BankAfterCharge::Replay => return self.replay(qid),
            BankAfterCharge::Compute => {}
        }
        let started = Instant::now();
        let noise = self.start_noise(r)?;
        let mut timings = Vec::new();
        let awaiting = self
            .holder_register(&r.plan, qid, r.analyst, None)?
            .ok_or(NodeError::Internal("an analyst's registration was kept"))?;
        let (share, run, registered, join) = self.holder_await(qid, awaiting, &mut timings, r.from).await?;
        let out = self.release(r, share, run, join, noise, timings, false, started).await;
        // The registration ends once the share is stored (or not).
        drop(registered);
        out
    }

    /// Bank: makes a query the platform's batches can find by query id: an
    /// analyst's request replaces an earlier registration; a rerun for the
    /// platform (`rerun_over`, the join its batches must run over) keeps
    /// one, and is then `None`.
    pub(super) fn holder_register(
        &self,
        plan: &Plan,
        qid: &QueryId,
        analyst: &str,
        rerun_over: Option<SessionId>,
    ) -> Result<Option<Awaiting>, NodeError> {
        let data = &self.side.data;
        // Each customer's vector is computed as its masked row is produced.
        let values = HolderRows::new(plan, data.clone(), &self.inner.domains.categories);
        let (tx, rx) = oneshot::channel();
        let shell = BankShell {
            plan: plan.clone(),
            analyst: analyst.to_string(),
            values: Arc::new(values),
            stats: pump::PumpStats::default(),
            tx,
        };
        // One batch per platform group, and per shard when sharded.
        let shards = self.inner.sharding.as_ref().map_or(1, Sharding::len);
        let groups = plan.matcher_groups().len().max(1) * shards;
        let registered = lock(&self.side.queries).register(*qid, analyst, groups, rerun_over, shell, Instant::now());
        match registered {
            Register::New(reg, deadline) => {
                self.side.changed.notify_waiters();
                Ok(Some((reg, deadline, rx)))
            }
            Register::Kept => Ok(None),
            Register::Busy => Err(NodeError::refused(
                RefusalCode::Busy,
                "this node is still storing this query id's share; ask again shortly with the same id",
            )),
        }
    }

    /// An analyst's request for `qid` arrived: an aggregate of the
    /// platform's waiting for it is told (see `claim_query`).
    pub(super) fn request_arrived(&self, qid: &QueryId) {
        lock(&self.side.queries).request_arrived(qid);
        self.side.changed.notify_waiters();
    }

    /// Bank: this node refused (or dropped) `qid`, so the platform's
    /// aggregate for it, if the platform accepted it, is told so at once
    /// rather than after a wait (see `claim_query`).
    pub(super) fn mark_refused(&self, qid: &QueryId) {
        lock(&self.side.queries).refused(qid, Instant::now());
    }

    /// Bank: waits for the platform's batches of a registered query.
    pub(super) async fn holder_await(
        &self,
        qid: &QueryId,
        (reg, deadline, mut rx): Awaiting,
        timings: &mut Vec<(Phase, f64)>,
        from: &Requester,
    ) -> Result<(Share, Run, Waiter, SessionId), NodeError> {
        // Dropped on every way out but a share: the registration ends.
        let waiter = Waiter {
            bank: self.side.clone(),
            qid: *qid,
            reg,
        };
        let deadline = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
        tokio::pin!(deadline);
        let gone = from.gone();
        tokio::pin!(gone);
        let mut gone_seen = false;
        // `None`: timed out.
        let out = loop {
            tokio::select! {
                r = &mut rx => break Some(r),
                () = &mut deadline => break None,
                () = &mut gone, if !gone_seen => {
                    gone_seen = true;
                    // Not started by the platform yet: drop it. Started: the
                    // batches are running, so finish and store the share.
                    let dropped = lock(&self.side.queries).analyst_gone(qid, reg, Instant::now());
                    if dropped.is_some() {
                        drop(dropped);
                        info!("query dropped while waiting for the platform node: its analyst has gone");
                        return Err(analyst_gone());
                    }
                }
            }
        };
        match out {
            Some(Ok((Ok(whole), stats))) => {
                timings.extend([
                    // From accepting the query to the last batch: includes
                    // any join the platform runs first.
                    (Phase::BankJoinAndAggregate, whole.elapsed.as_secs_f64()),
                    (Phase::BankMasking, stats.peer.as_secs_f64()),
                    (
                        Phase::BankAggregateWaiting,
                        (stats.wait_in + stats.wait_out).as_secs_f64(),
                    ),
                ]);
                let share = match &self.inner.sharding {
                    None => whole.share,
                    // Each group's shares of the shards, added up.
                    Some(sh) => cleanroom_protocol::queries::fold_shards(whole.share.words(), sh.len())
                        .ok_or(NodeError::Internal("the shards' shares do not add up to one share"))?,
                };
                Ok((share, whole.run, waiter, whole.join))
            }
            Some(Ok((Err(e), _))) => Err(PeerError::NoShare(e).into()),
            Some(Err(_)) => Err(PeerError::NoShare("the registration ended".into()).into()),
            None => Err(PeerError::QueryNotRun {
                secs: self.inner.limits.query_timeout.as_secs(),
            }
            .into()),
        }
    }

    /// Bank: a stream the platform opened, by its first message (policy
    /// exchange, join, aggregate batch, share check).
    /// From a worker of the platform (`worker`), only the policy exchange,
    /// shard joins and shard batches are served.
    pub(super) async fn serve_peer_stream(
        &self,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        worker: Option<u32>,
    ) -> Result<(), NodeError> {
        let data = &self.side.data;
        let first = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
        let message = Message::decode(&first).map_err(|e| NodeError::Protocol(e.into()))?;
        if let Some(w) = worker
            && !matches!(
                message,
                Message::Policy(_) | Message::ShardJoin(_) | Message::ShardBatch(_)
            )
        {
            info!(worker = w, "a platform worker's stream refused");
            abort(&mut send, cleanroom_wire::SessionId([0; 16]), AbortCode::Refused).await;
            return Err(PeerError::Unexpected {
                expected: "from a platform worker, a shard join or shard batch",
                got: message.kind(),
            }
            .into());
        }
        match message {
            Message::Policy(p) => {
                self.peer_policy_from(&p.signed)?;
                write_one(
                    &mut send,
                    &Message::Policy(PolicyMessage {
                        signed: self.inner.own_policy_json.clone(),
                    }),
                )
                .await?;
                let _ = send.finish();
                let _ = send.stopped().await;
                Ok(())
            }
            Message::JoinOffer(offer) => {
                if let Some(sh) = &self.inner.sharding {
                    abort(&mut send, cleanroom_wire::SessionId([0; 16]), AbortCode::Refused).await;
                    return Err(not_sharded_alike(format!(
                        "a join offer without its shard header, but this node's identifiers are split into {} shards",
                        sh.count
                    )));
                }
                let span = info_span!("join", filter_context = %hex(&offer.context[..8]));
                self.holder_join(data, &first, offer.context, None, send, recv)
                    .instrument(span)
                    .await
            }
            Message::ShardJoin(header) => {
                let span = info_span!("join", shard = header.shard);
                self.holder_shard_join(data, &header, send, recv).instrument(span).await
            }
            Message::OtSetup(setup) => {
                if let Some(sh) = &self.inner.sharding {
                    abort(&mut send, setup.session, AbortCode::Refused).await;
                    return Err(not_sharded_alike(format!(
                        "an aggregate without its shard header, but this node's identifiers are split into {} shards",
                        sh.count
                    )));
                }
                let span = info_span!("aggregate", query = %hex(&setup.query_id.0));
                self.serve_aggregate_batch(data, &setup, &first, None, send, recv)
                    .instrument(span)
                    .await
            }
            Message::ShardBatch(header) => {
                let second = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
                let no_session = cleanroom_wire::SessionId([0; 16]);
                let setup = match Message::decode(&second) {
                    Ok(Message::OtSetup(setup)) => setup,
                    Err(e) => {
                        abort(&mut send, no_session, AbortCode::BadMessage).await;
                        return Err(NodeError::Protocol(e.into()));
                    }
                    Ok(other) => {
                        abort(&mut send, no_session, AbortCode::BadMessage).await;
                        return Err(PeerError::Unexpected {
                            expected: "the OT setup after a shard header",
                            got: other.kind(),
                        }
                        .into());
                    }
                };
                let fits = match &self.inner.sharding {
                    None => Err(
                        "an aggregate with a shard header, but this node's identifiers are not split into shards"
                            .to_string(),
                    ),
                    Some(sh) if sh.count != header.shards => Err(format!(
                        "an aggregate over {} shards, but this node's identifiers are split into {}",
                        header.shards, sh.count
                    )),
                    // The wire checked shard < shards and one join per shard.
                    Some(_) if header.joins.get(header.shard as usize) != Some(&setup.join_session) => {
                        Err("an aggregate whose join is not its shard's in its list of shard joins".to_string())
                    }
                    Some(_) => Ok(()),
                };
                if let Err(why) = fits {
                    abort(&mut send, setup.session, AbortCode::Refused).await;
                    return Err(not_sharded_alike(why));
                }
                let span = info_span!("aggregate", query = %hex(&setup.query_id.0), shard = header.shard);
                self.serve_aggregate_batch(data, &setup, &second, Some((header.shard, &header.joins)), send, recv)
                    .instrument(span)
                    .await
            }
            Message::ShareCheck(c) => self.serve_share_check(&c, send).await,
            other => Err(PeerError::Unexpected {
                expected: "a policy, join offer, OT setup, shard header or share check",
                got: other.kind(),
            }
            .into()),
        }
    }

    /// Bank: one aggregate batch of the platform (`OtSetup`): a rerun for a
    /// platform that lost its share is started if the ledger rules allow
    /// it, the batch claims its query's registration (waiting for the
    /// analyst's request if need be), runs, and is recorded. On a bank
    /// worker, the claim and the record are its coordinator's
    /// (`worker_aggregate_batch`).
    async fn serve_aggregate_batch(
        &self,
        data: &HolderData,
        setup: &cleanroom_wire::OtSetup,
        first: &[u8],
        shard: Option<(u32, &[SessionId])>,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), NodeError> {
        if let (Some(role), Some(placed)) = (self.inner.worker, shard) {
            return self
                .worker_aggregate_batch(role, data, setup, first, placed, send, recv)
                .await;
        }
        // The query's join: the one join, or J* of the shards' joins.
        let join = shard.map_or(setup.join_session, |(_, joins)| {
            cleanroom_protocol::queries::sharded_join_id(joins)
        });
        // The platform may go away meanwhile: stop waiting then
        // (a hostile one must not leave tasks waiting here).
        let claimed = tokio::select! {
            c = self.claim_batch(&setup.query_id, join) => c,
            _ = send.stopped() => return Err(PeerError::Left.into()),
        };
        let (reg, plan, values, _) = match claimed {
            Ok(c) => c,
            Err((code, e)) => {
                abort(&mut send, setup.session, code).await;
                return Err(e);
            }
        };
        // Batch k = s * G + g of a sharded query (shard-major); a group
        // beyond the plan's would alias another shard's batch.
        let groups = plan.matcher_groups().len().max(1);
        let placed = match (shard, &self.inner.sharding) {
            (None, _) => Some((setup.group as usize, Ok(values as Arc<dyn RowSource>))),
            (Some((s, _)), Some(sh)) if s < sh.count && (setup.group as usize) < groups => {
                // The shard's customers, numbered as its join numbers them,
                // read back from its file (or kept in memory).
                Some((
                    s as usize * groups + setup.group as usize,
                    self.shard_rows(sh, &plan, s).await,
                ))
            }
            _ => None,
        };
        let (k, result) = match placed {
            Some((k, Err(e))) => {
                // A shard file that does not read back: the batch fails
                // (and with it the query), never runs on other input.
                warn!(error = %e, "a shard's input could not be read back");
                abort(&mut send, setup.session, AbortCode::Internal).await;
                (k, Err(e))
            }
            Some((k, Ok(values))) => (
                k,
                self.holder_aggregate(
                    data,
                    &plan,
                    values,
                    &setup.query_id,
                    setup.join_session,
                    setup.group,
                    shard.map(|(s, _)| s),
                    first,
                    send,
                    recv,
                )
                .await,
            ),
            None => {
                abort(&mut send, setup.session, AbortCode::Refused).await;
                (
                    usize::MAX,
                    Err(NodeError::refused(
                        RefusalCode::PeerRefused,
                        "an aggregate batch for a group the query does not have",
                    )),
                )
            }
        };
        let batch = match &result {
            Ok((share, _, session)) => Batch::Share(share.clone(), *session),
            // The platform joins again and retries: not a failure
            // of the query (see `BankQueries::batch_done`).
            Err(NodeError::UnknownJoin) => Batch::UnknownJoin,
            Err(e) => Batch::Failed(e.to_string()),
        };
        let stats = result.as_ref().ok().map(|(_, stats, _)| stats);
        self.record_batch(&setup.query_id, reg, join, k, batch, stats);
        result.map(|_| ())
    }

    /// Bank (or a bank worker's coordinator): a batch over `join` of query
    /// `qid` arrived: a rerun for a platform that lost its share is started
    /// if the ledger rules allow it (a rerun that arrives while this node
    /// still stores the previous run's share waits for the store, briefly),
    /// then the batch claims the query's registration: its plan, its
    /// customers' values and its analyst; or the abort code for the
    /// platform and why not.
    pub(super) async fn claim_batch(
        &self,
        qid: &QueryId,
        join: SessionId,
    ) -> Result<(Registration, Plan, Arc<HolderRows>, String), (AbortCode, NodeError)> {
        let waiting = lock(&self.side.queries).is_registered(qid);
        let deadline = Instant::now() + self.inner.limits.timeouts.join_stored;
        let mut rerun_started = waiting;
        while !rerun_started {
            let stored = self.side.changed.notified();
            match self.rerun_for_peer(qid, join) {
                Ok(_) => rerun_started = true,
                Err(e) if e.refusal_code() == Some(RefusalCode::Busy) && Instant::now() < deadline => {
                    let _ = tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), stored).await;
                }
                Err(e) => {
                    // The operator's log says why; the query stays as it is.
                    warn!(error = %e, "refused to run this query again for the platform");
                    return Err((AbortCode::Refused, e));
                }
            }
        }
        match self.claim_query(qid, join).await {
            Claimed::Found(reg, plan, values, analyst) => Ok((reg, *plan, values, analyst)),
            Claimed::OtherJoin => Err((
                AbortCode::Refused,
                NodeError::refused(
                    RefusalCode::RerunRefused,
                    "an aggregate batch over another join than the query's other batches or released share",
                ),
            )),
            Claimed::Unknown => Err((
                AbortCode::UnknownQuery,
                NodeError::refused(
                    RefusalCode::PeerRefused,
                    "aggregate for a query this node has not accepted",
                ),
            )),
        }
    }

    /// Shard `s`'s customers' values for `plan`, numbered as the shard's
    /// join numbers them, read back from its file (or kept in memory).
    pub(super) async fn shard_rows(&self, sh: &Sharding, plan: &Plan, s: u32) -> Result<Arc<dyn RowSource>, NodeError> {
        let customers = sh.holder(s).await?;
        Ok(Arc::new(HolderRows::new(
            plan,
            customers,
            &self.inner.domains.categories,
        )))
    }

    /// Adds batch `k`'s outcome to query `qid`'s registration `reg` (with
    /// where its time went), and hands the whole share over once every
    /// batch is in.
    pub(super) fn record_batch(
        &self,
        qid: &QueryId,
        reg: Registration,
        join: SessionId,
        k: usize,
        batch: Batch,
        stats: Option<&pump::PumpStats>,
    ) {
        let delivered = {
            let mut bank = lock(&self.side.queries);
            if let Some(stats) = stats
                && let Some(shell) = bank.shell_mut(qid)
            {
                shell.stats.add(stats);
            }
            bank.batch_done(qid, reg, join, k, batch, Instant::now())
        };
        if let Some((BankShell { tx, stats, .. }, delivery)) = delivered {
            let _ = tx.send((delivery, stats));
        }
    }

    /// Bank: the platform asks whether this node holds its share of a run.
    async fn serve_share_check(&self, c: &ShareCheck, mut send: quinn::SendStream) -> Result<(), NodeError> {
        // Busy: an aggregate for it is running or its share is being
        // stored. (A query waiting for the platform is not: the
        // platform's rerun is what it waits for.)
        let busy = lock(&self.side.queries).busy(&c.query_id);
        let held = self.holds_share(&c.query_id, &c.run)?;
        write_one(
            &mut send,
            &Message::ShareHeld(ShareHeld {
                query_id: c.query_id,
                held,
                busy,
            }),
        )
        .await?;
        let _ = send.finish();
        let _ = send.stopped().await;
        Ok(())
    }

    /// The accepted query an aggregate asks for: the analyst's request may
    /// reach this node after the platform's aggregate, so wait for it
    /// (`unclaimed_aggregate`; `refused_aggregate` for a query id this node
    /// refused within `refusal_remembered`, unless a new request for it
    /// arrives meanwhile): `BankQueries::claim` says how long.
    /// A batch over `join` claims it; every batch of the query must name the
    /// same join (and a rerun's, the join of the released share).
    pub(super) async fn claim_query(&self, qid: &QueryId, join: SessionId) -> Claimed {
        let asked = Instant::now();
        loop {
            let changed = self.side.changed.notified();
            let until = match lock(&self.side.queries).claim(qid, join, asked, Instant::now()) {
                Claim::Found(reg, shell) => {
                    return Claimed::Found(
                        reg,
                        Box::new(shell.plan.clone()),
                        shell.values.clone(),
                        shell.analyst.clone(),
                    );
                }
                Claim::OtherJoin => return Claimed::OtherJoin,
                Claim::Unknown => return Claimed::Unknown,
                Claim::Wait(until) => until,
            };
            // Past `until`, the registry answers `Unknown`.
            let _ = tokio::time::timeout_at(tokio::time::Instant::from_std(until), changed).await;
        }
    }

    /// Bank: the platform's join of shard `header.shard`: the header and
    /// the offer after it are checked against this node's split (the
    /// count, the key, the context the shard's join must have), then the
    /// shard's customers are joined.
    async fn holder_shard_join(
        &self,
        data: &HolderData,
        header: &cleanroom_wire::ShardJoin,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(), NodeError> {
        let no_session = cleanroom_wire::SessionId([0; 16]);
        let Some(sh) = &self.inner.sharding else {
            abort(&mut send, no_session, AbortCode::Refused).await;
            return Err(not_sharded_alike(
                "a shard join, but this node's identifiers are not split into shards".into(),
            ));
        };
        if let Some(role) = self.inner.worker
            && header.shard % role.count.max(1) != role.index
        {
            abort(&mut send, no_session, AbortCode::Refused).await;
            return Err(super::bank_worker::not_its_shard(role, header.shard));
        }
        let range = match sh.store.range(header.shard) {
            Some(r) if header.shards == sh.count && header.shard_key_id == sh.key_id => r,
            _ => {
                abort(&mut send, no_session, AbortCode::Refused).await;
                return Err(not_sharded_alike(if header.shards == sh.count {
                    "the platform's shard key is not this node's".into()
                } else {
                    format!(
                        "a join of {} shards, but this node's identifiers are split into {}",
                        header.shards, sh.count
                    )
                }));
            }
        };
        let first = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
        let offer = match Message::decode(&first) {
            Ok(Message::JoinOffer(offer)) => offer,
            Err(e) => {
                abort(&mut send, no_session, AbortCode::BadMessage).await;
                return Err(NodeError::Protocol(e.into()));
            }
            Ok(other) => {
                abort(&mut send, no_session, AbortCode::BadMessage).await;
                return Err(PeerError::Unexpected {
                    expected: "the join offer after a shard header",
                    got: other.kind(),
                }
                .into());
            }
        };
        let context = cleanroom_protocol::queries::shard_join_context(&header.base_context, sh.count, header.shard);
        if offer.context != context {
            abort(&mut send, no_session, AbortCode::Refused).await;
            return Err(not_sharded_alike(
                "a shard's join offer whose context is not its shard's".into(),
            ));
        }
        let place = ShardPlace {
            shard: header.shard,
            shards: sh.count,
            key_id: sh.key_id,
            set: header.set,
            range,
        };
        self.holder_join(data, &first, context, Some(place), send, recv).await
    }

    pub(super) async fn holder_join(
        &self,
        data: &HolderData,
        first: &[u8],
        context: [u8; 32],
        place: Option<ShardPlace>,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
    ) -> Result<(), NodeError> {
        let l = &self.inner.limits;
        let (params, policy) = self.holder_join_rules(context)?;
        let customers = self.customers();
        let ids = self.identifiers();
        if (customers as u64) < l.min_input_set {
            abort(&mut send, cleanroom_wire::SessionId([0; 16]), AbortCode::Refused).await;
            return Err(NodeError::refused(
                RefusalCode::InputLimit,
                format!(
                    "minimum input limit: the bank has {customers} customers, below the minimum of {}",
                    l.min_input_set
                ),
            ));
        }
        // The churn baseline of a shard is its own customers'.
        let (fp, input_name) = match &place {
            None => (
                crate::state::sorted_fingerprints(&self.inner.fingerprints, ids, 0..ids)?,
                "holder-input".to_string(),
            ),
            Some(p) => (
                crate::state::sorted_fingerprints(&self.inner.fingerprints, ids, p.range.clone())?,
                format!("holder-input shard {} of {}", p.shard, p.shards),
            ),
        };
        let churn = lock(&self.inner.state).check_churn(&input_name, &fp, l.max_churn_ppm);
        if let Err(e) = churn {
            abort(&mut send, cleanroom_wire::SessionId([0; 16]), AbortCode::Refused).await;
            return Err(e);
        }
        // A shard's customers, read back from its file (or kept in memory)
        // only now that the cheap checks have passed; its join numbers them
        // in the file's order.
        let key_offsets = data.key_offsets.clone();
        let ids = match (&place, &self.inner.sharding) {
            (None, _) => data.ids.clone(),
            (Some(p), Some(sh)) => match sh.holder(p.shard).await {
                Ok(h) => h.ids.clone(),
                Err(e) => {
                    warn!(error = %e, "a shard's input could not be read back");
                    abort(&mut send, cleanroom_wire::SessionId([0; 16]), AbortCode::Internal).await;
                    return Err(e);
                }
            },
            (Some(_), None) => return Err(NodeError::Internal("a shard join on a node that does not shard")),
        };
        let first = first.to_vec();
        let key_slots = self.key_slots();
        let pending = tokio::task::spawn_blocking(move || {
            let mut rng = session_rng()?;
            let h = match key_offsets {
                None => HolderJoin::with_ids(params, policy, ids)?,
                Some(offsets) => HolderJoin::with_key_offsets(params, policy, ids, offsets, key_slots)?,
            };
            h.on_offer(&first, &mut rng).map_err(NodeError::from)
        })
        .await
        .map_err(|_| NodeError::Internal("join task failed"))?;
        let pending = match pending {
            Ok(p) => p,
            Err(NodeError::Protocol(e)) => {
                abort(&mut send, cleanroom_wire::SessionId([0; 16]), e.abort_code()).await;
                return Err(NodeError::Protocol(e));
            }
            Err(e) => return Err(e),
        };
        let session = pending.session();
        // The cardinality charge is durable before anything leaves the node.
        match self.charge_cardinality(session, place.as_ref()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                abort(&mut send, session, AbortCode::Refused).await;
                return Err(e);
            }
            Err(e) => {
                abort(&mut send, session, AbortCode::Internal).await;
                return Err(e);
            }
        }
        let (streaming, accept) = pending.charge_recorded();
        write_one(&mut send, &accept).await?;
        let t = Instant::now();
        let idle = l.timeouts.stream_idle;
        let (streaming, stats) = pump::run_with_stats(streaming, send, recv, idle).await?;
        let t_finish = Instant::now();
        let joined = Arc::new(streaming.finish()?);
        let finish_secs = t_finish.elapsed().as_secs_f64();
        let session = joined.session();
        let payload = joined.encode();
        let name = place.as_ref().map_or_else(
            || "holder".to_string(),
            |p| shard_join_name(p.shard, p.shards, &p.key_id),
        );
        lock(&self.inner.state).put_join(&session, &name, &data.version, l.join_ttl_secs, &payload)?;
        lock(&self.inner.state).record_inputs(&input_name, &fp, l.join_ttl_secs)?;
        lock(&self.side.joins).insert(session, (joined.clone(), place.as_ref().map(|p| p.shard)));
        self.side.join_stored.notify_waiters();
        let secs = t.elapsed().as_secs_f64();
        let phases = vec![
            (Phase::Join, secs),
            (Phase::BankOwnRows, stats.own.as_secs_f64()),
            (Phase::BankPeerTokens, stats.peer.as_secs_f64()),
            (Phase::BankJoinWaiting, (stats.wait_in + stats.wait_out).as_secs_f64()),
            (Phase::BankJoinFinishing, finish_secs),
        ];
        {
            // The shard joins of one set add up (for the bench).
            let mut last_set = lock(&self.side.last_set);
            let mut last = lock(&self.inner.last_join);
            let set = place.as_ref().map(|p| p.set);
            if set.is_some() && *last_set == set && last.len() == phases.len() {
                for ((_, sum), (_, s)) in last.iter_mut().zip(&phases) {
                    *sum += s;
                }
            } else {
                *last = phases;
            }
            *last_set = set;
        }
        info!(rows = joined.rows(), seconds = secs, "join done");
        Ok(())
    }

    /// The join's parameters and the bank's policy for it (set-size limits,
    /// the cardinality noise of `cardinality_epsilon`).
    fn holder_join_rules(&self, context: [u8; 32]) -> Result<(JoinParams, HolderPolicy), NodeError> {
        let policy = HolderPolicy {
            peer_set: self.peer_set_limits(),
            cardinality: self.cardinality_noise()?,
        };
        Ok((self.join_params(context), policy))
    }

    /// Charges the join's cardinality ε to the bank's ledger (durably, on a
    /// blocking thread): per join, or once per set of shard joins; the
    /// inner result is the ledger's refusal, if any.
    pub(super) async fn charge_cardinality(
        &self,
        session: SessionId,
        place: Option<&ShardPlace>,
    ) -> Result<Result<(), NodeError>, NodeError> {
        // A bank worker's ledger is its coordinator's.
        if let (Some(_), Some(p)) = (self.inner.worker, place) {
            return self.charge_at_coordinator(p).await;
        }
        let node = self.clone();
        let eps = self.inner.limits.cardinality_epsilon_micro;
        let set = place.map(|p| {
            let split = crate::state::ShardSplit {
                shards: p.shards,
                key_id: p.key_id,
                max_age_secs: i64::try_from(self.inner.limits.join_ttl_secs).unwrap_or(i64::MAX),
            };
            (split, p.set, p.shard)
        });
        tokio::task::spawn_blocking(move || {
            let l = &node.inner.limits;
            let mut state = lock(&node.inner.state);
            match set {
                None => state.charge_cardinality(&session, "join", eps, l.cardinality_budget_micro, l.period_days),
                Some((split, set, shard)) => {
                    state.charge_shard_join(&split, &set, shard, eps, l.cardinality_budget_micro, l.period_days)
                }
            }
        })
        .await
        .map_err(|_| NodeError::Internal("ledger task failed"))
    }

    /// A join by session, with the shard it is of (`None` unsharded).
    pub(super) fn holder_join_by_session(
        &self,
        session: &SessionId,
        version: &[u8; 32],
    ) -> Result<Option<ShardJoined>, NodeError> {
        if let Some(j) = lock(&self.side.joins).get(session) {
            return Ok(Some(j.clone()));
        }
        let Some((name, payload)) = lock(&self.inner.state).join_entry_by_session(session, version)? else {
            return Ok(None);
        };
        // A cached join that does not decode (another encoding version, a
        // damaged row) is dropped: the platform then joins again.
        let split = self.inner.sharding.as_ref().map(|sh| (sh.count, &sh.key_id));
        let shard = shard_of_join_name(&name, split);
        let joined = match (HolderJoined::decode(*session, &payload), shard) {
            (Ok(j), Some(shard)) => (Arc::new(j), shard),
            (Err(e), _) => {
                warn!(error = %e, "a cached join does not decode; dropped");
                lock(&self.inner.state).drop_join(session)?;
                return Ok(None);
            }
            (Ok(_), None) => {
                warn!("a cached join of another split into shards; dropped");
                lock(&self.inner.state).drop_join(session)?;
                return Ok(None);
            }
        };
        lock(&self.side.joins).insert(*session, joined.clone());
        Ok(Some(joined))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn holder_aggregate(
        &self,
        data: &HolderData,
        plan: &Plan,
        values: Arc<dyn RowSource>,
        qid: &QueryId,
        join_session: SessionId,
        group: u32,
        shard: Option<u32>,
        first: &[u8],
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) -> Result<(Share, pump::PumpStats, SessionId), NodeError> {
        let setup_session = match Message::decode(first) {
            Ok(Message::OtSetup(s)) => s.session,
            _ => cleanroom_wire::SessionId([0; 16]),
        };
        // The platform may open the aggregate the moment it has the join's
        // last token, before this side has stored the join: wait briefly.
        let deadline = Instant::now() + self.inner.limits.timeouts.join_stored;
        let found = loop {
            // Registered before the check, so a join stored in between wakes it.
            let stored = self.side.join_stored.notified();
            if let Some((j, of)) = self.holder_join_by_session(&join_session, &data.version)? {
                break Some((j, of));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, stored).await.is_err() {
                break None;
            }
        };
        let Some((joined, of)) = found else {
            abort(&mut send, setup_session, AbortCode::UnknownJoin).await;
            return Err(NodeError::UnknownJoin);
        };
        if of != shard {
            // A shard's batch over another shard's join (or a join of no
            // shard) would sum some customers twice and others never.
            abort(&mut send, setup_session, AbortCode::Refused).await;
            return Err(not_sharded_alike(
                "an aggregate batch over a join of another shard than its own".into(),
            ));
        }
        if joined.customers() > plan.clip.max_customers {
            // Checked before the charge too (`before_charge`); a join of
            // other data cannot be summed in this plan's share widths.
            abort(&mut send, setup_session, AbortCode::Refused).await;
            return Err(NodeError::refused(RefusalCode::InputLimit, TOO_MANY_CUSTOMERS));
        }
        let (qid, digest, first) = (*qid, plan.digest(), first.to_vec());
        let bits = CellBits::new(plan.batch_bits())?;
        let started = tokio::task::spawn_blocking(move || {
            let mut rng = session_rng()?;
            let agg = HolderAggregate::new(joined, values, qid, digest, group)?.with_cell_bits(bits)?;
            agg.on_setup(&first, &mut rng).map_err(NodeError::from)
        })
        .await
        .map_err(|_| NodeError::Internal("aggregate task failed"))?;
        let (running, answer) = match started {
            Ok(x) => x,
            Err(NodeError::Protocol(e)) => {
                abort(&mut send, setup_session, e.abort_code()).await;
                return Err(NodeError::Protocol(e));
            }
            Err(e) => return Err(e),
        };
        write_one(&mut send, &answer).await?;
        let _ = &mut recv;
        let (running, stats) =
            pump::run_with_stats(running, send, recv, self.inner.limits.timeouts.stream_idle).await?;
        let session = running.session();
        Ok((running.finish()?, stats, session))
    }
}

/// A stored join and the shard it is of (`None` unsharded).
type ShardJoined = (Arc<HolderJoined>, Option<u32>);

/// Where a shard's join sits: its shard, the count, the platform's set it
/// belongs to, and the shard's customers in the node's numbering.
pub(super) struct ShardPlace {
    shard: u32,
    shards: u32,
    key_id: [u8; 32],
    set: [u8; 16],
    range: std::ops::Range<usize>,
}

impl ShardPlace {
    /// The place a bank worker's charge names (no customers: the charge
    /// needs only the split, the set and the shard).
    pub(super) fn for_charge(h: &cleanroom_wire::ShardJoin) -> Self {
        Self {
            shard: h.shard,
            shards: h.shards,
            key_id: h.shard_key_id,
            set: h.set,
            range: 0..0,
        }
    }

    /// The header a bank worker's charge sends its coordinator.
    pub(super) fn header(&self) -> cleanroom_wire::ShardJoin {
        cleanroom_wire::ShardJoin {
            shards: self.shards,
            shard: self.shard,
            shard_key_id: self.key_id,
            set: self.set,
            base_context: [0; 32],
        }
    }
}

/// The name a shard's join is stored under in the state file: its shard,
/// the count and the shard key's id (a join of another split is never
/// read back as one of this split: its customers are numbered by another
/// split's shard files).
fn shard_join_name(shard: u32, shards: u32, key_id: &[u8; 32]) -> String {
    format!("holder-shard {shard} of {shards} key {}", hex(key_id))
}

/// The shard of a stored join by its name, for a node split as `split`
/// (`None`: not split): `Some(None)` for an unsharded join when not split,
/// `Some(Some(s))` for shard `s` of the same split, `None` for a join of
/// another split.
fn shard_of_join_name(name: &str, split: Option<(u32, &[u8; 32])>) -> Option<Option<u32>> {
    if name == "holder" {
        return split.is_none().then_some(None);
    }
    let (shards, key_id) = split?;
    let s = name
        .strip_prefix("holder-shard ")?
        .split_once(' ')?
        .0
        .parse::<u32>()
        .ok()?;
    (s < shards && name == shard_join_name(s, shards, key_id)).then_some(Some(s))
}

/// A refusal of a peer whose split into shards is not this node's (or
/// whose messages do not fit it): the operators must configure `[shards]`
/// alike.
fn not_sharded_alike(why: String) -> NodeError {
    NodeError::refused(RefusalCode::PeerRefused, why)
}
