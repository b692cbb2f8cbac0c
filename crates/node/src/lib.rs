#![forbid(unsafe_code)]
//! The clean-room node.
//!
//! - [`config`]: the node's TOML configuration;
//! - [`data`]: CSV loading (streamed, bad rows counted by reason);
//! - [`state`]: the SQLite ledger, audit log and join cache;
//! - [`pump`]: a protocol state machine driven over a QUIC stream;
//! - [`server`]: the node itself: connections, sessions, queries, noise;
//! - [`noise`], [`policy`], [`turns`]: the noise draw, signed templates, the
//!   matcher's round robin between analysts.
//!
//! The analyst's client is `cleanroom-client`; the demo, the bench and the
//! test fixture are in `cleanroom-lab`.

pub use cleanroom_wire::{Refusal, RefusalCode};

pub mod config;
pub mod data;
pub mod input;
pub mod noise;
pub mod policy;
pub mod pump;
pub mod server;
pub mod shards;
pub mod source;
pub mod state;
pub mod turns;

/// Errors of a node. Messages never carry an
/// identifier, a value or a share.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// A configuration file is unusable.
    #[error("config {path}: {what}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The input data is unusable.
    #[error("data {path}: {what}")]
    Data {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The state database failed, or holds what it should not.
    #[error("state: {0}")]
    State(#[from] state::StateError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] cleanroom_transport::TransportError),
    /// The protocol refused a message or local input.
    #[error("protocol: {0}")]
    Protocol(#[from] cleanroom_protocol::ProtocolError),
    /// The peer node misbehaved, went away, or did not answer in time.
    #[error("peer: {0}")]
    Peer(#[from] PeerError),
    /// A local socket failed (`what` says which).
    #[error("{what}: {source}")]
    Io {
        /// Which socket, doing what.
        what: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A request was refused by policy: its code, and a message that says
    /// what to change.
    #[error("refused: {0}")]
    Refused(cleanroom_wire::Refusal),
    /// Randomness or noise parameters.
    #[error("crypto: {0}")]
    Crypto(#[from] cleanroom_crypto::CryptoError),
    /// A local failure.
    #[error("internal: {0}")]
    Internal(&'static str),
    /// A shard file is damaged, or not the one this node wrote for its
    /// input and split (`crate::input`).
    #[error(transparent)]
    ShardFile(#[from] shards::ShardFileError),
    /// The peer asked for an aggregate over a join this node does not have
    /// (expired, or from before a restart); the peer joins again.
    #[error("aggregate over a join this node does not have")]
    UnknownJoin,
    /// One of this node's workers failed, could not be reached, or refused
    /// the coordinator's request (docs/protocol.md, "Workers").
    #[error("worker {worker} of this node: {what}")]
    Worker {
        /// The worker's index.
        worker: u32,
        /// What happened.
        what: String,
    },
}

/// How the peer node, or the connection to it, failed an exchange. The
/// node's log has it; the analyst sees only its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// No frame within the wait.
    #[error("no answer within {secs} s")]
    NoAnswer {
        /// The wait.
        secs: u64,
    },
    /// No message inside a running session within the idle wait.
    #[error("no message from the peer for {secs} s")]
    Idle {
        /// The wait.
        secs: u64,
    },
    /// The stream ended before the exchange did.
    #[error("the peer closed the stream before the session ended")]
    Closed,
    /// The connection or stream failed (the transport's reason).
    #[error("{0}")]
    Transport(String),
    /// A message this exchange does not expect here.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the exchange waits for.
        expected: &'static str,
        /// The kind of message that came.
        got: &'static str,
    },
    /// The peer's signed policy does not parse or verify, or is for another
    /// role or collaboration.
    #[error("the peer's signed policy: {0}")]
    Policy(String),
    /// Bank: the platform did not run the query within `query_timeout`.
    #[error("the platform node did not run this query within {secs} s")]
    QueryNotRun {
        /// The query timeout.
        secs: u64,
    },
    /// Bank: the platform left before the analyst's request arrived here.
    #[error("the platform left before the query arrived here")]
    Left,
    /// Bank: the query's batches ended without a share.
    #[error("the query's batches ended without a share: {0}")]
    NoShare(String),
}

impl NodeError {
    /// A refusal with `code` and `message`.
    pub fn refused(code: cleanroom_wire::RefusalCode, message: impl Into<String>) -> Self {
        Self::Refused(cleanroom_wire::Refusal::new(code, message))
    }

    /// The refusal's code, if this is a refusal.
    pub fn refusal_code(&self) -> Option<cleanroom_wire::RefusalCode> {
        match self {
            Self::Refused(r) => Some(r.code),
            _ => None,
        }
    }
}
