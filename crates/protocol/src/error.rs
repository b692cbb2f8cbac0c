//! The protocol layer's one error type.

use cleanroom_crypto::CryptoError;
use cleanroom_wire::WireError;

/// Why a session failed. Variants say which side is at fault
/// ([`ProtocolError::is_peer_fault`]); none carries an identifier, a key, a
/// share or a value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The peer's frame did not decode.
    #[error("malformed message from the peer: {0}")]
    Wire(#[from] WireError),
    /// The peer's points or OT data failed validation.
    #[error("invalid data from the peer: {0}")]
    Crypto(#[from] CryptoError),
    /// A message that does not belong at this step.
    #[error("unexpected {got} while {state}")]
    UnexpectedMessage {
        /// What arrived.
        got: &'static str,
        /// What the state machine was doing.
        state: &'static str,
    },
    /// A message for another session.
    #[error("message for another session")]
    WrongSession,
    /// A chunk out of sequence.
    #[error("{stream} chunk {got} out of order (expected {expected})")]
    OutOfOrder {
        /// The stream.
        stream: &'static str,
        /// Expected sequence number.
        expected: u32,
        /// Received sequence number.
        got: u32,
    },
    /// More (or fewer) elements than announced.
    #[error("{stream}: {got} elements where {expected} were announced")]
    Count {
        /// The stream.
        stream: &'static str,
        /// Announced.
        expected: u64,
        /// Received so far.
        got: u64,
    },
    /// A public parameter differs between the two nodes.
    #[error("{what} differs between the two nodes")]
    ParameterMismatch {
        /// Which parameter.
        what: &'static str,
    },
    /// The peer's message has bits set that its encoding leaves at zero.
    #[error("{what}: not the one encoding allowed")]
    NonCanonical {
        /// What.
        what: &'static str,
    },
    /// The peer's set size is outside this node's policy.
    #[error("peer set size {size} outside the allowed range {min}..={max}")]
    PeerSetSize {
        /// Announced size.
        size: u64,
        /// Minimum allowed.
        min: u64,
        /// Maximum allowed.
        max: u64,
    },
    /// The holder announced more dummy rows than this node accepts.
    #[error("{got} dummy rows announced, at most {max} accepted")]
    DummyRows {
        /// Announced.
        got: u64,
        /// Limit.
        max: u64,
    },
    /// The peer aborted the session.
    #[error("the peer aborted the session: {}", abort_reason(*code))]
    PeerAborted {
        /// Its abort code.
        code: cleanroom_wire::AbortCode,
    },
    /// This node's own input is unusable (duplicate identifiers, sizes out
    /// of range, a width of zero...). Local misuse, not the peer's fault.
    #[error("local input rejected: {reason}")]
    LocalInput {
        /// What is wrong.
        reason: &'static str,
    },
    /// `finish` called before the session completed.
    #[error("session not complete: {what}")]
    Incomplete {
        /// What is missing.
        what: &'static str,
    },
}

/// What an abort code means, for messages.
pub fn abort_reason(code: cleanroom_wire::AbortCode) -> &'static str {
    use cleanroom_wire::AbortCode;
    match code {
        AbortCode::BadMessage => "it found a message from this node malformed or out of order",
        AbortCode::Parameters => {
            "it does not accept the parameters (collaboration id, identifier normalisation rules, set sizes or dummy rows differ from its configuration)"
        }
        AbortCode::Refused => "a limit or budget on its side refused it",
        AbortCode::Internal => "it failed locally",
        AbortCode::UnknownJoin => "it no longer has the join this aggregate refers to",
        AbortCode::UnknownQuery => "it has not accepted this query",
    }
}

impl ProtocolError {
    /// True when the peer sent something wrong (as opposed to local misuse).
    pub fn is_peer_fault(&self) -> bool {
        !matches!(
            self,
            ProtocolError::LocalInput { .. } | ProtocolError::Incomplete { .. }
        )
    }

    /// The abort code to send the peer for this error.
    pub fn abort_code(&self) -> cleanroom_wire::AbortCode {
        use cleanroom_wire::AbortCode;
        match self {
            ProtocolError::ParameterMismatch { .. }
            | ProtocolError::PeerSetSize { .. }
            | ProtocolError::DummyRows { .. } => AbortCode::Parameters,
            ProtocolError::LocalInput { .. } | ProtocolError::Incomplete { .. } => AbortCode::Internal,
            _ => AbortCode::BadMessage,
        }
    }
}
