//! The runtime's starvation watch. The ABI has no entry for it (it is frozen), so the SDK watches
//! its own runtime and reports through an existing host service:
//!
//! * every future the SDK runs for an account (its task, the tasks it spawns, its stop and logout
//!   hooks, its sends) is [`Watched`]: it records, while it is being polled, since when, so a poll
//!   that never returns (the author's code blocks its thread) names its account;
//! * a watchdog thread, outside the runtime, spawns a probe task on the runtime every tick. The
//!   probe does nothing but say it ran, so when it has waited past the threshold, no worker was
//!   free for that long: the runtime is starved. The watchdog then reports, through the
//!   plugin-wide handle's `log` with the target
//!   [`RUNTIME_REPORT_TARGET`](crate::abi::RUNTIME_REPORT_TARGET), the accounts whose futures
//!   were in a poll for the whole wait (they hold the threads), and reports again once the probe
//!   has run.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    task::{Context, Poll},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::runtime::Handle;

/// What a watched future is, for the report: `task`, `spawned task`, `stop hook`, …
struct Slot {
    account: String,
    what: &'static str,
    /// Milliseconds since [`BASE`] (plus one) when its current poll began; 0 outside a poll.
    polling_since: AtomicU64,
}

static BASE: OnceLock<Instant> = OnceLock::new();
static NEXT_SLOT: AtomicU64 = AtomicU64::new(1);
static SLOTS: Mutex<Option<HashMap<u64, Arc<Slot>>>> = Mutex::new(None);

fn now_ms() -> u64 {
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

fn with_slots<R>(f: impl FnOnce(&mut HashMap<u64, Arc<Slot>>) -> R) -> R {
    let mut guard = SLOTS.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(HashMap::new))
}

/// A future whose polls are visible to the watchdog.
pub(crate) struct Watched<F> {
    inner: Pin<Box<F>>,
    slot: Arc<Slot>,
    id: u64,
}

/// Wraps `future` (run for `account`, as `what`) so the watchdog sees its polls.
pub(crate) fn watched<F: Future>(account: &str, what: &'static str, future: F) -> Watched<F> {
    let slot = Arc::new(Slot {
        account: account.to_owned(),
        what,
        polling_since: AtomicU64::new(0),
    });
    let id = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
    with_slots(|slots| slots.insert(id, slot.clone()));
    Watched {
        inner: Box::pin(future),
        slot,
        id,
    }
}

impl<F: Future> Future for Watched<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.slot.polling_since.store(now_ms(), Ordering::Relaxed);
        let result = self.inner.as_mut().poll(cx);
        self.slot.polling_since.store(0, Ordering::Relaxed);
        result
    }
}

impl<F> Drop for Watched<F> {
    fn drop(&mut self) {
        with_slots(|slots| slots.remove(&self.id));
    }
}

/// The futures that have been in one poll since before `since_ms`: `(account, what)`, sorted.
fn holders(since_ms: u64) -> Vec<(String, &'static str)> {
    let mut held: Vec<(String, &'static str)> = with_slots(|slots| {
        slots
            .values()
            .filter(|slot| {
                let since = slot.polling_since.load(Ordering::Relaxed);
                since != 0 && since <= since_ms
            })
            .map(|slot| (slot.account.clone(), slot.what))
            .collect()
    });
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
            let future = watched("blocker", "task", async move {
                entered.send(()).unwrap();
                released.recv().unwrap();
            });
            futures_executor_lite(future);
        });
        let idle = watched("idle", "task", std::future::pending::<()>());
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
