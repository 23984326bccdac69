//! The SDK's documented complete example, built the way an author would: a fresh crate outside
//! the workspace whose `Cargo.toml` is exactly the dependency block the crate docs show, and whose
//! `src/lib.rs` is the example. The unpublished `channeld-plugin-abi` comes from a `[patch]`; the
//! workspace's `Cargo.lock` and target directory are reused, so nothing is downloaded and only
//! what the example's features change is compiled.

use std::{fs, path::Path, process::Command};

use channeld::{ffi::FfiPlugin, load::load_root_module, plugin::Plugin};

use crate::util;

/// The first ```` ```toml ```` block of the crate docs (`plugin-abi/src/lib.rs`), without the `//! `
/// prefixes.
fn documented_manifest(lib_rs: &str) -> String {
    let mut lines = lib_rs
        .lines()
        .map(|l| l.strip_prefix("//!").unwrap_or(l))
        .map(|l| l.strip_prefix(' ').unwrap_or(l));
    lines
        .by_ref()
        .find(|l| l.trim() == "```toml")
        .expect("the crate docs have a ```toml block");
    lines
        .take_while(|l| l.trim() != "```")
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Writes the fresh crate (the documented manifest plus the test's `[patch]`, the example as its
/// `src/lib.rs`, the workspace's lock file) under `dir`; returns its directory and manifest.
fn fresh_crate(dir: &Path) -> (std::path::PathBuf, String) {
    let root = util::workspace_root();
    let lib_rs = fs::read_to_string(root.join("plugin-abi/src/lib.rs")).unwrap();
    let documented = documented_manifest(&lib_rs);
    assert!(documented.contains("[dependencies]"), "{documented}");
    assert!(documented.contains("channeld-plugin-abi"), "{documented}");

    let krate = dir.join("echo-plugin");
    fs::create_dir_all(krate.join("src")).unwrap();
    let manifest = standalone(
        &krate,
        &format!(
            "[package]\nname = \"echo-plugin\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\
             publish = false\n\n{documented}"
        ),
        &[("channeld-plugin-abi", "plugin-abi")],
    );
    fs::copy(
        root.join("plugin-abi/examples/echo.rs"),
        krate.join("src/lib.rs"),
    )
    .unwrap();
    (krate, manifest)
}

/// Makes `krate` a crate outside the workspace built as an author would, from `manifest`: the
/// unpublished `crates` (name, folder in the workspace) come from a `[patch]`, it is a workspace
/// of its own, and it gets the workspace's `Cargo.lock` (so nothing is downloaded). Writes its
/// `Cargo.toml` and returns it.
pub(crate) fn standalone(krate: &Path, manifest: &str, crates: &[(&str, &str)]) -> String {
    let root = util::workspace_root();
    let mut manifest = format!(
        "{manifest}\n# Not in the docs: the test's stand-in for the registry, and a workspace of \
         its own.\n[patch.crates-io]\n"
    );
    for (name, folder) in crates {
        manifest.push_str(&format!("{name} = {{ path = {:?} }}\n", root.join(folder)));
    }
    manifest.push_str("\n[workspace]\n");
    fs::write(krate.join("Cargo.toml"), &manifest).unwrap();
    fs::copy(root.join("Cargo.lock"), krate.join("Cargo.lock")).unwrap();
    manifest
}

/// Runs cargo in `krate` with the shared target directory.
pub(crate) fn cargo(krate: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .envs(env.iter().copied())
        .env("CARGO_TARGET_DIR", util::target_dir())
        .current_dir(krate)
        .output()
        .expect("run cargo")
}

#[test]
fn the_documented_example_builds_as_a_fresh_crate_with_the_documented_dependencies() {
    let dir = tempfile::tempdir().unwrap();
    let (krate, manifest) = fresh_crate(dir.path());
    let out = cargo(&krate, &["build", "--offline", "--quiet"], &[]);
    assert!(
        out.status.success(),
        "the documented example does not build with the documented dependencies:\n{manifest}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It is a channeld plugin: it loads and names its channel.
    let file = util::target_dir().join("debug/libecho_plugin.so");
    let copy = util::copy_plugin(&file, dir.path(), "echo-fresh.so");
    let plugin = FfiPlugin::new(load_root_module(&copy).unwrap(), Path::new(&copy)).unwrap();
    assert_eq!(plugin.info().channel_id, "echo");
}

#[test]
fn export_plugin_refuses_to_compile_under_panic_abort_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (krate, _) = fresh_crate(dir.path());
    // `check` is enough: the refusal is a compile error in the plugin crate itself.
    let out = cargo(
        &krate,
        &["check", "--offline", "--quiet"],
        &[("CARGO_PROFILE_DEV_PANIC", "abort")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "built under panic = \"abort\"");
    assert!(
        stderr.contains("channeld plugins must be built with panic = \"unwind\"")
            && stderr.contains("would abort channeld"),
        "{stderr}"
    );
}
