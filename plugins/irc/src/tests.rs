//! The plugin in process, through the author kit's harness (no channeld, no `.so`): bad tables,
//! the host's reserved keys, an unreachable server, and a small IRC server of the test's own on a
//! free port. The real clock: the connections are real socket I/O.

use channeld_plugin_test::{Harness, HarnessError, RunningAccount, secs};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::TcpListener,
    task::JoinHandle,
};

use super::Irc;

/// A port nothing listens on: bound, then freed.
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// The reason `start` refuses the account with, or a panic naming what happened instead.
fn not_configured(harness: &Harness<Irc>, account: &str) -> String {
    match harness.start(account) {
        Err(HarnessError::NotConfigured {
            reason: Some(reason),
            ..
        }) => reason,
        Err(other) => panic!("{account}: {other}"),
        Ok(_) => panic!("{account}: started"),
    }
}

/// Waits for the task to end by itself; returns its error message.
async fn ended_with_error(account: &mut RunningAccount<Irc>) -> String {
    let result = account.join_within(secs(10)).await.unwrap();
    result.unwrap_err().message().to_owned()
}

#[tokio::test]
async fn a_bad_account_table_is_refused_with_a_reason_naming_the_key() {
    let cases = [
        ("nick = \"bot\"", "missing `server`"),
        ("server = \"127.0.0.1\"", "missing `nick`"),
        (
            "server = \"127.0.0.1\"\nnick = \"bot\"\nchanels = [\"#test\"]",
            "unknown field `chanels`",
        ),
        (
            "server = \"127.0.0.1\"\nnick = \"b t\"",
            "`nick` \"b t\" is not a valid nick",
        ),
        (
            "server = \"127.0.0.1\"\nnick = \"bot\"\nchannels = [\"test\"]",
            "`channels`: \"test\" is not a channel name",
        ),
        (
            "server = \"127.0.0.1\"\nnick = \"bot\"\nflood_burst = 0",
            "`flood_burst` must be at least 1",
        ),
        (
            "server = \"127.0.0.1\"\nnick = \"bot\"\nca_file = \"/nonexistent/ca.pem\"",
            "`ca_file` is set but `tls` is not",
        ),
        (
            "server = \"127.0.0.1\"\nnick = \"bot\"\ntls = true\nca_file = \"/nonexistent/ca.pem\"",
            "`ca_file` /nonexistent/ca.pem: ",
        ),
        (
            "server = \"127.0.0.1\"\nnick = \"bot\"\ntls = true\nca_file = \"/dev/null\"",
            "`ca_file` /dev/null: no PEM certificate in it",
        ),
    ];
    for (table, reason) in cases {
        let harness = Harness::new(Irc, &format!("[accounts.main]\n{table}\n")).unwrap();
        let refused = not_configured(&harness, "main");
        assert!(refused.contains(reason), "{table}: {refused}");
        assert!(!refused.contains('\n'), "{table}: not one line: {refused}");
    }
}

#[tokio::test]
async fn the_hosts_reserved_keys_do_not_upset_the_plugin() {
    let port = dead_port();
    let table = |extra: &str| {
        format!(
            "enabled = true\n[accounts.reserved]\nserver = \"127.0.0.1\"\nport = {port}\n\
             nick = \"bot\"\n{extra}\n"
        )
    };
    let reserved = "enabled = true\nhealth_monitor = { enabled = false }\nisolation = \"none\"\n\
                    memory_limit = \"256MiB\"";
    let harness = Harness::new(Irc, &table(reserved)).unwrap();
    harness.validate().unwrap();
    let mut account = harness.start("reserved").unwrap();
    // It got as far as connecting: the keys were not the plugin's business.
    let error = ended_with_error(&mut account).await;
    assert!(error.starts_with("cannot connect to 127.0.0.1:"), "{error}");
    // The same keys, misspelt, are the plugin's own, and it denies unknown keys.
    let harness = Harness::new(Irc, &table("health_monitr = { enabled = false }")).unwrap();
    let refused = not_configured(&harness, "reserved");
    assert!(
        refused.contains("unknown field `health_monitr`"),
        "{refused}"
    );
}

#[tokio::test]
async fn an_unreachable_server_ends_the_task_with_an_error_and_not_connected() {
    let port = dead_port();
    let harness = Harness::new(
        Irc,
        &format!(
            "[accounts.unreachable]\nserver = \"127.0.0.1\"\nport = {port}\nnick = \"bot\"\n\
             channels = [\"#test\"]\n"
        ),
    )
    .unwrap();
    let mut account = harness.start("unreachable").unwrap();
    let error = ended_with_error(&mut account).await;
    assert!(
        error.starts_with(&format!("cannot connect to 127.0.0.1:{port}: ")),
        "{error}"
    );
    let record = account.record();
    assert!(!record.connectivity.contains(&true), "{record:?}");
    assert_eq!(record.connected(), Some(false));
    assert!(record.delivered.is_empty());
}

/// A one-connection IRC server: welcomes the nick, confirms the join, sends a channel message
/// and a private one, then reads until the client hangs up. Returns the lines it read.
async fn fake_server(listener: TcpListener) -> Vec<String> {
    let (socket, _) = listener.accept().await.unwrap();
    let (read, mut write) = socket.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut seen = Vec::new();
    let mut next = async || lines.next_line().await.unwrap();
    // Registration: NICK and USER (in this order, as the plugin sends them).
    while seen.len() < 2 {
        seen.push(next().await.unwrap());
    }
    write
        .write_all(b":fake.server 001 bot :Welcome to the fake network bot\r\n")
        .await
        .unwrap();
    let join = next().await.unwrap();
    seen.push(join);
    write
        .write_all(
            b":bot!bot@127.0.0.1 JOIN #test\r\n\
              :fake.server 353 bot = #test :bot alice\r\n\
              :fake.server 366 bot #test :End of /NAMES list.\r\n\
              :alice!alice@127.0.0.1 PRIVMSG #test :hello there\r\n\
              :bob!bob@127.0.0.1 PRIVMSG bot :psst\r\n",
        )
        .await
        .unwrap();
    while let Some(line) = next().await {
        seen.push(line);
    }
    seen
}

#[tokio::test]
async fn against_a_fake_server_it_connects_and_delivers_privmsgs() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server: JoinHandle<Vec<String>> = tokio::spawn(fake_server(listener));
    let harness = Harness::new(
        Irc,
        &format!(
            "[accounts.fake]\nserver = \"127.0.0.1\"\nport = {port}\nnick = \"bot\"\n\
             channels = [\"#test\"]\nhealth_monitor = {{ enabled = false }}\n"
        ),
    )
    .unwrap();
    let mut account = harness.start("fake").unwrap();
    account
        .wait_until(secs(10), |r| r.delivered.len() == 2)
        .await
        .unwrap();
    let record = account.record();
    assert_eq!(record.connectivity, [false, true]);
    assert_eq!(record.status["nick"], "bot");
    let delivered: Vec<_> = record
        .delivered
        .iter()
        .map(|m| (&*m.conversation, &*m.sender, &*m.text))
        .collect();
    assert_eq!(
        delivered,
        [("#test", "alice", "hello there"), ("bob", "bob", "psst")]
    );
    // Stopping says goodbye to the server.
    account.abort_within(secs(5)).await.unwrap().unwrap();
    let seen = server.await.unwrap();
    assert_eq!(
        seen,
        [
            "NICK bot",
            "USER bot 0 * channeld",
            "JOIN #test",
            "QUIT :channeld stopping"
        ]
    );
}
