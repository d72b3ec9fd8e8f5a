//! The one back-off schedule of the client: a first delay, doubled after
//! each further failure up to a cap, optionally jittered. The reconnect
//! supervisor (`client.rs`) and the acquire retry (`lock/request.rs`) both
//! count their pauses with it; each keeps its own bounds (attempts, deadline,
//! the first attempt being immediate) where they are decided.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Delays between attempts: `first`, then doubling (saturating) up to `cap`.
/// The first delay is `first` as given, even above the cap, as the public
/// settings that feed it always did ([`RetryPolicy`](crate::RetryPolicy)).
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    first: Duration,
    cap: Duration,
    /// The delay [`Backoff::next_delay`] returns next, before jitter.
    next: Duration,
    jitter: bool,
}

impl Backoff {
    /// A schedule starting at `first`, doubling up to `cap`, without jitter.
    pub(crate) fn new(first: Duration, cap: Duration) -> Backoff {
        Backoff {
            first,
            cap,
            next: first,
            jitter: false,
        }
    }

    /// Scales each delay by a random factor in [0.75, 1.25), so clients cut
    /// off together do not retry in lockstep. The schedule itself (what
    /// doubles) stays unjittered.
    pub(crate) fn with_jitter(mut self) -> Backoff {
        self.jitter = true;
        self
    }

    /// The pause before the next attempt; the one after it is twice as long,
    /// up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = self.next.saturating_mul(2).min(self.cap);
        if self.jitter { jitter(delay) } else { delay }
    }

    /// Starts the schedule over at the first delay.
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// `d` scaled by a random factor in [0.75, 1.25).
fn jitter(d: Duration) -> Duration {
    let r = RandomState::new().build_hasher().finish() % 500;
    // `mul_f64` panics when the product overflows (a huge configured backoff).
    Duration::try_from_secs_f64(d.as_secs_f64() * (0.75 + r as f64 / 1000.0)).unwrap_or(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn take(b: &mut Backoff, n: usize) -> Vec<Duration> {
        (0..n).map(|_| b.next_delay()).collect()
    }

    #[test]
    fn doubles_from_the_first_delay_up_to_the_cap() {
        // The client's reconnect default (50 ms to 2 s) and the acquire
        // retry's (50 ms to 1 s).
        let mut b = Backoff::new(ms(50), ms(2_000));
        assert_eq!(take(&mut b, 8), [50, 100, 200, 400, 800, 1_600, 2_000, 2_000].map(ms));
        let mut b = Backoff::new(ms(50), ms(1_000));
        assert_eq!(take(&mut b, 7), [50, 100, 200, 400, 800, 1_000, 1_000].map(ms));
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::new(ms(10), ms(100));
        take(&mut b, 5);
        b.reset();
        assert_eq!(take(&mut b, 3), [10, 20, 40].map(ms));
    }

    #[test]
    fn a_first_delay_above_the_cap_is_kept_once() {
        let mut b = Backoff::new(ms(500), ms(100));
        assert_eq!(take(&mut b, 3), [500, 100, 100].map(ms));
    }

    #[test]
    fn zero_stays_zero_and_huge_saturates() {
        let mut b = Backoff::new(Duration::ZERO, ms(100));
        assert_eq!(take(&mut b, 3), [Duration::ZERO; 3]);
        let mut b = Backoff::new(Duration::MAX, Duration::MAX);
        assert_eq!(take(&mut b, 2), [Duration::MAX; 2]);
    }

    #[test]
    fn jitter_stays_within_a_quarter_and_leaves_the_schedule_alone() {
        let mut b = Backoff::new(ms(100), ms(400)).with_jitter();
        for base in [100, 200, 400, 400].map(ms) {
            let d = b.next_delay();
            assert!(d >= base.mul_f64(0.75) && d < base.mul_f64(1.25), "{d:?} for {base:?}");
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
        // Too large to scale: unchanged rather than a panic.
        assert!(jitter(Duration::MAX) >= Duration::MAX.mul_f64(0.5));
    }
}
