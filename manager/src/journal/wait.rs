//! Waiting for a future from a plain thread, without any async runtime: how a 1.0 plugin's
//! synchronous `deliver` waits for the journal's commit on the plugin's own thread (the slow
//! path: the thread does nothing else meanwhile; ABI 1.1's `deliver_async` awaits instead).

use std::{
    pin::pin,
    sync::Arc,
    task::{Context, Poll, Wake, Waker},
    thread::{self, Thread},
};

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `future` on the calling thread, parking it between polls, until it completes. Never
/// call it from a thread of an async runtime: it blocks that thread.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut future = pin!(future);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        // A wake before this park leaves the token set, so it returns at once: no lost wake-up.
        thread::park();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_value_sent_from_another_thread() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sender = thread::spawn(move || {
            thread::sleep(std::time::Duration::from_millis(20));
            tx.send(7).unwrap();
        });
        assert_eq!(block_on(rx).unwrap(), 7);
        sender.join().unwrap();
    }
}
