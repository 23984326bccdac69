//! A channel's account ids: in the order the plugin listed them (start-all boots them in that
//! order), each once, with an index that answers "is this one of them?" without a scan. The API's
//! single-account status read, a single account's operations and every outbound message ask it;
//! a config reload of a channel builds its list from the plugin's again. With a plain list, each
//! question read every id of the channel (at 10,000 accounts, tens of microseconds per status
//! read), and a reload's de-duplication compared every id with every other (a third of a second
//! at 10,000 accounts, 3.3 s at 40,000).
//!
//! The index holds positions in the list, not copies of the ids: it costs a few bytes per
//! account.

use std::{hash::BuildHasher, ops::Deref};

use hashbrown::{DefaultHashBuilder, HashTable};

/// A channel's account ids (normalised), in the plugin's order, each once.
#[derive(Clone, Default)]
pub struct AccountIds {
    ids: Vec<String>,
    /// Positions in `ids`, found by the id's hash.
    index: HashTable<u32>,
    hasher: DefaultHashBuilder,
}

impl AccountIds {
    /// The ids of `listed`, in its order; a later copy of an id already in the list is left out.
    pub fn new(listed: impl IntoIterator<Item = String>) -> Self {
        let listed = listed.into_iter();
        let mut ids = Self {
            ids: Vec::with_capacity(listed.size_hint().0),
            index: HashTable::with_capacity(listed.size_hint().0),
            hasher: DefaultHashBuilder::default(),
        };
        for id in listed {
            // A repeat is left out.
            let _ = ids.push(id);
        }
        ids
    }

    /// Appends `id`; if the list has it already, leaves the list as it is and says where the
    /// earlier one is.
    pub(super) fn push(&mut self, id: String) -> Result<(), usize> {
        let Self { ids, index, hasher } = self;
        let hash = hasher.hash_one(id.as_str());
        if let Some(&at) = index.find(hash, |&at| ids[at as usize] == id) {
            return Err(at as usize);
        }
        let at = u32::try_from(ids.len()).expect("fewer than 2^32 accounts in a channel");
        index.insert_unique(hash, at, |&at| hasher.hash_one(ids[at as usize].as_str()));
        ids.push(id);
        Ok(())
    }

    /// Whether `id` (normalised) is one of the channel's accounts.
    pub fn contains(&self, id: &str) -> bool {
        let hash = self.hasher.hash_one(id);
        self.index
            .find(hash, |&at| self.ids[at as usize] == id)
            .is_some()
    }
}

impl Deref for AccountIds {
    type Target = [String];

    fn deref(&self) -> &[String] {
        &self.ids
    }
}

impl<'a> IntoIterator for &'a AccountIds {
    type Item = &'a String;
    type IntoIter = std::slice::Iter<'a, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.ids.iter()
    }
}

impl std::fmt::Debug for AccountIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.ids).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::AccountIds;

    fn ids(listed: &[&str]) -> AccountIds {
        AccountIds::new(listed.iter().map(|s| (*s).to_owned()))
    }

    /// The list keeps the plugin's order, drops a later copy of an id, and answers membership
    /// for every id it holds and for none it does not.
    #[test]
    fn keeps_the_order_drops_repeats_and_knows_its_members() {
        let listed = ids(&["b", "a", "c", "a", "b", "d"]);
        assert_eq!(&*listed, ["b", "a", "c", "d"]);
        for id in ["a", "b", "c", "d"] {
            assert!(listed.contains(id), "{id} is listed");
        }
        for id in ["", "e", "ab", "A"] {
            assert!(!listed.contains(id), "{id:?} is not listed");
        }
        assert!(!ids(&[]).contains("a"));
        // Pushed one by one, a repeat names where the earlier one is.
        let mut pushed = AccountIds::default();
        assert_eq!(pushed.push("x".into()), Ok(()));
        assert_eq!(pushed.push("y".into()), Ok(()));
        assert_eq!(pushed.push("y".into()), Err(1));
        assert_eq!(pushed.push("x".into()), Err(0));
        assert_eq!(&*pushed, ["x", "y"]);
    }

    /// Many ids (enough for the index to grow several times) are all found, in order.
    #[test]
    fn many_ids_are_all_found_in_their_order() {
        let listed = AccountIds::new((0..5_000).rev().map(|i| format!("acct-{i}")));
        assert_eq!(listed.len(), 5_000);
        assert_eq!(listed.first().map(String::as_str), Some("acct-4999"));
        assert!((0..5_000).all(|i| listed.contains(&format!("acct-{i}"))));
        assert!(!listed.contains("acct-5000"));
        let copy = listed.clone();
        assert!(copy.contains("acct-0") && copy.len() == 5_000);
    }
}
