//! The command line: `channeld VERB`, parsed with clap.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// The version line: channeld's version and the plugin ABI it loads.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (loads plugins built against channeld-plugin-abi 1.x, >= 1.0.0)"
);

/// channeld: a host for chat-channel plugins. It loads every plugin file in a plugins directory
/// through a checked stable ABI and supervises each configured account.
#[derive(Debug, Parser)]
#[command(name = "channeld", version = LONG_VERSION, about, long_about = None)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check the plugins directory (and config) without starting anything. Exit 0 when every
    /// plugin file loads, 1 otherwise, with one line per bad file.
    Check {
        /// The plugins directory.
        #[arg(long, value_name = "DIR")]
        plugins_dir: PathBuf,
        /// Where private copies of plugin files are staged (default: a temporary directory).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}
