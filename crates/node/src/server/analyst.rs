//! The analyst's side of a node: admission (rate, slots, the checks
//! before a charge), the charge, the step the ledger rules
//! (`cleanroom_protocol::ledger`) answer after it, and the release (noise,
//! store, answer).

use super::*;

impl Node {
    /// Whether `analyst` may send one more request now: a token bucket of
    /// twice `max_requests_per_analyst_per_second`, refilled at that rate.
    pub(super) fn within_rate(&self, analyst: &str) -> bool {
        self.rate_token(analyst, true)
    }

    /// Whether `analyst` has a request token now, without taking it.
    pub(super) fn rate_left(&self, analyst: &str) -> bool {
        self.rate_token(analyst, false)
    }

    pub(super) fn rate_token(&self, analyst: &str, take: bool) -> bool {
        let rate = f64::from(self.inner.limits.requests_per_second);
        let burst = 2.0 * rate;
        let now = Instant::now();
        let mut buckets = lock(&self.inner.request_rate);
        let (tokens, at) = buckets.entry(analyst.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.saturating_duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            if take {
                *tokens -= 1.0;
            }
            true
        } else {
            false
        }
    }

    /// A slot for one more running query of `analyst`, or why not: each
    /// analyst may have `max_queries_in_flight_per_analyst` queries running
    /// here, all together `max_queries_in_flight`. Refused before any charge.
    pub(super) fn admit(&self, analyst: &str) -> Result<Counted, Refusal> {
        let l = &self.inner.limits;
        Counted::take(self, analyst, |i| &i.in_flight, l.in_flight_per_analyst, l.in_flight).map_err(|(mine, total)| {
            let message = if mine >= l.in_flight_per_analyst {
                format!(
                    "analyst {analyst:?} already has {mine} queries running here (max_queries_in_flight_per_analyst); retry when one has finished"
                )
            } else {
                format!("{total} queries are running here (max_queries_in_flight); retry shortly")
            };
            Refusal::new(RefusalCode::TooManyQueries, message)
        })
    }

    /// Whether `analyst` holds an unexpired admission for `qid` here.
    pub(super) fn holds_admission(&self, analyst: &str, qid: &QueryId) -> bool {
        lock(&self.inner.admissions)
            .get(&(analyst.to_string(), *qid))
            .is_some_and(|h| h.until > Instant::now())
    }

    /// The running-query slot of `analyst`'s unexpired admission for `qid`,
    /// which ends the admission.
    pub(super) fn take_admission(&self, analyst: &str, qid: &QueryId) -> Option<Counted> {
        let held = lock(&self.inner.admissions).remove(&(analyst.to_string(), *qid))?;
        (held.until > Instant::now()).then_some(held.slot)
    }

    /// Answers `AnalystRequest::Admit`: every check `Query` makes before its
    /// charge, without charging; if all pass, the admission (with its
    /// running-query slot) is held for `admission_hold`.
    pub(super) async fn serve_admit(&self, analyst: &str, q: &QueryRequest) -> AnalystResponse {
        // A repeated admission replaces the earlier one (and frees its slot).
        let ended = lock(&self.inner.admissions).remove(&(analyst.to_string(), q.query_id));
        drop(ended);
        let slot = match self.admit(analyst) {
            Ok(slot) => slot,
            Err(why) => return AnalystResponse::Refused(why),
        };
        let checked = async {
            let template = self.template(&q.template)?.clone();
            let ready = self.before_charge(&self.sided(), analyst, q, &template).await?;
            self.would_charge(analyst, q, &template, &ready).await
        }
        .await;
        match checked {
            Ok(()) => {
                let until = Instant::now() + self.inner.limits.admission_hold;
                let id = self
                    .inner
                    .admission_ids
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let key = (analyst.to_string(), q.query_id);
                lock(&self.inner.admissions).insert(key.clone(), Held { slot, until, id });
                // Unless its query or a cancel comes first, the admission
                // ends (and frees its slot) when it expires.
                let inner = Arc::downgrade(&self.inner);
                tokio::spawn(async move {
                    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
                    if let Some(inner) = inner.upgrade() {
                        let mut held = lock(&inner.admissions);
                        let expired = match held.get(&key) {
                            Some(h) if h.id == id => held.remove(&key),
                            _ => None,
                        };
                        drop(held);
                        drop(expired);
                    }
                });
                AnalystResponse::Admitted
            }
            Err(NodeError::Refused(m)) => AnalystResponse::Refused(m),
            Err(e) => {
                warn!(error = %e, "admission check failed");
                AnalystResponse::Refused(Refusal::new(
                    RefusalCode::Failed,
                    format!(
                        "the {} node could not check the query: {}",
                        self.inner.role().as_str(),
                        analyst_view(&e)
                    ),
                ))
            }
        }
    }

    pub(super) async fn serve_analyst(&self, analyst: &str, req: AnalystRequest, from: &Requester) -> AnalystResponse {
        match req {
            AnalystRequest::Templates => {
                // A platform that cannot reach the bank lists nothing.
                let _ = self.peer_policy_or_wait(&self.sided()).await;
                AnalystResponse::Templates(
                    self.inner
                        .templates
                        .iter()
                        .filter(|t| t.analysts.iter().any(|a| a == analyst))
                        .filter(|t| self.not_runnable(t).is_none())
                        .map(template_info)
                        .collect(),
                )
            }
            AnalystRequest::Budget => {
                let spent = lock(&self.inner.state).spent(analyst, self.inner.limits.period_days);
                match spent {
                    Ok(spent) => {
                        let days = i64::from(self.inner.limits.period_days);
                        let period = period_of(now_secs(), self.inner.limits.period_days);
                        AnalystResponse::Budget(BudgetInfo {
                            node: self.inner.role().as_str().to_string(),
                            analyst: analyst.to_string(),
                            rho_limit_micro: self.inner.limits.rho_per_analyst_micro,
                            rho_spent_micro: spent,
                            period_days: self.inner.limits.period_days,
                            period_ends_day: (period + 1) * days,
                        })
                    }
                    Err(e) => AnalystResponse::Refused(Refusal::new(
                        RefusalCode::Failed,
                        format!("the node's ledger failed: {e}"),
                    )),
                }
            }
            AnalystRequest::Cancel(qid) => {
                let ended = lock(&self.inner.admissions).remove(&(analyst.to_string(), qid));
                drop(ended);
                let stopped = match self.sided() {
                    Sided::Platform(p) => {
                        let running = lock(&p.side.queries).cancel(&qid, analyst);
                        if running {
                            info!(query = %hex(&qid.0), "query cancelled: the bank refused it");
                        }
                        running
                    }
                    Sided::Bank(b) => {
                        // Its waiter ends (`PeerError::NoShare`).
                        let dropped = lock(&b.side.queries).cancel(&qid, analyst, Instant::now());
                        let waiting = dropped.is_some();
                        drop(dropped);
                        if waiting {
                            info!(query = %hex(&qid.0), "query cancelled: the platform refused it");
                        }
                        waiting
                    }
                };
                AnalystResponse::Cancelled(stopped)
            }
            AnalystRequest::Admit(q) => {
                let span = info_span!("admit", id = %hex(&q.query_id.0), template = %q.template);
                self.serve_admit(analyst, &q).instrument(span).await
            }
            AnalystRequest::Query(q) => {
                let span = info_span!("query", id = %hex(&q.query_id.0), template = %q.template);
                let side = self.sided();
                if let Sided::Bank(b) = &side {
                    b.request_arrived(&q.query_id);
                }
                let slot = match self.take_admission(analyst, &q.query_id) {
                    Some(held) => Ok(held),
                    None => self.admit(analyst),
                };
                let answer = match slot {
                    Ok(_slot) => self.answer_query(&side, analyst, &q, from).instrument(span).await,
                    Err(why) => AnalystResponse::Refused(why),
                };
                if let Sided::Bank(b) = &side
                    && matches!(answer, AnalystResponse::Refused(_))
                {
                    b.mark_refused(&q.query_id);
                }
                answer
            }
        }
    }

    pub(super) async fn answer_query(
        &self,
        side: &Sided,
        analyst: &str,
        q: &QueryRequest,
        from: &Requester,
    ) -> AnalystResponse {
        match self.run_query(side, analyst, q, from).await {
            Ok(share) => AnalystResponse::Share(Box::new(share)),
            Err(NodeError::Refused(m)) => AnalystResponse::Refused(m),
            Err(e) => {
                // The operator's log has the whole error; the analyst gets
                // its kind only (a peer's error can carry counts).
                warn!(error = %e, "query failed");
                AnalystResponse::Refused(Refusal::new(
                    RefusalCode::Failed,
                    format!(
                        "the {} node could not complete the query: {}. Retrying with the same query id costs no extra budget.",
                        self.inner.role().as_str(),
                        analyst_view(&e)
                    ),
                ))
            }
        }
    }

    pub(super) async fn run_query(
        &self,
        side: &Sided,
        analyst: &str,
        q: &QueryRequest,
        from: &Requester,
    ) -> Result<QueryShare, NodeError> {
        let template = self.template(&q.template)?.clone();
        let Sided::Platform(p) = side else {
            return self.run_query_serialised(side, analyst, q, template, from).await;
        };
        // Platform: a retry of a query id still running here (its client
        // gave up waiting) waits for that attempt, then finds its share.
        let Some(_attempt) = Attempt::arrive(p, q.query_id, analyst).start(from).await else {
            info!("query dropped while waiting for an earlier attempt: its analyst has gone");
            return Err(analyst_gone());
        };
        self.run_query_serialised(side, analyst, q, template, from).await
    }

    pub(super) async fn run_query_serialised(
        &self,
        side: &Sided,
        analyst: &str,
        q: &QueryRequest,
        template: Template,
        from: &Requester,
    ) -> Result<QueryShare, NodeError> {
        let ready = self.before_charge(side, analyst, q, &template).await?;
        let charge = self.ledger(analyst, q, &template, &ready, true).await?;
        match &charge {
            refused @ (Charge::OverBudget { .. } | Charge::TooManyRuns { .. }) => {
                return Err(self.charge_refused(refused, &template));
            }
            Charge::New => info!(rho = %format_micro(template.rho_micro), "charged"),
            Charge::Existing(None) => info!("query id already charged; computing its share (no new charge)"),
            Charge::Existing(Some(_)) => {}
        }
        // The noise, the audit entry and the share follow the ρ this query id
        // was charged: an operator may have changed the template's ρ since
        // (it is this node's own setting, not part of the signed digest).
        let mut template = template;
        template.rho_micro = lock(&self.inner.state)
            .charged_query(&q.query_id)?
            .map(|c| c.rho_micro)
            .ok_or(NodeError::Internal("a charged query is missing from the ledger"))?;
        let request = ChargedRequest {
            analyst,
            q,
            plan: ready.plan,
            template,
            from,
        };
        // What the ledger holds of the query decides the next step (the
        // rules are `cleanroom_protocol::ledger`'s and, on the platform,
        // `cleanroom_protocol::attempt`'s machine, tested in
        // tests/tests/pair.rs with both nodes, crashes and a lossy network).
        let charged = self.charged(&q.query_id)?;
        match side {
            Sided::Bank(b) => b.answer_charged(&charged, &request).await,
            Sided::Platform(p) => p.attempt(&charged, &request).await,
        }
    }

    /// Starts drawing a charged query's noise from its seed (see
    /// `draw_noise`).
    pub(super) fn start_noise(&self, r: &ChargedRequest<'_>) -> Result<NoiseTask, NodeError> {
        let seed = lock(&self.inner.state).noise_seed(&r.q.query_id)?;
        Ok(draw_noise(&r.plan, &r.template, seed))
    }

    /// The last step of a computed share: its noise, then the store (with
    /// its audit entry, before anything is sent), then the answer.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn release(
        &self,
        r: &ChargedRequest<'_>,
        share: Share,
        run: Run,
        join: SessionId,
        noise: NoiseTask,
        timings: Vec<(Phase, f64)>,
        rerun: bool,
        started: Instant,
    ) -> Result<QueryShare, NodeError> {
        let noise = noise.await.map_err(|_| NodeError::Internal("noise task failed"))??;
        let t = Instant::now();
        let binding = RunBinding {
            join,
            data_version: self.inner.data_version,
        };
        let out = self.noise_and_store(
            share,
            run,
            &noise,
            &r.plan,
            &r.template,
            r.analyst,
            r.q,
            timings,
            &binding,
            rerun,
        )?;
        info!(
            seconds = started.elapsed().as_secs_f64(),
            release_seconds = t.elapsed().as_secs_f64(),
            "share released"
        );
        Ok(out)
    }

    /// The checks a query passes before its charge (the platform reaches
    /// the bank, both policies are known, the template runs here, its
    /// parameters bind, the data has what the plan needs); the plan, its
    /// digest and the parameters to record with the charge.
    pub(super) async fn before_charge(
        &self,
        side: &Sided,
        analyst: &str,
        q: &QueryRequest,
        template: &Template,
    ) -> Result<Ready, NodeError> {
        // Only the platform can fail here (it cannot reach the bank).
        self.peer_policy_or_wait(side).await.map_err(|e| {
            NodeError::refused(
                RefusalCode::PeerUnreachable,
                format!("the platform node cannot reach the bank node: {e}"),
            )
        })?;
        if let Some(why) = self.not_runnable(template) {
            return Err(NodeError::refused(RefusalCode::UnknownTemplate, why));
        }
        let plan = template.bind(analyst, &q.params, &self.inner.domains).map_err(|e| {
            let code = match e {
                cleanroom_query::QueryError::UnknownTemplate(_)
                | cleanroom_query::QueryError::AnalystNotAllowed { .. } => RefusalCode::UnknownTemplate,
                _ => RefusalCode::BadParameters,
            };
            NodeError::refused(code, e.to_string())
        })?;
        if let Sided::Bank(b) = side
            && b.customers() as u64 > plan.clip.max_customers
        {
            return Err(NodeError::refused(RefusalCode::InputLimit, TOO_MANY_CUSTOMERS));
        }
        if let Sided::Platform(p) = side
            && p.side.data.countries.is_empty()
            && (plan.query.filters.iter().any(|p| p.column().name == "country")
                || plan.query.group_by.iter().any(|c| c.name == "country"))
        {
            return Err(NodeError::refused(
                RefusalCode::BadParameters,
                "the platform node's data has no country column (set data.country_column)",
            ));
        }
        let digest = plan.digest();
        let params_json =
            serde_json::to_string(&q.params).map_err(|_| NodeError::Internal("query parameters do not encode"))?;
        Ok(Ready {
            plan,
            digest,
            params_json,
        })
    }

    /// The ledger's answer for this query, on a blocking thread: with
    /// `write`, the charge itself (durable before anything leaves); without,
    /// what the charge would answer now, writing nothing.
    pub(super) async fn ledger(
        &self,
        analyst: &str,
        q: &QueryRequest,
        template: &Template,
        ready: &Ready,
        write: bool,
    ) -> Result<Charge, NodeError> {
        let node = self.clone();
        let (qid, who, name) = (q.query_id, analyst.to_string(), template.name.clone());
        let rho = template.rho_micro;
        let (digest, params_json) = (ready.digest, ready.params_json.clone());
        tokio::task::spawn_blocking(move || {
            let l = &node.inner.limits;
            lock(&node.inner.state).charge_or_check(
                &qid,
                &who,
                &name,
                &digest,
                &params_json,
                rho,
                l.rho_per_analyst_micro,
                l.period_days,
                l.runs_per_day,
                write,
            )
        })
        .await
        .map_err(|_| NodeError::Internal("ledger task failed"))?
    }

    /// Whether the ledger would charge this query now (or has charged it
    /// already): `Err(Refused)` over the budget or the day's runs, or for
    /// a query id used for another query. Writes nothing.
    pub(super) async fn would_charge(
        &self,
        analyst: &str,
        q: &QueryRequest,
        template: &Template,
        ready: &Ready,
    ) -> Result<(), NodeError> {
        match self.ledger(analyst, q, template, ready, false).await? {
            Charge::New | Charge::Existing(_) => Ok(()),
            refused => Err(self.charge_refused(&refused, template)),
        }
    }

    /// The analyst's refusal for a charge over the budget or the day's runs.
    pub(super) fn charge_refused(&self, charge: &Charge, template: &Template) -> NodeError {
        match charge {
            Charge::OverBudget { spent, limit } => {
                let period = period_of(now_secs(), self.inner.limits.period_days);
                let ends = (period + 1) * i64::from(self.inner.limits.period_days);
                NodeError::refused(
                    RefusalCode::BudgetExhausted,
                    format!(
                        "budget exhausted on the {} node: this template costs rho {}, {} of {} is spent this period; it frees up on {}",
                        self.inner.role().as_str(),
                        format_micro(template.rho_micro),
                        format_micro(*spent),
                        format_micro(*limit),
                        format_date(i32::try_from(ends).unwrap_or(i32::MAX))
                    ),
                )
            }
            Charge::TooManyRuns { limit } => {
                let tomorrow = now_secs().div_euclid(86_400) + 1;
                NodeError::refused(
                    RefusalCode::RunLimit,
                    format!(
                        "run limit on the {} node: {limit} queries per analyst per day; it frees up at 00:00 UTC on {}",
                        self.inner.role().as_str(),
                        format_date(i32::try_from(tomorrow).unwrap_or(i32::MAX))
                    ),
                )
            }
            Charge::New | Charge::Existing(_) => NodeError::Internal("a charge that was not refused"),
        }
    }

    /// What this node's ledger holds of a charged query, as the rules of
    /// `cleanroom_protocol::ledger` read it (the stored share's run decoded).
    pub(super) fn charged(&self, qid: &QueryId) -> Result<ledger::Charged, NodeError> {
        let q = lock(&self.inner.state)
            .charged_query(qid)?
            .ok_or(NodeError::Internal("a charged query is missing from the ledger"))?;
        ledger_view(q.share.as_deref(), q.binding, q.reruns)
    }

    /// The stored share of a retried query id, marked replayed.
    pub(super) fn replay(&self, qid: &QueryId) -> Result<QueryShare, NodeError> {
        let stored = lock(&self.inner.state)
            .charged_query(qid)?
            .and_then(|c| c.share)
            .ok_or(NodeError::Internal("a replayed share is missing from the ledger"))?;
        let Some(mut s) = stored_share(&stored) else {
            return Err(StateError::Inconsistent("a stored share does not decode").into());
        };
        info!("returning the stored share of a retried query id");
        s.replayed = true;
        Ok(s)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn noise_and_store(
        &self,
        mut share: Share,
        run: Run,
        noise: &DrawnNoise,
        plan: &Plan,
        template: &Template,
        analyst: &str,
        q: &QueryRequest,
        mut timings: Vec<(Phase, f64)>,
        binding: &RunBinding,
        replace: bool,
    ) -> Result<QueryShare, NodeError> {
        let cells = plan.cells();
        let bits: Vec<u8> = cells.iter().map(|c| c.bits).collect();
        noise.add_to(&mut share, &bits)?;
        if !self.inner.limits.report_timings {
            timings.clear();
        }
        let delta2 = plan.delta_squared();
        // For display only (the noise was drawn exactly, in integers).
        #[allow(clippy::cast_precision_loss)]
        let sigma = ((delta2 as f64) * 1e6 / (2.0 * template.rho_micro as f64)).sqrt();
        let out = QueryShare {
            node: self.inner.role().as_str().to_string(),
            query_id: q.query_id,
            plan: plan.digest(),
            cells: cells.iter().map(|c| c.name.clone()).collect(),
            bits,
            weights: vec![1; cells.len()],
            count_cells: cells.iter().map(|c| c.count_cell as u32).collect(),
            units: cells
                .iter()
                .map(|c| if c.kind == CellKind::Sum { "cents" } else { "count" }.to_string())
                .collect(),
            ratios: plan
                .ratios()
                .into_iter()
                .map(|r| (r.name, r.numerator as u32, r.denominator as u32))
                .collect(),
            words: share.words().to_vec(),
            #[allow(clippy::cast_precision_loss)]
            sigmas: cells.iter().map(|c| sigma / c.weight.max(1) as f64).collect(),
            min_count: template.min_count,
            rho: format_micro(template.rho_micro),
            timings,
            replayed: false,
            run,
        };
        let encoded = Message::AnalystResponse(AnalystResponse::Share(Box::new(out.clone())))
            .encode()
            .map_err(|_| NodeError::Internal("share encoding"))?;
        let result_digest = digest(&SHA256, &encoded);
        let params: Vec<String> = plan.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        lock(&self.inner.state).store_share(
            &q.query_id,
            &encoded,
            &AuditEntry {
                event: if replace { "query-rerun" } else { "query" },
                analyst,
                template: &template.name,
                plan: &out.plan,
                params: &params.join("&"),
                rho_micro: template.rho_micro,
                result_digest: result_digest.as_ref(),
            },
            binding,
            replace,
            self.inner.limits.max_reruns_per_query,
        )?;
        Ok(out)
    }
}

/// What an analyst is told of a failed query: the kind of failure, never a
/// count or a value from either side.
pub(super) fn analyst_view(e: &NodeError) -> String {
    match e {
        NodeError::Protocol(ProtocolError::PeerAborted { code }) => {
            format!(
                "the peer node ended the session ({})",
                cleanroom_protocol::abort_reason(*code)
            )
        }
        NodeError::Protocol(pe) if pe.is_peer_fault() => format!(
            "this node ended the session with its peer ({})",
            cleanroom_protocol::abort_reason(pe.abort_code())
        ),
        NodeError::Protocol(_) | NodeError::Internal(_) | NodeError::Crypto(_) => "an internal error".into(),
        NodeError::Peer(_) => "the connection to the peer node failed or timed out".into(),
        NodeError::State(_) => "its state database failed".into(),
        NodeError::Io { .. } => "a local socket failed".into(),
        NodeError::UnknownJoin => "the peer node no longer has the join".into(),
        NodeError::Worker { worker, .. } => format!("its worker {worker} failed or could not be reached"),
        other => other.to_string(),
    }
}

pub(super) fn template_info(t: &Template) -> TemplateInfo {
    TemplateInfo {
        name: t.name.clone(),
        kind: t.sql.clone(),
        params: t.params.iter().map(|(n, spec)| (n.clone(), spec.describe())).collect(),
        rho: format_micro(t.rho_micro),
        min_count: t.min_count,
    }
}

/// A share stored in the ledger (an encoded analyst response, in either
/// format), or `None` when it does not decode as one.
pub(super) fn stored_share(bytes: &[u8]) -> Option<QueryShare> {
    match Message::decode(bytes) {
        Ok(Message::AnalystResponse(r)) => r.into_share().ok(),
        _ => None,
    }
}

/// The ledger rules' view of a charged query: its stored share's run (if
/// any), what that share was computed over, its reruns. A share stored in
/// the format before narrow shares (`LegacyShare`) had its noise drawn on
/// weighted 64-bit cells: the same seed now draws other values, so its
/// binding is withheld and every rerun of it is refused (`NoBinding`)
/// rather than release a second, independent noise draw.
pub(super) fn ledger_view(
    share: Option<&[u8]>,
    binding: Option<ledger::RunBinding>,
    reruns: u32,
) -> Result<ledger::Charged, NodeError> {
    let (stored, legacy) = match share.map(Message::decode) {
        None => (None, false),
        Some(Ok(Message::AnalystResponse(AnalystResponse::Share(s)))) => (Some(s.run), false),
        Some(Ok(Message::AnalystResponse(AnalystResponse::LegacyShare(s)))) => (Some(s.run), true),
        Some(_) => return Err(StateError::Inconsistent("a stored share does not decode").into()),
    };
    Ok(ledger::Charged {
        stored,
        binding: if legacy { None } else { binding },
        reruns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cleanroom_wire::{LegacyQueryShare, RunId};

    fn legacy() -> LegacyQueryShare {
        LegacyQueryShare {
            node: "bank".into(),
            query_id: QueryId([1; 16]),
            plan: [2; 32],
            cells: vec!["customers".into()],
            weights: vec![100],
            count_cells: vec![0],
            units: vec!["count".into()],
            ratios: vec![],
            words: vec![7],
            sigma: 1.0,
            min_count: 20,
            rho: "0.1".into(),
            timings: vec![],
            replayed: false,
            run: RunId([3; 16]),
        }
    }

    /// A share stored before narrow shares replays, but is never run again
    /// (its noise would be drawn differently); one of this version is.
    #[test]
    fn a_legacy_stored_share_replays_but_is_never_rerun() {
        let binding = ledger::RunBinding {
            join: SessionId([4; 16]),
            data_version: [5; 32],
        };
        let old = Message::AnalystResponse(AnalystResponse::LegacyShare(Box::new(legacy())))
            .encode()
            .unwrap();
        let view = ledger_view(Some(&old), Some(binding), 0).unwrap();
        assert_eq!(view.stored, Some(RunId([3; 16])));
        assert_eq!(
            ledger::check_rerun(&view.rerun_record(), &binding, 5),
            Err(ledger::RerunRefused::NoBinding)
        );
        assert_eq!(stored_share(&old).unwrap().bits, vec![64]);
        let new = Message::AnalystResponse(AnalystResponse::Share(Box::new(QueryShare::from(legacy()))))
            .encode()
            .unwrap();
        let view = ledger_view(Some(&new), Some(binding), 0).unwrap();
        assert_eq!(ledger::check_rerun(&view.rerun_record(), &binding, 5), Ok(()));
        assert!(ledger_view(Some(b"junk"), Some(binding), 0).is_err());
        assert_eq!(ledger_view(None, None, 0).unwrap().stored, None);
    }
}
