//! The outbox's CLI verbs: `channeld send CHANNEL:ACCOUNT CONVERSATION TEXT [--wait] [--key K]`
//! and `channeld messages [ID] [--state STATE] [--cancel]`, `channeld messages --figures`.

use std::time::{Duration, Instant};

use serde::Deserialize;

use super::{Accepted, MessageStatus, NewMessage, state};
use crate::{
    cli::Target,
    client::{Client, ClientError},
};

#[derive(Deserialize)]
struct One {
    message: MessageStatus,
}

#[derive(Deserialize)]
struct Many {
    messages: Vec<MessageStatus>,
}

/// `channeld send`.
#[derive(Debug, Clone)]
pub struct Send {
    /// `CHANNEL:ACCOUNT`.
    pub target: Target,
    /// Where.
    pub conversation: String,
    /// What.
    pub text: String,
    /// Wait for the outcome.
    pub wait: bool,
    /// Idempotency key.
    pub key: Option<String>,
    /// Print JSON.
    pub json: bool,
}

impl Send {
    /// Sends; the exit code: 0 accepted (or, with `--wait`, sent), 1 failed or cancelled.
    pub fn run(self, client: &Client) -> Result<u8, ClientError> {
        let Some(account) = self.target.account.clone() else {
            return Err(ClientError::Failed(format!(
                "send needs an account: channeld send {}:ACCOUNT CONVERSATION TEXT",
                self.target.channel
            )));
        };
        let message = NewMessage {
            channel: self.target.channel.clone(),
            account,
            conversation: self.conversation,
            text: self.text,
            idempotency_key: self.key,
            ..NewMessage::default()
        };
        let accepted: Accepted = client.post_json("/v1/messages", &message)?;
        if !self.wait {
            if self.json {
                println!("{}", serde_json::json!(accepted));
            } else if accepted.duplicate {
                println!("{} (already accepted with this key)", accepted.id);
            } else {
                println!("{}", accepted.id);
            }
            return Ok(0);
        }
        // Polled: the outcome may take retries; the outbox's deadline bounds it.
        let started = Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let one: One = client.get(&format!("/v1/messages/{}", accepted.id))?;
            let m = one.message;
            if [state::SENT, state::FAILED, state::CANCELLED].contains(&m.state.as_str()) {
                print_one(&m, self.json);
                return Ok(if m.state == state::SENT { 0 } else { 1 });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
            if started.elapsed() > Duration::from_secs(24 * 3600) {
                return Err(ClientError::Failed(format!(
                    "message {} still {} after a day",
                    m.id, m.state
                )));
            }
        }
    }
}

fn print_one(m: &MessageStatus, json: bool) {
    if json {
        println!("{}", serde_json::json!(m));
        return;
    }
    let detail = match m.state.as_str() {
        state::SENT => m.message_id.clone().unwrap_or_default(),
        _ => m.error.clone().unwrap_or_default(),
    };
    println!(
        "{}\t{}:{}\t{}\t{}\t{}",
        m.id, m.channel, m.account, m.conversation, m.state, detail
    );
}

/// `channeld messages`; the exit code.
pub fn messages(
    client: &Client,
    id: Option<u64>,
    state: Option<String>,
    cancel: bool,
    json: bool,
) -> Result<u8, ClientError> {
    let list = match (id, cancel) {
        (Some(id), true) => {
            vec![client.delete::<One>(&format!("/v1/messages/{id}"))?.message]
        }
        (Some(id), false) => vec![client.get::<One>(&format!("/v1/messages/{id}"))?.message],
        (None, _) => {
            let query = state.map(|s| format!("?state={s}")).unwrap_or_default();
            client
                .get::<Many>(&format!("/v1/messages{query}"))?
                .messages
        }
    };
    for m in &list {
        print_one(m, json);
    }
    Ok(0)
}

/// `channeld messages --figures`: the outbox's figures (`GET /v1/outbox`), one `name value` line
/// each, sorted; the exit code.
pub fn figures(client: &Client, json: bool) -> Result<u8, ClientError> {
    let answer: serde_json::Value = client.get("/v1/outbox")?;
    let figures = &answer["outbox"];
    if json {
        println!("{figures}");
        return Ok(0);
    }
    if let Some(all) = figures.as_object() {
        let mut names: Vec<&String> = all.keys().collect();
        names.sort();
        for name in names {
            println!("{name}\t{}", all[name]);
        }
    }
    Ok(0)
}
