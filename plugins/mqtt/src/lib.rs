//! # The `mqtt` channel: an MQTT 5 client with a persistent session
//!
//! Each account is one MQTT 5 session with one broker. Messages published on its subscribed
//! topics are delivered to channeld; a send publishes on a topic.
//!
//! ## Config
//! ```toml
//! [channels.mqtt.accounts.main]
//! host = "broker.example.org"           # required
//! port = 8883                           # optional; default 8883 with TLS, 1883 without
//! tls = true                            # optional, default false (rustls, the system's roots)
//! ca_file = "/etc/channeld/mqtt-ca.pem"  # optional, with tls: trust these PEM certificates
//!                                       # instead of the system's roots (a private CA)
//! client_id = "channeld-main"           # required: names the broker's session for this account
//! username = "channeld"                 # optional
//! password = { env = "MQTT_PASSWORD" }  # optional; a secret the host resolves
//! session_expiry_secs = 86400           # optional: how long the broker keeps the session (and
//!                                       # queues QoS 1 messages) while channeld is away
//! keep_alive_secs = 30                  # optional: the MQTT keep-alive (a ping when idle)
//! publish_qos = 1                       # optional, default 1: the QoS of sends
//! topics = [                            # the subscriptions
//!     { filter = "chat/#", qos = 1 },
//!     { filter = "alerts/+", qos = 0 },
//! ]
//! ```
//! An account without `host` or `client_id`, or with an unknown key, is reported as not
//! configured with the reason.
//!
//! ## Behaviour
//! - The session is persistent (`clean_start = false` with `session_expiry_secs`), so QoS 1 and
//!   2 messages published while channeld is away are delivered when it comes back.
//! - The account is `connected` once the broker has accepted the connection and every
//!   subscription (`CONNACK`, then `SUBACK`).
//! - Subscriptions are `no_local`: the account's own publishes never come back as inbound.
//! - A message is delivered with its topic as the conversation, its payload (UTF-8; invalid bytes
//!   replaced) as the text, and its `qos` and `retain` in `extra`. The sender is the `sender` user
//!   property, or `mqtt` when absent.
//! - A message a gateway bridged (its `hops` user property is 1 or more, with an `origin`) is
//!   delivered with `extra.gateway = {"origin", "hops"}` from those properties, so channeld's
//!   gateways stop it at the hop limit and never send it back to its origin: a loop through MQTT
//!   (two gateways, or two channelds, bridging into each other's topics) ends like any other.
//! - Acknowledgements are manual: a QoS 1 or 2 message is acknowledged to the broker only after
//!   channeld has made it durable, so a crash between receipt and the journal loses nothing (the
//!   broker sends it again: at least once).
//! - A send publishes its text on the topic named by its conversation, at `publish_qos`, and
//!   completes when the broker confirms it (`PUBACK` for QoS 1, `PUBCOMP` for 2; when written for
//!   0). The `origin` and `hops` user properties carry the message's origin and hop count (from
//!   the send's `extra.gateway`, else this account and 0), for gateways to stop loops.
//! - Keep-alive traffic is recorded as a liveness event and messages as traffic, for the health
//!   monitor. A lost connection ends the task with an error; the supervisor restarts it (the
//!   plugin never reconnects by itself).

use std::{
    collections::HashMap,
    collections::VecDeque,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use channeld_plugin_abi::{
    export_plugin,
    sdk::{
        Account, AccountContext, ChannelPlugin, EventKind, Inbound, OutboundQueue, PluginError,
        PluginResult, SendReply, Verdict,
    },
};
use rumqttc::{
    Outgoing, TlsConfiguration, Transport,
    v5::{
        AsyncClient, Event, EventLoop, MqttOptions,
        mqttbytes::{
            QoS,
            v5::{Filter, Packet, Publish, PublishProperties, SubscribeReasonCode},
        },
    },
};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_rustls::rustls::{
    RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

/// How many QoS 1/2 messages the broker may have in flight to the account, unacknowledged
/// (MQTT 5 `receive_maximum`). It bounds the acks that can wait in the client's request queue.
const RECEIVE_MAXIMUM: u16 = 32;

/// The client's request queue. The event loop hands out every event of a network read before it
/// takes one request, so acks can outrun it: the task never waits for room here (it would wait for
/// the loop it alone polls), it keeps acks that do not fit in its own queue and retries them after
/// each event.
const REQUEST_QUEUE: usize = 64;

/// One subscription.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Topic {
    filter: String,
    #[serde(default = "default_qos")]
    qos: u8,
}

/// The account's settings. No `Debug`: the password must not reach a log line.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    host: String,
    port: Option<u16>,
    #[serde(default)]
    tls: bool,
    ca_file: Option<PathBuf>,
    client_id: String,
    username: Option<String>,
    password: Option<String>,
    #[serde(default = "default_session_expiry_secs")]
    session_expiry_secs: u32,
    #[serde(default = "default_keep_alive_secs")]
    keep_alive_secs: u64,
    #[serde(default = "default_qos")]
    publish_qos: u8,
    #[serde(default)]
    topics: Vec<Topic>,
}

fn default_qos() -> u8 {
    1
}
fn default_session_expiry_secs() -> u32 {
    86_400
}
fn default_keep_alive_secs() -> u64 {
    30
}

/// The QoS level `n`, or why not.
fn qos(n: u8, key: &str) -> Result<QoS, String> {
    match n {
        0 => Ok(QoS::AtMostOnce),
        1 => Ok(QoS::AtLeastOnce),
        2 => Ok(QoS::ExactlyOnce),
        _ => Err(format!("`{key}` must be 0, 1 or 2, got {n}")),
    }
}

impl Settings {
    /// The account's settings, or the one-line reason it cannot start.
    fn of(account: &Account) -> Result<Self, String> {
        for key in ["host", "client_id"] {
            if account.get(key).is_none() {
                return Err(format!("missing `{key}`"));
            }
        }
        let settings: Self = account.parse().map_err(|e| e.message().to_owned())?;
        if settings.client_id.is_empty() {
            return Err("`client_id` is empty: a persistent session needs a name".to_owned());
        }
        qos(settings.publish_qos, "publish_qos")?;
        for topic in &settings.topics {
            qos(topic.qos, "topics.qos")?;
            if topic.filter.is_empty() {
                return Err("`topics`: an empty filter".to_owned());
            }
        }
        if settings.keep_alive_secs == 0 {
            return Err("`keep_alive_secs` must be at least 1".to_owned());
        }
        if let Some(ca_file) = &settings.ca_file {
            if !settings.tls {
                return Err("`ca_file` is set but `tls` is not".to_owned());
            }
            roots(Some(ca_file))?;
        }
        Ok(settings)
    }

    fn options(&self) -> PluginResult<MqttOptions> {
        let port = self.port.unwrap_or(if self.tls { 8883 } else { 1883 });
        let mut options = MqttOptions::new(&self.client_id, &self.host, port);
        options
            .set_clean_start(false)
            .set_session_expiry_interval(Some(self.session_expiry_secs))
            .set_keep_alive(Duration::from_secs(self.keep_alive_secs))
            .set_receive_maximum(Some(RECEIVE_MAXIMUM))
            .set_manual_acks(true);
        if let Some(username) = &self.username {
            options.set_credentials(username, self.password.clone().unwrap_or_default());
        }
        if self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                Arc::new(tls_config(self.ca_file.as_deref())?),
            )));
        }
        Ok(options)
    }
}

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

/// rustls with the `ring` provider, trusting [`roots`].
fn tls_config(ca_file: Option<&Path>) -> PluginResult<tokio_rustls::rustls::ClientConfig> {
    use tokio_rustls::rustls;
    let roots = roots(ca_file).map_err(PluginError::new)?;
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(PluginError::msg)?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// The MQTT channel plugin.
#[derive(Default)]
struct Mqtt;

impl ChannelPlugin for Mqtt {
    const CHANNEL_ID: &'static str = "mqtt";
    const DISPLAY_NAME: &'static str = "MQTT 5";

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

/// A publish waiting for the broker: the host's wait for its outcome.
type Done = SendReply;

/// Runs one session until the connection drops or the abort fires.
async fn run(
    ctx: &AccountContext,
    settings: &Settings,
    mut outbound: OutboundQueue,
) -> PluginResult {
    let host = ctx.host();
    host.set_connected(false);
    let options = settings.options()?;
    let broker = format!("{}:{}", settings.host, options.broker_address().1);
    let (client, mut events): (AsyncClient, EventLoop) = AsyncClient::new(options, REQUEST_QUEUE);
    let publish_qos = qos(settings.publish_qos, "publish_qos").map_err(PluginError::new)?;
    let origin_default = ctx.account().key();
    // Sends queued in the client, waiting for their packet id (they get them in order).
    let mut unnumbered: VecDeque<Done> = VecDeque::new();
    // Sends written, waiting for the broker's confirmation, by packet id.
    let mut unconfirmed: HashMap<u16, Done> = HashMap::new();
    // Acks (of delivered messages) the client's queue had no room for yet, in order.
    let mut unsent_acks: VecDeque<Publish> = VecDeque::new();
    let mut connected = false;
    let mut subscribe_pending = false;
    loop {
        while let Some(publish) = unsent_acks.front() {
            match client.try_ack(publish) {
                Ok(()) => {
                    unsent_acks.pop_front();
                }
                Err(rumqttc::v5::ClientError::TryRequest(_)) => break,
                Err(e) => return Err(PluginError::new(format!("cannot acknowledge: {e}"))),
            }
        }
        tokio::select! {
            () = ctx.aborted() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = client.disconnect().await;
                    // Drive the event loop until the DISCONNECT is written.
                    while let Ok(event) = events.poll().await {
                        if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                            break;
                        }
                    }
                })
                .await;
                return Ok(());
            }
            request = outbound.recv(), if connected && unsent_acks.is_empty() => {
                let Some(request) = request else { continue };
                let (message, done) = request.into_parts();
                let (origin, hops) = origin_and_hops(message.extra.as_ref(), &origin_default);
                let properties = PublishProperties {
                    user_properties: vec![
                        ("origin".to_owned(), origin),
                        ("hops".to_owned(), hops.to_string()),
                    ],
                    payload_format_indicator: Some(1),
                    ..PublishProperties::default()
                };
                // Never waits for room in the client's queue: that would wait for the loop.
                match client.try_publish_with_properties(
                    message.conversation.clone(),
                    publish_qos,
                    false,
                    message.text.into_bytes(),
                    properties,
                ) {
                    Ok(()) => unnumbered.push_back(done),
                    Err(e) => done.finish(Err(PluginError::new(format!("cannot publish: {e}")))),
                }
            }
            event = events.poll() => {
                let event = event.map_err(|e| {
                    PluginError::new(format!("connection to {broker} lost: {e}"))
                })?;
                match event {
                    Event::Incoming(Packet::ConnAck(connack)) => {
                        host.record_event(EventKind::Inbound);
                        tracing::info!(session_present = connack.session_present, "connected to the broker");
                        host.patch_status(&json!({ "mode": "mqtt", "session_present": connack.session_present }))?;
                        let filters: Vec<Filter> = settings
                            .topics
                            .iter()
                            .map(|t| Filter {
                                nolocal: true,
                                preserve_retain: false,
                                ..Filter::new(t.filter.clone(), qos(t.qos, "").unwrap_or(QoS::AtLeastOnce))
                            })
                            .collect();
                        if filters.is_empty() {
                            connected = true;
                            host.set_connected(true);
                        } else {
                            client.subscribe_many(filters).await.map_err(PluginError::msg)?;
                            subscribe_pending = true;
                        }
                    }
                    Event::Incoming(Packet::SubAck(suback)) if subscribe_pending => {
                        host.record_event(EventKind::Inbound);
                        if let Some((i, code)) = suback.return_codes.iter().enumerate().find(|(_, c)| !matches!(c, SubscribeReasonCode::Success(_))) {
                            let filter = settings.topics.get(i).map_or("?", |t| t.filter.as_str());
                            return Err(PluginError::new(format!("the broker refused the subscription to {filter:?}: {code:?}")));
                        }
                        subscribe_pending = false;
                        connected = true;
                        host.set_connected(true);
                        tracing::info!(topics = settings.topics.len(), "subscribed; connected");
                    }
                    Event::Incoming(Packet::Publish(publish)) => {
                        host.record_event(EventKind::Inbound);
                        ctx.deliver(inbound(&publish)).await?;
                        // Only now, with the message durable, may the broker forget it.
                        unsent_acks.push_back(publish);
                    }
                    Event::Outgoing(Outgoing::Publish(pkid)) => {
                        host.record_event(EventKind::Outbound);
                        if let Some(done) = unnumbered.pop_front() {
                            if publish_qos == QoS::AtMostOnce {
                                done.finish(Ok(String::new()));
                            } else {
                                unconfirmed.insert(pkid, done);
                            }
                        }
                    }
                    Event::Incoming(Packet::PubAck(ack)) => {
                        host.record_event(EventKind::Inbound);
                        confirm(&mut unconfirmed, ack.pkid, format!("{:?}", ack.reason), matches!(ack.reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success | rumqttc::v5::mqttbytes::v5::PubAckReason::NoMatchingSubscribers));
                    }
                    Event::Incoming(Packet::PubComp(comp)) => {
                        host.record_event(EventKind::Inbound);
                        confirm(&mut unconfirmed, comp.pkid, format!("{:?}", comp.reason), matches!(comp.reason, rumqttc::v5::mqttbytes::v5::PubCompReason::Success));
                    }
                    Event::Incoming(Packet::PingResp(_)) | Event::Outgoing(Outgoing::PingReq) => {
                        host.record_event(EventKind::Other);
                    }
                    Event::Incoming(Packet::Disconnect(disconnect)) => {
                        return Err(PluginError::new(format!(
                            "the broker {broker} disconnected: {:?}", disconnect.reason_code
                        )));
                    }
                    Event::Incoming(_) => host.record_event(EventKind::Inbound),
                    Event::Outgoing(_) => {}
                }
            }
        }
    }
}

/// Completes the send of packet `pkid`: its id is the packet id.
fn confirm(unconfirmed: &mut HashMap<u16, Done>, pkid: u16, reason: String, ok: bool) {
    if let Some(done) = unconfirmed.remove(&pkid) {
        done.finish(if ok {
            Ok(pkid.to_string())
        } else {
            Err(PluginError::new(format!(
                "the broker refused the publish: {reason}"
            )))
        });
    }
}

/// The origin and hop count to publish with: from the send's `extra.gateway` (a gateway's send),
/// else this account and 0.
fn origin_and_hops(extra: Option<&Value>, account: &str) -> (String, u64) {
    let extra = extra.and_then(|e| e.get("gateway"));
    let origin = extra
        .and_then(|e| e.get("origin"))
        .and_then(Value::as_str)
        .unwrap_or(account)
        .to_owned();
    let hops = extra
        .and_then(|e| e.get("hops"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    (origin, hops)
}

/// The inbound message for a publish.
fn inbound(publish: &Publish) -> Inbound {
    let property = |key: &str| {
        publish.properties.as_ref().and_then(|p| {
            p.user_properties
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        })
    };
    let topic = String::from_utf8_lossy(&publish.topic).into_owned();
    let text = String::from_utf8_lossy(&publish.payload).into_owned();
    let mut extra = json!({
        "qos": publish.qos as u8,
        "retain": publish.retain,
    });
    if let Some(gateway) = gateway_tag(property("origin"), property("hops")) {
        extra["gateway"] = gateway;
    }
    Inbound::new(
        topic,
        property("sender").unwrap_or_else(|| "mqtt".to_owned()),
        text,
    )
    .with_extra(extra)
}

/// `extra.gateway` for a publish with the `origin` and `hops` user properties: only for a bridged
/// message (hops 1 or more; a gateway counts every bridging). A plain send of a channeld says hops
/// 0 and is a new message wherever it arrives; unparseable properties are not a gateway's.
fn gateway_tag(origin: Option<String>, hops: Option<String>) -> Option<Value> {
    let hops = hops?.trim().parse::<u64>().ok().filter(|h| *h >= 1)?;
    let origin = origin.filter(|o| !o.is_empty())?;
    Some(json!({ "origin": origin, "hops": hops }))
}

export_plugin!(Mqtt);

#[cfg(test)]
mod tests;
