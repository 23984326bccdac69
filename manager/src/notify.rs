//! systemd integration through the `sd-notify` crate: the daemon tells the service manager when
//! it is ready, reloading, and stopping, and proves with `WATCHDOG=1` that the supervisor still
//! answers. Every function here does nothing when `NOTIFY_SOCKET` is unset (not under systemd).
//!
//! | when | message |
//! |---|---|
//! | the initial plugin load and start-all are done | `READY=1` |
//! | a reload (SIGHUP) begins / ends | `RELOADING=1` (with `MONOTONIC_USEC`) / `READY=1`, see [`reloading`] |
//! | shutdown begins | `STOPPING=1` |
//! | every half `WATCHDOG_USEC`, while the supervisor's state owner answers a ping | `WATCHDOG=1` |
//!
//! The unit file is `scripts/channeld.service` (`Type=notify`, `ExecReload=/bin/kill -HUP
//! $MAINPID`); the README shows how to install it.

use std::time::Duration;

use sd_notify::NotifyState;

use crate::supervise::Supervisor;

/// The environment variable of the test hook [`stall_supervisor`] reads: a duration (`"1s"`).
pub const STALL_ENV: &str = "CHANNELD_TEST_STALL_SUPERVISOR";

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("telling systemd {states:?}: {e}");
    }
}

/// `READY=1`: the initial start-all is done (or a reload has finished).
pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("running")]);
}

/// `STOPPING=1`: the shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Says `RELOADING=1` now and `READY=1` when dropped: wrap a reload in it.
///
/// ```no_run
/// let _reloading = channeld::notify::reloading();
/// // … reload the config …
/// // `READY=1` is sent here, whatever the reload's outcome.
/// ```
#[must_use = "READY=1 is sent when the guard is dropped"]
pub fn reloading() -> Reloading {
    let mut states = vec![NotifyState::Reloading];
    // systemd ≥ 253 wants the moment of the reload; older ones ignore it.
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
    Reloading(())
}

/// The guard of [`reloading`]: its drop sends `READY=1`.
pub struct Reloading(());

impl Drop for Reloading {
    fn drop(&mut self) {
        ready();
    }
}

/// When `WATCHDOG_USEC` is set (for this process), starts a thread that every half of it pings
/// the supervisor's state owner and sends `WATCHDOG=1` only if the ping is answered — from
/// inside the answer, so a supervisor that stopped answering never has one sent on its behalf.
/// Returns the interval, or `None` without a watchdog.
pub fn spawn_watchdog(supervisor: Supervisor) -> Option<Duration> {
    let limit = sd_notify::watchdog_enabled()?;
    let every = (limit / 2).max(Duration::from_millis(1));
    let spawned = std::thread::Builder::new()
        .name("channeld-watchdog".into())
        .spawn(move || {
            loop {
                supervisor.ping(|| send(&[NotifyState::Watchdog]));
                std::thread::sleep(every);
            }
        });
    match spawned {
        Ok(_) => Some(every),
        Err(e) => {
            tracing::error!("cannot start the systemd watchdog thread: {e}");
            None
        }
    }
}

/// A test hook: with [`STALL_ENV`] set to a duration, holds the supervisor's state for that long
/// (its state owner answers nothing meanwhile) and returns once the hold has begun; at its end
/// it sends `STATUS=supervisor stall over` before letting go. The tests of the watchdog use it;
/// release builds ignore it.
pub async fn stall_supervisor(supervisor: &Supervisor) {
    if !cfg!(debug_assertions) {
        return;
    }
    let Some(stall) = std::env::var(STALL_ENV)
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
    else {
        return;
    };
    tracing::warn!(
        "{STALL_ENV}: holding the supervisor for {}",
        humantime::format_duration(stall)
    );
    let (held, holding) = tokio::sync::oneshot::channel();
    let supervisor = supervisor.clone();
    std::thread::spawn(move || {
        supervisor.ping(|| {
            let _ = held.send(());
            std::thread::sleep(stall);
            send(&[NotifyState::Status("supervisor stall over")]);
        });
    });
    let _ = holding.await;
}
