//! The fence: this node may run accounts only while its lease is certainly alive on the server.
//!
//! The lease is renewed as of the moment etcd receives a keep-alive, which is after this node sent
//! it; so after a keep-alive sent at `t` succeeds, the lease lives on the server at least until
//! `t + lease_ttl`. The fence stays open until `t + lease_ttl - margin`, measured on the monotonic
//! clock (which keeps counting while the process is stopped by SIGSTOP or a frozen VM). Past that
//! moment every check says "closed": the start gate refuses every boot before it calls the plugin,
//! and the watchdog stops every running account, all before the server can let the lease go.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::Client;

/// The fence of one node (see the module's docs).
pub struct Fence {
    base: Instant,
    /// Nanoseconds after `base` until which the fence is open; 0: closed.
    deadline: AtomicU64,
    reason: Mutex<String>,
    lease_ttl: Duration,
}

impl Fence {
    /// A closed fence.
    pub fn new(lease_ttl: Duration, reason: &str) -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            deadline: AtomicU64::new(0),
            reason: Mutex::new(reason.to_owned()),
            lease_ttl,
        })
    }

    /// Opens the fence until `until` (never shortens an open fence).
    pub fn open_until(&self, until: Instant) {
        let nanos = until.saturating_duration_since(self.base).as_nanos() as u64;
        self.deadline.fetch_max(nanos.max(1), Ordering::SeqCst);
    }

    /// Closes the fence, saying why.
    pub fn close(&self, reason: impl Into<String>) {
        self.deadline.store(0, Ordering::SeqCst);
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = reason.into();
    }

    /// Whether accounts may run now.
    pub fn is_open(&self) -> bool {
        let deadline = self.deadline.load(Ordering::SeqCst);
        deadline != 0 && (self.base.elapsed().as_nanos() as u64) < deadline
    }

    /// Why the fence is closed (or "open").
    pub fn reason(&self) -> String {
        let deadline = self.deadline.load(Ordering::SeqCst);
        if deadline == 0 {
            return self
                .reason
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
        }
        if self.is_open() {
            return "open".to_owned();
        }
        format!(
            "etcd unreachable: no keep-alive of this node's lease succeeded in time (lease_ttl {}); \
             every account was stopped before the lease could expire",
            humantime::format_duration(self.lease_ttl)
        )
    }
}

/// Keeps `lease` alive every `interval` until it cannot: it returns why (the lease expired on the
/// server, or the fence closed because no keep-alive succeeded in time). Each success opens the
/// fence until its send time plus `lease_ttl - margin`.
///
/// # Cancellation safety
///
/// Cancel-safe: dropping it only stops the keep-alives (the fence then closes by itself).
pub async fn keep_alive(
    mut client: Client,
    lease: i64,
    lease_ttl: Duration,
    margin: Duration,
    interval: Duration,
    fence: Arc<Fence>,
) -> String {
    let mut stream = None;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !fence.is_open() {
            return fence.reason();
        }
        if stream.is_none() {
            match tokio::time::timeout(interval, client.lease_keep_alive(lease)).await {
                Ok(Ok(pair)) => stream = Some(pair),
                Ok(Err(e)) => {
                    tracing::debug!("cluster: keep-alive stream: {e}");
                    continue;
                }
                Err(_) => continue,
            }
        }
        let Some((keeper, responses)) = stream.as_mut() else {
            continue;
        };
        let sent = Instant::now();
        let answer = tokio::time::timeout(interval.max(Duration::from_millis(200)), async {
            keeper.keep_alive().await?;
            responses.message().await
        })
        .await;
        match answer {
            Ok(Ok(Some(response))) if response.ttl() > 0 => {
                fence.open_until(sent + lease_ttl.saturating_sub(margin));
            }
            Ok(Ok(Some(_))) => {
                let why = "this node's lease expired on the server".to_owned();
                fence.close(why.clone());
                return why;
            }
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => stream = None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fence_opens_until_its_deadline_and_closes_on_demand() {
        let fence = Fence::new(Duration::from_secs(2), "joining");
        assert!(!fence.is_open());
        assert_eq!(fence.reason(), "joining");
        fence.open_until(Instant::now() + Duration::from_secs(60));
        assert!(fence.is_open());
        // An older success never shortens it.
        fence.open_until(Instant::now());
        assert!(fence.is_open());
        fence.close("etcd gone");
        assert!(!fence.is_open());
        assert_eq!(fence.reason(), "etcd gone");
    }

    #[test]
    fn a_passed_deadline_closes_the_fence_without_anyone_acting() {
        let fence = Fence::new(Duration::from_secs(2), "joining");
        fence.open_until(Instant::now() + Duration::from_millis(20));
        assert!(fence.is_open());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!fence.is_open());
        assert!(
            fence.reason().contains("etcd unreachable"),
            "{}",
            fence.reason()
        );
    }
}
