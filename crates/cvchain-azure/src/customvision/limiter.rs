//! A process-wide limit on Custom Vision calls per second, shared by all concurrent invocations:
//! the service allows 10 transactions per second per resource.

use std::time::Duration;
use tokio::{sync::Mutex, time::Instant};

/// Hands out evenly spaced start times, so no one-second window holds more than `rate` calls.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// `rate` calls per second (at least 1). Slots are 10% further apart than `1 s / rate`: a call
    /// reaches the service a little after its slot, by a delay that varies, and exact spacing let
    /// the benchmark's stand-in count `rate + 1` calls in one second.
    pub fn per_second(rate: u32) -> Self {
        Self {
            interval: Duration::from_millis(1100) / rate.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for the next free slot.
    pub async fn acquire(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn concurrent_callers_get_spaced_slots() {
        let limiter = Arc::new(RateLimiter::per_second(10));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..25 {
            let l = limiter.clone();
            tasks.push(tokio::spawn(async move {
                l.acquire().await;
                Instant::now() - start
            }));
        }
        let mut times = Vec::new();
        for t in tasks {
            times.push(t.await.unwrap());
        }
        times.sort();
        // With a paused clock, time only moves when every task sleeps: the slots are exact.
        for (i, t) in times.iter().enumerate() {
            assert_eq!(*t, Duration::from_millis(110) * i as u32);
        }
        // No one-second window holds more than 10 starts, even with each call 90 ms late.
        for w in times.windows(11) {
            assert!(w[10] - w[0] >= Duration::from_millis(1100));
        }
    }
}
