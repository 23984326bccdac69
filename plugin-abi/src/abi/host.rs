//! The services the host offers a plugin, as an abi_stable trait object.

// The `sabi_trait` expansion puts impls inside a generated const; that is how abi_stable works.
#![allow(non_local_definitions)]

use abi_stable::{
    sabi_trait,
    std_types::{RArc, RResult, RStr, RString},
};
use async_ffi::{FfiFuture, FutureExt};

use super::types::{EventKind, InboundMessage, LogRecord};

/// Host services, bound to one account task (or, for the handle given at `init`, to no account).
///
/// Every handle carries the generation of the task it was given to. When the host has given up on
/// that task (it was cancelled, or a newer version of the plugin replaced it), calls through the
/// handle are dropped and counted by the host, so a stale task cannot corrupt its replacement's
/// status or duplicate its messages; [`is_current`](HostServices::is_current) tells the plugin.
///
/// The host's implementation never panics: a panic here would cross the boundary.
#[sabi_trait]
pub trait HostServices: Clone + Send + Sync + 'static {
    /// Records a log event in the host's subscriber.
    fn log(&self, record: LogRecord);

    /// The account's current status snapshot, as a JSON object.
    fn status(&self) -> RString;

    /// Merges a JSON object into the account's status. Host-owned keys (`running`,
    /// `restartPending`, …) are refused with an error; any other key is the plugin's own.
    fn patch_status(&self, patch: RStr<'_>) -> RResult<(), RString>;

    /// Reports whether the account's connection to its remote side is up.
    fn set_connected(&self, connected: bool);

    /// Reports traffic: updates `lastEventAt` (and `lastInboundAt` / `lastOutboundAt`), and marks
    /// the account as one whose event liveness is reported.
    fn record_event(&self, kind: EventKind);

    /// Reports how many runs (jobs, conversations being processed) are active; also stamps
    /// `lastRunActivityAt`.
    fn set_busy(&self, active_runs: u32);

    /// Hands an inbound message to the host. Counts as inbound traffic.
    fn deliver(&self, message: InboundMessage) -> RResult<(), RString>;

    /// False once the host has given up on the task this handle was given to.
    #[sabi(last_prefix_field)]
    fn is_current(&self) -> bool;

    // ---- added in 1.1 (each has a default body, so the vtable field is optional and a handle
    // from a 1.0 host falls back to the default) ----

    /// 1.1: hands an inbound message to the host without blocking a thread. The future completes
    /// once the host has made the message durable, with its sequence number, or with a one-line
    /// reason it was refused. Counts as inbound traffic.
    fn deliver_async(&self, message: InboundMessage) -> FfiFuture<RResult<u64, RString>> {
        let _ = message;
        async {
            RResult::RErr(RString::from(
                "this host has no deliver_async (plugin-abi 1.0)",
            ))
        }
        .into_ffi()
    }

    /// 1.1: the SDK calls this when the plugin's runtime polls the account's task for the first
    /// time; until then a 1.1 host does not report the account as running.
    fn task_polled(&self) {}
}

/// The owned, cloneable host-services handle a plugin receives.
pub type HostHandle = HostServices_TO<RArc<()>>;
