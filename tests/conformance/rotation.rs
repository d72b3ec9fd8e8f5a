//! Version rotation, stated once for every backend (PROTOCOL.md, "Version
//! rotation"): a kind drains before it switches, holders are never revoked,
//! waiters queued under the old version keep their place, new acquires wait
//! and then proceed under the new version, tokens keep increasing, and a
//! rotation that cannot finish ends back where it started with nothing lost.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clastor::backend::Backend;
use clastor::{AcquireOptions, Engine, LockError, LockKey};
use clastor_protocol::{KindMode, RotationPhase, RotationProgress};

use super::{Env, LONG, PATIENCE, POLL, fresh_key, must_acquire, wait};

/// Progress reports a rotation made, for the case to inspect.
type Seen = Arc<Mutex<Vec<RotationProgress>>>;

/// A rotation running in the background: drain time and leftover, or why not.
type Running = tokio::task::JoinHandle<Result<(Duration, u32), LockError>>;

/// Starts a rotation in the background on `engine`.
fn spawn_rotation<B: Backend>(
    engine: &Engine<B>,
    kind: &str,
    from: &str,
    to: &str,
    drain: Duration,
) -> (Running, Seen) {
    let seen: Seen = Arc::default();
    let (engine, kind, from, to, sink) = (
        engine.clone(),
        kind.to_owned(),
        from.to_owned(),
        to.to_owned(),
        seen.clone(),
    );
    let task = tokio::spawn(async move {
        let progress = move |p| sink.lock().unwrap().push(p);
        engine.rotate(&kind, &from, &to, drain, &progress).await
    });
    (task, seen)
}

/// Waits until `kind` is at `version` in `mode`, as `engine` reads it.
async fn await_mode<B: Backend>(engine: &Engine<B>, kind: &str, version: &str, mode: KindMode) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let v = engine.version(kind).await.unwrap();
        if &*v.version == version && v.mode == mode {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{kind}: expected {version} {}, still {} {} after {PATIENCE:?}",
            mode.name(),
            v.version,
            v.mode.name()
        );
        tokio::time::sleep(POLL).await;
    }
}

pub(super) async fn rotating_an_idle_kind_switches_it_and_tokens_keep_increasing<B: Backend>(env: Env<B>) {
    let key = fresh_key("tx-1");
    let kind = key.kind().to_owned();
    let (a, _) = env.session(0);
    let before = must_acquire(&a, &key).await;
    assert!(a.release(&key).await.unwrap());
    let (drained, leftover) = env.engines[0]
        .rotate(&kind, "v1", "v2", Duration::from_secs(10), &|_| {})
        .await
        .unwrap();
    assert!(drained < Duration::from_secs(10));
    assert_eq!(leftover, 0);
    for engine in &env.engines {
        await_mode(engine, &kind, "v2", KindMode::Normal).await;
    }
    // Sent again, it finds its own switch done: completed, nothing to do.
    // With another `from`, it is refused.
    env.engines[1]
        .rotate(&kind, "v1", "v2", Duration::from_secs(10), &|_| {})
        .await
        .expect("the same rotation again is a completed one");
    assert!(matches!(
        env.engines[1]
            .rotate(&kind, "v7", "v2", Duration::from_secs(10), &|_| {})
            .await,
        Err(LockError::RotationRefused(_))
    ));
    // Through the other engine ("server") too, which cached v1.
    let (b, _) = env.session(1);
    let g = b.acquire(&key, wait(LONG)).await.unwrap().unwrap();
    assert_eq!(&*g.version, "v2");
    assert!(g.token > before, "token {} under v2 after {before} under v1", g.token);
    assert!(b.release(&key).await.unwrap());
    // And again, back to a name used before.
    env.engines[1]
        .rotate(&kind, "v2", "v3", Duration::from_secs(10), &|_| {})
        .await
        .unwrap();
    let (c, _) = env.session(0);
    let g3 = c.acquire(&key, wait(LONG)).await.unwrap().unwrap();
    assert_eq!(&*g3.version, "v3");
    assert!(g3.token > g.token);
}

pub(super) async fn a_rotation_drains_holders_and_queued_waiters_then_new_acquires_proceed_under_the_new_version<
    B: Backend,
>(
    env: Env<B>,
) {
    let key = fresh_key("tx-1");
    let kind = key.kind().to_owned();
    let other = LockKey::new(&kind, "tx-2").unwrap();
    let (a, mut a_lost) = env.session(0);
    let (b, mut b_lost) = env.session(1);
    let ta = must_acquire(&a, &key).await;
    let queued = {
        let (b, key) = (b.clone(), key.clone());
        tokio::spawn(async move { b.acquire(&key, wait(LONG)).await })
    };
    env.await_contenders(&key, 2).await;
    let (rotation, seen) = spawn_rotation(&env.engines[1], &kind, "v1", "v2", Duration::from_secs(20));
    for engine in &env.engines {
        await_mode(engine, &kind, "v1", KindMode::Draining).await;
    }
    // A new acquire of the kind waits, on either engine, even for a free id.
    let (c, _) = env.session(2);
    let newcomer = {
        let (c, other) = (c.clone(), other.clone());
        tokio::spawn(async move { c.acquire(&other, wait(LONG)).await })
    };
    let (d, _) = env.session(3);
    assert_eq!(
        d.acquire(&other, AcquireOptions::try_once()).await.unwrap(),
        None,
        "a try-once while draining is not granted"
    );
    // The queued waiter keeps its place and is granted under v1.
    assert!(a.release(&key).await.unwrap());
    let gb = queued.await.unwrap().unwrap().expect("queued waiter granted");
    assert_eq!(&*gb.version, "v1");
    assert!(gb.token > ta);
    assert!(!rotation.is_finished(), "switched while a lock was held under v1");
    assert!(!newcomer.is_finished(), "granted while the kind drains");
    assert_eq!(env.engines[0].version(&kind).await.unwrap().mode, KindMode::Draining);
    // The last holder goes: the switch, then the newcomer under v2.
    assert!(b.release(&key).await.unwrap());
    rotation.await.unwrap().expect("rotation completed");
    let gc = newcomer
        .await
        .unwrap()
        .unwrap()
        .expect("newcomer granted after the switch");
    assert_eq!(&*gc.version, "v2");
    let gd = d.acquire(&key, wait(LONG)).await.unwrap().unwrap();
    assert_eq!(&*gd.version, "v2");
    assert!(
        gd.token > gb.token,
        "token {} under v2 after {} under v1",
        gd.token,
        gb.token
    );
    // Nobody was told their lock was lost because of the rotation.
    assert!(a_lost.try_recv().is_none() && b_lost.try_recv().is_none());
    let seen = seen.lock().unwrap();
    assert!(
        seen.first()
            .is_some_and(|p| p.phase == RotationPhase::Draining && p.remaining >= 1),
        "first progress says what remains: {seen:?}"
    );
    assert!(
        seen.last().is_some_and(|p| p.phase == RotationPhase::Switched),
        "last progress is the switch: {seen:?}"
    );
}

pub(super) async fn a_drain_that_times_out_aborts_back_to_normal_with_nothing_lost<B: Backend>(env: Env<B>) {
    let key = fresh_key("tx-1");
    let kind = key.kind().to_owned();
    let (a, mut a_lost) = env.session(0);
    let token = must_acquire(&a, &key).await;
    let started = Instant::now();
    let err = env.engines[1]
        .rotate(&kind, "v1", "v2", Duration::from_millis(300), &|_| {})
        .await
        .unwrap_err();
    assert!(matches!(err, LockError::RotationAborted(_)), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    for engine in &env.engines {
        await_mode(engine, &kind, "v1", KindMode::Normal).await;
    }
    // The holder still holds, and was not told otherwise.
    assert_eq!(a.held().first().map(|h| h.token), Some(token));
    assert!(a_lost.try_recv().is_none());
    let (b, _) = env.session(1);
    assert_eq!(b.acquire(&key, AcquireOptions::try_once()).await.unwrap(), None);
    // Others proceed at once under v1.
    let other = LockKey::new(&kind, "tx-2").unwrap();
    let g = b.acquire(&other, AcquireOptions::try_once()).await.unwrap().unwrap();
    assert_eq!(&*g.version, "v1");
}

pub(super) async fn rotations_are_refused_unless_from_is_current_and_one_at_a_time<B: Backend>(env: Env<B>) {
    let key = fresh_key("tx-1");
    let kind = key.kind().to_owned();
    let refused = |r: Result<(Duration, u32), LockError>| matches!(r, Err(LockError::RotationRefused(_)));
    let e0 = &env.engines[0];
    let e1 = &env.engines[1];
    assert!(refused(
        e0.rotate(&kind, "v2", "v3", Duration::from_secs(1), &|_| {}).await
    ));
    let (a, _) = env.session(0);
    must_acquire(&a, &key).await;
    let (first, _) = spawn_rotation(e0, &kind, "v1", "v2", Duration::from_secs(20));
    await_mode(e1, &kind, "v1", KindMode::Draining).await;
    // The same rotation, or another, while the first runs: refused.
    let second = e1.rotate(&kind, "v1", "v2", Duration::from_secs(1), &|_| {}).await;
    assert!(refused(second), "a second rotation was not refused");
    assert!(refused(
        e1.rotate(&kind, "v1", "v3", Duration::from_secs(1), &|_| {}).await
    ));
    // Bad arguments.
    assert!(matches!(
        e1.rotate(&kind, "v1", "v1", Duration::from_secs(1), &|_| {}).await,
        Err(LockError::InvalidArgument(_))
    ));
    // Version names a backend cannot store in a path (ZooKeeper refuses
    // them) are refused on every backend, so a kind can never be bricked.
    for bad in ["..", "a/b", "version", "rotation", "", "v🙂", "v\u{E000}", "v\u{FFFD}"] {
        assert!(
            matches!(
                e1.rotate(&kind, "v1", bad, Duration::from_secs(1), &|_| {}).await,
                Err(LockError::InvalidName(_))
            ),
            "version name {bad:?} accepted"
        );
    }
    // An abort ends the first one; the holder still holds.
    let (v, aborted) = e1.rotate_abort(&kind).await.unwrap();
    assert!(aborted);
    assert_eq!((&*v.version, v.mode), ("v1", KindMode::Normal));
    let r = first.await.unwrap();
    assert!(matches!(r, Err(LockError::RotationAborted(_))), "{r:?}");
    assert_eq!(a.held().len(), 1);
    // Aborting a normal kind does nothing.
    assert!(!e0.rotate_abort(&kind).await.unwrap().1);
}

pub(super) async fn a_rotation_left_draining_resumes_or_is_aborted_by_a_waiting_acquire<B: Backend>(env: Env<B>) {
    let key = fresh_key("tx-1");
    let kind = key.kind().to_owned();
    let (a, _) = env.session(0);
    must_acquire(&a, &key).await;
    // The driver goes away mid-drain (its connection closed).
    let (driver, _) = spawn_rotation(&env.engines[0], &kind, "v1", "v2", Duration::from_secs(20));
    await_mode(&env.engines[1], &kind, "v1", KindMode::Draining).await;
    driver.abort();
    let _ = driver.await;
    // Still draining: resumable.
    assert_eq!(env.engines[1].version(&kind).await.unwrap().mode, KindMode::Draining);
    // Resume on the other engine, and let the holder go: it completes.
    let resumed = resume(&env.engines[1], &kind, "v1", "v2").await;
    assert!(a.release(&key).await.unwrap());
    resumed.await.unwrap().expect("resumed rotation completed");
    await_mode(&env.engines[0], &kind, "v2", KindMode::Normal).await;

    // Abandoned again, this time with a short drain timeout: the first
    // acquire that waits past it aborts the drain and is granted under v2.
    must_acquire(&a, &key).await;
    let (driver, _) = spawn_rotation(&env.engines[0], &kind, "v2", "v3", Duration::from_millis(500));
    await_mode(&env.engines[1], &kind, "v2", KindMode::Draining).await;
    driver.abort();
    let _ = driver.await;
    let (b, _) = env.session(1);
    let other = LockKey::new(&kind, "tx-2").unwrap();
    // Past the drain timeout, a try-once of a free id is not granted and
    // aborts nothing, however often it comes: only an acquire that waits
    // aborts an abandoned drain (a try-once granted here would be granted
    // under the version being drained).
    let deadline = Instant::now() + PATIENCE;
    while env.engines[1]
        .version_detail(&kind)
        .await
        .unwrap()
        .1
        .is_none_or(|d| d.left_ms > 0)
    {
        assert!(Instant::now() < deadline, "the drain timeout never passed");
        tokio::time::sleep(POLL).await;
    }
    for engine in 0..2 {
        let (s, _) = env.session(engine);
        for _ in 0..10 {
            assert!(s.acquire(&other, AcquireOptions::try_once()).await.unwrap().is_none());
        }
        assert_eq!(
            env.engines[engine % env.engines.len()]
                .version(&kind)
                .await
                .unwrap()
                .mode,
            KindMode::Draining
        );
    }
    let g = b
        .acquire(&other, wait(LONG))
        .await
        .unwrap()
        .expect("granted once the abandoned drain is aborted");
    assert_eq!(&*g.version, "v2");
    await_mode(&env.engines[0], &kind, "v2", KindMode::Normal).await;
    assert_eq!(a.held().len(), 1, "the holder kept its lock throughout");
}

/// Resumes a rotation left draining (with a 30 s drain timeout, where the
/// abandoned one had 20 s): sends it until it is not refused because the
/// old driver's claim is still going, and returns once the new deadline shows.
async fn resume<B: Backend>(engine: &Engine<B>, kind: &str, from: &str, to: &str) -> Running {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (task, _) = spawn_rotation(engine, kind, from, to, Duration::from_secs(30));
        loop {
            assert!(Instant::now() < deadline, "the rotation was not resumed");
            if task.is_finished() {
                let r = task.await.unwrap();
                assert!(matches!(r, Err(LockError::RotationRefused(_))), "resume failed: {r:?}");
                break;
            }
            let (_, drain) = engine.version_detail(kind).await.unwrap();
            if drain.is_some_and(|d| d.left_ms > 21_000) {
                return task;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

pub(super) async fn an_acquire_with_a_stale_view_during_the_drain_waits_and_lands_on_the_new_version<B: Backend>(
    env: Env<B>,
) {
    let key = fresh_key("held");
    let kind = key.kind().to_owned();
    let stale_key = LockKey::new(&kind, "stale").unwrap();
    // Engine 1 sees the kind at v1, normal, and keeps it cached.
    let (s1, _) = env.session(1);
    must_acquire(&s1, &stale_key).await;
    assert!(s1.release(&stale_key).await.unwrap());
    // Engine 0 holds a lock and rotates; only engine 0 is asked about the mode.
    let (a, _) = env.session(0);
    must_acquire(&a, &key).await;
    let (rotation, _) = spawn_rotation(&env.engines[0], &kind, "v1", "v2", Duration::from_secs(20));
    await_mode(&env.engines[0], &kind, "v1", KindMode::Draining).await;
    // Engine 1's next acquire starts from its stale view: it must not be
    // granted under v1 while the kind drains.
    let fresh = LockKey::new(&kind, "fresh").unwrap();
    let late = {
        let (s1, fresh) = (s1.clone(), fresh.clone());
        tokio::spawn(async move { s1.acquire(&fresh, wait(LONG)).await })
    };
    // Give it every chance to be (wrongly) granted: until it has at least
    // tried under v1 and backed out, or queued nothing at all.
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        assert!(!late.is_finished(), "granted while the kind drains: {:?}", late.await);
        tokio::time::sleep(POLL).await;
    }
    assert!(a.release(&key).await.unwrap());
    rotation.await.unwrap().expect("rotation completed");
    let g = late.await.unwrap().unwrap().expect("granted after the switch");
    assert_eq!(&*g.version, "v2");
}

/// `ROTATE`'s checks come in the order PROTOCOL.md lists ("Version
/// rotation", checks in order), shown where two of them conflict: names
/// (kind, from, to) before `from` = `to`, that before the drain timeout,
/// those before the claim (one rotation per kind), the claim before the
/// kind's state (a half-done rotation to another target, then `from`).
pub(super) async fn rotate_checks_come_in_the_documented_order<B: Backend>(env: Env<B>) {
    let key = fresh_key("tx-1");
    let kind = key.kind().to_owned();
    let e0 = &env.engines[0];
    let e1 = &env.engines[1];
    let too_long = Duration::from_secs(25 * 3600);
    let second = Duration::from_secs(1);
    let err = |r: Result<(Duration, u32), LockError>| r.expect_err("refused");
    // 1. kind, then from, then to: INVALID_NAME, whatever else is wrong.
    let e = err(e0.rotate("a/b", "..", "..", too_long, &|_| {}).await);
    assert!(
        matches!(&e, LockError::InvalidName(m) if m.to_string().contains("kind")),
        "{e:?}"
    );
    let e = err(e0.rotate(&kind, "..", "version", too_long, &|_| {}).await);
    assert!(
        matches!(&e, LockError::InvalidName(m) if m.to_string().contains("from")),
        "{e:?}"
    );
    let e = err(e0.rotate(&kind, "v1", "version", too_long, &|_| {}).await);
    assert!(
        matches!(&e, LockError::InvalidName(m) if m.to_string().contains("to")),
        "{e:?}"
    );
    // 2. from = to before 3. the drain timeout over the longest wait.
    let e = err(e0.rotate(&kind, "v1", "v1", too_long, &|_| {}).await);
    assert!(
        matches!(&e, LockError::InvalidArgument(m) if m.contains("both")),
        "{e:?}"
    );
    let e = err(e0.rotate(&kind, "v1", "v2", too_long, &|_| {}).await);
    assert!(
        matches!(&e, LockError::InvalidArgument(m) if m.contains("drain timeout")),
        "{e:?}"
    );

    let (a, _) = env.session(0);
    must_acquire(&a, &key).await;
    let (first, _) = spawn_rotation(e0, &kind, "v1", "v2", Duration::from_secs(20));
    await_mode(e1, &kind, "v1", KindMode::Draining).await;
    // The argument checks come before the claim: BAD_REQUEST, not refused.
    let e = err(e1.rotate(&kind, "v1", "v1", second, &|_| {}).await);
    assert!(matches!(e, LockError::InvalidArgument(_)), "{e:?}");
    let e = err(e1.rotate(&kind, "v1", "v3", too_long, &|_| {}).await);
    assert!(matches!(e, LockError::InvalidArgument(_)), "{e:?}");
    // 4. The claim before the kind's state: a wrong `from` while a rotation
    // runs is refused for the running rotation.
    let e = err(e1.rotate(&kind, "v7", "v8", second, &|_| {}).await);
    assert!(
        matches!(&e, LockError::RotationRefused(m) if m.contains("in progress")),
        "{e:?}"
    );
    // Its driver goes away; the kind stays draining towards v2.
    first.abort();
    let _ = first.await;
    // 5. Draining towards another target: refused (abort it first), ...
    let deadline = Instant::now() + PATIENCE;
    loop {
        let e = err(e1.rotate(&kind, "v1", "v3", second, &|_| {}).await);
        match &e {
            // The old driver's claim may take a moment to go (ZooKeeper).
            LockError::RotationRefused(m) if m.contains("in progress") && Instant::now() < deadline => {
                tokio::time::sleep(POLL).await;
            }
            LockError::RotationRefused(m) => {
                assert!(m.contains("abort it first"), "{e:?}");
                break;
            }
            _ => panic!("{e:?}"),
        }
    }
    // 6. ... and a `from` that is not the current version: refused, naming it.
    let e = err(e1.rotate(&kind, "v2", "v3", second, &|_| {}).await);
    assert!(
        matches!(&e, LockError::RotationRefused(m) if m.contains("at version v1")),
        "{e:?}"
    );
    assert!(e1.rotate_abort(&kind).await.unwrap().1);
    assert_eq!(a.held().len(), 1);
}
