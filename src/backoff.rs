//! Back-off between tries: the one schedule every retry loop of the crate
//! follows (a first pause, doubled after each pause, up to a cap), so each
//! loop states only its bounds and what stops it.
//!
//! Each loop keeps its own bounds: a request retried inside one operation
//! pauses briefly (tens of milliseconds, at most 400 ms), a background task
//! reopening a connection or deleting what was left behind backs off to a
//! second or a few.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The pauses between a loop's tries: `first`, then twice the previous
/// one, at most `cap`; [`Backoff::reset`] (after a success) starts over.
///
/// A loop keeps one and calls [`Backoff::wait`] (or [`Backoff::sleep`])
/// after each failure; [`Backoff::delay`] is the pause the next wait takes,
/// for a log line's `retry_in`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Backoff {
    first: Duration,
    cap: Duration,
    next: Duration,
}

impl Backoff {
    /// Pauses of `first`, doubled each time, at most `cap`. The first pause
    /// is `first` as given, even over `cap`.
    pub(crate) const fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            next: first,
        }
    }

    /// The pause the next [`Backoff::wait`] or [`Backoff::sleep`] takes.
    pub(crate) fn delay(&self) -> Duration {
        self.next
    }

    /// Back to the first pause: the loop succeeded.
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }

    /// Sleeps [`Backoff::delay`], then doubles it (up to the cap).
    ///
    /// # Cancellation safety
    /// Cancel-safe: dropped before the pause is over, it leaves the delay
    /// as it was (for a loop that selects on it beside other events).
    pub(crate) async fn sleep(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = self.next.saturating_mul(2).min(self.cap);
    }

    /// [`Backoff::sleep`], unless `cancel` is cancelled first: `true` after
    /// the pause, `false` when cancelled (the caller stops trying).
    ///
    /// # Cancellation safety
    /// As [`Backoff::sleep`].
    pub(crate) async fn wait(&mut self, cancel: &CancellationToken) -> bool {
        self.wait_or(cancel.cancelled()).await
    }

    /// [`Backoff::wait`] for a stop that is not a token of the caller's (a
    /// session's retirement): `false` when `stop` completes first.
    ///
    /// # Cancellation safety
    /// As [`Backoff::sleep`].
    pub(crate) async fn wait_or(&mut self, stop: impl Future<Output = ()>) -> bool {
        tokio::select! {
            () = self.sleep() => true,
            () = stop => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// How long each of `n` sleeps takes, by the (paused) clock.
    async fn pauses(backoff: &mut Backoff, n: usize) -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let before = Instant::now();
            backoff.sleep().await;
            out.push(before.elapsed());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn doubles_up_to_the_cap_and_starts_over_on_reset() {
        let mut backoff = Backoff::new(50 * MS, 1000 * MS);
        assert_eq!(backoff.delay(), 50 * MS);
        assert_eq!(
            pauses(&mut backoff, 7).await,
            [50 * MS, 100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        backoff.reset();
        assert_eq!(backoff.delay(), 50 * MS);
        assert_eq!(pauses(&mut backoff, 2).await, [50 * MS, 100 * MS]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cap_that_is_not_a_doubling_of_the_first_is_reached_exactly() {
        let mut backoff = Backoff::new(25 * MS, 400 * MS);
        assert_eq!(
            pauses(&mut backoff, 6).await,
            [25 * MS, 50 * MS, 100 * MS, 200 * MS, 400 * MS, 400 * MS]
        );
        let mut backoff = Backoff::new(100 * MS, 2000 * MS);
        assert_eq!(
            pauses(&mut backoff, 7).await,
            [100 * MS, 200 * MS, 400 * MS, 800 * MS, 1600 * MS, 2000 * MS, 2000 * MS]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_pause_is_taken_as_given_even_over_the_cap() {
        let mut backoff = Backoff::new(30 * MS, 20 * MS);
        assert_eq!(pauses(&mut backoff, 3).await, [30 * MS, 20 * MS, 20 * MS]);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_pauses_until_cancelled_and_then_returns_false_at_once() {
        let cancel = CancellationToken::new();
        let mut backoff = Backoff::new(100 * MS, 5000 * MS);
        let before = Instant::now();
        assert!(backoff.wait(&cancel).await);
        assert_eq!(before.elapsed(), 100 * MS);
        assert_eq!(backoff.delay(), 200 * MS);

        // Cancelled half-way through a pause.
        let canceller = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(50 * MS).await;
                cancel.cancel();
            })
        };
        let before = Instant::now();
        assert!(!backoff.wait(&cancel).await);
        assert_eq!(before.elapsed(), 50 * MS);
        assert_eq!(backoff.delay(), 200 * MS, "a cut-short pause does not count");
        canceller.await.ok();

        // Already cancelled: no pause at all.
        let before = Instant::now();
        assert!(!backoff.wait(&cancel).await);
        assert_eq!(before.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_or_stops_on_any_future() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        assert!(backoff.wait_or(std::future::pending()).await);
        let before = Instant::now();
        assert!(!backoff.wait_or(tokio::time::sleep(30 * MS)).await);
        assert_eq!(before.elapsed(), 30 * MS);
        assert_eq!(backoff.delay(), 200 * MS);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sleep_dropped_early_leaves_the_delay_alone() {
        let mut backoff = Backoff::new(100 * MS, 1000 * MS);
        assert!(tokio::time::timeout(40 * MS, backoff.sleep()).await.is_err());
        assert_eq!(backoff.delay(), 100 * MS);
    }
}
