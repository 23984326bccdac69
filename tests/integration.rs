//! channeld's black-box tests: real plugin files, loaded through the real loader, and (from the
//! run issue on) the real `channeld` binary. One test binary, one module per area.

/// Shared helpers: building plugin files, loading them, threads.
mod util;

/// The ABI adapter against real plugin cdylibs: every entry, panics, async I/O, cancellation,
/// stale handles, log forwarding, shutdown.
mod abi_adapter;

/// The loader: discovery, staging, permission checks and one clear line per bad plugin file.
mod loader;

/// A plugin built by `cargo +nightly` (another rustc) in this stable-built host: loads, runs an
/// account, fences a panic. Fails, saying how to install it, without the nightly toolchain.
mod abi_nightly;

/// Interface versions with look-alike plugin-abi crates: a 1.0 plugin through the frozen 1.0
/// layouts, a 1.1 plugin refusing a 1.0 host, a newer minor and another major refused in one line.
mod abi_versions;

/// ABI 1.1 under the real supervisor: a frozen-1.0 plugin's 100 accounts replaced by a 1.1 build,
/// deliver_async and the message sink, task_polled and `running`, reserved keys, validate,
/// batches, the 1.0-era source built against 1.1.
mod abi11;

/// The SDK's documented example built as a fresh crate with exactly the documented dependencies.
mod sdk_example;

/// The `webhook` channel plugin over real HTTP: delivery, refusals, config reasons, graceful stop.
mod webhook_plugin;

/// `channeld run` end to end with the webhook plugin: status, API auth, config errors, secrets,
/// SIGTERM, CLI exit codes.
mod daemon;

/// The restart supervisor end to end, driven by the CLI, with the fixture plugin's misbehaviours.
mod supervisor;

/// Hot plugins: add, replace, remove, slow and truncated files, bad files, rescans; the catalog's
/// regressions (reconcile count, refusals logged once, CPU without a watcher, relative config,
/// disconnected rescans, refused replacements, blocking constructors).
mod hot;

/// The health monitor with the real daemon: a disconnected account restarted, with its reason.
mod health;

/// The journal and the event stream: SSE delivery and resume, pruning, refusals, a corrupt,
/// newer or locked journal, the read-only token, `channeld tail` across a restart, `kill -9`.
mod journal;
/// The daemon and the CLI as an operator meets them: state-directory lock, signals, exit codes,
/// audit trail, checked settings, the project's own docs.
mod operator;

/// Config reload: `channeld reload`, SIGHUP and a file edit alike; only changed accounts restart;
/// rotated secrets; bad files refused with their location; manual stops and gave-up accounts.
mod reload;
