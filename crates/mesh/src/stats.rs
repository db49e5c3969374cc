//! How long each method's calls have taken lately, in one bounded table: an EWMA (the typical
//! time, for deadline admission) and a streaming p95 (for hedging), both updated as a call is
//! recorded and read without a lock. The p95 comes from a histogram of logarithmic buckets
//! (each 25% wider than the last) that is halved every [`DECAY_EVERY`] records, so that it
//! follows the recent calls: a method that became fast is seen to be fast.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Methods whose times are kept: more paths than this are not methods but noise.
pub const MAX_METHODS: usize = 1024;

/// The weight of each new call in the typical time (an EWMA).
const WEIGHT: f64 = 0.2;

/// Buckets of the histogram: the first ends at 1 µs, each next one is 25% wider, the last
/// takes everything past 1.25^94 µs (about 20 minutes).
const BUCKETS: usize = 96;

/// What one record adds to its bucket: counts are fixed-point, so that halving keeps a lone
/// slow call's share (a count of 1 would halve to 0 and the p95 would forget the slow calls
/// first) until it is 1/256 of a call.
const UNIT: u32 = 256;

/// Records between two halvings of the histogram: it holds about twice this many recent calls.
pub const DECAY_EVERY: u64 = 100;

/// One method's recent times.
#[derive(Debug)]
pub struct MethodStats {
    answered: AtomicU64,
    /// The EWMA of answered calls' times, in nanoseconds, as f64 bits.
    ewma: AtomicU64,
    buckets: [AtomicU32; BUCKETS],
}

impl Default for MethodStats {
    fn default() -> Self {
        Self {
            answered: AtomicU64::new(0),
            ewma: AtomicU64::new(0),
            buckets: std::array::from_fn(|_| AtomicU32::new(0)),
        }
    }
}

/// The bucket of `took`: the first whose upper bound (1.25^i µs) is at least it.
fn bucket(took: Duration) -> usize {
    let micros = took.as_secs_f64() * 1e6;
    if micros <= 1.0 {
        return 0;
    }
    (micros.ln() / 1.25f64.ln())
        .ceil()
        .min((BUCKETS - 1) as f64) as usize
}

/// The upper bound of bucket `i`.
fn upper(i: usize) -> Duration {
    Duration::from_secs_f64(1.25f64.powi(i as i32) / 1e6)
}

impl MethodStats {
    /// A call answered after `took`. Racing records may overwrite each other's EWMA update and
    /// a halving may lose a count: an estimate, not an account.
    pub fn record(&self, took: Duration) {
        let answered = self.answered.fetch_add(1, Ordering::Relaxed);
        let nanos = took.as_nanos() as f64;
        let before = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let now = if answered == 0 {
            nanos
        } else {
            before + WEIGHT * (nanos - before)
        };
        self.ewma.store(now.to_bits(), Ordering::Relaxed);
        self.buckets[bucket(took)].fetch_add(UNIT, Ordering::Relaxed);
        if (answered + 1).is_multiple_of(DECAY_EVERY) {
            for count in &self.buckets {
                let halved = count.load(Ordering::Relaxed) / 2;
                count.store(halved, Ordering::Relaxed);
            }
        }
    }

    /// How many calls were recorded.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }

    /// The typical time (the EWMA), once anything was recorded.
    pub fn typical(&self) -> Option<Duration> {
        (self.answered() > 0)
            .then(|| Duration::from_nanos(f64::from_bits(self.ewma.load(Ordering::Relaxed)) as u64))
    }

    /// The recent 95th percentile, to within a bucket (25%), once anything was recorded.
    pub fn p95(&self) -> Option<Duration> {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|c| u64::from(c.load(Ordering::Relaxed)))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        // The first bucket past which more than 95% of the weight lies: of 100 calls, the 96th.
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen * 100 > total * 95 {
                return Some(upper(i));
            }
        }
        Some(upper(BUCKETS - 1))
    }
}

/// Something kept per method (each method's [`MethodStats`] by default), by gRPC path, for at
/// most [`MAX_METHODS`] paths.
#[derive(Debug)]
pub struct MethodTable<T = MethodStats>(RwLock<HashMap<String, Arc<T>>>);

impl<T> Default for MethodTable<T> {
    fn default() -> Self {
        Self(RwLock::default())
    }
}

impl<T: Default> MethodTable<T> {
    /// The entry of `path`, made on first use; `None` once the table is full (a flood of
    /// made-up paths then costs nothing).
    pub fn of(&self, path: &str) -> Option<Arc<T>> {
        self.of_with(path, T::default)
    }
}

impl<T> MethodTable<T> {
    /// The entry of `path`, made by `make` on first use; `None` once the table is full.
    pub fn of_with(&self, path: &str, make: impl FnOnce() -> T) -> Option<Arc<T>> {
        if let Some(entry) = self.read().get(path) {
            return Some(entry.clone());
        }
        let mut table = self.0.write().unwrap_or_else(|e| e.into_inner());
        if table.len() >= MAX_METHODS && !table.contains_key(path) {
            return None;
        }
        Some(
            table
                .entry(path.to_owned())
                .or_insert_with(|| Arc::new(make()))
                .clone(),
        )
    }

    /// The entry of `path`, if it has one.
    pub fn get(&self, path: &str) -> Option<Arc<T>> {
        self.read().get(path).cloned()
    }

    /// The table to read; a writer that panicked left it whole (entries are only inserted).
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<T>>> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_p95_is_within_a_bucket_of_the_true_one_and_follows_a_change() {
        let stats = MethodStats::default();
        assert_eq!((stats.p95(), stats.typical()), (None, None));
        for n in 1..=100 {
            stats.record(ms(n));
        }
        let p95 = stats.p95().unwrap();
        assert!(p95 >= ms(96) && p95 <= ms(96).mul_f64(1.25), "{p95:?}");
        // The method became fast: after a few halvings, its old times no longer count.
        for _ in 0..DECAY_EVERY * 6 {
            stats.record(ms(2));
        }
        let p95 = stats.p95().unwrap();
        assert!(p95 >= ms(2) && p95 <= ms(2).mul_f64(1.25), "{p95:?}");
        let typical = stats.typical().unwrap();
        assert!(
            typical.abs_diff(ms(2)) < Duration::from_micros(10),
            "{typical:?}"
        );
    }

    /// Rare slow calls spread over many buckets keep their share through the halvings: a
    /// tenth of the calls slow keeps the p95 among them.
    #[test]
    fn rare_slow_calls_spread_thin_still_count() {
        let stats = MethodStats::default();
        for round in 0..10 {
            for _ in 0..90 {
                stats.record(ms(10));
            }
            for slow in 0..10 {
                stats.record(ms(50 + 50 * slow + round));
            }
        }
        let p95 = stats.p95().unwrap();
        assert!(p95 >= ms(50), "the p95 is a slow call's: {p95:?}");
    }

    #[test]
    fn the_table_holds_at_most_its_bound_of_methods() {
        let table: MethodTable = MethodTable::default();
        for i in 0..MAX_METHODS {
            assert!(table.of(&format!("/s/M{i}")).is_some());
        }
        assert!(table.of("/s/one-too-many").is_none());
        assert!(table.of("/s/M0").is_some(), "known methods are still kept");
        assert!(table.get("/s/one-too-many").is_none());
    }
}
