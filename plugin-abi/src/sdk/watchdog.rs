//! The runtime's starvation watch. The ABI has no entry for it (it is frozen), so the SDK watches
//! its own runtime and reports through an existing host service:
//!
//! * every future the SDK runs for an account (its task, the tasks it spawns, its stop and logout
//!   hooks, its sends) is [`Watched`] (the account task calls [`watch_poll`] itself, so as not
//!   to nest one more wrapper in its runtime task): while it is being polled, its thread's slot records since
//!   when and for which account, so a poll that never returns (the author's code blocks its
//!   thread) names its account. The slots are per thread, not per future: watching a future
//!   registers nothing and allocates nothing;
//! * a watchdog thread, outside the runtime, spawns a probe task on the runtime every tick. The
//!   probe does nothing but say it ran, so when it has waited past the threshold, no worker was
//!   free for that long: the runtime is starved. The watchdog then reports, through the
//!   plugin-wide handle's `log` with the target
//!   [`RUNTIME_REPORT_TARGET`](crate::abi::RUNTIME_REPORT_TARGET), the accounts whose futures
//!   were in a poll for the whole wait (they hold the threads), and reports again once the probe
//!   has run.

use std::{
    cell::Cell,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    task::{Context, Poll},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use pin_project_lite::pin_project;
use serde_json::{Value, json};
use tokio::runtime::Handle;

use super::Account;

/// Whose future a watched one is, for the report: an account task's account (shared with its
/// context, so watching it allocates nothing), or the account id a hook or send was called for.
#[derive(Clone, Debug)]
pub(crate) enum Owner {
    /// An account task, or a task it spawned.
    Account(Arc<Account>),
    /// A hook or send, by the account id the host named.
    Id(Arc<str>),
}

impl Owner {
    fn id(&self) -> &str {
        match self {
            Self::Account(account) => &account.id,
            Self::Id(id) => id,
        }
    }
}

impl From<&str> for Owner {
    fn from(id: &str) -> Self {
        Self::Id(id.into())
    }
}

/// What one thread is polling: the watchdog looks at threads, not futures (a future that blocks
/// in its poll holds its thread), so watching a future costs no registration of its own.
struct ThreadSlot {
    /// Milliseconds since [`BASE`] (plus one) when the thread's current watched poll began; 0
    /// outside one.
    since: AtomicU64,
    /// Whose poll that is (and since when, to tell it from a later poll): left in place after the
    /// poll, and read only while `since` says a poll is under way.
    current: Mutex<Option<(u64, Owner, &'static str)>>,
}

static BASE: OnceLock<Instant> = OnceLock::new();
/// Every thread that has polled a watched future (a thread that has exited no longer upgrades).
static THREADS: Mutex<Vec<Weak<ThreadSlot>>> = Mutex::new(Vec::new());

thread_local! {
    static SLOT: Arc<ThreadSlot> = register_thread();
    /// Whether this thread is inside a watched poll already (a nested one keeps the outer's).
    static IN_POLL: Cell<bool> = const { Cell::new(false) };
}

fn register_thread() -> Arc<ThreadSlot> {
    let slot = Arc::new(ThreadSlot {
        since: AtomicU64::new(0),
        current: Mutex::new(None),
    });
    let mut threads = THREADS.lock().unwrap_or_else(|p| p.into_inner());
    threads.retain(|t| t.strong_count() > 0);
    threads.push(Arc::downgrade(&slot));
    slot
}

fn now_ms() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

pin_project! {
    /// A future whose polls are visible to the watchdog.
    pub(crate) struct Watched<F> {
        #[pin]
        inner: F,
        owner: Owner,
        what: &'static str,
    }
}

/// Wraps `future` (run for `owner`, as `what`) so the watchdog sees its polls.
pub(crate) fn watched<F: Future>(owner: Owner, what: &'static str, future: F) -> Watched<F> {
    Watched {
        inner: future,
        owner,
        what,
    }
}

/// Marks the thread as out of its watched poll when the poll returns or unwinds.
struct PollGuard<'a>(&'a ThreadSlot);

impl Drop for PollGuard<'_> {
    fn drop(&mut self) {
        self.0.since.store(0, Ordering::Relaxed);
        let _ = IN_POLL.try_with(|p| p.set(false));
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let inner = this.inner;
        watch_poll(|| this.owner.clone(), this.what, || inner.poll(cx))
    }
}

/// Runs `poll` (one poll of a future run for `owner`, as `what`) so that the watchdog sees it,
/// as a [`Watched`] future's poll: for a future that cannot be wrapped in one.
pub(crate) fn watch_poll<R>(
    owner: impl FnOnce() -> Owner,
    what: &'static str,
    poll: impl FnOnce() -> R,
) -> R {
    let outer = IN_POLL.try_with(|p| !p.replace(true)).unwrap_or(false);
    if !outer {
        return poll();
    }
    // Taken by whichever of the two paths below runs it (the slot's, unless the thread's slot
    // is gone).
    let mut poll = Some(poll);
    let mut run = || (poll.take().expect("a watched poll runs once"))();
    let watched = SLOT.try_with(|slot| {
        let since = now_ms();
        let previous = slot
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace((since, owner(), what));
        // The previous poll's owner is let go outside the slot's lock.
        drop(previous);
        slot.since.store(since, Ordering::Relaxed);
        let _guard = PollGuard(slot);
        run()
    });
    watched.unwrap_or_else(|_| {
        let _ = IN_POLL.try_with(|p| p.set(false));
        run()
    })
}

/// The futures that have been in one poll since before `since_ms`: `(account, what)`, sorted.
fn holders(since_ms: u64) -> Vec<(String, &'static str)> {
    let threads: Vec<Arc<ThreadSlot>> = THREADS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    let mut held: Vec<(String, &'static str)> = threads
        .iter()
        .filter_map(|slot| {
            let since = slot.since.load(Ordering::Relaxed);
            if since == 0 || since > since_ms {
                return None;
            }
            let current = slot.current.lock().unwrap_or_else(|p| p.into_inner());
            match &*current {
                Some((began, owner, what)) if *began == since => {
                    Some((owner.id().to_owned(), *what))
                }
                _ => None,
            }
        })
        .collect();
    held.sort();
    held.dedup();
    held
}

/// The watchdog thread of a runtime; dropping it stops and joins the thread.
pub(crate) struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    /// Starts watching `runtime` (of `workers` workers); `None` when the threshold is 0 (off) or
    /// the thread cannot be started.
    pub(crate) fn start(
        runtime: Handle,
        workers: u32,
        threshold: Duration,
        runtime_name: &str,
    ) -> Option<Self> {
        if threshold.is_zero() {
            return None;
        }
        let (stop, stopped) = mpsc::channel();
        // Named like the runtime's threads, so the host counts it among the plugin's threads.
        let mut name = format!("{runtime_name}-wd");
        if name.len() > 15 {
            name = format!("{}-wd", &runtime_name[..runtime_name.len().min(12)]);
        }
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || watch(&runtime, workers, threshold, &stopped))
            .ok()?;
        Some(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The watchdog's loop: one probe in flight at a time; a report when it has waited past the
/// threshold, and one when it has run after that.
fn watch(runtime: &Handle, workers: u32, threshold: Duration, stopped: &mpsc::Receiver<()>) {
    let tick = (threshold / 4).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let threshold_ms = threshold.as_millis() as u64;
    let pending = Arc::new(AtomicBool::new(false));
    let mut sent_at = 0;
    let mut starved = false;
    loop {
        match stopped.recv_timeout(tick) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let now = now_ms();
        if pending.load(Ordering::Acquire) {
            if !starved && now.saturating_sub(sent_at) >= threshold_ms {
                starved = true;
                // Held: in one poll for at least half the threshold (a worker taken just after
                // the probe was sent counts too).
                let held = holders(now.saturating_sub(threshold_ms / 2));
                let names: Vec<String> = held
                    .iter()
                    .map(|(account, what)| format!("{account} ({what})"))
                    .collect();
                let holders: Vec<Value> = held
                    .iter()
                    .map(|(account, what)| json!({ "account": account, "in": what }))
                    .collect();
                super::log::report_runtime(
                    json!({
                        "starved": true,
                        "workers": workers,
                        "blockedMs": now.saturating_sub(sent_at),
                        "holders": holders,
                    }),
                    &format!(
                        "the plugin's runtime is starved: all {workers} workers busy for {} ms; \
                         held by: {}",
                        now.saturating_sub(sent_at),
                        if names.is_empty() {
                            "unknown".to_owned()
                        } else {
                            names.join(", ")
                        }
                    ),
                );
            }
            continue;
        }
        if starved {
            starved = false;
            super::log::report_runtime(
                json!({ "starved": false }),
                "the plugin's runtime has a free worker again",
            );
        }
        pending.store(true, Ordering::Release);
        sent_at = now;
        let probe = pending.clone();
        runtime.spawn(async move { probe.store(false, Ordering::Release) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_future_blocked_in_its_poll_is_a_holder_and_one_between_polls_is_not() {
        let (entered, wait) = mpsc::channel();
        let (release, released) = mpsc::channel::<()>();
        let blocker = std::thread::spawn(move || {
            let future = watched("blocker".into(), "task", async move {
                entered.send(()).unwrap();
                released.recv().unwrap();
            });
            futures_executor_lite(future);
        });
        let idle = watched("idle".into(), "task", std::future::pending::<()>());
        wait.recv().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let held = holders(now_ms());
        assert!(held.contains(&("blocker".to_owned(), "task")), "{held:?}");
        assert!(!held.iter().any(|(a, _)| a == "idle"), "{held:?}");
        release.send(()).unwrap();
        blocker.join().unwrap();
        drop(idle);
        assert!(holders(now_ms()).iter().all(|(a, _)| a != "blocker"));
    }

    #[test]
    fn a_poll_that_panics_leaves_its_thread_free_and_the_next_poll_is_seen() {
        let panicked = std::panic::catch_unwind(|| {
            futures_executor_lite(watched("panicker".into(), "task", async {
                if true {
                    panic!("a panic in a watched poll");
                }
            }))
        });
        assert!(panicked.is_err());
        let held = holders(now_ms());
        assert!(held.iter().all(|(a, _)| a != "panicker"), "{held:?}");
        // The thread's next watched poll is recorded as usual.
        let seen =
            futures_executor_lite(watched("next".into(), "send", async { holders(now_ms()) }));
        assert!(seen.contains(&("next".to_owned(), "send")), "{seen:?}");
    }

    /// Polls a future to completion on this thread (it never waits for a wake-up here).
    fn futures_executor_lite<F: Future>(future: F) -> F::Output {
        let mut future = Box::pin(future);
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        loop {
            if let Poll::Ready(out) = future.as_mut().poll(&mut cx) {
                return out;
            }
        }
    }
}
