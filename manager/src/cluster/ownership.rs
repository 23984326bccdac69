//! Ownership: `/channeld/<name>/owners/<channel>:<account>` names the node that runs the account.
//! It is attached to that node's lease and created in a transaction only if absent, so at most
//! one node holds it; it goes when the owner deletes it (after stopping the account) or when the
//! owner's lease expires.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};

/// Who holds an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The node's name.
    pub node: String,
    /// The lease the key is attached to.
    pub lease: i64,
}

/// The key of an account (`channel:account`).
pub fn key(prefix: &str, account: &str) -> String {
    format!("{prefix}owners/{account}")
}

/// Claims `account` for `node` on `lease` if nobody holds it; whether this call got it.
///
/// # Cancellation safety
///
/// Not cancel-safe: a dropped call may have claimed the key (it is then seen as this node's own
/// at the next look, by its lease).
pub async fn claim(
    client: &mut Client,
    prefix: &str,
    account: &str,
    node: &str,
    lease: i64,
) -> Result<bool, etcd_client::Error> {
    let key = key(prefix, account);
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            node,
            Some(PutOptions::new().with_lease(lease)),
        )]);
    Ok(client.txn(txn).await?.succeeded())
}

/// Gives `account` up: deletes its key if it is still attached to `lease`. Call it only once the
/// account has stopped.
///
/// # Cancellation safety
///
/// Cancel-safe: the key is deleted or not; the lease's expiry deletes it anyway.
pub async fn release(
    client: &mut Client,
    prefix: &str,
    account: &str,
    lease: i64,
) -> Result<bool, etcd_client::Error> {
    let key = key(prefix, account);
    let txn = Txn::new()
        .when([Compare::lease(key.clone(), CompareOp::Equal, lease)])
        .and_then([TxnOp::delete(key, None)]);
    Ok(client.txn(txn).await?.succeeded())
}

/// Every held account (`channel:account` → holder).
///
/// # Cancellation safety
///
/// Cancel-safe: it only reads.
pub async fn list(
    client: &mut Client,
    prefix: &str,
) -> Result<BTreeMap<String, Holder>, etcd_client::Error> {
    let owners = format!("{prefix}owners/");
    let response = client
        .get(owners.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    Ok(response
        .kvs()
        .iter()
        .filter_map(|kv| {
            let account = kv.key_str().ok()?.strip_prefix(&owners)?.to_owned();
            let node = kv.value_str().ok()?.to_owned();
            Some((
                account,
                Holder {
                    node,
                    lease: kv.lease(),
                },
            ))
        })
        .collect())
}
