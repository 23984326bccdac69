//! `fixture-crash` (channel `crashy`): a channel plugin for channeld's process-isolation tests.
//! Panics are fenced by the SDK; this plugin does what no fence catches, and takes its whole
//! process down. Each account's table chooses:
//!
//! * `crash`: `segv` (write through a null pointer), `abort` (`std::process::abort`), `exit`
//!   (`std::process::exit(3)`), `recurse` (unbounded recursion: a stack overflow), `alloc`
//!   (allocate until the memory limit; only use it with `memory_limit`, or it eats the machine),
//!   `hang` (block the thread for ever: no crash, but the task never sees its abort);
//! * `crash_in`: `start` (in the account task, at its first poll), `send` (in the send hook for
//!   that account), `stop` (in the stop hook);
//! * without `crash`, the account runs until aborted and reports its start count as
//!   `crashyStarts` (per process).
//!
//! The constructor crashes when the environment variable `CHANNELD_FIXTURE_CRASH_CTOR` names a
//! crash (the constructor sees no config).

use std::{
    collections::HashMap,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use channeld_plugin_abi::sdk::prelude::*;

static STARTS: AtomicU64 = AtomicU64::new(0);

/// Takes the process down the named way.
fn crash(how: &str) {
    match how {
        "segv" => {
            let null = std::hint::black_box(std::ptr::null_mut::<u64>());
            // SAFETY: none: writing through a null pointer is this fixture's purpose (a SIGSEGV
            // that no panic fence catches, like a bug in a plugin's C dependency).
            unsafe { null.write_volatile(1) };
        }
        "abort" => std::process::abort(),
        "exit" => std::process::exit(3),
        "hang" => loop {
            std::thread::park();
        },
        "recurse" => {
            let _ = recurse(0);
        }
        "alloc" => {
            let mut kept: Vec<Vec<u8>> = Vec::new();
            loop {
                kept.push(vec![1u8; 16 << 20]);
                std::hint::black_box(&kept);
            }
        }
        _ => {}
    }
}

#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth; 64]);
    frame[0] + recurse(depth + 1)
}

/// The plugin: which account crashes how in `send`.
struct Crashy {
    in_send: Mutex<HashMap<String, String>>,
}

impl Default for Crashy {
    fn default() -> Self {
        if let Ok(how) = std::env::var("CHANNELD_FIXTURE_CRASH_CTOR") {
            crash(&how);
        }
        Self {
            in_send: Mutex::default(),
        }
    }
}

fn crash_in<'a>(account: &'a Account, hook: &str) -> Option<&'a str> {
    (account.get("crash_in").and_then(Value::as_str) == Some(hook))
        .then(|| account.get("crash").and_then(Value::as_str))
        .flatten()
}

impl ChannelPlugin for Crashy {
    const CHANNEL_ID: &'static str = "crashy";
    const DISPLAY_NAME: &'static str = "Crash fixture";

    fn list_account_ids(&self, channel: &ChannelConfig) -> Result<Vec<String>, PluginError> {
        Ok(channel.account_keys())
    }

    fn resolve_account(&self, channel: &ChannelConfig, id: &str) -> Result<Account, PluginError> {
        Ok(channel.account(id))
    }

    fn start(&self, ctx: AccountContext) -> impl Future<Output = Result<(), PluginError>> + Send {
        let account = ctx.account().clone();
        if let Some(how) = crash_in(&account, "send") {
            self.in_send
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(account.id.clone(), how.to_owned());
        }
        async move {
            let starts = STARTS.fetch_add(1, Ordering::Relaxed) + 1;
            ctx.host()
                .patch_status(&json!({ "crashyStarts": starts }))?;
            ctx.host().set_connected(true);
            if let Some(how) = crash_in(&account, "start") {
                crash(how);
            }
            ctx.aborted().await;
            Ok(())
        }
    }

    async fn stop(&self, account: Account) -> Result<(), PluginError> {
        if let Some(how) = crash_in(&account, "stop") {
            crash(how);
        }
        Ok(())
    }

    async fn send(&self, message: Outbound) -> Result<String, PluginError> {
        let how = self
            .in_send
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&message.account)
            .cloned();
        if let Some(how) = how {
            crash(&how);
        }
        Ok(format!("sent:{}:{}", message.conversation, message.text))
    }
}

export_plugin!(Crashy);
