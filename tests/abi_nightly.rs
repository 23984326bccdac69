//! The point of a stable ABI: the `fixture` plugin compiled by `cargo +nightly` (a different rustc
//! from the one that built this host) loads through the real loader and adapter, runs an account
//! (its task calls back into the host's services and ends cleanly), and fences a panic in an entry
//! point. The nightly toolchain is required: without it these tests fail and say how to install
//! it; they never skip.

use std::{
    path::PathBuf,
    process::Command,
    sync::{Arc, OnceLock},
    time::Duration,
};

use channeld::{
    ffi::FfiPlugin,
    host::{AccountKey, AccountLink, HostSink},
    load::{host_abi_version, load_root_module},
    plugin::Plugin,
};
use serde_json::json;

use crate::util::{self, Loaded};

/// A bound on the account task, so a regression fails instead of hanging.
const PROMPT: Duration = Duration::from_secs(10);

/// The fixture plugin's file built by `cargo +nightly` into `target/nightly` (once per test
/// process). Panics, saying how to install the toolchain, when nightly is missing.
fn nightly_fixture_file() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let probe = Command::new("cargo")
                .args(["+nightly", "--version"])
                .env_remove("RUSTUP_TOOLCHAIN")
                .env_remove("RUSTC")
                .env_remove("CARGO")
                .output();
            match probe {
                Ok(out) if out.status.success() => {}
                Ok(out) => panic!(
                    "these tests need the nightly toolchain and `cargo +nightly` failed: {}\n\
                     install it with `rustup toolchain install nightly` (they never skip)",
                    String::from_utf8_lossy(&out.stderr)
                        .lines()
                        .next()
                        .unwrap_or_default()
                ),
                Err(e) => panic!(
                    "these tests need the nightly toolchain through rustup's `cargo` proxy, and \
                     `cargo` could not be run: {e}\ninstall rustup, then `rustup toolchain install \
                     nightly` (they never skip)"
                ),
            }
            let target = util::target_dir().join("nightly");
            util::cargo(
                &["build", "-p", "channeld-plugin-fixture"],
                Some("nightly"),
                &target,
            );
            target.join("debug/libchanneld_plugin_fixture.so")
        })
        .clone()
}

/// The nightly-built fixture, loaded and initialised once, configured with one account per test
/// (each test starts only its own, so the tests can share the instance).
fn nightly_fixture() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(|| {
        let loaded = util::load(&nightly_fixture_file());
        loaded
            .plugin
            .configure(&json!({
                "accounts": {
                    "exits": { "mode": "exit", "after_ms": 20 },
                    "panics": { "panic_in": ["start"] },
                }
            }))
            .expect("configure the nightly-built fixture");
        loaded
    })
}

fn link(loaded: &Loaded, account: &str) -> (AccountKey, AccountLink) {
    let key = AccountKey::new("fixture", account);
    let generation = loaded.board.begin_generation(&key);
    let sink: Arc<dyn HostSink> = loaded.board.clone();
    (key.clone(), AccountLink::for_account(key, generation, sink))
}

#[test]
fn nightly_plugin_and_this_host_were_built_by_different_compilers() {
    let nightly = nightly_fixture();
    let nightly_rustc = &nightly.plugin.info().rustc_version;
    // The host's compiler: the fixture built by the cargo running these tests is built by the
    // toolchain that built this test binary. Only its metadata is read (no `init`).
    let stable_file = util::plugin_file("channeld-plugin-fixture");
    let stable_module = load_root_module(&stable_file)
        .unwrap_or_else(|e| panic!("load the host-toolchain fixture: {e}"));
    let stable = FfiPlugin::new(stable_module, &stable_file).expect("metadata");
    let host_rustc = &stable.info().rustc_version;

    assert!(nightly_rustc.starts_with("rustc "), "{nightly_rustc:?}");
    assert!(host_rustc.starts_with("rustc "), "{host_rustc:?}");
    assert!(
        nightly_rustc.contains("nightly"),
        "the plugin should come from a nightly rustc: {nightly_rustc}"
    );
    assert_ne!(
        nightly_rustc, host_rustc,
        "the plugin and the host should be built by different compilers"
    );
    // Same interface version on both sides: the compiler is what differs.
    assert_eq!(nightly.plugin.info().abi_version, host_abi_version());
    assert_eq!(nightly.plugin.info().channel_id, "fixture");
}

#[test]
fn nightly_plugin_runs_an_account_that_calls_host_services_and_exits_cleanly() {
    let loaded = nightly_fixture();
    let (key, link) = link(loaded, "exits");
    let task = loaded
        .plugin
        .start_account("exits", link)
        .unwrap_or_else(|e| panic!("start: {e}"));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let ended = runtime
        .block_on(async { tokio::time::timeout(PROMPT, task.done).await })
        .expect("the account task should end after its 20 ms");
    assert_eq!(ended, Ok(()));
    // The task reported itself connected through the host-services trait object: a call from
    // nightly-compiled code into this host's vtable.
    let status = loaded.board.get(&key).expect("account has a status");
    assert_eq!(status.connected, Some(true), "{status:?}");
}

#[test]
fn nightly_plugin_fences_a_panic_in_an_entry_point() {
    let loaded = nightly_fixture();
    let (_, link) = link(loaded, "panics");
    match loaded.plugin.start_account("panics", link) {
        Ok(task) => panic!(
            "start should fail with the plugin's panic, but task {} started",
            task.id
        ),
        Err(e) => {
            assert_eq!(e.entry, "start_account");
            assert!(
                e.message.contains("fixture panic in start"),
                "the panic message should cross the boundary: {e}"
            );
        }
    }
    // The plugin is still usable after the fenced panic.
    let ids = loaded
        .plugin
        .list_account_ids()
        .expect("list after a panic");
    assert!(ids.iter().any(|id| id == "exits"), "{ids:?}");
}
