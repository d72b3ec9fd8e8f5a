//! Views of hot lock directories: what a session knows of a directory's
//! children without listing it, kept by a persistent recursive watch
//! (ZooKeeper ≥ 3.6 `addWatch`) on that same session.
//!
//! **Why a view is as good as a listing.** ZooKeeper delivers one session's
//! watch events and replies in the order of the changes they report: the
//! event for every change committed before our `create` reaches us before
//! the create's reply. `zookeeper_client` hands an event to the watcher's
//! channel before it completes the next reply (both on its one I/O loop), so
//! once the reply is in, draining the channel without waiting yields every
//! earlier event. A view therefore says, at the create's reply, exactly what
//! a listing pipelined behind the create would have said: whether our node is
//! first.
//!
//! **Establishing one** (the "cold" round): `addWatch` is sent ahead of the
//! create and a listing on the same session. The listing is the base; every
//! event from the watch is then applied on top in order, including those
//! that arrived before the listing's reply (changes the listing already
//! shows). That is exact whatever the names: a child with no event since the
//! watch was added is as the listing shows it, and one with events ends as
//! its last event says.
//!
//! **When a view cannot be trusted** it is dropped and the next acquire
//! lists again: on any session event (a disconnection can lose persistent
//! watch events, ZOOKEEPER-4698), on eviction (each session keeps at most
//! `capacity` views, least recently used first; and one unused for the
//! idle time with no holder watching through it, on the session's probe
//! tick), and while a rotation's census watches lock directories on the
//! session ([`Views::suspend`]):
//! ZooKeeper 3.8 keeps one watch mode per path and session (ZOOKEEPER-4466),
//! so a one-shot child watch set on a directory *before* a recursive watch
//! there would stop firing. The rule that makes this safe: on a session, a
//! recursive watch is only ever added to a lock directory while no one-shot
//! child watch of ours may be pending there. The acquire path counts its
//! pending child watches per directory ([`ChildWatch`], released once the
//! watch has fired — seen by the task awaiting it, or known from the
//! holder's confirmed delete of its node, which fires it — or its removal
//! has been sent, which goes ahead of any later request of the session) and
//! makes no view where one is; the census
//! suspends views first. (The other order — recursive first, then a one-shot
//! child watch — leaves both working, but then removing the view would need
//! a removal mode ZooKeeper 3.8 lacks, so an acquire sets no child watch
//! beside a view either.)
//!
//! ZooKeeper 3.8 delivers a child's creation and deletion to a recursive
//! watch only through its data-watch table, so an `exists`/`getData` watch
//! on a lock *directory* (or a data-watch removal there) on a session with a
//! view would silence the view without any session event. Nothing sets one
//! (waiters and holders watch their nodes, `D/x`, never `D`); keep it so.
//! One harmless leftover is known: a census that starts while a view is
//! being established may leave that recursive watch on the server until the
//! session ends (its events then only cost the client a removal request).
//!
//! Holders use the view too: [`DirView::subscribe`] resolves when the view
//! sees the holder's node deleted, or when the view is dropped (then the
//! holder watches its node itself, see `nodes::watch_own`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use hashlink::LruCache;
use tokio::time::Instant;
use tracing::debug;
use zookeeper_client::{PersistentWatcher, WatchedEvent};

use super::watches::OwnWatch;

mod dir;

pub(super) use self::dir::DirView;

/// Default number of lock directories each session keeps a view of.
pub(super) const DEFAULT_WATCHED_DIRS: usize = 1024;

/// Default time an unused view is kept.
pub(super) const DEFAULT_VIEW_IDLE: Duration = Duration::from_secs(60);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here leaves the data consistent (inserts,
    // removes, a flag), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One session's views, least recently used first.
#[derive(Debug)]
pub(super) struct Views {
    capacity: usize,
    /// Unused this long, a view is dropped ([`Views::expire_idle`]); zero: never.
    idle: Duration,
    state: Mutex<ViewsState>,
}

#[derive(Debug)]
struct ViewsState {
    views: LruCache<String, Slot>,
    /// Directory prefixes a census is watching: no view is made under them.
    suspended: Vec<String>,
    /// One-shot child watches an acquire may have pending, by directory: no
    /// view is made where one is (see the module docs).
    child_watches: HashMap<String, usize>,
}

#[derive(Debug)]
enum Slot {
    /// An `addWatch` is on its way; the view is not usable yet.
    Establishing(u64),
    /// Usable; `used` is when an acquire last planned with it.
    Ready { view: Arc<DirView>, used: Instant },
}

/// What an acquire does about a lock directory's children.
pub(super) enum Plan<W> {
    /// The session has a view: send the create alone.
    Warm(Arc<DirView>),
    /// An `addWatch` was sent (its reply is the future): send the create and
    /// a listing after it, then [`Views::complete`].
    Establish(Ticket, W),
    /// List after the create; with a one-shot child watch (the holder's
    /// first watch on its node) when the guard is given — it must then live
    /// until that watch has fired or been dropped.
    List { watch: Option<ChildWatch> },
}

/// The right to complete the view being established for one directory;
/// dropped unused, it calls the establishment off.
#[derive(Debug)]
pub(super) struct Ticket {
    views: Arc<Views>,
    dir: String,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = lock(&self.views.state);
        if matches!(state.views.get(&self.dir), Some(Slot::Establishing(id)) if *id == self.id) {
            state.views.remove(&self.dir);
        }
    }
}

impl Views {
    /// Views of at most `capacity` directories (0: none), each dropped once
    /// unused for `idle` (zero: never).
    pub(super) fn new(capacity: usize, idle: Duration) -> Views {
        Views {
            capacity,
            idle,
            state: Mutex::new(ViewsState {
                views: LruCache::new_unbounded(),
                suspended: Vec::new(),
                child_watches: HashMap::new(),
            }),
        }
    }

    /// How an acquire in `dir` goes. A view is established (by calling
    /// `add_watch`, which must send the `addWatch` as it is called, under
    /// this session's lock so a census cannot slip in between) only for a
    /// directory acquired before (`hot`) and not under a census.
    pub(super) fn plan<W>(self: &Arc<Self>, dir: &str, hot: bool, add_watch: impl FnOnce() -> W) -> Plan<W> {
        if self.capacity == 0 {
            return Plan::List {
                watch: Some(ChildWatch(None)),
            };
        }
        let mut state = lock(&self.state);
        match state.views.get_mut(dir) {
            Some(Slot::Ready { view, used }) if view.is_valid() => {
                *used = Instant::now();
                return Plan::Warm(Arc::clone(view));
            }
            // No one-shot child watch beside a recursive one: removing the
            // view would then need a removal mode ZooKeeper 3.8 lacks.
            Some(Slot::Establishing(_)) => return Plan::List { watch: None },
            Some(Slot::Ready { .. }) | None => {}
        }
        let pending_child_watch = state.child_watches.get(dir).is_some_and(|n| *n > 0);
        if !hot || pending_child_watch || state.suspended.iter().any(|p| under(dir, p)) {
            state.views.remove(dir);
            *state.child_watches.entry(dir.to_owned()).or_insert(0) += 1;
            return Plan::List {
                watch: Some(ChildWatch(Some(Arc::new(Counted {
                    views: Arc::clone(self),
                    dir: dir.to_owned(),
                    ended: AtomicBool::new(false),
                })))),
            };
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let watch = add_watch();
        state.views.insert(dir.to_owned(), Slot::Establishing(id));
        let evicted = evict(&mut state.views, self.capacity);
        drop(state);
        evicted.into_iter().for_each(|v| v.invalidate("evicted"));
        Plan::Establish(
            Ticket {
                views: Arc::clone(self),
                dir: dir.to_owned(),
                id,
            },
            watch,
        )
    }

    /// Finishes an establishment: the view is `children` (listed after the
    /// watch was added) with every event of `watcher` applied. `None` if the
    /// establishment was called off meanwhile (a census, or eviction).
    pub(super) fn complete(ticket: Ticket, watcher: PersistentWatcher, children: &[String]) -> Option<Arc<DirView>> {
        let view = Arc::new(DirView::new(ticket.dir.clone(), watcher, children));
        // (The guard goes before `ticket`, whose drop takes the same lock.)
        let mut state = lock(&ticket.views.state);
        let ours = matches!(state.views.get(&ticket.dir), Some(Slot::Establishing(id)) if *id == ticket.id);
        if !ours || !view.sync() {
            return None;
        }
        let slot = Slot::Ready {
            view: Arc::clone(&view),
            used: Instant::now(),
        };
        state.views.insert(ticket.dir.clone(), slot);
        drop(state);
        dir::start_pump(&view);
        debug!(dir = %ticket.dir, "directory view established");
        Some(view)
    }

    /// Drops every view under `prefix` and makes none there until the guard
    /// goes: for a census that sets one-shot child watches on those
    /// directories (see the module docs).
    pub(super) fn suspend(self: &Arc<Self>, prefix: &str) -> Suspended {
        let prefix = format!("{}/", prefix.trim_end_matches('/'));
        let mut state = lock(&self.state);
        state.suspended.push(prefix.clone());
        let dirs: Vec<String> = state
            .views
            .iter()
            .filter(|(dir, _)| under(dir, &prefix))
            .map(|(dir, _)| dir.clone())
            .collect();
        let dropped = take(&mut state.views, &dirs);
        drop(state);
        close(dropped, "a census watches its directory");
        Suspended {
            views: Arc::clone(self),
            prefix,
        }
    }

    /// Drops every view (the session is retired).
    pub(super) fn clear(&self) {
        let mut state = lock(&self.state);
        let dropped: Vec<Slot> = state.views.drain().map(|(_, slot)| slot).collect();
        drop(state);
        close(dropped, "session retired");
    }

    /// Drops the views no acquire has used for the idle time and no holder
    /// watches through: a directory used a few times and abandoned stops
    /// costing a watch on the server and its events here. Called on the
    /// session's probe tick. It stops at the first recently used view, the
    /// cache being in order of use; old views kept for their holders are
    /// looked at again on each tick (one lock each, at most `capacity`).
    pub(super) fn expire_idle(&self) {
        if self.idle.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut state = lock(&self.state);
        let mut due = Vec::new();
        for (dir, slot) in state.views.iter() {
            if let Slot::Ready { view, used } = slot {
                if now.saturating_duration_since(*used) < self.idle {
                    break;
                }
                if !view.has_subscribers() {
                    due.push(dir.clone());
                }
            }
        }
        let dropped = take(&mut state.views, &due);
        drop(state);
        close(dropped, "idle");
    }

    /// Number of directories with a usable view.
    pub(super) fn len(&self) -> usize {
        lock(&self.state)
            .views
            .iter()
            .filter(|(_, slot)| matches!(slot, Slot::Ready { view, .. } if view.is_valid()))
            .count()
    }
}

/// Counts a one-shot child watch of an acquire on a directory, until it has
/// fired or been dropped (which sends its removal ahead of any later
/// request of the session). Keep it beside the watch, dropped after it.
///
/// Clones share one count, which ends at the first [`ChildWatch::fired`] or
/// when the last clone goes: the task awaiting the watch holds one, and the
/// holder's guard another, so the count ends as soon as the release's delete
/// is confirmed (that delete fired the watch), not when the awaiting task
/// next runs. Otherwise an acquire right after the release could find the
/// watch still counted and list (and watch) again instead of making a view.
#[derive(Debug, Clone)]
pub(super) struct ChildWatch(
    /// `None` where views are off: nothing to count.
    Option<Arc<Counted>>,
);

#[derive(Debug)]
struct Counted {
    views: Arc<Views>,
    dir: String,
    ended: AtomicBool,
}

impl ChildWatch {
    /// The watch has fired on the server (its node's deletion is confirmed):
    /// it no longer stands in the way of a view.
    pub(super) fn fired(&self) {
        if let Some(counted) = &self.0 {
            counted.end();
        }
    }
}

impl Counted {
    fn end(&self) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut state = lock(&self.views.state);
        if let Some(n) = state.child_watches.get_mut(&self.dir) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.child_watches.remove(&self.dir);
            }
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.end();
    }
}

/// A one-shot child watch being awaited, with its [`ChildWatch`] guard:
/// dropped after the watch, whether it fired or not.
pub(super) struct GuardedWatch {
    watch: OwnWatch,
    guard: Option<ChildWatch>,
}

impl GuardedWatch {
    pub(super) fn new(watch: OwnWatch, guard: ChildWatch) -> GuardedWatch {
        GuardedWatch {
            watch,
            guard: Some(guard),
        }
    }
}

impl Future for GuardedWatch {
    type Output = WatchedEvent;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<WatchedEvent> {
        let event = std::task::ready!(self.watch.as_mut().poll(cx));
        // Fired: ZooKeeper has removed the watch.
        if let Some(guard) = self.guard.take() {
            guard.fired();
        }
        Poll::Ready(event)
    }
}

impl Drop for GuardedWatch {
    fn drop(&mut self) {
        // The watch goes first (its removal is sent), then the guard.
        self.watch = Box::pin(std::future::pending());
        self.guard = None;
    }
}

/// Views stay off under a prefix while this lives.
#[derive(Debug)]
pub(super) struct Suspended {
    views: Arc<Views>,
    prefix: String,
}

impl Drop for Suspended {
    fn drop(&mut self) {
        let mut state = lock(&self.views.state);
        if let Some(i) = state.suspended.iter().position(|p| *p == self.prefix) {
            state.suspended.swap_remove(i);
        }
    }
}

fn under(dir: &str, prefix_with_slash: &str) -> bool {
    dir.starts_with(prefix_with_slash)
}

/// Takes the slots of `dirs` out of the cache.
fn take(views: &mut LruCache<String, Slot>, dirs: &[String]) -> Vec<Slot> {
    dirs.iter().filter_map(|d| views.remove(d)).collect()
}

/// Drops the views among slots taken out of the cache (with the cache's
/// lock released: dropping a view takes its own).
fn close(slots: Vec<Slot>, why: &str) {
    for slot in slots {
        if let Slot::Ready { view, .. } = slot {
            view.invalidate(why);
        }
    }
}

/// Removes least recently used views beyond `capacity`.
fn evict(views: &mut LruCache<String, Slot>, capacity: usize) -> Vec<Arc<DirView>> {
    let mut evicted = Vec::new();
    while views.len() > capacity {
        match views.remove_lru() {
            Some((_, Slot::Ready { view, .. })) => evicted.push(view),
            Some((_, Slot::Establishing(_))) => {}
            None => break,
        }
    }
    evicted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(views: &Arc<Views>, hot: bool) -> Plan<()> {
        views.plan("/locks/tx/v1/a", hot, || ())
    }

    fn counted_watch(plan: Plan<()>) -> ChildWatch {
        match plan {
            Plan::List { watch: Some(watch) } => watch,
            _ => panic!("expected a listing with a counted child watch"),
        }
    }

    #[test]
    fn a_fired_child_watch_stops_counting_while_its_awaiting_task_still_holds_it() {
        let views = Arc::new(Views::new(8, Duration::ZERO));
        let first = counted_watch(plan(&views, false));
        let awaiting = first.clone();
        // Pending: a hot directory is listed (and watched) again, not viewed.
        let second = counted_watch(plan(&views, true));
        drop(second);
        assert!(matches!(plan(&views, true), Plan::List { watch: Some(_) }));
        // The holder's guard saw its delete confirmed; the task that awaits
        // the watch has not run yet.
        first.fired();
        assert!(matches!(plan(&views, true), Plan::Establish(..)));
        // The count ended once: the last clone's drop takes nothing more.
        let other = counted_watch(plan(&views, false));
        drop((first, awaiting));
        assert!(matches!(plan(&views, true), Plan::List { watch: Some(_) }));
        drop(other);
        assert!(matches!(plan(&views, true), Plan::Establish(..)));
    }

    #[test]
    fn without_views_nothing_is_counted() {
        let views = Arc::new(Views::new(0, Duration::ZERO));
        let watch = counted_watch(plan(&views, true));
        watch.fired();
        assert!(lock(&views.state).child_watches.is_empty());
    }
}
