//! The in-memory driver: both parties in one process, every message encoded
//! to a frame and decoded by the other side exactly as over the network.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cleanroom_crypto::shares::Share;
use cleanroom_protocol::ProtocolError;
use cleanroom_protocol::aggregate::{CellBits, HolderAggregate, MatcherAggregate};
use cleanroom_protocol::join::{HolderJoin, HolderJoined, MatcherJoin, MatcherJoined};
use cleanroom_wire::Message;
use rand_core::{CryptoRng, RngCore};

/// Which party failed, and why.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    /// The holder's state machine refused.
    #[error("holder: {0}")]
    Holder(ProtocolError),
    /// The matcher's state machine refused.
    #[error("matcher: {0}")]
    Matcher(ProtocolError),
    /// A message failed to encode.
    #[error("encoding: {0}")]
    Encode(#[from] cleanroom_wire::WireError),
    /// The exchange stopped before both sides finished.
    #[error("the exchange stalled before both sides finished")]
    Stalled,
}

/// What crossed the (in-memory) wire and how long each side computed.
#[derive(Clone, Debug, Default)]
pub struct Traffic {
    /// Bytes of frames from holder to matcher.
    pub holder_to_matcher_bytes: u64,
    /// Bytes of frames from matcher to holder.
    pub matcher_to_holder_bytes: u64,
    /// Frames from holder to matcher.
    pub holder_to_matcher_messages: u64,
    /// Frames from matcher to holder.
    pub matcher_to_holder_messages: u64,
    /// Time spent in the holder's state machine.
    pub holder_time: Duration,
    /// Time spent in the matcher's state machine.
    pub matcher_time: Duration,
}

impl Traffic {
    fn h2m(&mut self, m: &Message) -> Result<Vec<u8>, DriverError> {
        let f = m.encode()?;
        self.holder_to_matcher_bytes += f.len() as u64;
        self.holder_to_matcher_messages += 1;
        Ok(f)
    }

    fn m2h(&mut self, m: &Message) -> Result<Vec<u8>, DriverError> {
        let f = m.encode()?;
        self.matcher_to_holder_bytes += f.len() as u64;
        self.matcher_to_holder_messages += 1;
        Ok(f)
    }
}

/// Which way a frame travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the holder to the matcher.
    HolderToMatcher,
    /// From the matcher to the holder.
    MatcherToHolder,
}

/// What the wire does to each frame: the frames actually delivered in its
/// place (none to drop it, several to duplicate or inject). The honest wire
/// delivers each frame as it is.
pub type Wire<'a> = &'a mut dyn FnMut(Direction, Vec<u8>) -> Vec<Vec<u8>>;

fn honest(_: Direction, f: Vec<u8>) -> Vec<Vec<u8>> {
    vec![f]
}

fn timed<T>(acc: &mut Duration, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let out = f();
    *acc += t.elapsed();
    out
}

/// Runs phase 1. `record_charge` is called with the session id once the
/// holder has accepted and before its accept leaves it (the node records the
/// cardinality charge there).
///
/// # Errors
/// The first party to refuse, or [`DriverError::Stalled`].
pub fn run_join<RH, RM>(
    holder: HolderJoin,
    matcher: MatcherJoin,
    rng_h: &mut RH,
    rng_m: &mut RM,
    record_charge: impl FnOnce(&cleanroom_wire::SessionId),
) -> Result<(HolderJoined, MatcherJoined, Traffic), DriverError>
where
    RH: RngCore + CryptoRng,
    RM: RngCore + CryptoRng,
{
    run_join_over(holder, matcher, rng_h, rng_m, record_charge, &mut honest)
}

/// As [`run_join`], with every frame passed through `wire` (for hostile
/// tests and fuzzing). A request/response step whose frame is dropped, or
/// that gets several, uses the first delivered frame; no frame stalls.
///
/// # Errors
/// As [`run_join`].
pub fn run_join_over<RH, RM>(
    holder: HolderJoin,
    matcher: MatcherJoin,
    rng_h: &mut RH,
    rng_m: &mut RM,
    record_charge: impl FnOnce(&cleanroom_wire::SessionId),
    wire: Wire<'_>,
) -> Result<(HolderJoined, MatcherJoined, Traffic), DriverError>
where
    RH: RngCore + CryptoRng,
    RM: RngCore + CryptoRng,
{
    use Direction::{HolderToMatcher as H2M, MatcherToHolder as M2H};
    let mut t = Traffic::default();
    let (offered, offer) = timed(&mut t.matcher_time, || matcher.offer(rng_m)).map_err(DriverError::Matcher)?;
    let frame = first(wire(M2H, t.m2h(&offer)?))?;
    let pending = timed(&mut t.holder_time, || holder.on_offer(&frame, rng_h)).map_err(DriverError::Holder)?;
    record_charge(&pending.session());
    let (mut h, accept) = pending.charge_recorded();
    let frame = first(wire(H2M, t.h2m(&accept)?))?;
    let mut m = timed(&mut t.matcher_time, || offered.on_accept(&frame)).map_err(DriverError::Matcher)?;
    loop {
        let mut progressed = false;
        if let Some(msg) = timed(&mut t.matcher_time, || m.poll_transmit()) {
            for f in wire(M2H, t.m2h(&msg)?) {
                timed(&mut t.holder_time, || h.handle(&f)).map_err(DriverError::Holder)?;
            }
            progressed = true;
        }
        if let Some(msg) = timed(&mut t.holder_time, || h.poll_transmit()) {
            for f in wire(H2M, t.h2m(&msg)?) {
                timed(&mut t.matcher_time, || m.handle(&f)).map_err(DriverError::Matcher)?;
            }
            progressed = true;
        }
        if !progressed {
            break;
        }
    }
    if !h.is_done() || !m.is_done() {
        return Err(DriverError::Stalled);
    }
    let hj = h.finish().map_err(DriverError::Holder)?;
    let mj = timed(&mut t.matcher_time, || m.finish()).map_err(DriverError::Matcher)?;
    Ok((hj, mj, t))
}

/// Runs phase 2 over a join: returns the holder's and the matcher's shares
/// (before any noise).
///
/// # Errors
/// The first party to refuse, or [`DriverError::Stalled`].
#[allow(clippy::too_many_arguments)]
pub fn run_aggregate<RH, RM>(
    holder: HolderAggregate,
    matcher_joined: &MatcherJoined,
    choices: &[bool],
    width: usize,
    query_id: cleanroom_wire::QueryId,
    plan: [u8; 32],
    group: u32,
    rng_h: &mut RH,
    rng_m: &mut RM,
) -> Result<(Share, Share, Traffic), DriverError>
where
    RH: RngCore + CryptoRng,
    RM: RngCore + CryptoRng,
{
    run_aggregate_over(
        holder,
        matcher_joined,
        choices,
        width,
        (query_id, plan, group),
        rng_h,
        rng_m,
        &mut honest,
    )
}

/// As [`run_aggregate`], with every frame passed through `wire`; `query` is
/// `(query id, plan digest, group)`.
///
/// # Errors
/// As [`run_aggregate`].
#[allow(clippy::too_many_arguments)]
pub fn run_aggregate_over<RH, RM>(
    holder: HolderAggregate,
    matcher_joined: &MatcherJoined,
    choices: &[bool],
    width: usize,
    query: (cleanroom_wire::QueryId, [u8; 32], u32),
    rng_h: &mut RH,
    rng_m: &mut RM,
    wire: Wire<'_>,
) -> Result<(Share, Share, Traffic), DriverError>
where
    RH: RngCore + CryptoRng,
    RM: RngCore + CryptoRng,
{
    let bits = CellBits::full(width).map_err(DriverError::Matcher)?;
    run_aggregate_with_bits(holder, matcher_joined, choices, bits, query, rng_h, rng_m, wire)
}

/// As [`run_aggregate_over`], with each cell's share in `Z_{2^b}` (the
/// holder must have been given the same [`CellBits`]).
///
/// # Errors
/// As [`run_aggregate`].
#[allow(clippy::too_many_arguments)]
pub fn run_aggregate_with_bits<RH, RM>(
    holder: HolderAggregate,
    matcher_joined: &MatcherJoined,
    choices: &[bool],
    bits: CellBits,
    query: (cleanroom_wire::QueryId, [u8; 32], u32),
    rng_h: &mut RH,
    rng_m: &mut RM,
    wire: Wire<'_>,
) -> Result<(Share, Share, Traffic), DriverError>
where
    RH: RngCore + CryptoRng,
    RM: RngCore + CryptoRng,
{
    use Direction::{HolderToMatcher as H2M, MatcherToHolder as M2H};
    let (query_id, plan, group) = query;
    let mut t = Traffic::default();
    let (waiting, setup) = timed(&mut t.matcher_time, || {
        MatcherAggregate::start_with_bits(matcher_joined, choices, bits, query_id, plan, group, rng_m)
    })
    .map_err(DriverError::Matcher)?;
    let frame = first(wire(M2H, t.m2h(&setup)?))?;
    let (mut h, answer) = timed(&mut t.holder_time, || holder.on_setup(&frame, rng_h)).map_err(DriverError::Holder)?;
    let frame = first(wire(H2M, t.h2m(&answer)?))?;
    let mut m = timed(&mut t.matcher_time, || waiting.on_choices(&frame)).map_err(DriverError::Matcher)?;
    while let Some(ext) = timed(&mut t.matcher_time, || m.poll_transmit()) {
        for f in wire(M2H, t.m2h(&ext)?) {
            let reply = timed(&mut t.holder_time, || h.handle(&f)).map_err(DriverError::Holder)?;
            for f in wire(H2M, t.h2m(&reply)?) {
                timed(&mut t.matcher_time, || m.handle(&f)).map_err(DriverError::Matcher)?;
            }
        }
    }
    if !h.is_done() || !m.is_done() {
        return Err(DriverError::Stalled);
    }
    let hs = h.finish().map_err(DriverError::Holder)?;
    let ms = m.finish().map_err(DriverError::Matcher)?;
    Ok((hs, ms, t))
}

/// The first delivered frame of a request/response step.
fn first(frames: Vec<Vec<u8>>) -> Result<Vec<u8>, DriverError> {
    frames.into_iter().next().ok_or(DriverError::Stalled)
}

/// Convenience for callers holding the join in an `Arc`.
pub fn shared(joined: HolderJoined) -> Arc<HolderJoined> {
    Arc::new(joined)
}
