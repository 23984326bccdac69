//! Real chat servers for the channel tests: an `ngircd` and a `mosquitto` of the test's own, each
//! on a free loopback port with its own config file and directory, in the foreground, stopped when
//! dropped. (`scripts/install-test-deps` installs both; no test touches a system service.)

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::daemon::PATIENCE;

/// A free loopback port (bound and released; the server binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until something accepts connections on `port`.
fn wait_listening(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{what} exited at start: {status}");
        }
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `program args` in the foreground, output to a log file in `dir`.
fn spawn(program: &str, args: &[&str], dir: &std::path::Path) -> Child {
    let log = fs::File::create(dir.join(format!("{program}.log"))).unwrap();
    // Debian installs the servers into /usr/sbin, which a non-root PATH may lack.
    let sbin = format!("/usr/sbin/{program}");
    let path = if std::path::Path::new(&sbin).exists() {
        sbin.as_str()
    } else {
        program
    };
    Command::new(path)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): run scripts/install-test-deps to install it")
        })
}

/// Sends `signal` to `child`.
pub fn signal(child: &Child, signal: i32) {
    signal_pid(child.id(), signal);
}

/// Sends `signal` to the process `pid` (a child of the test's).
pub fn signal_pid(pid: u32, signal: i32) {
    // SAFETY: kill(2) on the pid of our own child.
    unsafe { libc::kill(pid as i32, signal) };
}

/// A throwaway CA, and a server certificate it signed for `127.0.0.1` and `localhost`: PEM files
/// in a directory of their own.
pub struct TestCerts {
    _dir: tempfile::TempDir,
    /// The CA's certificate (what a client trusts).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

impl TestCerts {
    /// Generates them (rcgen, fresh keys each time).
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "channeld test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            fs::write(&path, pem).unwrap();
            path
        };
        Self {
            ca: write("ca.pem", ca.pem()),
            cert: write("server.pem", cert.pem()),
            key: write("server.key", key.serialize_pem()),
            _dir: dir,
        }
    }
}

/// An ngircd of the test's own.
pub struct Ngircd {
    pub port: u16,
    /// Its TLS port, when started with [`Ngircd::start_tls`].
    pub tls_port: Option<u16>,
    /// Config sections after the plain ones (`[SSL]`).
    more: String,
    dir: tempfile::TempDir,
    pub child: Option<Child>,
}

impl Ngircd {
    /// Starts one on a free port: DNS and ident lookups off, in the foreground.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut server = Self {
            port: free_port(),
            tls_port: None,
            more: String::new(),
            dir,
            child: None,
        };
        server.restart();
        server
    }

    /// [`Ngircd::start`], also serving TLS with `certs` on a second free port.
    pub fn start_tls(certs: &TestCerts) -> Self {
        let tls_port = free_port();
        let mut server = Self {
            port: free_port(),
            tls_port: Some(tls_port),
            more: format!(
                "[SSL]\nCertFile = {}\nKeyFile = {}\nPorts = {tls_port}\n",
                certs.cert.display(),
                certs.key.display()
            ),
            dir: tempfile::tempdir().unwrap(),
            child: None,
        };
        server.restart();
        server
    }

    /// Starts it (again) on the same port with the same config.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "ngircd is still running");
        let config = self.dir.path().join("ngircd.conf");
        fs::write(
            &config,
            format!(
                "[Global]\nName = irc.test\nInfo = channeld test server\nListen = 127.0.0.1\n\
                 Ports = {}\nPidFile = {}\nMotdPhrase = test\nServerUID = 0\nServerGID = 0\n\
                 [Limits]\nMaxConnectionsIP = 0\nMaxNickLength = 30\nPingTimeout = 120\nPongTimeout = 20\n\
                 [Options]\nDNS = no\nIdent = no\nPAM = no\n{}",
                self.port,
                self.dir.path().join("ngircd.pid").display(),
                self.more,
            ),
        )
        .unwrap();
        let mut child = spawn(
            "ngircd",
            &["-n", "-p", "-f", config.to_str().unwrap()],
            self.dir.path(),
        );
        wait_listening(self.port, "ngircd", &mut child);
        if let Some(tls_port) = self.tls_port {
            wait_listening(tls_port, "ngircd (TLS)", &mut child);
        }
        self.child = Some(child);
    }

    /// `kill -9` and wait.
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("ngircd.log")).unwrap_or_default()
    }
}

impl Drop for Ngircd {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            signal(child, libc::SIGCONT);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A raw IRC client: a few lines over TCP.
pub struct IrcClient {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    pub nick: String,
}

impl IrcClient {
    /// Connects as `nick` and waits for the welcome.
    pub fn connect(port: u16, nick: &str) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(PATIENCE)).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        let mut client = Self {
            stream,
            reader,
            nick: nick.to_owned(),
        };
        client.say(&format!("NICK {nick}"));
        client.say(&format!("USER {nick} 0 * :test client"));
        client.wait_for(|l| l.split(' ').nth(1) == Some("001"));
        client
    }

    /// Writes one line.
    pub fn say(&mut self, line: &str) {
        self.stream
            .write_all(format!("{line}\r\n").as_bytes())
            .unwrap();
    }

    /// Joins `channel` and waits for its end of NAMES.
    pub fn join(&mut self, channel: &str) {
        self.say(&format!("JOIN {channel}"));
        self.wait_for(|l| l.split(' ').nth(1) == Some("366"));
    }

    /// Reads lines (answering PINGs) until one matches; returns it.
    pub fn wait_for(&mut self, matches: impl Fn(&str) -> bool) -> String {
        loop {
            let line = self.next_line();
            if matches(&line) {
                return line;
            }
        }
    }

    /// The next line from the server (PINGs answered and skipped).
    pub fn next_line(&mut self) -> String {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .unwrap_or_else(|e| panic!("{}: no line from the server in time: {e}", self.nick));
            assert!(n > 0, "{}: the server closed the connection", self.nick);
            let line = line.trim_end_matches(['\r', '\n']).to_owned();
            if let Some(token) = line.strip_prefix("PING ") {
                self.say(&format!("PONG {token}"));
                continue;
            }
            return line;
        }
    }

    /// The nicks in `channel` now (from `NAMES`).
    pub fn names(&mut self, channel: &str) -> Vec<String> {
        self.say(&format!("NAMES {channel}"));
        let mut names = Vec::new();
        loop {
            let line = self.next_line();
            let code = line.split(' ').nth(1);
            if code == Some("353") {
                let list = line.rsplit_once(" :").map_or("", |(_, l)| l);
                names.extend(
                    list.split(' ')
                        .filter(|n| !n.is_empty())
                        .map(|n| n.trim_start_matches(['@', '+']).to_owned()),
                );
            } else if code == Some("366") {
                return names;
            }
        }
    }
}

/// A mosquitto of the test's own, with a persistence file.
pub struct Mosquitto {
    pub port: u16,
    /// Its TLS listener's port, when started with [`Mosquitto::start_tls`].
    pub tls_port: Option<u16>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts one on a free port.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// [`Mosquitto::start`], with a second listener serving TLS with `certs` on a free port.
    pub fn start_tls(certs: &TestCerts) -> Self {
        Self::start_with(Some(certs))
    }

    fn start_with(certs: Option<&TestCerts>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let tls_port = certs.map(|_| free_port());
        let tls = match (certs, tls_port) {
            (Some(certs), Some(tls_port)) => format!(
                "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
                certs.ca.display(),
                certs.cert.display(),
                certs.key.display()
            ),
            _ => String::new(),
        };
        let config = dir.path().join("mosquitto.conf");
        fs::write(
            &config,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n\
                 persistence true\npersistence_location {}/\npersistence_file mosquitto.db\n\
                 log_dest stderr\nlog_type all\nmax_queued_messages 10000\n{tls}",
                dir.path().display()
            ),
        )
        .unwrap();
        let mut child = spawn("mosquitto", &["-c", config.to_str().unwrap()], dir.path());
        wait_listening(port, "mosquitto", &mut child);
        if let Some(tls_port) = tls_port {
            wait_listening(tls_port, "mosquitto (TLS)", &mut child);
        }
        Self {
            port,
            tls_port,
            dir,
            child: Some(child),
        }
    }

    /// `mosquitto_pub` with `args` (MQTT 5, this broker); panics on failure.
    pub fn publish(&self, args: &[&str], stdin: Option<&str>) {
        let mut child = Command::new("mosquitto_pub")
            .args(["-V", "5", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("mosquitto_pub (mosquitto-clients): run scripts/install-test-deps");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        assert!(child.wait().unwrap().success(), "mosquitto_pub {args:?}");
    }

    /// A `mosquitto_sub` on `topic` printing each message as `topic payload`, lines handed over.
    pub fn subscribe(&self, topic: &str) -> Subscriber {
        let mut child = Command::new("mosquitto_sub")
            .args(["-V", "5", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-q", "1", "-v", "-t", topic])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub (mosquitto-clients): run scripts/install-test-deps");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let subscriber = Subscriber { child, lines };
        // The subscription is in place once a probe comes through. Later probes may still be on
        // their way, however late: the subscriber skips them.
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.publish(&["-t", topic, "-m", PROBE], None);
            if let Ok(line) = subscriber.lines.recv_timeout(Duration::from_millis(200)) {
                assert_eq!(line, format!("{topic} {PROBE}"));
                return subscriber;
            }
            assert!(Instant::now() < deadline, "mosquitto_sub never subscribed");
        }
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }

    /// The broker's directory (its persistence file is in it).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The payload [`Mosquitto::subscribe`] probes its subscription with.
const PROBE: &str = "probe-of-the-test-harness";

/// A running `mosquitto_sub`: its lines are `topic payload`.
pub struct Subscriber {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl Subscriber {
    /// The next message line (`topic payload`), skipping the subscription's probes.
    pub fn next(&self) -> String {
        self.next_before(Instant::now() + PATIENCE)
            .expect("no message in time")
    }

    /// Message lines arriving within `wait`, without the subscription's probes.
    pub fn drain(&self, wait: Duration) -> Vec<String> {
        let deadline = Instant::now() + wait;
        std::iter::from_fn(|| self.next_before(deadline)).collect()
    }

    /// The next line that is not a probe, if one arrives before `deadline`.
    fn next_before(&self, deadline: Instant) -> Option<String> {
        loop {
            let line = self
                .lines
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .ok()?;
            if !line.ends_with(&format!(" {PROBE}")) {
                return Some(line);
            }
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
