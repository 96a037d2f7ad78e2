//! The Custom Vision call rate, decided in pure code: when the next call may start, given what
//! the service answered. Custom Vision allows 10 calls a second per resource, shared by every
//! instance of the app, and no instance knows how many others there are: each one finds its share
//! from the service's 429 answers, the way AWS SDKs' adaptive retry mode does.
//!
//! Two limits apply together:
//!
//! - the ceiling (`CVCHAIN_CV_MAX_RPS`): at most `ceiling` calls start in any [`WINDOW`] and at
//!   most half of them in any half window, so an idle instance sends a notification's calls at
//!   once, an instance alone never more than the service allows, and instances that start
//!   together overshoot by less;
//! - the adaptive rate: off until the service first refuses a call. A refusal (429) cuts the rate
//!   to what the instance actually got through, at most [`BETA`] of the rate before, and pauses
//!   every start for the answer's `Retry-After`; calls then start evenly spaced. Each success
//!   raises the rate again, by [`GROWTH`] a second, so instances together creep back up to the
//!   service's limit and touch it seldom. Once the rate is back at the ceiling, it is off again.
//!
//! Refusals of calls that started before the last cut are the same overload seen late: they pause
//! but do not cut again, so a burst refused at once counts once.
//!
//! Times are offsets from any fixed origin the caller picks (its clock's start).

use std::collections::VecDeque;
use std::time::Duration;

/// The window no more than `ceiling` calls may start in. 10% longer than the service's second: a
/// call reaches the service a little after it starts, by a delay that varies, and a window of
/// exactly one second let `ceiling + 1` calls reach it within one second.
pub const WINDOW: Duration = Duration::from_millis(1100);
/// The rate after a refusal is at most this share of the rate before.
pub const BETA: f64 = 0.6;
/// How fast the rate grows back: this share of itself per second of successes (2%/s doubles it
/// in about 35 s). Slow on purpose: N instances grow together, and the sooner they reach the
/// limit again, the more calls are refused.
pub const GROWTH: f64 = 0.02;
/// The lowest rate, in calls per second: an instance refused everything still tries now and then.
pub const MIN_RATE: f64 = 0.2;
/// The longest pause a `Retry-After` may impose.
pub const MAX_PAUSE: Duration = Duration::from_secs(20);
/// Successes are counted over this span to measure the rate an instance got through.
const MEASURE: Duration = Duration::from_secs(5);

/// The limiter's state. Not thread-safe by itself: the async shell holds it under a lock.
#[derive(Debug, Clone)]
pub struct RateState {
    ceiling: usize,
    /// Starts within the last [`WINDOW`], oldest first.
    starts: VecDeque<Duration>,
    /// Calls per second while adaptive; `None` until the first refusal, and again once the rate
    /// is back at the ceiling.
    rate: Option<f64>,
    /// When the next evenly spaced start may go, while adaptive.
    next_paced: Duration,
    /// No start before this (the last `Retry-After`).
    paused_until: Duration,
    /// When the rate was last cut.
    last_cut: Option<Duration>,
    /// When the rate last grew.
    last_growth: Duration,
    /// Successes within the last [`MEASURE`].
    successes: VecDeque<Duration>,
    /// The first start: the rate got through is measured over no more than the time since.
    first_start: Option<Duration>,
}

/// What the service answered to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Any answer but a refusal for rate: errors included, they say nothing about the rate.
    Answered,
    /// 429, with the `Retry-After` the service gave, if any.
    Refused { retry_after: Option<Duration> },
}

impl RateState {
    /// At most `ceiling` calls per [`WINDOW`] (at least 1).
    pub fn new(ceiling: u32) -> Self {
        let ceiling = ceiling.max(1) as usize;
        Self {
            ceiling,
            starts: VecDeque::with_capacity(ceiling + 1),
            rate: None,
            next_paced: Duration::ZERO,
            paused_until: Duration::ZERO,
            last_cut: None,
            last_growth: Duration::ZERO,
            successes: VecDeque::new(),
            first_start: None,
        }
    }

    /// The adaptive rate in calls per second, or `None` while only the ceiling applies.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    fn ceiling_rate(&self) -> f64 {
        self.ceiling as f64 / WINDOW.as_secs_f64()
    }

    /// Starts a call at `now` if it may start now (`Ok`), or says when to ask again (`Err`).
    pub fn try_start(&mut self, now: Duration) -> Result<(), Duration> {
        while self.starts.front().is_some_and(|s| now >= *s + WINDOW) {
            self.starts.pop_front();
        }
        let mut at = self.paused_until;
        if self.starts.len() >= self.ceiling {
            at = at.max(self.starts[0] + WINDOW);
        }
        // A burst is at most half the ceiling: instances that start together overshoot less.
        let half = self.ceiling.div_ceil(2);
        let recent = self.starts.len() - self.starts.partition_point(|s| now >= *s + WINDOW / 2);
        if recent >= half {
            at = at.max(self.starts[self.starts.len() - half] + WINDOW / 2);
        }
        if self.rate.is_some() {
            at = at.max(self.next_paced);
        }
        if at > now {
            return Err(at);
        }
        self.starts.push_back(now);
        self.first_start.get_or_insert(now);
        if let Some(rate) = self.rate {
            // Spaced from the later of now and the slot this call had: an idle spell does not
            // save up a burst.
            self.next_paced = self.next_paced.max(now) + Duration::from_secs_f64(1.0 / rate);
        }
        Ok(())
    }

    /// Takes the answer to a call that started at `started`, arriving at `now`.
    pub fn record(&mut self, now: Duration, started: Duration, outcome: Outcome) {
        while self.successes.front().is_some_and(|s| now >= *s + MEASURE) {
            self.successes.pop_front();
        }
        match outcome {
            Outcome::Answered => {
                self.successes.push_back(now);
                self.grow(now);
            }
            Outcome::Refused { retry_after } => {
                // `Retry-After: 0` asks for the call again at once, not for a slower pace (the
                // service's own refusals say a second).
                if retry_after == Some(Duration::ZERO) {
                    return;
                }
                let pause = retry_after.unwrap_or(Duration::from_secs(1)).min(MAX_PAUSE);
                self.paused_until = self.paused_until.max(now + pause);
                if self.last_cut.is_some_and(|cut| started < cut) {
                    return;
                }
                let before = self.rate.unwrap_or_else(|| self.ceiling_rate());
                // Over the span measured, or the instance's life if shorter (at least a second).
                let span = MEASURE
                    .min(now.saturating_sub(self.first_start.unwrap_or(now)))
                    .max(Duration::from_secs(1));
                let got = self.successes.len() as f64 / span.as_secs_f64();
                let rate = (before * BETA).min(got).max(MIN_RATE);
                self.rate = Some(rate);
                self.last_cut = Some(now);
                self.last_growth = now;
                // Evenly spaced from the end of the pause.
                self.next_paced = self.paused_until;
            }
        }
    }

    /// Raises the rate by [`GROWTH`] per second since it last grew; back at the ceiling, only
    /// the ceiling applies again.
    fn grow(&mut self, now: Duration) {
        let Some(rate) = self.rate else { return };
        let dt = now.saturating_sub(self.last_growth).as_secs_f64();
        self.last_growth = self.last_growth.max(now);
        let rate = rate * (GROWTH * dt).exp();
        self.rate = (rate < self.ceiling_rate()).then_some(rate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn an_idle_instance_bursts_half_the_ceiling_and_never_exceeds_it_in_a_window() {
        let mut s = RateState::new(10);
        for _ in 0..5 {
            assert_eq!(s.try_start(ms(0)), Ok(()));
        }
        assert_eq!(
            s.try_start(ms(0)),
            Err(WINDOW / 2),
            "half the ceiling at once"
        );
        for _ in 0..5 {
            assert_eq!(s.try_start(ms(550)), Ok(()));
        }
        assert_eq!(s.try_start(ms(600)), Err(WINDOW), "the ceiling per window");
        assert_eq!(s.try_start(WINDOW), Ok(()));
        assert_eq!(s.rate(), None);
    }

    #[test]
    fn calls_spread_over_time_are_not_delayed_and_the_window_slides() {
        let mut s = RateState::new(3);
        for t in [0, 400, 800, 1200] {
            assert_eq!(s.try_start(ms(t)), Ok(()));
        }
        // The last three starts were at 400, 800 and 1200 ms: one more may start at once (the
        // window after 400 ms ended at 1500), the next at 1900.
        assert_eq!(s.try_start(ms(1600)), Ok(()));
        assert_eq!(s.try_start(ms(1600)), Err(ms(1900)));
    }

    #[test]
    fn at_least_one_call_per_window() {
        let mut s = RateState::new(0);
        assert_eq!(s.try_start(ms(0)), Ok(()));
        assert_eq!(s.try_start(ms(1)), Err(WINDOW));
    }

    #[test]
    fn a_refusal_cuts_to_what_got_through_and_pauses() {
        let mut s = RateState::new(10);
        for _ in 0..5 {
            s.try_start(ms(0)).unwrap();
        }
        // Two got through, then a refusal with Retry-After: 1.
        s.record(ms(20), ms(0), Outcome::Answered);
        s.record(ms(21), ms(0), Outcome::Answered);
        let one = Some(Duration::from_secs(1));
        s.record(ms(22), ms(0), Outcome::Refused { retry_after: one });
        assert_eq!(
            s.rate(),
            Some(2.0),
            "2 calls in the instance's first second"
        );
        // The rest of the burst refused too: the same overload, no further cut; each refusal
        // pauses for its Retry-After.
        s.record(ms(23), ms(0), Outcome::Refused { retry_after: one });
        s.record(ms(30), ms(0), Outcome::Refused { retry_after: one });
        assert_eq!(s.rate(), Some(2.0));
        assert_eq!(s.try_start(ms(500)), Err(ms(1030)));
        // Then one call every 500 ms.
        s.try_start(ms(1030)).unwrap();
        assert_eq!(s.try_start(ms(1100)), Err(ms(1530)));
        // A call started after the cut and refused cuts again, to at most BETA of the rate.
        s.record(ms(1050), ms(1030), Outcome::Refused { retry_after: None });
        assert!(s.rate().unwrap() <= 2.0 * BETA);
        assert_eq!(
            s.try_start(ms(1200)),
            Err(ms(2050)),
            "a second without Retry-After"
        );
    }

    #[test]
    fn a_retry_after_is_honoured_up_to_a_bound() {
        let mut s = RateState::new(10);
        s.try_start(ms(0)).unwrap();
        let hour = Some(Duration::from_secs(3600));
        s.record(ms(10), ms(0), Outcome::Refused { retry_after: hour });
        assert_eq!(s.try_start(ms(20)), Err(ms(10) + MAX_PAUSE));
    }

    #[test]
    fn successes_bring_the_rate_back_to_the_ceiling_then_only_the_ceiling_applies() {
        let mut s = RateState::new(10);
        s.try_start(ms(0)).unwrap();
        s.record(ms(10), ms(0), Outcome::Refused { retry_after: None });
        assert_eq!(s.rate(), Some(MIN_RATE), "nothing got through");
        let mut t = ms(1000);
        let mut last = MIN_RATE;
        while let Some(rate) = s.rate() {
            assert!(rate >= last, "the rate only grows");
            last = rate;
            t += ms(100);
            s.record(t, t, Outcome::Answered);
            assert!(t < Duration::from_secs(300), "stuck at {rate}");
        }
        // ln(9.09 / 0.2) / GROWTH: gentle.
        let expected = (10.0 / 1.1 / MIN_RATE).ln() / GROWTH;
        assert!((t.as_secs_f64() - 1.0 - expected).abs() < 1.0, "{t:?}");
        for _ in 0..5 {
            s.try_start(t).unwrap();
        }
    }

    #[test]
    fn a_refusal_that_says_retry_at_once_neither_pauses_nor_slows() {
        let mut s = RateState::new(10);
        s.try_start(ms(0)).unwrap();
        let now = Some(Duration::ZERO);
        s.record(ms(10), ms(0), Outcome::Refused { retry_after: now });
        assert_eq!(s.rate(), None);
        assert_eq!(s.try_start(ms(11)), Ok(()));
    }

    #[test]
    fn answers_other_than_refusals_leave_the_rate_alone() {
        let mut s = RateState::new(10);
        s.try_start(ms(0)).unwrap();
        s.record(ms(10), ms(0), Outcome::Answered);
        assert_eq!(s.rate(), None);
        assert_eq!(s.try_start(ms(11)), Ok(()));
    }

    /// What a simulated run saw.
    #[derive(Debug)]
    struct Sim {
        arrived: Vec<Duration>,
        refused: usize,
        served: usize,
        refused_at: Vec<Duration>,
    }

    /// `n` instances with `workers` calls each always waiting, against a service that serves at
    /// most `limit` calls in any second and refuses the rest with `Retry-After: 1`, for `secs`.
    /// Network delays are drawn from a fixed seed: the run is the same every time.
    fn simulate(n: usize, workers: usize, limit: usize, secs: u64) -> Sim {
        // Events: (time, instance, kind) with kind 0 = ask to start, 1 = answer arrives.
        let mut states: Vec<RateState> = (0..n).map(|_| RateState::new(10)).collect();
        let mut queue = BinaryHeap::new();
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut delay = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            ms(5 + rng % 40)
        };
        for i in 0..n {
            for _ in 0..workers {
                queue.push(Reverse((Duration::ZERO, i, 0u8, Duration::ZERO, false)));
            }
        }
        let end = Duration::from_secs(secs);
        let mut served_at: VecDeque<Duration> = VecDeque::new();
        let mut sim = Sim {
            arrived: Vec::new(),
            refused: 0,
            served: 0,
            refused_at: Vec::new(),
        };
        while let Some(Reverse((t, i, kind, started, refused))) = queue.pop() {
            if t > end {
                break;
            }
            if kind == 0 {
                match states[i].try_start(t) {
                    Err(at) => queue.push(Reverse((at, i, 0, Duration::ZERO, false))),
                    Ok(()) => {
                        let arrives = t + delay();
                        // The service decides when the call arrives; arrivals are in order
                        // closely enough at these delays for a sliding count.
                        while served_at.front().is_some_and(|s| arrives >= *s + ms(1000)) {
                            served_at.pop_front();
                        }
                        sim.arrived.push(arrives);
                        let refuse = served_at.len() >= limit;
                        if refuse {
                            sim.refused += 1;
                            sim.refused_at.push(arrives);
                        } else {
                            served_at.push_back(arrives);
                            sim.served += 1;
                        }
                        queue.push(Reverse((arrives + delay(), i, 1, t, refuse)));
                    }
                }
            } else {
                let outcome = if refused {
                    Outcome::Refused {
                        retry_after: Some(Duration::from_secs(1)),
                    }
                } else {
                    Outcome::Answered
                };
                states[i].record(t, started, outcome);
                // The worker's next call (a refused one is retried after its Retry-After).
                let next = if refused {
                    t + Duration::from_secs(1)
                } else {
                    t
                };
                queue.push(Reverse((next, i, 0, Duration::ZERO, false)));
            }
        }
        sim.arrived.sort();
        sim
    }

    fn max_in_a_second(times: &[Duration], after: Duration) -> usize {
        let from = times.partition_point(|t| *t < after);
        (from..times.len())
            .map(|i| times[i..].partition_point(|t| *t < times[i] + ms(1000)))
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn one_instance_alone_is_never_refused() {
        let sim = simulate(1, 24, 10, 60);
        assert_eq!(sim.refused, 0);
        assert!(sim.served > 500, "{sim:?}");
    }

    #[test]
    fn eight_instances_find_the_shared_limit() {
        let sim = simulate(8, 24, 10, 120);
        let total = sim.served + sim.refused;
        let refused = sim.refused as f64 / total as f64;
        eprintln!(
            "served {} refused {} ({:.1}%), max arrivals in a second after 10 s: {}",
            sim.served,
            sim.refused,
            refused * 100.0,
            max_in_a_second(&sim.arrived, Duration::from_secs(10))
        );
        let mut buckets = [0usize; 12];
        for t in &sim.refused_at {
            buckets[(t.as_secs() / 10).min(11) as usize] += 1;
        }
        let mut served = [0usize; 12];
        for t in &sim.arrived {
            served[(t.as_secs() / 10).min(11) as usize] += 1;
        }
        eprintln!("refused per 10 s: {buckets:?}\narrived per 10 s: {served:?}");
        // The first seconds: the instances start together, each with a burst of 5.
        assert!(buckets[0] < 60, "{buckets:?}");
        // Then: few refusals, near the limit, and never far above it.
        let late_refused: usize = buckets[1..].iter().sum();
        let late: usize = served[1..].iter().sum();
        assert!(
            (late_refused as f64) < 0.05 * late as f64,
            "{late_refused} of {late}"
        );
        assert!(late as f64 / 110.0 > 6.0, "{late} calls in 110 s");
        assert!(max_in_a_second(&sim.arrived, Duration::from_secs(10)) <= 13);
    }
}
