//! The config file: TOML with host-owned sections (`[host]`, `[supervisor]`, `[health]`) and one
//! `[channels.<id>]` table per channel, whose `accounts.<account>` tables belong to the plugin
//! except for the host-owned `enabled` and `health_monitor` keys.
//!
//! An empty file is a valid config. Relative paths are relative to the config file. An unknown key
//! or a bad value in a host-owned section is an error naming the file, the line and what was
//! expected. Any value in a channel table may be a secret reference, `{ env = "NAME" }` or
//! `{ file = "path" }`: the plugin receives the resolved value, and the host never prints it.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use channeld_plugin_abi::normalize_account_id;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use toml::Value as Toml;

use crate::limits;

/// The config could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the config file: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (in the message, not a `source`, so error chains print it once).
        error: std::io::Error,
    },
    /// A syntax error, an unknown key or a bad value.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong and what is expected.
        message: String,
    },
}

/// A secret value (`secrecy`: zeroed when dropped). It prints as `[redacted]` everywhere; only
/// [`Secret::expose`] reveals it, and equality is checked in constant time.
#[derive(Clone)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    /// Wraps a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into().into())
    }

    /// The value, for the one place that must use it.
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret as _;
        self.0.expose_secret()
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(self.expose().as_bytes().ct_eq(other.expose().as_bytes()))
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// A value given literally or by reference.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub(crate) enum SecretSource {
    Literal(String),
    Env { env: String },
    File { file: PathBuf },
}

/// `[host]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
struct RawHost {
    plugins_dir: PathBuf,
    state_dir: PathBuf,
    api_address: SocketAddr,
    allow_remote: bool,
    api_token: Option<SecretSource>,
    plugin_worker_threads: u32,
    #[serde(with = "humantime_serde")]
    plugin_call_timeout: Duration,
    #[serde(with = "humantime_serde")]
    settle: Duration,
    #[serde(with = "humantime_serde")]
    rescan_interval: Duration,
    watch: bool,
    watch_config: bool,
    #[serde(with = "humantime_serde")]
    load_timeout: Duration,
    #[serde(with = "humantime_serde")]
    plugin_shutdown_timeout: Duration,
    #[serde(with = "humantime_serde")]
    isolation_handshake_timeout: Duration,
}

impl Default for RawHost {
    fn default() -> Self {
        Self {
            plugins_dir: "plugins".into(),
            state_dir: "state".into(),
            api_address: SocketAddr::from(([127, 0, 0, 1], 7878)),
            allow_remote: false,
            api_token: None,
            plugin_worker_threads: 2,
            plugin_call_timeout: Duration::from_secs(10),
            settle: Duration::from_millis(500),
            rescan_interval: Duration::from_secs(30),
            watch: true,
            watch_config: true,
            load_timeout: Duration::from_secs(60),
            plugin_shutdown_timeout: Duration::from_secs(10),
            isolation_handshake_timeout: crate::isolate::HANDSHAKE_TIMEOUT,
        }
    }
}

/// The host's settings, with paths resolved against the config file's directory.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Where plugin files are found.
    pub plugins_dir: PathBuf,
    /// Where staged copies, the API token file and other state live.
    pub state_dir: PathBuf,
    /// The HTTP API's address (loopback unless `allow_remote`).
    pub api_address: SocketAddr,
    /// Whether `api_address` may be a non-loopback address.
    pub allow_remote: bool,
    /// The API's bearer token; `None`: generated at start into `<state_dir>/api-token`.
    pub api_token: Option<Secret>,
    /// Worker threads of each plugin's own runtime.
    pub plugin_worker_threads: u32,
    /// How long a synchronous plugin call (config, stop, logout) may take.
    pub plugin_call_timeout: Duration,
    /// Quiet period before a plugin file written in place is loaded.
    pub settle: Duration,
    /// How often the plugins directory is rescanned (0: never).
    pub rescan_interval: Duration,
    /// Whether to watch the plugins directory for changes.
    pub watch: bool,
    /// Whether to reload the config when its file changes (its directory is watched, with the
    /// `settle` quiet period).
    pub watch_config: bool,
    /// How long loading one plugin file (staging, opening, its constructor, `init`) may take.
    pub load_timeout: Duration,
    /// How long a plugin's runtime may take to shut down (a retired version, or at exit).
    pub plugin_shutdown_timeout: Duration,
    /// How long an isolated plugin's child process may take to load its plugin and answer.
    pub isolation_handshake_timeout: Duration,
}

/// `[supervisor]`: the restart policy (docs/behaviour.md). Ranges: [`crate::limits`].
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SupervisorConfig {
    /// First restart delay.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Growth of the delay per attempt.
    pub backoff_factor: f64,
    /// Largest delay.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Random extra delay, as a fraction of the delay (0.1 = up to +10 %).
    pub jitter: f64,
    /// Restarts before giving up.
    pub max_restarts: u32,
    /// A run this long resets the restart counter.
    #[serde(with = "humantime_serde")]
    pub stable_run: Duration,
    /// How long a stop waits for the task before cancelling it.
    #[serde(with = "humantime_serde")]
    pub stop_timeout: Duration,
    /// How long a start may take before start-all counts it as timed out.
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// How long a stop waits for a task it cancelled on the plugin's runtime before calling it
    /// stuck.
    #[serde(with = "humantime_serde")]
    pub cancel_grace: Duration,
    /// Accounts of one channel booting at once.
    pub startup_accounts_per_channel: usize,
    /// Channels booting at once.
    pub startup_channels: usize,
    /// Interval of the aggregated restart log line.
    #[serde(with = "humantime_serde")]
    pub restart_log_interval: Duration,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(5),
            backoff_factor: 2.0,
            max_backoff: Duration::from_secs(300),
            jitter: 0.1,
            max_restarts: 10,
            stable_run: Duration::from_secs(300),
            stop_timeout: Duration::from_secs(5),
            start_timeout: Duration::from_secs(30),
            cancel_grace: Duration::from_secs(1),
            startup_accounts_per_channel: 4,
            startup_channels: 4,
            restart_log_interval: Duration::from_secs(60),
        }
    }
}

/// `[health]`: the health monitor (docs/behaviour.md). Ranges: [`crate::limits`].
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between checks (0 disables the monitor).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// No check before this long after start.
    #[serde(with = "humantime_serde")]
    pub startup_grace: Duration,
    /// A run younger than this is healthy whatever it reports.
    #[serde(with = "humantime_serde")]
    pub connect_grace: Duration,
    /// No event for this long: a stale socket.
    #[serde(with = "humantime_serde")]
    pub stale_event_threshold: Duration,
    /// Busy without run activity for this long: stuck.
    #[serde(with = "humantime_serde")]
    pub busy_stuck_threshold: Duration,
    /// A restarted account is left alone for this many intervals.
    pub cooldown_cycles: u32,
    /// Monitor restarts per account per rolling hour.
    pub max_restarts_per_hour: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(300),
            startup_grace: Duration::from_secs(60),
            connect_grace: Duration::from_secs(120),
            stale_event_threshold: Duration::from_secs(30 * 60),
            busy_stuck_threshold: Duration::from_secs(25 * 60),
            cooldown_cycles: 2,
            max_restarts_per_hour: 10,
        }
    }
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawApi {
    read_token: Option<SecretSource>,
}

/// `[api]`: access to the HTTP API beyond `[host] api_token`.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// A read-only bearer token: it may read (status, events) but not control accounts.
    pub read_token: Option<Secret>,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    host: RawHost,
    #[serde(default)]
    supervisor: SupervisorConfig,
    #[serde(default)]
    health: HealthConfig,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    journal: crate::journal::JournalConfig,
    #[serde(default)]
    outbox: crate::outbox::OutboxConfig,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    gateways: Vec<crate::outbox::gateway::GatewayConfig>,
    #[serde(default)]
    metrics: crate::metrics::MetricsConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cluster: Option<crate::cluster::config::RawCluster>,
    #[serde(default)]
    channels: BTreeMap<String, toml::Table>,
}

/// One channel's table, secrets resolved, as the plugin will receive it. Its `Debug` shows the
/// keys only: any value may be a resolved secret.
#[derive(Clone, Default)]
pub struct ChannelSection {
    /// The whole `[channels.<id>]` table as JSON.
    pub table: Json,
}

impl fmt::Debug for ChannelSection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&String> = self
            .table
            .as_object()
            .map(|table| table.keys().collect())
            .unwrap_or_default();
        f.debug_struct("ChannelSection")
            .field("keys", &keys)
            .finish_non_exhaustive()
    }
}

impl ChannelSection {
    /// `health_monitor.enabled` for an account: its own table (matched exactly, then
    /// case-insensitively, then by normalised id; an empty id matches nothing), else the
    /// channel's, else `None`.
    pub fn health_monitor_enabled(&self, account: &str) -> Option<bool> {
        let flag = |table: &Json| {
            table
                .get("health_monitor")
                .and_then(|h| h.get("enabled"))
                .and_then(Json::as_bool)
        };
        let accounts = self.table.get("accounts").and_then(Json::as_object);
        let own = accounts.and_then(|accounts| {
            if account.is_empty() {
                return None;
            }
            accounts
                .get(account)
                .or_else(|| {
                    accounts
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(account))
                        .map(|(_, v)| v)
                })
                .or_else(|| {
                    let wanted = normalize_account_id(account);
                    accounts
                        .iter()
                        .find(|(k, _)| normalize_account_id(k) == wanted)
                        .map(|(_, v)| v)
                })
        });
        own.and_then(flag).or_else(|| flag(&self.table))
    }
}

/// The whole config.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`None`: built-in defaults).
    pub file: Option<PathBuf>,
    /// `[host]`.
    pub host: HostConfig,
    /// `[supervisor]`.
    pub supervisor: SupervisorConfig,
    /// `[health]`.
    pub health: HealthConfig,
    /// `[api]`.
    pub api: ApiConfig,
    /// `[journal]`.
    pub journal: crate::journal::JournalConfig,
    /// `[outbox]`.
    pub outbox: crate::outbox::OutboxConfig,
    /// `[[gateways]]`.
    pub gateways: Vec<crate::outbox::gateway::GatewayConfig>,
    /// `[metrics]`.
    pub metrics: crate::metrics::MetricsConfig,
    /// `[cluster]` (`None`: this node runs alone).
    pub cluster: Option<crate::cluster::config::ClusterConfig>,
    /// `[channels.<id>]`.
    pub channels: BTreeMap<String, ChannelSection>,
}

impl Config {
    /// The defaults, relative to `base`.
    pub fn defaults(base: &Path) -> Self {
        Self::from_raw(RawConfig::default(), base, None).expect("the defaults are valid")
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(&text, path)
    }

    /// Reads `path` for a client of the daemon (the CLI's verbs): the host settings are resolved
    /// and checked as usual, but channel tables are not (their secrets belong to the daemon's
    /// environment, not the operator's shell).
    pub fn load_for_client(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse_with(&text, path, false)
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_with(text, path, true)
    }

    fn parse_with(text: &str, path: &Path, channels_too: bool) -> Result<Self, ConfigError> {
        let syntax = |e: toml::de::Error| {
            let (line, column) = e
                .span()
                .map(|span| line_column(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }
        };
        // Parsed once: the spanned document both feeds serde and locates later errors.
        let document = toml::de::DeTable::parse(text).map_err(syntax)?;
        let raw = RawConfig::deserialize(toml::de::Deserializer::from(document.clone()))
            .map_err(syntax)?;
        let base = path.parent().unwrap_or(Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        // One name per file: paths enter canonical (a relative `--config` included).
        let canonical = std::fs::canonicalize(base);
        let base = canonical.as_deref().unwrap_or(base);
        let mut raw = raw;
        if !channels_too {
            raw.channels.clear();
        }
        Self::from_raw(raw, base, Some((path, text, document.get_ref())))
    }

    fn from_raw(
        raw: RawConfig,
        base: &Path,
        source: Option<(&Path, &str, &toml::de::DeTable<'_>)>,
    ) -> Result<Self, ConfigError> {
        let invalid = |key_path: &[&str], message: String| {
            let (path, text, start) = match source {
                Some((path, text, document)) => (path, text, span_of(document, key_path)),
                None => (Path::new("<defaults>"), "", None),
            };
            let (line, column) = start
                .map(|start| line_column(text, start))
                .unwrap_or((1, 1));
            ConfigError::Invalid {
                path: path.to_owned(),
                line,
                column,
                message,
            }
        };
        let host = raw.host;
        let api_token = host
            .api_token
            .as_ref()
            .map(|s| resolve_secret(s, base).map(Secret::new))
            .transpose()
            .map_err(|m| invalid(&["host", "api_token"], m))?;
        for (section, key, value) in settings(
            &host,
            &raw.supervisor,
            &raw.health,
            &raw.journal,
            &raw.outbox,
            raw.cluster.as_ref().map(|c| c.lease_ttl),
        ) {
            limits::check(section, key, value).map_err(|m| invalid(&[section, key], m))?;
        }
        let cluster = raw
            .cluster
            .map(|c| c.resolve(|s| resolve_secret(s, base)))
            .transpose()
            .map_err(|(key, m)| invalid(&["cluster", key], m))?;
        if !host.api_address.ip().is_loopback() && !host.allow_remote {
            return Err(invalid(
                &["host", "api_address"],
                format!(
                    "api_address {} is not a loopback address; the API would be reachable from \
                     other machines. Set [host] allow_remote = true to allow it",
                    host.api_address
                ),
            ));
        }
        let read_token = raw
            .api
            .read_token
            .map(|s| resolve_secret(&s, base).map(Secret::new))
            .transpose()
            .map_err(|m| invalid(&["api", "read_token"], m))?;

        let mut channels = BTreeMap::new();
        for (id, table) in raw.channels {
            let mut value = Toml::Table(table);
            let mut at = vec!["channels".to_owned(), id.clone()];
            resolve_secrets(&mut value, base, &mut at).map_err(|(path, message)| {
                let path: Vec<&str> = path.iter().map(String::as_str).collect();
                invalid(&path, message)
            })?;
            check_account_ids(&value)
                .map_err(|(key, message)| invalid(&["channels", &id, "accounts", &key], message))?;
            let table = serde_json::to_value(&value).unwrap_or(Json::Null);
            channels.insert(id, ChannelSection { table });
        }

        Ok(Self {
            file: source.map(|(p, _, _)| p.to_owned()),
            host: HostConfig {
                plugins_dir: base.join(host.plugins_dir),
                state_dir: base.join(host.state_dir),
                api_address: host.api_address,
                allow_remote: host.allow_remote,
                api_token,
                plugin_worker_threads: host.plugin_worker_threads,
                plugin_call_timeout: host.plugin_call_timeout,
                settle: host.settle,
                rescan_interval: host.rescan_interval,
                watch: host.watch,
                watch_config: host.watch_config,
                load_timeout: host.load_timeout,
                plugin_shutdown_timeout: host.plugin_shutdown_timeout,
                isolation_handshake_timeout: host.isolation_handshake_timeout,
            },
            supervisor: raw.supervisor,
            health: raw.health,
            api: ApiConfig { read_token },
            journal: raw.journal,
            outbox: raw.outbox,
            gateways: raw.gateways,
            metrics: raw.metrics,
            cluster,
            channels,
        })
    }

    /// The channel's table (an empty table for a channel the config does not mention).
    pub fn channel(&self, id: &str) -> ChannelSection {
        self.channels
            .get(id)
            .cloned()
            .unwrap_or_else(|| ChannelSection {
                table: Json::Object(Default::default()),
            })
    }
}

fn resolve_secret(source: &SecretSource, base: &Path) -> Result<String, String> {
    match source {
        SecretSource::Literal(value) => Ok(value.clone()),
        SecretSource::Env { env } => std::env::var(env)
            .map_err(|_| format!("environment variable {env} is not set (it holds a secret)")),
        SecretSource::File { file } => {
            let path = base.join(file);
            std::fs::read_to_string(&path)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|e| format!("secret file {}: {e}", path.display()))
        }
    }
}

/// Replaces every `{ env = "…" }` / `{ file = "…" }` table below `value` with what it names.
fn resolve_secrets(
    value: &mut Toml,
    base: &Path,
    at: &mut Vec<String>,
) -> Result<(), (Vec<String>, String)> {
    let Toml::Table(table) = value else {
        if let Toml::Array(items) = value {
            for item in items {
                resolve_secrets(item, base, at)?;
            }
        }
        return Ok(());
    };
    let reference = match (table.len(), table.get("env"), table.get("file")) {
        (1, Some(Toml::String(env)), _) => Some(SecretSource::Env { env: env.clone() }),
        (1, _, Some(Toml::String(file))) => Some(SecretSource::File { file: file.into() }),
        _ => None,
    };
    if let Some(reference) = reference {
        let resolved = resolve_secret(&reference, base).map_err(|m| (at.clone(), m))?;
        *value = Toml::String(resolved);
        return Ok(());
    }
    for (key, child) in table.iter_mut() {
        at.push(key.clone());
        resolve_secrets(child, base, at)?;
        at.pop();
    }
    Ok(())
}

/// Two account keys that normalise to the same id are an error naming both.
fn check_account_ids(channel: &Toml) -> Result<(), (String, String)> {
    let Some(accounts) = channel.get("accounts").and_then(Toml::as_table) else {
        return Ok(());
    };
    let mut seen: BTreeMap<String, &str> = BTreeMap::new();
    for key in accounts.keys() {
        let id = normalize_account_id(key);
        if let Some(first) = seen.insert(id.clone(), key) {
            return Err((
                key.clone(),
                format!("accounts {first:?} and {key:?} both normalise to the account id {id:?}"),
            ));
        }
    }
    Ok(())
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

/// The byte offset where the value at `path` starts (or its deepest existing ancestor's key), from
/// the spans of the parsed document.
fn span_of(document: &toml::de::DeTable<'_>, path: &[&str]) -> Option<usize> {
    let mut table = document;
    let mut found = None;
    for segment in path {
        let (key, value) = table
            .iter()
            .find(|(k, _)| k.get_ref().as_ref() == *segment)?;
        found = Some(key.span().start);
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => table = inner,
            _ => return found,
        }
    }
    found
}

/// Every range-checked setting's value (the ranges are [`limits::RANGES`]).
fn settings(
    host: &RawHost,
    supervisor: &SupervisorConfig,
    health: &HealthConfig,
    journal: &crate::journal::JournalConfig,
    outbox: &crate::outbox::OutboxConfig,
    cluster_lease_ttl: Option<Duration>,
) -> Vec<(&'static str, &'static str, limits::Value)> {
    use limits::Value::{Count, Duration as D, Fraction};
    let s = supervisor;
    let h = health;
    vec![
        (
            "host",
            "plugin_worker_threads",
            Count(host.plugin_worker_threads.into()),
        ),
        ("host", "plugin_call_timeout", D(host.plugin_call_timeout)),
        ("host", "settle", D(host.settle)),
        ("host", "load_timeout", D(host.load_timeout)),
        (
            "host",
            "plugin_shutdown_timeout",
            D(host.plugin_shutdown_timeout),
        ),
        (
            "host",
            "isolation_handshake_timeout",
            D(host.isolation_handshake_timeout),
        ),
        ("host", "rescan_interval", D(host.rescan_interval)),
        ("supervisor", "initial_backoff", D(s.initial_backoff)),
        ("supervisor", "backoff_factor", Fraction(s.backoff_factor)),
        ("supervisor", "max_backoff", D(s.max_backoff)),
        ("supervisor", "jitter", Fraction(s.jitter)),
        ("supervisor", "max_restarts", Count(s.max_restarts.into())),
        ("supervisor", "stable_run", D(s.stable_run)),
        ("supervisor", "stop_timeout", D(s.stop_timeout)),
        ("supervisor", "start_timeout", D(s.start_timeout)),
        ("supervisor", "cancel_grace", D(s.cancel_grace)),
        (
            "supervisor",
            "startup_accounts_per_channel",
            Count(s.startup_accounts_per_channel as u64),
        ),
        (
            "supervisor",
            "startup_channels",
            Count(s.startup_channels as u64),
        ),
        (
            "supervisor",
            "restart_log_interval",
            D(s.restart_log_interval),
        ),
        ("health", "interval", D(h.interval)),
        ("health", "startup_grace", D(h.startup_grace)),
        ("health", "connect_grace", D(h.connect_grace)),
        (
            "health",
            "stale_event_threshold",
            D(h.stale_event_threshold),
        ),
        ("health", "busy_stuck_threshold", D(h.busy_stuck_threshold)),
        ("health", "cooldown_cycles", Count(h.cooldown_cycles.into())),
        (
            "health",
            "max_restarts_per_hour",
            Count(h.max_restarts_per_hour.into()),
        ),
        ("journal", "retain", D(journal.retain)),
        ("journal", "max_size", Count(journal.max_size.as_u64())),
        (
            "journal",
            "max_message_bytes",
            Count(journal.max_message_bytes),
        ),
        ("outbox", "retry_initial", D(outbox.retry_initial)),
        ("outbox", "retry_max", D(outbox.retry_max)),
        ("outbox", "deadline", D(outbox.deadline)),
        ("outbox", "poll_interval", D(outbox.poll_interval)),
        ("outbox", "retain", D(outbox.retain)),
        (
            "outbox",
            "max_queued_per_account",
            Count(outbox.max_queued_per_account),
        ),
        ("outbox", "max_queued", Count(outbox.max_queued)),
        ("outbox", "max_in_flight", Count(outbox.max_in_flight)),
        ("outbox", "hop_limit", Count(outbox.hop_limit.into())),
        (
            "cluster",
            "lease_ttl",
            D(cluster_lease_ttl.unwrap_or(crate::cluster::config::DEFAULT_LEASE_TTL)),
        ),
    ]
}

/// Every host-owned key of `[host]`, `[supervisor]` and `[health]` with its default, as TOML
/// (`api_token`, which has no default, is absent).
pub fn host_owned_defaults() -> toml::Table {
    let mut table = toml::Table::try_from(RawConfig::default()).expect("the defaults serialise");
    table.remove("channels");
    table
}

/// The checked keys, `section.key`, for tests that hold them against [`limits::RANGES`].
pub fn range_checked_keys() -> Vec<String> {
    let raw = RawConfig::default();
    settings(
        &raw.host,
        &raw.supervisor,
        &raw.health,
        &raw.journal,
        &raw.outbox,
        None,
    )
    .into_iter()
    .map(|(section, key, _)| format!("{section}.{key}"))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/channeld/channeld.toml"))
    }

    #[test]
    fn an_empty_file_is_the_defaults_relative_to_the_file() {
        let config = parse("").unwrap();
        assert_eq!(config.host.plugins_dir, Path::new("/etc/channeld/plugins"));
        assert_eq!(config.host.state_dir, Path::new("/etc/channeld/state"));
        assert_eq!(config.supervisor, SupervisorConfig::default());
        assert_eq!(config.supervisor.initial_backoff, Duration::from_secs(5));
        assert!(config.channels.is_empty());
    }

    #[test]
    fn an_unknown_host_key_names_file_line_and_what_is_expected() {
        let err = parse("[host]\nplugins_dir = \"p\"\nplugin_dir = \"x\"\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("/etc/channeld/channeld.toml:3:1: "),
            "{text}"
        );
        assert!(text.contains("unknown field `plugin_dir`"), "{text}");
        assert!(
            text.contains("plugins_dir"),
            "lists what is expected: {text}"
        );
    }

    #[test]
    fn a_bad_duration_names_its_line() {
        let err = parse("[supervisor]\n\ninitial_backoff = \"soon\"\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/etc/channeld/channeld.toml:3:"), "{text}");
        assert!(
            text.contains("initial_backoff") || text.contains("soon") || text.contains("unit"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_jitter_names_its_line() {
        let err = parse("[supervisor]\njitter = -1.0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/channeld/channeld.toml:2:1: jitter = -1.0 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn colliding_account_ids_name_both() {
        let err = parse("[channels.irc.accounts.Libera]\n[channels.irc.accounts.libera]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"Libera\" and \"libera\""), "{err}");
        assert!(err.contains(":2:"), "{err}");
    }

    #[test]
    fn secrets_resolve_from_env_and_file_and_never_print() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token.txt"), "from-file\n").unwrap();
        // SAFETY: this is the only test that touches this variable, and it is read in this thread.
        unsafe { std::env::set_var("CHANNELD_TEST_SECRET_1", "from-env") };
        let config = Config::parse(
            "[host]\napi_token = { file = \"token.txt\" }\n\
             [channels.webhook.accounts.main]\nsecret = { env = \"CHANNELD_TEST_SECRET_1\" }\n",
            &dir.path().join("c.toml"),
        )
        .unwrap();
        assert_eq!(
            config.host.api_token.as_ref().unwrap().expose(),
            "from-file"
        );
        assert_eq!(
            config.channel("webhook").table["accounts"]["main"]["secret"],
            "from-env"
        );
        assert_eq!(format!("{:?}", config.host.api_token), "Some([redacted])");
        assert!(!format!("{:?}", config.host).contains("from-file"));
        assert!(
            !format!("{config:?}").contains("from-env"),
            "a resolved channel secret never shows in Debug"
        );
    }

    #[test]
    fn a_missing_secret_names_its_line_and_variable() {
        let err =
            parse("[channels.w.accounts.a]\nx = 1\nsecret = { env = \"CHANNELD_NOPE_UNSET\" }\n")
                .unwrap_err()
                .to_string();
        assert!(err.contains(":3:"), "{err}");
        assert!(err.contains("CHANNELD_NOPE_UNSET is not set"), "{err}");
    }

    #[test]
    fn health_monitor_lookup_precedence() {
        let config = parse(
            "[channels.c]\nhealth_monitor.enabled = false\n\
             [channels.c.accounts.Exact]\nhealth_monitor.enabled = true\n\
             [channels.c.accounts.\"Mixed Case\"]\nhealth_monitor.enabled = true\n\
             [channels.c.accounts.plain]\n",
        )
        .unwrap();
        let c = config.channel("c");
        assert_eq!(c.health_monitor_enabled("Exact"), Some(true));
        assert_eq!(
            c.health_monitor_enabled("exact"),
            Some(true),
            "case-insensitive"
        );
        assert_eq!(
            c.health_monitor_enabled("mixed-case"),
            Some(true),
            "normalised"
        );
        assert_eq!(
            c.health_monitor_enabled("plain"),
            Some(false),
            "the channel's"
        );
        assert_eq!(
            c.health_monitor_enabled(""),
            Some(false),
            "empty matches no account"
        );
        assert_eq!(config.channel("other").health_monitor_enabled("x"), None);
    }
}
