//! The explicit `state` field: the supervisor sets it at each change, the older flags follow from
//! it, and a task's end clears the plugin's `connected` report.

use std::time::Duration;

use super::*;
use crate::{
    status::AccountState,
    supervise::{StartOutcome, StopOutcome},
};

/// Regression: a stopped account kept showing the plugin's last `connected: true`.
#[tokio::test(start_paused = true)]
async fn connected_is_false_after_a_stop() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    plugin.link("a").set_connected(true);
    assert_eq!(snap(&sup, "c", "a").connected, Some(true));

    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    let s = snap(&sup, "c", "a");
    assert_eq!(s.state, AccountState::Stopped);
    assert_eq!(s.connected, Some(false));
    assert!(!s.running && !s.restart_pending);
}

/// A task that ends by itself is not connected either, while its restart is pending.
#[tokio::test(start_paused = true)]
async fn connected_is_false_once_a_task_ends_by_itself() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.script("a", [Run::Err(SEC, "boom".into())]);
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    plugin.link("a").set_connected(true);
    sleep(2 * SEC).await;
    let s = snap(&sup, "c", "a");
    assert_eq!(s.state, AccountState::RestartPending);
    assert!(s.restart_pending && !s.running);
    assert_eq!(s.connected, Some(false));
}

/// Each state the supervisor can be in shows as itself, with the flags derived from it.
#[tokio::test(start_paused = true)]
async fn each_state_shows_with_its_derived_flags() {
    let plugin = TestPlugin::new("c", &["a", "off", "bare", "stuck"]);
    let _release = plugin.release_on_drop();
    plugin.set_enabled("off", Check::No(Some("switched off".into())));
    plugin.set_configured("bare", Check::No(Some("no token".into())));
    plugin.script("stuck", [Run::BlockThread]);
    let policy = SupervisorConfig {
        max_restarts: 1,
        ..SupervisorConfig::default()
    };
    let sup = supervisor_with(policy, 0.0);
    add(&sup, &plugin).await;
    assert_eq!(snap(&sup, "c", "off").state, AccountState::Disabled);
    assert_eq!(snap(&sup, "c", "a").state, AccountState::Stopped);

    // Running, then stopped by a user.
    plugin.script("a", [Run::UntilAborted]);
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    let s = snap(&sup, "c", "a");
    assert_eq!((s.state, s.running), (AccountState::Running, true));
    assert_eq!(stop(&sup, "c", "a").await, StopOutcome::Stopped);
    assert_eq!(snap(&sup, "c", "a").state, AccountState::Stopped);

    // Disabled and not configured, after a start asked the plugin.
    assert!(matches!(
        start(&sup, "c", "off").await,
        StartOutcome::Disabled(_)
    ));
    let s = snap(&sup, "c", "off");
    assert_eq!(
        (s.state, s.enabled, s.running),
        (AccountState::Disabled, false, false)
    );
    assert!(matches!(
        start(&sup, "c", "bare").await,
        StartOutcome::NotConfigured(_)
    ));
    let s = snap(&sup, "c", "bare");
    assert_eq!(
        (s.state, s.configured, s.running),
        (AccountState::NotConfigured, false, false)
    );

    // Crashes: a restart pending, then given up after the maximum.
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    sleep(2 * SEC).await;
    assert_eq!(snap(&sup, "c", "a").state, AccountState::RestartPending);
    sleep(Duration::from_secs(3600)).await;
    let s = snap(&sup, "c", "a");
    assert_eq!(
        (s.state, s.running, s.restart_pending),
        (AccountState::GaveUp, false, false)
    );

    // Logged out.
    plugin.set_default_run("a", Run::UntilAborted);
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert_eq!(sup.logout("c", "a").await, Ok(true));
    assert_eq!(snap(&sup, "c", "a").state, AccountState::LoggedOut);

    // Stuck: its task blocks its thread; `running` stays true.
    assert_eq!(start(&sup, "c", "stuck").await, StartOutcome::Started);
    assert!(matches!(
        stop(&sup, "c", "stuck").await,
        StopOutcome::Stuck(_)
    ));
    let s = snap(&sup, "c", "stuck");
    assert_eq!((s.state, s.running), (AccountState::Stuck, true));
}

/// While a stop is in progress the account shows `stopping`.
#[tokio::test(start_paused = true)]
async fn a_stop_in_progress_shows_stopping() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.script("a", [Run::IgnoreAbort]);
    let sup = supervisor();
    add(&sup, &plugin).await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    let stopping = tokio::spawn({
        let sup = sup.clone();
        async move { stop(&sup, "c", "a").await }
    });
    sleep(SEC).await;
    assert_eq!(snap(&sup, "c", "a").state, AccountState::Stopping);
    assert_eq!(stopping.await.unwrap(), StopOutcome::Cancelled);
    assert_eq!(snap(&sup, "c", "a").state, AccountState::Stopped);
}

/// The map of accounts keeps room for more accounts than it has, each slot the size of an
/// account's bookkeeping: what is rarely set lives behind a box, so a slot stays 32 bytes.
#[test]
fn an_accounts_bookkeeping_stays_small() {
    assert!(
        std::mem::size_of::<crate::supervise::AccountEntry>() <= 32,
        "{} bytes",
        std::mem::size_of::<crate::supervise::AccountEntry>()
    );
}
