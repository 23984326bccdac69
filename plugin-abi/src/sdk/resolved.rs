//! The channel's config as the host last configured it, and the accounts resolved from it.
//!
//! The host asks about one account several times while it boots it (`describe_account` when it
//! registers it, then `is_enabled`, `is_configured` and `start_accounts`), and the author's
//! [`resolve_account`](super::ChannelPlugin::resolve_account) would run for each. The SDK keeps
//! each resolved [`Account`] instead, shared (an `Arc`), next to the config it was resolved
//! from: `configure` installs a new config with an empty set of resolved accounts, so an account
//! resolved from an older config is never handed out again. A resolve that fails (or panics) is
//! not kept: the next call runs the author's hook again.
//!
//! The questions of one boot come one after the other on one thread, so each thread also keeps
//! the few accounts it resolved last for a boot ([`RECENT`]): a boot's later questions find their
//! account there by comparing its id, without hashing it or taking a lock. What a thread keeps is
//! dropped at its next such resolve once a new config is installed. Other questions (a stop, a
//! description) come once per account and go to the kept accounts directly.

use std::{
    cell::RefCell,
    collections::HashMap,
    hash::BuildHasher,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use compact_str::CompactString;
use foldhash::fast::RandomState;

use super::{Account, ChannelConfig};

/// Shards of the resolved accounts, so the host's boot threads rarely wait for one another.
const SHARDS: usize = 16;

/// One installed config and the accounts resolved from it so far.
///
/// Account ids are hashed with a fast seeded hasher (foldhash), not the standard library's
/// SipHash: ids come from the operator's config, not from the network, and a lookup here is on
/// every boot and every stop (two SipHashes of an id were 4 % of a stop's instructions). The ids
/// are kept in place up to 24 bytes (`CompactString`), so comparing one reads no other memory.
pub(crate) struct Configured {
    config: Arc<ChannelConfig>,
    /// Picks an id's shard (seeded apart from the shards' own hashers).
    hasher: RandomState,
    resolved: [Mutex<HashMap<CompactString, Arc<Account>, RandomState>>; SHARDS],
}

impl Configured {
    fn new(config: ChannelConfig) -> Self {
        Self {
            config: Arc::new(config),
            hasher: RandomState::default(),
            resolved: std::array::from_fn(|_| {
                Mutex::new(HashMap::with_hasher(RandomState::default()))
            }),
        }
    }

    /// The config.
    pub(crate) fn config(&self) -> &Arc<ChannelConfig> {
        &self.config
    }

    fn shard(&self, id: &str) -> &Mutex<HashMap<CompactString, Arc<Account>, RandomState>> {
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
            .entry(CompactString::from(id))
            .or_insert(account)
            .clone())
    }
}

/// Where the current [`Configured`] lives (one per library: [`CURRENT`]).
pub(crate) struct Current {
    configured: RwLock<Option<Arc<Configured>>>,
    /// Counts the installs: a thread's [`Recent`] accounts are of the install they name.
    installs: AtomicU64,
}

/// The library's current config.
pub(crate) static CURRENT: Current = Current::new();

/// How many accounts a thread keeps of those it resolved last.
const RECENT: usize = 4;

/// The accounts a thread resolved last, of one [`Current`] and one install of it.
struct Recent {
    /// The [`Current`] (its address) and the install the accounts were resolved from.
    of: (usize, u64),
    accounts: [Option<Arc<Account>>; RECENT],
    /// The slot the next account takes.
    next: usize,
}

thread_local! {
    static RECENT_ACCOUNTS: RefCell<Recent> = const {
        RefCell::new(Recent {
            of: (0, 0),
            accounts: [const { None }; RECENT],
            next: 0,
        })
    };
}

impl Recent {
    /// The account `id`, looked for from the one kept last (a boot's later questions are about
    /// it: one comparison, not one per slot).
    fn get(&self, of: (usize, u64), id: &str) -> Option<Arc<Account>> {
        if self.of != of {
            return None;
        }
        (1..=RECENT)
            .filter_map(|back| self.accounts[(self.next + RECENT - back) % RECENT].as_ref())
            .find(|a| a.id == id)
            .cloned()
    }

    fn keep(&mut self, of: (usize, u64), account: &Arc<Account>) {
        if self.of != of {
            *self = Recent {
                of,
                accounts: Default::default(),
                next: 0,
            };
        }
        self.accounts[self.next] = Some(account.clone());
        self.next = (self.next + 1) % RECENT;
    }
}

impl Current {
    const fn new() -> Self {
        Self {
            configured: RwLock::new(None),
            installs: AtomicU64::new(0),
        }
    }

    /// Installs `config`, with no account resolved from it yet.
    pub(crate) fn install(&self, config: ChannelConfig) {
        let mut configured = self.configured.write().unwrap_or_else(|p| p.into_inner());
        *configured = Some(Arc::new(Configured::new(config)));
        // Under the lock, after the config: a thread that reads this count finds this config.
        self.installs.fetch_add(1, Ordering::Release);
    }

    /// [`resolve`](Self::resolve) for a boot's questions, which come one after the other on one
    /// thread: one of the accounts this thread resolved last for a boot, else `resolve`'s (then
    /// kept among those).
    pub(crate) fn resolve_for_boot<E>(
        &self,
        id: &str,
        unconfigured: impl FnOnce() -> ChannelConfig,
        resolve: impl FnOnce(&ChannelConfig, &str) -> Result<Account, E>,
    ) -> Result<Arc<Account>, E> {
        let of = (
            std::ptr::from_ref(self) as usize,
            self.installs.load(Ordering::Acquire),
        );
        let recent = RECENT_ACCOUNTS.with_borrow(|recent| recent.get(of, id));
        if let Some(account) = recent {
            return Ok(account);
        }
        let account = self.resolve(id, unconfigured, resolve)?;
        // Kept only under the id it was asked by (an author's resolve may name it otherwise).
        if account.id == id {
            RECENT_ACCOUNTS.with_borrow_mut(|recent| recent.keep(of, &account));
        }
        Ok(account)
    }

    /// The account `id` resolved from the current config (see [`Configured::resolve`]): one kept
    /// already (found under the read lock, without taking a count on the config), else the
    /// author's.
    pub(crate) fn resolve<E>(
        &self,
        id: &str,
        unconfigured: impl FnOnce() -> ChannelConfig,
        resolve: impl FnOnce(&ChannelConfig, &str) -> Result<Account, E>,
    ) -> Result<Arc<Account>, E> {
        if let Some(current) = &*self.configured.read().unwrap_or_else(|p| p.into_inner())
            && let Some(account) = current.kept(id)
        {
            return Ok(account);
        }
        self.get(unconfigured).resolve(id, resolve)
    }

    /// The current config; before any `configure`, `unconfigured()`'s (kept until one).
    pub(crate) fn get(&self, unconfigured: impl FnOnce() -> ChannelConfig) -> Arc<Configured> {
        if let Some(current) = &*self.configured.read().unwrap_or_else(|p| p.into_inner()) {
            return current.clone();
        }
        self.configured
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
        let current = Current::new();
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

    /// A thread finds the accounts it resolved last for a boot without the kept ones (here
    /// forgotten behind its back); another thread does not, and neither does this one for an
    /// account it has not resolved lately, nor a resolve that is not for a boot.
    #[test]
    fn a_thread_finds_the_accounts_it_resolved_last_by_itself() {
        let current = Current::new();
        current.install(config("one"));
        let calls = AtomicUsize::new(0);
        let first = current
            .resolve_for_boot("a", ChannelConfig::default, counting(&calls))
            .unwrap();
        let forget = || {
            let configured = current.get(|| unreachable!());
            for shard in &configured.resolved {
                shard.lock().unwrap().clear();
            }
        };
        forget();
        let again = current
            .resolve_for_boot("a", ChannelConfig::default, counting(&calls))
            .unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(calls.load(Ordering::Relaxed), 1);
        std::thread::scope(|s| {
            s.spawn(|| {
                current
                    .resolve_for_boot("a", ChannelConfig::default, counting(&calls))
                    .unwrap();
            });
        });
        assert_eq!(calls.load(Ordering::Relaxed), 2);
        // Four other accounts push it out of this thread's recent ones.
        for id in ["b", "c", "d", "e"] {
            current
                .resolve_for_boot(id, ChannelConfig::default, counting(&calls))
                .unwrap();
        }
        forget();
        // Each of the four is found, whichever slot it is in.
        for id in ["e", "b", "d", "c"] {
            let found = current
                .resolve_for_boot(id, ChannelConfig::default, counting(&calls))
                .unwrap();
            assert_eq!(found.id, id);
        }
        assert_eq!(calls.load(Ordering::Relaxed), 6);
        current
            .resolve_for_boot("a", ChannelConfig::default, counting(&calls))
            .unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 7);
        // A resolve that is not for a boot goes to the kept accounts (forgotten here).
        forget();
        current
            .resolve("a", ChannelConfig::default, counting(&calls))
            .unwrap();
        assert_eq!(calls.load(Ordering::Relaxed), 8);
        // A new config: what this thread resolved from the old one is not handed out.
        current.install(config("two"));
        let after = current.resolve_for_boot("a", ChannelConfig::default, counting(&calls));
        assert_eq!(token(&after.unwrap()), "two");
        assert_eq!(calls.load(Ordering::Relaxed), 9);
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
        let current = Current::new();
        let empty = current.get(ChannelConfig::default);
        assert!(Arc::ptr_eq(&empty, &current.get(|| unreachable!())));
        current.install(config("one"));
        assert!(!Arc::ptr_eq(&empty, &current.get(|| unreachable!())));
    }
}
