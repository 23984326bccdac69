//! User intent that must survive a move: a manual stop or a logout is stored under
//! `/channeld/<name>/intent/<channel>:<account>` (no lease: it outlives every node), so "a stop
//! always wins" holds whichever node owns the account. A user start deletes it.

use std::collections::BTreeMap;

use etcd_client::{Client, GetOptions};

/// What a user asked for an account.
pub const STOPPED: &str = "stopped";
/// A logout (the account stays stopped until a user starts it).
pub const LOGGED_OUT: &str = "logged-out";

fn key(prefix: &str, account: &str) -> String {
    format!("{prefix}intent/{account}")
}

/// Records `what` ([`STOPPED`] or [`LOGGED_OUT`]) for `account` (`channel:account`).
///
/// # Cancellation safety
///
/// Cancel-safe: recorded or not.
pub async fn set(
    client: &mut Client,
    prefix: &str,
    account: &str,
    what: &str,
) -> Result<(), etcd_client::Error> {
    client.put(key(prefix, account), what, None).await?;
    Ok(())
}

/// Forgets the intent for `account` (a user start).
///
/// # Cancellation safety
///
/// Cancel-safe: deleted or not.
pub async fn clear(
    client: &mut Client,
    prefix: &str,
    account: &str,
) -> Result<(), etcd_client::Error> {
    client.delete(key(prefix, account), None).await?;
    Ok(())
}

/// Every recorded intent (`channel:account` → what).
///
/// # Cancellation safety
///
/// Cancel-safe: it only reads.
pub async fn list(
    client: &mut Client,
    prefix: &str,
) -> Result<BTreeMap<String, String>, etcd_client::Error> {
    let intents = format!("{prefix}intent/");
    let response = client
        .get(intents.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    Ok(response
        .kvs()
        .iter()
        .filter_map(|kv| {
            let account = kv.key_str().ok()?.strip_prefix(&intents)?.to_owned();
            Some((account, kv.value_str().ok()?.to_owned()))
        })
        .collect())
}
