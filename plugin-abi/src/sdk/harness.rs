//! The seam the test harness (`channeld-plugin-test`) runs a plugin through, in process and
//! without a host. Hidden from the docs: it is no part of the author's API and may change with
//! the harness, which is released together with the SDK.
//!
//! It exists for one reason: [`AccountContext`]'s fields are the SDK's own, and the context the
//! SDK builds for the host spawns on the SDK's own runtime. A test wants the plugin's code on the
//! *test's* runtime instead, so that `tokio::time::pause` (and `#[tokio::test(start_paused =
//! true)]`) governs the plugin's timers too. [`account_context`] builds a context bound to the
//! current runtime, and [`Controls`] does for the harness what the SDK's entry points do for the
//! host: fire the abort, run the task in the account's log scope, and count it as ended only once
//! every task it spawned with [`AccountContext::spawn`] has ended. A [`SendScope`] gives each
//! harness its own map of accounts' outbound queues ([`AccountContext::outbound`]), so tests
//! running side by side in one process do not reach each other's accounts.

use std::{future::Future, sync::Arc};

pub use super::log::Fields as LogFields;

use super::{
    AbortSignal, Account, AccountContext, Host, context::Harnessed, log, outbound::Registry,
    signal::TaskState,
};
use crate::abi::HostHandle;

/// What the harness keeps of an account it started: the abort, the spawned tasks, the log scope.
#[derive(Clone, Debug)]
pub struct Controls {
    abort: Arc<TaskState>,
    scope: log::AccountScope,
}

/// One harness's map of accounts' outbound queues: the contexts it builds open their queues in
/// it, and [`SendScope::run`] makes the default send hook look there.
#[derive(Clone, Debug, Default)]
pub struct SendScope(Registry);

impl SendScope {
    /// Runs `future` (a `send` hook) with this scope's queues as the ones it sees.
    pub fn run<F: Future>(&self, future: F) -> impl Future<Output = F::Output> + use<F> {
        self.0.clone().scope(future)
    }
}

/// A context for `account` whose host services are `host`, whose
/// [`spawn`](AccountContext::spawn) uses the runtime this is called on, and whose
/// [`outbound`](AccountContext::outbound) queue opens in `sends`.
///
/// # Panics
/// Outside a tokio runtime.
pub fn account_context(
    account: Account,
    host: HostHandle,
    sends: &SendScope,
) -> (AccountContext, Controls) {
    let abort = Arc::new(TaskState::default());
    let account = Arc::new(account);
    let scope = log::AccountScope::new(account.clone());
    let context = AccountContext {
        account,
        host: Host::new(host),
        abort: AbortSignal(abort.clone()),
        harnessed: Some(Box::new(Harnessed {
            runtime: tokio::runtime::Handle::current(),
            outbound: sends.0.clone(),
        })),
    };
    (context, Controls { abort, scope })
}

impl Controls {
    /// Fires the account's abort signal, as the host does when it stops the account.
    pub fn abort(&self) {
        self.abort.abort();
    }

    /// Tasks spawned with [`AccountContext::spawn`] that have not ended yet.
    pub fn spawned_running(&self) -> usize {
        self.abort.children()
    }

    /// `task` (the future `start` returned) run as the SDK runs it for the host: in the account's
    /// log scope; when it ends, the spawned tasks are aborted and awaited before its result is
    /// returned.
    ///
    /// # Cancellation safety
    /// Dropping the future drops the account's task; spawned tasks keep running until the abort.
    pub fn run<F: Future>(&self, task: F) -> impl Future<Output = F::Output> + use<F> {
        let abort = self.abort.clone();
        log::in_scope(self.scope.clone(), async move {
            let result = task.await;
            abort.abort();
            abort.close();
            abort.children_ended().await;
            result
        })
    }
}

/// The channel and account of the account task (or spawned task) being polled, if any: what the
/// SDK tags the task's log events with.
pub fn log_scope() -> Option<(String, String)> {
    log::current_scope()
}
