//! Hot plugins with the real `channeld`: add, replace and remove plugin files while it runs; files
//! written slowly in place or truncated; a bad file added beside running ones; a rescan finding a
//! file whose event was missed.

use std::{fs, path::Path};

use serde_json::Value;

use crate::util::{self, daemon::Daemon};

fn fixture() -> std::path::PathBuf {
    util::plugin_file("channeld-plugin-fixture")
}

fn fixture_v2() -> std::path::PathBuf {
    util::plugin_file("channeld-plugin-fixture-v2")
}

/// Installs `source` as `name` the safe way: a temporary name not ending in `.so`, then rename.
fn install(daemon: &Daemon, source: &Path, name: &str) {
    let tmp = daemon.plugins_dir().join(format!(".{name}.tmp"));
    fs::copy(source, &tmp).unwrap();
    fs::rename(&tmp, daemon.plugins_dir().join(name)).unwrap();
}

fn accounts_config(lock_dir: &Path, accounts: &[&str]) -> String {
    let mut config =
        "[health]\ninterval = \"0s\"\n[supervisor]\nstop_timeout = \"500ms\"\n".to_owned();
    for a in accounts {
        config.push_str(&format!(
            "[channels.fixture.accounts.{a}]\nlock_dir = \"{}\"\n",
            lock_dir.display()
        ));
    }
    config
}

fn plugins(daemon: &Daemon) -> Vec<Value> {
    let out = daemon.cli(&["plugins", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing: Value = serde_json::from_slice(&out.stdout).unwrap();
    listing["plugins"].as_array().unwrap().clone()
}

fn wait_for_plugin(daemon: &Daemon, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = std::time::Instant::now() + util::daemon::PATIENCE;
    loop {
        let listing = plugins(daemon);
        if ready(&listing) {
            return listing;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "plugins never reached the expected state: {listing:?}\n{}",
            daemon.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn no_violations(lock_dir: &Path) {
    let violations: Vec<_> = fs::read_dir(lock_dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".violations"))
        .map(|e| fs::read_to_string(e.path()).unwrap())
        .collect();
    assert!(
        violations.is_empty(),
        "two tasks of one account overlapped: {violations:?}"
    );
}

#[test]
fn a_plugin_renamed_into_the_directory_comes_up_and_is_listed() {
    let locks = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &[],
        "settle = \"200ms\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
    );
    assert!(plugins(&daemon).is_empty());
    install(&daemon, &fixture(), "fixture.so");
    let a = daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    assert_eq!(a["fixtureStarts"], 1);
    let listing = plugins(&daemon);
    assert_eq!(listing.len(), 1, "{listing:?}");
    let p = &listing[0];
    assert_eq!(p["channel"], "fixture");
    assert_eq!(p["state"], "loaded");
    assert_eq!(p["version"], "0.1.0");
    assert_eq!(p["versionsMapped"], 1);
    assert_eq!(p["hash"].as_str().unwrap().len(), 64);
    assert!(p["file"].as_str().unwrap().ends_with("plugins/fixture.so"));
    let table = daemon.cli(&["plugins"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("fixture  loaded  0.1.0"));
}

#[test]
fn a_replaced_plugin_moves_every_account_to_the_new_version_one_task_at_a_time() {
    let locks = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start(
        &[("fixture.so", fixture())],
        "settle = \"200ms\"",
        &accounts_config(locks.path(), &["a", "b", "parked"]),
        &[],
    );
    for a in ["a", "b", "parked"] {
        daemon.wait_for_account("fixture", a, |s| s["running"] == true);
    }
    let stopped = daemon.cli(&["stop", "fixture:parked"]);
    assert!(stopped.status.success());
    let threads = |d: &Daemon| {
        d.thread_names()
            .iter()
            .filter(|n| *n == "chd-fixture")
            .count()
    };
    assert_eq!(threads(&daemon), 2);
    let before = daemon.account("fixture", "a")["lastStartAt"]
        .as_i64()
        .unwrap();

    install(&daemon, &fixture_v2(), "fixture.so");
    let listing = wait_for_plugin(&daemon, |l| {
        l.first().is_some_and(|p| p["version"] == "0.2.0")
    });
    assert_eq!(
        listing[0]["versionsMapped"], 2,
        "the old version stays mapped"
    );
    for a in ["a", "b"] {
        let s = daemon.wait_for_account("fixture", a, |s| {
            s["running"] == true && s["lastStartAt"].as_i64() > Some(before)
        });
        assert_eq!(
            s["fixtureStarts"], 1,
            "{a} runs on the new library (its own counters)"
        );
    }
    let parked = daemon.account("fixture", "parked");
    assert_eq!(
        parked["running"], false,
        "a user's stop survives the replacement"
    );
    daemon.wait_for_log("plugin replaced");
    no_violations(locks.path());
    assert_eq!(
        threads(&daemon),
        2,
        "the old version's runtime threads are gone"
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn a_removed_plugin_stops_its_accounts_and_shows_as_removed() {
    let locks = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &[("fixture.so", fixture())],
        "settle = \"200ms\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
    );
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    fs::remove_file(daemon.plugins_dir().join("fixture.so")).unwrap();
    let a = daemon.wait_for_account("fixture", "a", |s| s["running"] == false);
    assert_eq!(
        a["lastError"],
        "the plugin providing this channel was removed"
    );
    let listing = wait_for_plugin(&daemon, |l| l.iter().any(|p| p["state"] == "removed"));
    assert_eq!(listing[0]["channel"], "fixture");
    // Putting it back brings the channel back.
    install(&daemon, &fixture(), "fixture.so");
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    no_violations(locks.path());
}

#[test]
fn slow_in_place_writes_and_truncated_files_never_load_half_written_nor_crash() {
    let locks = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &[],
        "settle = \"400ms\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
    );
    let bytes = fs::read(fixture()).unwrap();

    // A truncated file stays refused, and the host stays up.
    fs::write(
        daemon.plugins_dir().join("cut.so"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let listing = wait_for_plugin(&daemon, |l| l.iter().any(|p| p["state"] == "failed"));
    let cut = listing.iter().find(|p| p["state"] == "failed").unwrap();
    assert!(
        cut["loadError"]
            .as_str()
            .unwrap()
            .contains("incomplete shared library"),
        "{cut}"
    );

    // A file written in place in chunks loads once, complete.
    let path = daemon.plugins_dir().join("slow.so");
    let chunk = bytes.len() / 10 + 1;
    for piece in bytes.chunks(chunk) {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, piece).unwrap();
        drop(file);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    let listing = plugins(&daemon);
    let slow = listing
        .iter()
        .find(|p| p["file"].as_str().unwrap().ends_with("slow.so"))
        .unwrap();
    assert_eq!(
        slow["hash"],
        blake3::hash(&bytes).to_hex().to_string(),
        "the complete file loaded"
    );
    assert!(daemon.cli(&["status"]).status.success(), "alive");
}

#[test]
fn a_bad_file_added_while_others_run_is_reported_and_changes_nothing_else() {
    let locks = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &[("fixture.so", fixture())],
        "settle = \"100ms\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
    );
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    let before = daemon.account("fixture", "a");
    fs::write(daemon.plugins_dir().join(".junk.tmp"), b"not a library").unwrap();
    fs::rename(
        daemon.plugins_dir().join(".junk.tmp"),
        daemon.plugins_dir().join("junk.so"),
    )
    .unwrap();
    let listing = wait_for_plugin(&daemon, |l| l.iter().any(|p| p["state"] == "failed"));
    let junk = listing.iter().find(|p| p["state"] == "failed").unwrap();
    assert!(
        junk["loadError"]
            .as_str()
            .unwrap()
            .contains("not a shared library"),
        "{junk}"
    );
    daemon.wait_for_log("plugin file refused");
    assert_eq!(
        daemon.account("fixture", "a"),
        before,
        "the running account is untouched"
    );
}

#[test]
fn a_rescan_finds_a_file_whose_event_was_missed() {
    let locks = tempfile::tempdir().unwrap();
    // No watcher and no periodic rescan: only `channeld rescan` can find the file.
    let daemon = Daemon::start(
        &[],
        "watch = false\nrescan_interval = \"0s\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
    );
    daemon.wait_for_log("watching the plugins directory");
    install(&daemon, &fixture(), "fixture.so");
    assert!(plugins(&daemon).is_empty(), "nothing saw the file yet");
    let out = daemon.cli(&["rescan"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("added fixture"));
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
}

#[test]
fn a_periodic_rescan_stands_in_for_a_watcher_that_is_off() {
    let locks = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &[],
        "watch = false\nrescan_interval = \"100ms\"\nsettle = \"100ms\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
    );
    install(&daemon, &fixture(), "fixture.so");
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
}
