//! The process-wide limit on Custom Vision calls, shared by all concurrent invocations: the thin
//! async shell around [`cvchain_core::ratelimit::RateState`], which decides when a call may start
//! (the ceiling `CVCHAIN_CV_MAX_RPS`, and an adaptive rate that finds this instance's share of the
//! service's 10 calls a second from its 429 answers).

use cvchain_core::ratelimit::{Outcome, RateState};
use std::time::Duration;
use tokio::time::Instant;

/// When a call started, to hand back with its answer.
#[derive(Debug, Clone, Copy)]
pub struct Started(Duration);

/// Hands out starts in turn, as the state allows, and learns from the answers.
#[derive(Debug)]
pub struct RateLimiter {
    origin: Instant,
    state: std::sync::Mutex<RateState>,
    /// Waiters queue here (tokio's mutex is fair), so calls start in the order they asked and
    /// only the first of them sleeps.
    turn: tokio::sync::Mutex<()>,
}

impl RateLimiter {
    /// At most `ceiling` calls per window (at least 1), fewer once the service refuses some.
    pub fn per_second(ceiling: u32) -> Self {
        Self {
            origin: Instant::now(),
            state: std::sync::Mutex::new(RateState::new(ceiling)),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.origin)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RateState> {
        // The state stays consistent between calls: a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until this call may start.
    pub async fn acquire(&self) -> Started {
        let _turn = self.turn.lock().await;
        loop {
            let now = self.now();
            let at = match self.state().try_start(now) {
                Ok(()) => return Started(now),
                Err(at) => at,
            };
            // Asked again when due: a refusal meanwhile may have pushed the start further.
            tokio::time::sleep_until(self.origin + at).await;
        }
    }

    /// Takes the service's answer to a call: a 429 with its `Retry-After`, or any other answer.
    pub fn record(&self, started: Started, outcome: Outcome) {
        let now = self.now();
        let mut state = self.state();
        let before = state.rate();
        state.record(now, started.0, outcome);
        let after = state.rate();
        if before != after && matches!(outcome, Outcome::Refused { .. }) {
            tracing::info!(
                calls_per_second = after.unwrap_or_default(),
                "Custom Vision refused a call for rate; slowing down"
            );
        }
    }

    /// The adaptive rate in calls per second, or `None` while only the ceiling applies.
    pub fn rate(&self) -> Option<f64> {
        self.state().rate()
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

    #[tokio::test(start_paused = true)]
    async fn waiters_start_in_turn_within_the_ceiling() {
        let limiter = Arc::new(RateLimiter::per_second(10));
        // With a paused clock, time only moves when every task sleeps: the starts are exact.
        let times = starts(limiter.clone(), 12).await;
        let half = cvchain_core::ratelimit::WINDOW / 2;
        assert_eq!(&times[..5], &[Duration::ZERO; 5], "a burst of half");
        assert_eq!(&times[5..10], &[half; 5]);
        assert_eq!(&times[10..], &[half * 2; 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_pauses_every_waiter_for_its_retry_after() {
        let limiter = Arc::new(RateLimiter::per_second(10));
        let first = limiter.acquire().await;
        limiter.record(
            first,
            Outcome::Refused {
                retry_after: Some(Duration::from_secs(2)),
            },
        );
        assert_eq!(limiter.rate(), Some(cvchain_core::ratelimit::MIN_RATE));
        let times = starts(limiter.clone(), 2).await;
        // Nothing got through in its first second: the least rate, one call every 5 s.
        assert_eq!(
            times,
            [Duration::from_secs(2), Duration::from_secs(7)].to_vec()
        );
    }
}
