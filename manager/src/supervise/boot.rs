//! A channel's boot pool: the plugin calls of every boot of the channel (enabled? configured?
//! start) run on at most `startup_accounts_per_channel` threads of the blocking pool, each taking
//! one queued boot after the other, instead of one blocking task per boot. The pool's size *is*
//! the channel's startup fan-out: a boot is booting from the moment a thread takes it until the
//! plugin's start has returned, so at most that many are in flight, and a boot still waiting in the
//! queue can be withdrawn (a stop) without any plugin call.
//!
//! A thread leaves as soon as the queue is empty, so an idle channel holds no thread (and a paused
//! test clock, which stands still while a blocking call runs, moves again).

use std::{
    collections::VecDeque,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

/// One queued boot: its calls, and the mark that says who has it (a thread of the pool, or the
/// lifecycle that withdrew it). Whoever sets the mark first owns the boot.
struct Job {
    claimed: Arc<AtomicBool>,
    run: Box<dyn FnOnce() + Send>,
}

struct Queue {
    waiting: VecDeque<Job>,
    threads: usize,
}

/// The boot pool of one channel.
pub(super) struct BootPool {
    queue: Arc<Mutex<Queue>>,
    max_threads: usize,
}

/// A queued boot, as the lifecycle that submitted it holds it.
pub(super) struct Ticket {
    claimed: Arc<AtomicBool>,
}

impl Ticket {
    /// Withdraws the boot if no thread has taken it yet; returns whether it did (then its calls
    /// are never made).
    pub(super) fn withdraw(&self) -> bool {
        !self.claimed.swap(true, Ordering::AcqRel)
    }
}

impl BootPool {
    /// A pool of at most `max_threads` threads (at least one).
    pub(super) fn new(max_threads: usize) -> Self {
        Self {
            queue: Arc::new(Mutex::new(Queue {
                waiting: VecDeque::new(),
                threads: 0,
            })),
            max_threads: max_threads.max(1),
        }
    }

    /// Queues `run` (the boot's plugin calls); a thread of the pool runs it unless the returned
    /// ticket withdraws it first.
    pub(super) fn submit(&self, run: impl FnOnce() + Send + 'static) -> Ticket {
        let claimed = Arc::new(AtomicBool::new(false));
        let spawn = {
            let mut queue = lock(&self.queue);
            queue.waiting.push_back(Job {
                claimed: claimed.clone(),
                run: Box::new(run),
            });
            let spawn = queue.threads < self.max_threads;
            if spawn {
                queue.threads += 1;
            }
            spawn
        };
        if spawn {
            let queue = self.queue.clone();
            tokio::task::spawn_blocking(move || drain(&queue));
        }
        Ticket { claimed }
    }
}

fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    // Jobs run outside the lock: a poisoned lock only means a panic between two plain updates.
    queue.lock().unwrap_or_else(|p| p.into_inner())
}

/// One thread of the pool: takes queued boots one by one until none is left.
fn drain(queue: &Mutex<Queue>) {
    loop {
        let job = {
            let mut queue = lock(queue);
            match queue.waiting.pop_front() {
                Some(job) => job,
                None => {
                    queue.threads -= 1;
                    return;
                }
            }
        };
        if job.claimed.swap(true, Ordering::AcqRel) {
            // Withdrawn by a stop while it waited.
            continue;
        }
        let began = std::time::Instant::now();
        // A panic in the calls drops the job's reply channel (its lifecycle sees the boot fail);
        // the thread goes on with the queue.
        let _ = catch_unwind(AssertUnwindSafe(job.run));
        crate::metrics::observe_plugin_call(began.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc, Condvar, Mutex,
            atomic::{AtomicUsize, Ordering},
        },
        time::Duration,
    };

    use super::BootPool;

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

    /// The pool runs at most its size of boots at once, runs every queued one, skips a withdrawn
    /// one, goes on past a panicking one, and keeps no thread once its queue is empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_its_size_at_once_withdrawn_never_run_and_a_panic_does_not_stop_it() {
        let pool = BootPool::new(2);
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let ran = Arc::new(Mutex::new(Vec::new()));
        // Closed until the test opens it: a boot inside holds its thread.
        let gate = Gate(Arc::new((Mutex::new(false), Condvar::new())));
        let mut tickets = Vec::new();
        for i in 0..6 {
            let (inside, most, ran, gate) =
                (inside.clone(), most.clone(), ran.clone(), gate.0.clone());
            tickets.push(pool.submit(move || {
                let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                let (open, opened) = &*gate;
                let open = open.lock().unwrap_or_else(|p| p.into_inner());
                drop(opened.wait_while(open, |open| !*open));
                inside.fetch_sub(1, Ordering::SeqCst);
                ran.lock().unwrap().push(i);
                assert_ne!(i, 3, "boot 3 panics");
            }));
        }
        until("two boots inside", || inside.load(Ordering::SeqCst) == 2).await;
        // The other four wait in the queue: the last one is withdrawn before any thread takes it.
        assert!(tickets[5].withdraw(), "boot 5 was still queued");
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
        assert!(!tickets[0].withdraw());
        // An empty pool starts a thread again for the next boot.
        let again = Arc::new(AtomicUsize::new(0));
        let counted = again.clone();
        pool.submit(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        });
        until("the next boot ran", || again.load(Ordering::SeqCst) == 1).await;
    }
}
