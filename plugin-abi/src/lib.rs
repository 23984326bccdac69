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
//! channeld-plugin-abi = "1"
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
//! TOML under `[channels.<CHANNEL_ID>.accounts.<account>]`; every key but the host-owned
//! `enabled` and `health_monitor` is yours, read with [`sdk::Account::parse`].
//!
//! ## What the host expects of [`sdk::ChannelPlugin::start`]
//! * Run until the account is done; return `Ok(())` for a clean exit, `Err` for a failure. Either
//!   way the host counts an exit it did not ask for as a crash, and restarts with backoff.
//! * Watch [`sdk::AccountContext::aborted`] and return soon after it fires. A task that ignores it
//!   is cancelled at its next await point once the stop timeout passes; a task that blocks its
//!   thread (no await point) is reported as stuck.
//! * Report what you know: [`sdk::Host::set_connected`], [`sdk::Host::record_event`] (only if your
//!   protocol has traffic to prove liveness — the health monitor then restarts silent sockets),
//!   [`sdk::Host::set_busy`], and hand messages over with [`sdk::Host::deliver`].
//! * Panics are caught and reported with their message, but they end the task: prefer `Err`.
//!
//! ## Layers
//! * [`abi`]: the `#[repr(C)]` [`StableAbi`](abi_stable::StableAbi) types and the prefix-type root
//!   module [`abi::PluginMod`]. This crate is versioned 1.x: later minor versions only append
//!   entries, so a plugin built against 1.0 loads in every 1.x host; another major is refused.
//! * [`sdk`]: the trait, the context types and the export macro.

pub mod abi;
mod normalize;
pub mod sdk;

/// The `serde_json` this SDK's API uses ([`Value`](serde_json::Value) in config and status), so a
/// plugin needs no version of its own to match.
pub use serde_json;

pub use normalize::{DEFAULT_ACCOUNT_ID, MAX_ACCOUNT_ID_LEN, normalize_account_id};
