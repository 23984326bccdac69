//! `[cluster]`: the etcd endpoints, the cluster's name, this node's name, the lease's time to
//! live and the token nodes use between themselves. Without the section channeld runs alone.
//!
//! ```toml
//! [cluster]
//! etcd = ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"]
//! name = "prod"          # every node of one cluster has the same name
//! node = "host-a"        # default: the hostname
//! lease_ttl = "10s"      # at least 2s
//! token = { env = "CHANNELD_CLUSTER_TOKEN" }
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Secret;

/// `lease_ttl`'s default.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

/// `name`'s default.
pub const DEFAULT_NAME: &str = "channeld";

fn default_name() -> String {
    DEFAULT_NAME.to_owned()
}

fn default_ttl() -> Duration {
    DEFAULT_LEASE_TTL
}

/// `[cluster]` as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub(crate) etcd: Vec<String>,
    #[serde(default = "default_name")]
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) node: Option<String>,
    #[serde(default = "default_ttl", with = "humantime_serde")]
    pub(crate) lease_ttl: Duration,
    #[serde(default)]
    pub(crate) token: Option<crate::config::SecretSource>,
}

/// `[cluster]`, checked and with its secret resolved.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// etcd's client endpoints (`http://host:port`).
    pub etcd: Vec<String>,
    /// The cluster's name: its keys live under `/channeld/<name>/`.
    pub name: String,
    /// This node's name (unique in the cluster).
    pub node: String,
    /// The lease's time to live: a dead node's accounts move after about this long.
    pub lease_ttl: Duration,
    /// The secret nodes present to each other's API (forwarded operations).
    pub token: Option<Secret>,
}

impl ClusterConfig {
    /// The prefix of every key of this cluster.
    pub fn prefix(&self) -> String {
        format!("/channeld/{}/", self.name)
    }

    /// How long before the lease could expire on the server a node stops its accounts: a third
    /// of the time to live (at least 500 ms). A node whose last successful keep-alive is older
    /// than `lease_ttl - margin` runs nothing.
    pub fn fence_margin(&self) -> Duration {
        (self.lease_ttl / 3).max(Duration::from_millis(500))
    }

    /// How often the lease is kept alive: six times per time to live.
    pub fn keep_alive_interval(&self) -> Duration {
        self.lease_ttl / 6
    }

    /// How often a node compares the cluster's view with what it runs.
    pub fn poll_interval(&self) -> Duration {
        (self.lease_ttl / 8).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// This machine's hostname (`node`'s default).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// Checks one name (`name` or `node`): not empty, and none of `/`, `:` or whitespace, which
/// would break the key layout.
fn check_name(what: &str, value: &str) -> Result<(), String> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(format!(
            "cluster {what} {value:?} must be non-empty, without '/', ':' or spaces"
        ));
    }
    Ok(())
}

impl RawCluster {
    /// Checks and resolves (`token` through `resolve`). The error is the message only; the
    /// caller names the file and line.
    pub(crate) fn resolve(
        self,
        resolve: impl FnOnce(&crate::config::SecretSource) -> Result<String, String>,
    ) -> Result<ClusterConfig, (&'static str, String)> {
        if !cfg!(feature = "cluster") {
            return Err((
                "etcd",
                "this channeld was built without the `cluster` feature: rebuild it with \
                 `--features cluster` (needs protoc), or remove the [cluster] section"
                    .to_owned(),
            ));
        }
        if self.etcd.is_empty() {
            return Err((
                "etcd",
                "cluster etcd lists no endpoint (e.g. [\"http://127.0.0.1:2379\"])".to_owned(),
            ));
        }
        for endpoint in &self.etcd {
            if !endpoint.starts_with("http://") {
                return Err((
                    "etcd",
                    format!(
                        "cluster etcd endpoint {endpoint:?} must start with http:// (TLS is not \
                         supported in this release)"
                    ),
                ));
            }
        }
        check_name("name", &self.name).map_err(|m| ("name", m))?;
        let node = self.node.unwrap_or_else(hostname);
        check_name("node", &node).map_err(|m| ("node", m))?;
        let token = self
            .token
            .as_ref()
            .map(|s| resolve(s).map(Secret::new))
            .transpose()
            .map_err(|m| ("token", m))?;
        Ok(ClusterConfig {
            etcd: self.etcd,
            name: self.name,
            node,
            lease_ttl: self.lease_ttl,
            token,
        })
    }
}

#[cfg(all(test, feature = "cluster"))]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("/etc/channeld/channeld.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn without_the_section_there_is_no_cluster() {
        assert!(parse("").unwrap().cluster.is_none());
    }

    #[test]
    fn the_section_has_defaults_for_all_but_etcd() {
        let config =
            parse("[cluster]\netcd = [\"http://127.0.0.1:2379\"]\ntoken = \"s\"\n").unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!(cluster.name, DEFAULT_NAME);
        assert_eq!(cluster.node, hostname());
        assert_eq!(cluster.lease_ttl, DEFAULT_LEASE_TTL);
        assert_eq!(cluster.token.as_ref().unwrap().expose(), "s");
        assert_eq!(cluster.prefix(), "/channeld/channeld/");
    }

    #[test]
    fn a_lease_ttl_under_two_seconds_is_refused_with_file_and_line() {
        let err = parse("[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"1s\"\n")
            .unwrap_err();
        assert!(
            err.starts_with("/etc/channeld/channeld.toml:3:1: "),
            "{err}"
        );
        assert!(err.contains("lease_ttl"), "{err}");
        parse("[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nlease_ttl = \"2s\"\n").unwrap();
    }

    #[test]
    fn bad_endpoints_and_names_are_refused_naming_the_key() {
        let err = parse("[cluster]\netcd = []\n").unwrap_err();
        assert!(
            err.contains(":2:1: ") && err.contains("no endpoint"),
            "{err}"
        );
        let err = parse("[cluster]\netcd = [\"https://e:2379\"]\n").unwrap_err();
        assert!(err.contains("TLS is not supported"), "{err}");
        let err = parse("[cluster]\netcd = [\"http://e:2379\"]\nnode = \"a/b\"\n").unwrap_err();
        assert!(
            err.contains(":3:1: ") && err.contains("cluster node"),
            "{err}"
        );
        let err = parse("[cluster]\netcd = [\"http://e:2379\"]\nleader = true\n").unwrap_err();
        assert!(err.contains("leader"), "{err}");
    }

    #[test]
    fn the_fence_margin_leaves_time_before_the_lease_expires() {
        let config = parse("[cluster]\netcd = [\"http://e:2379\"]\nlease_ttl = \"3s\"\n").unwrap();
        let cluster = config.cluster.unwrap();
        assert_eq!(cluster.fence_margin(), Duration::from_secs(1));
        assert_eq!(cluster.keep_alive_interval(), Duration::from_millis(500));
        assert!(cluster.poll_interval() < cluster.fence_margin());
    }
}
