//! The loader end to end: a plugins directory full of bad files beside one good plugin, run
//! through the real `channeld check` binary and through the catalog in-process; a plugin written
//! in chunks; permission checks on the directory and its files; a constructor that never returns
//! reported by `check` within the load bound.

use std::{
    fs,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use channeld::{
    catalog::{Catalog, Change},
    config::Config,
    stage::StagingDir,
};

use crate::util;

fn write_cut(source: &Path, dest: &Path, percent: usize) {
    let bytes = fs::read(source).unwrap();
    fs::write(dest, &bytes[..bytes.len() * percent / 100]).unwrap();
}

fn libz() -> PathBuf {
    [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
        "/lib64/libz.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
    .expect("libz.so.1 (Debian package zlib1g) is needed as 'a shared library of another program'")
}

/// The catalog of `dir` in-process: the daemon's own load path, with a runtime to drive it.
fn in_process_catalog(dir: &Path, state: &Path) -> (tokio::runtime::Runtime, Arc<Catalog>) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let catalog = runtime.block_on(async {
        let config = Config::parse(
            &format!("[host]\nplugins_dir = \"{}\"\n", dir.display()),
            &state.join("channeld.toml"),
        )
        .unwrap();
        util::open_catalog(Arc::new(config), state).0
    });
    (runtime, catalog)
}

/// Every bad file of the loader issue's list, by the class the host must report. The good
/// plugin is `a-good.so`; the duplicate sorts after it.
fn bad_files(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    let fixture = util::plugin_file("channeld-plugin-fixture");
    let mut bad = Vec::new();
    let mut add = |class: &'static str, name: &str| {
        let path = dir.join(name);
        bad.push((class, path.clone()));
        path
    };
    fs::write(add("empty", "empty.so"), b"").unwrap();
    write_cut(&fixture, &add("truncated", "cut10.so"), 10);
    write_cut(&fixture, &add("truncated", "cut50.so"), 50);
    write_cut(&fixture, &add("truncated", "cut70.so"), 70);
    fs::write(
        add("not-a-library", "text.so"),
        b"#!/bin/sh\necho I am not a library\n",
    )
    .unwrap();
    fs::copy(libz(), add("not-a-plugin", "libz.so")).unwrap();
    fs::copy(
        util::plugin_file("channeld-broken-no-root"),
        add("not-a-plugin", "no-root.so"),
    )
    .unwrap();
    fs::copy(
        util::plugin_file("channeld-broken-ctor-panics"),
        add("constructor-failed", "ctor-panics.so"),
    )
    .unwrap();
    fs::copy(
        util::lookalike_file(
            "abi-2.0",
            "channeld-plugin-abi2",
            "libchanneld_plugin_abi2.so",
        ),
        add("version-mismatch", "abi-2.0.so"),
    )
    .unwrap();
    fs::copy(
        util::lookalike_file(
            "abi-1.1-skewed",
            "channeld-plugin-skewed",
            "libchanneld_plugin_skewed.so",
        ),
        add("layout-mismatch", "skewed-layout.so"),
    )
    .unwrap();
    fs::copy(&fixture, add("duplicate-channel", "z-duplicate.so")).unwrap();
    let writable = add("writable-by-others", "world-writable.so");
    fs::copy(&fixture, &writable).unwrap();
    fs::set_permissions(&writable, fs::Permissions::from_mode(0o666)).unwrap();
    symlink(
        dir.join("nowhere.so.missing"),
        add("dangling-symlink", "dangling.so"),
    )
    .unwrap();
    let unreadable = add("unreadable", "unreadable.so");
    fs::copy(&fixture, &unreadable).unwrap();
    fs::set_permissions(&unreadable, fs::Permissions::from_mode(0o000)).unwrap();
    bad
}

#[test]
fn every_bad_file_gets_one_warning_line_and_the_good_plugin_loads() {
    let dir = util::private_dir();
    let state = util::private_dir();
    fs::copy(
        util::plugin_file("channeld-plugin-fixture"),
        dir.path().join("a-good.so"),
    )
    .unwrap();
    let bad = bad_files(dir.path());
    // Entries that are not plugin files are skipped without being opened: a FIFO would block a
    // reader forever, so the run finishing at all shows it was not read.
    fs::create_dir(dir.path().join("subdir.so")).unwrap();
    fs::write(dir.path().join("README.txt"), "notes").unwrap();
    let fifo = dir.path().join("fifo.so");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success(), "mkfifo");

    let out = Command::new(env!("CARGO_BIN_EXE_channeld"))
        .args(["check", "--plugins-dir"])
        .arg(dir.path())
        .arg("--state-dir")
        .arg(state.path())
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(1),
        "alive, and failing because of the bad files:\n{stderr}"
    );

    let warnings: Vec<&str> = stderr.lines().filter(|l| l.contains(" WARN ")).collect();
    assert_eq!(
        warnings.len(),
        bad.len(),
        "one warning per bad file:\n{stderr}"
    );
    for (class, path) in &bad {
        let needle = format!("{}:", path.display());
        let lines: Vec<_> = warnings.iter().filter(|l| l.contains(&needle)).collect();
        assert_eq!(
            lines.len(),
            1,
            "{}: exactly one line:\n{stderr}",
            path.display()
        );
        assert!(
            lines[0].contains(&format!("class=\"{class}\"")),
            "{}: class {class}: {}",
            path.display(),
            lines[0]
        );
    }
    assert!(
        !stderr.contains("Type Layout") && stderr.lines().count() < 40,
        "no layout dump at the default level:\n{stderr}"
    );
    let layout = warnings
        .iter()
        .find(|l| l.contains("skewed-layout.so"))
        .unwrap();
    assert!(
        layout.contains("expected field_name:channel_id, found field_name:display_name"),
        "the one line says what differs: {layout}"
    );
    let good = dir.path().join("a-good.so");
    assert!(
        stdout.contains(&format!("ok      {}  fixture", good.display())),
        "{stdout}"
    );
    for entry in ["subdir.so", "README.txt", "fifo.so"] {
        assert!(
            !stderr.contains(entry),
            "{entry} must be skipped silently:\n{stderr}"
        );
    }

    // In-process: the same directory through the catalog; the good plugin is callable.
    let state = util::private_dir();
    let (runtime, catalog) = in_process_catalog(dir.path(), state.path());
    runtime.block_on(catalog.load_initial()).unwrap();
    let listing = catalog.listing();
    let of = |state: &str| -> Vec<_> {
        listing
            .plugins
            .iter()
            .filter(|p| p.state == state)
            .cloned()
            .collect()
    };
    let loaded: Vec<_> = of("loaded").into_iter().map(|p| p.channel).collect();
    assert_eq!(loaded, ["fixture"]);
    assert_eq!(of("failed").len(), bad.len(), "{:?}", of("failed"));
    let good = catalog.plugin("fixture").unwrap();
    assert_eq!(good.staged.source, dir.path().join("a-good.so"));
    good.plugin
        .configure(&serde_json::json!({ "accounts": { "x": {} } }))
        .unwrap();
    assert_eq!(good.plugin.list_account_ids().unwrap(), ["x"]);
    let duplicate = of("failed")
        .into_iter()
        .find(|p| p.file.ends_with("z-duplicate.so"))
        .and_then(|p| p.load_error)
        .unwrap();
    assert!(
        duplicate.contains("z-duplicate.so") && duplicate.contains("a-good.so"),
        "the duplicate error names both files: {duplicate}"
    );
}

#[test]
fn a_plugin_written_in_chunks_never_loads_half_written_and_loads_once_complete() {
    let dir = util::private_dir();
    let state = util::private_dir();
    let (runtime, catalog) = in_process_catalog(dir.path(), state.path());
    let bytes = fs::read(util::plugin_file("channeld-plugin-fixture")).unwrap();
    let path = dir.path().join("slow.so");
    let chunk = bytes.len() / 23 + 1;
    let mut written = 0;
    let mut attempts = 0;
    while written < bytes.len() {
        let end = (written + chunk).min(bytes.len());
        let mut file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        std::io::Write::write_all(&mut file, &bytes[written..end]).unwrap();
        drop(file);
        written = end;
        let change = runtime.block_on(catalog.reconcile(&path));
        attempts += 1;
        if written < bytes.len() {
            assert!(
                matches!(&change, Change::Failed { class, .. } if class == "truncated"),
                "at {written} of {} bytes: {change:?}",
                bytes.len()
            );
        } else {
            assert!(
                matches!(&change, Change::Added { channel, .. } if channel == "fixture"),
                "complete file loads: {change:?}"
            );
        }
    }
    assert_eq!(attempts, 23);
    let loaded = catalog.plugin("fixture").unwrap();
    assert_eq!(
        loaded.staged.hash,
        blake3::hash(&bytes).to_hex().to_string()
    );
    // A second pass finds the file unchanged.
    let again = runtime.block_on(catalog.reconcile(&path));
    assert_eq!(again, Change::Unchanged);
}

#[test]
fn a_plugins_directory_writable_by_others_is_refused_whole() {
    let dir = util::private_dir();
    let state = util::private_dir();
    fs::copy(
        util::plugin_file("channeld-plugin-fixture"),
        dir.path().join("good.so"),
    )
    .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_channeld"))
        .args(["check", "--plugins-dir"])
        .arg(dir.path())
        .arg("--state-dir")
        .arg(state.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("writable by others than its owner"),
        "{stderr}"
    );
    assert!(
        stderr.contains("chmod go-w"),
        "says how to fix it: {stderr}"
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ok "),
        "nothing loads"
    );

    // A file owned by another user (not root, not us) is refused too.
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let foreign = dir.path().join("good.so");
    std::os::unix::fs::chown(&foreign, Some(4242), None).unwrap();
    let (runtime, catalog) = in_process_catalog(dir.path(), state.path());
    let change = runtime.block_on(catalog.reconcile(&foreign));
    assert!(
        matches!(&change, Change::Failed { class, .. } if class == "foreign-owner"),
        "{change:?}"
    );
}

#[test]
fn stale_staged_copies_are_removed_at_start_and_the_staging_dir_is_private() {
    let state = util::private_dir();
    let staging = state.path().join("staging");
    fs::create_dir(&staging).unwrap();
    fs::write(staging.join("leftover.so"), b"old").unwrap();
    StagingDir::open(&staging).unwrap();
    assert_eq!(fs::read_dir(&staging).unwrap().count(), 0);
    let mode = fs::metadata(&staging).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}

/// `channeld check` loads through the daemon's own bounded path: a plugin whose constructor
/// never returns is reported by its file name once `load_timeout` has passed, the good plugin is
/// still checked, and the exit code is 1 (it used to hang `check` for good).
#[test]
fn check_reports_a_constructor_that_never_returns_by_its_file_within_the_load_timeout() {
    let dir = util::private_dir();
    let state = util::private_dir();
    let etc = util::private_dir();
    fs::copy(
        util::plugin_file("channeld-plugin-fixture"),
        dir.path().join("a-good.so"),
    )
    .unwrap();
    fs::copy(
        util::plugin_file("channeld-broken-ctor-blocks"),
        dir.path().join("blocks.so"),
    )
    .unwrap();
    let config = etc.path().join("channeld.toml");
    fs::write(
        &config,
        format!(
            "[host]\nplugins_dir = \"{}\"\nload_timeout = \"3s\"\n\
             [channels.fixture.accounts.x]\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut check = Command::new(env!("CARGO_BIN_EXE_channeld"))
        .args(["check", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(state.path())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + util::daemon::PATIENCE;
    while check.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = check.kill();
            let out = check.wait_with_output().unwrap();
            panic!(
                "check still runs after {:?}:\n{}",
                util::daemon::PATIENCE,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = check.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    let blocks = dir.path().join("blocks.so");
    assert!(
        stdout.contains(&format!(
            "refused {}: loading did not return within 3s",
            blocks.display()
        )),
        "{stdout}\n{stderr}"
    );
    let good = dir.path().join("a-good.so");
    assert!(
        stdout.contains(&format!("ok      {}  fixture", good.display()))
            && stdout.contains("(1 account)"),
        "{stdout}\n{stderr}"
    );
}
