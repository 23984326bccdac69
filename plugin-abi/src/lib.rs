//! # channeld-plugin-abi: the contract between channeld and a channel plugin
//!
//! A channel plugin (IRC, MQTT, a webhook, …) is a `cdylib` that channeld loads from its plugins
//! directory. This crate is all a plugin author needs: implement [`sdk::ChannelPlugin`] and call
//! [`export_plugin!`] once. The SDK turns every call into a panic-fenced `extern "C"` entry, runs
//! your async code on a tokio runtime the plugin owns (timers, sockets and HTTP clients work), and
//! forwards your `tracing` events to channeld's log tagged with channel and account.
//!
//! ## A complete plugin
//! `Cargo.toml`:
//! ```toml
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! channeld-plugin-abi = "1.1"
//! serde = { version = "1", features = ["derive"] }
//! tokio = { version = "1", features = ["net", "io-util", "time", "macros"] }
//! tracing = "0.1"
//! ```
//! `src/lib.rs` — this is the crate's `echo` example (`cargo build -p channeld-plugin-abi
//! --example echo` builds it as a cdylib, and channeld's tests load it):
//! ```
#![doc = include_str!("../examples/echo.rs")]
//! ```
//! Build it with `cargo build --release`, then install `target/release/lib<name>.so` into the
//! plugins directory by copying it to a temporary name that does not end in `.so` and renaming it
//! (a rename is atomic, so channeld never sees half a file). Configure accounts in channeld's
//! TOML under `[channels.<CHANNEL_ID>.accounts.<account>]`. The host owns a few keys there and in
//! the channel's table (`enabled`, `health_monitor`, `isolation`, `worker_threads`, …: channeld's
//! `docs/reserved-keys.md` lists them all) and removes them before your plugin sees the table, so a
//! settings type with `#[serde(deny_unknown_fields)]` keeps working as the host grows keys; every
//! other key is yours, read with [`sdk::Account::parse`]. [`sdk::ChannelPlugin::validate`]
//! refuses a table with your own message.
//!
//! `use channeld_plugin_abi::sdk::prelude::*;` brings in the trait, the context types, the error
//! type, `json!`/`Value` and the export macro. Foreign types of the API are re-exported
//! ([`serde_json`]), so a plugin needs no matching version of its own.
//!
//! ## What the host expects of [`sdk::ChannelPlugin::start`]
//! * Run until the account is done; return `Ok(())` for a clean exit, `Err` for a failure. Either
//!   way the host counts an exit it did not ask for as a crash, and restarts with backoff.
//! * Watch [`sdk::AccountContext::aborted`] and return soon after it fires. A task that ignores it
//!   is cancelled at its next await point once the stop timeout passes; a task that blocks its
//!   thread (no await point) is reported as stuck.
//! * Report what you know: [`sdk::Host::set_connected`], [`sdk::Host::record_event`] (only if your
//!   protocol has traffic to prove liveness — the health monitor then restarts silent sockets),
//!   [`sdk::Host::set_busy`], and hand messages over with `ctx.deliver(message).await`
//!   ([`sdk::AccountContext::deliver`]): it completes once channeld has stored the message, with
//!   its sequence number, and holds no thread while it waits.
//! * Spawn the task's helpers with [`sdk::AccountContext::spawn`]: they are tagged with the
//!   account in the log, end with the abort, and a stop waits for them.
//! * The account shows as running once the plugin's runtime has polled the task for the first
//!   time (a plugin whose runtime threads are all blocked never shows a healthy account).
//! * Panics are caught and reported with their message, but they end the task: prefer `Err`
//!   ([`sdk::PluginError`]; `?` works on every `std::error::Error`, and
//!   [`sdk::ResultExt::context`] on any error that displays, such as `String` or `anyhow`'s).
//! * Build with `panic = "unwind"` (the default): [`export_plugin!`] refuses to compile under
//!   `panic = "abort"`, where the first panic would take channeld down.
//! * The SDK installs a forwarding `tracing` subscriber as the plugin's global default at `init`
//!   (unless you installed one first), and a panic hook that keeps a hook you set in your
//!   constructor and calls it after its own.
//!
//! ## Layers
//! * [`abi`]: the `#[repr(C)]` [`StableAbi`](abi_stable::StableAbi) types and the prefix-type root
//!   module [`abi::PluginMod`]. This crate is versioned 1.x: later minor versions only append
//!   entries, so a plugin built against 1.0 loads in every 1.x host; another major is refused, and
//!   so is a plugin of a newer minor than the host. [`abi`]'s docs have the table of every entry
//!   with the version that added it.
//! * [`sdk`]: the trait, the context types and the export macro. SDK 1.1 is source-compatible with
//!   1.0: what it replaced is still there, deprecated, with a pointer to its successor.
//!
//! ## Bumping abi_stable
//! `abi_stable` is pinned to one exact version (`=0.11.3`) in the workspace, because its layout
//! checks cover its own types: host and plugins must agree on it. To move to another version:
//! 1. change the pin in the workspace's `Cargo.toml` and in every look-alike crate under
//!    `tests/fixtures/abi-lookalike/` (each has its own `Cargo.lock`: run `cargo update -p
//!    abi_stable` there);
//! 2. run the whole suite: the frozen-1.0 plugin test and the version tests show whether plugins
//!    built with the old version still load;
//! 3. if they do not, the new abi_stable is a breaking change for plugins: it needs a new major
//!    of this crate, not a minor.

pub mod abi;
mod heap;
mod normalize;
pub mod sdk;

/// The `serde_json` this SDK's API uses ([`Value`](serde_json::Value) in config and status), so a
/// plugin needs no version of its own to match.
pub use serde_json;

/// The `serde` this SDK's API uses (a status patch may be any [`Serialize`](serde::Serialize)
/// value), so a plugin's derives match it.
pub use serde;

pub use heap::{THREAD_ARENA_GROWTH, grow_thread_arena};
pub use normalize::{DEFAULT_ACCOUNT_ID, MAX_ACCOUNT_ID_LEN, normalize_account_id};
