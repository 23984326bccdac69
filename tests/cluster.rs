//! The cluster end to end: a real etcd (Debian's `etcd-server`) started by the test on free
//! loopback ports with a temporary data directory, and three real `channeld` nodes, each with its
//! own state directory, sharing 30 fixture accounts with `lease_ttl` 3 s. Every fixture account
//! takes a non-blocking `flock` per account in one shared directory at each start and records a
//! violation when another node holds it; every test asserts there is none (the pause test: that
//! any overlap ends within 100 ms of the resume).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::Value;

use crate::util::{
    self,
    daemon::{Daemon, PATIENCE},
    servers::{free_port, signal_pid},
};

const ACCOUNTS: usize = 30;
const LEASE_TTL: Duration = Duration::from_secs(3);

/// An etcd of the test's own: one member on free loopback ports, data in a temporary directory.
struct Etcd {
    client_port: u16,
    peer_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Etcd {
    fn start() -> Self {
        let mut etcd = Self {
            client_port: free_port(),
            peer_port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        etcd.start_again();
        etcd
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Starts it (again, on the same data and ports) and waits until it answers.
    fn start_again(&mut self) {
        assert!(self.child.is_none());
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("etcd.log"))
            .unwrap();
        let child = Command::new("etcd")
            .args([
                "--name",
                "t",
                "--data-dir",
                &self.dir.path().join("data").to_string_lossy(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("t={peer}"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run etcd ({e}): run scripts/install-test-deps to install it")
            });
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let ok = Command::new("etcdctl")
                .args(["--endpoints", &client, "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd never became healthy: {}",
                fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Three nodes, the shared lock directory, and etcd.
struct Cluster {
    etcd: Etcd,
    nodes: Vec<Daemon>,
    locks: tempfile::TempDir,
}

fn node_config(name: &str, endpoint: &str, locks: &Path) -> String {
    let mut body = format!(
        "[supervisor]\ninitial_backoff = \"200ms\"\nmax_backoff = \"1s\"\nstop_timeout = \"2s\"\n\n\
         [cluster]\netcd = [\"{endpoint}\"]\nname = \"t\"\nnode = \"{name}\"\n\
         lease_ttl = \"{}s\"\ntoken = \"cluster-secret\"\n\n",
        LEASE_TTL.as_secs()
    );
    for i in 0..ACCOUNTS {
        body.push_str(&format!(
            "[channels.fixture.accounts.a{i}]\nlock_dir = \"{}\"\n",
            locks.display()
        ));
    }
    body
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

impl Cluster {
    fn start() -> Self {
        let etcd = Etcd::start();
        let locks = tempfile::tempdir().unwrap();
        let fixture: PathBuf = util::plugin_file("channeld-plugin-fixture");
        let nodes = (1..=3)
            .map(|i| {
                let body = node_config(&format!("n{i}"), &etcd.endpoint(), locks.path());
                let mut node = Daemon::prepare(&[("fixture.so", fixture.clone())], "", &body);
                node.start_again(&[]);
                node
            })
            .collect();
        Self { etcd, nodes, locks }
    }

    /// Accounts running on node `i` (by its status).
    fn running_on(&self, i: usize) -> BTreeSet<String> {
        let status = self.nodes[i].status(None);
        status["channels"]["fixture"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, s)| s["state"] == "running")
            .map(|(a, _)| a.clone())
            .collect()
    }

    /// Polls until `done` holds for the running sets of the nodes in `live`; returns them.
    fn wait_until(
        &self,
        live: &[usize],
        what: &str,
        done: impl Fn(&BTreeMap<usize, BTreeSet<String>>) -> bool,
    ) -> BTreeMap<usize, BTreeSet<String>> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let sets: BTreeMap<usize, BTreeSet<String>> =
                live.iter().map(|&i| (i, self.running_on(i))).collect();
            if done(&sets) {
                return sets;
            }
            assert!(
                Instant::now() < deadline,
                "{what} never happened: {sets:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| format!("--- n{}:\n{}", i + 1, n.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The violation logs' lines.
    fn violations(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for entry in fs::read_dir(self.locks.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "violations") {
                lines.extend(
                    fs::read_to_string(&path)
                        .unwrap()
                        .lines()
                        .map(str::to_owned),
                );
            }
        }
        lines
    }

    fn assert_no_violation(&self) {
        let violations = self.violations();
        assert!(
            violations.is_empty(),
            "an account ran on two nodes at once: {violations:?}"
        );
    }
}

/// Where rendezvous hashing puts each account over n1, n2, n3 (by node index).
fn assigned() -> BTreeMap<usize, BTreeSet<String>> {
    let mut sets: BTreeMap<usize, BTreeSet<String>> =
        (0..3).map(|i| (i, BTreeSet::new())).collect();
    for i in 0..ACCOUNTS {
        let owner =
            channeld::cluster::assignment::owner(&format!("fixture:a{i}"), &["n1", "n2", "n3"])
                .unwrap();
        let index = owner[1..].parse::<usize>().unwrap() - 1;
        sets.get_mut(&index).unwrap().insert(format!("a{i}"));
    }
    sets
}

/// Every account runs exactly once over the nodes in `sets`.
fn each_once(sets: &BTreeMap<usize, BTreeSet<String>>) -> bool {
    let total: usize = sets.values().map(BTreeSet::len).sum();
    let union: BTreeSet<&String> = sets.values().flatten().collect();
    total == ACCOUNTS && union.len() == ACCOUNTS
}

#[test]
fn thirty_accounts_spread_over_three_nodes_move_when_one_dies_and_move_back_when_it_returns() {
    let mut cluster = Cluster::start();
    let before = cluster.wait_until(&[0, 1, 2], "all 30 running, spread", |sets| {
        *sets == assigned()
    });
    assert!(each_once(&before) && before.values().all(|s| !s.is_empty()));
    // The owner node shows in `channeld status`.
    let table = cluster.nodes[0].cli(&["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("OWNER"), "{table}");
    // `channeld cluster` lists the three nodes with their account counts (its view is at most
    // one poll old).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = cluster.nodes[0].cli(&["cluster", "--json"]);
        let view: Value = serde_json::from_slice(&out.stdout).unwrap();
        let nodes = view["nodes"].as_array().cloned().unwrap_or_default();
        let counts: Vec<u64> = nodes
            .iter()
            .map(|n| n["accounts"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (0..3).map(|i| before[&i].len() as u64).collect();
        if counts == expected {
            break;
        }
        assert!(Instant::now() < deadline, "{view}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let table = String::from_utf8_lossy(&cluster.nodes[2].cli(&["cluster"]).stdout).to_string();
    assert!(
        table.contains("n1") && table.contains("LEASE AGE"),
        "{table}"
    );

    // kill -9 n2: its accounts run on the others within the lease's TTL plus the backoff.
    let killed_at = Instant::now();
    cluster.nodes[1].kill();
    cluster.wait_until(&[0, 2], "n2's accounts running elsewhere", each_once);
    let failover = killed_at.elapsed();
    assert!(
        failover <= LEASE_TTL + Duration::from_secs(3),
        "failover took {failover:?}"
    );

    // n2 returns: the accounts move back (rendezvous hashing gives it the same ones).
    cluster.nodes[1].start_again(&[]);
    cluster.wait_until(&[0, 1, 2], "n2's accounts back on it", |sets| {
        each_once(sets) && sets[&1] == before[&1]
    });

    // A fourth node whose config differs from the majority's says so and claims nothing.
    let fixture = util::plugin_file("channeld-plugin-fixture");
    let body = node_config("n4", &cluster.etcd.endpoint(), cluster.locks.path()).replace(
        "[channels.fixture.accounts.a0]\n",
        "[channels.fixture.accounts.a0]\nlog = true\n",
    );
    let mut odd = Daemon::prepare(&[("fixture.so", fixture)], "", &body);
    odd.start_again(&[]);
    cluster.nodes.push(odd);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = cluster.nodes[3].cli(&["cluster", "--json"]);
        let view: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if view["state"] == "disagrees" {
            assert!(
                view["reason"].as_str().unwrap().contains("differs"),
                "{view}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{view}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let a0 = cluster.nodes[3].wait_for_account("fixture", "a0", |s| s["clusterNote"].is_string());
    assert!(
        a0["clusterNote"].as_str().unwrap().contains("differs"),
        "{a0}"
    );
    std::thread::sleep(LEASE_TTL / 2);
    assert!(cluster.running_on(3).is_empty());
    cluster.wait_until(&[0, 1, 2], "the three still running everything", each_once);
    cluster.assert_no_violation();
}

#[test]
fn with_etcd_down_every_node_stops_its_accounts_before_its_lease_expires_and_each_runs_once_after()
{
    let mut cluster = Cluster::start();
    // Settled (every account on the node it belongs to), not merely each running once: an
    // account still being handed over when etcd goes would have stopped before `stopped_ms`.
    cluster.wait_until(&[0, 1, 2], "all 30 running where they belong", |sets| {
        *sets == assigned()
    });
    let stopped_ms = unix_ms();
    cluster.etcd.stop();
    cluster.wait_until(&[0, 1, 2], "every account stopped", |sets| {
        sets.values().all(BTreeSet::is_empty)
    });
    // Each stop by the daemon's own clock (`lastStopAt`), not by when this test's polling saw it
    // (a node lists every account; those it never ran have no stop).
    let mut stops = 0;
    for node in &cluster.nodes {
        let accounts = node.status(None)["channels"]["fixture"].clone();
        for (account, s) in accounts.as_object().unwrap() {
            let Some(at) = s["lastStopAt"].as_i64() else {
                continue;
            };
            let at = u128::try_from(at).unwrap();
            stops += usize::from(at >= stopped_ms);
            assert!(
                at < stopped_ms + LEASE_TTL.as_millis(),
                "{account} ran {} ms after etcd went away: {s}",
                at.saturating_sub(stopped_ms)
            );
        }
    }
    assert_eq!(stops, ACCOUNTS, "every account's stop since etcd went away");
    // The status says why.
    let a0 = cluster.nodes[0].status(None)["channels"]["fixture"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|s| s["clusterNote"].as_str().map(str::to_owned))
        .collect::<Vec<_>>();
    assert!(a0.iter().any(|n| n.contains("etcd unreachable")), "{a0:?}");
    let view = cluster.nodes[1].cli(&["cluster", "--json"]);
    let view: Value = serde_json::from_slice(&view.stdout).unwrap();
    assert_ne!(view["state"], "member", "{view}");

    cluster.etcd.start_again();
    cluster.wait_until(
        &[0, 1, 2],
        "every account running once, where it belongs",
        |sets| *sets == assigned(),
    );
    cluster.assert_no_violation();
}

#[test]
fn a_stop_given_to_a_non_owner_stops_the_account_and_it_stays_stopped_after_it_moves() {
    let mut cluster = Cluster::start();
    // Settled, so a7's owner is the one it stays with until that node dies.
    let sets = cluster.wait_until(&[0, 1, 2], "all 30 running where they belong", |sets| {
        *sets == assigned()
    });
    let owner = *sets.iter().find(|(_, s)| s.contains("a7")).unwrap().0;
    let other = (owner + 1) % 3;
    let out = cluster.nodes[other].cli(&["stop", "fixture:a7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.nodes[owner].wait_for_account("fixture", "a7", |s| s["state"] == "stopped");

    // The owner dies; a7 moves (its owner key goes with the lease) and stays stopped.
    cluster.nodes[owner].kill();
    let live: Vec<usize> = (0..3).filter(|&i| i != owner).collect();
    let sets = cluster.wait_until(&live, "the others running the rest", |sets| {
        let total: usize = sets.values().map(BTreeSet::len).sum();
        total == ACCOUNTS - 1
    });
    assert!(sets.values().all(|s| !s.contains("a7")), "{sets:?}");
    // Someone holds it now, and still it does not run.
    let holder = |i: usize| cluster.nodes[i].account("fixture", "a7")["clusterOwner"].clone();
    cluster.nodes[live[0]].wait_for_account("fixture", "a7", |s| {
        s["clusterOwner"]
            .as_str()
            .is_some_and(|o| o != format!("n{}", owner + 1))
    });
    std::thread::sleep(LEASE_TTL / 2);
    for &i in &live {
        assert_ne!(
            cluster.nodes[i].account("fixture", "a7")["state"],
            "running",
            "{}",
            holder(i)
        );
    }
    cluster.assert_no_violation();
}

#[test]
fn a_node_paused_past_its_lease_stops_its_accounts_within_100ms_of_resuming() {
    let cluster = Cluster::start();
    let sets = cluster.wait_until(&[0, 1, 2], "all 30 running, spread", |sets| {
        *sets == assigned()
    });
    let paused = sets[&0].clone();
    let pid = cluster.nodes[0].pid();
    signal_pid(pid, libc::SIGSTOP);
    // The others take n1's accounts once its lease expires (each start finds the lock taken).
    cluster.wait_until(&[1, 2], "n1's accounts started elsewhere", |sets| {
        sets.values().map(BTreeSet::len).sum::<usize>() == ACCOUNTS
    });
    let resumed_ms = unix_ms();
    signal_pid(pid, libc::SIGCONT);
    // Every overlap ends within 100 ms of the resume: each second task gets its lock by then.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let lines = cluster.violations();
        let started = lines
            .iter()
            .filter(|l| l.contains(" started at_ms="))
            .count();
        let got: Vec<u128> = lines
            .iter()
            .filter_map(|l| l.split_once(" got the lock at_ms="))
            .map(|(_, ms)| ms.parse().unwrap())
            .collect();
        if got.len() == started {
            assert_eq!(started, paused.len(), "{lines:?}");
            let last = got.iter().max().copied().unwrap_or(resumed_ms);
            eprintln!(
                "the last overlap ended {} ms after the resume",
                last as i128 - resumed_ms as i128
            );
            for at in got {
                assert!(
                    at <= resumed_ms + 100,
                    "an overlap ended {} ms after the resume: {lines:?}",
                    at - resumed_ms
                );
            }
            break;
        }
        assert!(Instant::now() < deadline, "overlaps never ended: {lines:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // n1 rejoins cleanly: it runs its accounts again, and every account runs once.
    cluster.wait_until(&[0, 1, 2], "n1's accounts back on it", |sets| {
        *sets == assigned()
    });
}
