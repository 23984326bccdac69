//! Interface versions across real builds, with look-alike `channeld-plugin-abi` crates under
//! `tests/fixtures/abi-lookalike/` (they carry the real package name, because abi_stable compares
//! it; so they are workspaces of their own, built into `target/lookalike`):
//! * a plugin built against 1.0 (the real `fixture`) still loads, and works, in a host built
//!   against a 1.1 whose root module has one entry appended after `shutdown`, and that entry reads
//!   as absent. abi_stable 0.11.3 refuses a root module with fewer fields than the host's, so that
//!   host checks a 1.0 plugin against the frozen 1.0 root module it keeps (see
//!   `abi-1.1/host/src/main.rs`); the test pins both the refusal and the fallback;
//! * a plugin built against a 2.0 is refused by this (1.x) host with one line naming the file and
//!   both versions.

use std::{path::PathBuf, process::Command};

use channeld::load::{LoadError, host_abi_version, load_root_module};
use serde_json::{Value, json};

use crate::util;

/// The host built against the plugin-abi 1.1 look-alike (once per test process).
fn abi11_host() -> PathBuf {
    util::lookalike_file("abi-1.1", "channeld-abi11-host", "abi11-host")
}

/// The plugin built against the plugin-abi 2.0 look-alike (once per test process).
pub fn abi2_plugin() -> PathBuf {
    util::lookalike_file(
        "abi-2.0",
        "channeld-plugin-abi2",
        "libchanneld_plugin_abi2.so",
    )
}

#[test]
fn a_1_0_plugin_loads_and_works_in_a_1_1_host_without_the_appended_entry() {
    let plugin = util::plugin_file("channeld-plugin-fixture");
    let out = Command::new(abi11_host())
        .arg(&plugin)
        .output()
        .expect("run the 1.1 host");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the 1.1 host should load {}: {}\n{}",
        plugin.display(),
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line expected: {stdout}");
    let report: Value = serde_json::from_str(lines[0]).expect("a JSON line");

    assert_eq!(report["loaded"], true, "{report}");
    assert_eq!(report["host_abi_version"], "1.1.0", "{report}");
    assert_eq!(report["plugin_abi_version"], host_abi_version(), "{report}");
    // Calls through the 1.1 view of the 1.0 module work.
    assert_eq!(report["channel_id"], "fixture", "{report}");
    assert_eq!(report["account_ids"], json!(["a", "b"]), "{report}");
    // The entry appended in 1.1 is `None` for a 1.0 plugin.
    assert_eq!(report["appended_entry_present"], false, "{report}");
    // abi_stable 0.11.3 refuses a root module with fewer fields than the host's type, so the 1.1
    // host cannot take a 1.0 plugin with a plain `init_root_module::<PluginMod_Ref>()`: it checks
    // the plugin against the frozen 1.0 root module instead. If abi_stable starts accepting it,
    // this fails and the fallback can go.
    assert_eq!(report["loaded_via"], "1.0 layout", "{report}");
    let refusal = report["latest_layout_error"].as_str().unwrap_or_default();
    assert!(
        refusal.contains("too many fields") && refusal.contains("17") && refusal.contains("16"),
        "{report}"
    );
}

#[test]
fn a_plugin_of_another_major_is_refused_with_one_line() {
    let file = abi2_plugin();
    let error = match load_root_module(&file) {
        Ok(_) => panic!("a plugin built against plugin-abi 2.0.0 loaded in a 1.x host"),
        Err(e) => e,
    };
    let line = error.to_string();
    let LoadError::Version { path, plugin, host } = &error else {
        panic!("expected a version mismatch, got: {line}");
    };
    assert_eq!(path, &file);
    assert_eq!(plugin, "2.0.0");
    assert!(host.starts_with("1."), "{host}");
    assert_eq!(error.class(), "version-mismatch");

    assert!(!line.contains('\n'), "one line expected: {line:?}");
    assert!(line.contains(&file.display().to_string()), "{line}");
    assert!(line.contains("2.0.0"), "{line}");
    assert!(line.contains(host_abi_version()), "{line}");
}
