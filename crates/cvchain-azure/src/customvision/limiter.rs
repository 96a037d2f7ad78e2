//! A process-wide limit on Custom Vision calls, shared by all concurrent invocations: the service
//! allows 10 transactions per second per resource.
//!
//! A sliding window: at most `rate` calls start in any window of [`WINDOW`], and an idle process
//! starts a burst of `rate` calls at once. The window is 10% longer than the service's second: a
//! call reaches the service a little after it starts, by a delay that varies, and a window of
//! exactly one second let the benchmark's stand-in count `rate + 1` calls in one second.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::{sync::Mutex, time::Instant};

/// The window no more than `rate` calls may start in.
pub const WINDOW: Duration = Duration::from_millis(1100);

/// Hands out start times, in order, so that no [`WINDOW`] holds more than `rate` of them.
#[derive(Debug)]
pub struct RateLimiter {
    rate: usize,
    /// The latest `rate` start times handed out, oldest first (some may lie in the future).
    starts: Mutex<VecDeque<Instant>>,
}

impl RateLimiter {
    /// `rate` calls per window (at least 1).
    pub fn per_second(rate: u32) -> Self {
        let rate = rate.max(1) as usize;
        Self {
            rate,
            starts: Mutex::new(VecDeque::with_capacity(rate + 1)),
        }
    }

    /// The start time of the next call: now, unless `rate` calls already start within the
    /// window before it; never before a start already handed out, so callers go in turn.
    fn next_start(&self, starts: &mut VecDeque<Instant>, now: Instant) -> Instant {
        let mut at = starts.back().map_or(now, |last| (*last).max(now));
        if starts.len() == self.rate {
            // The call `rate` places back must have started a whole window earlier.
            at = at.max(starts[0] + WINDOW);
        }
        starts.push_back(at);
        if starts.len() > self.rate {
            starts.pop_front();
        }
        at
    }

    /// Waits until this call may start.
    pub async fn acquire(&self) {
        let at = {
            let mut starts = self.starts.lock().await;
            self.next_start(&mut starts, Instant::now())
        };
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    async fn starts(limiter: Arc<RateLimiter>, n: usize) -> Vec<Duration> {
        let origin = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..n {
            let l = limiter.clone();
            tasks.push(tokio::spawn(async move {
                l.acquire().await;
                Instant::now() - origin
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        times
    }

    /// No window of `WINDOW` holds more than `rate` starts.
    fn assert_window(times: &[Duration], rate: usize) {
        for w in times.windows(rate + 1) {
            assert!(
                w[rate] - w[0] >= WINDOW,
                "{} starts within {:?}: {times:?}",
                rate + 1,
                w[rate] - w[0]
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_process_bursts_then_waits_for_the_window() {
        let limiter = Arc::new(RateLimiter::per_second(10));
        // With a paused clock, time only moves when every task sleeps: the starts are exact.
        let times = starts(limiter.clone(), 25).await;
        assert_eq!(&times[..10], &[Duration::ZERO; 10], "the burst");
        assert_eq!(&times[10..20], &[WINDOW; 10]);
        assert_eq!(&times[20..], &[WINDOW * 2; 5]);
        assert_window(&times, 10);
        // Even with each call reaching the service up to 99 ms late, no second holds 11.
        for w in times.windows(11) {
            assert!(w[10] - w[0] > Duration::from_millis(1000) + Duration::from_millis(99));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn calls_spread_over_time_are_not_delayed_and_the_window_slides() {
        let limiter = Arc::new(RateLimiter::per_second(3));
        let origin = Instant::now();
        let mut times = Vec::new();
        // A call every 400 ms never waits; then four at once wait only for the window.
        for _ in 0..4 {
            limiter.acquire().await;
            times.push(Instant::now() - origin);
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        assert_eq!(
            times,
            [0, 400, 800, 1200].map(Duration::from_millis).to_vec()
        );
        let later = starts(limiter.clone(), 4).await;
        let base = Duration::from_millis(1600);
        // The last three starts were at 400, 800 and 1200 ms: a new one may start at once (the
        // window after 400 ms ended at 1500), the next at 1900 (800 + 1100), 2300, then 2700.
        assert_eq!(
            later,
            [0, 300, 700, 1100].map(Duration::from_millis).to_vec()
        );
        let mut all = times.clone();
        all.extend(later.iter().map(|t| *t + base));
        assert_window(&all, 3);
    }

    #[test]
    fn at_least_one_call_per_window() {
        let l = RateLimiter::per_second(0);
        assert_eq!(l.rate, 1);
    }
}
