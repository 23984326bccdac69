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

/// The catalog as the one owner of which version serves a channel and of removed channels:
/// the supervisor answers what the catalog lists through add, replace, refusal, removal, return.
mod catalog_serving;

/// The health monitor with the real daemon: a disconnected account restarted, with its reason.
mod health;

/// Process isolation: plugins that segfault, abort, exit, overflow their stack or run out of
/// memory in a child process, while the host and other channels keep running.
mod isolation;
/// The journal and the event stream: SSE delivery and resume, pruning, refusals, a corrupt,
/// newer or locked journal, the read-only token, `channeld tail` across a restart, `kill -9`.
mod journal;
/// The daemon and the CLI as an operator meets them: state-directory lock, signals, exit codes,
/// audit trail, checked settings, the project's own docs.
mod operator;

/// The SDK's public API against its checked-in snapshot (nightly rustdoc JSON).
mod sdk_api;

/// The `irc` plugin against a real ngircd: inbound, sends and a split long message, a server
/// `kill -9` and restart, the health monitor and a stopped server.
mod irc;
/// The plugin template rendered, built as a fresh crate, its harness tests run, hot-added.
mod template;

mod account_state;
/// The `mqtt` plugin against a real mosquitto: inbound, publish on send, no echo, a `kill -9` of
/// channeld in the middle of a QoS 1 burst.
mod mqtt;
/// The outbox: sends through the fixture's send hook, idempotency, an account stopped and
/// started, retries and failure, order under retries, cancel, the caps, `kill -9` mid-send.
mod outbox;

/// Gateways with the real daemon: added and removed by a config reload, a refused copy held and
/// retried until its target's channel is loaded.
mod bridge;
/// Observability and service integration: `/metrics` (a crash storm's exact counts), `/healthz`
/// and `/readyz` during a slow start, sd_notify messages and the watchdog, completions, the
/// manual page, the systemd unit.
mod observe;
/// Config reload: `channeld reload`, SIGHUP and a file edit alike; only changed accounts restart;
/// rotated secrets; bad files refused with their location; manual stops and gave-up accounts.
mod reload;
/// A plugin runtime starved by blocking accounts: reported starved naming them, the healthy
/// account never shown running, SIGTERM still bounded (exit status 4).
mod starvation;
mod stops;

/// The cluster (cargo feature `cluster`): three real nodes share 30 fixture accounts through a
/// real etcd; spread, failover and return, etcd down, a stop that survives a move, a paused node.
#[cfg(feature = "cluster")]
mod cluster;
