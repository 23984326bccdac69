//! The plugin template (`templates/channel-plugin/`) rendered the way `cargo generate` renders it,
//! without needing cargo-generate: its placeholders are substituted here. The rendered crate is
//! built outside the workspace as an author would build it (the unpublished SDK and harness from
//! a `[patch]`, the workspace's `Cargo.lock` and target directory), its own harness tests run,
//! and the built plugin is hot-added into a running channeld by rename.

use std::{
    fs,
    path::{Path, PathBuf},
};

use crate::{
    sdk_example::{cargo, standalone},
    util::{self, daemon::Daemon},
};

/// The names the test renders the template with.
const PROJECT: &str = "kit-loopback";
const CRATE: &str = "kit_loopback";
const CHANNEL: &str = "kitloop";

/// `text` with the template's placeholders filled, as cargo-generate fills them.
fn render(text: &str) -> String {
    text.replace("{{project-name}}", PROJECT)
        .replace("{{crate_name}}", CRATE)
        .replace("{{channel_id}}", CHANNEL)
}

/// Renders every file of the template (but cargo-generate's own config) under `dest`.
fn render_dir(from: &Path, dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        if name == "cargo-generate.toml" || name == "target" || name == "Cargo.lock" {
            continue;
        }
        if entry.file_type().unwrap().is_dir() {
            render_dir(&entry.path(), &dest.join(&name));
        } else {
            let text = fs::read_to_string(entry.path()).unwrap();
            let rendered = render(&text);
            assert!(
                !rendered.contains("{{"),
                "{name}: a placeholder the test does not know (or a stray `{{{{`): {rendered}"
            );
            fs::write(dest.join(&name), rendered).unwrap();
        }
    }
}

fn rendered_crate(dir: &Path) -> PathBuf {
    let template = util::workspace_root().join("templates/channel-plugin");
    let krate = dir.join(PROJECT);
    render_dir(&template, &krate);
    let manifest = fs::read_to_string(krate.join("Cargo.toml")).unwrap();
    standalone(
        &krate,
        &manifest,
        &[
            ("channeld-plugin-abi", "plugin-abi"),
            ("channeld-plugin-test", "plugin-test"),
        ],
    );
    krate
}

#[test]
fn the_template_renders_builds_passes_its_harness_tests_and_hot_adds_into_channeld() {
    let dir = tempfile::tempdir().unwrap();
    let krate = rendered_crate(dir.path());

    let tested = cargo(&krate, &["test", "--offline", "--quiet"], &[]);
    assert!(
        tested.status.success(),
        "the rendered template's tests failed:\n{}\n{}",
        String::from_utf8_lossy(&tested.stdout),
        String::from_utf8_lossy(&tested.stderr)
    );
    let stdout = String::from_utf8_lossy(&tested.stdout);
    assert!(stdout.contains("2 passed"), "{stdout}");

    let built = cargo(&krate, &["build", "--offline", "--quiet"], &[]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let file = util::target_dir().join(format!("debug/lib{CRATE}.so"));

    // A daemon whose config names the channel before any plugin provides it.
    let daemon = Daemon::start(
        &[],
        "",
        &format!(
            "[channels.{CHANNEL}.accounts.main]\nroom = \"lobby\"\ntoken = {{ env = \"KIT_TOKEN\" }}\n"
        ),
        &[("KIT_TOKEN", "t0ken")],
    );
    // Installed as the guide says: a temporary name channeld ignores, then a rename.
    let tmp = daemon.plugins_dir().join(format!(".{CHANNEL}.so.tmp"));
    fs::copy(&file, &tmp).unwrap();
    fs::rename(&tmp, daemon.plugins_dir().join(format!("{CHANNEL}.so"))).unwrap();
    // The greeting is counted once delivered, after the room is patched: both are awaited.
    let account = daemon.wait_for_account(CHANNEL, "main", |a| {
        a["running"] == true
            && a["connected"] == true
            && a["room"] == "lobby"
            && a["inboundMessages"].as_u64() >= Some(1)
    });
    assert_eq!(account["inboundMessages"], 1, "{account}");
}

/// The harness removes the same host-owned keys as channeld, so a plugin tested with it sees
/// the tables channeld would hand it.
#[test]
fn the_harness_strips_the_same_reserved_keys_as_channeld() {
    assert_eq!(
        channeld_plugin_test::RESERVED_KEYS,
        channeld::reserved::RESERVED_KEYS
    );
}
