//! A channel's boot pool: the plugin calls of the channel's boots (enabled? configured? start) run
//! on a few threads of the blocking pool, which take queued boots in *batches* and hand each batch
//! to one call (the supervisor's runner, which calls [`Plugin::boot_accounts`] once per batch),
//! instead of one blocking task per boot.
//!
//! The startup fan-out (`startup_accounts_per_channel`, n) bounds the *accounts* booting at once, a
//! batch of k counting as k: a boot is booting from the moment a thread takes it until its batch's
//! call has returned. A thread takes at most the free slots, and no more than its share of the
//! queue (a queue of at most n boots goes out one boot per thread, so one slow start holds up no
//! other account). A long queue goes out in batches that split the fan-out over as many threads
//! as the machine has cores (at most n): on two cores, two threads boot batches of n/2 side by
//! side, so the chain of boots a start-all or a crash storm queues runs on both cores instead of
//! one. More threads than cores only take turns on them. A boot still waiting in the queue can be
//! withdrawn (a stop) without any plugin call.
//!
//! A thread leaves as soon as it has nothing to take, so an idle channel holds no thread (and a
//! paused test clock, which stands still while a blocking call runs, moves again).
//!
//! [`Plugin::boot_accounts`]: crate::plugin::Plugin::boot_accounts

use std::{
    collections::VecDeque,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{Arc, Mutex},
};

/// The most queue slots an empty queue keeps (more are freed once it has drained).
const IDLE_QUEUE_CAPACITY: usize = 64;

/// A boot the pool can run: it carries the mark that says who has it (a thread of the pool, or
/// the submitter that withdrew it). Whoever sets the mark first owns the boot. The mark lives
/// where the submitter can reach it (a lifecycle's shared cell, which has one boot queued at a
/// time), so a boot allocates no mark of its own.
pub(super) trait Claim {
    /// Sets the mark; returns whether this call set it (then the caller owns the boot).
    fn claim(&self) -> bool;
}

struct Queue<J> {
    waiting: VecDeque<J>,
    /// Threads of the pool alive.
    threads: usize,
    /// Threads inside a batch's call.
    busy: usize,
    /// Accounts inside a batch's call (the sum of the batches' sizes).
    booting: usize,
}

impl<J> Queue<J> {
    /// Whether a new thread should come: boots wait, a slot is free, and no thread is idle to take
    /// them.
    fn wants_thread(&self, max: usize) -> bool {
        !self.waiting.is_empty()
            && self.booting < max
            && self.threads == self.busy
            && self.threads < max
    }
}

/// Runs one batch of boots (all of one channel) with one call into the plugin.
pub(super) type Runner<J> = Arc<dyn Fn(Vec<J>) + Send + Sync>;

/// The boot pool of one channel.
pub(super) struct BootPool<J: Send + 'static> {
    queue: Arc<Mutex<Queue<J>>>,
    limits: Limits,
    run: Runner<J>,
}

/// How many accounts a pool boots at once, and the largest batch one thread takes.
#[derive(Debug, Clone, Copy)]
struct Limits {
    max: usize,
    batch: usize,
}

impl<J: Claim + Send + 'static> BootPool<J> {
    /// A pool with at most `max` accounts booting at once (at least one), whose batches `run`
    /// boots, on as many threads side by side as the machine has cores.
    pub(super) fn new(max: usize, run: Runner<J>) -> Self {
        Self::with_lanes(max, super::cores().unwrap_or(1), run)
    }

    /// [`new`](Self::new) with a long queue split over `lanes` threads (batches of
    /// `max / lanes`, rounded up).
    fn with_lanes(max: usize, lanes: usize, run: Runner<J>) -> Self {
        let max = max.max(1);
        Self {
            queue: Arc::new(Mutex::new(Queue {
                waiting: VecDeque::new(),
                threads: 0,
                busy: 0,
                booting: 0,
            })),
            limits: Limits {
                max,
                batch: max.div_ceil(lanes.clamp(1, max)),
            },
            run,
        }
    }

    /// Queues `job`, whose mark must be clear; a thread of the pool runs it (in a batch) unless
    /// the submitter claims the mark first (withdrawing it: then its calls are never made).
    pub(super) fn submit(&self, job: J) {
        let spawn = {
            let mut queue = lock(&self.queue);
            queue.waiting.push_back(job);
            let spawn = queue.wants_thread(self.limits.max);
            if spawn {
                queue.threads += 1;
            }
            spawn
        };
        if spawn {
            spawn_drain(self.queue.clone(), self.limits, self.run.clone());
        }
    }
}

/// Starts a thread of the pool (counted in `threads` already by the caller, under the lock).
fn spawn_drain<J: Claim + Send + 'static>(
    queue: Arc<Mutex<Queue<J>>>,
    limits: Limits,
    run: Runner<J>,
) {
    tokio::task::spawn_blocking(move || drain(&queue, limits, run));
}

fn lock<J>(queue: &Mutex<Queue<J>>) -> std::sync::MutexGuard<'_, Queue<J>> {
    // Batches run outside the lock: a poisoned lock only means a panic between two plain updates.
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

/// One thread of the pool: takes batches of queued boots until it has nothing to take.
fn drain<J: Claim + Send + 'static>(queue: &Arc<Mutex<Queue<J>>>, limits: Limits, run: Runner<J>) {
    let Limits {
        max,
        batch: largest,
    } = limits;
    loop {
        let (batch, spawn) = {
            let mut q = lock(queue);
            let free = max.saturating_sub(q.booting);
            // Its share: a short queue goes out one boot per thread, a long one in batches of
            // its lane's share of the fan-out.
            let size = free.min(q.waiting.len().div_ceil(max)).min(largest);
            let mut batch = Vec::with_capacity(size);
            while batch.len() < size {
                let Some(job) = q.waiting.pop_front() else {
                    break;
                };
                // A claimed one was withdrawn by a stop while it waited.
                if job.claim() {
                    batch.push(job);
                }
            }
            if q.waiting.is_empty() && q.waiting.capacity() > IDLE_QUEUE_CAPACITY {
                // A start-all's queue held every account of the channel once: its buffer is not
                // kept for the life of the channel.
                q.waiting = VecDeque::new();
            }
            if batch.is_empty() {
                q.threads -= 1;
                return;
            }
            q.booting += batch.len();
            q.busy += 1;
            // Boots left and a slot free: another thread takes them beside this batch.
            let spawn = q.wants_thread(max);
            if spawn {
                q.threads += 1;
            }
            (batch, spawn)
        };
        if spawn {
            spawn_drain(queue.clone(), limits, run.clone());
        }
        let size = batch.len();
        let began = std::time::Instant::now();
        // A panic in the call drops the batch's reply channels (their lifecycles see the boot
        // fail); the thread goes on with the queue.
        let _ = catch_unwind(AssertUnwindSafe(|| run(batch)));
        crate::metrics::observe_plugin_call(began.elapsed());
        let mut q = lock(queue);
        q.booting -= size;
        q.busy -= 1;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        panic::{AssertUnwindSafe, catch_unwind},
        sync::{
            Arc, Condvar, Mutex,
            atomic::{AtomicBool, AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::{BootPool, Claim};

    /// A gate boots wait at until it opens; it opens when dropped too, so a failing assertion
    /// does not leave the pool's threads (and the runtime's shutdown) waiting for good.
    struct Gate(Arc<(Mutex<bool>, Condvar)>);

    impl Gate {
        fn open(&self) {
            *self.0.0.lock().unwrap_or_else(|p| p.into_inner()) = true;
            self.0.1.notify_all();
        }
    }

    impl Drop for Gate {
        fn drop(&mut self) {
            self.open();
        }
    }

    /// Waits (really: the pool's threads are real) until `done` holds, for at most 30 s.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let limit = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            assert!(
                tokio::time::Instant::now() < limit,
                "{what}: not after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// A test boot: its mark (shared with the test, which withdraws through it) and its work.
    struct Job {
        mark: Arc<AtomicBool>,
        run: Box<dyn FnOnce() + Send>,
    }

    impl Job {
        fn new(run: impl FnOnce() + Send + 'static) -> Self {
            Self {
                mark: Arc::default(),
                run: Box::new(run),
            }
        }
    }

    impl Claim for Job {
        fn claim(&self) -> bool {
            !self.mark.swap(true, Ordering::AcqRel)
        }
    }

    /// The pool has at most its size of boots in its batches' calls at once (a batch of k counts
    /// k), runs every queued one, skips a withdrawn one, goes on past a panicking one, and keeps
    /// no thread once its queue is empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_its_size_booting_at_once_withdrawn_never_run_and_a_panic_does_not_stop_it() {
        // Accounts inside a batch's call, and the most ever.
        let booting = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        // One lane: a thread may take both slots (what this test looks at is the slots).
        let pool = BootPool::<Job>::with_lanes(2, 1, {
            let (booting, most) = (booting.clone(), most.clone());
            Arc::new(move |batch: Vec<Job>| {
                let now = booting.fetch_add(batch.len(), Ordering::SeqCst) + batch.len();
                most.fetch_max(now, Ordering::SeqCst);
                let size = batch.len();
                for job in batch {
                    let _ = catch_unwind(AssertUnwindSafe(job.run));
                }
                booting.fetch_sub(size, Ordering::SeqCst);
            })
        });
        let ran = Arc::new(Mutex::new(Vec::new()));
        // Closed until the test opens it: a boot inside holds its thread (and its batch).
        let gate = Gate(Arc::new((Mutex::new(false), Condvar::new())));
        let mut marks = Vec::new();
        for i in 0..6 {
            let (ran, gate) = (ran.clone(), gate.0.clone());
            let job = Job::new(move || {
                let (open, opened) = &*gate;
                let open = open.lock().unwrap_or_else(|p| p.into_inner());
                drop(opened.wait_while(open, |open| !*open));
                ran.lock().unwrap().push(i);
                assert_ne!(i, 3, "boot 3 panics");
            });
            marks.push(job.mark.clone());
            pool.submit(job);
        }
        // Withdrawing is claiming the mark first, as a lifecycle's stop does.
        let withdraw = |i: usize| !marks[i].swap(true, Ordering::AcqRel);
        until("two boots booting", || booting.load(Ordering::SeqCst) == 2).await;
        // Both slots are held: the last boot still waits in the queue and is withdrawn.
        assert!(withdraw(5), "boot 5 was still queued");
        gate.open();
        until("every boot but the withdrawn one ran", || {
            ran.lock().unwrap().len() == 5
        })
        .await;
        until("the pool's threads left", || {
            pool.queue.lock().unwrap().threads == 0
        })
        .await;
        let mut ran = ran.lock().unwrap().clone();
        ran.sort();
        assert_eq!(ran, [0, 1, 2, 3, 4]);
        assert_eq!(most.load(Ordering::SeqCst), 2);
        // A boot that a thread took cannot be withdrawn any more.
        assert!(!withdraw(0));
        // An empty pool starts a thread again for the next boot.
        let again = Arc::new(AtomicUsize::new(0));
        let counted = again.clone();
        pool.submit(Job::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        until("the next boot ran", || again.load(Ordering::SeqCst) == 1).await;
    }

    /// Twelve boots queued before any thread looks (as when start-all queues a channel's accounts
    /// faster than the pool takes them), then one more, which starts the pool; returns how many
    /// ran, once every one has.
    async fn a_long_queue(pool: &BootPool<Job>) -> usize {
        let ran = Arc::new(AtomicUsize::new(0));
        {
            let mut queue = pool.queue.lock().unwrap();
            for _ in 0..12 {
                let ran = ran.clone();
                queue.waiting.push_back(Job::new(move || {
                    ran.fetch_add(1, Ordering::SeqCst);
                }));
            }
        }
        let last = ran.clone();
        pool.submit(Job::new(move || {
            last.fetch_add(1, Ordering::SeqCst);
        }));
        until("every boot ran", || ran.load(Ordering::SeqCst) == 13).await;
        ran.load(Ordering::SeqCst)
    }

    /// With one lane, a long queue goes out in batches of the pool's size, and every boot in it
    /// runs once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_queue_goes_out_in_batches_of_the_fan_out() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let pool = BootPool::<Job>::with_lanes(4, 1, {
            let sizes = sizes.clone();
            Arc::new(move |batch: Vec<Job>| {
                sizes.lock().unwrap().push(batch.len());
                for job in batch {
                    (job.run)();
                }
            })
        });
        assert_eq!(a_long_queue(&pool).await, 13);
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 13, "{sizes:?}");
        assert_eq!(sizes[0], 4, "{sizes:?}");
        assert!(sizes.iter().all(|size| *size <= 4), "{sizes:?}");
    }

    /// Split over two lanes (a two-core machine), a long queue goes out in batches of half the
    /// fan-out, two of them in their calls at once, and every boot in it runs once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_queue_over_two_lanes_boots_two_batches_side_by_side() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let (in_call, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let pool = BootPool::<Job>::with_lanes(4, 2, {
            let (sizes, in_call, most) = (sizes.clone(), in_call.clone(), most.clone());
            Arc::new(move |batch: Vec<Job>| {
                sizes.lock().unwrap().push(batch.len());
                let now = in_call.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                // Each batch holds its thread until a second batch is in its call too (or 10 s
                // have passed: with one thread only, `most` stays 1 and the test fails).
                let limit = std::time::Instant::now() + Duration::from_secs(10);
                while most.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < limit {
                    std::thread::sleep(Duration::from_millis(1));
                }
                for job in batch {
                    (job.run)();
                }
                in_call.fetch_sub(1, Ordering::SeqCst);
            })
        });
        assert_eq!(a_long_queue(&pool).await, 13);
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 13, "{sizes:?}");
        assert_eq!(sizes[0], 2, "{sizes:?}");
        assert!(sizes.iter().all(|size| *size <= 2), "{sizes:?}");
        assert_eq!(
            most.load(Ordering::SeqCst),
            2,
            "two batches were in their calls at once"
        );
    }
}
