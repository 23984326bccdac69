//! Regression tests for the known failures channeld avoids (docs/behaviour.md, last section). Each test
//! names the failure it guards and says which code it guards; each was seen to fail with that
//! code reverted.

use std::time::Duration;

use super::*;
use crate::supervise::{Phase, StartOutcome, StopOutcome};

/// Failure 1 (OpenClaw #71412, #70024): a task that ignores its abort used to stay in the store,
/// every later start silently did nothing and the status kept saying running.
///
/// Guards `AccountCtx::stop_task` in lifecycle.rs: after the stop timeout the host *cancels* the
/// task on the plugin's runtime (`plugin.cancel_task`) and waits for it to end, so the stop
/// reports `Cancelled` and the next start works. (Without the cancel the task would be reported
/// stuck and the next start refused.) Also guards that a later stop does not report the earlier
/// cancellation again (`last_stop_cancelled` is reset by each stop).
#[tokio::test(start_paused = true)]
async fn failure_1_zombie_after_stop_timeout() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.script("a", [Run::IgnoreAbort, Run::Err(SEC, "boom".into())]);
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);

    let at = Instant::now();
    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Cancelled);
    assert_eq!(at.elapsed(), 5 * SEC, "the stop timeout, then the cancel");
    let calls = plugin.calls("a");
    assert_eq!((calls.abort, calls.cancel), (1, 1));
    assert_eq!(plugin.live("a"), 0, "the task has ended");
    let s = snap(&sup, "c", "a");
    assert!(!s.running && !s.restart_pending);
    assert_eq!(
        s.last_error.as_deref(),
        Some("did not stop within 5s of its abort; cancelled")
    );

    // The next start works, with one task at a time.
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert_eq!(plugin.calls("a").start, 2);
    assert!(snap(&sup, "c", "a").running);
    // Later stops do not report the earlier cancellation again: not one during a backoff…
    sleep(3 * SEC).await;
    assert_eq!(phase(&sup, "c", "a"), Some(Phase::Backoff));
    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    // …nor one of a task that honours its abort.
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    assert_eq!(plugin.calls("a").start, 3);
    assert_eq!(plugin.max_live("a"), 1);
}

/// Failure 1, second half: a task that does not end even when cancelled (it blocks its thread)
/// is reported stuck — `lastError` says so and `running` stays true — a start is refused with
/// that reason instead of silently doing nothing, and the slot frees itself when the task ends.
///
/// Guards the stuck branch of `AccountCtx::stop_task` (the `stuck` mark and its watcher) and the
/// `stuck` check at the top of `Supervisor::start_account`.
#[tokio::test(start_paused = true)]
async fn failure_1_thread_blocking_task_is_reported_stuck() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.script("a", [Run::BlockThread]);
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;

    let at = Instant::now();
    let reason = match stop(&sup, "c", "a").await {
        StopOutcome::Stuck(reason) => reason,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        at.elapsed(),
        6 * SEC,
        "the stop timeout, then 1 s after the cancel"
    );
    assert!(reason.starts_with("stuck"), "{reason}");
    let s = snap(&sup, "c", "a");
    assert!(s.running, "a stuck task is still running");
    assert!(!s.restart_pending);
    assert_eq!(s.last_error.as_deref(), Some(reason.as_str()));
    assert_eq!((plugin.calls("a").abort, plugin.calls("a").cancel), (1, 1));

    // Refused, with the reason, and no second task — now and an hour later. A refused start
    // changes nothing (the account is still marked stopped by its user).
    assert_eq!(
        start(&sup, "c", "a").await,
        StartOutcome::Refused(reason.clone())
    );
    assert!(sup.is_manually_stopped(&key("c", "a")));
    assert_eq!(
        stop(&sup, "c", "a").await,
        StopOutcome::Stuck(reason.clone())
    );
    sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        start(&sup, "c", "a").await,
        StartOutcome::Refused(reason.clone())
    );
    assert_eq!(plugin.calls("a").start, 1);

    // The task ends by itself at last: the slot frees itself at once.
    plugin.release("a");
    until("the stuck task's end is noticed", || {
        !snap(&sup, "c", "a").running
    })
    .await;
    assert_eq!(
        snap(&sup, "c", "a").last_error.as_deref(),
        Some("the stuck task has ended")
    );
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert_eq!(plugin.calls("a").start, 2);
    assert_eq!(plugin.max_live("a"), 1);
}

/// Failure 3 (#83053): after the 10th crash an account used to be dead forever.
///
/// Guards the user-start reset in `Supervisor::start_account` (`entry.attempts = 0` for a user
/// start, with no lifecycle left to join): a gave-up account starts again and gets a fresh
/// budget, so its next crash is attempt 1 with the 5 s backoff.
#[tokio::test(start_paused = true)]
async fn failure_3_dead_forever_after_10th_crash() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    sleep(Duration::from_secs(2 * 3600)).await;
    assert_eq!(plugin.calls("a").start, 11);
    assert!(!snap(&sup, "c", "a").restart_pending);

    // A user start revives it.
    let revived_at = plugin.epoch.elapsed();
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    let s = snap(&sup, "c", "a");
    assert!(s.running);
    assert_eq!(s.reconnect_attempts, 0);
    assert_eq!(s.last_error, None);
    // Its crash is attempt 1 again: restart pending, 5 s backoff.
    sleep(3 * SEC).await;
    let s = snap(&sup, "c", "a");
    assert!(s.restart_pending);
    assert_eq!(s.reconnect_attempts, 1);
    sleep(4 * SEC).await;
    let times = plugin.start_times("a");
    assert_eq!(times.len(), 13);
    assert_eq!(times[12] - times[11], 6 * SEC);
    assert_eq!(times[11], revived_at);
}

/// Failure 3, second half: a run that lasts at least the stable period (5 min) resets the
/// counter, so an account that crashes now and then never runs out of restarts.
///
/// Guards the stable-run reset in `Lifecycle::schedule_restart` (`ran_for >= stable_run`):
/// without it the crash after the long run would be attempt 4 (a 40 s backoff) instead of 1.
#[tokio::test(start_paused = true)]
async fn failure_3_stable_run_resets_the_counter() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let boom = |secs| Run::Err(Duration::from_secs(secs), "boom".into());
    plugin.script(
        "a",
        [boom(1), boom(1), boom(1), boom(300), boom(299), boom(1)],
    );
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    sleep(Duration::from_secs(3600)).await;
    let times: Vec<u64> = plugin
        .start_times("a")
        .iter()
        .map(Duration::as_secs)
        .collect();
    // 0, 6, 17: attempts 1–3; the run from 38 s lasts 300 s: the crash at 338 s is attempt 1
    // (5 s); the run from 343 s lasts 299 s, not stable: the crash at 642 s is attempt 2 (10 s).
    assert_eq!(&times[..6], &[0, 6, 17, 38, 343, 652]);
}

/// Failure 4 (#109659, outages of 21 h and 34 h): an abort that raced the backoff sleep used to
/// lose the restart silently.
///
/// Guards `Lifecycle::schedule_restart`'s exits: the stop branch records the stop
/// (`restartPending=false`, `lastStopAt`), and a user start wakes the backoff at once (the
/// `wake` branch), with the counter reset. Each exit either restarts or records why not.
#[tokio::test(start_paused = true)]
async fn failure_4_restart_lost_when_abort_races_backoff() {
    // A stop in the middle of the backoff: recorded, and nothing starts again.
    let plugin = TestPlugin::new("c", &["a", "b"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    plugin.script("b", vec![Run::Err(SEC, "boom".into()); 3]);
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    sleep(3 * SEC).await;
    assert_eq!(phase(&sup, "c", "a"), Some(Phase::Backoff));
    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    let s = snap(&sup, "c", "a");
    assert!(!s.restart_pending && !s.running);
    assert!(s.last_stop_at.is_some());
    assert_eq!(phase(&sup, "c", "a"), None);

    // A user start during the backoff (after three crashes: a 20 s backoff) starts at once and
    // resets the counter.
    start(&sup, "c", "b").await;
    sleep(Duration::from_secs(19)).await;
    let s = snap(&sup, "c", "b");
    assert!(s.restart_pending);
    assert_eq!(s.reconnect_attempts, 3);
    let at = plugin.epoch.elapsed();
    assert_eq!(start(&sup, "c", "b").await, StartOutcome::Started);
    assert_eq!(plugin.start_times("b").last(), Some(&at));
    let s = snap(&sup, "c", "b");
    assert!(s.running && !s.restart_pending);
    assert_eq!(s.reconnect_attempts, 0);
    assert_eq!(sup.restart_attempts(&key("c", "b")), 0);

    sleep(Duration::from_secs(24 * 3600)).await;
    assert_eq!(
        plugin.calls("a").start,
        1,
        "a stopped account stays stopped"
    );
    assert!(!snap(&sup, "c", "a").restart_pending);
}

/// Failure 4, the exact race: a stop, or a user start, that arrives at the very moment the
/// backoff sleep ends. Repeated with fresh supervisors, because which of the two ready branches
/// a plain `select!` takes is random.
///
/// Guards the `biased` order of `Lifecycle::schedule_restart`'s `select!` (stop, wake, sleep):
/// when the sleep ends as a user start wakes the lifecycle, an unbiased `select!` may take the
/// sleep and leave the wake-up stored in the `Notify`, which then cuts the *next* backoff to
/// nothing (a restart 0 s after the crash instead of 5 s).
#[tokio::test(start_paused = true)]
async fn failure_4_stop_or_start_exactly_when_the_backoff_ends() {
    for round in 0..32 {
        // A stop at the end of the backoff: recorded, whichever way the race goes. The boot is
        // gated, so a stop that lands after the restart began is still a stop during the boot.
        let plugin = TestPlugin::new("c", &["a"]);
        let release = plugin.release_on_drop();
        plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
        let gate = plugin.gate("a", Entry::IsConfigured);
        gate.allow(1);
        let sup = supervisor();
        add(&sup, &plugin).await;
        start(&sup, "c", "a").await;
        // The run ends at 1 s; the backoff ends at 6 s.
        tokio::time::sleep_until(plugin.epoch + 6 * SEC).await;
        let (stopped, ()) = tokio::join!(stop(&sup, "c", "a"), async {
            until("the stop has landed", || {
                sup.is_manually_stopped(&key("c", "a"))
            })
            .await;
            gate.open();
        });
        assert_eq!(stopped, StopOutcome::Stopped, "round {round}");
        let s = snap(&sup, "c", "a");
        assert!(!s.restart_pending && !s.running, "round {round}");
        sleep(Duration::from_secs(3600)).await;
        assert_eq!(plugin.calls("a").start, 1, "round {round}");
        drop(release);

        // A user start at the end of the backoff: one start, and the next backoff is whole.
        let plugin = TestPlugin::new("c", &["a"]);
        let _release = plugin.release_on_drop();
        plugin.script("a", vec![Run::Err(SEC, "boom".into()); 2]);
        let sup = supervisor();
        add(&sup, &plugin).await;
        start(&sup, "c", "a").await;
        tokio::time::sleep_until(plugin.epoch + 6 * SEC).await;
        assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
        sleep(Duration::from_secs(60)).await;
        // Starts at 0 and 6 s; the run from 6 s crashes at 7 s (attempt 1: the user start reset
        // the counter, or the restart kept it at 1 — either way 5 s) and restarts at 12 s.
        let times = plugin.start_times("a");
        assert_eq!(
            times[..3],
            [Duration::ZERO, 6 * SEC, 12 * SEC],
            "round {round}"
        );
    }
}

/// Failure 5 (#43569, #56566: two Telegram pollers): a restart used to start the replacement
/// while the old task still ran.
///
/// Guards `Supervisor::start_account`'s `Phase::Stopping` arm (a start during a stop waits for
/// the old task to end, then starts anew) and `stop_account` setting that phase under the lock:
/// starts and restarts racing a slow stop, and a restart storm, never have two tasks alive.
#[tokio::test(start_paused = true)]
async fn failure_5_duplicate_tasks_after_restart() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::IgnoreAbort);
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;

    // A stop that takes 5 s (the task ignores its abort), with starts and a restart landing
    // during it: each waits for the old task to end.
    let stopping = tokio::spawn({
        let sup = sup.clone();
        async move { stop(&sup, "c", "a").await }
    });
    sleep(SEC).await;
    assert_eq!(phase(&sup, "c", "a"), Some(Phase::Stopping));
    let (started, restarted) = tokio::join!(start(&sup, "c", "a"), async {
        sleep(SEC).await;
        sup.restart("c", Some("a")).await.unwrap()
    });
    assert_eq!(stopping.await.unwrap(), StopOutcome::Cancelled);
    assert_eq!(started, StartOutcome::Started);
    assert_eq!(restarted, vec![(key("c", "a"), StartOutcome::Started)]);
    assert_eq!(plugin.max_live("a"), 1);
    assert_eq!(plugin.live("a"), 1);

    // A restart storm: tasks crash every 2 s while users stop, start and restart at odd times.
    plugin.set_default_run("a", Run::Err(2 * SEC, "boom".into()));
    sup.restart("c", Some("a")).await.unwrap();
    let mut ops = Vec::new();
    for i in 0..40u64 {
        let sup = sup.clone();
        ops.push(tokio::spawn(async move {
            sleep(Duration::from_millis(700 * i + 13)).await;
            match i % 4 {
                0 => drop(sup.stop("c", Some("a")).await),
                1 | 3 => drop(sup.start("c", Some("a")).await),
                _ => drop(sup.restart("c", Some("a")).await),
            }
        }));
    }
    for op in ops {
        op.await.unwrap();
    }
    sleep(Duration::from_secs(3600)).await;
    assert!(plugin.calls("a").start > 20);
    assert_eq!(plugin.max_live("a"), 1);
    assert_eq!(plugin.max_starts_in_flight("a"), 1);
}
