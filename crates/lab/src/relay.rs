//! An in-process UDP relay that emulates a network path: every datagram is
//! delayed by half the round-trip time in each direction, and each direction
//! is a link of the given bandwidth (datagrams queue behind each other),
//! with an Ethernet MTU (a datagram over 1,472 bytes of UDP payload is
//! dropped, as a 1,500-byte path drops it, so QUIC's MTU discovery settles
//! where it would on such a path).
//! Used by `cleanroom bench --rtt-ms --bandwidth-mbit`; it only ever binds
//! and sends on 127.0.0.1.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

use cleanroom_node::NodeError;

/// The emulated path.
#[derive(Clone, Copy, Debug)]
pub struct Path {
    /// Round-trip time added.
    pub rtt: Duration,
    /// Bandwidth of each direction in bits per second (`None`: unlimited).
    pub bits_per_second: Option<u64>,
}

/// A running relay: clients talk to [`Relay::addr`], which forwards to the target.
#[derive(Debug)]
pub struct Relay {
    addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// UDP payload of a 1,500-byte IPv4 packet.
const PATH_MTU_PAYLOAD: usize = 1472;

async fn link(sock: Arc<UdpSocket>, mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>, SocketAddr)>, path: Path) {
    let mut free_at = Instant::now();
    while let Some((arrived, data, to)) = rx.recv().await {
        let mut at = arrived + path.rtt / 2;
        if let Some(bps) = path.bits_per_second {
            let start = at.max(free_at);
            let tx = Duration::from_nanos((data.len() as u64 * 8).saturating_mul(1_000_000_000) / bps.max(1));
            free_at = start + tx;
            at = free_at;
        }
        tokio::time::sleep_until(at).await;
        let _ = sock.send_to(&data, to).await;
    }
}

impl Relay {
    /// Starts a relay to `target` on 127.0.0.1.
    ///
    /// # Errors
    /// When a socket cannot be bound.
    pub async fn start(target: SocketAddr, path: Path) -> Result<Relay, NodeError> {
        let bind = |source: std::io::Error| NodeError::Io {
            what: "binding the relay's sockets",
            source,
        };
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.map_err(bind)?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.map_err(bind)?);
        let addr = front.local_addr().map_err(bind)?;
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (up_tx, up_rx) = mpsc::unbounded_channel();
        let (down_tx, down_rx) = mpsc::unbounded_channel();
        let mut tasks = vec![
            tokio::spawn(link(back.clone(), up_rx, path)),
            tokio::spawn(link(front.clone(), down_rx, path)),
        ];
        // client -> relay front -> (delay) -> back -> target
        let (f, c) = (front.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                *c.lock().await = Some(from);
                if n > PATH_MTU_PAYLOAD {
                    continue;
                }
                let _ = up_tx.send((Instant::now(), buf[..n].to_vec(), target));
            }
        }));
        // target -> back -> (delay) -> front -> client
        let (b, c) = (back.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = b.recv_from(&mut buf).await {
                if from != target || n > PATH_MTU_PAYLOAD {
                    continue;
                }
                if let Some(to) = *c.lock().await {
                    let _ = down_tx.send((Instant::now(), buf[..n].to_vec(), to));
                }
            }
        }));
        Ok(Relay { addr, tasks })
    }

    /// The address clients use.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo() -> SocketAddr {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = s.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let _ = s.send_to(&buf[..n], from).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn delays_and_rate_limits() {
        let target = echo().await;
        let relay = Relay::start(
            target,
            Path {
                rtt: Duration::from_millis(80),
                bits_per_second: Some(1_000_000),
            },
        )
        .await
        .unwrap();
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let t = Instant::now();
        c.send_to(b"ping", relay.addr()).await.unwrap();
        let mut buf = [0u8; 2048];
        let (n, _) = c.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ping");
        let rtt = t.elapsed();
        // The lower bound shows the delay is applied; the upper one only
        // that it is not grossly more (a loaded test machine can schedule
        // this thread hundreds of milliseconds late).
        assert!(
            rtt >= Duration::from_millis(80) && rtt < Duration::from_secs(2),
            "{rtt:?}"
        );
        // 10 datagrams of 1000 bytes at 1 Mbit/s take at least 80 ms each way to serialise.
        let t = Instant::now();
        for _ in 0..10 {
            c.send_to(&[7u8; 1000], relay.addr()).await.unwrap();
        }
        for _ in 0..10 {
            c.recv_from(&mut buf).await.unwrap();
        }
        assert!(t.elapsed() >= Duration::from_millis(80 + 80), "{:?}", t.elapsed());
    }
}
