//! Which registration serves each channel, and which channels were removed: facts the supervisor
//! asks for and never keeps.
//!
//! In the daemon the plugin catalog owns them (it loads, replaces and removes versions); the
//! supervisor reads them through [`Serving`] every time it needs one: to route a start, a revive
//! or a reconfigure to the current version, to list channels and to mark removed ones in the
//! snapshot. A running task keeps the [`Channel`] it started on (`AccountCtx::channel`): that is a
//! fact about the task, not a copy of the map, and it is how old tasks stop on the old version
//! while new starts go to the new one during a replace.
//!
//! Where no catalog exists (the supervisor's own tests, benches, tests that hand plugins over
//! directly), [`Table`] is the owner: a plain in-memory map the supervisor's `add_channel`,
//! `replace_channel` and `remove_channel` write. A supervisor has exactly one source: once a
//! catalog is installed ([`super::Supervisor::set_serving`]) the table is gone, and those three
//! calls are refused.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, MutexGuard},
};

use super::Channel;

/// Where the supervisor reads which registration serves each channel (see the module docs).
///
/// Implementations answer from their own state and never call into the supervisor: the
/// supervisor calls them without holding its own lock, and they must not block.
pub trait Serving: Send + Sync {
    /// The registration (version, config, accounts) serving `channel`, if one does.
    fn serving(&self, channel: &str) -> Option<Arc<Channel>>;
    /// Every channel served, by id.
    fn served(&self) -> Vec<Arc<Channel>>;
    /// Channels whose plugin was removed (and that no version serves), with the accounts they
    /// had, by id.
    fn removed(&self) -> Vec<(String, Vec<String>)>;
    /// A config reload made `channel` the registration of its channel (same version, new table
    /// and accounts): the owner records it if that version still serves the channel.
    fn reconfigured(&self, channel: Arc<Channel>);
    /// Channels whose last registration failed, with why, by id (start-all's summary lists
    /// those that no version serves).
    fn failed(&self) -> Vec<(String, String)>;
}

#[derive(Default)]
struct TableState {
    channels: BTreeMap<String, Arc<Channel>>,
    removed: BTreeMap<String, Vec<String>>,
    /// Channels whose last `add_channel` failed, with why.
    failed: BTreeMap<String, String>,
}

/// The owner of the channel map where no catalog exists (see the module docs).
#[derive(Default)]
pub struct Table {
    state: Mutex<TableState>,
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, TableState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `channel` serves its channel from now on (added, or a new version).
    pub(super) fn insert(&self, channel: Arc<Channel>) {
        let mut state = self.lock();
        state.removed.remove(&channel.id);
        state.failed.remove(&channel.id);
        state.channels.insert(channel.id.clone(), channel);
    }

    /// Registering the channel `id` failed with `why`.
    pub(super) fn fail(&self, id: &str, why: String) {
        self.lock().failed.insert(id.to_owned(), why);
    }

    /// The channel `id` is gone, its accounts kept as removed.
    pub(super) fn remove(&self, id: &str) {
        let mut state = self.lock();
        if let Some(channel) = state.channels.remove(id) {
            state
                .removed
                .insert(id.to_owned(), channel.accounts.to_vec());
        }
    }
}

impl Serving for Table {
    fn serving(&self, channel: &str) -> Option<Arc<Channel>> {
        self.lock().channels.get(channel).cloned()
    }

    fn served(&self) -> Vec<Arc<Channel>> {
        self.lock().channels.values().cloned().collect()
    }

    fn removed(&self) -> Vec<(String, Vec<String>)> {
        self.lock()
            .removed
            .iter()
            .map(|(id, accounts)| (id.clone(), accounts.clone()))
            .collect()
    }

    fn reconfigured(&self, channel: Arc<Channel>) {
        let mut state = self.lock();
        if let Some(current) = state.channels.get_mut(&channel.id)
            && Arc::ptr_eq(&current.plugin, &channel.plugin)
        {
            *current = channel;
        }
    }

    fn failed(&self) -> Vec<(String, String)> {
        self.lock()
            .failed
            .iter()
            .map(|(id, why)| (id.clone(), why.clone()))
            .collect()
    }
}

/// The supervisor's one source: its own table, or the catalog's answers.
pub(super) enum Source {
    /// No catalog: the supervisor's table owns the map.
    Own(Arc<Table>),
    /// The catalog (or another owner) answers.
    From(Arc<dyn Serving>),
}

impl Source {
    pub(super) fn get(&self) -> Arc<dyn Serving> {
        match self {
            Source::Own(table) => table.clone(),
            Source::From(serving) => serving.clone(),
        }
    }
}
