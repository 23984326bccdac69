//! Where inbound messages go once a plugin delivers them: the [`MessageSink`] seam between the
//! host services (which receive `deliver` / `deliver_async` calls) and the journal (which makes
//! them durable). Until the journal is wired in, [`CountingSink`] accepts every message at once
//! and numbers it.

use std::sync::atomic::{AtomicU64, Ordering};

use channeld_plugin_abi::abi::InboundMessage;

use crate::{host::AccountKey, plugin::BoxFuture};

/// Accepts inbound messages for the host.
pub trait MessageSink: Send + Sync + 'static {
    /// Accepts `message`, delivered by `key`'s current task. The future completes when the
    /// message is durable, with its sequence number, or with a one-line reason it was refused.
    /// It must not need the host's tokio runtime to be polled (a 1.0 plugin's synchronous
    /// `deliver` blocks on it from a plugin thread).
    fn accept(&self, key: &AccountKey, message: InboundMessage) -> BoxFuture<Result<u64, String>>;
}

/// A sink that accepts every message at once, numbering them from 1. Nothing is stored.
#[derive(Debug, Default)]
pub struct CountingSink {
    last: AtomicU64,
}

impl MessageSink for CountingSink {
    fn accept(
        &self,
        _key: &AccountKey,
        _message: InboundMessage,
    ) -> BoxFuture<Result<u64, String>> {
        let seq = self.last.fetch_add(1, Ordering::Relaxed) + 1;
        Box::pin(std::future::ready(Ok(seq)))
    }
}
