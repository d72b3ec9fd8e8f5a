//! The ZooKeeper ordering the warm acquire path relies on, tested directly
//! against a real server and the `zookeeper-client` crate we use: a session
//! sees the watch event for a change committed before one of its requests
//! before that request's reply, and the client has handed the event to the
//! watcher by the time the reply's future completes — so polling the watcher
//! without waiting, right after the reply, finds it (`backend/zookeeper/kinds.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clastor_testkit::ZooKeeper;
use futures_util::FutureExt as _;
use zookeeper_client::{Acls, Client, CreateMode, EventType};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_made_before_a_request_is_seen_by_its_watcher_when_the_reply_arrives() {
    let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    let watcher_session = Client::connect(&zk.connect_string()).await.unwrap();
    let writer_session = Client::connect(&zk.connect_string()).await.unwrap();
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let ephemeral_seq = CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());
    watcher_session.create("/ordering", b"0", &persistent).await.unwrap();
    watcher_session
        .create("/ordering-locks", b"", &persistent)
        .await
        .unwrap();
    for round in 0..200u32 {
        let (_, _, watch) = watcher_session.get_and_watch_data("/ordering").await.unwrap();
        let mut fired = Box::pin(watch.changed());
        // Nothing changed yet: the watcher has nothing.
        assert!(
            (&mut fired).now_or_never().is_none(),
            "round {round}: event before any change"
        );
        // Another session changes the node, and that change is committed.
        writer_session
            .set_data("/ordering", round.to_string().as_bytes(), None)
            .await
            .unwrap();
        // Our session's next request — a lock-node create, as an acquire's.
        let (_stat, _seq) = watcher_session
            .create("/ordering-locks/n-", b"", &ephemeral_seq)
            .await
            .unwrap();
        // Its reply is in: the event for the earlier change must be too.
        let event = (&mut fired)
            .now_or_never()
            .unwrap_or_else(|| panic!("round {round}: the reply came before the event of an earlier change"));
        assert_eq!(event.event_type, EventType::NodeDataChanged);
        assert_eq!(event.path, "/ordering");
    }
}
