//! The health monitor over the real supervisor (docs/behaviour.md, "The health monitor"): failure 2, the
//! 2-hour crash bound, and the one-start revival of a gave-up account. The monitor itself is
//! tested against a fake in `crate::health::tests`.

use std::time::Duration;

use super::*;
use crate::{config::HealthConfig, health::HealthMonitor, supervise::StartOutcome};

fn secs(list: &[u64]) -> Vec<Duration> {
    list.iter().map(|s| Duration::from_secs(*s)).collect()
}

/// Runs the monitor over `sup` from now, until the returned token is cancelled.
fn monitor(sup: &Supervisor, policy: HealthConfig) -> CancellationToken {
    let stop = CancellationToken::new();
    let monitor = HealthMonitor::new(policy, Arc::new(sup.clone()), Instant::now());
    tokio::spawn(monitor.run(stop.clone()));
    stop
}

#[tokio::test(start_paused = true)]
async fn failure_2_the_monitor_never_touches_a_scheduled_restart_nor_its_counter() {
    // Checks every minute from the first minute on, no cooldown: the reference's monitor would
    // find this account "not running" during its backoffs, restart it and reset its counter
    // (69 crashes in 2 h). Here the supervisor's schedule is exactly the one without a monitor.
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    let sup = supervisor();
    add(&sup, &plugin).await;
    let _monitor = monitor(
        &sup,
        HealthConfig {
            interval: Duration::from_secs(60),
            startup_grace: Duration::ZERO,
            cooldown_cycles: 0,
            ..HealthConfig::default()
        },
    );
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    sleep(Duration::from_secs(1527)).await;
    assert_eq!(
        plugin.start_times("a"),
        secs(&[0, 6, 17, 38, 79, 160, 321, 622, 923, 1224, 1525])
    );
    assert_eq!(
        sup.restart_attempts(&key("c", "a")),
        11,
        "the counter ran its course"
    );
    assert_eq!(plugin.max_live("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn bound_a_permanently_broken_account_crashes_at_most_17_times_in_its_first_2_hours() {
    for jitter in [0.0, 0.999_999] {
        let plugin = TestPlugin::new("c", &["a"]);
        let _release = plugin.release_on_drop();
        plugin.set_default_run("a", Run::Err(Duration::ZERO, "broken".into()));
        let sup = supervisor_with(SupervisorConfig::default(), jitter);
        add(&sup, &plugin).await;
        let stop = monitor(&sup, HealthConfig::default());
        assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
        sleep(Duration::from_secs(2 * 3600) - Duration::from_millis(1)).await;
        let crashes = plugin.start_times("a").len();
        // 11 in the first ≈25 min, then one per cooldown: checks at 30, 45, 60, 75, 90, 105 min.
        assert_eq!(
            crashes,
            17,
            "jitter {jitter}: {:?}",
            plugin.start_times("a")
        );
        stop.cancel();
        sup.shutdown().await;
    }
}

#[tokio::test(start_paused = true)]
async fn reviving_a_gave_up_account_gives_it_one_start_not_a_fresh_budget() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    let policy = SupervisorConfig {
        max_restarts: 2,
        ..SupervisorConfig::default()
    };
    let sup = supervisor_with(policy, 0.0);
    add(&sup, &plugin).await;
    let _monitor = monitor(
        &sup,
        HealthConfig {
            interval: Duration::from_secs(600),
            ..HealthConfig::default()
        },
    );
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    // Gave up after 0, 6, 17; the check at 600 s revives it once; its crash gives up again at
    // once (no backoff restart at 606 s); the checks at 1 200 and 1 800 s are in the cooldown (two
    // intervals, inclusive), and the one at 2 400 s revives it once more.
    sleep(Duration::from_secs(2399)).await;
    assert_eq!(plugin.start_times("a"), secs(&[0, 6, 17, 600]));
    sleep(Duration::from_secs(2)).await;
    assert_eq!(plugin.start_times("a"), secs(&[0, 6, 17, 600, 2400]));
    sleep(Duration::from_secs(2)).await;
    let s = snap(&sup, "c", "a");
    assert!(
        !s.restart_pending && !s.running,
        "back to gave-up at once: {s:?}"
    );
    assert_eq!(
        s.reconnect_attempts, 5,
        "the counter was never reset: 3, then 4, then 5"
    );
    assert!(s.health_restart_at.is_some());
    assert_eq!(s.health_verdict.as_deref(), Some("gave-up"));
}

#[tokio::test(start_paused = true)]
async fn the_monitor_leaves_user_stopped_accounts_alone() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::UntilAborted);
    let sup = supervisor();
    add(&sup, &plugin).await;
    let _monitor = monitor(
        &sup,
        HealthConfig {
            interval: Duration::from_secs(60),
            ..HealthConfig::default()
        },
    );
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    stop(&sup, "c", "a").await;
    sleep(Duration::from_secs(3600)).await;
    assert_eq!(
        plugin.calls("a").start,
        1,
        "a user's stop wins over the monitor"
    );
}
