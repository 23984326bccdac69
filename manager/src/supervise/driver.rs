//! Lifecycle drivers: the accounts' lifecycles run as futures inside a few driver tasks, not as a
//! tokio task each.
//!
//! A lifecycle is woken from other threads most of the time: its boot's reply comes from a thread
//! of the channel's boot pool, its task's first poll and its end from the plugin's runtime. A
//! tokio task woken from outside the runtime goes through the runtime's shared queue and often a
//! futex wake-up of a worker, once per wake. A driver holds its lifecycles in one
//! [`FuturesUnordered`]: a wake of a lifecycle is a lock-free push onto the driver's ready queue,
//! and the driver task itself is woken once for however many of its lifecycles became ready
//! meanwhile (a boot batch's replies, a stop's task ends). A lifecycle's state is unchanged: the
//! same future, polled by its driver instead of by the runtime.
//!
//! There are a few drivers ([`Drivers::new`]'s count, one per core), so the workers share the
//! polling; a lifecycle goes to one by its id. A driver task exists only while it has lifecycles:
//! it is spawned by the submit that finds it idle, and it ends when its last lifecycle has ended
//! and nothing waits in its inbox. Each driver is tracked (by the supervisor's task tracker), so
//! shutdown's wait for the tracker is a wait for every lifecycle.
//!
//! A driver runs outside tokio's cooperative budget (`unconstrained`): the budget is per task, so
//! under it a driver would hand back its worker after about a hundred of its lifecycles' waits,
//! re-polling the rest in vain first (the crash storm of `scripts/bench S2` took 1.5× as long).
//! It still yields: it polls each ready lifecycle at most once before it returns to the runtime
//! (the set of lifecycles yields after a pass over the ready ones), and it returns after
//! [`ENDS_PER_PASS`] lifecycles have ended.
//!
//! A lifecycle that panics is fenced: its future is dropped while the panic unwinds (its `Drop`
//! sees the panic and records it, as under a tokio task), and the driver goes on with the others.

use std::{
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use futures_util::{StreamExt, stream::FuturesUnordered, task::AtomicWaker};
use tokio_util::task::TaskTracker;

use super::lifecycle::Lifecycle;

/// The supervisor's lifecycle drivers.
pub(super) struct Drivers {
    shards: Box<[Arc<Shard>]>,
}

/// One driver: its inbox of lifecycles not yet picked up, and its task's waker.
struct Shard {
    inbox: Mutex<Inbox>,
    /// Something waits in the inbox (checked without the lock on every pass of the driver).
    posted: AtomicBool,
    waker: AtomicWaker,
}

#[derive(Default)]
struct Inbox {
    waiting: Vec<Lifecycle>,
    /// The driver's task is alive (it picks up what is posted); otherwise a submit spawns it.
    running: bool,
}

impl Drivers {
    /// `count` drivers (at least one).
    pub(super) fn new(count: usize) -> Self {
        Self {
            shards: (0..count.max(1))
                .map(|_| {
                    Arc::new(Shard {
                        inbox: Mutex::new(Inbox::default()),
                        posted: AtomicBool::new(false),
                        waker: AtomicWaker::new(),
                    })
                })
                .collect(),
        }
    }

    /// One driver per worker the machine can run at once.
    pub(super) fn per_core() -> Self {
        Self::new(super::cores().map_or(2, |n| n.min(16)))
    }

    /// Runs each of `lifecycles` (which it empties) on its driver (by its id), spawning the
    /// driver's task (tracked by `tracker`) if it is idle: one lock of each driver's inbox and
    /// one wake-up of each driver for all of them. Must be called inside the runtime, as
    /// `tokio::spawn` is.
    pub(super) fn submit_all(&self, lifecycles: &mut Vec<Lifecycle>, tracker: &TaskTracker) {
        for (index, shard) in self.shards.iter().enumerate() {
            let wake = {
                let mut inbox = shard.lock();
                let before = inbox.waiting.len();
                inbox
                    .waiting
                    .extend(lifecycles.extract_if(.., |lc| self.shard_of(lc) == index));
                (inbox.waiting.len() > before).then(|| shard.posted(&mut inbox))
            };
            if let Some(wake) = wake {
                shard.wake(wake, tracker);
            }
        }
    }

    fn shard_of(&self, lifecycle: &Lifecycle) -> usize {
        (lifecycle.id % self.shards.len() as u64) as usize
    }
}

/// How a driver learns of lifecycles posted to its inbox.
enum Wake {
    /// Its task is alive: a wake-up.
    Running,
    /// It is idle: its task is spawned.
    Spawn,
}

impl Shard {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        // Plain fields: a poisoned lock only means a panic between two plain updates.
        self.inbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the inbox posted (under its lock); says how to tell the driver.
    fn posted(&self, inbox: &mut Inbox) -> Wake {
        self.posted.store(true, Ordering::Release);
        if std::mem::replace(&mut inbox.running, true) {
            Wake::Running
        } else {
            Wake::Spawn
        }
    }

    /// Tells the driver (after the inbox's lock is released).
    fn wake(self: &Arc<Self>, wake: Wake, tracker: &TaskTracker) {
        match wake {
            // Unconstrained: see the module's docs.
            Wake::Spawn => {
                tracker.spawn(tokio::task::unconstrained(drive(self.clone())));
            }
            Wake::Running => self.waker.wake(),
        }
    }
}

/// The most lifecycles a driver sees end before it yields to the runtime.
const ENDS_PER_PASS: usize = 256;

/// A driver's task: polls its lifecycles until none is left and none is posted.
///
/// # Cancellation safety
///
/// Dropping it (the runtime shutting down) drops its lifecycles, as dropping their tasks would.
async fn drive(shard: Arc<Shard>) {
    let mut lifecycles = FuturesUnordered::new();
    std::future::poll_fn(move |cx| {
        // Registered before the inbox is read, so a post after a read wakes this task.
        shard.waker.register(cx.waker());
        let mut ended = 0;
        loop {
            if shard.posted.swap(false, Ordering::AcqRel) || lifecycles.is_empty() {
                let mut inbox = shard.lock();
                // Taken whole: a start-all's inbox held a channel's accounts once, and its buffer
                // is not kept.
                let posted = std::mem::take(&mut inbox.waiting);
                lifecycles.extend(posted.into_iter().map(|lc| Fence::new(lc.run())));
                if lifecycles.is_empty() {
                    // Under the lock: a submit after this spawns a new driver.
                    inbox.running = false;
                    return Poll::Ready(());
                }
            }
            match lifecycles.poll_next_unpin(cx) {
                Poll::Ready(Some(())) => {
                    ended += 1;
                    if ended == ENDS_PER_PASS {
                        // Many ending at once (a stop of many accounts): the worker is handed
                        // back now and then.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                // The set ran empty: look at the inbox again.
                Poll::Ready(None) => {}
                // Nothing ready, or the set yielded after a share of polls (it has woken this
                // task again itself).
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await;
}

pin_project_lite::pin_project! {
    /// A lifecycle's future, fenced against its panics: a panic drops the future while it unwinds
    /// (as a tokio task's harness does, so the lifecycle's `Drop` sees it) and ends it.
    struct Fence<F> {
        #[pin]
        future: Option<F>,
    }
}

impl<F> Fence<F> {
    fn new(future: F) -> Self {
        Self {
            future: Some(future),
        }
    }
}

/// Drops the future it holds if dropped itself, which happens only while a panic unwinds (a
/// normal return forgets it).
struct DropOnUnwind<'a, F>(Pin<&'a mut Option<F>>);

impl<F> Drop for DropOnUnwind<'_, F> {
    fn drop(&mut self) {
        self.0.set(None);
    }
}

impl<F: Future<Output = ()>> Future for Fence<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut future = self.project().future;
        if future.is_none() {
            return Poll::Ready(());
        }
        let polled = catch_unwind(AssertUnwindSafe(|| {
            let mut guard = DropOnUnwind(future.as_mut());
            let poll = match guard.0.as_mut().as_pin_mut() {
                Some(running) => running.poll(cx),
                None => Poll::Ready(()),
            };
            std::mem::forget(guard);
            poll
        }));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => {
                future.set(None);
                Poll::Ready(())
            }
            // The future was dropped while the panic unwound (the panic hook has reported it).
            Err(_) => Poll::Ready(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        pin::pin,
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };

    use super::Fence;

    /// Records whether it was dropped while a panic unwound.
    struct SeesPanic(Arc<AtomicBool>);

    impl Drop for SeesPanic {
        fn drop(&mut self) {
            self.0.store(std::thread::panicking(), Ordering::SeqCst);
        }
    }

    /// A fenced future that panics ends (the poll returns), and its state is dropped while the
    /// panic unwinds, so a `Drop` there can tell a panic from an ordinary end.
    #[tokio::test]
    async fn a_panicking_future_ends_and_its_state_sees_the_panic() {
        let saw = Arc::new(AtomicBool::new(false));
        let held = SeesPanic(saw.clone());
        let fenced = Fence::new(async move {
            let _held = held;
            tokio::task::yield_now().await;
            panic!("a lifecycle bug");
        });
        pin!(fenced).await;
        assert!(saw.load(Ordering::SeqCst), "dropped outside the unwind");
        // An ordinary end drops its state outside any panic.
        let calm = Arc::new(AtomicBool::new(true));
        let held = SeesPanic(calm.clone());
        pin!(Fence::new(async move {
            let _held = held;
        }))
        .await;
        assert!(!calm.load(Ordering::SeqCst));
    }
}
