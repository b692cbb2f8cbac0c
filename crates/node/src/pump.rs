//! Drives a protocol state machine over one QUIC stream.
//!
//! The state machine runs on a blocking thread (its curve and OT work is
//! parallel inside, with rayon), never on a runtime worker. A reader task
//! feeds it the peer's frames through a small bounded channel; a writer
//! task sends its messages through another, so the network carries chunk
//! `k` while the machine computes chunk `k + 1`, and a slow side applies
//! backpressure through QUIC flow control. A step that fails sends the peer
//! an `Abort` and ends the session; a peer that says nothing for the idle
//! timeout ends it too.

use std::time::Duration;

use cleanroom_protocol::ProtocolError;
use cleanroom_protocol::aggregate::{HolderOtRunning, MatcherOtRunning};
use cleanroom_protocol::join::{HolderStreaming, MatcherStreaming};
use cleanroom_transport::{read_frame, write_frame};
use cleanroom_wire::{Abort, MAX_MESSAGE_LEN, Message, SessionId};
use tokio::sync::mpsc;

use crate::{NodeError, PeerError};

/// What the pump needs from a party.
pub trait Party: Send + 'static {
    /// The session id.
    fn session(&self) -> SessionId;
    /// The next message to send, if one is ready.
    fn poll_transmit(&mut self) -> Option<Message>;
    /// Reads one frame; may produce a reply.
    ///
    /// # Errors
    /// The state machine's error.
    fn handle(&mut self, frame: &[u8]) -> Result<Option<Message>, ProtocolError>;
    /// Whether everything has been exchanged.
    fn is_done(&self) -> bool;
}

impl Party for HolderStreaming {
    fn session(&self) -> SessionId {
        HolderStreaming::session(self)
    }
    fn poll_transmit(&mut self) -> Option<Message> {
        HolderStreaming::poll_transmit(self)
    }
    fn handle(&mut self, frame: &[u8]) -> Result<Option<Message>, ProtocolError> {
        HolderStreaming::handle(self, frame).map(|()| None)
    }
    fn is_done(&self) -> bool {
        HolderStreaming::is_done(self)
    }
}

impl Party for MatcherStreaming {
    fn session(&self) -> SessionId {
        MatcherStreaming::session(self)
    }
    fn poll_transmit(&mut self) -> Option<Message> {
        MatcherStreaming::poll_transmit(self)
    }
    fn handle(&mut self, frame: &[u8]) -> Result<Option<Message>, ProtocolError> {
        MatcherStreaming::handle(self, frame).map(|()| None)
    }
    fn is_done(&self) -> bool {
        MatcherStreaming::is_done(self)
    }
}

impl Party for HolderOtRunning {
    fn session(&self) -> SessionId {
        HolderOtRunning::session(self)
    }
    fn poll_transmit(&mut self) -> Option<Message> {
        None
    }
    fn handle(&mut self, frame: &[u8]) -> Result<Option<Message>, ProtocolError> {
        HolderOtRunning::handle(self, frame).map(Some)
    }
    fn is_done(&self) -> bool {
        HolderOtRunning::is_done(self)
    }
}

impl Party for MatcherOtRunning {
    fn session(&self) -> SessionId {
        MatcherOtRunning::session(self)
    }
    fn poll_transmit(&mut self) -> Option<Message> {
        MatcherOtRunning::poll_transmit(self)
    }
    fn handle(&mut self, frame: &[u8]) -> Result<Option<Message>, ProtocolError> {
        MatcherOtRunning::handle(self, frame).map(|()| None)
    }
    fn is_done(&self) -> bool {
        MatcherOtRunning::is_done(self)
    }
}

/// Where a session's time went on this side.
#[derive(Clone, Copy, Debug, Default)]
pub struct PumpStats {
    /// Computing outgoing messages (`poll_transmit`): own tokens, OT columns...
    pub own: Duration,
    /// Processing the peer's messages (`handle`): peer points, masked rows...
    pub peer: Duration,
    /// Waiting for the peer's next frame (network or peer compute).
    pub wait_in: Duration,
    /// Waiting for room in the send queue (network backpressure).
    pub wait_out: Duration,
    /// Frames received.
    pub frames_in: u64,
    /// Frames sent.
    pub frames_out: u64,
    /// Times this side had sent something and then had to wait for the
    /// peer before it could go on (a stalled pipeline).
    pub stalls: u64,
}

impl PumpStats {
    /// Adds `other`'s figures to these.
    pub fn add(&mut self, other: &PumpStats) {
        self.own += other.own;
        self.peer += other.peer;
        self.wait_in += other.wait_in;
        self.wait_out += other.wait_out;
        self.frames_in += other.frames_in;
        self.frames_out += other.frames_out;
        self.stalls += other.stalls;
    }
}

/// Frames in flight per direction between the network and the machine.
const QUEUE: usize = 4;

/// Runs `party` to completion over the stream pair and returns it, with
/// where the time went.
///
/// # Errors
/// [`NodeError::Protocol`] for a refused message (the peer is told with an
/// `Abort`), [`NodeError::Peer`] for a closed stream or an idle timeout.
pub async fn run_with_stats<P: Party>(
    party: P,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    idle: Duration,
) -> Result<(P, PumpStats), NodeError> {
    let (in_tx, mut in_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let reader = tokio::spawn(async move {
        loop {
            match read_frame(&mut recv, MAX_MESSAGE_LEN).await {
                Ok(Some(f)) => {
                    if in_tx.send(f).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let writer = tokio::spawn(async move {
        while let Some(f) = out_rx.recv().await {
            write_frame(&mut send, f, MAX_MESSAGE_LEN).await?;
        }
        let _ = send.finish();
        // Wait until the peer has everything (or has gone).
        let _ = send.stopped().await;
        Ok::<(), cleanroom_transport::TransportError>(())
    });
    let handle = tokio::runtime::Handle::current();
    let result = tokio::task::spawn_blocking(move || {
        let mut party = party;
        let mut stats = PumpStats::default();
        let outcome = drive(&mut party, &mut in_rx, &out_tx, &handle, idle, &mut stats);
        if let Err(e) = &outcome
            && let NodeError::Protocol(pe) = e
        {
            let abort = Message::Abort(Abort {
                session: party.session(),
                code: pe.abort_code(),
            });
            if let Ok(f) = abort.encode() {
                let _ = out_tx.blocking_send(f);
            }
        }
        drop(out_tx);
        outcome.map(|()| (party, stats))
    })
    .await
    .map_err(|_| NodeError::Internal("protocol thread failed"))?;
    let written = writer.await;
    reader.abort();
    let party = result?;
    match written {
        Ok(Ok(())) => Ok(party),
        Ok(Err(e)) => Err(PeerError::Transport(format!("sending: {e}")).into()),
        Err(_) => Err(NodeError::Internal("writer task failed")),
    }
}

fn drive<P: Party>(
    party: &mut P,
    in_rx: &mut mpsc::Receiver<Vec<u8>>,
    out_tx: &mpsc::Sender<Vec<u8>>,
    handle: &tokio::runtime::Handle,
    idle: Duration,
    stats: &mut PumpStats,
) -> Result<(), NodeError> {
    let send = |m: Message, stats: &mut PumpStats| -> Result<(), NodeError> {
        let f = m.encode().map_err(|e| NodeError::Protocol(ProtocolError::Wire(e)))?;
        let t = std::time::Instant::now();
        let r = out_tx.blocking_send(f).map_err(|_| NodeError::Peer(PeerError::Closed));
        stats.wait_out += t.elapsed();
        stats.frames_out += 1;
        r
    };
    let handle_one = |party: &mut P, frame: &[u8], stats: &mut PumpStats| -> Result<(), NodeError> {
        stats.frames_in += 1;
        let t = std::time::Instant::now();
        let reply = party.handle(frame);
        stats.peer += t.elapsed();
        if let Some(reply) = reply? {
            send(reply, stats)?;
        }
        Ok(())
    };
    // Frames sent since the last one received.
    let mut sent_mark = stats.frames_out;
    loop {
        if party.is_done() {
            return Ok(());
        }
        match in_rx.try_recv() {
            Ok(frame) => {
                sent_mark = stats.frames_out;
                handle_one(party, &frame, stats)?;
                continue;
            }
            Err(mpsc::error::TryRecvError::Disconnected) => {
                return Err(PeerError::Closed.into());
            }
            Err(mpsc::error::TryRecvError::Empty) => {}
        }
        let t = std::time::Instant::now();
        let next = party.poll_transmit();
        stats.own += t.elapsed();
        if let Some(m) = next {
            send(m, stats)?;
            continue;
        }
        if stats.frames_out > sent_mark {
            stats.stalls += 1;
        }
        let t = std::time::Instant::now();
        let got = handle.block_on(tokio::time::timeout(idle, in_rx.recv()));
        stats.wait_in += t.elapsed();
        sent_mark = stats.frames_out;
        match got {
            Ok(Some(frame)) => handle_one(party, &frame, stats)?,
            Ok(None) => {
                return Err(PeerError::Closed.into());
            }
            Err(_) => {
                return Err(PeerError::Idle { secs: idle.as_secs() }.into());
            }
        }
    }
}

/// Reads one frame with a timeout.
///
/// # Errors
/// [`NodeError::Peer`] on timeout, close or transport error.
pub async fn read_one(recv: &mut quinn::RecvStream, timeout: Duration) -> Result<Vec<u8>, NodeError> {
    read_one_limited(recv, timeout, MAX_MESSAGE_LEN).await
}

/// The largest request an analyst may send (a query is a few hundred bytes).
pub const MAX_ANALYST_REQUEST: usize = 64 << 10;

/// Reads one frame of at most `max` bytes with a timeout; a longer frame is
/// refused from its length prefix, before its body is read.
///
/// # Errors
/// [`NodeError::Peer`] on timeout, close, an oversized frame or a transport error.
pub async fn read_one_limited(
    recv: &mut quinn::RecvStream,
    timeout: Duration,
    max: usize,
) -> Result<Vec<u8>, NodeError> {
    match tokio::time::timeout(timeout, read_frame(recv, max)).await {
        Ok(Ok(Some(f))) => Ok(f),
        Ok(Ok(None)) => Err(PeerError::Closed.into()),
        Ok(Err(e)) => Err(PeerError::Transport(e.to_string()).into()),
        Err(_) => Err(PeerError::NoAnswer {
            secs: timeout.as_secs(),
        }
        .into()),
    }
}

/// Writes one message.
///
/// # Errors
/// [`NodeError::Peer`] on a transport error.
pub async fn write_one(send: &mut quinn::SendStream, m: &Message) -> Result<(), NodeError> {
    let f = m.encode().map_err(|e| NodeError::Protocol(ProtocolError::Wire(e)))?;
    write_frame(send, f, MAX_MESSAGE_LEN)
        .await
        .map_err(|e| PeerError::Transport(e.to_string()).into())
}
