//! The account's queue of messages to send: [`AccountContext::outbound`] hands the account's
//! task a [`OutboundQueue`], and the default [`ChannelPlugin::send`] hook puts each message the
//! host sends from that account on it and waits for the task's answer. A plugin therefore keeps
//! no map from account to connection of its own.
//!
//! The SDK keeps the map: one per loaded library (each cdylib has its own statics), keyed by
//! account id. The test harness gives each of its harnesses a map of its own (a task-local
//! around its `start` and `send` calls), so tests running side by side in one process do not
//! see each other's accounts.
//!
//! [`AccountContext::outbound`]: super::AccountContext::outbound
//! [`ChannelPlugin::send`]: super::ChannelPlugin::send

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{Arc, LazyLock, Mutex, PoisonError},
};

use tokio::sync::{mpsc, oneshot};

use super::{Outbound, PluginError, PluginResult};

/// How many messages may wait for one account's task before the host's next send waits for room.
const CAPACITY: usize = 64;

/// The queues of the accounts whose tasks take messages.
#[derive(Default)]
struct Queues {
    by_account: HashMap<String, mpsc::Sender<SendRequest>>,
    /// Whether any account has ever opened a queue here: tells "not running" from "this channel
    /// does not send at all".
    used: bool,
}

/// A map from account id to its task's queue.
#[derive(Clone, Default)]
pub(crate) struct Registry(Arc<Mutex<Queues>>);

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

static PROCESS: LazyLock<Registry> = LazyLock::new(Registry::default);

tokio::task_local! {
    static SCOPED: Registry;
}

impl Registry {
    /// The library's own map, the one the host's calls use.
    pub(crate) fn process() -> Self {
        PROCESS.clone()
    }

    /// The map of the current task: the harness's, inside [`Registry::scope`], else the
    /// library's.
    fn current() -> Self {
        SCOPED
            .try_with(Clone::clone)
            .unwrap_or_else(|_| Self::process())
    }

    /// Runs `future` with this map as the current one.
    pub(crate) fn scope<F: Future>(self, future: F) -> impl Future<Output = F::Output> {
        SCOPED.scope(self, future)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens `account`'s queue, replacing any queue it had.
    pub(crate) fn open(&self, account: &str) -> OutboundQueue {
        let (tx, rx) = mpsc::channel(CAPACITY);
        let mut queues = self.lock();
        queues.used = true;
        queues.by_account.insert(account.to_owned(), tx.clone());
        OutboundQueue {
            rx,
            registration: Registration {
                registry: self.clone(),
                account: account.to_owned(),
                tx,
            },
        }
    }
}

/// Takes the account's queue out of the map when the [`OutboundQueue`] is dropped, unless a newer
/// task of the same account has opened one since.
struct Registration {
    registry: Registry,
    account: String,
    tx: mpsc::Sender<SendRequest>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut queues = self.registry.lock();
        if queues
            .by_account
            .get(&self.account)
            .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            queues.by_account.remove(&self.account);
        }
    }
}

/// The messages the host sends from one account, for the account's task to write to its
/// connection: from [`AccountContext::outbound`](super::AccountContext::outbound).
///
/// While it lives, the default [`ChannelPlugin::send`](super::ChannelPlugin::send) hook queues
/// each message for this account here and completes with the answer the task gives through
/// [`SendRequest::finish`]. Once it is dropped (the task ended), sends from the account fail with
/// "account … is not running", and so do the messages still queued in it: the host's outbox
/// retries them in the account's next run.
pub struct OutboundQueue {
    rx: mpsc::Receiver<SendRequest>,
    registration: Registration,
}

impl fmt::Debug for OutboundQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundQueue")
            .field("account", &self.registration.account)
            .field("queued", &self.rx.len())
            .finish()
    }
}

impl OutboundQueue {
    /// The next message to send, waiting for one. `None` means no message can arrive any more
    /// (treat it as the end of the queue); a queue that a newer `ctx.outbound()` of the same
    /// account replaced just receives nothing more.
    ///
    /// A task that must not send yet (not connected, say) simply does not call `recv`: the
    /// messages wait, and so does the host (its outbox sends to an account only while it is
    /// running and has not reported itself disconnected).
    ///
    /// # Cancellation safety
    /// Cancel-safe: a message is taken only when the future completes, so `recv` can be a
    /// branch of `tokio::select!`.
    pub async fn recv(&mut self) -> Option<SendRequest> {
        self.rx.recv().await
    }

    /// The next message if one is waiting, without waiting.
    pub fn try_recv(&mut self) -> Option<SendRequest> {
        self.rx.try_recv().ok()
    }

    /// How many messages are waiting.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

/// One message to send and the host's wait for its outcome.
///
/// Answer it with [`finish`](Self::finish) once the channel has **taken** the message (written
/// to the socket, acknowledged by the broker, a 2xx answer), with the channel's id for it (or an
/// empty string), or with the error that kept it from being taken. Dropping it unanswered fails
/// the send with "the account's task ended or dropped the message before sending it", which the host's
/// outbox retries.
#[derive(Debug)]
pub struct SendRequest {
    message: Outbound,
    reply: SendReply,
}

impl SendRequest {
    /// The message.
    pub fn message(&self) -> &Outbound {
        &self.message
    }

    /// Answers the host: `Ok(id)` once the channel has taken the message, `Err` if it has not.
    pub fn finish(self, outcome: PluginResult<String>) {
        self.reply.finish(outcome);
    }

    /// The message and the answer apart, for a task that keeps the answer until the channel
    /// confirms (an MQTT publish waiting for its PUBACK, say).
    pub fn into_parts(self) -> (Outbound, SendReply) {
        (self.message, self.reply)
    }
}

/// The host's wait for one message's outcome (see [`SendRequest::into_parts`]).
pub struct SendReply(Option<oneshot::Sender<PluginResult<String>>>);

impl fmt::Debug for SendReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SendReply").finish_non_exhaustive()
    }
}

impl SendReply {
    /// Answers the host, as [`SendRequest::finish`].
    pub fn finish(mut self, outcome: PluginResult<String>) {
        if let Some(tx) = self.0.take() {
            // The host may have stopped waiting (it shut down): nothing to tell then.
            let _ = tx.send(outcome);
        }
    }

    /// Whether the host has stopped waiting for the answer.
    pub fn is_closed(&self) -> bool {
        self.0.as_ref().is_none_or(oneshot::Sender::is_closed)
    }
}

impl Drop for SendReply {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(Err(PluginError::new(
                "the account's task ended or dropped the message before sending it",
            )));
        }
    }
}

/// The default send hook: queues `message` for its account's task and waits for the answer.
///
/// # Cancellation safety
/// Not cancel-safe: a message already queued is still sent, its outcome unreported.
pub(crate) async fn send(channel: &'static str, message: Outbound) -> PluginResult<String> {
    let registry = Registry::current();
    let (tx, used) = {
        let queues = registry.lock();
        (
            queues.by_account.get(&message.account).cloned(),
            queues.used,
        )
    };
    let account = message.account.clone();
    let not_running = || {
        PluginError::new(if used {
            format!("account {account} is not running")
        } else {
            format!(
                "channel {channel} does not support sending, or account {account} is not \
                 running (no account of it has taken messages with `ctx.outbound()`)"
            )
        })
    };
    let tx = tx.ok_or_else(not_running)?;
    let (done, outcome) = oneshot::channel();
    let request = SendRequest {
        message,
        reply: SendReply(Some(done)),
    };
    tx.send(request).await.map_err(|_| not_running())?;
    outcome.await.map_err(|_| {
        PluginError::new(format!(
            "account {account}: the task ended before the message was sent"
        ))
    })?
}
