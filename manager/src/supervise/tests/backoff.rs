//! Rule 6: an unrequested end is a crash; the restart backoff (5, 10, 20, 40, 80, 160 s, then
//! 300 s, jitter +0–10 %); giving up after 10 restarts (11 starts).

use std::time::Duration;

use super::*;
use crate::supervise::{StartOutcome, StopOutcome};

fn secs(list: &[u64]) -> Vec<Duration> {
    list.iter().map(|s| Duration::from_secs(*s)).collect()
}

fn millis(list: &[u64]) -> Vec<Duration> {
    list.iter().map(|ms| Duration::from_millis(*ms)).collect()
}

/// A running account shows how many restarts brought it there (the lifecycle reads the count
/// its bookkeeping keeps, as that count changes), and a user start sets it back to 0.
#[tokio::test(start_paused = true)]
async fn a_restarted_account_runs_with_its_restart_count_and_a_user_start_clears_it() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.script(
        "a",
        vec![
            Run::Err(SEC, "boom".into()),
            Run::Err(SEC, "boom".into()),
            Run::UntilAborted,
        ],
    );
    plugin.set_default_run("a", Run::UntilAborted);
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    // Crashes at 1 s and (after the 5 s backoff) at 7 s; the third start (after 10 s more)
    // runs.
    sleep(Duration::from_secs(30)).await;
    assert_eq!(plugin.calls("a").start, 3);
    let s = snap(&sup, "c", "a");
    assert!(s.running, "{s:?}");
    assert_eq!(s.reconnect_attempts, 2, "{s:?}");

    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    let s = snap(&sup, "c", "a");
    assert!(s.running, "{s:?}");
    assert_eq!(s.reconnect_attempts, 0, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn backoff_is_5_10_20_40_80_160_then_300_s_and_gives_up_after_10_restarts() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);

    // In the first backoff: a crash, restart pending, attempt 1.
    sleep(3 * SEC).await;
    let s = snap(&sup, "c", "a");
    assert!(!s.running);
    assert!(s.restart_pending);
    assert_eq!(s.reconnect_attempts, 1);
    assert_eq!(s.last_error.as_deref(), Some("boom"));

    sleep(Duration::from_secs(2 * 3600)).await;
    // Each run lasts 1 s; the gaps between a crash and the next start are the backoff.
    assert_eq!(
        plugin.start_times("a"),
        secs(&[0, 6, 17, 38, 79, 160, 321, 622, 923, 1224, 1525])
    );
    let s = snap(&sup, "c", "a");
    assert!(!s.running);
    assert!(!s.restart_pending);
    assert_eq!(s.reconnect_attempts, 11);
    assert_eq!(
        s.last_error.as_deref(),
        Some("boom; giving up after 10 restart attempts")
    );
    assert_eq!(sup.restart_attempts(&key("c", "a")), 11);

    // Given up means given up: no 12th start, however long.
    sleep(Duration::from_secs(48 * 3600)).await;
    assert_eq!(plugin.calls("a").start, 11);
    assert_eq!(plugin.max_live("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn jitter_adds_at_most_ten_percent_and_the_cap_stays_300_s() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    let sup = supervisor_with(SupervisorConfig::default(), 0.999_999);
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    sleep(Duration::from_secs(2 * 3600)).await;
    // Backoffs 5.5, 11, 22, 44, 88, 176 s, then the 300 s cap (not 330, not 352).
    assert_eq!(
        plugin.start_times("a"),
        millis(&[
            0, 6_500, 18_500, 41_500, 86_500, 175_500, 352_500, 653_500, 954_500, 1_255_500,
            1_556_500
        ])
    );
}

#[tokio::test(start_paused = true)]
async fn a_clean_exit_is_a_crash() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Ok(SEC));
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;

    sleep(2 * SEC).await;
    let s = snap(&sup, "c", "a");
    assert!(!s.running);
    assert!(s.restart_pending);
    assert_eq!(s.reconnect_attempts, 1);
    assert_eq!(
        s.last_error.as_deref(),
        Some("channel exited without an error")
    );
    assert!(s.last_stop_at.is_some());

    sleep(Duration::from_secs(2 * 3600)).await;
    assert_eq!(plugin.calls("a").start, 11);
    let s = snap(&sup, "c", "a");
    assert!(!s.restart_pending);
    assert_eq!(
        s.last_error.as_deref(),
        Some("channel exited without an error; giving up after 10 restart attempts")
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_start_is_a_crash_with_the_same_backoff() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::FailStart("no route to host".into()));
    let sup = supervisor();
    add(&sup, &plugin).await;
    match start(&sup, "c", "a").await {
        StartOutcome::Failed(e) => assert!(e.contains("no route to host"), "{e}"),
        other => panic!("{other:?}"),
    }
    let s = snap(&sup, "c", "a");
    assert!(!s.running);
    assert!(s.restart_pending);
    assert_eq!(s.reconnect_attempts, 1);
    assert!(s.last_error.unwrap().contains("no route to host"));

    sleep(Duration::from_secs(2 * 3600)).await;
    assert_eq!(
        plugin.start_times("a"),
        secs(&[0, 5, 15, 35, 75, 155, 315, 615, 915, 1215, 1515])
    );
    let s = snap(&sup, "c", "a");
    assert!(!s.restart_pending);
    assert!(
        s.last_error
            .unwrap()
            .ends_with("giving up after 10 restart attempts")
    );
}

#[tokio::test(start_paused = true)]
async fn the_policy_numbers_come_from_the_config() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    let policy = SupervisorConfig {
        initial_backoff: Duration::from_secs(2),
        backoff_factor: 3.0,
        max_backoff: Duration::from_secs(20),
        max_restarts: 3,
        ..SupervisorConfig::default()
    };
    let sup = supervisor_with(policy, 0.0);
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    sleep(Duration::from_secs(3600)).await;
    // Backoffs 2, 6, 18 s; then giving up after 3 restarts (4 starts).
    assert_eq!(plugin.start_times("a"), secs(&[0, 3, 10, 29]));
    assert_eq!(
        snap(&sup, "c", "a").last_error.as_deref(),
        Some("boom; giving up after 3 restart attempts")
    );
}
