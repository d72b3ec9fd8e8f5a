//! One lock directory as one session sees it: the contender names, kept
//! by the session's persistent recursive watch (see the parent module for
//! why that is as good as a listing), the holders subscribed to their
//! nodes' deletion, and the pump task that applies events as they come.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use tokio::sync::oneshot;
use tracing::debug;
use zookeeper_client::{EventType, PersistentWatcher, WatchedEvent};

use super::super::layout::{self, Contender};
use super::super::watches::{OwnWatch, spawn_background};
use super::lock;

/// One lock directory as one session sees it.
#[derive(Debug)]
pub(in crate::backend::zookeeper) struct DirView {
    dir: String,
    valid: AtomicBool,
    state: Mutex<ViewState>,
}

struct ViewState {
    /// `None` once the view is dropped (dropping it removes the watch).
    watcher: Option<PersistentWatcher>,
    /// The contenders' node names.
    names: HashSet<String>,
    /// Holders waiting to hear that their node was deleted, by node name.
    subscribers: HashMap<String, oneshot::Sender<WatchedEvent>>,
    /// The pump task's waker: whoever drains the watcher polls with it, so
    /// the channel keeps waking the pump.
    pump: Option<Waker>,
}

impl std::fmt::Debug for ViewState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewState")
            .field("watching", &self.watcher.is_some())
            .field("names", &self.names.len())
            .field("subscribers", &self.subscribers.len())
            .finish()
    }
}

impl DirView {
    pub(in crate::backend::zookeeper) fn new(dir: String, watcher: PersistentWatcher, children: &[String]) -> DirView {
        let names = children
            .iter()
            .filter(|c| Contender::parse(c).is_some())
            .cloned()
            .collect();
        DirView {
            dir,
            valid: AtomicBool::new(true),
            state: Mutex::new(ViewState {
                watcher: Some(watcher),
                names,
                subscribers: HashMap::new(),
                pump: None,
            }),
        }
    }

    pub(in crate::backend::zookeeper) fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    /// Whether a holder watches its node through this view.
    pub(in crate::backend::zookeeper) fn has_subscribers(&self) -> bool {
        !lock(&self.state).subscribers.is_empty()
    }

    /// Applies every event delivered so far; `false` if the view is no
    /// longer to be trusted.
    pub(in crate::backend::zookeeper) fn sync(&self) -> bool {
        let mut state = lock(&self.state);
        self.drain(&mut state, None);
        state.watcher.is_some()
    }

    /// Applies every event already in the watcher's channel, marking the
    /// view invalid if one of them ended it.
    fn drain(&self, state: &mut ViewState, cx: Option<&mut Context<'_>>) {
        drain(&self.dir, state, cx);
        if state.watcher.is_none() {
            self.valid.store(false, Ordering::Release);
        }
    }

    /// Our node `name` was just created and its reply is in: the view, made
    /// current, as the names of the contenders up to and including ours (in
    /// no particular order). `None` if the view cannot be trusted (list
    /// instead).
    pub(in crate::backend::zookeeper) fn after_create(&self, name: &str) -> Option<Vec<String>> {
        let mine = Contender::parse(name)?.seq;
        let mut state = lock(&self.state);
        self.drain(&mut state, None);
        state.watcher.as_ref()?;
        // Our create's event precedes its reply: a missing name means the
        // node was deleted since (and its deletion drained). List instead.
        if !state.names.contains(name) {
            return None;
        }
        let mut upto = Vec::with_capacity(1);
        for other in &state.names {
            if other == name || Contender::parse(other).is_some_and(|c| layout::seq_before(c.seq, mine)) {
                upto.push(other.clone());
            }
        }
        Some(upto)
    }

    /// Keeps in `names` only the nodes the view, made current, still shows;
    /// `false` (and `names` untouched) if the view cannot be trusted. A node
    /// is dropped only if the view saw it deleted (or never saw it after the
    /// listing it was built on, which came after the node's creation — the
    /// caller's names come from a listing or view no older than that).
    pub(in crate::backend::zookeeper) fn retain_present(&self, names: &mut Vec<String>) -> bool {
        let mut state = lock(&self.state);
        self.drain(&mut state, None);
        if state.watcher.is_none() {
            return false;
        }
        names.retain(|name| state.names.contains(name));
        true
    }

    /// A watch on our node `name` through the view: resolves with
    /// `NodeDeleted` when the view sees it deleted, or with a
    /// `NodeChildrenChanged` when the view can no longer tell (dropped, or
    /// the node was already missing) — the holder then looks at its node.
    pub(in crate::backend::zookeeper) fn subscribe(&self, name: &str) -> OwnWatch {
        let mut path = String::with_capacity(self.dir.len() + 1 + name.len());
        path.push_str(&self.dir);
        path.push('/');
        path.push_str(name);
        let mut state = lock(&self.state);
        self.drain(&mut state, None);
        if state.watcher.is_none() || !state.names.contains(name) {
            return Box::pin(std::future::ready(look_again(&path)));
        }
        let (tx, rx) = oneshot::channel();
        state.subscribers.insert(name.to_owned(), tx);
        Box::pin(async move { rx.await.unwrap_or_else(|_| look_again(&path)) })
    }

    /// Drops the view: its watch is removed, and its subscribers look at
    /// their nodes themselves.
    pub(in crate::backend::zookeeper) fn invalidate(&self, why: &str) {
        self.valid.store(false, Ordering::Release);
        let mut state = lock(&self.state);
        close(&self.dir, &mut state, why);
    }

    fn poll_pump(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = lock(&self.state);
        if state.watcher.is_none() {
            return Poll::Ready(());
        }
        if !state.pump.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            state.pump = Some(cx.waker().clone());
        }
        self.drain(&mut state, Some(cx));
        if state.watcher.is_none() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// A `NodeChildrenChanged` event for `path`: "look at the node yourself".
fn look_again(path: &str) -> WatchedEvent {
    WatchedEvent::new(EventType::NodeChildrenChanged, path)
}

/// Applies every event already in the watcher's channel. Polls with the
/// pump's waker (or `cx`, the pump's own), so the channel goes on waking the
/// pump for later events.
fn drain(dir: &str, state: &mut ViewState, cx: Option<&mut Context<'_>>) {
    let waker = match cx {
        Some(cx) => cx.waker().clone(),
        None => state.pump.clone().unwrap_or_else(|| Waker::noop().clone()),
    };
    let mut cx = Context::from_waker(&waker);
    loop {
        let Some(watcher) = state.watcher.as_mut() else {
            return;
        };
        // `changed` panics once the session has ended; a terminal session
        // event comes first and drops the view, but a panic must not take
        // the acquire (or the pump) down with it.
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let changed = std::pin::pin!(watcher.changed());
            changed.poll(&mut cx)
        }));
        match polled {
            Ok(Poll::Pending) => return,
            Ok(Poll::Ready(event)) => apply(dir, state, event),
            Err(_) => close(dir, state, "watch channel closed"),
        }
    }
}

fn apply(dir: &str, state: &mut ViewState, event: WatchedEvent) {
    let child = event
        .path
        .strip_prefix(dir)
        .and_then(|rest| rest.strip_prefix('/'))
        .filter(|name| !name.is_empty() && !name.contains('/'));
    match (event.event_type, child) {
        (EventType::Session, _) => {
            let why = format!("session event {:?}", event.session_state);
            close(dir, state, &why);
        }
        (EventType::NodeCreated, Some(name)) if Contender::parse(name).is_some() => {
            state.names.insert(name.to_owned());
        }
        (EventType::NodeDeleted, Some(name)) => {
            state.names.remove(name);
            if let Some(tx) = state.subscribers.remove(name) {
                let _ = tx.send(event);
            }
        }
        // Data changes, and the directory's own creation or reaping.
        _ => {}
    }
}

/// Drops the watcher (removing the watch) and hands the subscribers back to
/// their own watches.
fn close(dir: &str, state: &mut ViewState, why: &str) {
    if state.watcher.take().is_none() {
        return;
    }
    debug!(%dir, why, holders = state.subscribers.len(), "dropping directory view");
    state.names.clear();
    for (name, tx) in state.subscribers.drain() {
        let _ = tx.send(look_again(&format!("{dir}/{name}")));
    }
    if let Some(pump) = state.pump.take() {
        pump.wake();
    }
}

/// Starts the pump of a view just made.
pub(in crate::backend::zookeeper) fn start_pump(view: &Arc<DirView>) {
    spawn_background(pump(Arc::clone(view)));
}

/// Keeps a view current between acquires: applies events as they come, so
/// holders hear of their node's deletion at once and the channel stays short.
async fn pump(view: Arc<DirView>) {
    std::future::poll_fn(|cx| view.poll_pump(cx)).await;
}
