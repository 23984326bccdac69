//! Interface versions across real builds, with look-alike `channeld-plugin-abi` crates under
//! `tests/fixtures/abi-lookalike/` (they carry the real package name, because abi_stable compares
//! it; so they are workspaces of their own, built into `target/lookalike`):
//! * a plugin built against the frozen 1.0 crate loads in this 1.1 host through the frozen 1.0
//!   layouts (abi_stable 0.11.3 refuses it against the 1.1 root module: "too many fields");
//! * a 1.1 plugin refuses a host built against 1.0 (no host-version key) in one line;
//! * a plugin built against a newer minor (1.2), which abi_stable would accept, is refused by this
//!   host with one line naming both versions;
//! * a plugin built against a 2.0 is refused by this (1.x) host with one line naming the file and
//!   both versions.

use std::process::Command;

use abi_stable::library::{RootModule, lib_header_from_path};
use channeld::{
    ffi::FfiPlugin,
    load::{LoadError, PluginModule, host_abi_version, load_root_module},
    plugin::Plugin,
};
use channeld_plugin_abi::abi::PluginMod_Ref;

use crate::util;

/// The plugin built against the plugin-abi 2.0 look-alike (once per test process).
pub fn abi2_plugin() -> std::path::PathBuf {
    util::lookalike_file(
        "abi-2.0",
        "channeld-plugin-abi2",
        "libchanneld_plugin_abi2.so",
    )
}

#[test]
fn a_1_0_plugin_loads_through_the_frozen_1_0_layouts() {
    let file = util::lookalike_file(
        "abi-1.0",
        "channeld-plugin-fixture10",
        "libchanneld_plugin_fixture10.so",
    );
    let dir = tempfile::tempdir().unwrap();
    let copy = util::copy_plugin(&file, dir.path(), "fixture10-versions.so");
    // The plain 1.1 check refuses it: why the host keeps the 1.0 layouts. If abi_stable starts
    // accepting it, this fails and the fallback can go.
    let refusal = lib_header_from_path(&copy)
        .and_then(|h| h.init_root_module::<PluginMod_Ref>())
        .err()
        .expect("abi_stable refuses a 1.0 root module against the 1.1 layout")
        .to_string();
    assert!(refusal.contains("too many fields"), "{refusal}");

    let module = load_root_module(&copy).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(module, PluginModule::V1_0(_)));
    let plugin = FfiPlugin::new(module, &copy).unwrap();
    assert_eq!(plugin.info().abi_version, "1.0.0");
    assert_eq!(plugin.info().channel_id, "fixture");
    assert_eq!(
        PluginMod_Ref::VERSION_STRINGS.version.as_str(),
        host_abi_version()
    );
}

#[test]
fn a_1_1_plugin_refuses_a_1_0_host_with_one_line() {
    let host = util::lookalike_file("abi-1.0", "channeld-abi10-host", "abi10-host");
    let plugin = util::plugin_file("channeld-plugin-fixture");
    let out = Command::new(host)
        .arg(&plugin)
        .output()
        .expect("run the 1.0 host");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "the 1.0 host took a 1.1 plugin: {stdout}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {stdout:?}");
    let line = lines[0];
    // abi_stable accepted the newer minor; the plugin's own check refused the host.
    assert!(line.starts_with("init failed: "), "{line}");
    assert!(line.contains("channeld-plugin-abi 1.1.0"), "{line}");
    assert!(line.contains("plugin-abi 1.1 or later"), "{line}");
    assert!(line.contains("plugin-abi 1.0"), "{line}");
}

#[test]
fn a_plugin_of_a_newer_minor_is_refused_with_one_line() {
    let file = util::lookalike_file(
        "abi-1.2",
        "channeld-plugin-abi12",
        "libchanneld_plugin_abi12.so",
    );
    let error = match load_root_module(&file) {
        Ok(_) => panic!("a plugin built against plugin-abi 1.2.0 loaded in a 1.1 host"),
        Err(e) => e,
    };
    let line = error.to_string();
    let LoadError::Version { path, plugin, host } = &error else {
        panic!("expected a version mismatch, got: {line}");
    };
    assert_eq!(path, &file);
    assert_eq!(plugin, "1.2.0");
    assert!(host.contains(host_abi_version()), "{host}");
    assert_eq!(error.class(), "version-mismatch");
    assert!(!line.contains('\n'), "one line expected: {line:?}");
    assert!(line.contains(&file.display().to_string()), "{line}");
    assert!(line.contains("1.2.0") && line.contains("1.1.0"), "{line}");
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
