//! Requests and tokens per minute over the last day, for a key or a tenant: the time series
//! behind the dashboard's charts.
//!
//! A series is a ring of [`MINUTES`] buckets of two `u32` (requests, tokens), allocated on its
//! first use: 11,520 bytes for a key or a tenant that served anything in the last day, nothing
//! for one that did not. So 10,000 keys and 1,000 tenants cost at most 11,000 × 11.5 KB ≈ 127 MB,
//! and a pool of 100 busy keys about 1.2 MB. A ring idle for a whole day is freed when next read.
//! Counts saturate at `u32::MAX` per minute (4 billion tokens a minute on one key).
//!
//! With several instances sharing Redis, the ring also marks how much of it was sent to the
//! fleet's series (see [`MinuteSeries::take_unsent`]): the background writer takes the counts
//! added since, and `/admin/usage` adds the ones not yet sent to what Redis holds.
//!
//! The ring sits behind a `Mutex` held for a few array writes, never across an `.await`: one
//! lock per answer per key and per tenant, uncontended unless the same key answers on two
//! threads in the same instant.

use super::Millis;
use std::sync::{Mutex, MutexGuard};

/// The most minutes of counts not yet sent that are kept for the fleet's series: counts made
/// while Redis was away longer than this are this instance's own.
pub const CATCH_UP: u64 = 60;

/// Whose series: a key (by its pool and fingerprint) or a tenant (by its name).
#[derive(Debug, Clone, Copy)]
pub enum SeriesOf<'a> {
    /// A key of a pool.
    Key {
        /// The pool's name.
        pool: &'a str,
        /// The key's fingerprint.
        fingerprint: &'a str,
    },
    /// A tenant.
    Tenant(&'a str),
}

/// Counts of some minutes, sparse: `(minute since the epoch, [requests, tokens])`.
pub type Minutes = Vec<(u64, [u64; 2])>;

/// Where the series of several instances are added up (the `redis:` section).
#[async_trait::async_trait]
pub trait SharedSeries: Send + Sync {
    /// The fleet's counts of each of `series` (in order) for the minutes `first..=last`, as the
    /// store holds them; `None` when it does not answer in time.
    async fn read(&self, series: &[SeriesOf<'_>], first: u64, last: u64) -> Option<Vec<Minutes>>;
}

/// How many one-minute buckets a series keeps: one day.
pub const MINUTES: usize = 1440;

const MINUTE_MS: Millis = 60_000;

/// Requests and tokens per minute over the last [`MINUTES`] minutes.
#[derive(Default)]
pub struct MinuteSeries {
    ring: Mutex<Option<Ring>>,
}

struct Ring {
    /// The minute (since the Unix epoch) of the newest bucket.
    newest: u64,
    /// `[requests, tokens]` by minute modulo [`MINUTES`].
    buckets: Box<[[u32; 2]]>,
    /// The newest minute sent to the fleet's series: the minutes before it were sent whole.
    sent_minute: u64,
    /// What was sent of `sent_minute`.
    sent: [u32; 2],
}

impl Ring {
    fn new(minute: u64) -> Ring {
        Ring {
            newest: minute,
            buckets: vec![[0, 0]; MINUTES].into_boxed_slice(),
            sent_minute: minute,
            sent: [0, 0],
        }
    }

    /// The counts of minute `m` (zero outside the ring).
    fn at(&self, m: u64) -> [u32; 2] {
        if m > self.newest || self.newest - m >= MINUTES as u64 {
            return [0, 0];
        }
        self.buckets[(m % MINUTES as u64) as usize]
    }

    /// The counts not sent yet, by minute, over at most the last [`CATCH_UP`] minutes.
    fn unsent(&self) -> Minutes {
        let from = self
            .sent_minute
            .max((self.newest + 1).saturating_sub(CATCH_UP));
        let mut out = Vec::new();
        for m in from..=self.newest {
            let [r, t] = self.at(m);
            let [r, t] = if m == self.sent_minute {
                [
                    r.saturating_sub(self.sent[0]),
                    t.saturating_sub(self.sent[1]),
                ]
            } else {
                [r, t]
            };
            if r != 0 || t != 0 {
                out.push((m, [u64::from(r), u64::from(t)]));
            }
        }
        out
    }

    /// Moves the ring forward to `minute`, emptying the buckets it passes.
    fn advance(&mut self, minute: u64) {
        if minute <= self.newest {
            return;
        }
        let steps = (minute - self.newest).min(MINUTES as u64);
        for m in (minute + 1 - steps)..=minute {
            self.buckets[(m % MINUTES as u64) as usize] = [0, 0];
        }
        self.newest = minute;
    }
}

/// One series read back: `points` sums of `step` minutes each, oldest first, the last one
/// ending with the minute of `now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesPoints {
    /// Requests per point.
    pub requests: Vec<u64>,
    /// Tokens per point.
    pub tokens: Vec<u64>,
}

impl MinuteSeries {
    fn lock(&self) -> MutexGuard<'_, Option<Ring>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `requests` and `tokens` to the minute of `now`. A count for a minute older than
    /// the ring (a clock stepped back a day) is dropped.
    pub fn add(&self, now: Millis, requests: u32, tokens: u64) {
        let minute = now / MINUTE_MS;
        let mut ring = self.lock();
        let ring = ring.get_or_insert_with(|| Ring::new(minute));
        ring.advance(minute);
        if ring.newest - minute >= MINUTES as u64 {
            return;
        }
        let slot = &mut ring.buckets[(minute % MINUTES as u64) as usize];
        slot[0] = slot[0].saturating_add(requests);
        slot[1] = slot[1].saturating_add(u32::try_from(tokens).unwrap_or(u32::MAX));
    }

    /// The last `minutes` minutes up to `now` (at most [`MINUTES`]), in sums of `step` minutes
    /// (at least 1), oldest first.
    pub fn read(&self, now: Millis, minutes: usize, step: usize) -> SeriesPoints {
        let (window, mut out) = Window::new(now, minutes, step);
        let mut guard = self.lock();
        let Some(ring) = guard.as_ref() else {
            return out;
        };
        if ring.newest + MINUTES as u64 <= window.last {
            // Idle for a whole day: give the memory back.
            *guard = None;
            return out;
        }
        for m in window.first..=window.last {
            if m > ring.newest || ring.newest - m >= MINUTES as u64 {
                continue;
            }
            let [requests, tokens] = ring.buckets[(m % MINUTES as u64) as usize];
            window.add(&mut out, m, u64::from(requests), u64::from(tokens));
        }
        out
    }

    /// The counts added since the last [`take_unsent`](Self::take_unsent) (at most the last
    /// [`CATCH_UP`] minutes of them), without taking them.
    pub fn unsent(&self) -> Minutes {
        self.lock().as_ref().map_or_else(Vec::new, Ring::unsent)
    }

    /// The counts added since the last call (at most the last [`CATCH_UP`] minutes of them),
    /// marked as sent.
    pub fn take_unsent(&self) -> Minutes {
        let mut guard = self.lock();
        let Some(ring) = guard.as_mut() else {
            return Vec::new();
        };
        let out = ring.unsent();
        ring.sent_minute = ring.newest;
        ring.sent = ring.at(ring.newest);
        out
    }

    /// Bytes the series holds now (for the stated bound's test).
    pub fn heap_bytes(&self) -> usize {
        self.lock()
            .as_ref()
            .map_or(0, |r| r.buckets.len() * std::mem::size_of::<[u32; 2]>())
    }
}

/// The minutes a read covers: `minutes` (at most [`MINUTES`]) ending with the minute of `now`,
/// in points of `step` minutes, the last point ending with that minute.
struct Window {
    first: u64,
    last: u64,
    step: usize,
}

impl Window {
    /// The window and its points, all zero.
    fn new(now: Millis, minutes: usize, step: usize) -> (Window, SeriesPoints) {
        let minutes = minutes.clamp(1, MINUTES);
        let step = step.clamp(1, minutes);
        let points = minutes.div_ceil(step);
        let last = now / MINUTE_MS;
        let first = (last + 1).saturating_sub((points * step) as u64);
        let out = SeriesPoints {
            requests: vec![0; points],
            tokens: vec![0; points],
        };
        (Window { first, last, step }, out)
    }

    /// Adds the counts of `minute` to its point; a minute outside the window is left out.
    fn add(&self, out: &mut SeriesPoints, minute: u64, requests: u64, tokens: u64) {
        if minute < self.first || minute > self.last {
            return;
        }
        let point = ((minute - self.first) as usize) / self.step;
        out.requests[point] = out.requests[point].saturating_add(requests);
        out.tokens[point] = out.tokens[point].saturating_add(tokens);
    }
}

impl SeriesPoints {
    /// `minutes` minutes ending with the minute of `now` (at most [`MINUTES`]), in sums of
    /// `step` minutes, from sparse counts: minutes outside the window are left out.
    pub fn from_minutes(now: Millis, minutes: usize, step: usize, counts: &[Minutes]) -> Self {
        let (window, mut out) = Window::new(now, minutes, step);
        for &(m, [r, t]) in counts.iter().flatten() {
            window.add(&mut out, m, r, t);
        }
        out
    }

    /// Raises each point to at least `other`'s (of the same window).
    pub fn at_least(&mut self, other: &SeriesPoints) {
        for (mine, theirs) in [
            (&mut self.requests, &other.requests),
            (&mut self.tokens, &other.tokens),
        ] {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a = (*a).max(*b);
            }
        }
    }

    /// The first minute of the window [`from_minutes`](Self::from_minutes) covers.
    pub fn first_minute(now: Millis, minutes: usize, step: usize) -> u64 {
        let minutes = minutes.clamp(1, MINUTES);
        let step = step.clamp(1, minutes);
        (now / MINUTE_MS + 1).saturating_sub((minutes.div_ceil(step) * step) as u64)
    }
}

impl std::fmt::Debug for MinuteSeries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MinuteSeries")
            .field("heap_bytes", &self.heap_bytes())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_800_000_000_000;

    #[test]
    fn counts_land_in_their_minute_and_points_sum_steps() {
        let s = MinuteSeries::default();
        assert_eq!(
            s.heap_bytes(),
            0,
            "nothing allocated before the first count"
        );
        s.add(T0, 1, 100);
        s.add(T0 + 10_000, 1, 50);
        s.add(T0 + 61_000, 1, 7);
        assert_eq!(s.heap_bytes(), 11_520);
        let now = T0 + 61_000;
        let minute = s.read(now, 3, 1);
        assert_eq!(minute.requests, [0, 2, 1]);
        assert_eq!(minute.tokens, [0, 150, 7]);
        // Two points of two minutes: the last ends with the current minute.
        let two = s.read(now, 4, 2);
        assert_eq!(two.requests, [0, 3]);
        assert_eq!(two.tokens, [0, 157]);
    }

    #[test]
    fn a_day_later_old_minutes_are_gone_and_an_idle_ring_is_freed() {
        let s = MinuteSeries::default();
        s.add(T0, 5, 500);
        let day = MINUTES as u64 * MINUTE_MS;
        // 23 h 59 min later the count is still in the day's window.
        let p = s.read(T0 + day - MINUTE_MS, MINUTES, 60);
        assert_eq!(p.requests.iter().sum::<u64>(), 5);
        // A new count a day later empties the bucket it reuses.
        s.add(T0 + day, 1, 1);
        let p = s.read(T0 + day, MINUTES, 1);
        assert_eq!(p.requests.iter().sum::<u64>(), 1);
        // A day without counts: read gives zeros and frees the ring.
        let p = s.read(T0 + 2 * day + MINUTE_MS, 60, 1);
        assert_eq!(p.requests.iter().sum::<u64>(), 0);
        assert_eq!(s.heap_bytes(), 0);
    }

    #[test]
    fn unsent_counts_are_taken_once_and_rebuild_the_same_points() {
        let s = MinuteSeries::default();
        s.add(T0, 1, 100);
        s.add(T0 + 60_000, 2, 20);
        let first = s.take_unsent();
        let m = T0 / MINUTE_MS;
        assert_eq!(first, [(m, [1, 100]), (m + 1, [2, 20])]);
        assert!(s.unsent().is_empty() && s.take_unsent().is_empty());
        // More in the minute already sent: only the difference is unsent.
        s.add(T0 + 61_000, 1, 5);
        assert_eq!(s.unsent(), [(m + 1, [1, 5])]);
        let second = s.take_unsent();
        let now = T0 + 61_000;
        let rebuilt = SeriesPoints::from_minutes(now, 4, 2, &[first, second]);
        assert_eq!(rebuilt, s.read(now, 4, 2));
        assert_eq!(SeriesPoints::first_minute(now, 4, 2), m - 2);
        let mut low = SeriesPoints {
            requests: vec![1, 0],
            tokens: vec![0, 500],
        };
        low.at_least(&rebuilt);
        assert_eq!((low.requests, low.tokens), (vec![1, 4], vec![0, 500]));
        // Counts older than the catch-up window are not kept for sending.
        s.add(T0 + 200 * MINUTE_MS, 1, 1);
        assert_eq!(s.take_unsent(), [(m + 200, [1, 1])]);
    }

    #[test]
    fn saturates_instead_of_wrapping_and_drops_counts_older_than_the_ring() {
        let s = MinuteSeries::default();
        s.add(T0, u32::MAX, u64::MAX);
        s.add(T0, 1, 1);
        let p = s.read(T0, 1, 1);
        assert_eq!(p.requests, [u64::from(u32::MAX)]);
        assert_eq!(p.tokens, [u64::from(u32::MAX)]);
        s.add(T0 - 2 * MINUTES as u64 * MINUTE_MS, 9, 9);
        assert_eq!(s.read(T0, MINUTES, MINUTES).requests, [u64::from(u32::MAX)]);
    }
}
