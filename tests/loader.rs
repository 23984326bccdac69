//! The loader end to end: a plugins directory full of bad files beside one good plugin, run
//! through the real `channeld check` binary and through the registry in-process; a plugin written
//! in chunks; permission checks on the directory and its files.

use std::{
    fs,
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
};

use channeld::{
    clock::SystemClock,
    registry::{Loader, PluginFileError, Registry},
    stage::{StageError, StagingDir},
    status::StatusBoard,
};

use crate::util;

fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
    dir
}

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

fn in_process_loader(state: &Path) -> Loader {
    let clock = Arc::new(SystemClock);
    let board = Arc::new(StatusBoard::new(clock.clone()));
    Loader::new(
        StagingDir::open(&state.join("staging")).unwrap(),
        board,
        clock,
    )
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
    let dir = private_dir();
    let state = private_dir();
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

    // In-process: the same directory through the registry; the good plugin is callable.
    let loader = in_process_loader(state.path());
    let mut registry = Registry::default();
    let report = registry.load_dir(&loader, dir.path()).unwrap();
    assert_eq!(report.loaded, ["fixture"]);
    assert_eq!(report.failed.len(), bad.len());
    let good = registry.get("fixture").unwrap();
    assert_eq!(good.staged.source, dir.path().join("a-good.so"));
    good.plugin
        .configure(&serde_json::json!({ "accounts": { "x": {} } }))
        .unwrap();
    assert_eq!(good.plugin.list_account_ids().unwrap(), ["x"]);
    let duplicate = report
        .failed
        .iter()
        .find(|e| e.class() == "duplicate-channel")
        .unwrap()
        .to_string();
    assert!(
        duplicate.contains("z-duplicate.so") && duplicate.contains("a-good.so"),
        "the duplicate error names both files: {duplicate}"
    );
}

#[test]
fn a_plugin_written_in_chunks_never_loads_half_written_and_loads_once_complete() {
    let dir = private_dir();
    let state = private_dir();
    let loader = in_process_loader(state.path());
    let mut registry = Registry::default();
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
        let report = registry.load_dir(&loader, dir.path()).unwrap();
        attempts += 1;
        if written < bytes.len() {
            assert!(
                report.loaded.is_empty(),
                "loaded at {written} of {} bytes",
                bytes.len()
            );
            assert!(
                matches!(
                    report.failed.as_slice(),
                    [PluginFileError::Stage(StageError::Truncated { .. })]
                ),
                "at {written} bytes: {:?}",
                report.failed
            );
        } else {
            assert_eq!(
                report.loaded,
                ["fixture"],
                "complete file loads: {:?}",
                report.failed
            );
        }
    }
    assert_eq!(attempts, 23);
    let loaded = registry.get("fixture").unwrap();
    assert_eq!(
        loaded.staged.hash,
        blake3::hash(&bytes).to_hex().to_string()
    );
    // A second pass finds the file unchanged.
    let again = registry.load_dir(&loader, dir.path()).unwrap();
    assert_eq!((again.loaded.len(), again.unchanged), (0, 1));
}

#[test]
fn a_plugins_directory_writable_by_others_is_refused_whole() {
    let dir = private_dir();
    let state = private_dir();
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
    let loader = in_process_loader(state.path());
    let report = Registry::default().load_dir(&loader, dir.path()).unwrap();
    assert_eq!(report.failed.len(), 1);
    assert_eq!(
        report.failed[0].class(),
        "foreign-owner",
        "{}",
        report.failed[0]
    );
}

#[test]
fn stale_staged_copies_are_removed_at_start_and_the_staging_dir_is_private() {
    let state = private_dir();
    let staging = state.path().join("staging");
    fs::create_dir(&staging).unwrap();
    fs::write(staging.join("leftover.so"), b"old").unwrap();
    StagingDir::open(&staging).unwrap();
    assert_eq!(fs::read_dir(&staging).unwrap().count(), 0);
    let mode = fs::metadata(&staging).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
}
