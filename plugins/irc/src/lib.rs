//! # The `irc` channel: an IRC client that joins channels and relays `PRIVMSG`s
//!
//! Each account is one connection to one IRC server, as one nick, in a list of channels.
//!
//! ## Config
//! ```toml
//! [channels.irc.accounts.main]
//! server = "irc.example.org"          # required
//! port = 6697                         # optional; default 6697 with TLS, 6667 without
//! tls = true                          # optional, default false (rustls, the system's roots)
//! ca_file = "/etc/channeld/irc-ca.pem" # optional, with tls: trust these PEM certificates
//!                                     # instead of the system's roots (a private CA)
//! nick = "channeld"                   # required
//! nick_fallbacks = ["channeld_", "channeld__"]  # optional: tried in order when a nick is taken
//! password = { env = "IRC_PASSWORD" } # optional server password (PASS); a secret the host resolves
//! username = "channeld"               # optional, default the nick
//! realname = "channeld bridge"        # optional, default "channeld"
//! channels = ["#test", "#ops"]        # channels to join
//! flood_burst = 4                     # optional: lines sent at once before pacing starts
//! flood_interval_ms = 500             # optional: then one line per this interval
//! ping_timeout_secs = 120             # optional: a silent server is pinged after half of this
//!                                     # and the connection given up after all of it
//! ```
//! An account without `server` or `nick`, or with an unknown key, is reported as not configured
//! with the reason.
//!
//! ## Behaviour
//! - The account is `connected` only once the server has welcomed the nick and every configured
//!   channel is joined (its end of `NAMES` arrived). Sends wait until then.
//! - A `PRIVMSG` to a joined channel is delivered with the channel as its conversation; one to the
//!   account's nick with the sender's nick as its conversation. The sender is the sender's nick.
//!   The next line is read only once the host has made the message durable.
//! - A send's conversation is a channel or a nick. Its text becomes one `PRIVMSG` per line, each
//!   split on UTF-8 boundaries to fit the protocol's 512-byte line limit (with room for the prefix
//!   the server adds when relaying), and paced by the flood settings. A send completes when its
//!   last line is written to the socket: IRC has no delivery confirmation, so "sent" is all the
//!   plugin can know.
//! - Every line from the server is recorded as inbound traffic and every `PONG` as a liveness
//!   event, so the health monitor can tell a stale socket.
//! - When the connection drops (or the server stays silent for `ping_timeout_secs`), the task ends
//!   with an error. The plugin never reconnects by itself: the supervisor restarts the account
//!   with its backoff.
//! - No SASL.

mod split;

use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use channeld_plugin_abi::{
    export_plugin,
    sdk::{
        Account, AccountContext, ChannelPlugin, EventKind, Inbound, Outbound, OutboundQueue,
        PluginError, PluginResult, Verdict,
    },
};
use futures_util::{SinkExt as _, StreamExt as _};
use irc_proto::{Command, IrcCodec, Message, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    time::{Instant, sleep_until},
};
use tokio_rustls::rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};
use tokio_util::codec::Framed;

pub use split::split_message;

/// The account's settings. No `Debug`: the password must not reach a log line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    server: String,
    port: Option<u16>,
    #[serde(default)]
    tls: bool,
    ca_file: Option<PathBuf>,
    nick: String,
    #[serde(default)]
    nick_fallbacks: Vec<String>,
    password: Option<String>,
    username: Option<String>,
    realname: Option<String>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default = "default_flood_burst")]
    flood_burst: u32,
    #[serde(default = "default_flood_interval_ms")]
    flood_interval_ms: u64,
    #[serde(default = "default_ping_timeout_secs")]
    ping_timeout_secs: u64,
}

fn default_flood_burst() -> u32 {
    4
}
fn default_flood_interval_ms() -> u64 {
    500
}
fn default_ping_timeout_secs() -> u64 {
    120
}

impl Settings {
    /// The account's settings, or the one-line reason it cannot start.
    fn of(account: &Account) -> Result<Self, String> {
        for key in ["server", "nick"] {
            if account.get(key).is_none() {
                return Err(format!("missing `{key}`"));
            }
        }
        let settings: Self = account.parse().map_err(|e| e.message().to_owned())?;
        if settings.nick.is_empty() || settings.nick.contains([' ', ',', '*', '?', '!', '@']) {
            return Err(format!("`nick` {:?} is not a valid nick", settings.nick));
        }
        if let Some(bad) = settings
            .channels
            .iter()
            .find(|c| !c.starts_with(['#', '&', '+', '!']) || c.contains([' ', ',', '\x07']))
        {
            return Err(format!("`channels`: {bad:?} is not a channel name"));
        }
        if settings.ping_timeout_secs < 2 {
            return Err("`ping_timeout_secs` must be at least 2".to_owned());
        }
        if settings.flood_burst == 0 {
            return Err("`flood_burst` must be at least 1".to_owned());
        }
        if let Some(ca_file) = &settings.ca_file {
            if !settings.tls {
                return Err("`ca_file` is set but `tls` is not".to_owned());
            }
            roots(Some(ca_file))?;
        }
        Ok(settings)
    }

    fn port(&self) -> u16 {
        self.port.unwrap_or(if self.tls { 6697 } else { 6667 })
    }
}

/// A byte stream to the server: plain TCP or TLS.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The certificates TLS trusts: those of `ca_file` (PEM) when given, else the system's roots.
fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let Some(path) = ca_file else {
        for cert in rustls_native_certs::load_native_certs().certs {
            // A root the system has but rustls cannot parse is skipped, not fatal.
            let _ = roots.add(cert);
        }
        return Ok(roots);
    };
    let bad = |e: &dyn std::fmt::Display| format!("`ca_file` {}: {e}", path.display());
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
        roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
    }
    if roots.is_empty() {
        return Err(bad(&"no PEM certificate in it"));
    }
    Ok(roots)
}

/// Opens the connection (TLS with the system's roots, or `ca_file`'s, when asked).
async fn connect(settings: &Settings) -> PluginResult<Pin<Box<dyn Io>>> {
    let addr = format!("{}:{}", settings.server, settings.port());
    let tcp = TcpStream::connect(&addr)
        .await
        .map_err(|e| PluginError::new(format!("cannot connect to {addr}: {e}")))?;
    tcp.set_nodelay(true)?;
    if !settings.tls {
        return Ok(Box::pin(tcp));
    }
    let roots = roots(settings.ca_file.as_deref()).map_err(PluginError::new)?;
    let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(PluginError::msg)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from(settings.server.clone())
        .map_err(|e| PluginError::new(format!("`server` {:?}: {e}", settings.server)))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| PluginError::new(format!("TLS handshake with {addr} failed: {e}")))?;
    Ok(Box::pin(tls))
}

/// Paces lines: `burst` at once, then one per `interval`.
struct Pacer {
    interval: Duration,
    burst: u32,
    /// When the bucket is full again (the "virtual time" of the last line).
    next: Instant,
}

impl Pacer {
    fn new(burst: u32, interval: Duration) -> Self {
        Self {
            interval,
            burst,
            next: Instant::now(),
        }
    }

    /// Waits until one more line may be written.
    async fn ready(&mut self) {
        let now = Instant::now();
        let window = self.interval * self.burst;
        if self.next < now {
            self.next = now;
        }
        if self.next > now + window.saturating_sub(self.interval) {
            sleep_until(self.next - window.saturating_sub(self.interval)).await;
        }
        self.next += self.interval;
    }
}

/// The IRC channel plugin.
#[derive(Default)]
struct Irc;

impl ChannelPlugin for Irc {
    const CHANNEL_ID: &'static str = "irc";
    const DISPLAY_NAME: &'static str = "IRC";

    fn is_configured(&self, account: &Account) -> Verdict {
        match Settings::of(account) {
            Ok(_) => Verdict::Yes,
            Err(reason) => Verdict::no(reason),
        }
    }

    async fn start(&self, ctx: AccountContext) -> PluginResult {
        let settings = Settings::of(ctx.account()).map_err(PluginError::new)?;
        // The SDK's default `send` hands each message from this account to this queue.
        let outbound = ctx.outbound();
        run(&ctx, &settings, outbound).await
    }
}

/// Where the connection is.
struct Session {
    /// The nick the server accepted (or the one being tried).
    nick: String,
    /// Fallback nicks not tried yet.
    fallbacks: std::vec::IntoIter<String>,
    welcomed: bool,
    /// Channels whose end of NAMES has not arrived yet (lower-cased).
    joining: HashSet<String>,
    connected: bool,
    sent: u64,
}

/// Runs one connection until it drops or the abort fires.
async fn run(
    ctx: &AccountContext,
    settings: &Settings,
    mut outbound: OutboundQueue,
) -> PluginResult {
    let host = ctx.host();
    host.set_connected(false);
    let io = connect(settings).await?;
    let mut conn = Framed::new(io, IrcCodec::new("utf-8").map_err(PluginError::msg)?);
    let mut session = Session {
        nick: settings.nick.clone(),
        fallbacks: settings.nick_fallbacks.clone().into_iter(),
        welcomed: false,
        joining: settings.channels.iter().map(|c| c.to_lowercase()).collect(),
        connected: false,
        sent: 0,
    };
    if let Some(password) = &settings.password {
        conn.send(Command::PASS(password.clone()).into()).await?;
    }
    conn.send(Command::NICK(session.nick.clone()).into())
        .await?;
    conn.send(
        Command::USER(
            settings
                .username
                .clone()
                .unwrap_or_else(|| settings.nick.clone()),
            "0".to_owned(),
            settings
                .realname
                .clone()
                .unwrap_or_else(|| "channeld".to_owned()),
        )
        .into(),
    )
    .await?;
    host.record_event(EventKind::Outbound);

    let timeout = Duration::from_secs(settings.ping_timeout_secs);
    let mut last_heard = Instant::now();
    let mut pinged = false;
    let mut pacer = Pacer::new(
        settings.flood_burst,
        Duration::from_millis(settings.flood_interval_ms),
    );
    let server = format!("{}:{}", settings.server, settings.port());
    loop {
        let deadline = if pinged {
            last_heard + timeout
        } else {
            last_heard + timeout / 2
        };
        tokio::select! {
            () = ctx.aborted() => {
                // Best effort: the server drops the connection anyway when the socket closes.
                let quit = conn.send(Command::QUIT(Some("channeld stopping".to_owned())).into());
                let _ = tokio::time::timeout(Duration::from_secs(1), quit).await;
                return Ok(());
            }
            line = conn.next() => {
                let message = match line {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => return Err(PluginError::new(format!("connection to {server} failed: {e}"))),
                    None => return Err(PluginError::new(format!("connection to {server} closed by the server"))),
                };
                last_heard = Instant::now();
                pinged = false;
                handle(ctx, settings, &mut conn, &mut session, message).await?;
            }
            request = outbound.recv(), if session.connected => {
                let Some(request) = request else { continue };
                let target = &request.message().conversation;
                if target.is_empty() || target.contains([' ', ',', '\r', '\n', '\0']) {
                    let reason = format!("{target:?} is not a channel or nick");
                    request.finish(Err(PluginError::new(reason)));
                    continue;
                }
                let outcome = write_message(ctx, &mut conn, &mut pacer, &mut session, request.message()).await;
                let failed = outcome.as_ref().err().map(|e| e.message().to_owned());
                request.finish(outcome);
                if let Some(e) = failed {
                    return Err(PluginError::new(format!("connection to {server} failed: {e}")));
                }
            }
            () = sleep_until(deadline) => {
                if pinged {
                    return Err(PluginError::new(format!(
                        "no answer from {server} for {}s (ping timeout)", settings.ping_timeout_secs
                    )));
                }
                pinged = true;
                conn.send(Command::PING(settings.server.clone(), None).into()).await?;
                host.record_event(EventKind::Other);
            }
        }
    }
}

type Conn = Framed<Pin<Box<dyn Io>>, IrcCodec>;

/// Acts on one line from the server.
async fn handle(
    ctx: &AccountContext,
    settings: &Settings,
    conn: &mut Conn,
    session: &mut Session,
    message: Message,
) -> PluginResult {
    let host = ctx.host();
    match &message.command {
        Command::PONG(..) => {
            host.record_event(EventKind::Other);
            return Ok(());
        }
        Command::PING(server, _) => {
            host.record_event(EventKind::Other);
            conn.send(Command::PONG(server.clone(), None).into())
                .await?;
            return Ok(());
        }
        _ => {}
    }
    host.record_event(EventKind::Inbound);
    match &message.command {
        Command::Response(Response::RPL_WELCOME, args) => {
            session.welcomed = true;
            if let Some(nick) = args.first() {
                session.nick.clone_from(nick);
            }
            host.patch_status(&json!({ "mode": "irc", "nick": session.nick }))?;
            if settings.channels.is_empty() {
                set_connected(ctx, session);
            } else {
                conn.send(Command::JOIN(settings.channels.join(","), None, None).into())
                    .await?;
            }
        }
        Command::Response(Response::ERR_NICKNAMEINUSE | Response::ERR_ERRONEOUSNICKNAME, _)
            if !session.welcomed =>
        {
            let Some(next) = session.fallbacks.next() else {
                return Err(PluginError::new(format!(
                    "nick {:?} and every fallback refused by the server",
                    settings.nick
                )));
            };
            tracing::info!(taken = %session.nick, trying = %next, "nick refused; trying a fallback");
            session.nick = next;
            conn.send(Command::NICK(session.nick.clone()).into())
                .await?;
        }
        Command::Response(Response::RPL_ENDOFNAMES, args) => {
            if let Some(channel) = args.get(1)
                && session.joining.remove(&channel.to_lowercase())
                && session.joining.is_empty()
            {
                set_connected(ctx, session);
            }
        }
        Command::Response(
            response @ (Response::ERR_NOSUCHCHANNEL
            | Response::ERR_CHANNELISFULL
            | Response::ERR_INVITEONLYCHAN
            | Response::ERR_BANNEDFROMCHAN
            | Response::ERR_BADCHANNELKEY
            | Response::ERR_TOOMANYCHANNELS),
            args,
        ) => {
            return Err(PluginError::new(format!(
                "cannot join {}: {response:?} {}",
                args.get(1).map_or("?", String::as_str),
                args.last().map_or("", String::as_str)
            )));
        }
        Command::PRIVMSG(target, text) => {
            let Some(sender) = message.source_nickname() else {
                return Ok(());
            };
            let conversation = if target.eq_ignore_ascii_case(&session.nick) {
                sender.to_owned()
            } else {
                target.clone()
            };
            ctx.deliver(Inbound::new(conversation, sender, text.clone()))
                .await?;
        }
        Command::ERROR(reason) => {
            return Err(PluginError::new(format!(
                "the server closed the link: {reason}"
            )));
        }
        _ => {}
    }
    Ok(())
}

fn set_connected(ctx: &AccountContext, session: &mut Session) {
    session.connected = true;
    ctx.host().set_connected(true);
    tracing::info!(nick = %session.nick, "joined every channel; connected");
}

/// Writes one outbound message as paced `PRIVMSG` lines; its id is `<nick>:<count>`.
async fn write_message(
    ctx: &AccountContext,
    conn: &mut Conn,
    pacer: &mut Pacer,
    session: &mut Session,
    message: &Outbound,
) -> PluginResult<String> {
    let target = message.conversation.as_str();
    for line in split_message(&message.text, line_budget(&session.nick, target)) {
        pacer.ready().await;
        conn.send(Command::PRIVMSG(target.to_owned(), line).into())
            .await?;
        ctx.host().record_event(EventKind::Outbound);
    }
    session.sent += 1;
    Ok(format!("{}:{}", session.nick, session.sent))
}

/// The bytes of text one `PRIVMSG` line to `target` may carry: 512 minus CRLF, the command, and
/// the `:nick!user@host ` prefix the server puts in front when relaying it (user and host at
/// their usual maximum lengths).
fn line_budget(nick: &str, target: &str) -> usize {
    const PREFIX_ROOM: usize = 1 + 1 + 10 + 1 + 63 + 1; // ":" nick "!" user "@" host " "
    510usize
        .saturating_sub(PREFIX_ROOM + nick.len())
        .saturating_sub("PRIVMSG  :".len() + target.len())
        .max(1)
}

export_plugin!(Irc);

#[cfg(test)]
mod tests;
