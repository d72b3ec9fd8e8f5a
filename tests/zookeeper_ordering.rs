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

/// The same for a persistent recursive watch on a lock directory, the way a
/// directory view uses it (`backend/zookeeper/views.rs`): once our create's
/// reply is in, draining the watcher without waiting yields the creation
/// and deletion events of every node another session made or removed
/// before our create — and the view built from a listing plus those events
/// equals a listing made right after our create.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recursive_watch_has_every_earlier_child_event_when_a_reply_arrives() {
    use std::collections::BTreeSet;

    let zk = ZooKeeper::start().expect("start ZooKeeper (apt-get install -y zookeeper)");
    let ours = Client::connect(&zk.connect_string()).await.unwrap();
    let theirs = Client::connect(&zk.connect_string()).await.unwrap();
    let persistent = CreateMode::Persistent.with_acls(Acls::anyone_all());
    let ephemeral_seq = CreateMode::EphemeralSequential.with_acls(Acls::anyone_all());
    let dir = "/recursive-locks";
    ours.create(dir, b"", &persistent).await.unwrap();
    let mut watcher = ours
        .watch(dir, zookeeper_client::AddWatchMode::PersistentRecursive)
        .await
        .unwrap();
    let base = ours.list_children(dir).await.unwrap();
    let mut view: BTreeSet<String> = base.into_iter().collect();
    let mut theirs_alive: Vec<String> = Vec::new();
    let drain = |view: &mut BTreeSet<String>, watcher: &mut zookeeper_client::PersistentWatcher| {
        while let Some(event) = watcher.changed().now_or_never() {
            let name = event.path.rsplit('/').next().unwrap().to_owned();
            match event.event_type {
                EventType::NodeCreated => {
                    view.insert(name);
                }
                EventType::NodeDeleted => {
                    view.remove(&name);
                }
                other => panic!("unexpected event {other:?} on {}", event.path),
            }
        }
    };
    for round in 0..200u32 {
        // The other session creates a node, and every third round deletes
        // its oldest one, each committed before our create below.
        let (_, seq) = theirs
            .create(&format!("{dir}/theirs-"), b"", &ephemeral_seq)
            .await
            .unwrap();
        theirs_alive.push(format!("theirs-{seq}"));
        if round % 3 == 2 {
            let gone = theirs_alive.remove(0);
            theirs.delete(&format!("{dir}/{gone}"), None).await.unwrap();
        }
        let (_, seq) = ours.create(&format!("{dir}/ours-"), b"", &ephemeral_seq).await.unwrap();
        let mine = format!("ours-{seq}");
        drain(&mut view, &mut watcher);
        for name in &theirs_alive {
            assert!(
                view.contains(name),
                "round {round}: {name}, made before our create, is missing from the view"
            );
        }
        assert!(view.contains(&mine), "round {round}: the view lacks our own node");
        // Our node goes too (as a release would); the view follows.
        ours.delete(&format!("{dir}/{mine}"), None).await.unwrap();
        drain(&mut view, &mut watcher);
        let listed: BTreeSet<String> = ours.list_children(dir).await.unwrap().into_iter().collect();
        assert_eq!(view, listed, "round {round}: the view differs from a listing");
    }
}
