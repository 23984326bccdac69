//! An echo channel: each account listens on TCP, hands every line it receives to the host as an
//! inbound message, and writes it back after an optional delay.
//!
//! ```toml
//! [channels.echo.accounts.main]
//! listen = "127.0.0.1:7000"   # "127.0.0.1:0" picks a free port, reported as `listen_addr`
//! reply_delay_ms = 10
//! ```
use std::time::Duration;

use channeld_plugin_abi::sdk::prelude::*;
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
};

/// The account's settings: everything in its table but the host-owned keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    listen: String,
    #[serde(default)]
    reply_delay_ms: u64,
}

#[derive(Default)]
struct Echo;

impl ChannelPlugin for Echo {
    const CHANNEL_ID: &'static str = "echo";
    const DISPLAY_NAME: &'static str = "Echo (TCP lines)";

    async fn start(&self, ctx: AccountContext) -> PluginResult {
        let settings: Settings = ctx.account().parse()?;
        let listener = TcpListener::bind(&settings.listen).await?;
        let addr = listener.local_addr()?;
        ctx.host()
            .patch_status(&json!({ "listen_addr": addr.to_string() }))?;
        ctx.host().set_connected(true);
        tracing::info!(%addr, "echo account listening");
        let delay = Duration::from_millis(settings.reply_delay_ms);
        loop {
            tokio::select! {
                () = ctx.aborted() => return Ok(()),
                accepted = listener.accept() => {
                    let (stream, peer) = accepted?;
                    // Tied to the account: it ends with the abort, and a stop waits for it.
                    ctx.spawn(serve(stream, peer.to_string(), ctx.host().clone(), delay));
                }
            }
        }
    }
}

/// Echoes one connection's lines.
async fn serve(stream: TcpStream, peer: String, host: Host, delay: Duration) -> PluginResult {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        // A refused delivery (the host has replaced this task, say) loses one message, not
        // the connection.
        let message = Inbound::new("tcp", peer.clone(), line.clone());
        if let Err(e) = host.deliver_async(message).await {
            tracing::warn!(error = %e, "message not delivered");
        }
        tokio::time::sleep(delay).await;
        write.write_all(format!("{line}\n").as_bytes()).await?;
    }
    Ok(())
}

export_plugin!(Echo);
