//! The node: joins the cluster (a lease, a registration), then every poll interval compares the
//! cluster's view with what it runs: it claims the accounts assignment gives it, starts those it
//! holds (unless a user stopped them), and gives up, stop first, those that now belong elsewhere.
//! A watchdog stops every account the moment the fence closes; the supervisor's start gate
//! refuses any boot of an account this node does not hold under an open fence.

use std::{
    collections::{BTreeMap, HashSet},
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use axum::{Json, http::StatusCode};
use etcd_client::{Client, ConnectOptions};
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    assignment,
    config::ClusterConfig,
    fence::{self, Fence},
    forward, intent,
    membership::{self, NodeInfo},
    ownership::{self, Holder},
};
use crate::{api::ApiError, host::AccountKey, supervise::Supervisor};

static CURRENT: OnceLock<Arc<Node>> = OnceLock::new();

/// This process's cluster node, once [`start`] made one.
pub fn current() -> Option<Arc<Node>> {
    CURRENT.get().cloned()
}

/// What a node last saw of the cluster.
#[derive(Default)]
struct View {
    state: &'static str,
    reason: Option<String>,
    lease: Option<i64>,
    nodes: BTreeMap<String, NodeInfo>,
    owners: BTreeMap<String, Holder>,
    majority: Option<String>,
}

/// One channeld's place in the cluster.
pub struct Node {
    config: ClusterConfig,
    supervisor: Supervisor,
    api: Option<SocketAddr>,
    config_hash: String,
    fence: Arc<Fence>,
    /// Accounts this node holds on its current lease.
    owned: Mutex<HashSet<AccountKey>>,
    /// Accounts this node started and has not stopped since.
    started: Mutex<HashSet<AccountKey>>,
    view: Mutex<View>,
    client: Mutex<Option<(Client, i64)>>,
    /// Serialises stops of everything (the watchdog and the loop).
    stopping: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Makes this process a cluster node: installs the supervisor's start gate and runs the node's
/// loop and watchdog until `stop` fires. The returned handle ends once every account this node
/// started is stopped and its lease is revoked (when etcd answers).
pub fn start(
    config: &crate::config::Config,
    supervisor: Supervisor,
    api: Option<SocketAddr>,
    stop: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let cluster = config.cluster.clone()?;
    let node = Arc::new(Node {
        fence: Fence::new(cluster.lease_ttl, "joining the cluster"),
        config_hash: membership::config_hash(config),
        config: cluster,
        supervisor: supervisor.clone(),
        api,
        owned: Mutex::default(),
        started: Mutex::default(),
        view: Mutex::new(View {
            state: "joining",
            ..View::default()
        }),
        client: Mutex::new(None),
        stopping: tokio::sync::Mutex::new(()),
    });
    if CURRENT.set(node.clone()).is_err() {
        tracing::error!("cluster: a node already runs in this process");
        return None;
    }
    let gate_node = node.clone();
    if supervisor
        .set_start_gate(Arc::new(move |key| gate_node.refuses(key)))
        .is_err()
    {
        tracing::error!("cluster: the supervisor has a start gate already");
        return None;
    }
    tokio::spawn(node.clone().watchdog(stop.clone()));
    Some(tokio::spawn(node.run(stop)))
}

impl Node {
    /// Why `key` may not start here now (the supervisor's start gate).
    fn refuses(&self, key: &AccountKey) -> Option<String> {
        if !self.fence.is_open() {
            return Some(format!("cluster: {}", self.fence.reason()));
        }
        if !lock(&self.owned).contains(key) {
            return Some(format!(
                "cluster: node {} does not hold this account",
                self.config.node
            ));
        }
        None
    }

    /// Whether `token` is the cluster token.
    pub fn accepts_token(&self, token: &str) -> bool {
        use subtle::ConstantTimeEq as _;
        self.config
            .token
            .as_ref()
            .is_some_and(|t| bool::from(t.expose().as_bytes().ct_eq(token.as_bytes())))
    }

    fn prefix(&self) -> String {
        self.config.prefix()
    }

    /// Checks the fence every 20 ms; once it is closed, stops every account this node started.
    async fn watchdog(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.fence.is_open() && !lock(&self.started).is_empty() {
                let why = self.fence.reason();
                tracing::warn!(node = %self.config.node, "cluster fence closed: {why}");
                self.stop_all(&why).await;
            }
        }
    }

    /// Stops every account this node started, noting `why` in their status.
    async fn stop_all(&self, why: &str) {
        let _one = self.stopping.lock().await;
        let keys: Vec<AccountKey> = lock(&self.started).drain().collect();
        let stops = keys.iter().map(|key| async move {
            let _ = self.supervisor.stop(&key.channel, Some(&key.account)).await;
            self.note(key, Some(why));
        });
        join_all(stops).await;
    }

    fn note(&self, key: &AccountKey, why: Option<&str>) {
        self.supervisor.board().update(key, |s| match why {
            Some(why) => {
                s.extra.insert("clusterNote".into(), json!(why));
            }
            None => {
                s.extra.remove("clusterNote");
            }
        });
    }

    fn set_owner(&self, key: &AccountKey, owner: Option<&str>) {
        let value = owner.map_or(Value::Null, |o| json!(o));
        let board = self.supervisor.board();
        let same = board
            .get(key)
            .is_some_and(|s| s.extra.get("clusterOwner") == Some(&value));
        if !same {
            board.update(key, |s| {
                s.extra.insert("clusterOwner".into(), value);
            });
        }
    }

    fn set_state(&self, state: &'static str, reason: Option<String>) {
        let mut view = lock(&self.view);
        view.state = state;
        view.reason = reason;
    }

    async fn connect(&self) -> Result<Client, etcd_client::Error> {
        let limit = (self.config.lease_ttl / 4).max(Duration::from_millis(300));
        let options = ConnectOptions::new()
            .with_connect_timeout(limit)
            .with_timeout(limit);
        Client::connect(&self.config.etcd, Some(options)).await
    }

    /// The node's loop: join, reconcile until the fence closes, stop everything, again.
    async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut previous_lease: Option<(Client, i64)> = None;
        let retry = self.config.poll_interval().max(Duration::from_millis(250));
        while !stop.is_cancelled() {
            let joined = tokio::select! {
                () = stop.cancelled() => break,
                joined = self.join(previous_lease.take()) => joined,
            };
            let (client, lease) = match joined {
                Ok(pair) => pair,
                Err((why, old)) => {
                    previous_lease = old;
                    self.set_state("unreachable", Some(why.clone()));
                    tracing::warn!(node = %self.config.node, "cluster: cannot join: {why}");
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = tokio::time::sleep(retry) => continue,
                    }
                }
            };
            *lock(&self.client) = Some((client.clone(), lease));
            tracing::info!(node = %self.config.node, lease, "cluster: joined");
            let keeper = tokio::spawn(fence::keep_alive(
                client.clone(),
                lease,
                self.config.lease_ttl,
                self.config.fence_margin(),
                self.config.keep_alive_interval(),
                self.fence.clone(),
            ));
            let why = self.member(client.clone(), lease, &stop, keeper).await;
            *lock(&self.client) = None;
            self.fence.close(why.clone());
            self.set_state(
                if stop.is_cancelled() {
                    "leaving"
                } else {
                    "fenced"
                },
                Some(why.clone()),
            );
            self.stop_all(&why).await;
            lock(&self.owned).clear();
            previous_lease = Some((client, lease));
        }
        // Leaving: every account is stopped; the lease goes so the others take over at once.
        self.fence.close("this node is shutting down");
        self.stop_all("this node is shutting down").await;
        if let Some((mut client, lease)) = previous_lease {
            let _ = tokio::time::timeout(Duration::from_secs(1), client.lease_revoke(lease)).await;
        }
    }

    /// Connects, revokes the previous session's lease if any (its keys go at once), grants a
    /// lease and registers. On failure: why, and the previous lease still to revoke.
    async fn join(
        &self,
        previous: Option<(Client, i64)>,
    ) -> Result<(Client, i64), (String, Option<(Client, i64)>)> {
        if let Some((mut old_client, old)) = previous {
            match old_client.lease_revoke(old).await {
                Ok(_) => {}
                // Already gone (it expired, or etcd lost it).
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => {
                    return Err((
                        format!("revoking lease {old}: {e}"),
                        Some((old_client, old)),
                    ));
                }
            }
        }
        let mut client = self.connect().await.map_err(|e| (e.to_string(), None))?;
        let ttl_secs = self.config.lease_ttl.as_secs().max(2) as i64;
        let sent = Instant::now();
        let lease = client
            .lease_grant(ttl_secs, None)
            .await
            .map_err(|e| (format!("etcd {:?}: {e}", self.config.etcd), None))?
            .id();
        self.fence.open_until(
            sent + self
                .config
                .lease_ttl
                .saturating_sub(self.config.fence_margin()),
        );
        let channels = self.loaded_channels();
        let info = NodeInfo {
            node: self.config.node.clone(),
            api: self.api.map(|a| a.to_string()),
            channels,
            config_hash: self.config_hash.clone(),
            since_ms: wall_ms(),
            lease,
        };
        if let Err(e) = membership::register(&mut client, &self.prefix(), &info).await {
            self.fence.close("registration failed");
            return Err((format!("registering: {e}"), Some((client, lease))));
        }
        lock(&self.view).lease = Some(lease);
        self.set_state("member", None);
        Ok((client, lease))
    }

    /// A member's life: reconcile every poll interval until the fence closes, the keep-alive
    /// ends, or `stop`. Returns why it ended.
    async fn member(
        &self,
        mut client: Client,
        lease: i64,
        stop: &CancellationToken,
        mut keeper: tokio::task::JoinHandle<String>,
    ) -> String {
        let poll = self.config.poll_interval();
        loop {
            if !self.fence.is_open() {
                keeper.abort();
                return self.fence.reason();
            }
            match self.reconcile(&mut client, lease).await {
                Err(e) => tracing::debug!(node = %self.config.node, "cluster: reconcile: {e}"),
                Ok(()) => {
                    // Channels loaded after joining (plugins load in the background): when the
                    // registration etcd holds (just read) lists other channels, register again.
                    let loaded = self.loaded_channels();
                    let registered = lock(&self.view)
                        .nodes
                        .get(&self.config.node)
                        .map(|n| n.channels.clone());
                    if registered.as_ref() != Some(&loaded) {
                        let _ = self.reregister(&mut client, lease).await;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => {
                    keeper.abort();
                    return "this node is shutting down".into();
                }
                why = &mut keeper => {
                    return why.unwrap_or_else(|e| format!("keep-alive failed: {e}"));
                }
                () = tokio::time::sleep(poll) => {}
            }
        }
    }

    /// The ids of the channels loaded here, as this node registers them.
    fn loaded_channels(&self) -> Vec<String> {
        self.supervisor
            .channels()
            .iter()
            .map(|c| c.id.clone())
            .collect()
    }

    async fn reregister(&self, client: &mut Client, lease: i64) -> Result<(), etcd_client::Error> {
        let channels = self.loaded_channels();
        let since_ms = lock(&self.view)
            .nodes
            .get(&self.config.node)
            .map_or_else(wall_ms, |n| n.since_ms);
        let info = NodeInfo {
            node: self.config.node.clone(),
            api: self.api.map(|a| a.to_string()),
            channels,
            config_hash: self.config_hash.clone(),
            since_ms,
            lease,
        };
        membership::register(client, &self.prefix(), &info).await
    }

    /// One comparison of the cluster's view with what this node runs.
    async fn reconcile(&self, client: &mut Client, lease: i64) -> Result<(), etcd_client::Error> {
        let prefix = self.prefix();
        let nodes = membership::list(client, &prefix).await?;
        let owners = ownership::list(client, &prefix).await?;
        let intents = intent::list(client, &prefix).await?;
        let majority = membership::majority_hash(&nodes);
        let agrees = majority.as_deref() == Some(self.config_hash.as_str());
        let mut disagreement: Option<Option<String>> = None;
        {
            let mut view = lock(&self.view);
            view.nodes = nodes.clone();
            view.owners = owners.clone();
            view.majority = majority.clone();
            if agrees {
                if view.state == "disagrees" {
                    view.state = "member";
                    view.reason = None;
                    disagreement = Some(None);
                }
            } else if view.state != "disagrees" {
                let why = format!(
                    "this node's config hash {} differs from the majority's {}: it claims nothing",
                    self.config_hash,
                    majority.as_deref().unwrap_or("?")
                );
                tracing::warn!(node = %self.config.node, "cluster: {why}");
                view.state = "disagrees";
                view.reason = Some(why.clone());
                disagreement = Some(Some(why));
            }
        }
        // Said in every account's status too (accounts of channels loaded later included).
        let disagreement = match (agrees, disagreement) {
            (false, _) => Some(lock(&self.view).reason.clone()),
            (true, Some(None)) => Some(None),
            (true, _) => None,
        };
        if let Some(why) = disagreement {
            for channel in self.supervisor.channels() {
                for account in &channel.accounts {
                    let key = AccountKey::new(channel.id.clone(), account.clone());
                    let current = self
                        .supervisor
                        .board()
                        .get(&key)
                        .and_then(|s| s.extra.get("clusterNote").cloned());
                    if current.as_ref().and_then(Value::as_str) != why.as_deref() {
                        self.note(&key, why.as_deref());
                    }
                }
            }
        }
        let me = self.config.node.as_str();
        let mut release = Vec::new();
        let mut claim = Vec::new();
        let mut run = Vec::new();
        let mut halt = Vec::new();
        for channel in self.supervisor.channels() {
            let eligible: Vec<&str> = nodes
                .values()
                .filter(|n| Some(&n.config_hash) == majority.as_ref())
                .filter(|n| n.channels.contains(&channel.id))
                .map(|n| n.node.as_str())
                .collect();
            for account in &channel.accounts {
                let key = AccountKey::new(channel.id.clone(), account.clone());
                let name = key.to_string();
                let desired = if agrees {
                    assignment::owner(&name, &eligible)
                } else {
                    None
                };
                let holder = owners.get(&name);
                self.set_owner(&key, holder.map(|h| h.node.as_str()));
                let mine = holder.is_some_and(|h| h.lease == lease);
                if mine && desired != Some(me) {
                    release.push(key);
                } else if mine {
                    lock(&self.owned).insert(key.clone());
                    if intents.contains_key(&name) {
                        halt.push(key);
                    } else {
                        run.push(key);
                    }
                } else if holder.is_none() && desired == Some(me) {
                    claim.push((key, intents.contains_key(&name)));
                } else {
                    lock(&self.owned).remove(&key);
                    halt.push(key);
                }
            }
        }
        // Giving up: stop first, then delete the key.
        for key in &release {
            self.ensure_stopped(key, Some("moved: it belongs to another node now"))
                .await;
            lock(&self.owned).remove(key);
            ownership::release(client, &prefix, &key.to_string(), lease).await?;
        }
        for key in &halt {
            self.ensure_stopped(key, None).await;
        }
        let claims = claim.into_iter().map(|(key, stopped)| {
            let mut client = client.clone();
            let prefix = prefix.clone();
            async move {
                let got = ownership::claim(&mut client, &prefix, &key.to_string(), me, lease).await;
                (key, stopped, got)
            }
        });
        for (key, stopped, got) in join_all(claims).await {
            if let Ok(true) = got {
                self.set_owner(&key, Some(me));
                lock(&self.owned).insert(key.clone());
                if !stopped {
                    run.push(key);
                }
            }
        }
        join_all(run.iter().map(|key| self.ensure_started(key))).await;
        Ok(())
    }

    async fn ensure_started(&self, key: &AccountKey) {
        if !self.fence.is_open() || !lock(&self.started).insert(key.clone()) {
            return;
        }
        self.note(key, None);
        let outcome = self
            .supervisor
            .start(&key.channel, Some(&key.account))
            .await;
        if let Ok(outcomes) = outcome {
            for (_, outcome) in outcomes {
                if matches!(outcome, crate::supervise::StartOutcome::Refused(_)) {
                    lock(&self.started).remove(key);
                }
            }
        }
    }

    async fn ensure_stopped(&self, key: &AccountKey, why: Option<&str>) {
        if lock(&self.started).remove(key) {
            let _ = self.supervisor.stop(&key.channel, Some(&key.account)).await;
            if let Some(why) = why {
                self.note(key, Some(why));
            }
        }
    }

    /// `GET /v1/cluster`.
    pub fn view(&self) -> Value {
        let view = lock(&self.view);
        let now = wall_ms();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for holder in view.owners.values() {
            *counts.entry(holder.node.as_str()).or_default() += 1;
        }
        let nodes: Vec<Value> = view
            .nodes
            .values()
            .map(|n| {
                json!({
                    "node": n.node,
                    "api": n.api,
                    "channels": n.channels,
                    "accounts": counts.get(n.node.as_str()).copied().unwrap_or(0),
                    "leaseAgeMs": (now - n.since_ms).max(0),
                    "configHash": n.config_hash,
                    "agrees": Some(&n.config_hash) == view.majority.as_ref(),
                })
            })
            .collect();
        json!({
            "cluster": self.config.name,
            "node": self.config.node,
            "state": if view.state == "member" && !self.fence.is_open() { "fenced" } else { view.state },
            "reason": if view.state == "member" && !self.fence.is_open() { Some(self.fence.reason()) } else { view.reason.clone() },
            "fenceOpen": self.fence.is_open(),
            "lease": view.lease,
            "leaseTtlMs": self.config.lease_ttl.as_millis() as u64,
            "running": lock(&self.started).len(),
            "nodes": nodes,
        })
    }

    /// A user operation (see [`super::intercept`]).
    pub async fn user_op(
        self: &Arc<Self>,
        channel: &str,
        account: Option<&str>,
        op: &str,
    ) -> Result<Json<Value>, ApiError> {
        let ch = self.supervisor.channel(channel)?;
        let accounts = match account {
            Some(raw) => {
                let id = channeld_plugin_abi::normalize_account_id(raw);
                if !ch.accounts.contains(&id) {
                    return Err(crate::supervise::SupervisorError::UnknownAccount(
                        AccountKey::new(channel, raw),
                    )
                    .into());
                }
                vec![id]
            }
            None => ch.accounts.to_vec(),
        };
        let ops = accounts.iter().map(|id| self.account_op(channel, id, op));
        let mut results = serde_json::Map::new();
        for answer in join_all(ops).await {
            let answer = answer?;
            if let Some(map) = answer.get("results").and_then(Value::as_object) {
                results.extend(map.clone());
            }
        }
        Ok(Json(json!({ "results": results })))
    }

    async fn account_op(
        self: &Arc<Self>,
        channel: &str,
        account: &str,
        op: &str,
    ) -> Result<Value, ApiError> {
        let key = AccountKey::new(channel, account);
        let name = key.to_string();
        let unavailable = |e: String| ApiError(StatusCode::SERVICE_UNAVAILABLE, e);
        let (mut client, _) = lock(&self.client)
            .clone()
            .ok_or_else(|| unavailable(format!("cluster: {}", self.fence.reason())))?;
        let prefix = self.prefix();
        match op {
            "stop" => intent::set(&mut client, &prefix, &name, intent::STOPPED).await,
            "logout" => intent::set(&mut client, &prefix, &name, intent::LOGGED_OUT).await,
            "start" | "restart" => intent::clear(&mut client, &prefix, &name).await,
            _ => Ok(()),
        }
        .map_err(|e| unavailable(format!("cluster: recording {op} of {name} in etcd: {e}")))?;
        let holder = ownership::list(&mut client, &prefix)
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .remove(&name);
        let mine = holder
            .as_ref()
            .is_some_and(|h| h.node == self.config.node && lock(&self.owned).contains(&key));
        match holder {
            Some(holder) if !mine => {
                let address = lock(&self.view)
                    .nodes
                    .get(&holder.node)
                    .and_then(|n| n.api.clone())
                    .ok_or_else(|| {
                        unavailable(format!("node {} has no API address", holder.node))
                    })?;
                let token = self.config.token.as_ref().ok_or_else(|| {
                    unavailable(
                        forward::ForwardError::NoToken {
                            op: op.into(),
                            account: name.clone(),
                            node: holder.node.clone(),
                        }
                        .to_string(),
                    )
                })?;
                forward::forward(&holder.node, &address, token.expose(), channel, account, op)
                    .await
                    .map_err(|e| ApiError(StatusCode::BAD_GATEWAY, e.to_string()))
            }
            Some(_) => {
                // The owner: run it here, keeping the node's own bookkeeping in step.
                match op {
                    "stop" | "logout" => {
                        lock(&self.started).remove(&key);
                    }
                    "start" | "restart" => {
                        lock(&self.started).insert(key.clone());
                    }
                    _ => {}
                }
                let Json(value) =
                    crate::api::run_op(&self.supervisor, channel, Some(account), op).await?;
                Ok(value)
            }
            None => {
                // Nobody holds it: the intent is recorded; whoever claims it honours it.
                Ok(json!({ "results": { name: {
                    "outcome": if matches!(op, "stop" | "logout") { "stopped" } else { "pending" },
                    "reason": "no node holds this account now; the cluster applies this when one claims it",
                } } }))
            }
        }
    }
}
