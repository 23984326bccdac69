//! Helpers shared by the integration tests: building plugin files, loading them, temporary dirs.

#![allow(dead_code)]

pub mod daemon;
pub mod events;
pub mod servers;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex, OnceLock},
};

use channeld::{
    catalog::Catalog, clock::SystemClock, config::Config, ffi::FfiPlugin, host::HostSink,
    load::load_root_module, stage::StagingDir, status::StatusBoard, supervise::Supervisor,
};
use channeld_plugin_abi::abi::LogLevel;

/// An HTTP client for the daemon's API that hands back error statuses as answers (the tests
/// look at them) instead of as errors.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// A temporary directory only its owner may use (the loader refuses a plugins directory or a
/// state directory others can write to).
pub fn private_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    dir
}

/// The daemon's catalog and supervisor for `config`, in-process, staging under `state`: the
/// daemon's own load path. Call it inside a tokio runtime.
pub fn open_catalog(config: Arc<Config>, state: &Path) -> (Arc<Catalog>, Supervisor) {
    let clock = Arc::new(SystemClock);
    let board = Arc::new(StatusBoard::new(clock.clone()));
    let staging = StagingDir::open(&state.join("staging")).unwrap();
    let (supervisor, catalog) =
        channeld::daemon::open_catalog(config, staging, board, clock).unwrap();
    (catalog, supervisor)
}

/// The workspace root (the parent of `manager/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("manager/ has a parent")
        .to_owned()
}

/// The cargo target directory this test binary was built into.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs `cargo build` with `args` in the workspace and panics with cargo's output (and what to do)
/// if it fails. Plugin files are built on demand so `cargo test -p channeld` works alone; a test
/// that needs one never skips.
pub fn cargo(args: &[&str], toolchain: Option<&str>, target: &Path) {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    if let Some(tc) = toolchain {
        // `cargo +nightly` goes through rustup's proxy, not the cargo running the tests.
        cmd = Command::new("cargo");
        cmd.arg(format!("+{tc}"));
        cmd.env_remove("RUSTC")
            .env_remove("CARGO")
            .env_remove("RUSTUP_TOOLCHAIN");
    }
    let out = cmd
        .args(args)
        .env("CARGO_TARGET_DIR", target)
        .current_dir(workspace_root())
        .output()
        .expect("cannot run cargo");
    assert!(
        out.status.success(),
        "building test plugins failed: cargo {} (toolchain {:?})\n{}\nfix the build above, or run \
         `cargo build --workspace --examples` first",
        args.join(" "),
        toolchain,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The path of a workspace plugin's cdylib, building it first (once per test process).
pub fn plugin_file(package: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    built
        .entry(package.to_owned())
        .or_insert_with(|| {
            cargo(&["build", "-p", package], None, &target_dir());
            let file = format!("lib{}.so", package.replace('-', "_"));
            target_dir().join("debug").join(file)
        })
        .clone()
}

/// The path of the SDK's runnable `echo` example, built as a cdylib.
pub fn echo_example_file() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            cargo(
                &["build", "-p", "channeld-plugin-abi", "--example", "echo"],
                None,
                &target_dir(),
            );
            target_dir().join("debug/examples/libecho.so")
        })
        .clone()
}

/// Copies `file` into `dir` under `name`: dlopen keys libraries by file, so each copy is a
/// separate library with its own statics (a separate plugin instance).
pub fn copy_plugin(file: &Path, dir: &Path, name: &str) -> PathBuf {
    let dest = dir.join(name);
    std::fs::copy(file, &dest).expect("copy plugin file");
    dest
}

/// A loaded, initialised plugin and the status board its host services write to.
pub struct Loaded {
    pub plugin: FfiPlugin,
    pub board: Arc<StatusBoard>,
}

/// Loads `path` through the real loader and adapter, and calls `init`.
pub fn load(path: &Path) -> Loaded {
    let module = load_root_module(path).unwrap_or_else(|e| panic!("load {}: {e}", path.display()));
    let plugin = FfiPlugin::new(module, path).expect("metadata");
    let board = Arc::new(StatusBoard::new(Arc::new(SystemClock)));
    let sink: Arc<dyn HostSink> = board.clone();
    plugin.init(2, LogLevel::Debug, sink).expect("init");
    Loaded { plugin, board }
}

/// Names of this process's threads.
pub fn thread_names() -> Vec<String> {
    daemon::thread_names_of(std::process::id())
}

/// A file built from one of the look-alike interface workspaces under
/// `tests/fixtures/abi-lookalike/` (other versions or layouts of `channeld-plugin-abi`, which
/// cannot be workspace members, and not cargo features of `plugin-abi` either, since features
/// unify across the build). Built once per test process into `target/lookalike`; `file` is its
/// name under `debug/`.
pub fn lookalike_file(workspace: &str, package: &str, file: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    built
        .entry(format!("{workspace}/{package}"))
        .or_insert_with(|| {
            let manifest = workspace_root()
                .join("tests/fixtures/abi-lookalike")
                .join(workspace)
                .join("Cargo.toml");
            let target = target_dir().join("lookalike");
            let manifest = manifest.to_str().expect("UTF-8 path");
            cargo(
                &["build", "--manifest-path", manifest, "-p", package],
                None,
                &target,
            );
            target.join("debug").join(file)
        })
        .clone()
}
