//! The unfinished messages of every conversation, kept in memory so the sender finds whose turn
//! it is without scanning the outbox table.
//!
//! The database stays the truth: [`Heads::load`] rebuilds this from the `queued` and `sending`
//! rows (at startup, and after a pass whose transaction failed), and every change the outbox
//! commits (an accepted message, a cancel, a send's final outcome, a message failed by the
//! sender) is applied here by the holder of the connection's lock, right after it is written.
//! A conversation's head is its oldest unfinished message: the only one the sender may hand
//! over. Per account, the count of unfinished messages serves the `max_queued_per_account` cap,
//! and their total the `max_queued` one.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Arc,
};

use rusqlite::Connection;

use crate::host::AccountKey;

/// Where a message goes: channel, account and conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Conversation {
    /// Its channel and account.
    pub key: AccountKey,
    /// The conversation.
    pub conversation: String,
}

/// An unfinished message, as the sender needs it to decide whether it may go now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Open {
    /// The outbox's id.
    pub id: u64,
    /// Accepted, ms since the epoch (the deadline counts from it).
    pub created_ms: i64,
    /// Not to be tried before this (a retry's backoff), ms since the epoch.
    pub next_ms: i64,
    /// Durably `sending`: handed to its plugin, or next in its conversation and marked ahead so
    /// it can be handed over as soon as the one before it is sent.
    pub sending: bool,
}

/// The unfinished (`queued` or `sending`) messages of every conversation, oldest first.
#[derive(Debug, Default)]
pub(super) struct Heads {
    /// Each conversation's unfinished messages in id order (never empty).
    queues: HashMap<Arc<Conversation>, VecDeque<Open>>,
    /// Each unfinished message's conversation.
    by_id: HashMap<u64, Arc<Conversation>>,
    /// The conversations by the id of their head, oldest head first.
    fronts: BTreeMap<u64, Arc<Conversation>>,
    /// Unfinished messages per account.
    per_account: HashMap<AccountKey, u64>,
}

impl Heads {
    /// Reads every unfinished message from the outbox table.
    pub fn load(conn: &Connection) -> rusqlite::Result<Self> {
        let mut heads = Self::default();
        let mut statement = conn.prepare(
            "SELECT id, channel, account, conversation, created_ms, next_ms, \
             state = 'sending' FROM outbox \
             WHERE state IN ('queued', 'sending') ORDER BY id",
        )?;
        let mut rows = statement.query([])?;
        while let Some(r) = rows.next()? {
            let conversation = Conversation {
                key: AccountKey::new(r.get::<_, String>(1)?, r.get::<_, String>(2)?),
                conversation: r.get(3)?,
            };
            heads.push(
                conversation,
                Open {
                    id: r.get::<_, i64>(0)? as u64,
                    created_ms: r.get(4)?,
                    next_ms: r.get(5)?,
                    sending: r.get(6)?,
                },
            );
        }
        Ok(heads)
    }

    /// Adds a message just committed as `queued`. Ids grow, so it goes last in its
    /// conversation.
    pub fn push(&mut self, conversation: Conversation, open: Open) {
        *self
            .per_account
            .entry(conversation.key.clone())
            .or_default() += 1;
        let conversation = match self.queues.get_key_value(&conversation) {
            Some((shared, _)) => shared.clone(),
            None => Arc::new(conversation),
        };
        self.by_id.insert(open.id, conversation.clone());
        let queue = self.queues.entry(conversation.clone()).or_default();
        debug_assert!(queue.back().is_none_or(|last| last.id < open.id));
        if queue.is_empty() {
            self.fronts.insert(open.id, conversation);
        }
        queue.push_back(open);
    }

    /// Forgets a message that is finished (sent, failed or cancelled). Returns whether it was
    /// unfinished here.
    pub fn remove(&mut self, id: u64) -> bool {
        let Some(conversation) = self.by_id.remove(&id) else {
            return false;
        };
        if let Some(n) = self.per_account.get_mut(&conversation.key) {
            *n -= 1;
            if *n == 0 {
                self.per_account.remove(&conversation.key);
            }
        }
        let Some(queue) = self.queues.get_mut(&conversation) else {
            return true;
        };
        let Ok(at) = queue.binary_search_by_key(&id, |o| o.id) else {
            return true;
        };
        queue.remove(at);
        if at == 0 {
            self.fronts.remove(&id);
            match queue.front() {
                Some(next) => {
                    self.fronts.insert(next.id, conversation);
                }
                None => {
                    self.queues.remove(&conversation);
                }
            }
        }
        true
    }

    fn open_mut(&mut self, id: u64) -> Option<&mut Open> {
        let queue = self.by_id.get(&id).and_then(|c| self.queues.get_mut(c))?;
        let at = queue.binary_search_by_key(&id, |o| o.id).ok()?;
        queue.get_mut(at)
    }

    /// A failed attempt: the message is `queued` again, to be tried at `next_ms`.
    pub fn retry_at(&mut self, id: u64, next_ms: i64) {
        if let Some(open) = self.open_mut(id) {
            open.next_ms = next_ms;
            open.sending = false;
        }
    }

    /// Records that a message is durably `sending` (or `queued` again).
    pub fn set_sending(&mut self, id: u64, sending: bool) {
        if let Some(open) = self.open_mut(id) {
            open.sending = sending;
        }
    }

    /// The message right behind the head of `conversation`.
    pub fn second(&self, conversation: &Conversation) -> Option<Open> {
        self.queues
            .get(conversation)
            .and_then(|q| q.get(1))
            .copied()
    }

    /// The conversation of an unfinished message.
    pub fn conversation_of(&self, id: u64) -> Option<&Arc<Conversation>> {
        self.by_id.get(&id)
    }

    /// Every conversation's head, oldest first.
    pub fn fronts(&self) -> impl Iterator<Item = (u64, &Arc<Conversation>)> {
        self.fronts.iter().map(|(id, c)| (*id, c))
    }

    /// A conversation's head.
    pub fn front(&self, conversation: &Conversation) -> Option<Open> {
        self.queues
            .get(conversation)
            .and_then(|q| q.front())
            .copied()
    }

    /// Unfinished messages of `key`.
    pub fn waiting(&self, key: &AccountKey) -> u64 {
        self.per_account.get(key).copied().unwrap_or(0)
    }

    /// Unfinished messages in all.
    pub fn total(&self) -> u64 {
        self.by_id.len() as u64
    }

    /// The ids of every conversation's unfinished messages, oldest first, conversations in
    /// order: what [`Heads::load`] would read, for comparing the two.
    #[cfg(test)]
    pub fn listing(&self) -> Vec<(Conversation, Vec<Open>)> {
        let mut listing: Vec<_> = self
            .queues
            .iter()
            .map(|(c, q)| ((**c).clone(), q.iter().copied().collect()))
            .collect();
        listing.sort_by(|a, b| a.0.cmp(&b.0));
        listing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(account: &str, conversation: &str) -> Conversation {
        Conversation {
            key: AccountKey::new("fixture", account),
            conversation: conversation.to_owned(),
        }
    }

    fn open(id: u64) -> Open {
        Open {
            id,
            created_ms: 0,
            next_ms: 0,
            sending: false,
        }
    }

    #[test]
    fn a_conversations_head_is_its_oldest_unfinished_message() {
        let mut heads = Heads::default();
        for (id, account, conversation) in [(1, "a", "x"), (2, "a", "y"), (3, "a", "x")] {
            heads.push(to(account, conversation), open(id));
        }
        heads.push(to("b", "x"), open(4));
        let fronts: Vec<u64> = heads.fronts().map(|(id, _)| id).collect();
        assert_eq!(fronts, [1, 2, 4]);
        assert_eq!(heads.waiting(&AccountKey::new("fixture", "a")), 3);
        assert_eq!(heads.total(), 4);
        // A message behind the head leaves: the head stays.
        assert!(heads.remove(3));
        assert_eq!(heads.front(&to("a", "x")).map(|o| o.id), Some(1));
        heads.push(to("a", "x"), open(5));
        // The head leaves: the next one is the head.
        assert!(heads.remove(1));
        let fronts: Vec<u64> = heads.fronts().map(|(id, _)| id).collect();
        assert_eq!(fronts, [2, 4, 5]);
        assert!(!heads.remove(1));
        assert_eq!(heads.second(&to("a", "x")), None);
        heads.set_sending(5, true);
        assert!(heads.front(&to("a", "x")).is_some_and(|o| o.sending));
        heads.retry_at(5, 99);
        assert_eq!(
            heads.front(&to("a", "x")).map(|o| (o.next_ms, o.sending)),
            Some((99, false))
        );
        for id in [2, 4, 5] {
            assert!(heads.remove(id));
        }
        assert_eq!(heads.total(), 0);
        assert_eq!(heads.fronts().count(), 0);
        assert_eq!(heads.waiting(&AccountKey::new("fixture", "a")), 0);
        assert!(heads.listing().is_empty());
    }
}
