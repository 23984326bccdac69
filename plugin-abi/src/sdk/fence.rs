//! The panic fence every exported entry point runs inside: a panic that reached the boundary
//! would kill the host (unwinding across the `extern "C"` boundary aborts the process), so it is
//! caught here and turned into an error.

use std::{
    any::Any,
    panic::{AssertUnwindSafe, catch_unwind},
};

use abi_stable::std_types::{RResult, RString};

/// The text of a panic payload (`&str` and `String` payloads; anything else is named as such).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&'static str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

/// Runs `f`, turning both its error and a panic into `RErr`. `entry` names the entry point so
/// the host's error says where the plugin failed.
pub fn fenced<T>(entry: &str, f: impl FnOnce() -> Result<T, String>) -> RResult<T, RString> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(value)) => RResult::ROk(value),
        Ok(Err(message)) => RResult::RErr(message.into()),
        Err(payload) => RResult::RErr(
            format!("plugin panicked in {entry}: {}", panic_message(&*payload)).into(),
        ),
    }
}

/// Runs `f`; on a panic returns `fallback` (for entries whose result has no error side).
pub fn fenced_or<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or(fallback)
}
