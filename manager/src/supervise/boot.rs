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
