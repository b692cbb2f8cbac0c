//! The platform (matcher): the connection to the bank, the join (or the
//! cached one) and the aggregate batches of a query, and the share check.

use super::*;

/// What only the platform has.
pub(super) struct PlatformSide {
    /// Its users.
    pub(super) data: MatcherData,
    /// Cached joins by matcher filter (and shard count).
    joins: Mutex<HashMap<String, Arc<QueryJoin>>>,
    /// One attempt at a time per query id (a retry waits for an earlier
    /// attempt still running here, then finds its stored share), and the
    /// analyst's cancels; a wake-up when an attempt ends.
    pub(super) queries: Mutex<PlatformQueries>,
    pub(super) changed: Notify,
    /// The bank's address and the name in its certificate (a bank worker's
    /// for a platform worker when the bank has workers), and the
    /// connection to it once made.
    bank_address: SocketAddr,
    bank_name: String,
    pub(super) bank_conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    /// Serialises queries (so two queries that need the same join do not
    /// both run it), round robin between analysts.
    pub(super) turns: crate::turns::Turns,
    /// A worker: the shard joins it ran for its coordinator.
    pub(super) held: Mutex<super::worker::HeldJoins>,
}

impl PlatformSide {
    pub(super) fn new(data: MatcherData, (bank_address, bank_name): (SocketAddr, String)) -> Self {
        Self {
            data,
            joins: Mutex::new(HashMap::new()),
            queries: Mutex::new(PlatformQueries::default()),
            changed: Notify::new(),
            bank_address,
            bank_name,
            bank_conn: tokio::sync::Mutex::new(None),
            turns: crate::turns::Turns::default(),
            held: Mutex::new(super::worker::HeldJoins::default()),
        }
    }
}

/// A platform node: the node's shared state and the platform's own. Only
/// `Node::sided` makes one, for a platform.
#[derive(Clone)]
pub(super) struct Platform {
    pub(super) node: Node,
    pub(super) side: Arc<PlatformSide>,
}

impl std::ops::Deref for Platform {
    type Target = Node;
    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Platform {
    /// Platform: whether the bank holds its share of `run` of this query.
    pub(super) async fn bank_holds(&self, qid: &QueryId, run: &Run) -> Result<BankHolds, NodeError> {
        let conn = self.peer_connection().await.map_err(|e| {
            NodeError::refused(
                RefusalCode::PeerUnreachable,
                format!("the platform node cannot reach the bank node: {e}"),
            )
        })?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| PeerError::Transport(e.to_string()))?;
        write_one(
            &mut send,
            &Message::ShareCheck(ShareCheck {
                query_id: *qid,
                run: *run,
            }),
        )
        .await?;
        let _ = send.finish();
        let answer = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
        match Message::decode(&answer).map_err(|e| NodeError::Protocol(e.into()))? {
            Message::ShareHeld(h) if h.query_id == *qid => Ok(match (h.held, h.busy) {
                (true, _) => BankHolds::Held,
                (false, true) => BankHolds::Busy,
                (false, false) => BankHolds::NotHeld,
            }),
            other => Err(PeerError::Unexpected {
                expected: "the bank's answer about its stored share",
                got: other.kind(),
            }
            .into()),
        }
    }

    pub(super) async fn peer_connection(&self) -> Result<quinn::Connection, NodeError> {
        let mut guard = self.side.bank_conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let conn = connect(&self.inner.endpoint, self.side.bank_address, &self.side.bank_name).await?;
        // Show each other the signed templates first.
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| PeerError::Transport(e.to_string()))?;
        let mine = Message::Policy(PolicyMessage {
            signed: self.inner.own_policy_json.clone(),
        });
        write_one(&mut send, &mine).await?;
        let _ = send.finish();
        let frame = read_one(&mut recv, self.inner.limits.timeouts.peer_frame).await?;
        match Message::decode(&frame) {
            Ok(Message::Policy(p)) => self.peer_policy_from(&p.signed)?,
            Ok(other) => {
                return Err(PeerError::Unexpected {
                    expected: "the bank's signed policy",
                    got: other.kind(),
                }
                .into());
            }
            Err(_) => {
                return Err(PeerError::Unexpected {
                    expected: "the bank's signed policy",
                    got: "a frame that does not decode",
                }
                .into());
            }
        }
        *guard = Some(conn.clone());
        Ok(conn)
    }

    pub(super) fn join_context(&self, filter: &str, version: &[u8; 32]) -> [u8; 32] {
        let mut v = b"cleanroom-join-context-v1\n".to_vec();
        v.extend_from_slice(filter.as_bytes());
        v.push(b'\n');
        v.extend_from_slice(version);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest(&SHA256, &v).as_ref());
        out
    }

    /// The key a join for `filter` is cached under: the filter itself
    /// unsharded, else with the shard count (a join of another split is
    /// never reused).
    fn join_cache_key(&self, filter: &str) -> String {
        match &self.inner.sharding {
            None => filter.to_string(),
            Some(sh) => format!("{filter}\nshards {} key {}", sh.count, hex(&sh.key_id)),
        }
    }

    /// Platform: the cached join for `filter` on this data version, if any
    /// (in memory, else from the state file).
    pub(super) fn cached_matcher_join(
        &self,
        filter: &str,
        version: &[u8; 32],
    ) -> Result<Option<Arc<QueryJoin>>, NodeError> {
        let key = self.join_cache_key(filter);
        if let Some(j) = lock(&self.side.joins).get(&key) {
            return Ok(Some(j.clone()));
        }
        let cached = lock(&self.inner.state).join_for_filter(&key, version)?;
        let Some((session, payload)) = cached else {
            return Ok(None);
        };
        // A cached join that does not decode is dropped, and joined again.
        let decoded = match &self.inner.sharding {
            None => MatcherJoined::decode(session, &payload).map(|j| QueryJoin::one(Arc::new(j))),
            Some(sh) => QueryJoin::decode(
                session,
                &payload,
                sh.count,
                self.inner.workers.as_ref().map_or(0, |w| w.count()),
            ),
        };
        let j = match decoded {
            Ok(j) => Arc::new(j),
            Err(e) => {
                warn!(error = %e, "a cached join does not decode; dropped");
                lock(&self.inner.state).drop_join(&session)?;
                return Ok(None);
            }
        };
        lock(&self.side.joins).insert(key, j.clone());
        Ok(Some(j))
    }

    /// The join's parameters and the platform's policy for it.
    fn matcher_join_rules(&self, context: [u8; 32]) -> Result<(JoinParams, MatcherPolicy), NodeError> {
        let params = self.join_params(context);
        let policy = MatcherPolicy {
            peer_set: self.peer_set_limits(),
            max_dummy_rows: self.inner.limits.max_dummy_rows,
            block_padding: Some(self.cardinality_noise()?),
        };
        Ok((params, policy))
    }

    /// The seed of a join's block padding. The padding of each block is a
    /// function of this node's key and the join's input (filter, grouping
    /// and data version: the join context), so a re-join of unchanged data
    /// shows the bank the same padded sizes, never a fresh sample to
    /// average; a worker gets the seed from its coordinator, so the same
    /// holds whichever worker runs the join.
    pub(super) fn padding_seed(&self, context: &[u8; 32]) -> Zeroizing<[u8; 32]> {
        let key = ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            crate::state::derive(&self.inner.node_key, b"cleanroom-v1-block-padding").as_slice(),
        );
        let tag = ring::hmac::sign(&key, context);
        let mut seed = Zeroizing::new([0u8; 32]);
        seed.copy_from_slice(tag.as_ref().get(..32).unwrap_or(&[0u8; 32]));
        seed
    }

    pub(super) async fn matcher_join(
        &self,
        data: &MatcherData,
        plan: &Plan,
        fresh: bool,
    ) -> Result<(Arc<QueryJoin>, Option<Vec<(Phase, f64)>>), NodeError> {
        let filter = plan.join_filter();
        // The minimum input applies to every query, cached join or not
        // (counted without copying identifiers).
        let indices = matcher_block_indices(plan, data, &self.inner.domains);
        // Users, not keys: with several keys a user's keys count once.
        let input = data.users_of(indices.iter().flatten().copied());
        if (input as u64) < self.inner.limits.min_input_set {
            return Err(NodeError::refused(
                RefusalCode::InputLimit,
                format!(
                    "minimum input limit: fewer platform users match this query's platform conditions than the minimum of {}; widen the conditions",
                    self.inner.limits.min_input_set
                ),
            ));
        }
        if !fresh && let Some(j) = self.cached_matcher_join(&filter, &data.version)? {
            match j.worker_parts() {
                Some(parts) if !self.workers_hold(parts).await? => {
                    lock(&self.side.joins).remove(&self.join_cache_key(&filter));
                    lock(&self.inner.state).drop_join(&j.session())?;
                }
                _ => return Ok((j, None)),
            }
        }
        let t = Instant::now();
        let fp = crate::state::sorted_fingerprints(
            &self.inner.fingerprints,
            self.identifiers(),
            indices.iter().flatten().copied(),
        )?;
        lock(&self.inner.state).check_churn(&filter, &fp, self.inner.limits.max_churn_ppm)?;
        let l = &self.inner.limits;
        let base = self.join_context(&filter, &data.version);
        let mut stats = pump::PumpStats::default();
        let mut match_secs = 0.0;
        let joined = match &self.inner.sharding {
            None => {
                let padding = self.padding_seed(&base);
                let (j, st, m) = self.one_join(&data.ids, base, &indices, None, padding).await?;
                stats.add(&st);
                match_secs += m;
                QueryJoin::one(Arc::new(j))
            }
            Some(sh) => {
                // One set of shard joins for this query: the bank charges
                // its cardinality epsilon once for the set.
                let mut set = [0u8; 16];
                cleanroom_crypto::rng::SystemRng::new().try_fill(&mut set)?;
                // Each shard's users per group, in one pass, numbered
                // within their shard (`0..n_s`, its file's order).
                let mut per_shard: Vec<Vec<Vec<usize>>> = vec![vec![Vec::new(); indices.len()]; sh.len()];
                for (g, block) in indices.iter().enumerate() {
                    for k in block {
                        let placed = sh.store.shard_of(*k).and_then(|s| {
                            let start = sh.store.range(s)?.start;
                            Some((per_shard.get_mut(s as usize)?.get_mut(g)?, k.checked_sub(start)?))
                        });
                        // Every user is in one shard: one left out would
                        // change the answer, so it is an error.
                        let (b, local) = placed.ok_or(NodeError::Internal("a user outside every shard"))?;
                        b.push(local);
                    }
                }
                match &self.inner.workers {
                    None => {
                        let mut parts = Vec::with_capacity(sh.len());
                        for (s, blocks) in (0..sh.count).zip(per_shard) {
                            // The shard's users, read back from its file (or kept in memory).
                            let ids = sh.matcher(s).await?;
                            let header = cleanroom_wire::ShardJoin {
                                shards: sh.count,
                                shard: s,
                                shard_key_id: sh.key_id,
                                set,
                                base_context: base,
                            };
                            let context = cleanroom_protocol::queries::shard_join_context(&base, sh.count, s);
                            let padding = self.padding_seed(&context);
                            let (j, st, m) = self.one_join(&ids, context, &blocks, Some(header), padding).await?;
                            stats.add(&st);
                            match_secs += m;
                            parts.push(Arc::new(j));
                        }
                        QueryJoin::sharded(parts)
                    }
                    // Each worker runs its shards' joins, the workers at once.
                    Some(pool) => {
                        let header = |s| cleanroom_wire::ShardJoin {
                            shards: sh.count,
                            shard: s,
                            shard_key_id: sh.key_id,
                            set,
                            base_context: base,
                        };
                        let mut asks = Vec::with_capacity(sh.len());
                        for (s, blocks) in (0..sh.count).zip(per_shard) {
                            let context = cleanroom_protocol::queries::shard_join_context(&base, sh.count, s);
                            let users = sh.store.range(s).map_or(0, |r| r.len());
                            asks.push(super::worker::JoinAsk {
                                header: header(s),
                                shard_users: u32::try_from(users)
                                    .map_err(|_| NodeError::Internal("a shard too large"))?,
                                blocks,
                                padding: self.padding_seed(&context),
                            });
                        }
                        let (parts, st, m) = self.joins_on_workers(pool, asks).await?;
                        stats.add(&st);
                        match_secs += m;
                        QueryJoin::on_workers(parts)
                    }
                }
            }
        };
        let joined = Arc::new(joined);
        let payload = joined.encode();
        let key = self.join_cache_key(&filter);
        lock(&self.inner.state).put_join(&joined.session(), &key, &data.version, l.join_ttl_secs, &payload)?;
        lock(&self.inner.state).record_inputs(&filter, &fp, l.join_ttl_secs)?;
        lock(&self.side.joins).insert(key, joined.clone());
        let secs = t.elapsed().as_secs_f64();
        info!(rows = joined.rows(), shards = joined.len(), seconds = secs, "join done");
        let phases = vec![
            (Phase::Join, secs),
            (Phase::PlatformOwnTokens, stats.own.as_secs_f64()),
            (Phase::PlatformPeerPoints, stats.peer.as_secs_f64()),
            (
                Phase::PlatformJoinWaiting,
                (stats.wait_in + stats.wait_out).as_secs_f64(),
            ),
            (Phase::PlatformMatching, match_secs),
        ];
        lock(&self.inner.last_join).clone_from(&phases);
        Ok((joined, Some(phases)))
    }

    /// One join with the bank over the users of `blocks` (indices in
    /// `ids`, one list per group), under `context`; a sharded one starts
    /// with its shard header. The join, where its time went, and the
    /// matching's seconds.
    pub(super) async fn one_join(
        &self,
        ids: &cleanroom_protocol::join::OwnIds,
        context: [u8; 32],
        blocks: &[Vec<usize>],
        header: Option<cleanroom_wire::ShardJoin>,
        padding: Zeroizing<[u8; 32]>,
    ) -> Result<(MatcherJoined, pump::PumpStats, f64), NodeError> {
        let (params, policy) = self.matcher_join_rules(context)?;
        let padding = cleanroom_protocol::join::PaddingSeed::new(padding);
        let conn = self.peer_connection().await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| PeerError::Transport(e.to_string()))?;
        let mut rng = session_rng()?;
        let mut m = MatcherJoin::grouped_from(params, policy, ids, blocks)?.with_padding_seed(padding);
        if self.key_slots() > 1 {
            m = m.with_key_slots(self.key_slots())?;
        }
        let (offered, offer) = m.offer(&mut rng)?;
        if let Some(h) = header {
            write_one(&mut send, &Message::ShardJoin(h)).await?;
        }
        write_one(&mut send, &offer).await?;
        let waits = &self.inner.limits.timeouts;
        let accept = read_one(&mut recv, waits.join_accept).await?;
        let streaming = offered.on_accept(&accept)?;
        let (streaming, stats) = pump::run_with_stats(streaming, send, recv, waits.stream_idle).await?;
        // Offer/accept, then the streamed tokens and rows.
        self.count_exchanges(2, &stats);
        let t_match = Instant::now();
        let joined = tokio::task::spawn_blocking(move || streaming.finish())
            .await
            .map_err(|_| NodeError::Internal("join task failed"))??;
        Ok((joined, stats, t_match.elapsed().as_secs_f64()))
    }

    /// Platform: the steps of an analyst's request after its charge, as
    /// `cleanroom_protocol::attempt`'s machine asks for them: the share
    /// check, the analyst's turn and the join, one aggregate batch per
    /// platform group, then the release (or the stored share, or a
    /// refusal).
    pub(super) async fn attempt(
        &self,
        charged: &ledger::Charged,
        r: &ChargedRequest<'_>,
    ) -> Result<QueryShare, NodeError> {
        let qid = &r.q.query_id;
        let l = &self.inner.limits;
        let mut machine = PlatformAttempt::new(self.inner.data_version, l.max_reruns_per_query);
        let mut shell = AttemptShell::default();
        let mut next = machine.charged(charged);
        loop {
            next = match next {
                Action::AskBank(run) => {
                    let answer = self.bank_holds(qid, &run).await?;
                    machine.bank_answered(answer, &self.charged(qid)?)
                }
                Action::Join(choice) => {
                    let first = shell.turn.is_none();
                    if first {
                        // The query computes: its noise is drawn while it
                        // waits for its turn and runs.
                        shell.noise = Some((self.start_noise(r)?, Instant::now()));
                        shell.turn = Some(tokio::select! {
                            s = self.side.turns.take(r.analyst) => s,
                            () = r.from.gone() => {
                                info!("query dropped while waiting for its turn: its analyst has gone");
                                return Err(analyst_gone());
                            }
                        });
                    }
                    // A cancel (the bank refused the query) stops it before
                    // its first join.
                    if first && lock(&self.side.queries).take_cancelled(qid) {
                        machine.cancelled()
                    } else {
                        if let JoinChoice::Only(_) = choice {
                            info!(
                                "the bank has no share of this query's run (it stopped before storing it); running the aggregate again over the same join, with the same noise"
                            );
                        }
                        match self.join_for(choice, &r.plan, &mut shell.timings).await? {
                            Some(joined) => {
                                let (session, groups) = (joined.session(), joined.batches());
                                shell.joined = Some(joined);
                                let groups =
                                    u32::try_from(groups).map_err(|_| NodeError::Internal("too many groups"))?;
                                machine.joined(session, groups)
                            }
                            None => machine.no_join(),
                        }
                    }
                }
                Action::SendBatch { join, group } => {
                    let joined = shell
                        .joined
                        .clone()
                        .filter(|j| j.session() == join)
                        .ok_or(NodeError::Internal("a batch over a join this attempt does not have"))?;
                    let (part, shard, g) = joined
                        .batch(group)
                        .ok_or(NodeError::Internal("a batch the join does not have"))?;
                    let header = self.inner.sharding.as_ref().map(|sh| cleanroom_wire::ShardBatch {
                        shards: sh.count,
                        shard,
                        joins: joined.sessions(),
                    });
                    let bits = plan_bits(&r.plan)?;
                    let done = match part {
                        Part::Here(j) => {
                            self.matcher_batch(j, bits, r.plan.digest(), qid, (group, g), header, &mut shell.aggregate)
                                .await
                        }
                        Part::Worker(p) => {
                            let header = header.ok_or(NodeError::Internal("a worker's batch of no shard"))?;
                            self.batch_on_worker(p, &r.plan, qid, (group, g), header, &mut shell.aggregate)
                                .await
                        }
                    };
                    match done {
                        Ok((session, words)) => machine.batch_done(group, session, words),
                        Err(NodeError::Protocol(ProtocolError::PeerAborted { code })) => machine.aborted(code),
                        Err(e) => return Err(e),
                    }
                }
                Action::Store(assembled) => return self.store_attempt(r, shell, assembled).await,
                Action::Replay => return self.replay(qid),
                Action::End(outcome) => return Err(attempt_ended(outcome)),
            };
        }
    }

    /// The join an attempt asked for: the cached or a new one, only the
    /// released share's (for a rerun: `None` if it is gone), or a new one
    /// after the bank lost the cached one.
    async fn join_for(
        &self,
        choice: JoinChoice,
        plan: &Plan,
        timings: &mut Vec<(Phase, f64)>,
    ) -> Result<Option<Arc<QueryJoin>>, NodeError> {
        let data = &self.side.data;
        let (joined, phases) = match choice {
            JoinChoice::CachedOrNew => self.matcher_join(data, plan, false).await?,
            // A rerun uses the cached join of the first release, or none:
            // it never opens a new join (which would charge the bank's ε_c
            // for nothing, since a rerun over it is refused).
            JoinChoice::Only(first) => {
                return Ok(self
                    .cached_matcher_join(&plan.join_filter(), &data.version)?
                    .filter(|j| j.session() == first));
            }
            JoinChoice::New { dropped } => {
                info!("the bank no longer has this join; joining again");
                lock(&self.side.joins).remove(&self.join_cache_key(&plan.join_filter()));
                lock(&self.inner.state).drop_join(&dropped)?;
                self.matcher_join(data, plan, true).await?
            }
        };
        timings.extend(phases.unwrap_or_default());
        Ok(Some(joined))
    }

    /// One aggregate batch, the query's `k`-th: the OT for platform group
    /// `g` over `joined` (choices e_i AND label_i == g), after its shard
    /// header when sharded; its session and this node's words.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn matcher_batch(
        &self,
        joined: &MatcherJoined,
        bits: CellBits,
        digest: [u8; 32],
        qid: &QueryId,
        (k, g): (u32, u32),
        header: Option<cleanroom_wire::ShardBatch>,
        aggregate: &mut AggregateRun,
    ) -> Result<(SessionId, Vec<u64>), NodeError> {
        if k == 0 || aggregate.conn.is_none() {
            *aggregate = AggregateRun {
                conn: Some(self.peer_connection().await?),
                started: Some(Instant::now()),
                stats: pump::PumpStats::default(),
            };
        }
        let conn = aggregate
            .conn
            .as_ref()
            .ok_or(NodeError::Internal("an aggregate without its connection"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| PeerError::Transport(e.to_string()))?;
        let mut rng = session_rng()?;
        let choices = joined.choices_for_block(g);
        let (waiting, setup) = MatcherAggregate::start_with_bits(joined, &choices, bits, *qid, digest, g, &mut rng)?;
        if let Some(h) = header {
            write_one(&mut send, &Message::ShardBatch(h)).await?;
        }
        write_one(&mut send, &setup).await?;
        // Not dropped when the analyst goes: the bank may be about to
        // claim this batch for a retry of the same query id (and it
        // answers within 2 s for an id it refused or dropped).
        let answer = read_one(&mut recv, self.inner.limits.query_timeout).await?;
        let running = waiting.on_choices(&answer)?;
        let idle = self.inner.limits.timeouts.stream_idle;
        let (running, stats) = pump::run_with_stats(running, send, recv, idle).await?;
        // Setup/answer, then the streamed extension and masked rows.
        self.count_exchanges(2, &stats);
        aggregate.stats.add(&stats);
        let session = running.session();
        Ok((session, running.finish()?.words().to_vec()))
    }

    /// The attempt's share is assembled: its timings, then the release.
    async fn store_attempt(
        &self,
        r: &ChargedRequest<'_>,
        shell: AttemptShell,
        a: Assembled<Vec<u64>>,
    ) -> Result<QueryShare, NodeError> {
        let AttemptShell {
            turn,
            noise,
            mut timings,
            aggregate,
            ..
        } = shell;
        // The next query's turn may start while this one stores.
        drop(turn);
        let (noise, started) = noise.ok_or(NodeError::Internal("a share assembled before its noise was drawn"))?;
        let total = &aggregate.stats;
        timings.extend([
            (
                Phase::Aggregate,
                aggregate.started.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            ),
            (Phase::PlatformOtExtension, total.own.as_secs_f64()),
            (Phase::PlatformUnmask, total.peer.as_secs_f64()),
            (
                Phase::PlatformAggregateWaiting,
                (total.wait_in + total.wait_out).as_secs_f64(),
            ),
        ]);
        let words = a.batches.concat();
        let share = match &self.inner.sharding {
            None => Share::from_words(words),
            // Each group's shares of the shards, added up.
            Some(sh) => cleanroom_protocol::queries::fold_shards(&words, sh.len())
                .ok_or(NodeError::Internal("the shards' shares do not add up to one share"))?,
        };
        self.release(r, share, a.run, a.join, noise, timings, a.rerun, started)
            .await
    }
}

/// What the platform's shell keeps while it drives one attempt.
#[derive(Default)]
struct AttemptShell {
    /// The analyst's turn, once its first join is asked for.
    turn: Option<crate::turns::Turn>,
    /// The query's noise, drawn from its seed once the attempt computes
    /// (its first join), and when that started.
    noise: Option<(NoiseTask, Instant)>,
    joined: Option<Arc<QueryJoin>>,
    timings: Vec<(Phase, f64)>,
    aggregate: AggregateRun,
}

/// The aggregate's batches so far (over one join; a new join starts over).
#[derive(Default)]
pub(super) struct AggregateRun {
    pub(super) conn: Option<quinn::Connection>,
    /// When the first batch started (none for a join of no groups).
    pub(super) started: Option<Instant>,
    pub(super) stats: pump::PumpStats,
}

/// A plan's cell widths of one batch.
pub(super) fn plan_bits(plan: &Plan) -> Result<CellBits, NodeError> {
    Ok(CellBits::new(plan.batch_bits())?)
}

/// What the analyst is told when an attempt ends without a share.
fn attempt_ended(outcome: Outcome) -> NodeError {
    match outcome {
        Outcome::Busy => NodeError::refused(
            RefusalCode::Busy,
            "the bank node is still finishing this query id; ask again shortly with the same id",
        ),
        Outcome::RerunRefused(why) => {
            warn!(error = %why, "the bank has no share of this query's run, and it cannot be run again here");
            NodeError::refused(RefusalCode::RerunRefused, why.to_string())
        }
        Outcome::PeerRefused => NodeError::refused(
            RefusalCode::PeerRefused,
            "the bank node has not accepted this query (it refused it or never received it); see its answer",
        ),
        Outcome::Cancelled => NodeError::refused(
            RefusalCode::PeerRefused,
            "cancelled: the bank node refused this query id (a retry under the same id costs nothing more)",
        ),
        Outcome::PeerAborted(code) => ProtocolError::PeerAborted { code }.into(),
        Outcome::Unexpected(what) => NodeError::Internal(what),
    }
}

/// The join a query's batches run over: one join, or, when the
/// collaboration is sharded, one per shard (named together by
/// `queries::sharded_join_id`), held here or by this node's workers. Batch
/// `k` is shard `k / G`'s group `k % G`.
pub(super) struct QueryJoin {
    session: SessionId,
    parts: Parts,
}

/// The shard joins of a query, here or on the workers.
enum Parts {
    Here(Vec<Arc<MatcherJoined>>),
    Workers(Vec<WorkerPart>),
}

/// A shard's join a worker holds: which worker, its session, groups and rows.
#[derive(Clone, Copy, Debug)]
pub(super) struct WorkerPart {
    pub(super) worker: u32,
    pub(super) session: SessionId,
    pub(super) groups: u32,
    pub(super) rows: u64,
}

/// One batch's join.
pub(super) enum Part<'a> {
    Here(&'a MatcherJoined),
    Worker(WorkerPart),
}

/// The first bytes of a stored set of shard joins.
const SHARDED_JOIN_MAGIC: &[u8; 8] = b"CRSJOIN1";
/// The first bytes of a stored set of shard joins the workers hold.
const WORKER_JOIN_MAGIC: &[u8; 8] = b"CRWJOIN1";

impl QueryJoin {
    fn one(j: Arc<MatcherJoined>) -> Self {
        Self {
            session: j.session(),
            parts: Parts::Here(vec![j]),
        }
    }

    fn sharded(parts: Vec<Arc<MatcherJoined>>) -> Self {
        let sessions: Vec<SessionId> = parts.iter().map(|p| p.session()).collect();
        Self {
            session: cleanroom_protocol::queries::sharded_join_id(&sessions),
            parts: Parts::Here(parts),
        }
    }

    fn on_workers(parts: Vec<WorkerPart>) -> Self {
        let sessions: Vec<SessionId> = parts.iter().map(|p| p.session).collect();
        Self {
            session: cleanroom_protocol::queries::sharded_join_id(&sessions),
            parts: Parts::Workers(parts),
        }
    }

    /// Its name: the one join's session, or `J*` of the shards' joins.
    pub(super) fn session(&self) -> SessionId {
        self.session
    }

    /// The parts' sessions, in shard order.
    fn sessions(&self) -> Vec<SessionId> {
        match &self.parts {
            Parts::Here(p) => p.iter().map(|p| p.session()).collect(),
            Parts::Workers(p) => p.iter().map(|p| p.session).collect(),
        }
    }

    /// The parts the workers hold, if they do.
    fn worker_parts(&self) -> Option<&[WorkerPart]> {
        match &self.parts {
            Parts::Here(_) => None,
            Parts::Workers(p) => Some(p),
        }
    }

    /// The number of parts (shards, or 1).
    fn len(&self) -> usize {
        match &self.parts {
            Parts::Here(p) => p.len(),
            Parts::Workers(p) => p.len(),
        }
    }

    /// Platform groups (per shard: every shard's join has them all).
    fn groups(&self) -> usize {
        match &self.parts {
            Parts::Here(p) => p.first().map_or(0, |p| p.blocks()),
            Parts::Workers(p) => p.first().map_or(0, |p| p.groups as usize),
        }
    }

    /// Aggregate batches: one per shard and group.
    fn batches(&self) -> usize {
        self.len() * self.groups()
    }

    /// Rows over all shards.
    fn rows(&self) -> usize {
        match &self.parts {
            Parts::Here(p) => p.iter().map(|p| p.rows()).sum(),
            Parts::Workers(p) => p.iter().map(|p| usize::try_from(p.rows).unwrap_or(usize::MAX)).sum(),
        }
    }

    /// Batch `k`'s join, shard and group.
    fn batch(&self, k: u32) -> Option<(Part<'_>, u32, u32)> {
        let groups = u32::try_from(self.groups()).ok().filter(|g| *g > 0)?;
        let (shard, g) = (k / groups, k % groups);
        let part = match &self.parts {
            Parts::Here(p) => Part::Here(p.get(shard as usize)?),
            Parts::Workers(p) => Part::Worker(*p.get(shard as usize)?),
        };
        Some((part, shard, g))
    }

    /// The state file's form: unsharded, the one join's; sharded, the
    /// magic, `S`, then each shard's session, length and join; on workers,
    /// the workers' magic, `S`, then each shard's session, worker, groups
    /// and rows.
    fn encode(&self) -> Vec<u8> {
        match &self.parts {
            Parts::Here(parts) => match parts.as_slice() {
                [one] if one.session() == self.session => one.encode(),
                parts => {
                    let mut out = SHARDED_JOIN_MAGIC.to_vec();
                    out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
                    for p in parts {
                        let bytes = p.encode();
                        out.extend_from_slice(p.session().as_ref());
                        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
                        out.extend_from_slice(&bytes);
                    }
                    out
                }
            },
            Parts::Workers(parts) => {
                let mut out = WORKER_JOIN_MAGIC.to_vec();
                out.extend_from_slice(&(parts.len() as u32).to_le_bytes());
                for p in parts {
                    out.extend_from_slice(p.session.as_ref());
                    out.extend_from_slice(&p.worker.to_le_bytes());
                    out.extend_from_slice(&p.groups.to_le_bytes());
                    out.extend_from_slice(&p.rows.to_le_bytes());
                }
                out
            }
        }
    }

    /// A stored set of `shards` shard joins named `session`; refused unless
    /// every part decodes, the parts' groups agree and they are named
    /// `session`. A set the workers hold is refused on a node with
    /// `workers` workers unless each part's worker is one of them.
    fn decode(session: SessionId, bytes: &[u8], shards: u32, workers: u32) -> Result<Self, ProtocolError> {
        let bad = || ProtocolError::LocalInput {
            reason: "stored set of shard joins does not decode",
        };
        let (here, rest) = match (
            bytes.strip_prefix(SHARDED_JOIN_MAGIC.as_slice()),
            bytes.strip_prefix(WORKER_JOIN_MAGIC.as_slice()),
        ) {
            (Some(rest), _) => (true, rest),
            (None, Some(rest)) => (false, rest),
            (None, None) => return Err(bad()),
        };
        let (count, mut rest) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
        if u32::from_le_bytes(*count) != shards {
            return Err(bad());
        }
        let joined = if here {
            let mut parts = Vec::with_capacity(shards as usize);
            for _ in 0..shards {
                let (s, r) = rest.split_first_chunk::<16>().ok_or_else(bad)?;
                let (len, r) = r.split_first_chunk::<8>().ok_or_else(bad)?;
                let len = usize::try_from(u64::from_le_bytes(*len)).map_err(|_| bad())?;
                if len > r.len() {
                    return Err(bad());
                }
                let (payload, r) = r.split_at(len);
                parts.push(Arc::new(MatcherJoined::decode(SessionId(*s), payload)?));
                rest = r;
            }
            Self::sharded(parts)
        } else {
            let mut parts = Vec::with_capacity(shards as usize);
            for _ in 0..shards {
                let (s, r) = rest.split_first_chunk::<16>().ok_or_else(bad)?;
                let (worker, r) = r.split_first_chunk::<4>().ok_or_else(bad)?;
                let (groups, r) = r.split_first_chunk::<4>().ok_or_else(bad)?;
                let (rows, r) = r.split_first_chunk::<8>().ok_or_else(bad)?;
                let part = WorkerPart {
                    worker: u32::from_le_bytes(*worker),
                    session: SessionId(*s),
                    groups: u32::from_le_bytes(*groups),
                    rows: u64::from_le_bytes(*rows),
                };
                if part.worker >= workers || part.groups == 0 {
                    return Err(bad());
                }
                parts.push(part);
                rest = r;
            }
            Self::on_workers(parts)
        };
        let groups = joined.groups();
        let same_groups = match &joined.parts {
            Parts::Here(p) => p.iter().all(|p| p.blocks() == groups),
            Parts::Workers(p) => p.iter().all(|p| p.groups as usize == groups),
        };
        if !rest.is_empty() || joined.session != session || !same_groups {
            return Err(bad());
        }
        Ok(joined)
    }
}
