//! channeld's host: loads channel plugins and supervises their accounts.
pub mod api;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod discover;
pub mod ffi;
pub mod health;
pub mod host;
pub mod load;
pub mod plugin;
pub mod registry;
pub mod stage;
pub mod status;
pub mod status_table;
pub mod supervise;
