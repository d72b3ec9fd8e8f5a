//! The ledger example (`client/examples/ledger.rs`) against an in-process
//! server: concurrent transfers under `lock_many`, every write fenced; money
//! is conserved, and a stale holder's late write never lands.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

#[path = "../client/examples/ledger.rs"]
#[allow(dead_code, unreachable_pub)]
mod ledger;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_conserve_money_and_stale_writes_are_fenced_out() {
    let (server, _) = support::start_default().await;
    let addr = server.local_addr().to_string();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ledger.db");

    let applied = ledger::run(&addr, &db, 4, 40).await.unwrap();
    assert!(applied > 0, "no transfer applied");
    assert_eq!(
        ledger::total(&db).unwrap(),
        ledger::START * ledger::ACCOUNTS as i64,
        "money was created or destroyed"
    );

    // A holder that lost its lock writes late, with its old token, after a
    // newer holder wrote: fenced out.
    let client = support::connect(&server).await;
    let id = ledger::account(0);
    let stale = client
        .lock("account", id.clone())
        .lease(Duration::from_millis(100))
        .try_acquire()
        .await
        .unwrap()
        .expect("free");
    let stale_token = stale.token();
    tokio::time::timeout(support::PATIENCE, stale.lost())
        .await
        .expect("lease ran out");
    let other = ledger::account(1);
    assert!(
        ledger::transfer(&client, &db, &id, &other, 5).await.unwrap(),
        "a newer holder writes"
    );
    assert!(
        !ledger::late_write(&db, &id, 1_000_000, stale_token).unwrap(),
        "a stale write landed"
    );
    assert_eq!(ledger::total(&db).unwrap(), ledger::START * ledger::ACCOUNTS as i64);
    server.shutdown().await;
}
