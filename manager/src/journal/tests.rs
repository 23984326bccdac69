//! The journal against a real SQLite file: group commit and order, sequence numbers across
//! pruning and recreation, size retention, reads with filters, and WAL checkpoints with a slow
//! reader.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use super::*;
use futures_executor::block_on;

fn settings() -> JournalConfig {
    JournalConfig {
        sync: SyncMode::Normal,
        ..JournalConfig::default()
    }
}

fn record(account: &str, conversation: &str, text: &str) -> Record {
    Record {
        channel: "c".into(),
        account: account.into(),
        conversation: conversation.into(),
        sender: "s".into(),
        text: text.into(),
        message_id: None,
        sent_ms: 1,
        received_ms: now_ms(),
        extra: None,
    }
}

fn append(journal: &Journal, account: &str, text: &str) -> Result<u64, Refusal> {
    block_on(journal.append(record(account, "room", text)))
}

fn all(journal: &Journal) -> Batch {
    journal
        .read_after(0, journal.last_seq(), &Filter::default(), usize::MAX >> 1)
        .unwrap()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn concurrent_deliveries_share_commits_and_keep_each_handles_call_order() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), settings()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let journal = journal.clone();
            std::thread::spawn(move || {
                // Each thread keeps 16 deliveries in flight, like a pipelined async caller.
                let mut seqs = Vec::new();
                for chunk in 0..25 {
                    let pending: Vec<_> = (0..16)
                        .map(|i| {
                            journal.append(record(
                                &format!("a{t}"),
                                "room",
                                &format!("{}", chunk * 16 + i),
                            ))
                        })
                        .collect();
                    for p in pending {
                        seqs.push(block_on(p).unwrap());
                    }
                }
                seqs
            })
        })
        .collect();
    let mut every = Vec::new();
    for thread in threads {
        let seqs = thread.join().unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "call order on one handle"
        );
        every.extend(seqs);
    }
    every.sort_unstable();
    every.dedup();
    assert_eq!(every, (1..=3200).collect::<Vec<u64>>(), "unique, no gaps");
    let stats = journal.stats();
    assert!(
        stats["commits"].as_u64().unwrap() < 3200,
        "group commit: {stats}"
    );
    let batch = all(&journal);
    for t in 0..8 {
        let texts: Vec<u64> = batch
            .messages
            .iter()
            .filter(|m| m.account == format!("a{t}"))
            .map(|m| m.text.parse().unwrap())
            .collect();
        assert_eq!(
            texts,
            (0..400).collect::<Vec<u64>>(),
            "journal order is call order"
        );
    }
}

#[test]
fn seqs_are_never_reused_after_pruning_to_empty_reopening_or_recreating() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(
        dir.path(),
        JournalConfig {
            retain: Duration::from_millis(1),
            ..settings()
        },
    )
    .unwrap();
    for i in 1..=3 {
        assert_eq!(append(&journal, "a", "m").unwrap(), i);
    }
    wait_until("pruned to empty", || journal.stats()["messages"] == 0);
    assert_eq!(append(&journal, "a", "m").unwrap(), 4);
    drop(journal);
    let journal = Journal::open(dir.path(), settings()).unwrap();
    assert_eq!(append(&journal, "a", "m").unwrap(), 5);
    drop(journal);
    for file in [DB_FILE, "journal.db-wal", "journal.db-shm"] {
        let _ = std::fs::remove_file(dir.path().join(file));
    }
    let journal = Journal::open(dir.path(), settings()).unwrap();
    let next = append(&journal, "a", "m").unwrap();
    assert!(next > 5, "{next} was handed out before");
    let batch = journal.read_after(0, next, &Filter::default(), 10).unwrap();
    assert_eq!(
        batch.pruned,
        Some((1, next - 1)),
        "the lost numbers are reported as gone"
    );
}

#[test]
fn size_retention_prunes_the_oldest_and_a_message_that_cannot_fit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(
        dir.path(),
        JournalConfig {
            max_size: bytesize::ByteSize::kib(256),
            ..settings()
        },
    )
    .unwrap();
    let text = "x".repeat(500);
    for _ in 0..2000 {
        append(&journal, "a", &text).unwrap();
    }
    let stats = journal.stats();
    assert!(
        stats["usedBytes"].as_u64().unwrap() <= 256 * 1024,
        "{stats}"
    );
    let batch = all(&journal);
    let (from, to) = batch.pruned.expect("the oldest were pruned");
    assert_eq!(from, 1);
    assert_eq!(
        batch.messages.first().unwrap().seq,
        to + 1,
        "oldest first, no hole"
    );
    assert_eq!(batch.messages.last().unwrap().seq, 2000);

    let tiny = tempfile::tempdir().unwrap();
    let journal = Journal::open(
        tiny.path(),
        JournalConfig {
            max_size: bytesize::ByteSize::kib(4),
            ..settings()
        },
    )
    .unwrap();
    let refused = append(&journal, "a", "m").unwrap_err();
    assert!(matches!(refused, Refusal::Full(_)), "{refused}");
    assert_eq!(journal.stats()["refusedFull"], 1);
}

#[test]
fn oversize_and_malformed_extra_are_refused_before_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(
        dir.path(),
        JournalConfig {
            max_message_bytes: 10,
            ..settings()
        },
    )
    .unwrap();
    let refused = append(&journal, "a", "eleven byte").unwrap_err();
    assert_eq!(
        refused.to_string(),
        "message of 16 bytes is over the journal's max_message_bytes (10); refused"
    );
    let mut bad = record("a", "r", "x");
    bad.extra = Some("[1]".into());
    assert!(matches!(
        block_on(journal.append(bad)),
        Err(Refusal::BadExtra(_))
    ));
    assert_eq!(journal.stats()["refusedTooLarge"], 1);
    assert_eq!(journal.last_seq(), 0);
}

#[test]
fn a_filtered_read_moves_the_cursor_past_what_it_did_not_match() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), settings()).unwrap();
    for i in 0..100 {
        let account = if i == 50 { "rare" } else { "busy" };
        append(&journal, account, &i.to_string()).unwrap();
    }
    let filter = Filter {
        account: Some("rare".into()),
        ..Filter::default()
    };
    let batch = journal.read_after(0, 100, &filter, 10).unwrap();
    assert_eq!(batch.messages.len(), 1);
    assert_eq!(batch.messages[0].seq, 51);
    assert_eq!(batch.cursor, 100);
    let batch = journal.read_after(0, 100, &Filter::default(), 10).unwrap();
    assert_eq!(batch.cursor, 10, "a full batch stops at its last message");
}

fn wal_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("journal.db-wal")).map_or(0, |m| m.len())
}

#[test]
fn wal_checkpoints_keep_up_while_a_consumer_reads_slowly() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), settings()).unwrap();
    let writer = {
        let journal: Arc<Journal> = journal.clone();
        std::thread::spawn(move || {
            let text = "y".repeat(1000);
            for _ in 0..100 {
                let pending: Vec<_> = (0..200)
                    .map(|_| journal.append(record("a", "r", &text)))
                    .collect();
                for p in pending {
                    block_on(p).unwrap();
                }
            }
        })
    };
    // A consumer that reads 20 messages at a time and dawdles between reads.
    let mut cursor = 0;
    let mut largest_wal = 0;
    while !writer.is_finished() || cursor < journal.last_seq() {
        let batch = journal
            .read_after(cursor, journal.last_seq(), &Filter::default(), 20)
            .unwrap();
        cursor = batch.cursor;
        largest_wal = largest_wal.max(wal_bytes(dir.path()));
        std::thread::sleep(Duration::from_millis(2));
        if cursor > 2_000 && !writer.is_finished() {
            // Far behind the writer on purpose.
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    writer.join().unwrap();
    // 20,000 messages of 1 KB went through: ~20 MB. Checkpoints kept the WAL far below that.
    assert!(
        largest_wal < 12 * 1024 * 1024,
        "the WAL grew to {largest_wal} bytes"
    );
}

#[test]
fn a_second_open_of_the_same_journal_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _journal = Journal::open(dir.path(), settings()).unwrap();
    let err = Journal::open(dir.path(), settings()).unwrap_err();
    assert!(matches!(err, JournalError::Locked { .. }), "{err}");
}
