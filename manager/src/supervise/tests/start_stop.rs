//! Rules 2–5 of "Start" and the "Stop" rules: joining starts, disabled / unconfigured accounts,
//! the running snapshot, stops (also during a boot and during the backoff), slow and hung starts.

use std::time::Duration;

use super::*;
use crate::supervise::{StartOutcome, StopOutcome};

#[tokio::test(start_paused = true)]
async fn a_start_runs_the_task_and_the_snapshot_says_so() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    let s = snap(&sup, "c", "a");
    assert!(s.enabled && s.configured && s.running);
    assert!(!s.restart_pending);
    assert!(s.last_start_at.is_some());
    assert_eq!(s.last_error, None);
    assert_eq!(s.reconnect_attempts, 0);
    assert_eq!(plugin.live("a"), 1);

    // Running: a start changes nothing.
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::AlreadyRunning);
    assert_eq!(plugin.calls("a").start, 1);
    assert_eq!(plugin.calls("a").is_configured, 1);
}

/// A running task's end is polled across the plugin boundary once, and again only when it wakes:
/// the wake-up of its first-poll report does not poll it again. Its end, and a stop, still reach
/// the lifecycle.
#[tokio::test(start_paused = true)]
async fn a_task_end_is_polled_again_only_when_it_wakes() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.report_first_polls();
    plugin.script("a", [Run::Ok(Duration::from_secs(1))]);
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert!(snap(&sup, "c", "a").running);
    assert_eq!(plugin.end_polls(), 1, "polled once, at the first poll");
    // The task ends by itself: its end's wake-up reaches the lifecycle, which restarts it after
    // its backoff.
    sleep(Duration::from_secs(10)).await;
    until(
        "the task's end is seen and the account started again",
        || plugin.calls("a").start == 2 && snap(&sup, "c", "a").running,
    )
    .await;
    // The first run's end was polled twice (its first poll, and once it woke); the second run's once.
    assert_eq!(plugin.end_polls(), 3);
    assert_eq!(snap(&sup, "c", "a").reconnect_attempts, 1);
    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    assert_eq!(plugin.live("a"), 0);
}

#[tokio::test(start_paused = true)]
async fn two_concurrent_starts_make_one_is_configured_call_and_one_start() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let sup = supervisor();
    add(&sup, &plugin).await;
    let (first, second) = tokio::join!(start(&sup, "c", "a"), start(&sup, "c", "a"));
    assert_eq!(first, StartOutcome::Started);
    assert_eq!(second, StartOutcome::Started);
    assert_eq!(plugin.calls("a").is_configured, 1);
    assert_eq!(plugin.calls("a").start, 1);
}

#[tokio::test(start_paused = true)]
async fn a_start_arriving_while_another_boots_joins_it() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let gate = plugin.gate("a", Entry::IsConfigured);
    let sup = supervisor();
    add(&sup, &plugin).await;
    let first = tokio::spawn({
        let sup = sup.clone();
        async move { start(&sup, "c", "a").await }
    });
    // The first start is inside the plugin's is_configured: the second one joins it.
    gate.entered(1).await;
    let joined = Arc::new(AtomicBool::new(false));
    let second = tokio::spawn({
        let sup = sup.clone();
        flag_polled(joined.clone(), async move { start(&sup, "c", "a").await })
    });
    until("the second start has joined", || {
        joined.load(Ordering::SeqCst)
    })
    .await;
    gate.open();
    assert_eq!(first.await.unwrap(), StartOutcome::Started);
    assert_eq!(second.await.unwrap(), StartOutcome::Started);
    assert_eq!(plugin.calls("a").is_configured, 1);
    assert_eq!(plugin.calls("a").start, 1);
    assert_eq!(gate.arrivals(), 1);
}

#[tokio::test(start_paused = true)]
async fn disabled_and_unconfigured_accounts_do_not_start() {
    let plugin = TestPlugin::new("c", &["off", "off-why", "bare", "bare-why"]);
    let _release = plugin.release_on_drop();
    plugin.set_enabled("off", Check::No(None));
    plugin.set_enabled("off-why", Check::No(Some("switched off by ops".into())));
    plugin.set_configured("bare", Check::No(None));
    plugin.set_configured("bare-why", Check::No(Some("no bot token".into())));
    let sup = supervisor();
    add(&sup, &plugin).await;

    assert_eq!(
        start(&sup, "c", "off").await,
        StartOutcome::Disabled("disabled".into())
    );
    assert_eq!(
        start(&sup, "c", "off-why").await,
        StartOutcome::Disabled("switched off by ops".into())
    );
    assert_eq!(
        start(&sup, "c", "bare").await,
        StartOutcome::NotConfigured("not configured".into())
    );
    assert_eq!(
        start(&sup, "c", "bare-why").await,
        StartOutcome::NotConfigured("no bot token".into())
    );
    for (account, enabled, configured, error) in [
        ("off", false, true, "disabled"),
        ("off-why", false, true, "switched off by ops"),
        ("bare", true, false, "not configured"),
        ("bare-why", true, false, "no bot token"),
    ] {
        let s = snap(&sup, "c", account);
        assert_eq!(
            (s.enabled, s.configured),
            (enabled, configured),
            "{account}"
        );
        assert!(!s.running && !s.restart_pending, "{account}");
        assert_eq!(s.last_error.as_deref(), Some(error), "{account}");
        // Not a crash: nothing is retried.
        assert_eq!(s.reconnect_attempts, 0, "{account}");
    }
    sleep(Duration::from_secs(3600)).await;
    for account in ["off", "off-why", "bare", "bare-why"] {
        assert_eq!(plugin.calls(account).start, 0, "{account}");
    }
    // A disabled account is not asked whether it is configured.
    assert_eq!(plugin.calls("off").is_configured, 0);
}

#[tokio::test(start_paused = true)]
async fn a_stop_aborts_calls_the_hook_and_no_restart_follows() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    sleep(10 * SEC).await;

    let at = Instant::now();
    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    // A task that honours its abort ends at once: no time passes.
    assert_eq!(at.elapsed(), Duration::ZERO);
    let s = snap(&sup, "c", "a");
    assert!(!s.running && !s.restart_pending);
    assert!(s.last_stop_at.is_some());
    assert_eq!(s.last_error, None);
    assert!(sup.is_manually_stopped(&key("c", "a")));
    sleep(SEC).await;
    let calls = plugin.calls("a");
    assert_eq!((calls.abort, calls.stop, calls.cancel), (1, 1, 0));
    assert_eq!(plugin.live("a"), 0);

    sleep(Duration::from_secs(3600)).await;
    assert_eq!(plugin.calls("a").start, 1);

    // A user start clears the manual-stop mark.
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert!(!sup.is_manually_stopped(&key("c", "a")));
    assert_eq!(plugin.max_live("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stop_of_an_account_that_is_not_running_is_recorded() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    let s = snap(&sup, "c", "a");
    assert!(!s.running && !s.restart_pending);
    assert!(s.last_stop_at.is_some());
    assert!(sup.is_manually_stopped(&key("c", "a")));
    assert_eq!(plugin.calls("a").stop, 0);
}

#[tokio::test(start_paused = true)]
async fn a_manual_stop_during_the_backoff_cancels_the_restart() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    sleep(3 * SEC).await;
    assert!(snap(&sup, "c", "a").restart_pending);

    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    let s = snap(&sup, "c", "a");
    assert!(!s.running && !s.restart_pending);
    assert!(s.last_stop_at.is_some());
    sleep(Duration::from_secs(24 * 3600)).await;
    assert_eq!(plugin.calls("a").start, 1);
    assert!(!snap(&sup, "c", "a").restart_pending);
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_the_boot_means_the_plugins_start_is_never_called() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let gate = plugin.gate("a", Entry::IsConfigured);
    let sup = supervisor();
    add(&sup, &plugin).await;
    let starting = tokio::spawn({
        let sup = sup.clone();
        async move { start(&sup, "c", "a").await }
    });
    // The boot is inside the plugin's is_configured when the stop lands.
    gate.entered(1).await;
    let (stopped, ()) = tokio::join!(stop(&sup, "c", "a"), async {
        until("the stop has landed", || {
            sup.is_manually_stopped(&key("c", "a"))
        })
        .await;
        gate.open();
    });
    assert_eq!(stopped, StopOutcome::Stopped);
    assert_eq!(starting.await.unwrap(), StartOutcome::Stopped);
    assert_eq!(plugin.calls("a").is_configured, 1);
    assert_eq!(plugin.calls("a").start, 0);
    let s = snap(&sup, "c", "a");
    assert!(!s.running && !s.restart_pending);
    assert!(s.last_stop_at.is_some());
    sleep(Duration::from_secs(3600)).await;
    assert_eq!(plugin.calls("a").start, 0);
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_waiting_for_a_boot_slot_returns_at_once() {
    let plugin = TestPlugin::new("c", &["a", "b"]);
    let _release = plugin.release_on_drop();
    let gate = plugin.gate("a", Entry::IsConfigured);
    let policy = SupervisorConfig {
        startup_accounts_per_channel: 1,
        ..SupervisorConfig::default()
    };
    let sup = supervisor_with(policy, 0.0);
    add(&sup, &plugin).await;
    let a = tokio::spawn({
        let sup = sup.clone();
        async move { start(&sup, "c", "a").await }
    });
    gate.entered(1).await;
    // b waits for the channel's only boot slot, which a holds (inside its gate).
    let b = tokio::spawn({
        let sup = sup.clone();
        async move { start(&sup, "c", "b").await }
    });
    until("b waits for a boot slot", || {
        phase(&sup, "c", "b") == Some(crate::supervise::Phase::Booting)
    })
    .await;
    // The stop does not wait for a's boot (which holds a thread, so no time passes).
    let stopping = tokio::spawn({
        let sup = sup.clone();
        async move { stop(&sup, "c", "b").await }
    });
    until("the stop returns", || stopping.is_finished()).await;
    assert_eq!(stopping.await.unwrap(), StopOutcome::Stopped);
    assert_eq!(b.await.unwrap(), StartOutcome::Stopped);
    gate.open();
    assert_eq!(a.await.unwrap(), StartOutcome::Started);
    assert_eq!(plugin.calls("b").is_configured, 0);
    assert_eq!(plugin.calls("b").start, 0);
}

#[tokio::test(start_paused = true)]
async fn a_stop_hook_that_hangs_delays_the_stop_only_until_its_deadline() {
    // The stop waits for the plugin's hook (so a hook that returns in time has finished before
    // the account counts as stopped), but never past the stop timeout (5 s). The gate holds the
    // hook's thread, so paused time is advanced by hand.
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let hook = plugin.gate("a", Entry::Stop);
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    let at = Instant::now();
    let stopping = tokio::spawn({
        let sup = sup.clone();
        async move { stop(&sup, "c", "a").await }
    });
    hook.entered(1).await;
    tokio::time::advance(Duration::from_millis(4999)).await;
    assert!(
        !stopping.is_finished(),
        "the stop waits for the hook within its bound"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(stopping.await.unwrap(), StopOutcome::Stopped);
    assert_eq!(at.elapsed(), 5 * SEC);
    // The account can start again while the old hook still hangs.
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert_eq!(plugin.max_live("a"), 1);
}

/// A failing stop hook (an error, or a panic the plugin's layer turned into one) does not keep the
/// account from stopping, and is not lost: the stop's outcome and `lastError` say what failed.
#[tokio::test(start_paused = true)]
async fn a_failing_stop_hook_shows_in_the_outcome_and_last_error() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.fail_entry("a", Entry::Stop, "hook broke");
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    let outcome = stop(&sup, "c", "a").await;
    let StopOutcome::HookFailed(reason) = outcome else {
        panic!("{outcome:?}");
    };
    assert!(reason.contains("hook broke"), "{reason}");
    let s = snap(&sup, "c", "a");
    assert_eq!(s.state, crate::status::AccountState::Stopped);
    assert!(!s.running);
    assert_eq!(s.last_error.as_deref(), Some(reason.as_str()));
    // The next stop of the stopped account does not repeat the old failure.
    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
}

/// Regression: a stop of many accounts fired their tasks' aborts before it signalled their
/// lifecycles, so a lifecycle that saw its task end first (the abort) took it for a task that
/// ended by itself: no stop hook, a restart scheduled, and the stop reported `stopped`. The stop
/// signal is set before any abort now. Here the abort keeps the stopping thread while the task
/// ends and the other worker runs the lifecycle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_ended_by_a_stops_abort_still_gets_the_stop_sequence() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.fail_entry("a", Entry::Stop, "hook broke");
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    plugin.linger_in_abort(Duration::from_millis(300));
    let outcome = stop(&sup, "c", "a").await;
    assert!(
        matches!(&outcome, StopOutcome::HookFailed(reason) if reason.contains("hook broke")),
        "{outcome:?}"
    );
    assert_eq!(plugin.calls("a").stop, 1);
    let s = snap(&sup, "c", "a");
    assert_eq!(s.state, crate::status::AccountState::Stopped);
    assert_eq!(s.reconnect_attempts, 0, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn restart_stops_then_starts_with_one_task_at_a_time() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.script("a", [Run::IgnoreAbort]);
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    let at = Instant::now();
    let outcomes = sup.restart("c", Some("a")).await.unwrap();
    assert_eq!(outcomes, vec![(key("c", "a"), StartOutcome::Started)]);
    // The old task ignored its abort: cancelled after the 5 s stop timeout, then the new one.
    assert_eq!(at.elapsed(), 5 * SEC);
    assert_eq!(plugin.calls("a").start, 2);
    assert_eq!(plugin.max_live("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn plugin_calls_that_take_real_time_do_not_time_out_on_a_paused_clock() {
    // Every entry takes 20 ms of real time; the start timeout is 1 ms of virtual time. Paused
    // time stands still while a plugin call runs on the blocking pool (calls.rs), so no bound
    // expires because of it. Repeated to catch a race if there were one.
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    for entry in [Entry::IsEnabled, Entry::IsConfigured, Entry::Start] {
        plugin.set_work("a", entry, Duration::from_millis(20));
    }
    let policy = SupervisorConfig {
        start_timeout: Duration::from_millis(1),
        ..SupervisorConfig::default()
    };
    let sup = supervisor_with(policy, 0.0);
    add(&sup, &plugin).await;
    for round in 0..5 {
        let at = Instant::now();
        assert_eq!(
            start(&sup, "c", "a").await,
            StartOutcome::Started,
            "{round}"
        );
        assert_eq!(at.elapsed(), Duration::ZERO);
        assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped, "{round}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_start_times_out_for_its_caller_but_is_not_abandoned() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let gate = plugin.gate("a", Entry::Start);
    let sup = supervisor();
    add(&sup, &plugin).await;
    let starting = tokio::spawn({
        let sup = sup.clone();
        async move { start(&sup, "c", "a").await }
    });
    gate.entered(1).await;
    // The gate holds a thread, so time moves only by hand.
    let step = Duration::from_millis(10);
    let took = advance_until(step, 60 * SEC, || starting.is_finished()).await;
    assert!(took >= 30 * SEC && took <= 30 * SEC + 2 * step, "{took:?}");
    match starting.await.unwrap() {
        StartOutcome::TimedOut(reason) => assert!(reason.contains("30s"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // An hour later the start returns; its task is the account's task, and no other start was
    // made beside it (nor after it: the account simply runs).
    tokio::time::advance(Duration::from_secs(3600)).await;
    gate.open();
    sleep(Duration::from_secs(3600)).await;
    assert!(snap(&sup, "c", "a").running);
    assert_eq!(plugin.calls("a").start, 1);
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::AlreadyRunning);
    assert_eq!(plugin.max_starts_in_flight("a"), 1);
    assert_eq!(plugin.max_live("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_a_hung_start_reports_stuck_and_refuses_starts_until_it_returns() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let gate = plugin.gate("a", Entry::Start);
    let sup = supervisor();
    add(&sup, &plugin).await;
    let starting = tokio::spawn({
        let sup = sup.clone();
        async move { start(&sup, "c", "a").await }
    });
    gate.entered(1).await;
    let stopping = tokio::spawn({
        let sup = sup.clone();
        async move { stop(&sup, "c", "a").await }
    });
    let step = Duration::from_millis(10);
    let took = advance_until(step, 60 * SEC, || stopping.is_finished()).await;
    // Bounded by the stop timeout, not the start timeout.
    assert!(took >= 5 * SEC && took <= 5 * SEC + 2 * step, "{took:?}");
    let reason = match stopping.await.unwrap() {
        StopOutcome::Stuck(reason) => reason,
        other => panic!("{other:?}"),
    };
    assert!(reason.starts_with("stuck: the plugin's start"), "{reason}");
    assert_eq!(starting.await.unwrap(), StartOutcome::Stopped);
    let s = snap(&sup, "c", "a");
    assert!(!s.running && !s.restart_pending);
    assert_eq!(s.last_error.as_deref(), Some(reason.as_str()));
    // Refused, with the reason, and nothing else happens.
    assert_eq!(
        start(&sup, "c", "a").await,
        StartOutcome::Refused(reason.clone())
    );
    assert_eq!(plugin.calls("a").start, 1);

    // The start returns a task after all: it gets the stop sequence, and the account is free.
    gate.open();
    until("the stuck start is cleaned up", || {
        snap(&sup, "c", "a").last_error.as_deref() == Some("the stuck start has returned")
    })
    .await;
    assert_eq!(plugin.live("a"), 0);
    assert_eq!(plugin.calls("a").abort, 1);
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert_eq!(plugin.max_live("a"), 1);
    assert_eq!(plugin.max_starts_in_flight("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_every_account_and_waits_for_every_lifecycle() {
    let plugin = TestPlugin::new("c", &["a", "b", "c"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("b", Run::Err(SEC, "boom".into()));
    plugin.script("c", [Run::IgnoreAbort]);
    let sup = supervisor();
    add(&sup, &plugin).await;
    sup.start_all().await;
    sleep(2 * SEC).await;
    let at = Instant::now();
    sup.shutdown().await;
    assert_eq!(at.elapsed(), 5 * SEC);
    for account in ["a", "b", "c"] {
        let s = snap(&sup, "c", account);
        assert!(!s.running && !s.restart_pending, "{account}");
        assert_eq!(plugin.live(account), 0, "{account}");
    }
    assert_eq!(
        sup.start("c", None).await,
        Err(crate::supervise::SupervisorError::ShuttingDown)
    );
}
