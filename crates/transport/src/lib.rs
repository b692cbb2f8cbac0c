#![forbid(unsafe_code)]
#![deny(clippy::indexing_slicing, clippy::unwrap_used, clippy::expect_used)]
//! QUIC (quinn) with TLS 1.3 (rustls, ring provider) and mutual
//! authentication against the collaboration's CA.
//!
//! - One UDP socket per node: the same [`quinn::Endpoint`] accepts
//!   connections (client certificates required) and makes them.
//! - ALPN [`ALPN`] names the protocol version; 0-RTT is off on both sides;
//!   session tickets and resumption are off, so a certificate that is no
//!   longer accepted stops working at the next connection.
//! - Who is on the other end is read from the verified certificate
//!   ([`certificate_names`]): nodes are `<role>.node.cleanroom`, analysts
//!   `<name>.analyst.cleanroom` (see [`pki`]).
//! - Frames are length-delimited (`u32` little endian) with a maximum size.

pub mod files;
pub mod pki;

pub use files::{IdentityFiles, Role};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;

/// The ALPN protocol id: the protocol and its version.
pub const ALPN: &[u8] = b"cleanroom/1";

/// Errors of the transport layer. None carries application data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: String,
        /// What is wrong.
        what: &'static str,
    },
    /// TLS configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The crypto provider lacks the QUIC initial suite (a build problem).
    #[error("no TLS 1.3 suite usable for QUIC")]
    NoQuicSuite,
    /// Deriving the endpoint's stateless-reset key failed (a build problem).
    #[error("cannot derive the endpoint's stateless-reset key")]
    KeyDerivation,
    /// Binding the UDP socket.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Starting a connection.
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    /// The connection failed or was closed.
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    /// Writing to a stream.
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame")]
    TruncatedFrame,
    /// Reading from a stream.
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    /// A frame over the limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    FrameTooLarge {
        /// Announced length.
        len: u64,
        /// Limit.
        max: usize,
    },
    /// The stream was closed.
    #[error("stream closed")]
    Closed(#[from] quinn::ClosedStream),
    /// The peer presented no certificate, or one this node does not accept.
    #[error("peer certificate not accepted")]
    PeerIdentity,
    /// Making certificates.
    #[error("certificate generation: {0}")]
    Certificate(#[from] rcgen::Error),
    /// Writing certificate files.
    #[error("cannot write {path}: {source}")]
    Write2 {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// A node's or an analyst's certificate chain and private key.
pub struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity {{ certificates: {}, key: <redacted> }}", self.chain.len())
    }
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TransportError> {
    std::fs::read(path).map_err(|source| TransportError::File {
        path: path.display().to_string(),
        source,
    })
}

impl Identity {
    /// Loads a PEM certificate chain and a PEM private key.
    ///
    /// # Errors
    /// [`TransportError::File`] or [`TransportError::Pem`].
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TransportError> {
        let chain = certs_from_pem(&read(cert)?, cert)?;
        let key = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|_| TransportError::Pem {
            path: key.display().to_string(),
            what: "no private key",
        })?;
        Ok(Self { chain, key })
    }

    /// A key for `label` derived from this identity's private key (HKDF-SHA256,
    /// the label as salt): the same in every process that loads the key.
    fn derived_key(&self, label: &[u8]) -> ring::hkdf::Prk {
        ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, label).extract(self.key.secret_der())
    }

    /// From DER parts.
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        Self { chain, key }
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> Option<&CertificateDer<'static>> {
        self.chain.first()
    }
}

pub(crate) fn certs_from_pem(bytes: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| TransportError::Pem {
            path: path.display().to_string(),
            what: "malformed certificate PEM",
        })?;
    if certs.is_empty() {
        return Err(TransportError::Pem {
            path: path.display().to_string(),
            what: "no certificate",
        });
    }
    Ok(certs)
}

/// The collaboration's CA certificates, and the CA's revocation lists if
/// any are configured.
#[derive(Debug, Clone)]
pub struct TrustAnchors {
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl TrustAnchors {
    /// Loads one or more CA certificates from a PEM file.
    ///
    /// # Errors
    /// [`TransportError::File`], [`TransportError::Pem`] or a TLS error for an unusable CA.
    pub fn load(path: &Path) -> Result<Self, TransportError> {
        Self::from_der(certs_from_pem(&read(path)?, path)?)
    }

    /// From DER certificates.
    ///
    /// # Errors
    /// A TLS error for an unusable CA certificate.
    pub fn from_der(certs: Vec<CertificateDer<'static>>) -> Result<Self, TransportError> {
        let mut roots = RootCertStore::empty();
        for c in certs {
            roots.add(c)?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            crls: Vec::new(),
        })
    }

    /// Adds the certificate revocation lists in a PEM file: a certificate
    /// they list is refused in both directions (client and server), before
    /// any application data.
    ///
    /// # Errors
    /// [`TransportError::File`] or [`TransportError::Pem`] for an unreadable
    /// or empty file (a configured CRL that cannot be read stops the node).
    pub fn with_crl(mut self, path: &Path) -> Result<Self, TransportError> {
        let bytes = read(path)?;
        let crls: Vec<CertificateRevocationListDer<'static>> = CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|_| TransportError::Pem {
                path: path.display().to_string(),
                what: "malformed CRL PEM",
            })?;
        if crls.is_empty() {
            return Err(TransportError::Pem {
                path: path.display().to_string(),
                what: "no certificate revocation list",
            });
        }
        self.crls.extend(crls);
        Ok(self)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Transport settings shared by both directions.
#[derive(Debug, Clone, Copy)]
pub struct TransportSettings {
    /// A connection with no traffic for this long is closed.
    pub idle_timeout: Duration,
    /// Keep-alive interval (below the idle timeout).
    pub keep_alive: Duration,
    /// Concurrent bidirectional streams a peer may open.
    pub max_streams: u32,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            max_streams: 64,
        }
    }
}

fn transport_config(s: &TransportSettings) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    if let Ok(idle) = quinn::IdleTimeout::try_from(s.idle_timeout) {
        t.max_idle_timeout(Some(idle));
    }
    t.keep_alive_interval(Some(s.keep_alive));
    t.max_concurrent_bidi_streams(s.max_streams.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Room for a few 4 MiB frames in flight on fast links.
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(32 << 20);
    // Path MTU discovery up to jumbo frames: on a path that carries them
    // (loopback, many data-centre links) bulk phases send a sixth of the
    // packets; elsewhere discovery settles on the path's MTU as before.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// The server side: TLS 1.3 only, client certificates required and checked
/// against the CA, ALPN, no 0-RTT, no tickets, no session cache.
///
/// # Errors
/// A TLS configuration error.
pub fn server_config(
    identity: &Identity,
    ca: &TrustAnchors,
    settings: &TransportSettings,
) -> Result<quinn::ServerConfig, TransportError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(ca.roots.clone(), provider())
        .with_crls(ca.crls.clone())
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    tls.send_tls13_tickets = 0;
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    let quic = QuicServerConfig::try_from(tls).map_err(|_| TransportError::NoQuicSuite)?;
    // Address-validation (retry) tokens are sealed with a key derived from
    // the node's private key rather than a random one, so a token issued
    // just before a restart is still honoured after it (with a random key
    // the client's handshake fails its connection-id check).
    let token_key = identity.derived_key(b"cleanroom-v1 quic token key");
    let mut cfg = quinn::ServerConfig::new(Arc::new(quic), Arc::new(token_key));
    cfg.transport_config(transport_config(settings));
    Ok(cfg)
}

/// Endpoint settings whose stateless-reset key is derived from the node's
/// private key (RFC 9000, section 10.3, "a static key"), not drawn per
/// process, with connection ids of 8 random bytes that any later process
/// accepts as possibly its own: after a restart on the same address, a
/// packet for a connection of the old process is answered with a stateless
/// reset the other side accepts, so it drops that connection at once
/// instead of at its idle timeout. (quinn's default ids carry a check keyed
/// per process, which the new process would refuse, and only 24 random
/// bits: with a static reset key, ids must not repeat across connections.)
fn endpoint_config(identity: &Identity) -> Result<quinn::EndpointConfig, TransportError> {
    let prk = identity.derived_key(b"cleanroom-v1 quic stateless reset key");
    let okm = prk
        .expand(&[], ring::hmac::HMAC_SHA256)
        .map_err(|_| TransportError::KeyDerivation)?;
    let mut cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::from(okm)));
    cfg.cid_generator(|| Box::new(quinn_proto::RandomConnectionIdGenerator::new(8)));
    Ok(cfg)
}

/// The client side: TLS 1.3 only, server checked against the CA and the
/// expected name, our certificate presented, ALPN, no 0-RTT, no resumption.
///
/// # Errors
/// A TLS configuration error.
pub fn client_config(
    identity: &Identity,
    ca: &TrustAnchors,
    settings: &TransportSettings,
) -> Result<quinn::ClientConfig, TransportError> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(ca.roots.clone(), provider())
        .with_crls(ca.crls.clone())
        .build()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.enable_early_data = false;
    tls.resumption = rustls::client::Resumption::disabled();
    let quic = QuicClientConfig::try_from(tls).map_err(|_| TransportError::NoQuicSuite)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    cfg.transport_config(transport_config(settings));
    Ok(cfg)
}

/// A node's endpoint: accepts connections and makes them from one UDP socket.
///
/// # Errors
/// [`TransportError::Bind`] or a TLS configuration error.
pub fn node_endpoint(
    bind: SocketAddr,
    identity: &Identity,
    ca: &TrustAnchors,
    settings: &TransportSettings,
) -> Result<quinn::Endpoint, TransportError> {
    let bind_error = |source| TransportError::Bind { addr: bind, source };
    let socket = std::net::UdpSocket::bind(bind).map_err(bind_error)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| bind_error(std::io::Error::other("no async runtime (call from within tokio)")))?;
    let mut ep = quinn::Endpoint::new(
        endpoint_config(identity)?,
        Some(server_config(identity, ca, settings)?),
        socket,
        runtime,
    )
    .map_err(bind_error)?;
    ep.set_default_client_config(client_config(identity, ca, settings)?);
    Ok(ep)
}

/// A client-only endpoint (analysts).
///
/// # Errors
/// [`TransportError::Bind`] or a TLS configuration error.
pub fn client_endpoint(
    identity: &Identity,
    ca: &TrustAnchors,
    settings: &TransportSettings,
) -> Result<quinn::Endpoint, TransportError> {
    let bind: SocketAddr = SocketAddr::from(([0, 0, 0, 0], 0));
    let mut ep = quinn::Endpoint::client(bind).map_err(|source| TransportError::Bind { addr: bind, source })?;
    ep.set_default_client_config(client_config(identity, ca, settings)?);
    Ok(ep)
}

/// Connects to `addr`, requiring its certificate to be valid for `name`.
///
/// With TLS 1.3 a refusal of *our* certificate by the server may only show
/// on the first stream operation; callers must treat stream errors as such.
///
/// # Errors
/// A connect or connection error.
pub async fn connect(ep: &quinn::Endpoint, addr: SocketAddr, name: &str) -> Result<quinn::Connection, TransportError> {
    let conn = ep.connect(addr, name)?.await?;
    if conn
        .handshake_data()
        .and_then(|h| h.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|h| h.protocol)
        != Some(ALPN.to_vec())
    {
        conn.close(1u32.into(), b"alpn");
        return Err(TransportError::PeerIdentity);
    }
    Ok(conn)
}

/// The peer's verified leaf certificate.
pub fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

/// Whether a (verified) certificate is valid for the DNS name `name`.
pub fn certificate_is_for(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else {
        return false;
    };
    ee.verify_is_valid_for_subject_name(&server_name).is_ok()
}

/// The DNS names in a certificate's subject alternative names.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(cert)
        .map(|ee| ee.valid_dns_names().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Writes one length-delimited frame. The frame's buffer is handed to the
/// QUIC stream as it is (`write_all_chunks`), not copied into it.
///
/// # Errors
/// [`TransportError::Write`] or [`TransportError::FrameTooLarge`].
pub async fn write_frame(send: &mut quinn::SendStream, frame: Vec<u8>, max: usize) -> Result<(), TransportError> {
    let len = match u32::try_from(frame.len()) {
        Ok(len) if frame.len() <= max => len,
        _ => {
            return Err(TransportError::FrameTooLarge {
                len: frame.len() as u64,
                max,
            });
        }
    };
    let mut chunks = [
        bytes::Bytes::copy_from_slice(&len.to_le_bytes()),
        bytes::Bytes::from(frame),
    ];
    send.write_all_chunks(&mut chunks).await?;
    Ok(())
}

/// Reads one length-delimited frame; `None` when the peer finished the
/// stream cleanly between frames.
///
/// # Errors
/// [`TransportError::FrameTooLarge`] before reading an oversized body,
/// [`TransportError::TruncatedFrame`] or a read error.
pub async fn read_frame(recv: &mut quinn::RecvStream, max: usize) -> Result<Option<Vec<u8>>, TransportError> {
    let mut len = [0u8; 4];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(TransportError::TruncatedFrame),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max {
        return Err(TransportError::FrameTooLarge { len: len as u64, max });
    }
    // The buffer grows with the bytes that actually arrive: a peer that
    // announces a large frame and stalls holds at most 1 MiB here.
    let mut buf = Vec::with_capacity(len.min(FRAME_PREALLOCATION));
    while buf.len() < len {
        match recv.read_chunk(len - buf.len(), true).await? {
            Some(chunk) => buf.extend_from_slice(&chunk.bytes),
            None => return Err(TransportError::TruncatedFrame),
        }
    }
    Ok(Some(buf))
}

/// Largest UDP payload path MTU discovery tries (a 9,000-byte jumbo frame
/// less IPv6 and UDP headers).
const MAX_UDP_PAYLOAD: u16 = 8952;

/// Most bytes reserved for a frame before its body arrives.
const FRAME_PREALLOCATION: usize = 1 << 20;
