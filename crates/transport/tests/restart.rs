//! A node killed and restarted on the same address (same certificate and
//! key) ends the old process's connections at once: the first packet a
//! client sends on one is answered with a stateless reset the client
//! recognises, because the reset key is derived from the node's private key
//! rather than drawn at random per process. Without that the client waits
//! for its idle timeout (30 s here).

// Test helpers outside #[test] functions.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cleanroom_transport::{Identity, TransportSettings, TrustAnchors, client_endpoint, connect, node_endpoint, pki};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

/// A node endpoint at `addr`, on `rt`, that accepts connections and keeps
/// them open.
fn serve(rt: &tokio::runtime::Runtime, addr: SocketAddr, id: &Identity, ca: &TrustAnchors) {
    let ep = rt.block_on(async { node_endpoint(addr, id, ca, &TransportSettings::default()) });
    rt.spawn(accept(ep.unwrap()));
}

async fn accept(ep: quinn::Endpoint) {
    let mut open = Vec::new();
    while let Some(incoming) = ep.accept().await {
        if let Ok(c) = incoming.await {
            open.push(c);
        }
    }
}

#[test]
fn a_restarted_node_resets_the_old_processs_connections_at_once() {
    let dir = tempfile::tempdir().unwrap();
    pki::init(dir.path(), &["alice".to_string()], 30).unwrap();
    let ca = TrustAnchors::load(&dir.path().join("ca.pem")).unwrap();
    let bank = Identity::load(&dir.path().join("bank.pem"), &dir.path().join("bank.key")).unwrap();
    let alice = Identity::load(
        &dir.path().join("analyst-alice.pem"),
        &dir.path().join("analyst-alice.key"),
    )
    .unwrap();
    let addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();

    let client_rt = runtime();
    let old = runtime();
    serve(&old, addr, &bank, &ca);
    let (ep, conn) = client_rt.block_on(async {
        let ep = client_endpoint(&alice, &ca, &TransportSettings::default()).unwrap();
        let conn = connect(&ep, addr, &pki::node_name("bank")).await.unwrap();
        (ep, conn)
    });
    // The old process dies: its tasks and socket go without a packet sent
    // (as under SIGKILL), then a new one starts on the same address.
    drop(old);
    let new = runtime();
    serve(&new, addr, &bank, &ca);
    std::thread::sleep(Duration::from_millis(100));

    let (ended, secs) = client_rt.block_on(async {
        let t = Instant::now();
        // A packet on the old connection (nodes allow no unidirectional
        // streams, so a bidirectional one).
        if let Ok((mut s, _r)) = conn.open_bi().await {
            let _ = s.write_all(&[0u8; 200]).await;
        }
        let ended = tokio::time::timeout(Duration::from_secs(20), conn.closed()).await;
        (ended, t.elapsed().as_secs_f64())
    });
    println!("connection to the old process ended after {secs:.3} s: {ended:?}");
    assert!(
        matches!(ended, Ok(quinn::ConnectionError::Reset)),
        "not reset at once: {ended:?} after {secs} s"
    );
    // Well under the client's 5 s keep-alive: the reset answered our write.
    assert!(secs < 1.0, "{secs} s");
    drop(ep);
}
