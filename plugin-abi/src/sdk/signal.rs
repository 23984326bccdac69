//! One account task's abort signal and the count of the tasks it spawned, in one small
//! allocation shared by the task, its context and the registry: a running account costs one of
//! these instead of a cancellation token and a task tracker of its own.
//!
//! The abort is a flag and a [`Notify`] its waiters wait on; the spawned tasks are a count in the
//! same word. Once the account's own future has ended, the task is *closed*: the spawned task
//! that ends last then wakes the account task, which ends after it.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use pin_project_lite::pin_project;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The abort has fired.
const ABORTED: usize = 1;
/// The account's own future has ended: the last spawned task to end wakes the waiters.
const CLOSED: usize = 1 << 1;
/// A tokio-util token is linked to the abort (see [`TaskState::linked_token`]).
const LINKED: usize = 1 << 2;
/// One running spawned task (the count lives above the flags).
const CHILD: usize = 1 << 3;

/// Tokens linked to an abort by the deprecated `AccountContext::abort_signal`, by the address of
/// their state: only states flagged [`LINKED`] have one, so an abort looks here only for them.
static LINKED_TOKENS: Mutex<Option<HashMap<usize, CancellationToken>>> = Mutex::new(None);

fn with_linked<R>(f: impl FnOnce(&mut HashMap<usize, CancellationToken>) -> R) -> R {
    let mut guard = LINKED_TOKENS.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.get_or_insert_with(HashMap::new))
}

/// An account task's abort signal and its spawned tasks.
#[derive(Debug, Default)]
pub(crate) struct TaskState {
    state: AtomicUsize,
    notify: Notify,
}

impl TaskState {
    /// Its address: it lives in an `Arc`, so the address stays its own while it lives.
    fn key(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// Fires the abort (again: a no-op).
    pub(crate) fn abort(&self) {
        let before = self.state.fetch_or(ABORTED, Ordering::AcqRel);
        if before & ABORTED != 0 {
            return;
        }
        self.notify.notify_waiters();
        if before & LINKED != 0
            && let Some(token) = with_linked(|tokens| tokens.get(&self.key()).cloned())
        {
            token.cancel();
        }
    }

    /// Whether the abort has fired.
    pub(crate) fn is_aborted(&self) -> bool {
        self.state.load(Ordering::Acquire) & ABORTED != 0
    }

    /// Completes once the abort has fired.
    ///
    /// # Cancellation safety
    /// Cancel-safe: dropping the future loses nothing.
    pub(crate) async fn aborted(&self) {
        loop {
            // Made before the check, so an abort after the check wakes it.
            let notified = self.notify.notified();
            if self.is_aborted() {
                return;
            }
            notified.await;
        }
    }

    /// A tokio-util token cancelled with the abort (the same one for every call).
    pub(crate) fn linked_token(self: &Arc<Self>) -> CancellationToken {
        with_linked(|tokens| {
            let token = tokens.entry(self.key()).or_default().clone();
            if self.state.fetch_or(LINKED, Ordering::AcqRel) & ABORTED != 0 {
                token.cancel();
            }
            token
        })
    }

    /// The spawned tasks that have not ended.
    pub(crate) fn children(&self) -> usize {
        self.state.load(Ordering::Acquire) / CHILD
    }

    /// Counts `future` as a spawned task of the account until it is dropped.
    pub(crate) fn track<F: Future>(self: &Arc<Self>, future: F) -> Tracked<F> {
        self.state.fetch_add(CHILD, Ordering::AcqRel);
        Tracked {
            inner: future,
            _child: Child(self.clone()),
        }
    }

    /// Marks the account's own future as ended: from now on, the last spawned task to end wakes
    /// [`children_ended`](Self::children_ended).
    pub(crate) fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
    }

    /// Completes once no spawned task is running (call after [`close`](Self::close)).
    ///
    /// # Cancellation safety
    /// Cancel-safe: dropping the future loses nothing.
    pub(crate) async fn children_ended(&self) {
        loop {
            let notified = self.notify.notified();
            if self.children() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for TaskState {
    fn drop(&mut self) {
        if *self.state.get_mut() & LINKED != 0 {
            let key = self.key();
            with_linked(|tokens| tokens.remove(&key));
        }
    }
}

/// One spawned task's place in the count, given back when the task is dropped.
struct Child(Arc<TaskState>);

impl Drop for Child {
    fn drop(&mut self) {
        let before = self.0.state.fetch_sub(CHILD, Ordering::AcqRel);
        if before / CHILD == 1 && before & CLOSED != 0 {
            self.0.notify.notify_waiters();
        }
    }
}

pin_project! {
    /// A spawned task, counted until it is dropped.
    pub(crate) struct Tracked<F> {
        #[pin]
        inner: F,
        _child: Child,
    }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_last_child_to_end_wakes_the_closed_task() {
        let state = Arc::new(TaskState::default());
        let child = tokio::spawn(state.track({
            let state = state.clone();
            async move { state.aborted().await }
        }));
        assert_eq!(state.children(), 1);
        state.abort();
        state.close();
        // A bound, not a timing: without the child's wake-up this would wait forever.
        tokio::time::timeout(std::time::Duration::from_secs(30), state.children_ended())
            .await
            .expect("the last child to end did not wake the closed task");
        assert_eq!(state.children(), 0);
        child.await.unwrap();
    }

    #[test]
    fn a_linked_token_is_cancelled_with_the_abort_and_forgotten_with_the_state() {
        let state = Arc::new(TaskState::default());
        let token = state.linked_token();
        assert!(!token.is_cancelled());
        state.abort();
        assert!(token.is_cancelled());
        let key = state.key();
        drop(state);
        assert!(with_linked(|tokens| !tokens.contains_key(&key)));
        // A token asked for after the abort is cancelled already.
        let state = Arc::new(TaskState::default());
        state.abort();
        assert!(state.linked_token().is_cancelled());
    }
}
