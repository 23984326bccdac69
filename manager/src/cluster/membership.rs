//! Membership: each node registers `/channeld/<name>/nodes/<node>` on its lease, with its API
//! address, its loaded channels and a hash of its resolved config. The live nodes are the
//! registered ones; a node whose config hash differs from the majority's claims nothing.

use std::collections::BTreeMap;

use etcd_client::{Client, GetOptions, PutOptions};
use serde::{Deserialize, Serialize};

/// What a node says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// The node's name.
    pub node: String,
    /// Its API address (`host:port`), if it serves one.
    pub api: Option<String>,
    /// The channels it has loaded.
    pub channels: Vec<String>,
    /// A hash of its resolved config (channels and cluster settings).
    pub config_hash: String,
    /// When its lease was granted (Unix ms, its own clock).
    pub since_ms: i64,
    /// Its lease.
    pub lease: i64,
}

/// The key of `node`'s registration.
pub fn key(prefix: &str, node: &str) -> String {
    format!("{prefix}nodes/{node}")
}

/// Registers (or refreshes) `info` on its lease.
///
/// # Cancellation safety
///
/// Cancel-safe: the registration either happened or not.
pub async fn register(
    client: &mut Client,
    prefix: &str,
    info: &NodeInfo,
) -> Result<(), etcd_client::Error> {
    let value = serde_json::to_string(info).unwrap_or_default();
    client
        .put(
            key(prefix, &info.node),
            value,
            Some(PutOptions::new().with_lease(info.lease)),
        )
        .await?;
    Ok(())
}

/// Every registered node, by name (unreadable records are skipped).
///
/// # Cancellation safety
///
/// Cancel-safe: it only reads.
pub async fn list(
    client: &mut Client,
    prefix: &str,
) -> Result<BTreeMap<String, NodeInfo>, etcd_client::Error> {
    let response = client
        .get(
            format!("{prefix}nodes/"),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    Ok(response
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<NodeInfo>(kv.value()).ok())
        .map(|info| (info.node.clone(), info))
        .collect())
}

/// The config hash most nodes have (ties go to the smaller hash), if any node is registered.
pub fn majority_hash(nodes: &BTreeMap<String, NodeInfo>) -> Option<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for info in nodes.values() {
        *counts.entry(info.config_hash.as_str()).or_default() += 1;
    }
    let best = counts.values().copied().max()?;
    counts
        .into_iter()
        .find(|(_, n)| *n == best)
        .map(|(hash, _)| hash.to_owned())
}

/// A hash of what must agree across nodes: the channel tables (secrets included, hashed, never
/// shown) and the cluster's name and lease time.
pub fn config_hash(config: &crate::config::Config) -> String {
    let mut hasher = blake3::Hasher::new();
    for (id, section) in &config.channels {
        hasher.update(id.as_bytes());
        hasher.update(&[0]);
        hasher.update(section.table.to_string().as_bytes());
        hasher.update(&[0]);
    }
    if let Some(cluster) = &config.cluster {
        hasher.update(cluster.name.as_bytes());
        hasher.update(&cluster.lease_ttl.as_millis().to_le_bytes());
    }
    hasher.finalize().to_hex()[..16].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, hash: &str) -> (String, NodeInfo) {
        (
            name.to_owned(),
            NodeInfo {
                node: name.to_owned(),
                api: None,
                channels: vec![],
                config_hash: hash.to_owned(),
                since_ms: 0,
                lease: 1,
            },
        )
    }

    #[test]
    fn the_majority_hash_is_the_most_common_one() {
        let nodes: BTreeMap<_, _> = [node("a", "x"), node("b", "y"), node("c", "y")].into();
        assert_eq!(majority_hash(&nodes).as_deref(), Some("y"));
        let tie: BTreeMap<_, _> = [node("a", "y"), node("b", "x")].into();
        assert_eq!(majority_hash(&tie).as_deref(), Some("x"));
        assert_eq!(majority_hash(&BTreeMap::new()), None);
    }
}
