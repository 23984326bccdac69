//! Rule 7 (start-all goes on past a failing plugin, with a summary per channel) and the startup
//! fan-out (at most 4 accounts of a channel, and 4 channels, booting at once).

use std::{collections::BTreeMap, time::Duration};

use super::*;
use crate::supervise::{ChannelStartSummary, StopOutcome, SupervisorError};

fn summary(
    attempted: usize,
    started: usize,
    failed: usize,
    timed_out: usize,
) -> ChannelStartSummary {
    ChannelStartSummary {
        attempted,
        started,
        failed,
        timed_out,
        error: None,
    }
}

#[tokio::test(start_paused = true)]
async fn start_all_goes_on_past_failing_plugins_and_sums_up_per_channel() {
    let sup = supervisor();
    let good = TestPlugin::new("good", &["a", "b"]);
    let start_fails = TestPlugin::new("start-fails", &["a", "b"]);
    let config_fails = TestPlugin::new("config-fails", &["a"]);
    let mixed = TestPlugin::new("mixed", &["on", "off", "bare"]);
    let list_fails = TestPlugin::new("list-fails", &["a"]);
    let slow = TestPlugin::new("slow", &["a", "b"]);
    let empty = TestPlugin::new("empty", &[]);
    let _release = [&good, &start_fails, &config_fails, &mixed, &slow].map(|p| p.release_on_drop());
    for account in ["a", "b"] {
        start_fails.set_default_run(account, Run::FailStart("401 unauthorized".into()));
    }
    config_fails.fail_entry("a", Entry::IsEnabled, "bad config");
    mixed.set_enabled("off", Check::No(None));
    mixed.set_configured("bare", Check::No(None));
    list_fails.fail_listing("accounts table is not a table");
    let gate = slow.gate("a", Entry::Start);

    for plugin in [&good, &start_fails, &config_fails, &mixed, &slow, &empty] {
        add(&sup, plugin).await;
    }
    let list_error = {
        let plugin: Arc<dyn Plugin> = list_fails.clone();
        match sup.add_channel(plugin, ChannelSection::default()).await {
            Err(SupervisorError::Plugin(e)) => e,
            Err(other) => panic!("{other:?}"),
            Ok(_) => panic!("list-fails registered"),
        }
    };
    assert!(list_error.contains("list-fails"), "{list_error}");
    assert!(
        list_error.contains("accounts table is not a table"),
        "{list_error}"
    );

    let all = tokio::spawn({
        let sup = sup.clone();
        async move { sup.start_all().await }
    });
    gate.entered(1).await;
    // slow:a's start holds a thread: time moves by hand, to the 30 s start timeout.
    let step = Duration::from_millis(10);
    let took = advance_until(step, 60 * SEC, || all.is_finished()).await;
    assert!(took >= 30 * SEC && took <= 30 * SEC + 2 * step, "{took:?}");
    let summaries = all.await.unwrap();

    let expected: BTreeMap<String, ChannelStartSummary> = [
        ("good", summary(2, 2, 0, 0)),
        ("start-fails", summary(2, 0, 2, 0)),
        ("config-fails", summary(1, 0, 1, 0)),
        ("mixed", summary(3, 1, 2, 0)),
        ("slow", summary(2, 1, 0, 1)),
        ("empty", summary(0, 0, 0, 0)),
        (
            "list-fails",
            ChannelStartSummary {
                error: Some(list_error),
                ..ChannelStartSummary::default()
            },
        ),
    ]
    .into_iter()
    .map(|(id, s)| (id.to_owned(), s))
    .collect();
    assert_eq!(summaries, expected);
    assert!(snap(&sup, "good", "a").running && snap(&sup, "good", "b").running);
    assert!(snap(&sup, "slow", "b").running);
    let config = snap(&sup, "config-fails", "a");
    assert!(!config.running);
    assert!(config.last_error.unwrap().contains("bad config"));
}

#[tokio::test(start_paused = true)]
async fn registration_refuses_two_ids_that_normalise_to_one_account() {
    let sup = supervisor();
    let plugin: Arc<dyn Plugin> = TestPlugin::new("c", &["Libera", "libera"]);
    match sup.add_channel(plugin, ChannelSection::default()).await {
        Err(SupervisorError::Plugin(e)) => {
            assert!(e.contains("\"Libera\" and \"libera\""), "{e}");
        }
        Err(other) => panic!("{other:?}"),
        Ok(_) => panic!("registered"),
    }
    // Start-all reports it; there is nothing else to start.
    let summaries = sup.start_all().await;
    assert!(summaries["c"].error.is_some());
    assert_eq!(summaries["c"].attempted, 0);
}

/// The fan-out counts accounts, not calls: boots go to the plugin in batches (one
/// `boot_accounts` call each), and a batch of k counts as k booting accounts. A stop of an account
/// still booting wins (its start is never called), and every other account starts once.
#[tokio::test(start_paused = true)]
async fn at_most_4_accounts_of_a_channel_boot_at_once() {
    let accounts: Vec<String> = (0..10).map(|i| format!("a{i}")).collect();
    let names: Vec<&str> = accounts.iter().map(String::as_str).collect();
    let plugin = TestPlugin::new("c", &names);
    let _release = plugin.release_on_drop();
    let gate = Gate::new();
    for account in &names {
        plugin.set_gate(account, Entry::IsConfigured, gate.clone());
    }
    let sup = supervisor();
    add(&sup, &plugin).await;
    let all = tokio::spawn({
        let sup = sup.clone();
        async move { sup.start_all().await }
    });
    // Each batch waits in its first account's check: the batches in flight fill the 4 slots.
    plugin.booting(4).await;
    // Give a fifth boot every chance to come in.
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(plugin.booting_now(), 4);
    // A stop of the last account, queued or inside a batch: it wins either way.
    let stopping = tokio::spawn({
        let sup = sup.clone();
        async move { stop(&sup, "c", "a9").await }
    });
    until("the stop has landed", || {
        sup.is_manually_stopped(&key("c", "a9"))
    })
    .await;
    // Let the checks through one by one: each batch that returns lets more in.
    for _ in 0..10 {
        gate.allow(1);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(plugin.booting_now() <= 4);
    }
    gate.open();
    assert_eq!(stopping.await.unwrap(), StopOutcome::Stopped);
    let summaries = all.await.unwrap();
    assert_eq!(summaries["c"].attempted, 10);
    assert_eq!(summaries["c"].started, 9);
    assert_eq!(plugin.max_booting(), 4);
    for account in &names[..9] {
        assert_eq!(plugin.calls(account).start, 1, "{account}");
    }
    assert_eq!(plugin.calls("a9").start, 0);
    assert!(!snap(&sup, "c", "a9").running);
}

#[tokio::test(start_paused = true)]
async fn at_most_4_channels_boot_at_once() {
    let sup = supervisor();
    let gate = Gate::new();
    let mut plugins = Vec::new();
    for i in 0..6 {
        let plugin = TestPlugin::new(&format!("c{i}"), &["a"]);
        plugin.set_gate("a", Entry::IsConfigured, gate.clone());
        add(&sup, &plugin).await;
        plugins.push(plugin);
    }
    let _release: Vec<_> = plugins.iter().map(|p| p.release_on_drop()).collect();
    let all = tokio::spawn({
        let sup = sup.clone();
        async move { sup.start_all().await }
    });
    gate.entered(4).await;
    for _ in 0..1000 {
        tokio::task::yield_now().await;
    }
    assert_eq!(gate.arrivals(), 4);
    for n in 5..=6 {
        gate.allow(1);
        gate.entered(n).await;
    }
    gate.open();
    let summaries = all.await.unwrap();
    assert_eq!(summaries.len(), 6);
    assert!(summaries.values().all(|s| *s == summary(1, 1, 0, 0)));
    assert_eq!(gate.max_inside(), 4);
}
