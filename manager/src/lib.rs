//! channeld's host: loads channel plugins and supervises their accounts.
pub mod cli;
pub mod clock;
pub mod discover;
pub mod ffi;
pub mod host;
pub mod load;
pub mod plugin;
pub mod registry;
pub mod stage;
pub mod status;
