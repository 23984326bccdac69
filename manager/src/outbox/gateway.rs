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
//! No loops: each bridged message carries `extra.gateway = {name, origin, hops}`; a plugin that
//! can carry metadata hands `extra` back on inbound (the webhook in its body). A message never
//! goes back to the member it came from, nor to the member it first came from (`origin`); and
//! one that arrives with `hops` at `[outbox] hop_limit` is not bridged again, and counted
//! (`hopLimitStops` in `GET /v1/outbox`), which stops cycles that run through the outside world.
//!
//! Delivery: the bridged messages are accepted into the outbox right after the journal
//! acknowledged the inbound one, before the plugin hears back; a crash between the two loses
//! the bridging of that one message (the inbound message itself is in the journal).

use std::sync::{Arc, OnceLock};

use channeld_plugin_abi::abi::InboundMessage;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{NewMessage, Outbox};
use crate::{host::AccountKey, inbound::MessageSink, plugin::BoxFuture, supervise::Supervisor};

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

/// The gateways of the config, routing inbound messages into the outbox.
pub struct Gateways {
    /// The gateways in force: swapped whole by a config reload.
    list: std::sync::RwLock<Arc<Vec<GatewayConfig>>>,
    hop_limit: u32,
    outbox: OnceLock<Arc<Outbox>>,
}

impl std::fmt::Debug for Gateways {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateways")
            .field("list", &self.list())
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
    /// The config's gateways, with `[outbox] hop_limit`.
    pub fn new(list: Vec<GatewayConfig>, hop_limit: u32) -> Arc<Self> {
        Arc::new(Self {
            list: std::sync::RwLock::new(Arc::new(list)),
            hop_limit,
            outbox: OnceLock::new(),
        })
    }

    /// The gateways in force.
    fn list(&self) -> Arc<Vec<GatewayConfig>> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the gateways (a config reload): messages arriving from now on are routed by
    /// `list`; messages already in the outbox keep their sends.
    pub fn set_list(&self, list: Vec<GatewayConfig>) {
        *self.list.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(list);
    }

    /// Whether there are any.
    pub fn is_empty(&self) -> bool {
        self.list().is_empty()
    }

    /// Connects the outbox bridged messages go to (until then nothing is bridged).
    pub fn attach(&self, outbox: Arc<Outbox>) {
        let _ = self.outbox.set(outbox);
    }

    /// Warns, naming the gateway, about every member whose channel no plugin provides.
    pub fn warn_unloaded(&self, supervisor: &Supervisor) {
        for gateway in self.list().iter() {
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
        self.list().iter().any(|g| {
            g.members.iter().any(|m| {
                m.direction != Direction::Out
                    && m.account.0 == *key
                    && m.conversation == conversation
            })
        })
    }

    /// Bridges one inbound message (already in the journal). Blocking (outbox commits).
    fn route(
        &self,
        key: &AccountKey,
        conversation: &str,
        sender: &str,
        text: &str,
        extra: Option<&Value>,
    ) {
        let Some(outbox) = self.outbox.get() else {
            return;
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
        for gateway in self.list().iter() {
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
                    channel: to.account.0.channel.clone(),
                    account: to.account.0.account.clone(),
                    conversation: to.conversation.clone(),
                    text: render(template, key, conversation, sender, text),
                    extra: Some(json!({ "gateway": {
                        "name": gateway.name,
                        "origin": origin,
                        "hops": hops + 1,
                    }})),
                    ..NewMessage::default()
                };
                match outbox.submit(message) {
                    Ok(_) => outbox.count_bridged(),
                    Err(e) => tracing::warn!(
                        gateway = %gateway.name,
                        "gateway {:?}: {} -> {} not bridged: {e}",
                        gateway.name,
                        from.id(),
                        to.id()
                    ),
                }
            }
        }
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
        let accepted = self.inner.accept(key, message);
        let (gateways, key) = (self.gateways.clone(), key.clone());
        Box::pin(async move {
            let seq = accepted.await?;
            gateways.route(&key, &conversation, &sender, &text, extra.as_ref());
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
