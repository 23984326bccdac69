//! The supervisor asks its source which registration serves a channel, and which channels were
//! removed, every time: a change the source makes without telling the supervisor is what the
//! next start, revival or snapshot sees (a copy kept in the supervisor would go stale here).

use super::*;
use crate::supervise::{StartOutcome, hot::REMOVED, serving::Table};

/// A supervisor whose source is `owner`, a table the test writes directly (the catalog's part).
fn owned_by(owner: &Arc<Table>) -> Supervisor {
    let sup = supervisor();
    sup.set_serving(owner.clone());
    sup
}

async fn register(sup: &Supervisor, plugin: &Arc<TestPlugin>) -> Arc<crate::supervise::Channel> {
    let plugin: Arc<dyn Plugin> = plugin.clone();
    sup.register(plugin, ChannelSection { table: json!({}) })
        .await
        .expect("the channel registers")
}

#[tokio::test(start_paused = true)]
async fn starts_use_exactly_the_version_the_source_serves_and_a_failed_one_never_serves() {
    let (v1, v2, v3) = (
        TestPlugin::new("c", &["a"]),
        TestPlugin::new("c", &["a"]),
        TestPlugin::new("c", &["a"]),
    );
    let _release = (
        v1.release_on_drop(),
        v2.release_on_drop(),
        v3.release_on_drop(),
    );
    let owner = Arc::new(Table::default());
    let sup = owned_by(&owner);

    // Registered but not yet served: the supervisor keeps nothing of it.
    let r1 = register(&sup, &v1).await;
    assert!(
        sup.channel("c").is_err(),
        "no copy before the owner serves it"
    );
    owner.insert(r1.clone());
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert_eq!((v1.calls("a").start, v2.calls("a").start), (1, 0));

    // The owner moves the channel to v2 without a word to the supervisor: the next start uses
    // v2, while v1's running task stops on v1.
    let r2 = register(&sup, &v2).await;
    owner.insert(r2.clone());
    assert!(Arc::ptr_eq(&sup.channel("c").unwrap(), &r2));
    stop(&sup, "c", "a").await;
    assert_eq!(
        v1.calls("a").abort,
        1,
        "the old task stops on the version it started on"
    );
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert_eq!((v1.calls("a").start, v2.calls("a").start), (1, 1));

    // A version whose registration fails never serves: v2 keeps every start.
    v3.fail_listing("boom");
    let plugin: Arc<dyn Plugin> = v3.clone();
    assert!(
        sup.register(plugin, ChannelSection { table: json!({}) })
            .await
            .is_err()
    );
    stop(&sup, "c", "a").await;
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);
    assert_eq!((v2.calls("a").start, v3.calls("a").start), (2, 0));
    assert!(Arc::ptr_eq(&sup.channel("c").unwrap(), &r2));

    // With an owner installed, the supervisor's own table is gone.
    let plugin: Arc<dyn Plugin> = v1.clone();
    assert!(
        sup.add_channel(plugin, ChannelSection { table: json!({}) })
            .await
            .is_err()
    );
    assert!(sup.remove_channel("c").await.is_err());
}

#[tokio::test(start_paused = true)]
async fn the_removed_marking_comes_and_goes_with_the_sources_listing() {
    let (v1, v2) = (TestPlugin::new("c", &["a"]), TestPlugin::new("c", &["b"]));
    let _release = (v1.release_on_drop(), v2.release_on_drop());
    let owner = Arc::new(Table::default());
    let sup = owned_by(&owner);
    let r1 = register(&sup, &v1).await;
    owner.insert(r1.clone());
    assert_eq!(start(&sup, "c", "a").await, StartOutcome::Started);

    // Removed by the owner: from that moment `a` shows under `c` (still running until stopped),
    // then stops and is marked removed.
    owner.remove("c");
    assert!(sup.channel("c").is_err());
    let snapshot = sup.snapshot();
    let ids: Vec<&str> = snapshot["c"].keys().collect();
    assert_eq!(ids, ["a"], "listed while it stops");
    assert!(sup.account_snapshot("c", "a").is_ok());
    sup.stop_removed(&r1).await;
    assert!(sup.channel("c").is_err());
    let s = sup
        .account_snapshot("c", "a")
        .expect("kept, marked removed");
    assert_eq!(s.last_error.as_deref(), Some(REMOVED));
    assert!(!s.running);
    let snapshot = sup.snapshot();
    let ids: Vec<&str> = snapshot["c"].keys().collect();
    assert_eq!(ids, ["a"]);

    // Back, listing only `b`: the removed marking goes with the owner's listing, not before.
    let r2 = register(&sup, &v2).await;
    assert!(
        sup.account_snapshot("c", "a").is_ok(),
        "still removed until the owner serves the new registration"
    );
    owner.insert(r2);
    let snapshot = sup.snapshot();
    let ids: Vec<&str> = snapshot["c"].keys().collect();
    assert_eq!(ids, ["b"], "{snapshot:?}");
    assert!(sup.account_snapshot("c", "a").is_err());
    assert_eq!(start(&sup, "c", "b").await, StartOutcome::Started);
    assert_eq!(v2.calls("b").start, 1);
}
