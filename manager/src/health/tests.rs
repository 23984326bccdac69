//! The monitor's rules against a fake target, with tokio's clock paused.

use std::sync::{Arc, Mutex};

use tokio::{sync::Semaphore, time::Instant};

use super::*;

const MIN: Duration = Duration::from_secs(60);
/// The fake's revive gate is open unless a test takes all of these.
const GATE_PERMITS: u32 = 1_000;

fn view(account: &str, now: Instant) -> AccountView {
    AccountView {
        key: AccountKey::new("chan", account),
        enabled: true,
        configured: true,
        running: true,
        restart_pending: false,
        manually_stopped: false,
        monitor_enabled: true,
        gave_up: false,
        started_at: Some(now),
        connected: Some(true),
        mode: None,
        reports_events: false,
        last_event_at: None,
        busy: false,
        last_run_activity_at: None,
    }
}

/// Accounts the test sets; revivals counted (and optionally held at a gate).
struct Fake {
    accounts: Mutex<Vec<AccountView>>,
    revived: Mutex<Vec<AccountKey>>,
    recorded: Mutex<Vec<(AccountKey, Verdict, bool)>>,
    gate: Arc<Semaphore>,
}

impl Fake {
    fn new(accounts: Vec<AccountView>) -> Arc<Self> {
        Arc::new(Self {
            accounts: Mutex::new(accounts),
            revived: Mutex::default(),
            recorded: Mutex::default(),
            gate: Arc::new(Semaphore::new(GATE_PERMITS as usize)),
        })
    }
    fn revived(&self) -> usize {
        self.revived.lock().unwrap().len()
    }
}

impl MonitorTarget for Fake {
    fn now(&self) -> Instant {
        // The paused test clock.
        tokio::time::Instant::now()
    }

    fn accounts(&self) -> Vec<AccountView> {
        self.accounts.lock().unwrap().clone()
    }
    fn revive(&self, key: &AccountKey) -> BoxFuture<Result<(), String>> {
        self.revived.lock().unwrap().push(key.clone());
        let gate = self.gate.clone();
        Box::pin(async move {
            let _permit = gate.acquire().await;
            Ok(())
        })
    }
    fn record(&self, key: &AccountKey, verdict: &Verdict, restarted: bool) {
        self.recorded
            .lock()
            .unwrap()
            .push((key.clone(), verdict.clone(), restarted));
    }
}

fn policy() -> HealthConfig {
    HealthConfig::default()
}

#[tokio::test(start_paused = true)]
async fn each_verdict_in_order_with_its_reason() {
    let p = policy();
    let t0 = Instant::now();
    let later = t0 + 10 * MIN;
    let base = view("a", t0);

    let mut v = base.clone();
    v.enabled = false;
    v.running = false;
    assert_eq!(judge(&v, &p, later), Verdict::Healthy("unmanaged"));
    let mut v = base.clone();
    v.configured = false;
    assert_eq!(judge(&v, &p, later), Verdict::Healthy("unmanaged"));

    let mut v = base.clone();
    v.running = false;
    assert_eq!(judge(&v, &p, later), Verdict::Unhealthy("stopped"));
    v.gave_up = true;
    assert_eq!(judge(&v, &p, later), Verdict::Unhealthy("gave-up"));

    // Busy with activity in this lifecycle: healthy under 25 min, stuck from 25 min on.
    let mut v = base.clone();
    v.busy = true;
    v.connected = Some(false);
    v.last_run_activity_at = Some(t0 + MIN);
    assert_eq!(judge(&v, &p, t0 + 25 * MIN), Verdict::Healthy("busy"));
    assert_eq!(judge(&v, &p, t0 + 26 * MIN), Verdict::Unhealthy("stuck"));

    // Connect grace: 120 s after start, even when disconnected.
    let mut v = base.clone();
    v.connected = Some(false);
    assert_eq!(
        judge(&v, &p, t0 + Duration::from_secs(119)),
        Verdict::Healthy("connect-grace")
    );
    assert_eq!(
        judge(&v, &p, t0 + Duration::from_secs(120)),
        Verdict::Unhealthy("disconnected")
    );

    // Stale socket: connected, reports events, none for 30 min.
    let mut v = base.clone();
    v.reports_events = true;
    v.last_event_at = Some(t0 + MIN);
    assert_eq!(judge(&v, &p, t0 + 30 * MIN), Verdict::Healthy("ok"));
    assert_eq!(
        judge(&v, &p, t0 + 31 * MIN),
        Verdict::Unhealthy("stale-socket")
    );
}

#[tokio::test(start_paused = true)]
async fn inherited_busy_flags_and_event_timestamps_from_an_earlier_lifecycle() {
    let p = policy();
    let t0 = Instant::now();
    let started = t0 + 60 * MIN;
    // Busy flag with activity from before this start: ignored, so a disconnected account after
    // its connect grace is judged disconnected, not busy.
    let mut v = view("a", started);
    v.busy = true;
    v.last_run_activity_at = Some(t0);
    v.connected = Some(false);
    assert_eq!(
        judge(&v, &p, started + 5 * MIN),
        Verdict::Unhealthy("disconnected")
    );
    // …and it is never "stuck" from that old activity.
    v.connected = Some(true);
    assert_eq!(judge(&v, &p, started + 5 * MIN), Verdict::Healthy("ok"));

    // An event from before this start counts only once the run is older than the threshold.
    let mut v = view("b", started);
    v.reports_events = true;
    v.last_event_at = Some(t0);
    assert_eq!(judge(&v, &p, started + 29 * MIN), Verdict::Healthy("ok"));
    assert_eq!(
        judge(&v, &p, started + 30 * MIN),
        Verdict::Unhealthy("stale-socket")
    );
}

#[tokio::test(start_paused = true)]
async fn webhook_mode_and_plugins_without_event_liveness_are_never_stale() {
    let p = policy();
    let t0 = Instant::now();
    let mut webhook = view("w", t0);
    webhook.mode = Some("webhook".into());
    webhook.reports_events = true;
    let mut silent = view("s", t0);
    silent.reports_events = false;
    for v in [&webhook, &silent] {
        assert_eq!(
            judge(v, &p, t0 + 600 * MIN),
            Verdict::Healthy("ok"),
            "{:?}",
            v.key
        );
    }
}

#[tokio::test(start_paused = true)]
async fn failure_6_stale_socket_verdicts_are_per_account() {
    // One account of a channel is stale; its sibling had traffic a minute ago. Only the stale one
    // is restarted (the reference restarted healthy accounts because another was stale).
    let t0 = Instant::now();
    let mut stale = view("stale", t0);
    stale.reports_events = true;
    stale.last_event_at = Some(t0);
    let mut fresh = view("fresh", t0);
    fresh.reports_events = true;
    let fake = Fake::new(vec![stale, fresh]);
    let monitor = HealthMonitor::new(policy(), fake.clone(), t0);
    tokio::time::advance(40 * MIN).await;
    fake.accounts.lock().unwrap()[1].last_event_at = Some(Instant::now() - MIN);
    let report = monitor.check().await;
    assert_eq!(report.restarted, [AccountKey::new("chan", "stale")]);
    assert_eq!(
        report.unhealthy,
        [(AccountKey::new("chan", "stale"), "stale-socket")]
    );
    assert_eq!(fake.revived(), 1);
}

#[tokio::test(start_paused = true)]
async fn hands_off_restart_pending_manually_stopped_and_disabled_accounts() {
    let t0 = Instant::now();
    let mut pending = view("pending", t0);
    pending.running = false;
    pending.gave_up = false;
    pending.restart_pending = true;
    let mut stopped = view("stopped", t0);
    stopped.running = false;
    stopped.manually_stopped = true;
    let mut off = view("off", t0);
    off.running = false;
    off.monitor_enabled = false;
    let fake = Fake::new(vec![pending, stopped, off]);
    let monitor = HealthMonitor::new(policy(), fake.clone(), t0);
    tokio::time::advance(10 * MIN).await;
    let report = monitor.check().await;
    assert!(report.ran);
    assert!(report.unhealthy.is_empty(), "{report:?}");
    assert_eq!(fake.revived(), 0);
    assert!(fake.recorded.lock().unwrap().is_empty(), "not even judged");
}

#[tokio::test(start_paused = true)]
async fn cooldown_restarts_on_checks_1_and_4() {
    let t0 = Instant::now();
    let mut v = view("a", t0);
    v.connected = Some(false);
    let fake = Fake::new(vec![v]);
    let monitor = HealthMonitor::new(policy(), fake.clone(), t0);
    let mut restarted_on = Vec::new();
    for check in 1..=7 {
        tokio::time::advance(policy().interval).await;
        // The revived account comes back disconnected, past its connect grace by the next check.
        if let Some(a) = fake.accounts.lock().unwrap().first_mut() {
            a.started_at = Some(Instant::now() - 3 * MIN);
        }
        if !monitor.check().await.restarted.is_empty() {
            restarted_on.push(check);
        }
    }
    assert_eq!(restarted_on, [1, 4, 7]);
}

#[tokio::test(start_paused = true)]
async fn at_most_the_hourly_cap_of_monitor_restarts() {
    let t0 = Instant::now();
    let mut v = view("a", t0);
    v.connected = Some(false);
    let fake = Fake::new(vec![v]);
    let mut p = policy();
    p.interval = MIN;
    p.cooldown_cycles = 0;
    p.connect_grace = Duration::ZERO;
    let monitor = HealthMonitor::new(p, fake.clone(), t0);
    let mut skipped_for_cap = 0;
    for _ in 0..60 {
        tokio::time::advance(MIN).await;
        let report = monitor.check().await;
        skipped_for_cap += report
            .skipped
            .iter()
            .filter(|(_, why)| *why == "hourly-cap")
            .count();
    }
    assert_eq!(fake.revived(), 10, "10 restarts per rolling hour");
    assert_eq!(skipped_for_cap, 50);
    // An hour after the first restart, the window has room again.
    tokio::time::advance(MIN).await;
    monitor.check().await;
    assert_eq!(fake.revived(), 11);
}

#[tokio::test(start_paused = true)]
async fn single_flight_while_a_restart_is_in_progress() {
    let t0 = Instant::now();
    let mut v = view("a", t0);
    v.connected = Some(false);
    let fake = Fake::new(vec![v]);
    let held = fake.gate.acquire_many(GATE_PERMITS).await.unwrap();
    let monitor = HealthMonitor::new(policy(), fake.clone(), t0);
    tokio::time::advance(10 * MIN).await;
    let first = tokio::spawn({
        let monitor = monitor.clone();
        async move { monitor.check().await }
    });
    tokio::task::yield_now().await;
    assert_eq!(
        fake.revived(),
        1,
        "the first check is restarting the account"
    );
    let second = monitor.check().await;
    assert!(!second.ran, "a check while one is in progress does nothing");
    drop(held);
    let first = first.await.unwrap();
    assert_eq!(first.restarted.len(), 1);
    assert_eq!(fake.revived(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_first_check_is_the_first_interval_past_the_grace_and_zero_disables() {
    let t0 = Instant::now();
    let fake = Fake::new(vec![]);
    let monitor = HealthMonitor::new(policy(), fake.clone(), t0);
    assert_eq!(monitor.first_check(), Some(t0 + 5 * MIN));
    let mut p = policy();
    p.interval = Duration::from_secs(20);
    let monitor = HealthMonitor::new(p.clone(), fake.clone(), t0);
    assert_eq!(monitor.first_check(), Some(t0 + MIN));
    p.interval = Duration::ZERO;
    let monitor = HealthMonitor::new(p, fake, t0);
    assert_eq!(monitor.first_check(), None);
    // run() returns at once when disabled.
    tokio::time::timeout(
        Duration::from_secs(1),
        monitor.run(CancellationToken::new()),
    )
    .await
    .expect("a disabled monitor returns");
}
