//! One plugin file loaded into the test process through the real loader and adapter, its accounts
//! started against a status board: for sends until the daemon has `channeld send`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use channeld::{
    host::{AccountKey, AccountLink, HostSink},
    plugin::{Outbound, Plugin},
};

use serde_json::json;

use super::{self as util, Loaded, daemon::PATIENCE};

/// Runs one account of a freshly loaded copy of the plugin in this process.
pub struct InProcess {
    loaded: Loaded,
    _dir: tempfile::TempDir,
}

impl InProcess {
    pub fn start(channel: &str, package: &str, accounts: serde_json::Value) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = util::copy_plugin(
            &util::plugin_file(package),
            dir.path(),
            &format!("{channel}.so"),
        );
        let loaded = util::load(&file);
        loaded
            .plugin
            .configure(&json!({ "accounts": accounts }))
            .unwrap();
        Self { loaded, _dir: dir }
    }

    pub fn start_account(&self, account: &str) -> channeld::plugin::RunningTask {
        let key = AccountKey::new(self.loaded.plugin.info().channel_id.clone(), account);
        let generation = self.loaded.board.begin_generation(&key);
        let sink: Arc<dyn HostSink> = self.loaded.board.clone();
        let link = AccountLink::for_account(key, generation, sink);
        self.loaded.plugin.start_account(account, link).unwrap()
    }

    pub fn snapshot(&self, account: &str) -> channeld::status::AccountSnapshot {
        let key = AccountKey::new(self.loaded.plugin.info().channel_id.clone(), account);
        self.loaded.board.get(&key).expect("account has a status")
    }

    pub fn wait_connected(&self, account: &str) {
        let deadline = Instant::now() + PATIENCE;
        while self.snapshot(account).connected != Some(true) {
            assert!(Instant::now() < deadline, "{account} never connected");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn send(&self, account: &str, conversation: &str, text: &str) -> String {
        tokio::time::timeout(
            PATIENCE,
            self.loaded.plugin.send(Outbound {
                account: account.into(),
                conversation: conversation.into(),
                text: text.into(),
                reply_to: None,
                extra: None,
            }),
        )
        .await
        .expect("send in time")
        .unwrap_or_else(|e| panic!("send failed: {}", e.message))
    }
}
