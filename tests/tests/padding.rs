//! The platform pads the size of its input to every join (each block with a
//! platform GROUP BY, the whole set without one) with a draw of its
//! cardinality noise, and the draw is a function of its own key and the
//! join's input (filter, grouping, data version). So re-joins of unchanged
//! data show the bank the same padded sizes: averaging them does not
//! converge to the true sizes. Before this, a join without GROUP BY showed
//! the exact size, and each re-join with GROUP BY a fresh sample.
//!
//! The bank here is a fake one with the bank's certificate and signed
//! policy: it records each join offer and refuses it, so every retry of the
//! analyst's query makes the platform join again.
//!
//! `cargo test --locked -p cleanroom-tests --test padding -- --nocapture`

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cleanroom_client::new_query_id;
use cleanroom_lab::demo::Fixture;
use cleanroom_transport::{Identity, TransportSettings, TrustAnchors, client_endpoint, pki, read_frame, write_frame};
use cleanroom_wire::{
    Abort, AbortCode, AnalystRequest, AnalystResponse, MAX_MESSAGE_LEN, Message, PolicyMessage, QueryRequest,
};

type Offers = Arc<Mutex<Vec<Vec<u64>>>>;

/// A bank that shows the real bank's signed policy and records and refuses
/// every join offer.
fn fake_bank(certs: &Path) -> (quinn::Endpoint, Offers) {
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let id = Identity::load(&certs.join("bank.pem"), &certs.join("bank.key")).unwrap();
    let ep = cleanroom_transport::node_endpoint(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &id,
        &ca,
        &TransportSettings::default(),
    )
    .unwrap();
    let policy = std::fs::read(certs.join("bank.policy")).unwrap();
    let offers: Offers = Arc::default();
    let (server, seen) = (ep.clone(), offers.clone());
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            let (policy, seen) = (policy.clone(), seen.clone());
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut s, mut r)) = conn.accept_bi().await {
                    let Ok(Some(f)) = read_frame(&mut r, MAX_MESSAGE_LEN).await else {
                        continue;
                    };
                    let reply = match Message::decode(&f) {
                        Ok(Message::Policy(_)) => Message::Policy(PolicyMessage { signed: policy.clone() }),
                        Ok(Message::JoinOffer(o)) => {
                            seen.lock().unwrap().push(o.blocks);
                            Message::Abort(Abort {
                                session: cleanroom_wire::SessionId([0; 16]),
                                code: AbortCode::Refused,
                            })
                        }
                        _ => continue,
                    };
                    let _ = write_frame(&mut s, reply.encode().unwrap(), MAX_MESSAGE_LEN).await;
                    let _ = s.finish();
                }
            });
        }
    });
    (ep, offers)
}

/// The analyst's query, to the platform alone (the bank is the fake).
async fn ask_platform(certs: &Path, platform: SocketAddr, req: &QueryRequest) -> AnalystResponse {
    let ca = TrustAnchors::load(&certs.join("ca.pem")).unwrap();
    let id = Identity::load(&certs.join("analyst-alice.pem"), &certs.join("analyst-alice.key")).unwrap();
    let ep = client_endpoint(&id, &ca, &TransportSettings::default()).unwrap();
    let conn = cleanroom_transport::connect(&ep, platform, &pki::node_name("platform"))
        .await
        .unwrap();
    let (mut s, mut r) = conn.open_bi().await.unwrap();
    let m = Message::AnalystRequest(AnalystRequest::Query(req.clone()));
    write_frame(&mut s, m.encode().unwrap(), MAX_MESSAGE_LEN).await.unwrap();
    let _ = s.finish();
    let f = tokio::time::timeout(Duration::from_secs(60), read_frame(&mut r, MAX_MESSAGE_LEN))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    conn.close(0u32.into(), b"done");
    match Message::decode(&f).unwrap() {
        Message::AnalystResponse(a) => a,
        other => panic!("{other:?}"),
    }
}

const TRIES: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_joins_of_unchanged_data_show_the_bank_the_same_padded_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let mut fixture = Fixture::create(dir.path(), 600, 73, &["alice"]).unwrap();
    fixture
        .add_sql_template(
            "by_segment",
            "SELECT p.segment, COUNT(DISTINCT b.customer) AS customers FROM bank b JOIN platform p GROUP BY p.segment",
            "alice",
        )
        .unwrap();
    let certs = fixture.dir.join("certs");
    let (bank, offers) = fake_bank(&certs);
    let mut platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
    let users = platform.matcher_ids().unwrap().len() as u64;
    let plan = fixture.plan("by_segment", &[]).unwrap();
    let groups = plan.matcher_groups().len();
    assert!(groups > 1);

    for (template, blocks) in [("overlap", 1), ("by_segment", groups)] {
        offers.lock().unwrap().clear();
        let req = QueryRequest {
            query_id: new_query_id().unwrap(),
            template: template.into(),
            params: vec![],
        };
        for k in 0..=TRIES {
            if k == TRIES {
                // The platform restarted: the same padding still.
                platform.shutdown().await;
                platform = fixture.start_platform(bank.local_addr().unwrap()).await.unwrap();
            }
            let answer = ask_platform(&certs, platform.local_addr().unwrap(), &req).await;
            assert!(matches!(answer, AnalystResponse::Refused(_)), "{answer:?}");
        }
        let seen = offers.lock().unwrap().clone();
        assert_eq!(seen.len(), TRIES + 1, "{template}: one join offer per try");
        let first = &seen[0];
        assert_eq!(first.len(), blocks, "{template}");
        for (k, o) in seen.iter().enumerate() {
            assert_eq!(
                o, first,
                "{template}: try {k} showed the bank other sizes (fresh padding)"
            );
        }
        // Padded: the bank never sees the exact input size (every platform
        // user passes these queries' platform conditions).
        let total: u64 = first.iter().sum();
        assert!(
            total > users,
            "{template}: {total} offered for {users} users: not padded"
        );
        println!(
            "{template}: {} joins, the bank saw {first:?} each time for {users} platform users",
            seen.len()
        );
    }
    platform.shutdown().await;
}
