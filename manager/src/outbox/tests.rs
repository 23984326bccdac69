//! The outbox against a real journal database and an in-process plugin double: the unfinished
//! messages it keeps in memory (the conversations' heads, the counts the caps use) match what
//! the database says after every kind of write (accept, cancel, a send's outcome, a retry, a
//! message failed for its removed account) and after a restart.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio_util::task::TaskTracker;

use super::{
    NewMessage, Outbox, OutboxConfig,
    gateway::{Gateways, Routed},
    heads::{Conversation, Heads, Open},
    lock,
};
use crate::{
    clock::SystemClock,
    config::{ChannelSection, SupervisorConfig},
    host::{AccountKey, AccountLink},
    journal::{Journal, JournalConfig, Record},
    plugin::{BoxFuture, Check, Outbound, Plugin, PluginCallError, PluginInfo, RunningTask},
    status::StatusBoard,
    supervise::{Supervisor, policy::FixedJitter},
};

/// A channel `double` with accounts `a` and `b` whose tasks run until dropped, and whose send
/// fails a message whose text starts with "fail" and answers `m<text>` for any other.
struct Double {
    info: PluginInfo,
    sent: Mutex<Vec<String>>,
}

impl Double {
    fn error(&self, entry: &'static str, message: &str) -> PluginCallError {
        PluginCallError {
            channel: self.info.channel_id.clone(),
            entry,
            message: message.to_owned(),
        }
    }
}

impl Plugin for Double {
    fn info(&self) -> &PluginInfo {
        &self.info
    }
    fn configure(&self, _channel_config: &Value) -> Result<(), PluginCallError> {
        Ok(())
    }
    fn list_account_ids(&self) -> Result<Vec<String>, PluginCallError> {
        Ok(vec!["a".into(), "b".into()])
    }
    fn default_account_id(&self) -> Result<Option<String>, PluginCallError> {
        Ok(None)
    }
    fn resolve_account(&self, _account: &str) -> Result<Value, PluginCallError> {
        Ok(json!({}))
    }
    fn is_enabled(&self, _account: &str) -> Result<Check, PluginCallError> {
        Ok(Check::Yes)
    }
    fn is_configured(&self, _account: &str) -> Result<Check, PluginCallError> {
        Ok(Check::Yes)
    }
    fn describe_account(&self, _account: &str) -> Result<Option<Value>, PluginCallError> {
        Ok(None)
    }
    fn start_account(
        &self,
        _account: &str,
        _link: AccountLink,
    ) -> Result<RunningTask, PluginCallError> {
        Ok(RunningTask {
            id: 1,
            done: crate::plugin::TaskEnd::boxed(std::future::pending()),
        })
    }
    fn abort_task(&self, _task: u64) -> bool {
        true
    }
    fn cancel_task(&self, _task: u64) -> bool {
        true
    }
    fn stop_account(&self, _account: &str) -> Result<(), PluginCallError> {
        Ok(())
    }
    fn logout(&self, _account: &str) -> Result<bool, PluginCallError> {
        Ok(false)
    }
    fn send(&self, message: Outbound) -> BoxFuture<Result<String, PluginCallError>> {
        lock(&self.sent).push(message.text.clone());
        let answer = if message.text.starts_with("fail") {
            Err(self.error("send", "refused"))
        } else {
            Ok(format!("m{}", message.text))
        };
        Box::pin(async move { answer })
    }
    fn shutdown(&self) -> Result<(), PluginCallError> {
        Ok(())
    }
}

/// A supervisor with the double's accounts running, and an empty journal in a directory of its
/// own (kept while the returned directory lives).
async fn double_and_journal() -> (Supervisor, Arc<Double>, tempfile::TempDir, Arc<Journal>) {
    let (supervisor, double) = running_double().await;
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path(), JournalConfig::default()).unwrap();
    (supervisor, double, dir, journal)
}

/// A supervisor with the double's accounts running.
async fn running_double() -> (Supervisor, Arc<Double>) {
    let clock = Arc::new(SystemClock);
    let board = Arc::new(StatusBoard::new(clock.clone()));
    let supervisor = Supervisor::new(
        SupervisorConfig::default(),
        Duration::from_secs(10),
        board,
        clock,
        Arc::new(FixedJitter(0.0)),
    );
    let double = Arc::new(Double {
        info: PluginInfo {
            channel_id: "double".into(),
            display_name: "double".into(),
            plugin_version: "0".into(),
            abi_version: "0".into(),
            rustc_version: "0".into(),
        },
        sent: Mutex::default(),
    });
    let plugin: Arc<dyn Plugin> = double.clone();
    supervisor
        .add_channel(plugin, ChannelSection { table: json!({}) })
        .await
        .expect("the double registers");
    supervisor.start_all().await;
    for account in ["a", "b"] {
        let key = AccountKey::new("double", account);
        wait_for("the account runs", || {
            supervisor.board().get(&key).is_some_and(|s| s.running)
        })
        .await;
    }
    (supervisor, double)
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let limit = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < limit, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn send(outbox: &Outbox, account: &str, conversation: &str, text: &str) -> u64 {
    outbox
        .submit(NewMessage {
            channel: "double".into(),
            account: account.into(),
            conversation: conversation.into(),
            text: text.into(),
            ..NewMessage::default()
        })
        .expect("accepted")
        .id
}

/// The outbox's unfinished messages in memory, after checking they are what the database holds.
fn in_step(outbox: &Outbox) -> Vec<(Conversation, Vec<u64>)> {
    let store = lock(&outbox.store);
    let read = Heads::load(&store.conn).expect("the outbox reads");
    let kept = store.heads.listing();
    assert_eq!(kept, read.listing(), "memory and database disagree");
    for (conversation, open) in &kept {
        assert_eq!(
            store.heads.front(conversation),
            open.first().copied(),
            "{conversation:?}'s head"
        );
    }
    let fronts: Vec<u64> = store.heads.fronts().map(|(id, _)| id).collect();
    let mut firsts: Vec<u64> = kept.iter().map(|(_, o)| o[0].id).collect();
    firsts.sort_unstable();
    assert_eq!(fronts, firsts, "the heads, oldest first");
    for account in ["a", "b"] {
        let key = AccountKey::new("double", account);
        let open: usize = kept
            .iter()
            .filter(|(c, _)| c.key == key)
            .map(|(_, o)| o.len())
            .sum();
        assert_eq!(store.heads.waiting(&key), open as u64, "{key} waiting");
    }
    assert_eq!(
        store.heads.total(),
        kept.iter().map(|(_, o)| o.len() as u64).sum::<u64>()
    );
    kept.into_iter()
        .map(|(c, o)| (c, o.iter().map(|o: &Open| o.id).collect()))
        .collect()
}

fn ids(listing: &[(Conversation, Vec<u64>)]) -> Vec<Vec<u64>> {
    listing.iter().map(|(_, ids)| ids.clone()).collect()
}

/// One sender pass, then waits until every send it handed over has ended.
async fn pass(outbox: &Arc<Outbox>, tasks: &TaskTracker) {
    outbox.pump(tasks, false);
    wait_for("the sends end", || {
        lock(&outbox.in_flight).len() == lock(&outbox.outcomes).len()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heads_in_memory_match_the_database_after_accept_cancel_outcomes_and_a_restart() {
    let (supervisor, double, _dir, journal) = double_and_journal().await;
    let settings = OutboxConfig {
        retry_initial: Duration::from_secs(3600),
        retry_max: Duration::from_secs(3600),
        deadline: Duration::from_secs(36_000),
        ..OutboxConfig::default()
    };
    let outbox = Outbox::open(&journal, settings.clone(), supervisor.clone()).unwrap();
    // Accept: a/x 1 2 5 7, a/y 3 (fails) 8, b/x 4 6.
    for (account, conversation, text) in [
        ("a", "x", "1"),
        ("a", "x", "2"),
        ("a", "y", "fail 3"),
        ("b", "x", "4"),
        ("a", "x", "5"),
        ("b", "x", "6"),
        ("a", "x", "7"),
        ("a", "y", "8"),
    ] {
        send(&outbox, account, conversation, text);
    }
    assert_eq!(
        ids(&in_step(&outbox)),
        [vec![1, 2, 5, 7], vec![3, 8], vec![4, 6]]
    );
    // Cancel one behind its head, and a head.
    outbox.cancel(5).unwrap();
    outbox.cancel(4).unwrap();
    assert_eq!(ids(&in_step(&outbox)), [vec![1, 2, 7], vec![3, 8], vec![6]]);
    // The first pass hands over every head (still unfinished, `sending` in the database) and
    // marks the one behind each `sending` ahead: no longer cancellable.
    let tasks = TaskTracker::new();
    pass(&outbox, &tasks).await;
    assert_eq!(*lock(&double.sent), ["1", "fail 3", "6"]);
    assert_eq!(ids(&in_step(&outbox)), [vec![1, 2, 7], vec![3, 8], vec![6]]);
    for id in [1, 2, 3, 8, 6] {
        assert_eq!(outbox.get(id).unwrap().state, "sending", "{id}");
    }
    assert_eq!(outbox.get(7).unwrap().state, "queued");
    assert!(outbox.cancel(2).is_err());
    // The next pass records the outcomes: 1 and 6 sent, 3 failed and waiting for its retry (8,
    // marked ahead behind it, queued again); 2 was marked ahead, so it goes, and 7 is marked.
    pass(&outbox, &tasks).await;
    let listing = in_step(&outbox);
    assert_eq!(ids(&listing), [vec![2, 7], vec![3, 8]]);
    let retry = lock(&outbox.store).heads.front(&listing[1].0).unwrap();
    assert!(retry.next_ms > retry.created_ms, "3 waits for its retry");
    assert_eq!(outbox.get(1).unwrap().state, "sent");
    assert_eq!(outbox.get(8).unwrap().state, "queued");
    assert_eq!(outbox.get(7).unwrap().state, "sending");
    // 2's outcome is recorded; 7 went either then or, if 2 was sent while that pass
    // committed, right after its commit (recorded now or in the next pass).
    pass(&outbox, &tasks).await;
    let left = ids(&in_step(&outbox));
    assert!(
        left == [vec![7], vec![3, 8]] || left == [vec![3, 8]],
        "{left:?}"
    );
    pass(&outbox, &tasks).await;
    assert_eq!(ids(&in_step(&outbox)), [vec![3, 8]]);
    assert_eq!(
        *lock(&double.sent),
        ["1", "fail 3", "6", "2", "7"],
        "3's retry is not due, 8 waits behind it"
    );
    // A restart with one message handed over and one marked ahead: both are queued again, and
    // counted as sent again.
    let nine = send(&outbox, "b", "z", "9");
    let ten = send(&outbox, "b", "z", "10");
    outbox.pump(&tasks, false);
    assert_eq!(ids(&in_step(&outbox)), [vec![3, 8], vec![nine, ten]]);
    let reopened = Outbox::open(&journal, settings, supervisor.clone()).unwrap();
    let listing = in_step(&reopened);
    assert_eq!(ids(&listing), [vec![3, 8], vec![nine, ten]]);
    assert!(
        listing.iter().all(|(c, _)| {
            let store = lock(&reopened.store);
            store.heads.front(c).is_some_and(|o| !o.sending)
        }),
        "queued again"
    );
    assert_eq!(reopened.stats()["waiting"], 4);
    assert_eq!(reopened.stats()["resentAfterRestart"], 2);
    // New messages count from what is unfinished.
    let id = send(&reopened, "b", "w", "11");
    assert_eq!(
        ids(&in_step(&reopened)),
        [vec![3, 8], vec![id], vec![nine, ten]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caps_count_the_unfinished_messages_in_memory_and_in_the_same_commit() {
    let (supervisor, _double, _dir, journal) = double_and_journal().await;
    let settings = OutboxConfig {
        max_queued_per_account: 2,
        max_queued: 3,
        ..OutboxConfig::default()
    };
    let outbox = Outbox::open(&journal, settings.clone(), supervisor.clone()).unwrap();
    send(&outbox, "a", "x", "1");
    send(&outbox, "a", "y", "2");
    let full = |outbox: &Outbox, account: &str| {
        outbox
            .submit(NewMessage {
                channel: "double".into(),
                account: account.into(),
                conversation: "x".into(),
                text: "more".into(),
                ..NewMessage::default()
            })
            .unwrap_err()
            .to_string()
    };
    assert!(full(&outbox, "a").contains("max_queued_per_account is 2"));
    send(&outbox, "b", "x", "3");
    assert!(full(&outbox, "b").contains("max_queued is 3"));
    // After a restart the counts are read back.
    let reopened = Outbox::open(&journal, settings, supervisor).unwrap();
    assert!(full(&reopened, "a").contains("max_queued_per_account is 2"));
    // A cancel frees a place.
    reopened.cancel(1).unwrap();
    send(&reopened, "a", "x", "4");
    in_step(&reopened);
}

/// A gateway between `double:a` and `double:b` (room `room`) attached to `outbox` and `journal`.
fn gateways(outbox: &Arc<Outbox>, journal: &Arc<Journal>) -> Arc<Gateways> {
    gateways_of(
        outbox,
        journal,
        "[[gateways]]\nname = \"g\"\nmembers = [\n\
         { account = \"double:a\", conversation = \"room\" },\n\
         { account = \"double:b\", conversation = \"room\" },\n]\n",
    )
}

/// The gateways of the config `text`, attached to `outbox` and `journal`.
fn gateways_of(outbox: &Arc<Outbox>, journal: &Arc<Journal>, text: &str) -> Arc<Gateways> {
    let config = crate::config::Config::parse(text, std::path::Path::new("/test.toml")).unwrap();
    let gateways = Gateways::new(crate::reload::CurrentConfig::new(config), 3);
    gateways.attach(outbox.clone(), journal.clone());
    gateways
}

/// Journals one message of `double:account` in `room`; its sequence number.
/// The repair a start runs (`Gateways::recover`), on a blocking thread as the daemon runs it.
async fn recover(gateways: &Arc<Gateways>) -> crate::outbox::gateway::Recovered {
    let gateways = gateways.clone();
    tokio::task::spawn_blocking(move || gateways.recover())
        .await
        .unwrap()
        .unwrap()
}

async fn journal_one(journal: &Journal, account: &str, text: &str) -> u64 {
    journal
        .append(Record {
            channel: "double".into(),
            account: account.into(),
            conversation: "room".into(),
            sender: "ada".into(),
            text: text.into(),
            message_id: None,
            sent_ms: 1,
            received_ms: 1,
            extra: None,
        })
        .await
        .unwrap()
}

fn bridged_keys(outbox: &Outbox) -> Vec<(String, Option<String>)> {
    let mut all: Vec<_> = outbox
        .list(None, 100)
        .unwrap()
        .into_iter()
        .map(|m| {
            (
                format!("{}:{}/{}", m.channel, m.account, m.text),
                m.idempotency_key,
            )
        })
        .collect();
    all.sort();
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_the_same_journal_message_twice_queues_each_copy_once() {
    let (supervisor, _double, _dir, journal) = double_and_journal().await;
    let outbox = Outbox::open(&journal, OutboxConfig::default(), supervisor).unwrap();
    let gateways = gateways(&outbox, &journal);
    let a = AccountKey::new("double", "a");
    let route = |seq| {
        let gateways = gateways.clone();
        let a = a.clone();
        tokio::task::spawn_blocking(move || gateways.route(seq, &a, "room", "ada", "hi", None))
    };
    let first = route(7).await.unwrap();
    assert_eq!(
        first,
        Routed {
            queued: 1,
            ..Routed::default()
        }
    );
    let again = route(7).await.unwrap();
    assert_eq!(
        again,
        Routed {
            duplicates: 1,
            ..Routed::default()
        }
    );
    // Another journal message is another copy.
    assert_eq!(route(8).await.unwrap().queued, 1);
    assert_eq!(
        bridged_keys(&outbox),
        [
            (
                "double:b/[double] <ada> hi".to_owned(),
                Some("gateway:g:double:b/room:7".to_owned())
            ),
            (
                "double:b/[double] <ada> hi".to_owned(),
                Some("gateway:g:double:b/room:8".to_owned())
            ),
        ]
    );
    assert_eq!(outbox.stats()["bridged"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_journaled_but_not_bridged_is_bridged_once_at_the_next_start() {
    let (supervisor, _double, _dir, journal) = double_and_journal().await;
    let outbox = Outbox::open(&journal, OutboxConfig::default(), supervisor.clone()).unwrap();
    let gateways = gateways(&outbox, &journal);
    // Routed in full: the mark moves past it once the routing ends.
    let ticket = gateways.begin();
    let one = journal_one(&journal, "a", "one").await;
    gateways.route(
        one,
        &AccountKey::new("double", "a"),
        "room",
        "ada",
        "one",
        None,
    );
    gateways.end(ticket);
    assert_eq!(outbox.bridged_through.load(Ordering::Relaxed), one);
    // A routing in progress holds the mark below its message, whatever ends after it began.
    let held = gateways.begin();
    let two = journal_one(&journal, "a", "two").await;
    let later = gateways.begin();
    let three = journal_one(&journal, "c", "no gateway's").await;
    gateways.end(later);
    assert_eq!(outbox.bridged_through.load(Ordering::Relaxed), one);
    // The crash: "two" is journaled, never routed, and "three" (not a gateway's) after it. The
    // mark written so far is below "two" (the outbox's next commit would have written `one`);
    // `held` never ends.
    let _ = held;
    assert!(three > two);
    let reopened = Outbox::open(&journal, OutboxConfig::default(), supervisor.clone()).unwrap();
    assert!(reopened.bridged_through().unwrap() < two);
    let restarted = self::gateways(&reopened, &journal);
    let recovered = recover(&restarted).await;
    // "one" again (its copy is there: a duplicate) and "two" (its copy was lost: queued now).
    assert_eq!(
        (recovered.messages, recovered.queued, recovered.duplicates),
        (2, 1, 1),
        "{recovered:?}"
    );
    assert_eq!(recovered.through, three);
    assert_eq!(reopened.bridged_through().unwrap(), three);
    let texts: Vec<_> = bridged_keys(&reopened)
        .into_iter()
        .map(|(t, _)| t)
        .collect();
    assert_eq!(
        texts,
        ["double:b/[double] <ada> one", "double:b/[double] <ada> two"]
    );
    // The next start finds nothing left to route.
    let again = recover(&restarted).await;
    assert_eq!((again.from, again.messages), (three, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_the_full_outbox_refused_is_held_below_the_mark_and_bridged_once_there_is_room() {
    let (supervisor, _double, _dir, journal) = double_and_journal().await;
    let settings = OutboxConfig {
        max_queued_per_account: 1,
        retry_initial: Duration::from_millis(5),
        retry_max: Duration::from_millis(20),
        ..OutboxConfig::default()
    };
    // No sender runs: what is queued stays queued.
    let outbox = Outbox::open(&journal, settings, supervisor).unwrap();
    let gateways = gateways(&outbox, &journal);
    let filler = send(&outbox, "b", "elsewhere", "first");
    let ticket = gateways.begin();
    let seq = journal_one(&journal, "a", "one").await;
    let routed = tokio::task::spawn_blocking({
        let gateways = gateways.clone();
        move || {
            gateways.route(
                seq,
                &AccountKey::new("double", "a"),
                "room",
                "ada",
                "one",
                None,
            )
        }
    })
    .await
    .unwrap();
    gateways.end(ticket);
    assert_eq!(
        routed,
        Routed {
            held: 1,
            ..Routed::default()
        }
    );
    // The mark stays below it, in memory and as written at shutdown.
    assert!(outbox.bridged_through.load(Ordering::Relaxed) < seq);
    gateways.flush_mark().unwrap();
    assert_eq!(outbox.bridged_through().unwrap(), seq - 1);
    let stats = outbox.stats();
    assert_eq!(
        (
            &stats["bridgeHeld"],
            &stats["bridgeRefused"],
            &stats["bridged"]
        ),
        (&json!(1), &json!(1), &json!(0)),
        "{stats}"
    );
    // Retried with its backoff, refused while the outbox stays full, held all along.
    let stop = tokio_util::sync::CancellationToken::new();
    let retries = tokio::spawn(gateways.clone().retry_held(stop.clone()));
    wait_for("retries", || {
        outbox.stats()["bridgeRetries"].as_u64() >= Some(3)
    })
    .await;
    assert_eq!(outbox.stats()["bridgeHeld"], 1);
    assert!(outbox.bridged_through.load(Ordering::Relaxed) < seq);
    // Room: the next retry queues it, once, and the mark passes it.
    outbox.cancel(filler).unwrap();
    wait_for("bridged", || outbox.stats()["bridgeHeld"] == 0).await;
    let stats = outbox.stats();
    assert_eq!(
        (&stats["bridged"], &stats["bridgeDropped"]),
        (&json!(1), &json!(0)),
        "{stats}"
    );
    assert_eq!(outbox.bridged_through.load(Ordering::Relaxed), seq);
    assert!(
        bridged_keys(&outbox).contains(&(
            "double:b/[double] <ada> one".to_owned(),
            Some(format!("gateway:g:double:b/room:{seq}"))
        )),
        "{:?}",
        bridged_keys(&outbox)
    );
    stop.cancel();
    retries.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_to_a_configured_channel_not_loaded_is_held_and_one_to_no_channel_is_let_go() {
    let (supervisor, _double, _dir, journal) = double_and_journal().await;
    let outbox = Outbox::open(&journal, OutboxConfig::default(), supervisor).unwrap();
    // `ghost` is configured (its plugin not loaded); `nowhere` is not configured at all.
    let gateways = gateways_of(
        &outbox,
        &journal,
        "[channels.ghost.accounts.x]\n\
         [[gateways]]\nname = \"g\"\nmembers = [\n\
         { account = \"double:a\", conversation = \"room\", direction = \"in\" },\n\
         { account = \"ghost:x\", conversation = \"room\" },\n\
         { account = \"nowhere:y\", conversation = \"room\" },\n]\n",
    );
    let seq = journal_one(&journal, "a", "one").await;
    // The crash's repair at start routes it: the mark it writes stays below the held copy.
    let recovered = recover(&gateways).await;
    assert_eq!(
        (recovered.messages, recovered.queued, recovered.held),
        (1, 0, 1),
        "{recovered:?}"
    );
    assert_eq!(outbox.bridged_through().unwrap(), seq - 1);
    let stats = outbox.stats();
    assert_eq!(
        (&stats["bridgeHeld"], &stats["bridgeDropped"]),
        (&json!(1), &json!(1)),
        "{stats}"
    );
    // Routed again (beside the held one): held once.
    let again = gateways.route(
        seq,
        &AccountKey::new("double", "a"),
        "room",
        "ada",
        "one",
        None,
    );
    assert_eq!((again.held, again.dropped), (1, 1));
    assert_eq!(outbox.stats()["bridgeHeld"], 1);
    gateways.flush_mark().unwrap();
    assert_eq!(outbox.bridged_through().unwrap(), seq - 1);
}
