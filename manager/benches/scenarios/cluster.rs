//! `cluster` (cargo feature `cluster`): a real etcd and three real release `channeld` processes
//! sharing 1,000 fixture accounts with `lease_ttl` 3 s. It times a node's death (`kill -9`) until
//! all its accounts run on the other two, brings the node back, then starts a fourth node and
//! counts the accounts that moved, and where to. Each phase ends when every account runs on the
//! node rendezvous hashing gives it (and on no other). Needs Debian's `etcd-server`
//! (`scripts/install-test-deps`).

use std::{
    collections::BTreeMap,
    fs,
    net::TcpListener,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, ensure};
use channeld::cluster::assignment::owner;
use serde::Serialize;
use serde_json::Value;

use super::{Bench, FIXTURE};

const ACCOUNTS: usize = 1000;
const LEASE_TTL_MS: u64 = 3000;

/// `{"scenario":"cluster",…}`.
#[derive(Serialize)]
struct ClusterReport {
    scenario: &'static str,
    lease_ttl_ms: u64,
    /// `kill -9` of one node → every one of its accounts running on the others.
    failover_ms: u64,
    /// The fraction of all accounts that moved when a fourth node joined.
    moved_fraction: f64,
    /// Whether every account that moved went to the new node.
    moved_all_to_new_node: bool,
    accounts: usize,
    nodes: usize,
    /// How many accounts the dead node ran.
    failed_over: usize,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Node {
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    fn start(exe: &Path, dir: &Path) -> anyhow::Result<Self> {
        let _ = fs::remove_file(dir.join("state/api-address"));
        let log = fs::File::create(dir.join("channeld.log"))?;
        let child = Command::new(exe)
            .args(["run", "--config"])
            .arg(dir.join("channeld.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("running channeld")?;
        Ok(Self {
            dir: dir.to_owned(),
            proc: Some(Proc(child)),
        })
    }

    /// The accounts this node runs, or `None` while its API does not answer.
    fn running(&self) -> Option<Vec<String>> {
        let state = self.dir.join("state");
        let address = fs::read_to_string(state.join("api-address")).ok()?;
        let token = fs::read_to_string(state.join("api-token")).ok()?;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .new_agent();
        let mut response = agent
            .get(&format!("http://{}/v1/status/fixture", address.trim()))
            .header("Authorization", &format!("Bearer {}", token.trim()))
            .call()
            .ok()?;
        let status: Value = response.body_mut().read_json().ok()?;
        Some(
            status["channels"]["fixture"]
                .as_object()?
                .iter()
                .filter(|(_, s)| s["state"] == "running")
                .map(|(a, _)| a.clone())
                .collect(),
        )
    }
}

/// Polls the live nodes (`nodes[i]` is `names[i]`) until every account runs exactly once, on the
/// node rendezvous hashing gives it among them; who runs what.
fn settled(nodes: &[&Node], names: &[&str], what: &str) -> anyhow::Result<BTreeMap<String, usize>> {
    let expected: BTreeMap<String, usize> = (0..ACCOUNTS)
        .map(|i| {
            let owner = owner(&format!("fixture:a{i}"), names).unwrap_or_default();
            let index = names.iter().position(|n| *n == owner).unwrap_or(0);
            (format!("a{i}"), index)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut owners = BTreeMap::new();
        let mut total = 0;
        for (i, node) in nodes.iter().enumerate() {
            for account in node.running().unwrap_or_default() {
                total += 1;
                owners.insert(account, i);
            }
        }
        if total == ACCOUNTS && owners == expected {
            return Ok(owners);
        }
        if Instant::now() >= deadline {
            let misplaced = expected
                .iter()
                .filter(|(a, n)| owners.get(*a) != Some(n))
                .count();
            let mut per_node = vec![0usize; nodes.len()];
            for n in owners.values() {
                per_node[*n] += 1;
            }
            for node in nodes {
                let log = fs::read_to_string(node.dir.join("channeld.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                eprintln!("bench: {}:\n{}", node.dir.display(), tail.join("\n"));
            }
            anyhow::bail!(
                "{what}: {total} running, {} distinct, {misplaced} not where rendezvous hashing \
                 puts them; per node {per_node:?}",
                owners.len()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub(super) fn cluster(bench: &Bench) -> anyhow::Result<String> {
    let fixture = bench.built(FIXTURE)?;
    let exe = bench.plugin_dir.join("channeld");
    ensure!(exe.exists(), "no release channeld at {}", exe.display());
    let scratch = tempfile::tempdir()?;
    fs::set_permissions(scratch.path(), fs::Permissions::from_mode(0o700))?;
    let (client_port, peer_port) = (free_port()?, free_port()?);
    let endpoint = format!("http://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let etcd_log = fs::File::create(scratch.path().join("etcd.log"))?;
    let _etcd = Proc(
        Command::new("etcd")
            .args(["--name", "b", "--data-dir"])
            .arg(scratch.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &endpoint,
                "--advertise-client-urls",
                &endpoint,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("b={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(etcd_log)
            .spawn()
            .context("running etcd (scripts/install-test-deps installs it)")?,
    );
    let mut accounts = String::new();
    for i in 0..ACCOUNTS {
        accounts.push_str(&format!("[channels.fixture.accounts.a{i}]\n"));
    }
    let dirs: Vec<PathBuf> = (1..=4)
        .map(|i| -> anyhow::Result<PathBuf> {
            let dir = scratch.path().join(format!("n{i}"));
            let plugins = dir.join("plugins");
            fs::create_dir_all(&plugins)?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
            fs::set_permissions(&plugins, fs::Permissions::from_mode(0o700))?;
            fs::copy(&fixture, plugins.join("fixture.so"))?;
            fs::write(
                dir.join("channeld.toml"),
                format!(
                    "[host]\napi_address = \"127.0.0.1:0\"\nrescan_interval = \"0s\"\n\
                     [health]\ninterval = \"0s\"\n\
                     [supervisor]\nstartup_accounts_per_channel = 64\n\
                     [cluster]\netcd = [\"{endpoint}\"]\nname = \"bench\"\nnode = \"n{i}\"\n\
                     lease_ttl = \"{LEASE_TTL_MS}ms\"\n\n{accounts}"
                ),
            )?;
            Ok(dir)
        })
        .collect::<anyhow::Result<_>>()?;
    let mut nodes = Vec::new();
    for dir in &dirs[..3] {
        nodes.push(Node::start(&exe, dir)?);
    }
    let all: Vec<&Node> = nodes.iter().collect();
    let before = settled(&all, &["n1", "n2", "n3"], "three nodes")?;
    eprintln!("bench: cluster: 1,000 accounts running on three nodes");

    // kill -9 n3, until its accounts run on n1 and n2.
    let failed_over = before.values().filter(|&&n| n == 2).count();
    let killed = Instant::now();
    nodes[2].proc.take();
    settled(&[&nodes[0], &nodes[1]], &["n1", "n2"], "failover")?;
    let failover_ms = killed.elapsed().as_millis() as u64;
    eprintln!("bench: cluster: {failed_over} accounts failed over in {failover_ms} ms");

    // n3 returns; then n4 joins.
    nodes[2] = Node::start(&exe, &dirs[2])?;
    let all: Vec<&Node> = nodes.iter().collect();
    let three = settled(&all, &["n1", "n2", "n3"], "n3 back")?;
    nodes.push(Node::start(&exe, &dirs[3])?);
    let all: Vec<&Node> = nodes.iter().collect();
    let four = settled(&all, &["n1", "n2", "n3", "n4"], "n4 joined")?;
    let moved: Vec<(&String, usize)> = three
        .iter()
        .filter(|(a, n)| four.get(*a) != Some(n))
        .map(|(a, _)| (a, four[a]))
        .collect();
    Ok(serde_json::to_string(&ClusterReport {
        scenario: "cluster",
        lease_ttl_ms: LEASE_TTL_MS,
        failover_ms,
        moved_fraction: (moved.len() as f64 / ACCOUNTS as f64 * 1000.0).round() / 1000.0,
        moved_all_to_new_node: moved.iter().all(|(_, n)| *n == 3),
        accounts: ACCOUNTS,
        nodes: 3,
        failed_over,
    })?)
}
