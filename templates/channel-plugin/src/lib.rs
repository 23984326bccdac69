//! # {{project-name}}: the `{{channel_id}}` channel for channeld
//!
//! A loopback channel: each account "connects", greets its room, turns every message channeld
//! asks it to send back into an inbound message, and reports a heartbeat. Replace the parts
//! marked `PROTOCOL` with your service's client.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use channeld_plugin_abi::sdk::prelude::*;
use serde::Deserialize;

/// How often a connected account reports protocol-level liveness.
const HEARTBEAT: Duration = Duration::from_secs(30);

/// An account's table. Unknown keys are refused, so a typo shows up as the reason the account is
/// not configured. No `Debug`: the token must never reach a log line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// The conversation the account greets.
    room: String,
    /// The service's credential. channeld resolves `{ env = "…" }` / `{ file = "…" }` first.
    token: String,
    /// What the account says when it connects.
    #[serde(default = "default_greeting")]
    greeting: String,
}

fn default_greeting() -> String {
    "hello".to_owned()
}

/// The plugin: one per loaded library, shared by every account of the channel.
#[derive(Default)]
pub struct Channel {
    /// The last message id handed out.
    sent: AtomicU64,
}

impl ChannelPlugin for Channel {
    const CHANNEL_ID: &'static str = "{{channel_id}}";

    fn is_configured(&self, account: &Account) -> Verdict {
        match account.parse::<Settings>() {
            Ok(settings) if settings.token.is_empty() => Verdict::no("`token` is empty"),
            Ok(_) => Verdict::Yes,
            Err(e) => Verdict::no(e.message()),
        }
    }

    async fn start(&self, ctx: AccountContext) -> PluginResult {
        let settings: Settings = ctx.account().parse()?;
        // The messages channeld sends from this account: the SDK's default `send` hook hands
        // each one to this queue and waits for the answer given below.
        let mut to_send = ctx.outbound();

        // PROTOCOL: connect and authenticate with `settings.token` here.
        ctx.host().set_connected(true);
        ctx.host().patch_status(&json!({ "room": settings.room }))?;
        tracing::info!(room = %settings.room, "connected");

        // A task of the account's own: it ends with the account, and its logs carry the account.
        let host = ctx.host().clone();
        ctx.spawn(async move {
            let mut beat = tokio::time::interval(HEARTBEAT);
            beat.tick().await;
            loop {
                beat.tick().await;
                // PROTOCOL: a ping on the connection.
                host.record_event(EventKind::Other);
            }
        });

        let greeting = Inbound::new(settings.room.as_str(), Self::CHANNEL_ID, settings.greeting);
        ctx.deliver(greeting).await?;

        let ended = loop {
            tokio::select! {
                () = ctx.aborted() => break Ok(()),
                request = to_send.recv() => {
                    let Some(request) = request else { break Ok(()) };
                    // PROTOCOL: write the message to the connection; answer once the service
                    // has taken it, with its id for it. This loopback echoes it back.
                    ctx.host().record_event(EventKind::Outbound);
                    let message = request.message();
                    let echo = Inbound::new(&message.conversation, "echo", &message.text);
                    let id = self.sent.fetch_add(1, Ordering::Relaxed) + 1;
                    request.finish(Ok(format!("{}-{id}", Self::CHANNEL_ID)));
                    if let Err(e) = ctx.deliver(echo).await {
                        break Err(e.context("echoing a sent message"));
                    }
                }
            }
        };
        ctx.host().set_connected(false);
        ended
    }
}

export_plugin!(Channel);

#[cfg(test)]
mod tests;
