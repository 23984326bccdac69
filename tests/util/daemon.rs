//! A real `channeld run` process in a temporary directory: its own plugins directory, state
//! directory and config (API on a free port), its stderr collected line by line so tests can wait
//! for log events instead of sleeping.

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

/// How long a test waits for something the daemon should do promptly before failing.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// The collected stderr and whether the stream has ended.
#[derive(Default)]
struct Log {
    lines: Vec<String>,
    closed: bool,
}

/// A running daemon.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    log: Arc<(Mutex<Log>, Condvar)>,
    relative: bool,
}

/// How [`Daemon::start_with`] starts the daemon.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    /// Run (and call the CLI) from the config's directory with `--config channeld.toml`.
    pub relative_config: bool,
    /// Wait until the initial load of the plugins directory is done (not only the API).
    pub wait_loaded: bool,
}

impl Default for Start {
    fn default() -> Self {
        Self {
            relative_config: false,
            wait_loaded: true,
        }
    }
}

/// The names of process `pid`'s threads (none once it is gone).
pub fn thread_names_of(pid: u32) -> Vec<String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| fs::read_to_string(e.ok()?.path().join("comm")).ok())
                .map(|s| s.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// How many of process `pid`'s threads are named `name`, once that count is `want` or
/// [`PATIENCE`] has passed (the caller asserts). Polled, never read once: a new thread takes its
/// name only once it first runs, and a joined one stays listed until the kernel has reaped it,
/// which can be after its join returned.
pub fn threads_named(pid: u32, name: &str, want: usize) -> usize {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let count = thread_names_of(pid).iter().filter(|n| *n == name).count();
        if count == want || Instant::now() > deadline {
            return count;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `channeld` binary under test.
pub fn channeld() -> &'static str {
    env!("CARGO_BIN_EXE_channeld")
}

impl Daemon {
    /// Writes `plugins` (file name → source file) into a private plugins directory, the config
    /// (`[host]` gets `api_address = 127.0.0.1:0` plus `host_extra` lines; `body` follows), and
    /// starts `channeld run`, waiting until its API listens and the plugins directory is loaded.
    pub fn start(
        plugins: &[(&str, PathBuf)],
        host_extra: &str,
        body: &str,
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_with(plugins, host_extra, body, env, Start::default())
    }

    /// [`Daemon::start`] with options.
    pub fn start_with(
        plugins: &[(&str, PathBuf)],
        host_extra: &str,
        body: &str,
        env: &[(&str, &str)],
        how: Start,
    ) -> Self {
        let mut daemon = Self::prepare(plugins, host_extra, body);
        daemon.relative = how.relative_config;
        daemon.spawn(env);
        daemon.wait_for_log("API listening");
        if how.wait_loaded {
            daemon.wait_for_log("plugins directory loaded");
        }
        daemon
    }

    /// Like [`Daemon::start`], but without starting it: for tests that prepare the state
    /// directory first, then call [`Daemon::start_again`] or [`Daemon::run_to_exit`].
    pub fn prepare(plugins: &[(&str, PathBuf)], host_extra: &str, body: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let plugins_dir = dir.path().join("plugins");
        fs::create_dir(&plugins_dir).unwrap();
        fs::set_permissions(&plugins_dir, fs::Permissions::from_mode(0o700)).unwrap();
        for (name, source) in plugins {
            fs::copy(source, plugins_dir.join(name)).unwrap();
        }
        let config = dir.path().join("channeld.toml");
        fs::write(
            &config,
            format!("[host]\napi_address = \"127.0.0.1:0\"\n{host_extra}\n\n{body}\n"),
        )
        .unwrap();
        Self {
            dir,
            config,
            child: None,
            log: Default::default(),
            relative: false,
        }
    }

    /// Starts `channeld run` again on this directory (after [`Daemon::prepare`],
    /// [`Daemon::terminate`] or [`Daemon::kill`]) and waits until its API listens.
    pub fn start_again(&mut self, env: &[(&str, &str)]) {
        assert!(self.child.is_none(), "the daemon is still running");
        self.log = Default::default();
        self.spawn(env);
        self.wait_for_log("API listening");
        self.wait_for_log("plugins directory loaded");
    }

    /// SIGKILL: the daemon gets no chance to clean up.
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Runs `channeld run` on this directory, expecting it to exit by itself (up to
    /// [`PATIENCE`]); its exit status and stderr.
    pub fn run_to_exit(&self) -> (ExitStatus, String) {
        let mut child = Command::new(channeld())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start channeld");
        let deadline = Instant::now() + PATIENCE;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("channeld run did not exit by itself");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        (status, stderr)
    }

    /// `--config` as this daemon is given it (relative to its directory, or absolute).
    fn config_arg(&self) -> PathBuf {
        if self.relative {
            PathBuf::from("channeld.toml")
        } else {
            self.config.clone()
        }
    }

    fn spawn(&mut self, env: &[(&str, &str)]) {
        let mut cmd = Command::new(channeld());
        cmd.arg("run")
            .arg("--config")
            .arg(self.config_arg())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start channeld");
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*log;
                lock.lock().unwrap().lines.push(line);
                cv.notify_all();
            }
            let (lock, cv) = &*log;
            lock.lock().unwrap().closed = true;
            cv.notify_all();
        });
        self.child = Some(child);
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.0.lock().unwrap().lines.join("\n")
    }

    /// Waits (up to [`PATIENCE`]) until a log line contains `needle`; returns it.
    pub fn wait_for_log(&self, needle: &str) -> String {
        self.wait_for_log_count(needle, 1)
    }

    /// Waits until `count` log lines contain `needle`; returns the last.
    pub fn wait_for_log_count(&self, needle: &str, count: usize) -> String {
        let (lock, cv) = &*self.log;
        let deadline = Instant::now() + PATIENCE;
        let mut log = lock.lock().unwrap();
        loop {
            let found: Vec<&String> = log.lines.iter().filter(|l| l.contains(needle)).collect();
            if found.len() >= count {
                return found[count - 1].clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline && !log.closed,
                "channeld never logged {needle:?} ({count}x); log:\n{}",
                log.lines.join("\n")
            );
            log = cv.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// Runs `channeld ARGS --config <this daemon's config>` (from the config's directory).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(channeld())
            .args(args)
            .arg("--config")
            .arg(self.config_arg())
            .current_dir(self.dir.path())
            .output()
            .expect("run channeld CLI")
    }

    /// `channeld status [target] --json`, parsed; panics on failure.
    pub fn status(&self, target: Option<&str>) -> Value {
        let mut args = vec!["status", "--json"];
        args.extend(target);
        let out = self.cli(&args);
        assert!(
            out.status.success(),
            "status failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// One account's snapshot.
    pub fn account(&self, channel: &str, account: &str) -> Value {
        self.status(Some(&format!("{channel}:{account}")))["channels"][channel][account].clone()
    }

    /// Polls the account's snapshot until `ready` holds (the daemon has no event for every
    /// state change a test waits for; the bound turns a regression into a failure, not a hang).
    pub fn wait_for_account(
        &self,
        channel: &str,
        account: &str,
        ready: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // An account whose channel is not there yet reads as `null`.
            let out = self.cli(&["status", "--json", &format!("{channel}:{account}")]);
            let snapshot = if out.status.success() {
                let status: Value = serde_json::from_slice(&out.stdout).unwrap();
                status["channels"][channel][account].clone()
            } else {
                Value::Null
            };
            if ready(&snapshot) {
                return snapshot;
            }
            assert!(
                Instant::now() < deadline,
                "{channel}:{account} never reached the expected state: {snapshot}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The API's address and token, from the state directory.
    pub fn api(&self) -> (String, String) {
        let state = self.dir.path().join("state");
        (
            fs::read_to_string(state.join("api-address")).unwrap(),
            fs::read_to_string(state.join("api-token")).unwrap(),
        )
    }

    /// The names of the daemon's threads.
    pub fn thread_names(&self) -> Vec<String> {
        thread_names_of(self.pid())
    }

    /// [`threads_named`] of the daemon.
    pub fn threads_named(&self, name: &str, want: usize) -> usize {
        threads_named(self.pid(), name, want)
    }

    /// Waits for the daemon to exit by itself (up to [`PATIENCE`]); its status. Its log is
    /// complete afterwards.
    pub fn wait_for_exit(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        let status = self.reap(&mut child, "by itself");
        self.drain_log();
        status
    }

    /// Waits (up to [`PATIENCE`]) for the reader thread to reach the end of the exited
    /// daemon's stderr: its last lines may still be in the pipe when the exit is seen.
    fn drain_log(&self) {
        let (lock, cv) = &*self.log;
        let deadline = Instant::now() + PATIENCE;
        let mut log = lock.lock().unwrap();
        while !log.closed {
            let now = Instant::now();
            assert!(now < deadline, "channeld's stderr never closed");
            log = cv.wait_timeout(log, deadline - now).unwrap().0;
        }
    }

    /// Waits (up to [`PATIENCE`]) for `child` to exit; fails naming `how` it should have.
    fn reap(&self, child: &mut std::process::Child, how: &str) -> ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "channeld did not exit {how}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGTERM and waits for the exit (up to [`PATIENCE`]).
    pub fn terminate(&mut self) -> (ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let pid = child.id() as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = self.reap(&mut child, "after SIGTERM");
        self.drain_log();
        (status, self.log())
    }

    /// The plugins directory.
    pub fn plugins_dir(&self) -> PathBuf {
        self.dir.path().join("plugins")
    }

    /// The config file's directory.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
