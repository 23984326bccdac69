//! The 1.0 layouts, frozen: the root module and the host-services vtable exactly as plugin-abi
//! 1.0.0 shipped them (the types they use did not change in 1.1 and are shared).
//!
//! abi_stable refuses a library whose prefix type has *fewer* fields than the host's (a 1.0
//! plugin's root module or `HostServices` in a 1.1 host: "too many fields"), so a 1.1 host checks
//! such a plugin against these layouts instead, and hands it a 1.0 host-services handle. Never
//! edit these files: a plugin built against 1.0 must keep loading.

mod host;
mod root;

use super::types;

pub use host::{HostHandle, HostServices, HostServices_TO};
pub use root::{PluginMod, PluginMod_Prefix, PluginMod_Ref};
