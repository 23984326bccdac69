//! The journal's schema and its migrations. The version is SQLite's `PRAGMA user_version`;
//! migration `n` takes a database from version `n` to `n + 1`, in one transaction with the version
//! bump. A database whose version is newer than [`CURRENT`] was written by a newer channeld and
//! is refused: this one cannot know what the newer columns mean.

use rusqlite::{Connection, TransactionBehavior};

/// The schema version this build writes.
pub const CURRENT: u32 = 4;

/// Migration `i` takes version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the messages and the counters that survive pruning.
    "CREATE TABLE messages (
        seq          INTEGER PRIMARY KEY,
        channel      TEXT NOT NULL,
        account      TEXT NOT NULL,
        conversation TEXT NOT NULL,
        sender       TEXT NOT NULL,
        text         TEXT NOT NULL,
        message_id   TEXT,
        sent_ms      INTEGER NOT NULL,
        received_ms  INTEGER NOT NULL,
        extra        TEXT
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('high_water', 0), ('pruned_through', 0);",
    // 1 -> 2: the outbox (crate::outbox): messages to send, their state and idempotency keys.
    "CREATE TABLE outbox (
        id              INTEGER PRIMARY KEY,
        channel         TEXT NOT NULL,
        account         TEXT NOT NULL,
        conversation    TEXT NOT NULL,
        text            TEXT NOT NULL,
        reply_to        TEXT,
        extra           TEXT,
        idempotency_key TEXT,
        state           TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        created_ms      INTEGER NOT NULL,
        updated_ms      INTEGER NOT NULL,
        next_ms         INTEGER NOT NULL,
        message_id      TEXT,
        error           TEXT
    );
    CREATE UNIQUE INDEX outbox_key ON outbox (channel, account, idempotency_key)
        WHERE idempotency_key IS NOT NULL;
    CREATE INDEX outbox_open ON outbox (state, channel, account, conversation, id);",
    // 2 -> 3: the sender keeps every conversation's unfinished messages in memory and reads
    // them once, at startup; the wide index it scanned on every pass (rewritten at every state
    // change) gives way to a narrow one on the unfinished messages' ids.
    "DROP INDEX outbox_open;
    CREATE INDEX outbox_unfinished ON outbox (id) WHERE state IN ('queued', 'sending');",
    // 3 -> 4: the gateways' bridging mark (crate::outbox::gateway): every journal message up to
    // it has been routed through the gateways. An upgraded database starts at its high-water
    // mark: what an older channeld journaled was bridged (or not) by it.
    "INSERT INTO meta (key, value) SELECT 'bridged_through', value FROM meta WHERE key = 'high_water';",
];

/// The meta key of the highest sequence number ever committed.
pub const HIGH_WATER: &str = "high_water";
/// The meta key of the highest sequence number ever pruned.
pub const PRUNED_THROUGH: &str = "pruned_through";

/// The meta key of the highest sequence number up to which every journal message has been
/// routed through the gateways (their copies are in the outbox).
pub const BRIDGED_THROUGH: &str = "bridged_through";

/// What [`migrate`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Migrated {
    /// The database was empty (version 0): it is new.
    Created,
    /// It had an older version, now [`CURRENT`].
    Upgraded(u32),
    /// Already current.
    Current,
}

/// Why the schema could not be brought to [`CURRENT`].
#[derive(Debug)]
pub enum SchemaError {
    /// The database is newer than this build.
    Newer(u32),
    /// SQLite said no.
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for SchemaError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Sqlite(e)
    }
}

/// The database's schema version.
pub fn version(conn: &Connection) -> rusqlite::Result<u32> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// Runs the migrations from the database's version up to [`CURRENT`].
pub fn migrate(conn: &mut Connection) -> Result<Migrated, SchemaError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found = version(&tx)?;
    if found > CURRENT {
        return Err(SchemaError::Newer(found));
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", from as u32 + 1)?;
    }
    tx.commit()?;
    Ok(match found {
        0 => Migrated::Created,
        CURRENT => Migrated::Current,
        older => Migrated::Upgraded(older),
    })
}

/// A meta counter.
pub fn meta(conn: &Connection, key: &str) -> rusqlite::Result<u64> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| {
        r.get::<_, i64>(0)
    })
    .map(|v| v as u64)
}

/// Sets a meta counter.
pub fn set_meta(conn: &Connection, key: &str, value: u64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE meta SET value = ?2 WHERE key = ?1")?
        .execute(rusqlite::params![key, value as i64])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_database_is_created_at_the_current_version_and_stays_there() {
        let mut conn = Connection::open_in_memory().unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), Migrated::Created);
        assert_eq!(version(&conn).unwrap(), CURRENT);
        assert_eq!(migrate(&mut conn).unwrap(), Migrated::Current);
        assert_eq!(meta(&conn, HIGH_WATER).unwrap(), 0);
        assert_eq!(meta(&conn, BRIDGED_THROUGH).unwrap(), 0);
    }

    #[test]
    fn a_version_3_database_gets_a_bridging_mark_at_its_high_water_mark() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        set_meta(&conn, HIGH_WATER, 41).unwrap();
        assert_eq!(migrate(&mut conn).unwrap(), Migrated::Upgraded(3));
        assert_eq!(version(&conn).unwrap(), 4);
        // What the older channeld journaled is not bridged again.
        assert_eq!(meta(&conn, BRIDGED_THROUGH).unwrap(), 41);
        assert_eq!(meta(&conn, HIGH_WATER).unwrap(), 41);
        set_meta(&conn, BRIDGED_THROUGH, 42).unwrap();
        assert_eq!(meta(&conn, BRIDGED_THROUGH).unwrap(), 42);
    }

    #[test]
    fn a_version_2_outbox_is_upgraded_with_its_messages_and_the_narrow_index() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        for (id, state) in [(1, "sent"), (2, "sending"), (3, "queued")] {
            conn.execute(
                "INSERT INTO outbox (id, channel, account, conversation, text, state, \
                 created_ms, updated_ms, next_ms) VALUES (?1, 'c', 'a', 'x', 't', ?2, 0, 0, 0)",
                rusqlite::params![id, state],
            )
            .unwrap();
        }
        assert_eq!(migrate(&mut conn).unwrap(), Migrated::Upgraded(2));
        assert_eq!(version(&conn).unwrap(), CURRENT);
        let indexes: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'outbox'")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert!(
            indexes.contains(&"outbox_unfinished".to_owned()),
            "{indexes:?}"
        );
        assert!(!indexes.contains(&"outbox_open".to_owned()), "{indexes:?}");
        // The unfinished messages are found through the new index.
        let plan: String = conn
            .query_row(
                "EXPLAIN QUERY PLAN SELECT id FROM outbox \
                 WHERE state IN ('queued', 'sending') ORDER BY id",
                [],
                |r| r.get(3),
            )
            .unwrap();
        assert!(plan.contains("outbox_unfinished"), "{plan}");
        let open: Vec<i64> = conn
            .prepare("SELECT id FROM outbox WHERE state IN ('queued', 'sending') ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(open, [2, 3]);
    }

    #[test]
    fn a_newer_database_is_refused_untouched() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", CURRENT + 1)
            .unwrap();
        assert!(matches!(migrate(&mut conn), Err(SchemaError::Newer(v)) if v == CURRENT + 1));
        assert_eq!(version(&conn).unwrap(), CURRENT + 1);
    }
}
