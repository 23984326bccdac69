//! Hot plugins with the real `channeld`: add, replace and remove plugin files while it runs; files
//! written slowly in place or truncated; a bad file added beside running ones; a rescan finding a
//! file whose event was missed. And the catalog's regressions: one install is one reconcile (the
//! host's own reads never count), a refused file is logged once, no spinning without a watcher,
//! a relative `--config`, a rescan whose client disconnects mid-replace, a replace the new
//! version's configure refuses, a constructor that blocks at startup.

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
    // `running` is the host's (the task was handed over); the counter is the task's own first
    // status patch, which may come a moment later.
    let a = daemon.wait_for_account("fixture", "a", |s| {
        s["running"] == true && !s["fixtureStarts"].is_null()
    });
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
    assert_eq!(daemon.threads_named("chd-fixture", 2), 2);
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
        daemon.threads_named("chd-fixture", 2),
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
    // The stop shows first (running = false), the reason once the channel is gone.
    let a = daemon.wait_for_account("fixture", "a", |s| {
        s["lastError"] == "the plugin providing this channel was removed"
    });
    assert_eq!(a["running"], false);
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
    // The task's own status (its counters, then `connected`) follows `running` by a moment.
    let before = daemon.wait_for_account("fixture", "a", |s| {
        s["running"] == true && s["fixtureStarts"].is_u64() && s["connected"] == true
    });
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

/// The catalog's reconcile count, from `channeld plugins --json`.
fn reconciles(daemon: &Daemon) -> u64 {
    let out = daemon.cli(&["plugins", "--json"]);
    assert!(out.status.success());
    let listing: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(listing["lastReconcileAt"].is_i64() || listing["reconciles"] == 0);
    listing["reconciles"].as_u64().unwrap()
}

#[test]
fn one_install_is_one_reconcile_and_the_hosts_own_reads_never_count() {
    let locks = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &[],
        "settle = \"200ms\"\nrescan_interval = \"500ms\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
    );
    assert_eq!(reconciles(&daemon), 0);
    install(&daemon, &fixture(), "fixture.so");
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    // Long enough for ten settle periods and ten rescans: a watcher fed by the host's own reads
    // of the file (staging opens it) would reconcile it again and again.
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert_eq!(reconciles(&daemon), 1, "{}", daemon.log());
}

#[test]
fn a_refused_file_left_in_place_is_logged_once() {
    let locks = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &[],
        "settle = \"100ms\"\nrescan_interval = \"200ms\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
    );
    let tmp = daemon.plugins_dir().join(".junk.tmp");
    fs::write(&tmp, b"not a library").unwrap();
    fs::rename(&tmp, daemon.plugins_dir().join("junk.so")).unwrap();
    daemon.wait_for_log("plugin file refused");
    std::thread::sleep(std::time::Duration::from_secs(3));
    // A rescan a user asks for does not report it again either: nothing changed.
    let out = daemon.cli(&["rescan", "--json"]);
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let junk = answer["changes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"].as_str().unwrap().ends_with("junk.so"))
        .unwrap();
    assert_eq!(junk["change"]["outcome"], "unchanged", "{answer}");
    let log = daemon.log();
    let refused = log
        .lines()
        .filter(|l| l.contains("plugin file refused") && l.contains("junk.so"))
        .count();
    assert_eq!(refused, 1, "{log}");
    let listing = plugins(&daemon);
    assert_eq!(listing.len(), 1, "still listed as failed: {listing:?}");
    assert_eq!(listing[0]["state"], "failed");
}

/// The process's CPU time (user + system), from `/proc/<pid>/stat`.
fn cpu_time(pid: u32) -> std::time::Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces) start at state (field 3);
    // utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    std::time::Duration::from_millis(ticks * 1000 / per_second)
}

#[test]
fn without_a_watcher_an_idle_daemon_does_not_spin() {
    let locks = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &[("fixture.so", fixture())],
        "watch = false\nrescan_interval = \"1s\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
    );
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    let before = cpu_time(daemon.pid());
    std::thread::sleep(std::time::Duration::from_secs(3));
    let used = cpu_time(daemon.pid()) - before;
    assert!(
        used < std::time::Duration::from_millis(100),
        "{used:?} of CPU in 3 s idle"
    );
}

#[test]
fn hot_replace_works_with_a_relative_config() {
    let locks = tempfile::tempdir().unwrap();
    let daemon = Daemon::start_with(
        &[("fixture.so", fixture())],
        "settle = \"200ms\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
        util::daemon::Start {
            relative_config: true,
            ..Default::default()
        },
    );
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    install(&daemon, &fixture_v2(), "fixture.so");
    let listing = wait_for_plugin(&daemon, |l| {
        l.first().is_some_and(|p| p["version"] == "0.2.0")
    });
    assert_eq!(listing.len(), 1, "one file, one name: {listing:?}");
    assert!(listing[0]["loadError"].is_null(), "{listing:?}");
    let file = listing[0]["file"].as_str().unwrap();
    assert!(
        Path::new(file).is_absolute() && !file.contains("/./"),
        "{file}"
    );
    daemon.wait_for_log("plugin replaced");
    daemon.wait_for_account("fixture", "a", |s| {
        s["running"] == true && s["fixtureStarts"] == 1
    });
    no_violations(locks.path());
}

#[test]
fn a_rescan_whose_client_disconnects_mid_replace_still_completes() {
    use std::io::Write as _;
    let locks = tempfile::tempdir().unwrap();
    let mut config =
        "[health]\ninterval = \"0s\"\n[supervisor]\nstop_timeout = \"2s\"\n".to_owned();
    for a in ["a", "b"] {
        // A stop hook that hangs makes each stop take the whole stop timeout: the replace is
        // slow enough to disconnect in its middle.
        config.push_str(&format!(
            "[channels.fixture.accounts.{a}]\nlock_dir = \"{}\"\nhang_in_stop = true\n",
            locks.path().display()
        ));
    }
    let daemon = Daemon::start(
        &[("fixture.so", fixture())],
        "watch = false\nrescan_interval = \"0s\"",
        &config,
        &[],
    );
    for a in ["a", "b"] {
        daemon.wait_for_account("fixture", a, |s| s["running"] == true);
    }
    install(&daemon, &fixture_v2(), "fixture.so");
    let (address, token) = daemon.api();
    let mut client = std::net::TcpStream::connect(address.trim()).unwrap();
    write!(
        client,
        "POST /v1/rescan HTTP/1.1\r\nHost: channeld\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\n\r\n",
        token.trim()
    )
    .unwrap();
    daemon.wait_for_log("replacing plugin");
    // The client goes away (Ctrl-C) while the old version's accounts are being stopped.
    drop(client);
    daemon.wait_for_log("plugin replaced");
    for a in ["a", "b"] {
        let s = daemon.wait_for_account("fixture", a, |s| {
            s["running"] == true && s["fixtureStarts"] == 1
        });
        assert_ne!(s["lastError"], "stopped", "{s}");
    }
    let listing = plugins(&daemon);
    assert_eq!(listing[0]["version"], "0.2.0", "{listing:?}");
    no_violations(locks.path());
}

#[test]
fn a_replace_whose_new_version_fails_configure_keeps_the_old_one_serving() {
    let locks = tempfile::tempdir().unwrap();
    let config = format!(
        "[channels.fixture]\nrefuse_version = \"0.2.0\"\n{}",
        accounts_config(locks.path(), &["a"])
    );
    let daemon = Daemon::start(
        &[("fixture.so", fixture())],
        "watch = false\nrescan_interval = \"0s\"",
        &config,
        &[],
    );
    let before = daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    let hash = plugins(&daemon)[0]["hash"].clone();
    install(&daemon, &fixture_v2(), "fixture.so");
    let out = daemon.cli(&["rescan", "--json"]);
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    let change = &answer["changes"][0]["change"];
    assert_eq!(change["outcome"], "failed", "{answer}");
    assert!(
        change["error"]
            .as_str()
            .unwrap()
            .contains("refuses this config"),
        "{answer}"
    );
    let listing = plugins(&daemon);
    assert_eq!(listing.len(), 1, "{listing:?}");
    let p = &listing[0];
    assert_eq!(p["state"], "loaded");
    assert_eq!(p["version"], "0.1.0", "the old version keeps serving");
    assert_eq!(p["hash"], hash);
    assert!(
        p["loadError"]
            .as_str()
            .unwrap()
            .contains("0.1.0 keeps serving"),
        "{p}"
    );
    let after = daemon.account("fixture", "a");
    assert_eq!(after["running"], true);
    assert_eq!(after["lastStartAt"], before["lastStartAt"], "untouched");
    assert_eq!(
        daemon.threads_named("chd-fixture", 2),
        2,
        "the refused version's runtime is shut down"
    );
}

#[test]
fn a_constructor_that_blocks_at_startup_times_out_while_the_api_serves() {
    let locks = tempfile::tempdir().unwrap();
    let mut daemon = Daemon::start_with(
        &[
            (
                "blocks.so",
                util::plugin_file("channeld-broken-ctor-blocks"),
            ),
            ("fixture.so", fixture()),
        ],
        "load_timeout = \"2s\"",
        &accounts_config(locks.path(), &["a"]),
        &[],
        util::daemon::Start {
            wait_loaded: false,
            ..Default::default()
        },
    );
    assert!(daemon.cli(&["status"]).status.success(), "the API serves");
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    let listing = plugins(&daemon);
    let blocks = listing
        .iter()
        .find(|p| p["file"].as_str().unwrap().ends_with("blocks.so"))
        .unwrap();
    assert_eq!(blocks["state"], "failed");
    assert!(
        blocks["loadError"]
            .as_str()
            .unwrap()
            .contains("did not return within 2s"),
        "{blocks}"
    );
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn shutdown_waits_for_the_replace_in_flight_before_stopping_accounts() {
    use std::io::Write as _;
    let locks = tempfile::tempdir().unwrap();
    let mut config =
        "[health]\ninterval = \"0s\"\n[supervisor]\nstop_timeout = \"1s\"\n".to_owned();
    config.push_str(&format!(
        "[channels.fixture.accounts.a]\nlock_dir = \"{}\"\nhang_in_stop = true\n",
        locks.path().display()
    ));
    let mut daemon = Daemon::start(
        &[("fixture.so", fixture())],
        "watch = false\nrescan_interval = \"0s\"",
        &config,
        &[],
    );
    daemon.wait_for_account("fixture", "a", |s| s["running"] == true);
    install(&daemon, &fixture_v2(), "fixture.so");
    let (address, token) = daemon.api();
    let mut client = std::net::TcpStream::connect(address.trim()).unwrap();
    write!(
        client,
        "POST /v1/rescan HTTP/1.1\r\nHost: channeld\r\nAuthorization: Bearer {}\r\n\
         Content-Length: 0\r\n\r\n",
        token.trim()
    )
    .unwrap();
    daemon.wait_for_log("replacing plugin");
    let (status, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    let at = |needle: &str| {
        log.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{log}"))
    };
    assert!(
        at("SIGTERM") < at("plugin replaced")
            && at("plugin replaced") < at("stopped: every account"),
        "the replace completes, then the accounts stop:\n{log}"
    );
    let replaced = log.lines().find(|l| l.contains("plugin replaced")).unwrap();
    assert!(
        replaced.contains("started=1"),
        "the account started on the new version before shutdown stopped it: {replaced}"
    );
    assert!(log.contains("plugin_threads=0"), "{log}");
    no_violations(locks.path());
    drop(client);
}
