//! The channel's config as the host last configured it, and the accounts resolved from it.
//!
//! The host asks about one account several times while it boots it (`describe_account` when it
//! registers it, then `is_enabled`, `is_configured` and `start_accounts`), and the author's
//! [`resolve_account`](super::ChannelPlugin::resolve_account) would run for each. The SDK keeps
//! each resolved [`Account`] instead, shared (an `Arc`), next to the config it was resolved
//! from: `configure` installs a new config with an empty set of resolved accounts, so an account
//! resolved from an older config is never handed out again. A resolve that fails (or panics) is
//! not kept: the next call runs the author's hook again.

use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::{Arc, Mutex, RwLock},
};

use super::{Account, ChannelConfig};

/// Shards of the resolved accounts, so the host's boot threads rarely wait for one another.
const SHARDS: usize = 16;

/// One installed config and the accounts resolved from it so far.
pub(crate) struct Configured {
    config: Arc<ChannelConfig>,
    hasher: RandomState,
    resolved: [Mutex<HashMap<String, Arc<Account>>>; SHARDS],
}

impl Configured {
    fn new(config: ChannelConfig) -> Self {
        Self {
            config: Arc::new(config),
            hasher: RandomState::new(),
            resolved: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    /// The config.
    pub(crate) fn config(&self) -> &Arc<ChannelConfig> {
        &self.config
    }

    fn shard(&self, id: &str) -> &Mutex<HashMap<String, Arc<Account>>> {
        &self.resolved[(self.hasher.hash_one(id) % SHARDS as u64) as usize]
    }

    /// The account `id` if it was resolved from this config already.
    fn kept(&self, id: &str) -> Option<Arc<Account>> {
        let shard = self.shard(id).lock().unwrap_or_else(|p| p.into_inner());
        shard.get(id).cloned()
    }

    /// The account `id` resolved from this config: the one kept, else `resolve`'s (then kept).
    /// `resolve` runs without any lock held.
    pub(crate) fn resolve<E>(
        &self,
        id: &str,
        resolve: impl FnOnce(&ChannelConfig, &str) -> Result<Account, E>,
    ) -> Result<Arc<Account>, E> {
        if let Some(account) = self.kept(id) {
            return Ok(account);
        }
        let shard = self.shard(id);
        let account = Arc::new(resolve(&self.config, id)?);
        // Two callers that raced both resolved; the first one kept is the one every caller gets.
        Ok(shard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id.to_owned())
            .or_insert(account)
            .clone())
    }
}

/// Where the current [`Configured`] lives (one per library: [`CURRENT`]).
pub(crate) struct Current(RwLock<Option<Arc<Configured>>>);

/// The library's current config.
pub(crate) static CURRENT: Current = Current(RwLock::new(None));

impl Current {
    /// Installs `config`, with no account resolved from it yet.
    pub(crate) fn install(&self, config: ChannelConfig) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) =
            Some(Arc::new(Configured::new(config)));
    }

    /// The account `id` resolved from the current config (see [`Configured::resolve`]). One
    /// kept already is found under the read lock, without taking a count on the config.
    pub(crate) fn resolve<E>(
        &self,
        id: &str,
        unconfigured: impl FnOnce() -> ChannelConfig,
        resolve: impl FnOnce(&ChannelConfig, &str) -> Result<Account, E>,
    ) -> Result<Arc<Account>, E> {
        if let Some(current) = &*self.0.read().unwrap_or_else(|p| p.into_inner())
            && let Some(account) = current.kept(id)
        {
            return Ok(account);
        }
        self.get(unconfigured).resolve(id, resolve)
    }

    /// The current config; before any `configure`, `unconfigured()`'s (kept until one).
    pub(crate) fn get(&self, unconfigured: impl FnOnce() -> ChannelConfig) -> Arc<Configured> {
        if let Some(current) = &*self.0.read().unwrap_or_else(|p| p.into_inner()) {
            return current.clone();
        }
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| Arc::new(Configured::new(unconfigured())))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use serde_json::{Value, json};

    use super::*;

    fn config(token: &str) -> ChannelConfig {
        let table = json!({ "accounts": { "a": { "token": token } } });
        ChannelConfig::from_json("chat", &table.to_string()).unwrap()
    }

    /// A resolve that counts its calls.
    fn counting(
        calls: &AtomicUsize,
    ) -> impl Fn(&ChannelConfig, &str) -> Result<Account, String> + '_ {
        move |config, id| {
            calls.fetch_add(1, Ordering::Relaxed);
            Ok(config.account(id))
        }
    }

    fn token(account: &Account) -> &str {
        account.get("token").and_then(Value::as_str).unwrap()
    }

    #[test]
    fn an_account_is_resolved_once_per_config_and_anew_after_a_reconfigure() {
        let current = Current(RwLock::new(None));
        let calls = AtomicUsize::new(0);
        current.install(config("one"));
        let first = current.resolve("a", ChannelConfig::default, counting(&calls));
        let again = current.resolve("a", ChannelConfig::default, counting(&calls));
        let (first, again) = (first.unwrap(), again.unwrap());
        assert!(
            Arc::ptr_eq(&first, &again),
            "the second resolve was not kept"
        );
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        assert_eq!(token(&first), "one");

        // A new config: what was resolved from the old one is never handed out again.
        current.install(config("two"));
        let after = current.resolve("a", ChannelConfig::default, counting(&calls));
        assert_eq!(token(&after.unwrap()), "two");
        assert_eq!(calls.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_failed_resolve_is_not_kept() {
        let configured = Configured::new(config("one"));
        let failed: Result<_, String> = configured.resolve("a", |_, _| Err("no".to_owned()));
        assert!(failed.is_err());
        let calls = AtomicUsize::new(0);
        let resolved = configured.resolve("a", counting(&calls)).unwrap();
        assert_eq!(
            (token(&resolved), calls.load(Ordering::Relaxed)),
            ("one", 1)
        );
    }

    #[test]
    fn before_any_configure_the_unconfigured_table_is_kept_until_one() {
        let current = Current(RwLock::new(None));
        let empty = current.get(ChannelConfig::default);
        assert!(Arc::ptr_eq(&empty, &current.get(|| unreachable!())));
        current.install(config("one"));
        assert!(!Arc::ptr_eq(&empty, &current.get(|| unreachable!())));
    }
}
