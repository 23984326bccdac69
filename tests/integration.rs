//! channeld's black-box tests: real plugin files, loaded through the real loader, and (from the
//! run issue on) the real `channeld` binary. One test binary, one module per area.

/// Shared helpers: building plugin files, loading them, threads.
mod util;

/// The ABI adapter against real plugin cdylibs: every entry, panics, async I/O, cancellation,
/// stale handles, log forwarding, shutdown.
mod abi_adapter;
