//! channeld's host: loads channel plugins and supervises their accounts.
pub mod clock;
pub mod ffi;
pub mod host;
pub mod load;
pub mod plugin;
pub mod status;
