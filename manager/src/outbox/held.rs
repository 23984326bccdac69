//! Bridged copies the outbox refused for a transient reason, held for a retry (`gateway.rs`).
//!
//! Each held copy is keyed by its idempotency key (`gateway:<gateway>:<target>:<journal seq>`),
//! so routing the same journal message again holds it once. A copy refused for the `n`-th time
//! is due again after [`OutboxConfig::backoff`]`(n)` (`[outbox] retry_initial`, doubling, at most
//! `retry_max`). While a copy is held, or being retried, the bridging mark stays below its
//! journal message ([`RetryQueue::oldest_seq`]): a restart routes it again.
//!
//! At most [`MAX_HELD`] copies are held in memory. A refused copy beyond that is not held, but the
//! mark never passes its journal message until the next start routes it again
//! ([`RetryQueue::overflow`]).
//!
//! Pure bookkeeping on the tokio clock (paused in its tests); the retrying is `gateway.rs`'s.

use std::collections::{BTreeMap, HashMap};

use tokio::time::Instant;

use super::{NewMessage, OutboxConfig};

/// The most copies held in memory at once.
pub const MAX_HELD: usize = 10_000;

/// One held copy.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// The journal message it is a copy of.
    pub seq: u64,
    /// Its gateway.
    pub gateway: String,
    /// Its target member (`channel:account/conversation`).
    pub target: String,
    /// The copy, as first routed (its idempotency key included).
    pub message: NewMessage,
    /// How many times the outbox refused it.
    pub refusals: u32,
    /// The last refusal.
    pub why: String,
}

/// What [`RetryQueue::hold`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hold {
    /// Held, due at this instant.
    Held(Instant),
    /// The same copy was held already.
    Already,
    /// [`MAX_HELD`] reached: not held; the mark stays below it until the next start.
    Overflow,
}

#[derive(Debug)]
struct Entry {
    held: Held,
    /// When it is due; `None` while a retry of it is under way.
    due: Option<Instant>,
}

/// The held copies.
#[derive(Debug, Default)]
pub(crate) struct RetryQueue {
    copies: HashMap<String, Entry>,
    /// How many copies of each journal message are held (for the mark).
    seqs: BTreeMap<u64, usize>,
    /// The lowest journal message a copy of which was refused and not held ([`MAX_HELD`]).
    overflow: Option<u64>,
}

fn key(held: &Held) -> String {
    held.message.idempotency_key.clone().unwrap_or_default()
}

impl RetryQueue {
    /// Holds `held` (refused `held.refusals` times), due after its backoff from `now`.
    pub fn hold(&mut self, held: Held, now: Instant, settings: &OutboxConfig) -> Hold {
        let key = key(&held);
        if self.copies.contains_key(&key) {
            return Hold::Already;
        }
        if self.copies.len() >= MAX_HELD {
            self.overflow = Some(self.overflow.map_or(held.seq, |s| s.min(held.seq)));
            return Hold::Overflow;
        }
        let due = now + settings.backoff(held.refusals);
        *self.seqs.entry(held.seq).or_default() += 1;
        self.copies.insert(
            key,
            Entry {
                held,
                due: Some(due),
            },
        );
        Hold::Held(due)
    }

    /// The copies due at `now`, marked as being retried (they stay held, and keep the mark
    /// below them, until [`RetryQueue::release`] or [`RetryQueue::refused_again`]).
    pub fn take_due(&mut self, now: Instant) -> Vec<Held> {
        let mut due: Vec<Held> = Vec::new();
        for entry in self.copies.values_mut() {
            if entry.due.is_some_and(|d| d <= now) {
                entry.due = None;
                due.push(entry.held.clone());
            }
        }
        due.sort_by_key(|h| h.seq);
        due
    }

    /// The copy keyed `key` was refused again (`why`): due after the next backoff from `now`.
    /// Its refusals so far, or `None` if it is not held.
    pub fn refused_again(
        &mut self,
        key: &str,
        why: String,
        now: Instant,
        settings: &OutboxConfig,
    ) -> Option<u32> {
        let entry = self.copies.get_mut(key)?;
        entry.held.refusals += 1;
        entry.held.why = why;
        entry.due = Some(now + settings.backoff(entry.held.refusals));
        Some(entry.held.refusals)
    }

    /// Lets the copy keyed `key` go (bridged, or refused for good).
    pub fn release(&mut self, key: &str) -> Option<Held> {
        let entry = self.copies.remove(key)?;
        let seq = entry.held.seq;
        if let Some(n) = self.seqs.get_mut(&seq) {
            *n -= 1;
            if *n == 0 {
                self.seqs.remove(&seq);
            }
        }
        Some(entry.held)
    }

    /// The next instant a copy is due, if any is waiting.
    pub fn next_due(&self) -> Option<Instant> {
        self.copies.values().filter_map(|e| e.due).min()
    }

    /// The oldest journal message the mark must stay below: a held copy's, or one refused and
    /// not held.
    pub fn oldest_seq(&self) -> Option<u64> {
        let held = self.seqs.keys().next().copied();
        match (held, self.overflow) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The lowest journal message a copy of which was not held ([`MAX_HELD`]).
    #[cfg(test)]
    pub fn overflow(&self) -> Option<u64> {
        self.overflow
    }

    /// How many copies are held.
    pub fn len(&self) -> usize {
        self.copies.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn copy(seq: u64, target: &str) -> Held {
        Held {
            seq,
            gateway: "g".into(),
            target: target.into(),
            message: NewMessage {
                idempotency_key: Some(format!("gateway:g:{target}:{seq}")),
                ..NewMessage::default()
            },
            refusals: 1,
            why: "outbox full".into(),
        }
    }

    fn settings() -> OutboxConfig {
        OutboxConfig {
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(4),
            ..OutboxConfig::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_copy_is_due_after_a_doubling_backoff_up_to_its_cap() {
        let settings = settings();
        let mut queue = RetryQueue::default();
        let start = Instant::now();
        let key = "gateway:g:x:a/r:7";
        assert_eq!(
            queue.hold(copy(7, "x:a/r"), start, &settings),
            Hold::Held(start + Duration::from_secs(1))
        );
        let mut waits = Vec::new();
        for _ in 0..5 {
            let due = queue.next_due().unwrap();
            // Not a moment early.
            tokio::time::sleep_until(due - Duration::from_millis(1)).await;
            assert!(queue.take_due(Instant::now()).is_empty());
            tokio::time::sleep_until(due).await;
            let taken = queue.take_due(Instant::now());
            assert_eq!(taken.len(), 1);
            // Being retried: not due again, and still held.
            assert_eq!(queue.next_due(), None);
            assert_eq!(queue.oldest_seq(), Some(7));
            let before = Instant::now();
            queue.refused_again(key, "still full".into(), before, &settings);
            waits.push((queue.next_due().unwrap() - before).as_secs());
        }
        // Refused 2, 3, 4, 5, 6 times: 2 s, 4 s, then the 4 s cap.
        assert_eq!(waits, [2, 4, 4, 4, 4]);
        assert_eq!(start.elapsed(), Duration::from_secs(1 + 2 + 4 + 4 + 4));
        let released = queue.release(key).unwrap();
        assert_eq!(
            (released.refusals, released.why.as_str()),
            (6, "still full")
        );
        assert_eq!(
            (queue.len(), queue.next_due(), queue.oldest_seq()),
            (0, None, None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_mark_stays_below_the_oldest_copy_held_and_a_copy_is_held_once() {
        let settings = settings();
        let mut queue = RetryQueue::default();
        let now = Instant::now();
        assert!(matches!(
            queue.hold(copy(9, "x:a/r"), now, &settings),
            Hold::Held(_)
        ));
        assert!(matches!(
            queue.hold(copy(5, "x:a/r"), now, &settings),
            Hold::Held(_)
        ));
        assert!(matches!(
            queue.hold(copy(5, "x:b/r"), now, &settings),
            Hold::Held(_)
        ));
        assert_eq!(queue.hold(copy(5, "x:b/r"), now, &settings), Hold::Already);
        assert_eq!(queue.oldest_seq(), Some(5));
        queue.release("gateway:g:x:a/r:5");
        assert_eq!(queue.oldest_seq(), Some(5), "another copy of 5 is held");
        queue.release("gateway:g:x:b/r:5");
        assert_eq!(queue.oldest_seq(), Some(9));
        assert!(queue.release("gateway:g:x:b/r:5").is_none());
        // Past the cap, a copy is not held but still keeps the mark below it.
        for seq in 100..(100 + MAX_HELD as u64 - 1) {
            queue.hold(copy(seq, "x:a/r"), now, &settings);
        }
        assert_eq!(queue.len(), MAX_HELD);
        assert_eq!(queue.hold(copy(3, "x:a/r"), now, &settings), Hold::Overflow);
        assert_eq!((queue.oldest_seq(), queue.overflow()), (Some(3), Some(3)));
        assert_eq!(queue.len(), MAX_HELD);
    }
}
