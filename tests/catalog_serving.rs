//! The catalog is the one owner of which version serves a channel and of removed channels: the
//! supervisor, driven by the real catalog over real plugin files, answers exactly what the
//! catalog lists after an add, a replace, a refused replace, a removal and a re-add.

use std::{fs, path::Path, sync::Arc, time::Instant};

use channeld::{
    catalog::{Catalog, Change},
    config::Config,
    supervise::Supervisor,
};

use crate::util;

fn config(dir: &Path, state: &Path, extra: &str) -> Arc<Config> {
    let text = format!(
        "[host]\nplugins_dir = \"{}\"\n[supervisor]\nstop_timeout = \"500ms\"\n\
         [channels.fixture]\n{extra}\n[channels.fixture.accounts.a]\nlock_dir = \"{}\"\n",
        dir.display(),
        state.display()
    );
    Arc::new(Config::parse(&text, &state.join("channeld.toml")).unwrap())
}

/// Installs `source` as `dir/fixture.so` by rename (never half written).
fn install(dir: &Path, source: &Path) {
    let tmp = dir.join(".fixture.so.tmp");
    fs::copy(source, &tmp).unwrap();
    fs::rename(&tmp, dir.join("fixture.so")).unwrap();
}

/// The version the catalog lists for `fixture` and the one the supervisor's next start uses are
/// the same plugin; returns its version.
fn one_answer(catalog: &Catalog, supervisor: &Supervisor) -> String {
    let listed = catalog
        .plugin("fixture")
        .expect("the catalog serves fixture");
    let used = supervisor
        .channel("fixture")
        .expect("the supervisor finds fixture");
    assert!(
        Arc::ptr_eq(&listed.plugin, &used.plugin),
        "the supervisor uses another version than the catalog lists"
    );
    listed.info.plugin_version.clone()
}

fn wait_running(supervisor: &Supervisor) {
    let deadline = Instant::now() + util::daemon::PATIENCE;
    while !supervisor
        .account_snapshot("fixture", "a")
        .is_ok_and(|s| s.running)
    {
        assert!(Instant::now() < deadline, "fixture:a never ran");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn the_supervisor_answers_what_the_catalog_lists_through_replace_refusal_removal_and_return() {
    let dir = util::private_dir();
    let state = util::private_dir();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (catalog, supervisor) = runtime
        .block_on(async { util::open_catalog(config(dir.path(), state.path(), ""), state.path()) });
    let path = dir.path().join("fixture.so");
    let (v1, v2) = (
        util::plugin_file("channeld-plugin-fixture"),
        util::plugin_file("channeld-plugin-fixture-v2"),
    );

    install(dir.path(), &v1);
    let change = runtime.block_on(catalog.reconcile(&path));
    assert!(matches!(change, Change::Added { .. }), "{change:?}");
    assert_eq!(one_answer(&catalog, &supervisor), "0.1.0");
    wait_running(&supervisor);

    install(dir.path(), &v2);
    let change = runtime.block_on(catalog.reconcile(&path));
    assert!(matches!(change, Change::Replaced { .. }), "{change:?}");
    assert_eq!(one_answer(&catalog, &supervisor), "0.2.0");
    wait_running(&supervisor);

    // A version the channel's config refuses never serves: both still answer 0.2.0.
    catalog.set_config(config(
        dir.path(),
        state.path(),
        "refuse_version = \"0.1.0\"",
    ));
    install(dir.path(), &v1);
    let change = runtime.block_on(catalog.reconcile(&path));
    assert!(matches!(change, Change::Failed { .. }), "{change:?}");
    assert_eq!(one_answer(&catalog, &supervisor), "0.2.0");

    // Removed: the supervisor finds no channel, and the snapshot's removed marking is there
    // exactly while the catalog lists the channel removed.
    fs::remove_file(&path).unwrap();
    let change = runtime.block_on(catalog.reconcile(&path));
    assert!(matches!(change, Change::Removed { .. }), "{change:?}");
    assert!(catalog.plugin("fixture").is_none());
    assert!(supervisor.channel("fixture").is_err());
    let listed_removed = |catalog: &Catalog| {
        catalog
            .listing()
            .plugins
            .iter()
            .any(|p| p.channel == "fixture" && p.state == "removed")
    };
    assert!(listed_removed(&catalog));
    let a = supervisor.account_snapshot("fixture", "a").unwrap();
    assert!(!a.running);
    assert_eq!(
        a.last_error.as_deref(),
        Some("the plugin providing this channel was removed")
    );

    catalog.set_config(config(dir.path(), state.path(), ""));
    install(dir.path(), &v2);
    let change = runtime.block_on(catalog.reconcile(&path));
    assert!(matches!(change, Change::Added { .. }), "{change:?}");
    assert!(!listed_removed(&catalog));
    assert_eq!(one_answer(&catalog, &supervisor), "0.2.0");
    wait_running(&supervisor);
    runtime.block_on(async {
        catalog.close().await;
        supervisor.shutdown().await;
        catalog.shutdown_plugins().await;
    });
}

/// Which channels failed to register is the catalog's fact too: start-all's summary reports a
/// channel whose file the catalog refused, with the catalog's reason, until a version serves it.
#[test]
fn start_all_reports_the_channel_whose_file_the_catalog_refused_until_a_version_serves() {
    let dir = util::private_dir();
    let state = util::private_dir();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let refusing = config(dir.path(), state.path(), "refuse_version = \"0.1.0\"");
    let (catalog, supervisor) =
        runtime.block_on(async { util::open_catalog(refusing, state.path()) });
    let path = dir.path().join("fixture.so");

    install(dir.path(), &util::plugin_file("channeld-plugin-fixture"));
    let change = runtime.block_on(catalog.reconcile(&path));
    assert!(matches!(change, Change::Failed { .. }), "{change:?}");
    let summary = runtime.block_on(supervisor.start_all());
    let error = summary["fixture"].error.as_deref().unwrap_or_default();
    assert!(error.contains("refuses this config"), "{summary:?}");
    assert_eq!(summary["fixture"].attempted, 0, "{summary:?}");

    install(dir.path(), &util::plugin_file("channeld-plugin-fixture-v2"));
    let change = runtime.block_on(catalog.reconcile(&path));
    assert!(matches!(change, Change::Added { .. }), "{change:?}");
    let summary = runtime.block_on(supervisor.start_all());
    assert_eq!(summary["fixture"].error, None, "{summary:?}");
    assert_eq!(summary["fixture"].started, 1, "{summary:?}");
    runtime.block_on(async {
        catalog.close().await;
        supervisor.shutdown().await;
        catalog.shutdown_plugins().await;
    });
}
