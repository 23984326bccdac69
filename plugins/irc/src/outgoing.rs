//! Hands the host's `send` calls to the account's running task.
//!
//! Temporary: the SDK's `ctx.outbound()` replaces this module. Until it exists the plugin keeps
//! its own map from account id to the task's queue; the task's side (a [`Receiver`] of
//! [`Request`]s that it reads only while connected) is already shaped like that stream, so the
//! switch is a change of where the receiver comes from.

use std::{
    collections::HashMap,
    sync::{Mutex, PoisonError},
};

use channeld_plugin_abi::sdk::{Outbound, PluginError};
use tokio::sync::{mpsc, oneshot};

/// How many sends may wait for one account's task before `send` waits for room.
const QUEUE: usize = 64;

/// One message to send, and where to report the outcome (the channel's id for it, or why not).
pub struct Request {
    /// The message.
    pub message: Outbound,
    /// Completed once the message is written (or has failed).
    pub done: oneshot::Sender<Result<String, PluginError>>,
}

/// The task's end of its account's queue.
pub type Receiver = mpsc::Receiver<Request>;

static QUEUES: Mutex<Option<HashMap<String, mpsc::Sender<Request>>>> = Mutex::new(None);

/// Registers the running task of `account`; dropping the guard unregisters it (unless a newer
/// task of the same account has registered since).
pub fn register(account: &str) -> (Registration, Receiver) {
    let (tx, rx) = mpsc::channel(QUEUE);
    let mut queues = QUEUES.lock().unwrap_or_else(PoisonError::into_inner);
    queues
        .get_or_insert_with(HashMap::new)
        .insert(account.to_owned(), tx.clone());
    (
        Registration {
            account: account.to_owned(),
            tx,
        },
        rx,
    )
}

/// Keeps an account's queue registered while it lives.
pub struct Registration {
    account: String,
    tx: mpsc::Sender<Request>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut queues = QUEUES.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(queues) = queues.as_mut()
            && queues
                .get(&self.account)
                .is_some_and(|tx| tx.same_channel(&self.tx))
        {
            queues.remove(&self.account);
        }
    }
}

/// Queues `message` for its account's task and waits for the outcome.
///
/// # Cancellation safety
/// Not cancel-safe: a message already queued is still sent, its outcome unreported.
pub async fn send(message: Outbound) -> Result<String, PluginError> {
    let tx = {
        let queues = QUEUES.lock().unwrap_or_else(PoisonError::into_inner);
        queues
            .as_ref()
            .and_then(|queues| queues.get(&message.account))
            .cloned()
    };
    let account = message.account.clone();
    let not_running = || PluginError::new(format!("account {account} is not running"));
    let tx = tx.ok_or_else(not_running)?;
    let (done, outcome) = oneshot::channel();
    tx.send(Request { message, done })
        .await
        .map_err(|_| not_running())?;
    outcome.await.map_err(|_| {
        PluginError::new(format!(
            "account {account}: the connection ended before the message was sent"
        ))
    })?
}
