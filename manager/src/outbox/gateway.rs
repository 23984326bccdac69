//! Gateways: bridges between channels, in matterbridge's model.
//!
//! ```toml
//! [[gateways]]
//! name = "rust"
//! members = [
//!   { account = "irc:libera", conversation = "#rust", direction = "inout" },
//!   { account = "mqtt:home", conversation = "chat/rust", template = "[{channel}] <{sender}> {text}" },
//! ]
//! ```
//!
//! A message arriving on a member whose direction is `in` or `inout` becomes, once the journal
//! has it, an outbound message (through the outbox, with its retries and status) to every other
//! member whose direction is `out` or `inout`, its text written with that member's `template`
//! (`{channel}`, `{account}`, `{conversation}`, `{sender}`, `{text}`; default
//! `[{channel}] <{sender}> {text}`). Gateways do not chain inside channeld: a message the outbox
//! sends is not an inbound message.
//!
//! The gateways in force are those of the config in force ([`CurrentConfig`], the one owner):
//! every inbound message goes through [`GatewaySink`], which reads them from it, so a gateway a
//! config reload adds, changes or removes takes effect with the next message, whether or not the
//! config had gateways at start.
//!
//! No loops: each bridged message carries `extra.gateway = {name, origin, hops}`; a plugin that
//! can carry metadata hands `extra` back on inbound (the webhook in its body). A message never
//! goes back to the member it came from, nor to the member it first came from (`origin`); and
//! one that arrives with `hops` at `[outbox] hop_limit` is not bridged again, and counted
//! (`hopLimitStops` in `GET /v1/outbox`), which stops cycles that run through the outside world.
//!
//! Delivery: the bridged messages are accepted into the outbox right after the journal
//! acknowledged the inbound one, before the plugin hears back. Each copy's idempotency key is
//! `gateway:<gateway>:<target member>:<journal seq>`, so routing the same journal message
//! again queues nothing new. The journal's database keeps a bridging mark (meta
//! `bridged_through`): every journal message up to it has been routed. It advances as routings
//! complete (to just below the oldest routing still in progress) and is written with the
//! outbox's next commit, after a config reload ([`Gateways::reloaded`]) and at shutdown
//! ([`Gateways::flush_mark`]). At startup, once the
//! plugins are loaded and before any account starts, [`Gateways::recover`] routes again every
//! journal message after it. A crash between the journal's commit and the outbox's insert is
//! thus repaired at the next start, each copy queued once. (Routing again is safe at any time,
//! even beside live routings: it only finds the copies already queued.)
//!
//! Refused copies: a copy the outbox refuses for a transient reason ([`Refusal`]: the outbox
//! full, the target's configured channel not loaded, its account not listed yet, a database
//! error) is held (`held.rs`) and retried by [`Gateways::retry_held`] with the outbox's backoff;
//! the mark stays below it until it is queued. A permanent refusal (the copy malformed, the
//! target's channel not configured at all), or a held copy whose gateway or target member a
//! reload removed, is logged with the gateway, the target and the journal entry, counted
//! (`bridgeDropped`), and passed.
//!
//! Test only: with the environment variable [`EXIT_BEFORE_BRIDGING`] set, the daemon ends
//! (`_exit`, status [`EXIT_BEFORE_BRIDGING_STATUS`]) right after the journal committed a message
//! a gateway wants and before it is bridged, the crash the integration test forces. Release builds
//! ignore the variable.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock},
};

use channeld_plugin_abi::abi::InboundMessage;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    NewMessage, Outbox, OutboxError,
    held::{Held, Hold, RetryQueue},
    lock,
};
use crate::{
    config::Config,
    host::AccountKey,
    inbound::MessageSink,
    journal::{Filter, Journal, JournalError},
    plugin::BoxFuture,
    reload::CurrentConfig,
    supervise::Supervisor,
};

/// Test only: set (to anything), the daemon ends right after the journal committed a message a
/// gateway wants, before bridging it (the crash between the two, forced).
pub const EXIT_BEFORE_BRIDGING: &str = "CHANNELD_TEST_EXIT_BEFORE_BRIDGING";
/// The exit status of [`EXIT_BEFORE_BRIDGING`]'s forced crash.
pub const EXIT_BEFORE_BRIDGING_STATUS: u8 = 86;

/// The default template of a member.
pub const DEFAULT_TEMPLATE: &str = "[{channel}] <{sender}> {text}";

/// `CHANNEL:ACCOUNT`, checked when the config is read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct MemberAccount(pub AccountKey);

impl TryFrom<String> for MemberAccount {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.split_once(':') {
            Some((c, a)) if !c.is_empty() && !a.is_empty() && !a.contains(':') => Ok(Self(
                AccountKey::new(c, channeld_plugin_abi::normalize_account_id(a)),
            )),
            _ => Err(format!(
                "a gateway member's account must be CHANNEL:ACCOUNT, got {s:?}"
            )),
        }
    }
}

impl From<MemberAccount> for String {
    fn from(m: MemberAccount) -> Self {
        m.0.to_string()
    }
}

/// Which way messages flow through a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Its messages go to the other members; nothing is sent to it.
    In,
    /// It only receives the other members' messages.
    Out,
    /// Both.
    #[default]
    Inout,
}

/// One member of a gateway.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// `CHANNEL:ACCOUNT`.
    pub account: MemberAccount,
    /// The conversation (room, topic) bridged.
    pub conversation: String,
    /// `in`, `out` or `inout` (default).
    #[serde(default)]
    pub direction: Direction,
    /// How messages sent to this member are written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
}

impl Member {
    fn id(&self) -> String {
        format!("{}/{}", self.account.0, self.conversation)
    }
}

/// `[[gateways]]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Its name (in logs and in `extra.gateway.name`).
    pub name: String,
    /// Its members.
    pub members: Vec<Member>,
}

/// The gateways of the config in force, routing inbound messages into the outbox.
pub struct Gateways {
    /// The config in force, the one owner of the gateway set: a config reload swaps it whole, and
    /// every routing reads the gateways from it.
    config: Arc<CurrentConfig>,
    hop_limit: u32,
    outbox: OnceLock<Arc<Outbox>>,
    journal: OnceLock<Arc<Journal>>,
    marks: Mutex<Marks>,
    /// Told when a copy is held (the retry task's next wake may be sooner).
    held_changed: tokio::sync::Notify,
    exit_before_bridging: bool,
}

/// The routings in progress, for the bridging mark.
#[derive(Debug, Default)]
struct Marks {
    /// The next routing's ticket.
    next: u64,
    /// Each routing in progress (by ticket, so in the order they began) and the journal's
    /// last sequence number when it began: its message's number is higher.
    in_flight: BTreeMap<u64, u64>,
    /// The mark handed to the outbox so far.
    done: u64,
    /// Copies the outbox refused for a transient reason: the mark stays below each.
    held: RetryQueue,
}

/// What routing one journal message through the gateways did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Routed {
    /// Copies newly queued in the outbox.
    pub queued: u64,
    /// Copies the outbox already had (the same journal message routed before).
    pub duplicates: u64,
    /// Copies the outbox refused for a transient reason, held for a retry.
    pub held: u64,
    /// Copies the outbox refused for good: logged and let go.
    pub dropped: u64,
}

/// How the gateways treat a copy the outbox refused (docs/outbox.md, "Refused copies").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It may take it later: the copy is held and retried, the mark stays below it.
    Transient,
    /// It never will: the copy is logged and let go.
    Permanent,
}

/// How many refusals a copy gets, when its target's channel is loaded but does not list the
/// target's account, before it is let go (a reload that adds an account and a gateway to it
/// swaps the gateways before the account is added).
pub const UNLISTED_ACCOUNT_REFUSALS: u32 = 5;

/// What [`Gateways::recover`] did at startup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The bridging mark it found.
    pub from: u64,
    /// The journal's last sequence number, the mark it wrote.
    pub through: u64,
    /// Journal messages a gateway wants, routed again.
    pub messages: u64,
    /// Their copies newly queued (the crash had lost them).
    pub queued: u64,
    /// Their copies the outbox already had.
    pub duplicates: u64,
    /// Their copies the outbox refused for a transient reason, held for a retry (the mark
    /// written stays below the oldest).
    pub held: u64,
}

/// Why [`Gateways::recover`] could not route the journal again.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// The outbox's database.
    #[error("gateways: reading or writing the bridging mark: {0}")]
    Outbox(#[from] OutboxError),
    /// The journal.
    #[error("gateways: reading the journal after the bridging mark: {0}")]
    Journal(#[from] JournalError),
}

impl std::fmt::Debug for Gateways {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateways")
            .field("list", &self.in_force().gateways)
            .finish_non_exhaustive()
    }
}

fn render(
    template: &str,
    from: &AccountKey,
    conversation: &str,
    sender: &str,
    text: &str,
) -> String {
    template
        .replace("{channel}", &from.channel)
        .replace("{account}", &from.account)
        .replace("{conversation}", conversation)
        .replace("{sender}", sender)
        .replace("{text}", text)
}

impl Gateways {
    /// The gateways of `config` (the config in force, followed through reloads), with
    /// `[outbox] hop_limit` (restart only).
    pub fn new(config: Arc<CurrentConfig>, hop_limit: u32) -> Arc<Self> {
        Arc::new(Self {
            config,
            hop_limit,
            outbox: OnceLock::new(),
            journal: OnceLock::new(),
            marks: Mutex::default(),
            held_changed: tokio::sync::Notify::new(),
            // A test hook: release builds ignore it.
            exit_before_bridging: cfg!(debug_assertions)
                && std::env::var_os(EXIT_BEFORE_BRIDGING).is_some(),
        })
    }

    /// The config in force (its `gateways` are the gateways in force).
    fn in_force(&self) -> Arc<Config> {
        self.config.get()
    }

    /// Whether there are none in force.
    pub fn is_empty(&self) -> bool {
        self.in_force().gateways.is_empty()
    }

    /// Connects the outbox bridged messages go to (until then nothing is bridged) and the journal
    /// whose messages they are (its sequence numbers give the bridging mark).
    pub fn attach(&self, outbox: Arc<Outbox>, journal: Arc<Journal>) {
        let _ = self.journal.set(journal);
        let _ = self.outbox.set(outbox);
    }

    fn last_seq(&self) -> u64 {
        self.journal.get().map_or(0, |j| j.last_seq())
    }

    /// A routing begins (before its message goes to the journal): its ticket.
    pub(crate) fn begin(&self) -> u64 {
        let mut marks = lock(&self.marks);
        let ticket = marks.next;
        marks.next += 1;
        // Read under the lock: a routing that begins later has a higher number than this.
        let floor = self.last_seq();
        marks.in_flight.insert(ticket, floor);
        ticket
    }

    /// A routing ended (routed, or its message refused): the mark moves up to just below the
    /// oldest routing still in progress, or to the journal's end when none is.
    pub(crate) fn end(&self, ticket: u64) {
        let mut marks = lock(&self.marks);
        marks.in_flight.remove(&ticket);
        self.advance(&mut marks);
    }

    /// Moves the mark up as far as [`Gateways::safe_mark`] allows now.
    fn advance(&self, marks: &mut Marks) {
        let mark = self.safe_mark(marks);
        if mark > marks.done {
            marks.done = mark;
            if let Some(outbox) = self.outbox.get() {
                outbox.note_bridged_through(mark);
            }
        }
    }

    /// The highest mark the routings and the held copies allow now: just below the oldest
    /// routing in progress, or the journal's end when none is; and below every held copy's
    /// journal message.
    fn safe_mark(&self, marks: &Marks) -> u64 {
        let routed = match marks.in_flight.values().next() {
            Some(&floor) => floor,
            None => self.last_seq(),
        };
        match marks.held.oldest_seq() {
            Some(seq) => routed.min(seq.saturating_sub(1)),
            None => routed,
        }
    }

    /// Writes the bridging mark as far as the routings allow now (at shutdown, once the
    /// accounts stopped, and after a reload); the mark. Blocking.
    pub fn flush_mark(&self) -> Result<u64, OutboxError> {
        let Some(outbox) = self.outbox.get() else {
            return Ok(0);
        };
        let mark = {
            let mut marks = lock(&self.marks);
            let mark = self.safe_mark(&marks);
            marks.done = marks.done.max(mark);
            mark
        };
        outbox.write_bridged_through(mark)?;
        Ok(mark)
    }

    /// Routes again, through the gateways in force, every journal message after the bridging
    /// mark, then writes the mark at the journal's end. Call it once the outbox is attached and
    /// the plugins are loaded, before any account starts (no message arrives meanwhile).
    /// Blocking (journal reads, outbox commits).
    pub fn recover(&self) -> Result<Recovered, RecoverError> {
        let (Some(outbox), Some(journal)) = (self.outbox.get(), self.journal.get()) else {
            return Ok(Recovered::default());
        };
        let from = outbox.bridged_through()?;
        let through = journal.last_seq();
        let mut done = Recovered {
            from,
            through,
            ..Recovered::default()
        };
        let mut after = from;
        while after < through && !self.is_empty() {
            let batch = journal.read_after(after, through, &Filter::default(), 512)?;
            for m in &batch.messages {
                if !self.wants(&AccountKey::new(&m.channel, &m.account), &m.conversation) {
                    continue;
                }
                let routed = self.route(
                    m.seq,
                    &AccountKey::new(&m.channel, &m.account),
                    &m.conversation,
                    &m.sender,
                    &m.text,
                    m.extra.as_ref(),
                );
                done.messages += 1;
                done.queued += routed.queued;
                done.duplicates += routed.duplicates;
                done.held += routed.held;
            }
            if batch.cursor <= after {
                break;
            }
            after = batch.cursor;
        }
        // Not past a copy held for a retry: the next start routes it again if it is still held.
        let mark = {
            let mut marks = lock(&self.marks);
            let mark = match marks.held.oldest_seq() {
                Some(seq) => through.min(seq.saturating_sub(1)),
                None => through,
            };
            marks.done = marks.done.max(mark);
            mark
        };
        outbox.write_bridged_through(mark)?;
        Ok(done)
    }

    /// A config reload applied (the gateways in force may have changed): warns again about
    /// members whose channel no plugin provides, and writes the bridging mark as far as the
    /// routings allow now, on a blocking thread (every message journaled so far was routed, or is
    /// being routed, by the gateways in force before: a restart after a crash must not route it
    /// again through the new ones). Call it from within the runtime.
    pub fn reloaded(self: &Arc<Self>, supervisor: &Supervisor) {
        self.warn_unloaded(supervisor);
        let me = self.clone();
        tokio::task::spawn_blocking(move || match me.flush_mark() {
            Ok(mark) => tracing::info!(
                mark,
                "gateways: bridging mark written at journal entry {mark} (config reload)"
            ),
            Err(e) => tracing::warn!("gateways: writing the bridging mark after a reload: {e}"),
        });
    }

    /// Warns, naming the gateway, about every member whose channel no plugin provides.
    pub fn warn_unloaded(&self, supervisor: &Supervisor) {
        for gateway in &self.in_force().gateways {
            for member in &gateway.members {
                if supervisor.channel(&member.account.0.channel).is_err() {
                    tracing::warn!(
                        gateway = %gateway.name,
                        member = %member.account.0,
                        "gateway {:?}: member {} names channel {:?}, which is not loaded; \
                         nothing is bridged to or from it until it is",
                        gateway.name,
                        member.account.0,
                        member.account.0.channel
                    );
                }
            }
        }
    }

    fn wants(&self, key: &AccountKey, conversation: &str) -> bool {
        self.in_force().gateways.iter().any(|g| {
            g.members.iter().any(|m| {
                m.direction != Direction::Out
                    && m.account.0 == *key
                    && m.conversation == conversation
            })
        })
    }

    /// Bridges one inbound message, journal sequence number `seq`. Blocking (outbox commits).
    /// Each copy's idempotency key comes from the gateway, the target member and `seq`: routing
    /// the same journal message again queues each copy once.
    pub(crate) fn route(
        &self,
        seq: u64,
        key: &AccountKey,
        conversation: &str,
        sender: &str,
        text: &str,
        extra: Option<&Value>,
    ) -> Routed {
        let mut routed = Routed::default();
        let Some(outbox) = self.outbox.get() else {
            return routed;
        };
        let tag = extra.and_then(|e| e.get("gateway"));
        let hops = tag
            .and_then(|t| t.get("hops"))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let origin = tag
            .and_then(|t| t.get("origin"))
            .and_then(Value::as_str)
            .map(str::to_owned);
        for gateway in &self.in_force().gateways {
            let Some(from) = gateway.members.iter().find(|m| {
                m.direction != Direction::Out
                    && m.account.0 == *key
                    && m.conversation == conversation
            }) else {
                continue;
            };
            if hops >= u64::from(self.hop_limit) {
                outbox.count_hop_limit_stop();
                tracing::warn!(
                    gateway = %gateway.name,
                    from = %from.id(),
                    hops,
                    "gateway {:?}: message from {} reached the hop limit ({}); not bridged again",
                    gateway.name,
                    from.id(),
                    self.hop_limit
                );
                continue;
            }
            let origin = origin.clone().unwrap_or_else(|| from.id());
            for to in &gateway.members {
                if to.direction == Direction::In || to.id() == from.id() || to.id() == origin {
                    continue;
                }
                let template = to.template.as_deref().unwrap_or(DEFAULT_TEMPLATE);
                let message = NewMessage {
                    channel: to.account.0.channel.to_string(),
                    account: to.account.0.account.to_string(),
                    conversation: to.conversation.clone(),
                    text: render(template, key, conversation, sender, text),
                    extra: Some(json!({ "gateway": {
                        "name": gateway.name,
                        "origin": origin,
                        "hops": hops + 1,
                    }})),
                    idempotency_key: Some(format!("gateway:{}:{}:{seq}", gateway.name, to.id())),
                    ..NewMessage::default()
                };
                match outbox.submit(message.clone()) {
                    Ok(accepted) if accepted.duplicate => routed.duplicates += 1,
                    Ok(_) => {
                        routed.queued += 1;
                        outbox.count_bridged();
                    }
                    Err(e) => {
                        let copy = Held {
                            seq,
                            gateway: gateway.name.clone(),
                            target: to.id(),
                            message,
                            refusals: 1,
                            why: e.to_string(),
                        };
                        match self.refused(outbox, copy, &e) {
                            Refusal::Transient => routed.held += 1,
                            Refusal::Permanent => routed.dropped += 1,
                        }
                    }
                }
            }
        }
        routed
    }

    /// How to treat `error`, the outbox's refusal of a copy to `to`, refused `refusals` times
    /// (docs/outbox.md, "Refused copies").
    fn classify(
        &self,
        outbox: &Outbox,
        error: &OutboxError,
        to: &AccountKey,
        refusals: u32,
    ) -> Refusal {
        match error {
            // The caps free up as messages are sent; a database error may pass.
            OutboxError::Full { .. } | OutboxError::Database { .. } => Refusal::Transient,
            OutboxError::Unknown(_) => match outbox.supervisor.channel(&to.channel) {
                // Configured, its plugin not loaded (yet, or being replaced, or its file bad):
                // the catalog can load it at any time.
                Err(_) if self.in_force().channels.contains_key(to.channel.as_str()) => {
                    Refusal::Transient
                }
                // No plugin and no `[channels.<channel>]`: not configured at all.
                Err(_) => Refusal::Permanent,
                // Its plugin does not list the account: a grace for a reload in progress.
                Ok(_) if refusals < UNLISTED_ACCOUNT_REFUSALS => Refusal::Transient,
                Ok(_) => Refusal::Permanent,
            },
            // The copy itself is malformed for its target: it would be refused every time.
            OutboxError::Invalid(_)
            | OutboxError::NotFound(_)
            | OutboxError::NotCancellable { .. } => Refusal::Permanent,
        }
    }

    /// A copy the outbox refused (`error`) when first routed: held for a retry, or let go.
    fn refused(&self, outbox: &Outbox, copy: Held, error: &OutboxError) -> Refusal {
        let to = target_key(&copy.message);
        let refusal = self.classify(outbox, error, &to, copy.refusals);
        if refusal == Refusal::Permanent {
            self.let_go(outbox, &copy, "refused for good");
            return refusal;
        }
        let hold = {
            let mut marks = lock(&self.marks);
            let hold =
                marks
                    .held
                    .hold(copy.clone(), tokio::time::Instant::now(), outbox.settings());
            outbox.set_bridge_held(marks.held.len());
            hold
        };
        match hold {
            Hold::Held(_) => {
                outbox.count_bridge_refused();
                self.held_changed.notify_one();
                tracing::warn!(
                    gateway = %copy.gateway,
                    target = %copy.target,
                    seq = copy.seq,
                    "gateway {:?}: the copy of journal entry {} to {} was refused ({}); \
                     held and retried (the bridging mark stays below it)",
                    copy.gateway,
                    copy.seq,
                    copy.target,
                    copy.why
                );
            }
            Hold::Already => {}
            Hold::Overflow => {
                outbox.count_bridge_refused();
                tracing::error!(
                    gateway = %copy.gateway,
                    target = %copy.target,
                    seq = copy.seq,
                    "gateway {:?}: the copy of journal entry {} to {} was refused ({}) and {} \
                     copies are held already: it is bridged at the next start",
                    copy.gateway,
                    copy.seq,
                    copy.target,
                    copy.why,
                    super::held::MAX_HELD
                );
            }
        }
        refusal
    }

    /// Logs and counts a copy that is not bridged, and lets it go if it was held.
    fn let_go(&self, outbox: &Outbox, copy: &Held, what: &str) {
        outbox.count_bridge_dropped();
        tracing::warn!(
            gateway = %copy.gateway,
            target = %copy.target,
            seq = copy.seq,
            "gateway {:?}: the copy of journal entry {} to {} is not bridged: {what} ({})",
            copy.gateway,
            copy.seq,
            copy.target,
            copy.why
        );
        self.release(outbox, copy);
    }

    /// Stops holding `copy` (if it was held); the mark moves up as far as it may now.
    fn release(&self, outbox: &Outbox, copy: &Held) {
        let mut marks = lock(&self.marks);
        if marks.held.release(&copy_key(copy)).is_some() {
            outbox.set_bridge_held(marks.held.len());
            self.advance(&mut marks);
        }
    }

    /// Whether the gateways in force still bridge to `copy`'s target through its gateway.
    fn still_bridges(&self, copy: &Held) -> bool {
        self.in_force().gateways.iter().any(|g| {
            g.name == copy.gateway
                && g.members
                    .iter()
                    .any(|m| m.direction != Direction::In && m.id() == copy.target)
        })
    }

    /// Retries the held copies `due`. Blocking (outbox commits).
    fn retry(&self, due: Vec<Held>) {
        let Some(outbox) = self.outbox.get() else {
            return;
        };
        for copy in due {
            if !self.still_bridges(&copy) {
                self.let_go(
                    outbox,
                    &copy,
                    "a config reload removed its gateway or target member",
                );
                continue;
            }
            outbox.count_bridge_retry();
            match outbox.submit(copy.message.clone()) {
                Ok(accepted) => {
                    if !accepted.duplicate {
                        outbox.count_bridged();
                    }
                    tracing::info!(
                        gateway = %copy.gateway,
                        target = %copy.target,
                        seq = copy.seq,
                        "gateway {:?}: the copy of journal entry {} to {} is bridged after {} \
                         refusal(s)",
                        copy.gateway,
                        copy.seq,
                        copy.target,
                        copy.refusals
                    );
                    self.release(outbox, &copy);
                }
                Err(e) => {
                    let to = target_key(&copy.message);
                    match self.classify(outbox, &e, &to, copy.refusals + 1) {
                        Refusal::Transient => {
                            let mut marks = lock(&self.marks);
                            marks.held.refused_again(
                                &copy_key(&copy),
                                e.to_string(),
                                tokio::time::Instant::now(),
                                outbox.settings(),
                            );
                        }
                        Refusal::Permanent => {
                            let copy = Held {
                                why: e.to_string(),
                                refusals: copy.refusals + 1,
                                ..copy
                            };
                            self.let_go(outbox, &copy, "refused for good");
                        }
                    }
                }
            }
        }
    }

    /// Retries the held copies as they fall due, until `stop` fires. Copies still held then stay
    /// below the bridging mark: the next start routes them again.
    ///
    /// # Cancellation safety
    /// Dropping it stops the retries; a retry under way on its blocking thread completes, and a
    /// copy it had taken stays held (below the mark).
    pub async fn retry_held(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let changed = self.held_changed.notified();
            let next = lock(&self.marks).held.next_due();
            let due = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = changed => continue,
                () = due => {}
            }
            let due = lock(&self.marks).held.take_due(tokio::time::Instant::now());
            if due.is_empty() {
                continue;
            }
            let me = self.clone();
            if tokio::task::spawn_blocking(move || me.retry(due))
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// A held copy's key: its idempotency key.
fn copy_key(copy: &Held) -> String {
    copy.message.idempotency_key.clone().unwrap_or_default()
}

/// The account a copy goes to.
fn target_key(message: &NewMessage) -> AccountKey {
    AccountKey::new(
        &message.channel,
        channeld_plugin_abi::normalize_account_id(&message.account),
    )
}

/// Runs [`Gateways::recover`] on a blocking thread and logs what it did; a failure is logged
/// (the messages stay after the mark, for the next start).
///
/// # Cancellation safety
/// Dropping the future does not stop the routing already under way on its blocking thread.
pub async fn recover_at_start(gateways: Arc<Gateways>) {
    match tokio::task::spawn_blocking(move || gateways.recover()).await {
        Ok(Ok(r)) if r.messages > 0 => tracing::warn!(
            from = r.from,
            through = r.through,
            messages = r.messages,
            queued = r.queued,
            duplicates = r.duplicates,
            held = r.held,
            "gateways: {} journal message(s) after the bridging mark routed again at startup; \
             {} bridged copy(ies) were missing and are queued now, {} held for a retry",
            r.messages,
            r.queued,
            r.held
        ),
        Ok(Ok(r)) => tracing::debug!(through = r.through, "gateways: bridging complete"),
        Ok(Err(e)) => tracing::error!("{e}"),
        Err(e) => tracing::error!("gateways: routing the journal again failed: {e}"),
    }
}

/// A [`MessageSink`] that hands every message to `inner` (the journal) and, once it is durable,
/// bridges it through the gateways.
pub struct GatewaySink {
    /// Where messages are made durable.
    pub inner: Arc<dyn MessageSink>,
    /// The gateways.
    pub gateways: Arc<Gateways>,
}

impl MessageSink for GatewaySink {
    fn accept(&self, key: &AccountKey, message: InboundMessage) -> BoxFuture<Result<u64, String>> {
        if !self.gateways.wants(key, message.conversation.as_str()) {
            return self.inner.accept(key, message);
        }
        let conversation = message.conversation.to_string();
        let sender = message.sender.to_string();
        let text = message.text.to_string();
        let extra: Option<Value> = serde_json::from_str(message.extra.as_str()).ok();
        let ticket = self.gateways.begin();
        let accepted = self.inner.accept(key, message);
        let (gateways, key) = (self.gateways.clone(), key.clone());
        Box::pin(async move {
            // A future dropped before it routed leaves its ticket open: the mark stays below its
            // message until the next start routes it again.
            let seq = match accepted.await {
                Ok(seq) => seq,
                Err(refused) => {
                    gateways.end(ticket);
                    return Err(refused);
                }
            };
            if gateways.exit_before_bridging {
                tracing::error!(
                    seq,
                    "{EXIT_BEFORE_BRIDGING} is set: exiting before bridging"
                );
                crate::exit::exit_now(EXIT_BEFORE_BRIDGING_STATUS);
            }
            gateways.route(seq, &key, &conversation, &sender, &text, extra.as_ref());
            gateways.end(ticket);
            Ok(seq)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_names_where_a_message_came_from() {
        let from = AccountKey::new("irc", "libera");
        assert_eq!(
            render(DEFAULT_TEMPLATE, &from, "#rust", "ada", "hi"),
            "[irc] <ada> hi"
        );
        assert_eq!(
            render(
                "{account}/{conversation}: {text}",
                &from,
                "#rust",
                "ada",
                "hi"
            ),
            "libera/#rust: hi"
        );
    }

    #[test]
    fn a_malformed_member_is_an_error_with_file_and_line() {
        let text = "[[gateways]]\nname = \"g\"\nmembers = [\n  { account = \"irc\", conversation = \"#x\" },\n]\n";
        let e = crate::config::Config::parse(text, std::path::Path::new("/etc/c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/c.toml:4:"), "{e}");
        assert!(e.contains("CHANNEL:ACCOUNT"), "{e}");
        let text = "[[gateways]]\nname = \"g\"\nmembers = [{ account = \"a:b\", conversation = \"#x\", direction = \"sideways\" }]\n";
        let e = crate::config::Config::parse(text, std::path::Path::new("/etc/c.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/c.toml:3:"), "{e}");
        let ok = "[[gateways]]\nname = \"g\"\nmembers = [{ account = \"a:B\", conversation = \"#x\" }]\n";
        let config = crate::config::Config::parse(ok, std::path::Path::new("/etc/c.toml")).unwrap();
        assert_eq!(config.gateways[0].members[0].direction, Direction::Inout);
        assert_eq!(
            config.gateways[0].members[0].account.0,
            AccountKey::new("a", "b")
        );
    }

    #[test]
    fn a_member_account_must_be_channel_colon_account() {
        assert!(
            MemberAccount::try_from("irc:Libera".to_owned()).is_ok_and(|m| m.0.account == "libera")
        );
        for bad in ["irc", ":a", "irc:", "a:b:c"] {
            let e = MemberAccount::try_from(bad.to_owned()).unwrap_err();
            assert!(e.contains("CHANNEL:ACCOUNT"), "{e}");
        }
    }
}
