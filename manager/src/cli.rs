//! The command line: `channeld VERB`, parsed with clap. Exit codes for every verb ([`EXIT_STATUS`],
//! also shown by `--help`): 0 done, 1 the operation failed, 2 usage, 3 the daemon is unreachable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The version line: channeld's version and the plugin ABI it loads.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (loads plugins built against channeld-plugin-abi 1.0 to 1.1)"
);

/// The EXIT STATUS section of `--help`.
pub const EXIT_STATUS: &str = "\
EXIT STATUS:
  0  done
  1  the operation failed, or the daemon refused it (unknown channel or account, bad config)
  2  usage: a bad or missing argument, or an invalid RUST_LOG
  3  the daemon cannot be reached: nothing listens at its address, or the request timed out
  4  `channeld run` shut down, but not every account stopped (each stuck task is logged)";

/// channeld: a host for chat-channel plugins. Point it at a plugins directory and a TOML config;
/// it loads every plugin file through a checked stable ABI and keeps each configured account
/// running under one restart supervisor.
#[derive(Debug, Parser)]
#[command(name = "channeld", version = LONG_VERSION, about, long_about = None, after_help = EXIT_STATUS)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=debug; an invalid RUST_LOG is a
    /// usage error).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "CHANNELD_LOG_FORMAT")]
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

/// Where the config is.
#[derive(Debug, Clone, Args)]
pub struct ConfigArgs {
    /// The config file. Without it, ./channeld.toml if it exists, else built-in defaults.
    #[arg(long, short, value_name = "FILE", env = "CHANNELD_CONFIG")]
    pub config: Option<PathBuf>,
}

/// `CHANNEL` or `CHANNEL:ACCOUNT`.
#[derive(Debug, Clone)]
pub struct Target {
    /// The channel id.
    pub channel: String,
    /// The account, if one was named.
    pub account: Option<String>,
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (channel, account) = match s.split_once(':') {
            Some((c, a)) => (c, Some(a)),
            None => (s, None),
        };
        if channel.is_empty() || account.is_some_and(str::is_empty) {
            return Err(format!("expected CHANNEL or CHANNEL:ACCOUNT, got {s:?}"));
        }
        Ok(Self {
            channel: channel.to_owned(),
            account: account.map(str::to_owned),
        })
    }
}

/// The verbs.
// The flattened `config` fields take their help from `ConfigArgs`; a doc comment there would
// replace it.
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: load the plugins directory, start every enabled and configured account,
    /// serve the API; SIGINT/SIGTERM stop every account and exit 0.
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        /// Use this plugins directory instead of the config's.
        #[arg(long, value_name = "DIR")]
        plugins_dir: Option<PathBuf>,
    },
    /// Validate the config and the plugins directory without starting anything. Exit 0 when
    /// everything loads, 1 otherwise, with one line per problem.
    Check {
        #[command(flatten)]
        config: ConfigArgs,
        /// Use this plugins directory instead of the config's.
        #[arg(long, value_name = "DIR")]
        plugins_dir: Option<PathBuf>,
        /// Where private copies of plugin files are staged (default: a temporary directory).
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Show how every account is doing (or one channel's, or one account's).
    Status {
        #[command(flatten)]
        config: ConfigArgs,
        /// `CHANNEL` or `CHANNEL:ACCOUNT`.
        target: Option<Target>,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start an account (or every account of a channel); clears its manual stop and restart
    /// counter. Returns once the start has taken effect.
    Start(OpArgs),
    /// Stop an account (or a channel); it stays stopped until started. Returns once stopped.
    Stop(OpArgs),
    /// Stop, then start.
    Restart(OpArgs),
    /// Stop an account and clear its stored credentials.
    Logout(OpArgs),
    /// Reset an account's restart counter.
    Reset(OpArgs),
    /// List the plugin files: channel, version, file, content hash, load time, load errors, and
    /// how many versions of each channel are mapped.
    Plugins {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Follow inbound messages like `tail -f` (every channel, one channel, or one account), and
    /// keep following across a daemon restart from the last message printed.
    Tail {
        #[command(flatten)]
        config: ConfigArgs,
        /// `CHANNEL` or `CHANNEL:ACCOUNT`.
        target: Option<Target>,
        /// Start after this sequence number (0: everything the journal still has); default: new
        /// messages only.
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
        /// Print each message as one JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Show the journal's figures: last sequence number, pruned range, size, refused messages.
    Journal {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Send a message through the outbox: accepted once durable, then sent when the account is
    /// up, with retries (prints the message's id; `--wait` waits for sent or failed).
    Send {
        #[command(flatten)]
        config: ConfigArgs,
        /// `CHANNEL:ACCOUNT` to send from.
        target: Target,
        /// Where to send it (the channel's conversation, room or topic).
        conversation: String,
        /// What to send.
        text: String,
        /// Wait until it is sent (exit 0) or failed or cancelled (exit 1).
        #[arg(long)]
        wait: bool,
        /// An idempotency key: sending the same key again sends nothing and answers the first id.
        #[arg(long, value_name = "K")]
        key: Option<String>,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Reload the config file: apply what changed (accounts added, removed, restarted), leave
    /// the rest running. A bad file is refused with its location and changes nothing.
    Reload {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// List the outbox's messages (newest first), show one by id, or cancel a queued one.
    Messages {
        #[command(flatten)]
        config: ConfigArgs,
        /// Only this message.
        id: Option<u64>,
        /// Only messages in this state.
        #[arg(long, value_name = "STATE", value_parser = ["queued", "sending", "sent", "failed", "cancelled"])]
        state: Option<String>,
        /// Cancel message ID (only a queued message can be cancelled).
        #[arg(long, requires = "id")]
        cancel: bool,
        /// Print the outbox's figures instead (`GET /v1/outbox`), the gateways' refused copies
        /// among them.
        #[arg(long, conflicts_with_all = ["id", "state"])]
        figures: bool,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show the cluster: its nodes, their channels, how many accounts each holds, their lease
    /// age, and this node's state (docs/cluster.md).
    Cluster {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rescan the plugins directory now (for file systems where change events get lost).
    Rescan {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// The child process of an isolated channel (started by the daemon; not for people).
    #[command(hide = true)]
    IsolateChild {
        /// The staged copy to load.
        #[arg(long)]
        plugin: PathBuf,
        /// The plugin file it was staged from.
        #[arg(long)]
        source: PathBuf,
        /// The plugin runtime's worker threads.
        #[arg(long, default_value_t = 0)]
        worker_threads: u32,
        /// The most verbose plugin log level (1 error … 5 trace).
        #[arg(long, default_value_t = 3)]
        max_log_level: u8,
    },
    /// Print a shell completion script on stdout, e.g. `channeld completions bash >
    /// /etc/bash_completion.d/channeld`.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout, e.g. `channeld man > channeld.1`.
    Man,
}

/// Arguments of the account operations.
#[allow(missing_docs)]
#[derive(Debug, Clone, Args)]
pub struct OpArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// `CHANNEL` or `CHANNEL:ACCOUNT`.
    pub target: Target,
    /// Print the API's JSON answer.
    #[arg(long)]
    pub json: bool,
}
