//! `floor`: the least the machine takes for what `S1`'s start-all and `S2`'s crash storm ask of
//! it, measured with no channeld code, so the supervisor's figures can be read against the
//! machine they ran on (the same build's `S1` differs by 2× between a quiet and a busy phase of a
//! shared machine, and by more between machines).
//!
//! - `spawn_ms`: `CHANNELD_BENCH_ACCOUNTS` (10,000) empty tasks spawned from one thread onto a
//!   runtime of the plugin's size, until each has been polled once. Any design that runs an
//!   account as a task pays at least this.
//! - `spawn_memory_ms`: the same, each task holding as much fresh memory as an account of `S1`
//!   holds (1.5 KB: [`HOST_BYTES`] + [`PLUGIN_BYTES`], allocated and written before its spawn).
//!   Fresh memory's first touch is a page fault per 4 KiB, which on a virtual machine costs
//!   several microseconds: this is the least any design pays for `S1`'s start on this machine
//!   without making each account smaller.
//! - `handoff_ms`: the same accounts through the handoffs of `S1`'s start, and nothing else: a
//!   future per account on a runtime of the host's size (held by one driver task per core,
//!   outside tokio's cooperative budget, as the supervisor's are) queues its boot; plain threads,
//!   as many as the boot pool's lanes (one per core, at most the startup fan-out), take the queue
//!   in batches of the fan-out split over them (2 on two cores), spawn each account's task onto
//!   the plugin-sized runtime and answer through a oneshot; the task's first poll counts it and
//!   wakes its future, which marks the account running. Timed until the count holds, as `S1`'s
//!   start-all is (the futures mark their accounts as the count grows, as the supervisor's
//!   lifecycles do).
//! - `handoff_memory_ms`: the same, each account holding the same fresh memory ([`HOST_BYTES`]
//!   allocated and written by its future on the host's side, [`PLUGIN_BYTES`] by the boot lane
//!   for its task), until the count holds.
//! - `storm_ms`: `S2`'s crash storm through the same handoffs: each account's future boots a task
//!   that ends at once, waits for its end, waits `S2`'s backoff (1 ms doubling to 60 ms, 10 %
//!   jitter, the supervisor's own formula), and again, until it has used its 10 restarts (110,000
//!   starts), timed until every account has. The backoff alone is 0.3 s of it.
//!
//! Each figure is measured in a fresh process of this program (`CHANNELD_BENCH_FLOOR_PART` names
//! the one a process measures): in one process, a figure's "fresh" memory would partly be what
//! the figure before it freed, already mapped.

use std::{
    collections::VecDeque,
    future::{Future, poll_fn},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use futures_util::{StreamExt as _, stream::FuturesUnordered, task::AtomicWaker};
use tokio::{runtime::Runtime, sync::oneshot};

use channeld::{config::SupervisorConfig, supervise::policy::backoff_delay};

use super::{
    Bench, HOST_WORKERS, PLUGIN_WORKERS, POLL, STORM_POLL, ms, poll_progress, poll_until,
    repeat::run_alone, storm_policy, storm_starts,
};

/// Bytes each account holds on the host's side in the memory figures (in `S1`: the status
/// board's entry, the lifecycle's cell and future, the key, the link). With [`PLUGIN_BYTES`],
/// about what `S1` measures per account (`bytes_per_account`, 1,550–1,800 B): change them with it.
const HOST_BYTES: usize = 1024;
/// Bytes each account's task holds on the plugin's side (in `S1`: the task's cell, the SDK's
/// records of the account).
const PLUGIN_BYTES: usize = 512;
/// The environment variable that makes a run of `floor` measure one figure (see the module's
/// docs).
const PART: &str = "CHANNELD_BENCH_FLOOR_PART";
/// The figures, in the line's order.
const FIGURES: [&str; 5] = [
    "spawn_ms",
    "spawn_memory_ms",
    "handoff_ms",
    "handoff_memory_ms",
    "storm_ms",
];

/// The machine's cores, as the supervisor counts them (its drivers and boot lanes follow them).
fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

pub(super) fn floor(bench: &Bench) -> anyhow::Result<String> {
    if let Ok(part) = std::env::var(PART) {
        let took = measure(&part, usize::try_from(bench.accounts)?)?;
        return Ok(serde_json::to_string(
            &serde_json::json!({ part: ms(took) }),
        )?);
    }
    // Written field by field, in the figures' order.
    let mut line = format!(r#"{{"scenario":"floor","accounts":{}"#, bench.accounts);
    for figure in FIGURES {
        let part: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&run_alone("floor", &[(PART, figure)])?)
                .with_context(|| format!("floor's {figure}"))?;
        let value = part
            .get(figure)
            .and_then(serde_json::Value::as_f64)
            .with_context(|| format!("floor's {figure} printed {part:?}"))?;
        line.push_str(&format!(r#","{figure}":{value}"#));
    }
    line.push('}');
    Ok(line)
}

/// One of the [`FIGURES`], measured in this process.
fn measure(figure: &str, accounts: usize) -> anyhow::Result<Duration> {
    let held = Bytes {
        host: HOST_BYTES,
        plugin: PLUGIN_BYTES,
    };
    match figure {
        "spawn_ms" => spawn_floor(accounts, 0),
        "spawn_memory_ms" => spawn_floor(accounts, held.host + held.plugin),
        "handoff_ms" => handoff_floor(accounts, Bytes::default()),
        "handoff_memory_ms" => handoff_floor(accounts, held),
        "storm_ms" => storm_floor(accounts),
        _ => bail!("${PART} names no figure of floor: {figure:?} (one of {FIGURES:?})"),
    }
}

fn runtime(workers: usize) -> anyhow::Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?)
}

/// Waits until `count` reaches `goal`, read as `S1` reads the plugin's counts.
fn wait_as_s1(count: &AtomicUsize, goal: usize, what: &str) -> anyhow::Result<()> {
    poll_progress(
        || Ok(count.load(Ordering::Acquire)),
        |&n| n as u64,
        goal as u64,
        what,
    )?;
    Ok(())
}

/// Waits, reading every `poll`, until `count` reaches `goal`.
fn wait_for(count: &AtomicUsize, goal: usize, poll: Duration, what: &str) -> anyhow::Result<()> {
    poll_until(
        poll,
        || Ok(count.load(Ordering::Acquire)),
        |&n| n >= goal,
        what,
    )?;
    Ok(())
}

/// The time until `accounts` tasks spawned from this thread, each holding `bytes` of fresh
/// memory, have been polled.
fn spawn_floor(accounts: usize, bytes: usize) -> anyhow::Result<Duration> {
    let plugin = runtime(PLUGIN_WORKERS as usize)?;
    let polled = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    let tasks: Vec<_> = (0..accounts)
        .map(|_| {
            let polled = polled.clone();
            let held = fresh(bytes);
            plugin.spawn(async move {
                std::hint::black_box(&held);
                polled.fetch_add(1, Ordering::Release);
                std::future::pending::<()>().await;
            })
        })
        .collect();
    wait_as_s1(&polled, accounts, "spawned tasks polled")?;
    let took = began.elapsed();
    drop(tasks);
    plugin.shutdown_background();
    Ok(took)
}

/// One account of the handoff floor: its task's first poll sets `polled` and wakes its future.
#[derive(Default)]
struct Account {
    polled: AtomicBool,
    waker: AtomicWaker,
    /// Its state as the host records it (1 booting, 2 running), written by its future.
    state: Mutex<u8>,
}

/// The boot queue the lanes take batches from.
#[derive(Default)]
struct Queue {
    boots: Mutex<(VecDeque<Boot>, bool)>,
    ready: Condvar,
}

/// One queued boot: the account whose task waits once polled (`None`: a task that ends at once,
/// as in the crash storm), and where its task's handle goes.
struct Boot {
    account: Option<Arc<Account>>,
    reply: oneshot::Sender<tokio::task::JoinHandle<()>>,
}

impl Queue {
    fn push(&self, boot: Boot) {
        self.lock().0.push_back(boot);
        self.ready.notify_one();
    }

    fn close(&self) {
        self.lock().1 = true;
        self.ready.notify_all();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<Boot>, bool)> {
        self.boots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next batch, of at most `size` (empty once closed).
    fn take(&self, size: usize) -> Vec<Boot> {
        let guard = self.lock();
        let mut guard = self
            .ready
            .wait_while(guard, |(boots, closed)| boots.is_empty() && !*closed)
            .unwrap_or_else(|p| p.into_inner());
        let size = guard.0.len().min(size);
        guard.0.drain(..size).collect()
    }
}

/// Fresh bytes each account holds on either side.
#[derive(Clone, Copy, Default)]
struct Bytes {
    host: usize,
    plugin: usize,
}

/// Memory of `len` bytes, every page of it written (as a structure's fields would be).
fn fresh(len: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(len);
    bytes.resize(len, 1);
    bytes
}

/// The runtimes and boot lanes of a handoff floor.
struct World {
    host: Runtime,
    plugin: Runtime,
    queue: Arc<Queue>,
    /// Tasks the plugin's runtime has polled.
    counted: Arc<AtomicUsize>,
    lanes: Vec<std::thread::JoinHandle<()>>,
}

impl World {
    /// Runtimes of the host's and the plugin's size, and the boot lanes, whose tasks hold
    /// `plugin_bytes` each.
    fn new(plugin_bytes: usize) -> anyhow::Result<Self> {
        let host = runtime(HOST_WORKERS)?;
        let plugin = runtime(PLUGIN_WORKERS as usize)?;
        let queue = Arc::new(Queue::default());
        let counted = Arc::new(AtomicUsize::new(0));
        // The boot pool's lanes: one per core, at most the fan-out, each taking its share of it.
        let fan_out = SupervisorConfig::default()
            .startup_accounts_per_channel
            .max(1);
        let lanes = cores().min(fan_out);
        let batch = fan_out.div_ceil(lanes);
        let lanes = (0..lanes)
            .map(|_| {
                let (queue, plugin, counted) =
                    (queue.clone(), plugin.handle().clone(), counted.clone());
                std::thread::spawn(move || {
                    boot_lane(&queue, batch, &plugin, &counted, plugin_bytes)
                })
            })
            .collect();
        Ok(Self {
            host,
            plugin,
            queue,
            counted,
            lanes,
        })
    }

    /// Runs each of `drivers`' futures on the host's runtime, each list in one driver task
    /// outside tokio's cooperative budget, as the supervisor's drivers are (under it, a driver of
    /// thousands of futures hands back its worker after about a hundred waits).
    fn drive<F: Future<Output = ()> + Send + 'static>(&self, drivers: Vec<Vec<F>>) {
        for futures in drivers {
            self.host.spawn(tokio::task::unconstrained(async move {
                let mut futures: FuturesUnordered<F> = futures.into_iter().collect();
                while futures.next().await.is_some() {}
            }));
        }
    }

    fn close(self) {
        self.queue.close();
        for lane in self.lanes {
            let _ = lane.join();
        }
        self.host.shutdown_background();
        self.plugin.shutdown_background();
    }
}

/// A boot lane: takes batches of at most `batch` until the queue closes, spawns each boot's task on the plugin's
/// runtime (holding `bytes` of fresh memory) and hands back its handle.
fn boot_lane(
    queue: &Queue,
    batch: usize,
    plugin: &tokio::runtime::Handle,
    counted: &Arc<AtomicUsize>,
    bytes: usize,
) {
    loop {
        let boots = queue.take(batch);
        if boots.is_empty() {
            return;
        }
        for Boot { account, reply } in boots {
            let counted = counted.clone();
            let held = fresh(bytes);
            let task = plugin.spawn(async move {
                std::hint::black_box(&held);
                counted.fetch_add(1, Ordering::Release);
                if let Some(account) = account {
                    account.polled.store(true, Ordering::Release);
                    account.waker.wake();
                    std::future::pending::<()>().await;
                }
            });
            let _ = reply.send(task);
        }
    }
}

/// The accounts `0..accounts` split over one driver per core (at most 16), as the supervisor
/// splits them.
fn per_driver<F>(accounts: usize, future: impl Fn(usize) -> F) -> Vec<Vec<F>> {
    let drivers = cores().min(16);
    (0..drivers)
        .map(|driver| (driver..accounts).step_by(drivers).map(&future).collect())
        .collect()
}

/// The time until the handoffs' count holds, each account holding `bytes` (see the module's
/// docs). It returns once every account is marked running too.
fn handoff_floor(accounts: usize, bytes: Bytes) -> anyhow::Result<Duration> {
    let world = World::new(bytes.plugin)?;
    let marked = Arc::new(AtomicUsize::new(0));
    let all: Vec<Arc<Account>> = (0..accounts).map(|_| Arc::default()).collect();
    let began = Instant::now();
    world.drive(per_driver(accounts, |i| {
        lifecycle(
            all[i].clone(),
            bytes.host,
            world.queue.clone(),
            marked.clone(),
        )
    }));
    wait_as_s1(
        &world.counted,
        accounts,
        "tasks polled through the handoffs",
    )?;
    let counted_after = began.elapsed();
    wait_for(&marked, accounts, POLL, "accounts marked running")?;
    world.close();
    Ok(counted_after)
}

/// An account's future in the handoff floor: marks it booting, queues its boot, waits for its
/// task's handle and first poll, marks it running, and holds its task.
async fn lifecycle(
    account: Arc<Account>,
    bytes: usize,
    queue: Arc<Queue>,
    marked: Arc<AtomicUsize>,
) {
    let held = std::hint::black_box(fresh(bytes));
    *account.state.lock().unwrap_or_else(|p| p.into_inner()) = 1;
    let (reply, task) = oneshot::channel();
    queue.push(Boot {
        account: Some(account.clone()),
        reply,
    });
    let Ok(task) = task.await else { return };
    poll_fn(|cx| {
        account.waker.register(cx.waker());
        if account.polled.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    *account.state.lock().unwrap_or_else(|p| p.into_inner()) = 2;
    marked.fetch_add(1, Ordering::Release);
    std::future::pending::<()>().await;
    drop((task, held));
}

/// `storm_ms`: `S2`'s crash storm through the handoffs (see the module's docs).
fn storm_floor(accounts: usize) -> anyhow::Result<Duration> {
    let policy = Arc::new(storm_policy());
    let world = World::new(0)?;
    let gave_up = Arc::new(AtomicUsize::new(0));
    let began = Instant::now();
    world.drive(per_driver(accounts, |i| {
        storm_lifecycle(i, policy.clone(), world.queue.clone(), gave_up.clone())
    }));
    // Read as `S2` reads its counts: each read takes a little CPU from the storm.
    wait_for(
        &gave_up,
        accounts,
        STORM_POLL,
        "accounts given up on in the storm",
    )?;
    let took = began.elapsed();
    let starts = world.counted.load(Ordering::Acquire);
    world.close();
    ensure!(
        starts as u64 == storm_starts(accounts as u64, &policy),
        "the storm started {starts} tasks"
    );
    Ok(took)
}

/// An account's future in the storm floor: boots, waits for its task's end, waits the backoff
/// (`S2`'s policy, with a jitter of its own), and again, until past the restart budget.
async fn storm_lifecycle(
    account: usize,
    policy: Arc<SupervisorConfig>,
    queue: Arc<Queue>,
    gave_up: Arc<AtomicUsize>,
) {
    // A different jitter per account and attempt, without a random generator's state.
    let mut jitter = (account as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for attempt in 1..=policy.max_restarts + 1 {
        let (reply, task) = oneshot::channel();
        queue.push(Boot {
            account: None,
            reply,
        });
        let Ok(task) = task.await else { return };
        let _ = task.await;
        if attempt > policy.max_restarts {
            break;
        }
        jitter ^= jitter << 13;
        jitter ^= jitter >> 7;
        jitter ^= jitter << 17;
        let random = (jitter >> 11) as f64 / (1u64 << 53) as f64;
        tokio::time::sleep(backoff_delay(&policy, attempt, random)).await;
    }
    gave_up.fetch_add(1, Ordering::Release);
}
