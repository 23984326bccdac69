//! "Other operations": logout, mark logged out, the health-monitor gate, the snapshot.

use std::time::Duration;

use super::*;
use crate::supervise::{StartOutcome, SupervisorError};

#[tokio::test(start_paused = true)]
async fn logout_stops_clears_and_the_account_stays_stopped() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    plugin.link("a").set_connected(true);
    assert_eq!(snap(&sup, "c", "a").connected, Some(true));

    assert_eq!(sup.logout("c", "a").await, Ok(true));
    let s = snap(&sup, "c", "a");
    assert!(!s.running && !s.restart_pending);
    assert_eq!(s.last_error.as_deref(), Some("logged out"));
    assert_eq!(s.connected, Some(false));
    let calls = plugin.calls("a");
    assert_eq!((calls.abort, calls.logout), (1, 1));
    assert!(sup.is_manually_stopped(&key("c", "a")));

    // No automatic restart, however long; a user start brings it back.
    sleep(Duration::from_secs(24 * 3600)).await;
    assert_eq!(plugin.calls("a").start, 1);
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
}

#[tokio::test(start_paused = true)]
async fn logout_during_the_backoff_cancels_the_restart() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_run("a", Run::Err(SEC, "boom".into()));
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    sleep(3 * SEC).await;
    assert!(snap(&sup, "c", "a").restart_pending);
    assert_eq!(sup.logout("c", "a").await, Ok(true));
    let s = snap(&sup, "c", "a");
    assert!(!s.restart_pending && !s.running);
    assert_eq!(s.last_error.as_deref(), Some("logged out"));
    sleep(Duration::from_secs(24 * 3600)).await;
    assert_eq!(plugin.calls("a").start, 1);
}

#[tokio::test(start_paused = true)]
async fn logout_that_clears_nothing_keeps_the_last_error() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.set_logout_clears("a", false);
    let sup = supervisor();
    add(&sup, &plugin).await;
    start(&sup, "c", "a").await;
    assert_eq!(sup.logout("c", "a").await, Ok(false));
    let s = snap(&sup, "c", "a");
    assert!(!s.running);
    assert_eq!(s.last_error, None);
    // It had no connection report: none is invented.
    assert_eq!(s.connected, None);
}

#[tokio::test(start_paused = true)]
async fn logout_errors_name_what_failed() {
    let plugin = TestPlugin::new("c", &["a"]);
    let _release = plugin.release_on_drop();
    plugin.fail_entry("a", Entry::Logout, "credential store is read-only");
    let sup = supervisor();
    add(&sup, &plugin).await;
    match sup.logout("c", "a").await {
        Err(SupervisorError::Plugin(e)) => assert!(e.contains("read-only"), "{e}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        sup.logout("c", "nobody").await,
        Err(SupervisorError::UnknownAccount(key("c", "nobody")))
    );
    assert_eq!(
        sup.logout("zz", "a").await,
        Err(SupervisorError::UnknownChannel("zz".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn mark_logged_out_resolves_the_default_account() {
    // The plugin's default account…
    let named = TestPlugin::new("named", &["a", "b"]);
    named.set_default_account(Some("B"));
    // …else the first listed…
    let first = TestPlugin::new("first", &["x", "y"]);
    // …else `default`.
    let none = TestPlugin::new("none", &[]);
    let sup = supervisor();
    for plugin in [&named, &first, &none] {
        add(&sup, plugin).await;
    }
    for channel in ["named", "first", "none"] {
        sup.mark_logged_out(channel, true, None).unwrap();
    }
    assert_eq!(
        snap(&sup, "named", "b").last_error.as_deref(),
        Some("logged out")
    );
    assert_eq!(snap(&sup, "named", "a").last_error, None);
    assert_eq!(
        snap(&sup, "first", "x").last_error.as_deref(),
        Some("logged out")
    );
    assert_eq!(snap(&sup, "first", "y").last_error, None);
    assert_eq!(
        snap(&sup, "none", "default").last_error.as_deref(),
        Some("logged out")
    );
    assert_eq!(
        sup.mark_logged_out("zz", true, None),
        Err(SupervisorError::UnknownChannel("zz".into()))
    );
}

#[tokio::test(start_paused = true)]
async fn mark_logged_out_sets_connected_false_only_if_it_had_a_value() {
    let plugin = TestPlugin::new("c", &["reported", "silent"]);
    let _release = plugin.release_on_drop();
    let sup = supervisor();
    add(&sup, &plugin).await;
    sup.start("c", None).await.unwrap();
    plugin.link("reported").set_connected(true);

    sup.mark_logged_out("c", true, Some("reported")).unwrap();
    sup.mark_logged_out("c", false, Some("Silent")).unwrap();
    let reported = snap(&sup, "c", "reported");
    assert!(!reported.running && !reported.restart_pending);
    assert_eq!(reported.connected, Some(false));
    assert_eq!(reported.last_error.as_deref(), Some("logged out"));
    let silent = snap(&sup, "c", "silent");
    assert!(!silent.running && !silent.restart_pending);
    assert_eq!(silent.connected, None);
    // Not cleared: the last error stays what it was.
    assert_eq!(silent.last_error, None);
}

#[tokio::test(start_paused = true)]
async fn the_health_monitor_gate_follows_account_then_channel_then_true_and_fails_closed() {
    let sup = supervisor();
    let off = TestPlugin::new("off", &["Exact", "Mixed Case", "plain"]);
    add_with(
        &sup,
        &off,
        json!({
            "health_monitor": { "enabled": false },
            "accounts": {
                "Exact": { "health_monitor": { "enabled": true } },
                "Mixed Case": { "health_monitor": { "enabled": true } },
                "plain": {},
            },
        }),
    )
    .await;
    let unset = TestPlugin::new("unset", &["a", "quiet"]);
    add_with(
        &sup,
        &unset,
        json!({ "accounts": { "a": {}, "quiet": { "health_monitor": { "enabled": false } } } }),
    )
    .await;

    // The account's own setting: exact, then case-insensitive, then normalised.
    assert!(sup.is_health_monitor_enabled("off", "Exact"));
    assert!(sup.is_health_monitor_enabled("off", "EXACT"));
    assert!(sup.is_health_monitor_enabled("off", "mixed-case"));
    // Else the channel's.
    assert!(!sup.is_health_monitor_enabled("off", "plain"));
    assert!(!sup.is_health_monitor_enabled("off", "not-listed"));
    // An empty id matches no account (not even `default`).
    assert!(!sup.is_health_monitor_enabled("off", ""));
    // Else true.
    assert!(sup.is_health_monitor_enabled("unset", "a"));
    assert!(!sup.is_health_monitor_enabled("unset", "quiet"));
    // An unknown channel: fail closed.
    assert!(!sup.is_health_monitor_enabled("zz", "a"));
}

#[tokio::test(start_paused = true)]
async fn the_snapshot_has_every_listed_account_and_the_default_with_their_reasons() {
    let plugin = TestPlugin::new("c", &["on", "off", "off-why", "bare", "bare-why", "Mixed"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_account(Some("main"));
    plugin.set_enabled("off", Check::No(None));
    plugin.set_enabled("off-why", Check::No(Some("switched off by ops".into())));
    plugin.set_described_configured("bare", Some(false));
    plugin.set_described_configured("bare-why", Some(false));
    plugin.set_configured("bare-why", Check::No(Some("no bot token".into())));
    let empty = TestPlugin::new("empty", &[]);
    let sup = supervisor();
    add(&sup, &plugin).await;
    add(&sup, &empty).await;

    // Before any start.
    let all = sup.snapshot();
    let c = &all["c"];
    assert_eq!(
        c.keys().collect::<Vec<_>>(),
        ["bare", "bare-why", "main", "mixed", "off", "off-why", "on"]
    );
    for (account, enabled, configured, error) in [
        ("on", true, true, None),
        ("mixed", true, true, None),
        ("main", true, true, None),
        ("off", false, true, Some("disabled")),
        ("off-why", false, true, Some("switched off by ops")),
        ("bare", true, false, Some("not configured")),
        ("bare-why", true, false, Some("no bot token")),
    ] {
        let s = &c[account];
        assert_eq!(s.account_id, account);
        assert_eq!(
            (s.enabled, s.configured),
            (enabled, configured),
            "{account}"
        );
        assert_eq!(s.last_error.as_deref(), error, "{account}");
        assert!(!s.running && !s.restart_pending, "{account}");
    }
    assert_eq!(all["empty"].keys().collect::<Vec<_>>(), ["default"]);
    // Reading the snapshot calls no plugin entry.
    let before = plugin.calls("on");
    sup.snapshot();
    assert_eq!(plugin.calls("on"), before);

    // After start-all: running ones say so; the others keep their reasons.
    sup.start_all().await;
    let all = sup.snapshot();
    let c = &all["c"];
    assert!(c["on"].running && c["mixed"].running);
    assert_eq!(c["on"].last_error, None);
    assert_eq!(c["off"].last_error.as_deref(), Some("disabled"));
    assert!(!c["off"].enabled && !c["off"].running);
    assert_eq!(c["bare-why"].last_error.as_deref(), Some("no bot token"));
    assert!(!c["bare-why"].configured && !c["bare-why"].running);
}

/// The one-account read (`GET /v1/status/{channel}/{account}`) gives exactly the full snapshot's
/// entry, for listed accounts, the default one and any spelling of an id, and names an unknown
/// channel or account.
#[tokio::test(start_paused = true)]
async fn one_accounts_snapshot_is_its_entry_of_the_whole_snapshot() {
    let plugin = TestPlugin::new("c", &["on", "off", "Mixed"]);
    let _release = plugin.release_on_drop();
    plugin.set_default_account(Some("main"));
    plugin.set_enabled("off", Check::No(Some("switched off".into())));
    let sup = supervisor();
    add(&sup, &plugin).await;
    sup.start_all().await;
    let all = sup.snapshot();
    for (asked, id) in [
        ("on", "on"),
        ("off", "off"),
        ("MIXED", "mixed"),
        ("main", "main"),
    ] {
        let one = sup.account_snapshot("c", asked).expect(asked);
        assert_eq!(one, all["c"][id], "{asked}");
    }
    assert!(matches!(
        sup.account_snapshot("nope", "on"),
        Err(SupervisorError::UnknownChannel(_))
    ));
    assert!(matches!(
        sup.account_snapshot("c", "ghost"),
        Err(SupervisorError::UnknownAccount(_))
    ));
}
