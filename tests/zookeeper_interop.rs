//! Interoperation with real foreign lock clients on the same lock path: Apache
//! Curator's `InterProcessMutex` (Java, Debian's `libcurator-recipes-java`,
//! compiled by this test) and kazoo's `Lock` (Python, Debian's
//! `python3-kazoo`). A Clastor holder excludes them, and they exclude Clastor.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use clastor::backend::zookeeper::{ZkConfig, ZkDigest, ZooKeeperBackend};
use clastor::{AcquireOptions, Engine, EngineConfig, LockKey};
use clastor_protocol::{KindLayout, LockMode};
use clastor_testkit::ZooKeeper;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const JAVA: &str = "/usr/share/java";
const PATIENCE: Duration = Duration::from_secs(30);

fn classpath(extra: &Path) -> String {
    let jars = [
        "curator-recipes",
        "curator-framework",
        "curator-client",
        "zookeeper",
        "guava",
        "slf4j-nop",
    ];
    let mut cp: Vec<String> = jars.iter().map(|j| format!("{JAVA}/{j}.jar")).collect();
    for jar in &cp {
        assert!(
            Path::new(jar).exists(),
            "{jar} is missing: apt-get install -y libcurator-recipes-java zookeeper (scripts/test.sh does)"
        );
    }
    cp.push(extra.display().to_string());
    cp.join(":")
}

/// Compiles the Java drivers into a temporary directory.
fn compile(out: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop");
    let status = std::process::Command::new("javac")
        .args(["-d", &out.display().to_string(), "-cp", &classpath(out)])
        .args([dir.join("CuratorMutex.java"), dir.join("CuratorRwLock.java")])
        .status()
        .expect("javac (the JDK) is needed");
    assert!(status.success(), "javac failed");
    out.to_path_buf()
}

/// A foreign lock client speaking the drivers' line protocol.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Peer {
    async fn curator(classes: &Path, connect: &str, path: &str) -> Peer {
        let mut cmd = Command::new("java");
        cmd.args(["-cp", &classpath(classes), "CuratorMutex", connect, path]);
        Peer::start(cmd).await
    }

    async fn curator_rw(classes: &Path, connect: &str, path: &str) -> Peer {
        let mut cmd = Command::new("java");
        cmd.args(["-cp", &classpath(classes), "CuratorRwLock", connect, path]);
        Peer::start(cmd).await
    }

    async fn kazoo_rw(connect: &str, path: &str) -> Peer {
        Peer::python("kazoo_rwlock.py", connect, path, None).await
    }

    async fn kazoo(connect: &str, path: &str) -> Peer {
        Peer::python("kazoo_lock.py", connect, path, None).await
    }

    /// kazoo's `Lock`, authenticated with digest credentials.
    async fn kazoo_as(connect: &str, path: &str, digest: &str) -> Peer {
        Peer::python("kazoo_lock.py", connect, path, Some(digest)).await
    }

    async fn python(script: &str, connect: &str, path: &str, digest: Option<&str>) -> Peer {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop").join(script);
        // Debian's interpreter, where python3-kazoo is installed.
        let mut cmd = Command::new("/usr/bin/python3");
        cmd.arg(script).args([connect, path]);
        if let Some(digest) = digest {
            cmd.env("KAZOO_DIGEST", digest);
        }
        Peer::start(cmd).await
    }

    async fn start(mut cmd: Command) -> Peer {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut c = Peer { child, stdin, lines };
        assert_eq!(
            c.line().await,
            "READY",
            "the foreign client did not start (apt-get install -y python3-kazoo libcurator-recipes-java)"
        );
        c
    }

    async fn line(&mut self) -> String {
        tokio::time::timeout(PATIENCE, self.lines.next_line())
            .await
            .expect("the foreign client answered in time")
            .unwrap()
            .expect("the foreign client is still running")
    }

    async fn send(&mut self, cmd: &str) {
        self.stdin.write_all(format!("{cmd}\n").as_bytes()).await.unwrap();
        self.stdin.flush().await.unwrap();
    }

    async fn cmd(&mut self, cmd: &str) -> String {
        self.send(cmd).await;
        self.line().await
    }

    async fn quit(mut self) {
        self.send("quit").await;
        let _ = tokio::time::timeout(PATIENCE, self.child.wait()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clastor_and_curator_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let classes = compile(dir.path());
    exclude_each_other(|connect, path| {
        let classes = classes.clone();
        async move { Peer::curator(&classes, &connect, &path).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clastor_and_kazoo_exclude_each_other() {
    exclude_each_other(|connect, path| async move { Peer::kazoo(&connect, &path).await }).await;
}

/// The foreign client holds: Clastor is refused, then granted when it
/// releases. Clastor holds: the foreign client times out, then gets the lock
/// when Clastor releases.
async fn exclude_each_other<F, Fut>(start_peer: F)
where
    F: FnOnce(String, String) -> Fut,
    Fut: std::future::Future<Output = Peer>,
{
    let zk = tokio::task::spawn_blocking(|| ZooKeeper::start().expect("start ZooKeeper"))
        .await
        .unwrap();
    let backend = ZooKeeperBackend::connect(ZkConfig {
        hosts: zk.connect_string(),
        ..ZkConfig::default()
    })
    .await
    .unwrap();
    let key = LockKey::new("transaction", "tx-1").unwrap();
    let path = backend.lock_path(&key).await.unwrap();
    let engine = Engine::new(backend, EngineConfig::default());
    let (session, _lost) = engine.open_session("interop");
    let mut peer = start_peer(zk.connect_string(), path).await;

    assert_eq!(peer.cmd("acquire 10000").await, "ACQUIRED");
    assert_eq!(session.acquire(&key, AcquireOptions::try_once()).await.unwrap(), None);
    let waiter = {
        let (session, key) = (session.clone(), key.clone());
        tokio::spawn(async move { session.acquire(&key, AcquireOptions::wait(PATIENCE)).await })
    };
    assert_eq!(peer.cmd("release").await, "RELEASED");
    let granted = waiter
        .await
        .unwrap()
        .unwrap()
        .expect("Clastor granted after the foreign client released");
    assert!(granted.token > 0);

    assert_eq!(peer.cmd("acquire 300").await, "TIMEOUT");
    peer.send("acquire 30000").await;
    assert!(session.release(&key).await.unwrap());
    assert_eq!(peer.line().await, "ACQUIRED");
    assert_eq!(peer.cmd("release").await, "RELEASED");
    peer.quit().await;
    engine.shutdown().await;
    drop(zk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clastor_and_curator_read_write_locks_exclude_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let classes = compile(dir.path());
    read_write_exclusion(
        |connect, path| {
            let classes = classes.clone();
            async move { Peer::curator_rw(&classes, &connect, &path).await }
        },
        true,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clastor_and_kazoo_read_write_locks_exclude_each_other() {
    read_write_exclusion(
        |connect, path| async move { Peer::kazoo_rw(&connect, &path).await },
        false,
    )
    .await;
}

/// On a kind rotated to the read-write layout: foreign readers share with
/// Clastor readers and exclude Clastor writers, foreign writers exclude
/// both, and the other way round; with `downgrade`, Curator's write-to-read
/// downgrade (take the read lock while holding the write lock, then release
/// the write lock) keeps Clastor's writers out and lets its readers in.
async fn read_write_exclusion<F, Fut>(start_peer: F, downgrade: bool)
where
    F: FnOnce(String, String) -> Fut,
    Fut: std::future::Future<Output = Peer>,
{
    let zk = tokio::task::spawn_blocking(|| ZooKeeper::start().expect("start ZooKeeper"))
        .await
        .unwrap();
    let backend = ZooKeeperBackend::connect(ZkConfig {
        hosts: zk.connect_string(),
        ..ZkConfig::default()
    })
    .await
    .unwrap();
    let engine = Engine::new(backend, EngineConfig::default());
    let key = LockKey::new("report", "r-1").unwrap();
    engine
        .rotate_to_layout("report", "v1", "v2", Some(KindLayout::ReadWrite), PATIENCE, &|_| {})
        .await
        .unwrap();
    let path = engine.backend().lock_path(&key).await.unwrap();
    assert!(path.contains("/report/v2/"), "{path}");
    let (reader, _) = engine.open_session("interop-reader");
    let (writer, _) = engine.open_session("interop-writer");
    let shared = AcquireOptions {
        mode: LockMode::Shared,
        ..AcquireOptions::try_once()
    };
    let exclusive = AcquireOptions::try_once();
    let mut peer = start_peer(zk.connect_string(), path).await;

    // A foreign reader: Clastor readers share, writers wait.
    assert_eq!(peer.cmd("read 10000").await, "ACQUIRED");
    let t = reader.acquire(&key, shared).await.unwrap().expect("readers share");
    assert!(t.token > 0);
    assert_eq!(writer.acquire(&key, exclusive).await.unwrap(), None);
    assert!(reader.release(&key).await.unwrap());
    let waiting_writer = {
        let (writer, key) = (writer.clone(), key.clone());
        tokio::spawn(async move { writer.acquire(&key, AcquireOptions::wait(PATIENCE)).await })
    };
    assert_eq!(peer.cmd("unread").await, "RELEASED");
    waiting_writer
        .await
        .unwrap()
        .unwrap()
        .expect("Clastor's writer, once the foreign reader left");

    // A Clastor writer: foreign readers and writers wait.
    assert_eq!(peer.cmd("read 300").await, "TIMEOUT");
    assert_eq!(peer.cmd("write 300").await, "TIMEOUT");
    peer.send("read 30000").await;
    assert!(writer.release(&key).await.unwrap());
    assert_eq!(peer.line().await, "ACQUIRED");
    assert_eq!(peer.cmd("unread").await, "RELEASED");

    // A Clastor reader: foreign readers share, foreign writers wait.
    reader.acquire(&key, shared).await.unwrap().expect("free");
    assert_eq!(peer.cmd("read 10000").await, "ACQUIRED");
    assert_eq!(peer.cmd("unread").await, "RELEASED");
    assert_eq!(peer.cmd("write 300").await, "TIMEOUT");
    peer.send("write 30000").await;
    assert!(reader.release(&key).await.unwrap());
    assert_eq!(peer.line().await, "ACQUIRED");

    // A foreign writer: Clastor readers and writers wait.
    assert_eq!(reader.acquire(&key, shared).await.unwrap(), None);
    assert_eq!(writer.acquire(&key, exclusive).await.unwrap(), None);
    if downgrade {
        // Downgrade with nobody queued: the read lock is granted beside the
        // write lock, which then goes. (Debian's Curator 5.4 names the
        // downgraded read node like any reader; from 5.5 — CURATOR-621 —
        // it may sort at the write node's place, which Clastor would read
        // as a writer: safe, but this step's expectation would change.)
        assert_eq!(peer.cmd("read 10000").await, "ACQUIRED");
        assert_eq!(peer.cmd("unwrite").await, "RELEASED");
        assert_eq!(
            writer.acquire(&key, exclusive).await.unwrap(),
            None,
            "a writer beside a downgraded reader"
        );
        reader
            .acquire(&key, shared)
            .await
            .unwrap()
            .expect("a reader beside the downgraded reader");
        assert!(reader.release(&key).await.unwrap());
        assert_eq!(peer.cmd("unread").await, "RELEASED");
    } else {
        assert_eq!(peer.cmd("unwrite").await, "RELEASED");
    }
    writer.acquire(&key, exclusive).await.unwrap().expect("free again");
    assert!(writer.release(&key).await.unwrap());
    peer.quit().await;
    engine.shutdown().await;
    drop(zk);
}

/// With digest credentials, every node Clastor makes is closed to anyone
/// without them (reading aside): kazoo without them cannot delete a Clastor
/// lock node, nor can a plain client create in its lock directory or change
/// the kind's version; kazoo with them still shares the lock; the password
/// never shows in the config's `Debug`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_acls_close_clastor_nodes_to_clients_without_the_credentials() {
    const CREDENTIALS: &str = "clastor:s3cret-pw";
    let zk = tokio::task::spawn_blocking(|| ZooKeeper::start().expect("start ZooKeeper"))
        .await
        .unwrap();
    let cfg = ZkConfig {
        hosts: zk.connect_string(),
        digest: Some(ZkDigest::new(format!("{CREDENTIALS}\n")).unwrap()),
        ..ZkConfig::default()
    };
    let shown = format!("{cfg:?}");
    assert!(
        shown.contains("clastor:<redacted>") && !shown.contains("s3cret"),
        "{shown}"
    );
    assert!(ZkDigest::new("no-colon").is_err() && ZkDigest::new("user:").is_err());
    let backend = ZooKeeperBackend::connect(cfg).await.unwrap();
    let key = LockKey::new("secured", "s-1").unwrap();
    let dir = backend.lock_path(&key).await.unwrap();
    let engine = Engine::new(backend, EngineConfig::default());
    let (session, _lost) = engine.open_session("acl");
    session
        .acquire(&key, AcquireOptions::try_once())
        .await
        .unwrap()
        .expect("free");

    let anonymous = zookeeper_client::Client::connect(&zk.connect_string()).await.unwrap();
    let nodes = anonymous.list_children(&dir).await.unwrap();
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    let node = format!("{dir}/{}", nodes[0]);
    let version_node = dir
        .rsplit_once("/v1/")
        .map(|(kind, _)| format!("{kind}/version"))
        .unwrap();
    for path in [&dir, &node, &version_node] {
        let (acls, _) = anonymous.get_acl(path).await.unwrap();
        let has = |scheme: &str, id: &str, perm: zookeeper_client::Permission| {
            acls.iter()
                .any(|a| a.scheme() == scheme && a.id().starts_with(id) && a.permission() == perm)
        };
        assert!(
            acls.len() == 2
                && has("digest", "clastor:", zookeeper_client::Permission::ALL)
                && has("world", "anyone", zookeeper_client::Permission::READ),
            "{path}: {acls:?}"
        );
    }
    assert_eq!(
        anonymous.delete(&node, None).await,
        Err(zookeeper_client::Error::NoAuth)
    );
    assert_eq!(
        anonymous.set_data(&version_node, b"v9\nnormal", None).await.map(|_| ()),
        Err(zookeeper_client::Error::NoAuth)
    );
    let open = zookeeper_client::CreateMode::EphemeralSequential.with_acls(zookeeper_client::Acls::anyone_all());
    assert_eq!(
        anonymous
            .create(&format!("{dir}/x-lock-"), &[], &open)
            .await
            .map(|_| ()),
        Err(zookeeper_client::Error::NoAuth)
    );

    let mut stranger = Peer::kazoo(&zk.connect_string(), &dir).await;
    assert_eq!(stranger.cmd(&format!("delete {node}")).await, "NoAuthError");
    stranger.quit().await;
    assert!(
        session.release(&key).await.unwrap(),
        "the node the stranger could not delete is still ours"
    );

    // kazoo with the credentials shares the lock with Clastor.
    session
        .acquire(&key, AcquireOptions::try_once())
        .await
        .unwrap()
        .expect("free");
    let mut friend = Peer::kazoo_as(&zk.connect_string(), &dir, CREDENTIALS).await;
    assert_eq!(friend.cmd("acquire 300").await, "TIMEOUT");
    friend.send("acquire 30000").await;
    assert!(session.release(&key).await.unwrap());
    assert_eq!(friend.line().await, "ACQUIRED");
    assert_eq!(friend.cmd("release").await, "RELEASED");
    friend.quit().await;
    engine.shutdown().await;
    drop(zk);
}

/// One hold as its holder saw it: read or write, and wall-clock ns read
/// after the grant and before the release (so inside the true hold).
#[derive(Debug, Clone, Copy)]
struct Hold {
    write: bool,
    from: u128,
    to: u128,
    who: &'static str,
}

fn wall_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Every pair of holds where one is a write must not overlap.
fn assert_no_rw_overlap(holds: &mut [Hold]) {
    holds.sort_by_key(|h| h.from);
    for (i, a) in holds.iter().enumerate() {
        for b in &holds[i + 1..] {
            if b.from >= a.to {
                break;
            }
            assert!(
                !(a.write || b.write),
                "overlap: {}'s {a:?} and {}'s {b:?}",
                a.who,
                b.who
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curator_read_write_locks_and_clastor_hammer_one_key_without_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let classes = compile(dir.path());
    rw_hammer(
        |connect, path| {
            let classes = classes.clone();
            async move { Peer::curator_rw(&classes, &connect, &path).await }
        },
        "curator",
    )
    .await;
}

/// Two Clastor servers (four sessions, reading or writing at random) and a
/// foreign read-write lock client hammer one key in the read-write layout:
/// no write overlaps anything, from every holder's own view, and each
/// Clastor writer's token is greater than every Clastor token granted before
/// it. (Curator's downgrade is left out: Curator up to 5.4 lets a writer
/// queued before the downgrade in, its own as well as ours — CURATOR-621;
/// `read_write_exclusion` checks the downgrade with nobody queued. kazoo's
/// read-write locks are not hammered: kazoo 2.8's `ReadLock` waits for
/// every write node in the directory, even one queued after it, so a
/// waiting kazoo reader deadlocks with any writer behind it, kazoo's own
/// included, until one times out; `read_write_exclusion` checks kazoo.)
async fn rw_hammer<F, Fut>(start_peer: F, peer_name: &'static str)
where
    F: FnOnce(String, String) -> Fut,
    Fut: std::future::Future<Output = Peer>,
{
    const ROUNDS: usize = 40;
    const PEER_ROUNDS: usize = 60;
    let zk = tokio::task::spawn_blocking(|| ZooKeeper::start().expect("start ZooKeeper"))
        .await
        .unwrap();
    let mut engines = Vec::new();
    for _ in 0..2 {
        let backend = ZooKeeperBackend::connect(ZkConfig {
            hosts: zk.connect_string(),
            ..ZkConfig::default()
        })
        .await
        .unwrap();
        engines.push(Engine::new(backend, EngineConfig::default()));
    }
    engines[0]
        .rotate_to_layout("hammer", "v1", "v2", Some(KindLayout::ReadWrite), PATIENCE, &|_| {})
        .await
        .unwrap();
    let key = LockKey::new("hammer", "h-1").unwrap();
    let path = engines[0].backend().lock_path(&key).await.unwrap();
    let mut peer = start_peer(zk.connect_string(), path).await;
    peer.send(&format!("hammer {PEER_ROUNDS} 2 7")).await;
    let mut tasks = Vec::new();
    for n in 0..4u64 {
        let engine = engines[usize::try_from(n).unwrap() % 2].clone();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let (session, _lost) = engine.open_session(format!("hammer-{n}"));
            let mut holds = Vec::new();
            // A small deterministic mix of reads and writes per session.
            let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ n;
            for _ in 0..ROUNDS {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let write = state.is_multiple_of(2);
                let opts = AcquireOptions {
                    mode: if write { LockMode::Exclusive } else { LockMode::Shared },
                    ..AcquireOptions::wait(PATIENCE)
                };
                let granted = session
                    .acquire(&key, opts)
                    .await
                    .unwrap()
                    .expect("granted within the wait");
                let from = wall_ns();
                tokio::time::sleep(Duration::from_millis(2)).await;
                let to = wall_ns();
                assert!(session.release(&key).await.unwrap());
                holds.push((
                    Hold {
                        write,
                        from,
                        to,
                        who: "clastor",
                    },
                    granted.token,
                ));
            }
            holds
        }));
    }
    let mut holds = Vec::new();
    let mut clastor = Vec::new();
    for t in tasks {
        for (hold, token) in t.await.unwrap() {
            holds.push(hold);
            clastor.push((hold, token));
        }
    }
    let mut peer_holds = 0;
    loop {
        let line = peer.line().await;
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["DONE"] => break,
            ["HOLD", mode, from, to] => {
                peer_holds += 1;
                holds.push(Hold {
                    write: *mode == "W",
                    from: from.parse().unwrap(),
                    to: to.parse().unwrap(),
                    who: peer_name,
                });
            }
            _ => panic!("{peer_name}: {line}"),
        }
    }
    assert_eq!(peer_holds, PEER_ROUNDS);
    assert_eq!(clastor.len(), 4 * ROUNDS);
    let writes = holds.iter().filter(|h| h.write).count();
    assert!(
        writes > 0 && writes < holds.len(),
        "a mix of reads and writes: {writes} of {}",
        holds.len()
    );
    // The foreign client and Clastor hammered at the same time, or the
    // check above proves nothing across implementations.
    let span = |who: &str| {
        let mine = holds.iter().filter(|h| h.who == who);
        let from = mine.clone().map(|h| h.from).min().unwrap();
        let to = mine.map(|h| h.to).max().unwrap();
        (from, to)
    };
    let (peer_from, peer_to) = span(peer_name);
    let (ours_from, ours_to) = span("clastor");
    assert!(
        peer_from < ours_to && ours_from < peer_to,
        "{peer_name} held from {peer_from} to {peer_to}, Clastor from {ours_from} to {ours_to}: no contention"
    );
    assert_no_rw_overlap(&mut holds);
    // Fencing: a Clastor writer's token exceeds every Clastor token granted
    // before its hold began.
    clastor.sort_by_key(|(h, _)| h.from);
    for (i, (h, token)) in clastor.iter().enumerate() {
        if h.write {
            let before = clastor[..i]
                .iter()
                .filter(|(e, _)| e.to <= h.from)
                .map(|(_, t)| *t)
                .max();
            assert!(
                before.is_none_or(|b| b < *token),
                "writer token {token} after {before:?}"
            );
        }
    }
    peer.quit().await;
    for e in engines {
        e.shutdown().await;
    }
    drop(zk);
}
