//! Shared test support: start oxcd or real etcd 3.4 on free loopback ports,
//! wait until they serve, restart / kill them, and run the real `etcdctl`.
//!
//! Every integration test file does `mod support;`; helpers live here only.
//!
//! Environment knobs:
//! * `OXCD_TEST_SERVER=etcd` makes the "subject" server (normally oxcd) a real
//!   etcd as well. Running the suite that way proves the tests and their
//!   normalisations are right before blaming oxcd.
//! * `OXCD_KEEP_TEST_DIRS=1` keeps the temporary data/log directories.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions};

pub const ETCD_BIN: &str = "/usr/bin/etcd";
pub const ETCDCTL_BIN: &str = "/usr/bin/etcdctl";

/// How long a server may take to answer `Status` after being spawned.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for any single etcdctl invocation.
pub const ETCDCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// Which server binary to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Oxcd,
    Etcd,
}

impl Kind {
    /// The server under test: oxcd, unless `OXCD_TEST_SERVER=etcd`.
    pub fn subject() -> Kind {
        match std::env::var("OXCD_TEST_SERVER").as_deref() {
            Ok("etcd") => Kind::Etcd,
            Ok("oxcd") | Ok("") | Err(_) => Kind::Oxcd,
            Ok(other) => panic!("OXCD_TEST_SERVER must be `oxcd` or `etcd`, not {other:?}"),
        }
    }

    pub fn binary(self) -> &'static str {
        match self {
            Kind::Oxcd => env!("CARGO_BIN_EXE_oxcd"),
            Kind::Etcd => ETCD_BIN,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Oxcd => "oxcd",
            Kind::Etcd => "etcd",
        }
    }
}

/// Panics (rather than skipping) when the reference etcd binaries are absent,
/// so CI cannot silently pass without actually comparing against etcd.
pub fn require_etcd() {
    for bin in [ETCD_BIN, ETCDCTL_BIN] {
        if !Path::new(bin).exists() {
            panic!(
                "{bin} is missing: these tests compare oxcd against real etcd 3.4. \
                 Install the Debian packages etcd-server and etcd-client \
                 (scripts/test.sh does this)."
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Ports

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A free loopback port. Ports are drawn at random below the Linux ephemeral
/// range (32768+) so outgoing client connections cannot steal them between
/// our probe and the server's bind, and never handed out twice per process.
pub fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    let mut guard = HANDED_OUT.lock().unwrap();
    let used = guard.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = rng.random_range(20000..32000u16);
        if used.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.insert(port);
            return port;
        }
    }
    panic!("could not find a free loopback port");
}

// ---------------------------------------------------------------------------
// Servers

pub struct Server {
    pub kind: Kind,
    pub name: String,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    client_port: u16,
    peer_port: u16,
    extra_args: Vec<String>,
    child: Option<Child>,
    log_path: PathBuf,
    /// Byte offset in the log file where the current run's output starts.
    log_start: u64,
}

impl Server {
    /// Starts a server of `kind` with a fresh data dir and waits until ready.
    pub async fn start(kind: Kind) -> Server {
        Self::start_with(kind, &[]).await
    }

    /// Like `start`, with extra command-line flags (e.g. `--max-txn-ops=4`).
    pub async fn start_with(kind: Kind, extra_args: &[&str]) -> Server {
        if kind == Kind::Etcd {
            require_etcd();
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("oxcd-test-{}-", kind.label()))
            .tempdir()
            .expect("create temp dir");
        let root = dir.path().to_path_buf();
        let mut server = Server {
            kind,
            name: "node1".to_string(),
            dir: Some(dir),
            log_path: root.join("server.log"),
            root,
            client_port: 0,
            peer_port: 0,
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            child: None,
            log_start: 0,
        };
        if std::env::var_os("OXCD_KEEP_TEST_DIRS").is_some() {
            let dir = server.dir.take().unwrap();
            eprintln!("keeping test dir {}", dir.path().display());
            let _ = dir.keep();
        }
        // A port picked as free can still be grabbed by someone else before
        // the server binds it; retry a fresh start with new ports in that case.
        for attempt in 0..3 {
            server.client_port = free_port();
            server.peer_port = free_port();
            server.spawn();
            match server.wait_ready(READY_TIMEOUT).await {
                Ok(()) => return server,
                Err(why) => {
                    let log = server.current_log();
                    if attempt < 2 && log.contains("address already in use") {
                        server.kill9();
                        continue;
                    }
                    server.kill9();
                    panic!(
                        "{} did not become ready: {why}\n--- server log tail ({}) ---\n{}",
                        kind.label(),
                        server.log_path.display(),
                        tail(&log, 60)
                    );
                }
            }
        }
        unreachable!()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// `<data-dir>/member/wal`, where both etcd and oxcd keep `*.wal` segments.
    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir().join("member").join("wal")
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn args(&self) -> Vec<String> {
        let client = self.endpoint();
        let peer = self.peer_url();
        let mut args = vec![
            "--name".to_string(),
            self.name.clone(),
            "--data-dir".to_string(),
            self.data_dir().display().to_string(),
            "--listen-client-urls".to_string(),
            client.clone(),
            "--advertise-client-urls".to_string(),
            client,
            "--listen-peer-urls".to_string(),
            peer.clone(),
            "--initial-advertise-peer-urls".to_string(),
            peer.clone(),
            "--initial-cluster".to_string(),
            format!("{}={}", self.name, peer),
        ];
        args.extend(self.extra_args.iter().cloned());
        args
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open server log");
        self.log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let child = Command::new(self.kind.binary())
            .args(self.args())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log)
            // Keep etcd from picking up configuration from the environment.
            .env_remove("ETCD_NAME")
            .env_remove("ETCD_DATA_DIR")
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.kind.binary()));
        self.child = Some(child);
    }

    /// Polls `Status` until it succeeds and names a leader, the child exits,
    /// or `timeout` passes.
    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("process exited early with {status}"));
                }
            } else {
                return Err("process is not running".into());
            }
            let attempt = async {
                let mut c = Client::connect(
                    [self.endpoint()],
                    Some(
                        ConnectOptions::new()
                            .with_connect_timeout(Duration::from_millis(500))
                            .with_timeout(Duration::from_secs(2)),
                    ),
                )
                .await?;
                c.status().await
            };
            let last_err = match tokio::time::timeout(Duration::from_secs(3), attempt).await {
                // Ready means serving *and* knowing a leader: a member without
                // one answers Status but cannot serve linearizable requests.
                Ok(Ok(st)) if st.leader() != 0 => return Ok(()),
                Ok(Ok(_)) => "Status reports no leader yet".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "status timed out".to_string(),
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready after {timeout:?}; last error: {last_err}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A client with conservative timeouts, so a hung server fails the test
    /// instead of hanging it.
    pub async fn client(&self) -> Client {
        Client::connect(
            [self.endpoint()],
            Some(
                ConnectOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(15)),
            ),
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "connect to {} at {}: {e}",
                self.kind.label(),
                self.endpoint()
            )
        })
    }

    /// SIGKILL, like a power cut as far as the process is concerned.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Graceful stop: SIGTERM, then SIGKILL if it lingers beyond 10s.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts with the same data dir, ports and flags; waits until ready.
    pub async fn restart(&mut self) {
        self.kill9();
        self.spawn();
        if let Err(why) = self.wait_ready(READY_TIMEOUT).await {
            let log = self.current_log();
            self.kill9();
            panic!(
                "{} did not come back after restart: {why}\n--- server log tail ---\n{}",
                self.kind.label(),
                tail(&log, 60)
            );
        }
    }

    /// Starts the server again (same dir and ports) expecting it to refuse to
    /// start. Returns its exit status (None if it was still running after
    /// `timeout`, in which case it is killed) and this run's log output.
    pub async fn restart_expect_exit(&mut self, timeout: Duration) -> (Option<ExitStatus>, String) {
        self.kill9();
        self.spawn();
        let deadline = Instant::now() + timeout;
        let mut status = None;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.as_mut().unwrap().try_wait() {
                status = Some(s);
                self.child = None;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill9();
        (status, self.current_log())
    }

    /// Whole log file (all runs).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path, 0)
    }

    /// Log output of the current / most recent run only.
    pub fn current_log(&self) -> String {
        read_lossy(&self.log_path, self.log_start)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log(), lines)
    }

    // -- etcdctl ----------------------------------------------------------

    pub async fn etcdctl(&self, args: &[&str]) -> CmdOut {
        etcdctl_at(&self.endpoint(), args, None).await
    }

    pub async fn etcdctl_stdin(&self, args: &[&str], stdin: &str) -> CmdOut {
        etcdctl_at(&self.endpoint(), args, Some(stdin)).await
    }

    /// Spawns a long-running etcdctl (e.g. `watch`) with piped stdout.
    pub fn spawn_etcdctl(&self, args: &[&str]) -> tokio::process::Child {
        require_etcd();
        tokio::process::Command::new(ETCDCTL_BIN)
            .arg(format!("--endpoints={}", self.endpoint()))
            .args(args)
            .env("ETCDCTL_API", "3")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn etcdctl")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
        // When a test fails, show what the server said; the temp dir (and the
        // log with it) is about to be deleted.
        if std::thread::panicking() {
            eprintln!(
                "--- {} log tail ({}) ---\n{}\n--- end of log ---",
                self.kind.label(),
                self.log_path.display(),
                self.log_tail(40)
            );
        }
    }
}

fn read_lossy(path: &Path, from: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(from));
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------
// etcdctl

#[derive(Debug)]
pub struct CmdOut {
    pub stdout: String,
    pub stderr: String,
    pub status: ExitStatus,
    pub args: Vec<String>,
}

impl CmdOut {
    /// Asserts the command succeeded and returns its stdout.
    pub fn ok(&self) -> &str {
        assert!(
            self.status.success(),
            "etcdctl {:?} failed ({}):\nstdout: {}\nstderr: {}",
            self.args,
            self.status,
            self.stdout,
            self.stderr
        );
        &self.stdout
    }

    /// Asserts the command failed and returns its stderr.
    pub fn err(&self) -> &str {
        assert!(
            !self.status.success(),
            "etcdctl {:?} unexpectedly succeeded:\nstdout: {}",
            self.args,
            self.stdout
        );
        &self.stderr
    }
}

/// Runs `/usr/bin/etcdctl --endpoints=<endpoint> <args>` with ETCDCTL_API=3,
/// optionally feeding `stdin`, bounded by `ETCDCTL_TIMEOUT`. If `args`
/// already has an `--endpoints=` flag, `endpoint` is not added (etcdctl would
/// otherwise use both).
pub async fn etcdctl_at(endpoint: &str, args: &[&str], stdin: Option<&str>) -> CmdOut {
    use tokio::io::AsyncWriteExt;
    require_etcd();
    let mut cmd = tokio::process::Command::new(ETCDCTL_BIN);
    if !args.iter().any(|a| a.starts_with("--endpoints=")) {
        cmd.arg(format!("--endpoints={endpoint}"));
    }
    cmd.args(args)
        .env("ETCDCTL_API", "3")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("spawn etcdctl");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes())
            .await
            .expect("write etcdctl stdin");
        drop(pipe);
    }
    let out = tokio::time::timeout(ETCDCTL_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("etcdctl {args:?} did not finish within {ETCDCTL_TIMEOUT:?}"))
        .expect("wait for etcdctl");
    CmdOut {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: out.status,
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

// ---------------------------------------------------------------------------
// gRPC error helpers

/// Extracts (code, message) from an etcd-client error, panicking on
/// non-gRPC errors (transport failures etc. are never an expected outcome).
pub fn grpc_error(err: &etcd_client::Error) -> (tonic::Code, String) {
    match err {
        etcd_client::Error::GRpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a gRPC status error, got {other:?}"),
    }
}

/// Asserts `result` is a gRPC error with exactly this code and message.
#[track_caller]
pub fn assert_grpc_err<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, etcd_client::Error>,
    code: tonic::Code,
    message: &str,
) {
    match result {
        Ok(v) => panic!("{what}: expected error {code:?} {message:?}, got success {v:?}"),
        Err(e) => {
            let (c, m) = grpc_error(&e);
            assert_eq!((c, m.as_str()), (code, message), "{what}: wrong gRPC error");
        }
    }
}
