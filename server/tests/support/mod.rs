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

pub mod hosts;
pub mod kube;
pub mod pki;

/// How a test reaches a TLS server: which URLs are https://, the CA it trusts and the
/// certificate it presents. The server's own TLS flags are the test's extra arguments.
#[derive(Clone, Debug, Default)]
pub struct TlsClient {
    pub client_https: bool,
    /// Also listen on the same client port with http:// (one port, both schemes).
    pub client_plain_too: bool,
    pub peer_https: bool,
    pub ca: Option<PathBuf>,
    /// Trust the pair `--auto-tls` generates: `<data-dir>/<this path>`.
    pub ca_in_data_dir: Option<&'static str>,
    pub identity: Option<pki::Leaf>,
}

impl TlsClient {
    fn apply(&self, opts: ConnectOptions, data_dir: &Path) -> ConnectOptions {
        if !self.client_https {
            return opts;
        }
        let mut tls = etcd_client::TlsOptions::new();
        let ca = self
            .ca
            .clone()
            .or_else(|| self.ca_in_data_dir.map(|p| data_dir.join(p)));
        // A generated CA may not be written yet while a server starts: connecting then
        // fails, and readiness polling tries again.
        if let Some(pem) = ca.and_then(|ca| std::fs::read(ca).ok()) {
            tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
        }
        if let Some(id) = &self.identity {
            tls = tls.identity(etcd_client::Identity::from_pem(
                std::fs::read(&id.cert).expect("read cert"),
                std::fs::read(&id.key).expect("read key"),
            ));
        }
        opts.with_tls(tls)
    }

    /// etcdctl's flags for the same.
    pub fn etcdctl_args(&self, data_dir: &Path) -> Vec<String> {
        let mut a = Vec::new();
        let ca = self
            .ca
            .clone()
            .or_else(|| self.ca_in_data_dir.map(|p| data_dir.join(p)));
        if let Some(ca) = &ca {
            a.push(format!("--cacert={}", ca.display()));
        }
        if let Some(id) = &self.identity {
            a.push(format!("--cert={}", id.cert.display()));
            a.push(format!("--key={}", id.key.display()));
        }
        a
    }
}

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
    /// Debian's etcd 3.4.
    Etcd,
    /// etcd 3.6 and 3.7, built from etcd's Go modules (`e2e/etcd-ref`).
    Etcd36,
    Etcd37,
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
            Kind::Etcd36 => etcd_ref("3.6", "etcd"),
            Kind::Etcd37 => etcd_ref("3.7", "etcd"),
        }
    }

    /// The etcdctl of the same release (Debian's 3.4 for oxcd and etcd 3.4).
    pub fn etcdctl(self) -> &'static str {
        match self {
            Kind::Oxcd | Kind::Etcd => ETCDCTL_BIN,
            Kind::Etcd36 => etcd_ref("3.6", "etcdctl"),
            Kind::Etcd37 => etcd_ref("3.7", "etcdctl"),
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Oxcd => "oxcd",
            Kind::Etcd => "etcd",
            Kind::Etcd36 => "etcd-3.6",
            Kind::Etcd37 => "etcd-3.7",
        }
    }
}

/// The path of `cmd` (etcd, etcdctl or etcdutl) of etcd `minor` (3.6 or 3.7), built from
/// etcd's Go modules by `e2e/etcd-ref/bin.sh` on first use and cached outside the checkout.
pub fn etcd_ref(minor: &str, cmd: &str) -> &'static str {
    static PATHS: Mutex<Vec<(String, &'static str)>> = Mutex::new(Vec::new());
    let key = format!("{minor} {cmd}");
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = paths.iter().find(|(k, _)| *k == key) {
        return p;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/etcd-ref/bin.sh");
    let path = run_ok(
        &format!("e2e/etcd-ref/bin.sh {minor} {cmd}"),
        Command::new(script).args([minor, cmd]),
    );
    let path: &'static str = Box::leak(path.trim().to_string().into_boxed_str());
    paths.push((key, path));
    path
}

/// The etcd release oxcd's behaviour is compared with: etcd 3.6 (`version::SERVER_VERSION`).
/// Debian's etcd 3.4 (`Kind::Etcd`) stays the reference for old clients and backups.
pub const REFERENCE: Kind = Kind::Etcd36;

/// Starts the reference etcd and the subject with the same extra flags, side by side (for
/// tests that run each scenario on both).
pub async fn both(extra: &[&str]) -> [Server; 2] {
    let (a, b) = tokio::join!(
        Server::start_with(REFERENCE, extra),
        Server::start_with(Kind::subject(), extra)
    );
    [a, b]
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
    /// Cluster bootstrap flags (`--initial-cluster`, token, state). Empty for a
    /// single-member server, which then lists only itself.
    cluster_flags: Vec<String>,
    child: Option<Child>,
    /// Set for servers with https:// URLs (`start_tls`).
    pub tls: TlsClient,
    log_path: PathBuf,
    /// Byte offset in the log file where the current run's output starts.
    log_start: u64,
    /// Set when the server runs on a host of its own (a network namespace): it listens on
    /// every address there, advertises its host name and is reached at the host's address.
    host: Option<hosts::Host>,
    /// Set when the server runs from its container image, unpacked here (`oci-image.py run`).
    image: Option<PathBuf>,
}

impl Server {
    /// Starts a server of `kind` with a fresh data dir and waits until ready.
    pub async fn start(kind: Kind) -> Server {
        Self::start_with(kind, &[]).await
    }

    /// Like `start`, with extra command-line flags (e.g. `--max-txn-ops=4`).
    pub async fn start_with(kind: Kind, extra_args: &[&str]) -> Server {
        Self::start_tls(kind, extra_args, TlsClient::default()).await
    }

    /// Starts a server whose URLs use https:// as `tls` says; `extra_args` carry its TLS flags.
    pub async fn start_tls(kind: Kind, extra_args: &[&str], tls: TlsClient) -> Server {
        let mut server = Server::unstarted(
            kind,
            "node1",
            &extra_args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        );
        server.tls = tls;
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
                    if attempt < 2 && log.to_lowercase().contains("address already in use") {
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

    /// A server with a fresh temp dir (data dir + log file) that has not been
    /// spawned yet and has no ports assigned.
    fn unstarted(kind: Kind, name: &str, extra_args: &[String]) -> Server {
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
            name: name.to_string(),
            dir: Some(dir),
            log_path: root.join("server.log"),
            root,
            client_port: 0,
            peer_port: 0,
            extra_args: extra_args.to_vec(),
            cluster_flags: Vec::new(),
            child: None,
            tls: TlsClient::default(),
            log_start: 0,
            host: None,
            image: None,
        };
        if std::env::var_os("OXCD_KEEP_TEST_DIRS").is_some() {
            let dir = server.dir.take().unwrap();
            eprintln!("keeping test dir {}", dir.path().display());
            let _ = dir.keep();
        }
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        match &self.image {
            // The image's own ETCD_DATA_DIR, in its volume.
            Some(image) => image.join("rootfs/var/lib/oxcd/data"),
            None => self.root.join("data"),
        }
    }

    /// `<data-dir>/member/wal`, where both etcd and oxcd keep `*.wal` segments.
    pub fn wal_dir(&self) -> PathBuf {
        self.data_dir().join("member").join("wal")
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// `http://127.0.0.1:PORT` (https:// for a TLS server)
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.client_https {
            "https"
        } else {
            "http"
        };
        let ip = self.host.as_ref().map_or("127.0.0.1", |h| h.ip.as_str());
        format!("{scheme}://{ip}:{}", self.client_port)
    }

    /// The peer URL it advertises: on a host of its own, by the host's name.
    pub fn peer_url(&self) -> String {
        let scheme = if self.tls.peer_https { "https" } else { "http" };
        let host = self.host.as_ref().map_or("127.0.0.1", |h| h.name.as_str());
        format!("{scheme}://{host}:{}", self.peer_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    fn args(&self) -> Vec<String> {
        let mut client = self.endpoint();
        let peer = self.peer_url();
        let mut listen = if self.tls.client_plain_too {
            format!("{client},http://127.0.0.1:{}", self.client_port)
        } else {
            client.clone()
        };
        let mut listen_peer = peer.clone();
        if let Some(h) = &self.host {
            // As a pod: listen everywhere in its own namespace, advertise its name.
            listen = format!("http://0.0.0.0:{}", self.client_port);
            listen_peer = format!("http://0.0.0.0:{}", self.peer_port);
            client = format!("http://{}:{}", h.name, self.client_port);
        }
        let mut args = vec!["--name".to_string(), self.name.clone()];
        if self.image.is_none() {
            args.push("--data-dir".to_string());
            args.push(self.data_dir().display().to_string());
        }
        args.extend([
            "--listen-client-urls".to_string(),
            listen,
            "--advertise-client-urls".to_string(),
            client,
            "--listen-peer-urls".to_string(),
            listen_peer,
            "--initial-advertise-peer-urls".to_string(),
            peer.clone(),
        ]);
        if self.cluster_flags.is_empty() {
            args.push("--initial-cluster".to_string());
            args.push(format!("{}={}", self.name, peer));
        } else {
            args.extend(self.cluster_flags.iter().cloned());
        }
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
        let mut cmd = match (&self.host, &self.image) {
            (None, _) => Command::new(self.kind.binary()),
            // `ip netns exec` execs, so the child's pid is the server's.
            (Some(h), None) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &h.ns, self.kind.binary()]);
                c
            }
            // runc in the foreground (the child), the server in its container; signals go
            // through `runc kill` (see `signal`).
            (Some(h), Some(dir)) => {
                let mut c = Command::new("python3");
                c.arg(OCI_IMAGE_PY)
                    .args(["run", "--runc", &h.ns, &h.ns])
                    .arg(dir);
                c
            }
        };
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log fd"))
            .stderr(log);
        // Keep etcd (and oxcd, which reads the same variables) from picking up
        // configuration from the environment.
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("ETCD_")) {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.kind.binary()));
        self.child = Some(child);
    }

    /// Whether the process is still running (reaps it if it has exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    /// Waits up to `timeout` for the process to exit on its own. Returns its
    /// exit status, or None if it is still running (it is left running) or
    /// was not running in the first place.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut()?;
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Status` of this member with short timeouts (for polling).
    pub async fn status(&self) -> Result<etcd_client::StatusResponse, String> {
        let attempt = async {
            let mut c = Client::connect(
                [self.endpoint()],
                Some(
                    self.tls.apply(
                        ConnectOptions::new()
                            .with_connect_timeout(Duration::from_millis(500))
                            .with_timeout(Duration::from_secs(2)),
                        &self.data_dir(),
                    ),
                ),
            )
            .await?;
            c.status().await
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(st)) => Ok(st),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("status timed out".to_string()),
        }
    }

    /// A linearizable Range without credentials: Ok when the server refuses it only for want
    /// of a user (it has passed the read barrier, which needs a leader).
    async fn linearizable_probe(&self) -> Result<(), String> {
        let attempt = async {
            let mut c = self
                .connect(ConnectOptions::new().with_timeout(Duration::from_secs(2)))
                .await?;
            c.get("health", None).await
        };
        match tokio::time::timeout(Duration::from_secs(3), attempt).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.to_string().contains("user name is empty") => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("linearizable read timed out".to_string()),
        }
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
            let last_err = match self.status().await {
                // Ready means serving *and* knowing a leader: a member without
                // one answers Status but cannot serve linearizable requests.
                Ok(st) if st.leader() != 0 => return Ok(()),
                Ok(_) => "Status reports no leader yet".to_string(),
                // etcd 3.6 answers Status only to a user when auth is on: then a
                // linearizable read refused for want of a user shows a leader was reached.
                Err(e) if e.contains("user name is empty") => match self.linearizable_probe().await
                {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready after {timeout:?}; last error: {last_err}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A plain (no TLS) gRPC channel to this member, for requests the etcd-client crate cannot
    /// make: etcd 3.6's fields such as MemberList's `linearizable`, raw messages.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(self.endpoint())
            .expect("endpoint")
            .timeout(Duration::from_secs(15))
            .connect()
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.kind.label()))
    }

    /// A client with conservative timeouts, so a hung server fails the test
    /// instead of hanging it.
    pub async fn client(&self) -> Client {
        self.connect(ConnectOptions::new())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connect to {} at {}: {e}",
                    self.kind.label(),
                    self.endpoint()
                )
            })
    }

    /// Connects with `opts` plus the bounded timeouts and this server's TLS.
    async fn connect(&self, opts: ConnectOptions) -> Result<Client, etcd_client::Error> {
        let opts = opts
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(15));
        Client::connect(
            [self.endpoint()],
            Some(self.tls.apply(opts, &self.data_dir())),
        )
        .await
    }

    /// A client that authenticates as `user` when it connects (the etcd-client crate's
    /// `with_user`); the error is the server's answer to Authenticate.
    pub async fn client_as(
        &self,
        user: &str,
        password: &str,
    ) -> Result<Client, etcd_client::Error> {
        self.connect(ConnectOptions::new().with_user(user, password))
            .await
    }

    /// The runc container ID of a server run from the image.
    fn container(&self) -> Option<&str> {
        self.image
            .as_ref()
            .and(self.host.as_ref().map(|h| h.ns.as_str()))
    }

    /// Sends `sig` (KILL, TERM, STOP, CONT) to the server process: to a container through
    /// `runc kill` (runc cannot forward SIGKILL or SIGSTOP sent to itself).
    fn signal(&self, sig: &str) {
        let Some(child) = self.child.as_ref() else {
            return;
        };
        match self.container() {
            Some(id) => {
                let _ = Command::new("runc").args(["kill", id, sig]).output();
            }
            None => {
                let _ = Command::new("kill")
                    .args([&format!("-{sig}"), &child.id().to_string()])
                    .output();
            }
        }
    }

    /// The server's own pid (in a container: its init, as `runc state` reports it).
    pub fn server_pid(&self) -> Option<u32> {
        let Some(id) = self.container() else {
            return self.pid();
        };
        let out = Command::new("runc").args(["state", id]).output().ok()?;
        let state: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        state["pid"].as_u64().map(|p| p as u32)
    }

    /// SIGSTOP: the process stays, answering nothing, until `resume`.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal("CONT");
    }

    /// SIGKILL, like a power cut as far as the process is concerned.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        if let Some(mut child) = self.child.take() {
            if self.container().is_some() {
                // runc exits with its container; if it never started one, end runc itself.
                let deadline = Instant::now() + Duration::from_secs(5);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            if let Some(id) = self.container() {
                let _ = Command::new("runc")
                    .args(["delete", "--force", id])
                    .output();
            }
        }
    }

    /// Graceful stop: SIGTERM, then SIGKILL if it lingers beyond 10s.
    /// Returns the exit status if the process exited by itself after SIGTERM
    /// (None if it had to be killed or was not running).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.signal("TERM");
        if let Some(child) = self.child.as_mut() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Some(status);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill9();
        None
    }

    /// Adds a flag to every later start of this server (e.g. `--force-new-cluster`).
    pub fn push_arg(&mut self, arg: &str) {
        self.extra_args.push(arg.to_string());
    }

    /// Drops a flag added with `push_arg` from later starts.
    pub fn remove_arg(&mut self, arg: &str) {
        self.extra_args.retain(|a| a != arg);
    }

    /// Spawns the server again (same data dir, ports and flags) without
    /// waiting for it; see `wait_until_ready`.
    pub fn respawn(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Waits until the server answers `Status` naming a leader; panics with
    /// the log tail if it does not within `READY_TIMEOUT`.
    pub async fn wait_until_ready(&mut self) {
        if let Err(why) = self.wait_ready(READY_TIMEOUT).await {
            let log = self.current_log();
            self.kill9();
            panic!(
                "{} {} did not become ready: {why}\n--- server log tail ({}) ---\n{}",
                self.kind.label(),
                self.name,
                self.log_path.display(),
                tail(&log, 60)
            );
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
        self.etcdctl_with_tls(args, None).await
    }

    pub async fn etcdctl_stdin(&self, args: &[&str], stdin: &str) -> CmdOut {
        self.etcdctl_with_tls(args, Some(stdin)).await
    }

    /// etcdctl against this server, with the TLS flags its `tls` calls for first.
    async fn etcdctl_with_tls(&self, args: &[&str], stdin: Option<&str>) -> CmdOut {
        let tls = self.tls.etcdctl_args(&self.data_dir());
        let all: Vec<&str> = tls
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
            .collect();
        require_etcd();
        etcdctl_bin_at(self.kind.etcdctl(), &self.endpoint(), &all, stdin).await
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
                "--- {} {} log tail ({}) ---\n{}\n--- end of log ---",
                self.kind.label(),
                self.name,
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

/// The sum of the samples of metric `family` in Prometheus text whose label sets contain every
/// one of `labels` (each a piece such as `success="true"` or `From=`).
pub fn metric_sum(text: &str, family: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, rest) = series.split_once('{').unwrap_or((series, ""));
            (name == family && labels.iter().all(|p| rest.contains(p)))
                .then(|| value.parse::<f64>().ok())
                .flatten()
        })
        .sum()
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
            "command {:?} failed ({}):\nstdout: {}\nstderr: {}",
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
            "command {:?} unexpectedly succeeded:\nstdout: {}",
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
    require_etcd();
    etcdctl_bin_at(ETCDCTL_BIN, endpoint, args, stdin).await
}

/// The etcdctl binaries the etcdctl suite runs: (label, path). etcd 3.6's first (the
/// reference's own), then 3.7's and Debian's 3.4 for newer and older clients.
pub fn etcdctls() -> [(&'static str, &'static str); 3] {
    require_etcd();
    [
        ("etcdctl 3.6", etcd_ref("3.6", "etcdctl")),
        ("etcdctl 3.7", etcd_ref("3.7", "etcdctl")),
        ("etcdctl 3.4", ETCDCTL_BIN),
    ]
}

/// Like `etcdctl_at`, with the etcdctl binary at `bin`.
pub async fn etcdctl_bin_at(
    bin: &str,
    endpoint: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> CmdOut {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(bin);
    if !args.iter().any(|a| a.starts_with("--endpoints=")) {
        cmd.arg(format!("--endpoints={endpoint}"));
    }
    // etcdctl 3.4 needs ETCDCTL_API=3; 3.6 speaks only v3 and warns about the variable.
    if bin == ETCDCTL_BIN {
        cmd.env("ETCDCTL_API", "3");
    } else {
        cmd.env_remove("ETCDCTL_API");
    }
    cmd.args(args)
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

/// `snapshot restore <backup> <args>` with the kind's own tool: `oxcd snapshot restore` or
/// etcd 3.4's `etcdctl snapshot restore`.
pub fn snapshot_restore(kind: Kind, backup: &Path, args: &[&str]) -> CmdOut {
    snapshot_tool(kind, "restore", backup, args)
}

/// `snapshot <verb> <file> <args>` with oxcd's or etcdctl's offline tool.
pub fn snapshot_tool(kind: Kind, verb: &str, file: &Path, args: &[&str]) -> CmdOut {
    let mut cmd = match kind {
        Kind::Oxcd => Command::new(Kind::Oxcd.binary()),
        Kind::Etcd => {
            require_etcd();
            let mut c = Command::new(ETCDCTL_BIN);
            c.env("ETCDCTL_API", "3");
            c
        }
        // etcd 3.6 moved the offline snapshot commands to etcdutl.
        Kind::Etcd36 => Command::new(etcd_ref("3.6", "etcdutl")),
        Kind::Etcd37 => Command::new(etcd_ref("3.7", "etcdutl")),
    };
    cmd.arg("snapshot").arg(verb).arg(file).args(args);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("run {} snapshot {verb}: {e}", kind.label()));
    let mut all = vec![
        "snapshot".to_string(),
        verb.to_string(),
        file.display().to_string(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    CmdOut {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        status: out.status,
        args: all,
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

// ---------------------------------------------------------------------------
// Clusters

/// Raft timing of test clusters (ms): short, so that elections are quick.
pub const CLUSTER_HEARTBEAT_MS: u64 = 50;
pub const CLUSTER_ELECTION_MS: u64 = 500;
/// How long `Cluster::leader` waits for some member to claim leadership.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(15);

static CLUSTER_SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static CLUSTER_TESTS: Mutex<()> = Mutex::new(());

/// Serialises multi-member tests within one test binary: each runs 3-5 server
/// processes with sub-second election timeouts, and several such clusters at
/// once on a small machine starve each other into spurious elections. Hold the
/// guard for the whole test.
pub fn serial_cluster_test() -> std::sync::MutexGuard<'static, ()> {
    CLUSTER_TESTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Connect options for cluster clients: bounded, so that a request to a dead
/// or partitioned member fails instead of hanging the test.
pub fn cluster_connect_options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(15))
}

/// One key as read back from a member: (key, value, create_revision,
/// mod_revision, version, lease).
pub type DumpedKv = (String, String, i64, i64, i64, i64);

/// Key-values as comparable tuples (key, value, create, mod, version, lease).
pub fn dumped(kvs: &[etcd_client::KeyValue]) -> Vec<DumpedKv> {
    kvs.iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.version(),
                kv.lease(),
            )
        })
        .collect()
}

/// The keys attached to a lease, sorted.
pub fn lease_keys(ttl: &etcd_client::LeaseTimeToLiveResponse) -> Vec<String> {
    let mut keys: Vec<String> = ttl
        .keys()
        .iter()
        .map(|k| String::from_utf8_lossy(k).into_owned())
        .collect();
    keys.sort();
    keys
}

/// An N-member cluster of oxcd (or real etcd) processes on loopback ports, each
/// member a `Server` with its own temp data dir and log file. Members keep their
/// index for the whole test, also after being stopped or removed.
pub struct Cluster {
    pub kind: Kind,
    /// `--initial-cluster-token`, unique per cluster.
    pub token: String,
    pub members: Vec<Server>,
    /// Raft member IDs, by index.
    ids: Vec<u64>,
    /// Members removed from the cluster with MemberRemove.
    removed: Vec<bool>,
    /// Flags every member gets (Raft timing plus the caller's).
    extra_args: Vec<String>,
    /// The members' hosts, when each runs on one of its own (`start_on_hosts`).
    pub net: Option<hosts::Net>,
}

/// How the members of a cluster run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Placement {
    /// Processes on loopback ports.
    Loopback,
    /// Each member on a host of its own (a network namespace), by name, as pods are.
    Hosts,
    /// Like `Hosts`, each member run from the server's container image
    /// (`scripts/build-image.sh`) by runc, in its host's network namespace.
    Image,
}

pub const OCI_IMAGE_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/oci-image.py");

/// The server image built once per test process from the binary under test, with the
/// project's own script, into cargo's temp dir for tests (one file, rewritten by each run: a
/// static is never dropped, so a temp dir here would outlive the process).
static SERVER_IMAGE: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Runs `cmd`, panicking with `what` and its stderr unless it succeeds; returns its stdout.
pub fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn server_image() -> PathBuf {
    SERVER_IMAGE
        .get_or_init(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("oxcd-test-image.oci.tar");
            run_ok(
                "the image build",
                Command::new("bash")
                    .arg(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/../scripts/build-image.sh"
                    ))
                    .arg("oxcd:test")
                    .env("OXCD", Kind::Oxcd.binary())
                    .env("OUT", &out),
            );
            out
        })
        .clone()
}

impl Cluster {
    /// Starts `n` members with `--initial-cluster-state new` and waits until
    /// each answers `Status` naming a leader.
    pub async fn start(kind: Kind, n: usize) -> Cluster {
        Self::start_with(kind, n, &[]).await
    }

    /// Like `start`, with extra flags for every member (e.g. `--snapshot-count`).
    pub async fn start_with(kind: Kind, n: usize, extra: &[&str]) -> Cluster {
        Self::start_inner(
            kind,
            n,
            extra,
            None,
            TlsClient::default(),
            Placement::Loopback,
        )
        .await
    }

    /// `n` members, each on a host of its own (or from the image), so the test can cut
    /// members off each other (`net`), pause and kill them.
    pub async fn start_on_hosts(
        kind: Kind,
        n: usize,
        extra: &[&str],
        placement: Placement,
    ) -> Cluster {
        Self::start_inner(kind, n, extra, None, TlsClient::default(), placement).await
    }

    /// Like `start_with`, with https:// URLs as `tls` says (the TLS flags go in `extra`).
    pub async fn start_tls(kind: Kind, n: usize, extra: &[&str], tls: TlsClient) -> Cluster {
        Self::start_inner(kind, n, extra, None, tls, Placement::Loopback).await
    }

    /// Starts `n` members whose data dirs are first restored from an etcd-format backup
    /// with the kind's own tool (`oxcd snapshot restore` or `etcdctl snapshot restore`).
    pub async fn start_from_backup(kind: Kind, n: usize, backup: &Path) -> Cluster {
        Self::start_from_backup_restored_by(kind, n, backup, kind).await
    }

    /// Like `start_from_backup`, with the data dirs made by `tool`'s `snapshot restore`
    /// (etcdctl's for an oxcd cluster: the runbook of an etcd user).
    pub async fn start_from_backup_restored_by(
        kind: Kind,
        n: usize,
        backup: &Path,
        tool: Kind,
    ) -> Cluster {
        Self::start_inner(
            kind,
            n,
            &[],
            Some((backup, tool)),
            TlsClient::default(),
            Placement::Loopback,
        )
        .await
    }

    /// Stops every member cleanly and starts `kind`'s binary on the same data dirs, ports and
    /// flags (oxcd taking over etcd's data dirs in place); waits until each is ready.
    pub async fn replace_binary(&mut self, kind: Kind) {
        for m in self.members.iter_mut() {
            m.stop();
        }
        self.kind = kind;
        for m in self.members.iter_mut() {
            m.kind = kind;
            m.spawn();
        }
        for m in self.members.iter_mut() {
            m.wait_until_ready().await;
        }
    }

    async fn start_inner(
        kind: Kind,
        n: usize,
        extra: &[&str],
        backup: Option<(&Path, Kind)>,
        tls: TlsClient,
        placement: Placement,
    ) -> Cluster {
        assert!(n >= 1);
        let seq = CLUSTER_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let token = format!(
            "oxcd-test-{}-{seq}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut extra_args = vec![
            "--heartbeat-interval".to_string(),
            CLUSTER_HEARTBEAT_MS.to_string(),
            "--election-timeout".to_string(),
            CLUSTER_ELECTION_MS.to_string(),
        ];
        extra_args.extend(extra.iter().map(|s| s.to_string()));
        let mut members: Vec<Server> = (1..=n)
            .map(|i| {
                let mut m = Server::unstarted(kind, &format!("n{i}"), &extra_args);
                m.tls = tls.clone();
                m
            })
            .collect();
        let net = (placement != Placement::Loopback).then(|| {
            let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
            hosts::Net::create(&names)
        });
        if let Some(net) = &net {
            let image = (placement == Placement::Image).then(server_image);
            for (m, h) in members.iter_mut().zip(&net.hosts) {
                m.host = Some(h.clone());
                // The ports a pod's container has.
                (m.client_port, m.peer_port) = (2379, 2380);
                if let Some(archive) = &image {
                    let dir = m.root.join("image");
                    run_ok(
                        "unpacking the image",
                        Command::new("python3")
                            .arg(OCI_IMAGE_PY)
                            .arg("unpack")
                            .arg(archive)
                            .arg(&dir),
                    );
                    m.image = Some(dir);
                }
            }
        }
        for attempt in 0..3 {
            if net.is_none() {
                for m in members.iter_mut() {
                    m.client_port = free_port();
                    m.peer_port = free_port();
                }
            }
            let initial = members
                .iter()
                .map(|m| format!("{}={}", m.name, m.peer_url()))
                .collect::<Vec<_>>()
                .join(",");
            for m in members.iter_mut() {
                m.cluster_flags = vec![
                    "--initial-cluster".to_string(),
                    initial.clone(),
                    "--initial-cluster-token".to_string(),
                    token.clone(),
                    "--initial-cluster-state".to_string(),
                    "new".to_string(),
                ];
                if let Some((backup, tool)) = backup {
                    let _ = std::fs::remove_dir_all(m.data_dir());
                    let out = snapshot_restore(
                        tool,
                        backup,
                        &[
                            "--name",
                            &m.name,
                            "--initial-cluster",
                            &initial,
                            "--initial-cluster-token",
                            &token,
                            "--initial-advertise-peer-urls",
                            &m.peer_url(),
                            "--data-dir",
                            &m.data_dir().display().to_string(),
                        ],
                    );
                    out.ok();
                }
                m.spawn();
            }
            let mut failure = None;
            for m in members.iter_mut() {
                if let Err(why) = m.wait_ready(READY_TIMEOUT).await {
                    failure = Some(format!("{}: {why}", m.name));
                    break;
                }
            }
            let Some(failure) = failure else { break };
            let port_clash = members.iter().any(|m| {
                m.current_log()
                    .to_lowercase()
                    .contains("address already in use")
            });
            let logs: Vec<String> = members
                .iter()
                .map(|m| {
                    format!(
                        "--- {} log tail ---\n{}",
                        m.name,
                        tail(&m.current_log(), 40)
                    )
                })
                .collect();
            for m in members.iter_mut() {
                m.kill9();
            }
            if port_clash && attempt < 2 {
                // The data dirs were bootstrapped with the old peer URLs.
                for m in &members {
                    let _ = std::fs::remove_dir_all(m.data_dir());
                }
                continue;
            }
            panic!(
                "{}-member {} cluster did not start: {failure}\n{}",
                n,
                kind.label(),
                logs.join("\n")
            );
        }
        let mut cluster = Cluster {
            kind,
            token,
            ids: vec![0; members.len()],
            removed: vec![false; members.len()],
            members,
            extra_args,
            net,
        };
        for i in 0..n {
            match cluster.members[i].status().await {
                Ok(st) => cluster.ids[i] = st.header().expect("status header").member_id(),
                // A cluster restored from a backup with auth on answers Status only to a user
                // (etcd 3.6's requireAuthInfo): its IDs stay unknown (0) to the harness.
                Err(e) if e.contains("user name is empty") => {}
                Err(e) => panic!("status of n{}: {e}", i + 1),
            }
        }
        cluster
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Raft member ID of member `i`.
    pub fn id(&self, i: usize) -> u64 {
        self.ids[i]
    }

    /// Index of the member with this ID.
    pub fn index_of(&self, id: u64) -> Option<usize> {
        self.ids.iter().position(|x| *x == id)
    }

    pub fn is_removed(&self, i: usize) -> bool {
        self.removed[i]
    }

    /// Indexes of the members that have not been removed (running or not).
    pub fn current(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|i| !self.removed[*i])
            .collect()
    }

    /// Client URLs of all members that have not been removed (also of members
    /// that are down at the moment, as a client's configuration would have them).
    pub fn endpoints(&self) -> Vec<String> {
        self.current()
            .into_iter()
            .map(|i| self.members[i].endpoint())
            .collect()
    }

    /// An etcd-client connected to all `endpoints()`.
    pub async fn client(&self) -> Client {
        self.client_to(self.endpoints()).await
    }

    async fn client_to(&self, eps: Vec<String>) -> Client {
        let opts = self.members[0]
            .tls
            .apply(cluster_connect_options(), &self.members[0].data_dir());
        Client::connect(&eps, Some(opts))
            .await
            .unwrap_or_else(|e| panic!("connect to {eps:?}: {e}"))
    }

    /// An etcd-client connected to every current member but `down`: etcd-client's balancer
    /// keeps sending calls to a dead endpoint until its connect fails, so a test that has
    /// stopped a member talks to the others through this.
    pub async fn client_without(&self, down: usize) -> Client {
        let eps: Vec<String> = self
            .current()
            .into_iter()
            .filter(|i| *i != down)
            .map(|i| self.members[i].endpoint())
            .collect();
        self.client_to(eps).await
    }

    /// An etcd-client connected to member `i` only.
    pub async fn member_client(&self, i: usize) -> Client {
        let ep = self.members[i].endpoint();
        let opts = self.members[i]
            .tls
            .apply(cluster_connect_options(), &self.members[i].data_dir());
        Client::connect([&ep], Some(opts))
            .await
            .unwrap_or_else(|e| panic!("connect to {ep}: {e}"))
    }

    pub fn kill9(&mut self, i: usize) {
        self.members[i].kill9();
    }

    /// Graceful stop (SIGTERM); see `Server::stop`.
    pub fn stop(&mut self, i: usize) -> Option<ExitStatus> {
        self.members[i].stop()
    }

    /// Restarts member `i` with its existing data dir and the same flags, and
    /// waits until it is ready (serving and knowing a leader).
    pub async fn restart(&mut self, i: usize) {
        self.members[i].respawn();
        self.members[i].wait_until_ready().await;
    }

    /// Restarts every member that has not been removed: all are spawned first
    /// (none can elect a leader alone), then each is waited for.
    pub async fn restart_all(&mut self) {
        for i in self.current() {
            self.members[i].respawn();
        }
        for i in self.current() {
            self.members[i].wait_until_ready().await;
        }
    }

    /// Polls every current member's `Status` once; returns (index, term) of a
    /// member that reports itself as leader (the highest term if several do).
    pub async fn try_leader(&self) -> Option<(usize, u64)> {
        let mut best: Option<(usize, u64)> = None;
        for i in self.current() {
            if let Ok(st) = self.members[i].status().await {
                let me = st.header().map(|h| h.member_id()).unwrap_or(0);
                if me != 0 && st.leader() == me && best.is_none_or(|(_, t)| st.raft_term() > t) {
                    best = Some((i, st.raft_term()));
                }
            }
        }
        best
    }

    /// Index of the member whose `Status` says it is the leader; panics if
    /// none does within `LEADER_TIMEOUT`.
    pub async fn leader(&self) -> usize {
        let start = Instant::now();
        loop {
            if let Some((i, _)) = self.try_leader().await {
                return i;
            }
            if start.elapsed() > LEADER_TIMEOUT {
                panic!(
                    "no member reports being leader after {LEADER_TIMEOUT:?}; statuses:\n{}",
                    self.describe().await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until a member other than `old` reports being leader; returns it
    /// and how long that took. Panics after `timeout`.
    pub async fn wait_for_leader_change(&self, old: usize, timeout: Duration) -> (usize, Duration) {
        let start = Instant::now();
        loop {
            if let Some((i, _)) = self.try_leader().await {
                if i != old {
                    return (i, start.elapsed());
                }
            }
            if start.elapsed() > timeout {
                panic!(
                    "leadership did not move away from n{} within {timeout:?}; statuses:\n{}",
                    old + 1,
                    self.describe().await
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One line per member with its Status (or why there is none), for panics.
    pub async fn describe(&self) -> String {
        let mut out = Vec::new();
        for (i, m) in self.members.iter().enumerate() {
            let state = if self.removed[i] { " (removed)" } else { "" };
            let st = match m.status().await {
                Ok(st) => format!(
                    "leader={:x} term={} raft_index={} applied={} learner={}",
                    st.leader(),
                    st.raft_term(),
                    st.raft_index(),
                    st.raft_applied_index(),
                    st.is_learner()
                ),
                Err(e) => format!("no status: {e}"),
            };
            out.push(format!(
                "  {} id={:x} {}{state}: {st}",
                m.name,
                self.ids[i],
                m.endpoint()
            ));
        }
        out.join("\n")
    }

    /// MemberAdd (through `client()`) of a new member on fresh ports, without
    /// starting it. Returns its index; start it with `start_added_member`.
    pub async fn member_add_unstarted(&mut self, learner: bool) -> usize {
        let name = format!("n{}", self.members.len() + 1);
        let mut m = Server::unstarted(self.kind, &name, &self.extra_args);
        m.tls = self.members[0].tls.clone();
        m.client_port = free_port();
        m.peer_port = free_port();
        let mut client = self.client().await;
        // etcd refuses reconfiguration until every voter has been connected
        // for 5s ("etcdserver: unhealthy cluster", Unavailable); retry that
        // and other Unavailable errors, bounded. An attempt whose answer was
        // lost may have been applied: then the URL "already exists".
        let start = Instant::now();
        let mut retried = false;
        let (new_id, members) = loop {
            let attempt = client
                .member_add(
                    [m.peer_url()],
                    Some(if learner {
                        etcd_client::MemberAddOptions::new().with_is_learner()
                    } else {
                        etcd_client::MemberAddOptions::new()
                    }),
                )
                .await;
            match attempt {
                Ok(resp) => {
                    let new = resp.member().expect("MemberAdd response names the member");
                    assert_eq!(
                        new.peer_urls(),
                        [m.peer_url()],
                        "MemberAdd echoes the peer URLs"
                    );
                    assert_eq!(
                        new.is_learner(),
                        learner,
                        "MemberAdd echoes the learner flag"
                    );
                    break (new.id(), resp.member_list().to_vec());
                }
                Err(e) => {
                    let (code, msg) = grpc_error(&e);
                    if retried && msg == "etcdserver: Peer URLs already exists" {
                        let list = client.member_list().await.expect("member list");
                        let me = list
                            .members()
                            .iter()
                            .find(|x| x.peer_urls() == [m.peer_url()])
                            .expect("member with our peer URL")
                            .id();
                        break (me, list.members().to_vec());
                    }
                    if code != tonic::Code::Unavailable || start.elapsed() > Duration::from_secs(30)
                    {
                        panic!("MemberAdd {name} (learner={learner}): {e}");
                    }
                    retried = true;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        // --initial-cluster: the started members as the cluster knows them,
        // plus the new one (members added but not started have no name yet).
        let mut initial = Vec::new();
        for member in &members {
            let member_name = if member.id() == new_id {
                name.clone()
            } else {
                member.name().to_string()
            };
            if member_name.is_empty() {
                continue;
            }
            for u in member.peer_urls() {
                initial.push(format!("{member_name}={u}"));
            }
        }
        m.cluster_flags = vec![
            "--initial-cluster".to_string(),
            initial.join(","),
            "--initial-cluster-token".to_string(),
            self.token.clone(),
            "--initial-cluster-state".to_string(),
            "existing".to_string(),
        ];
        self.members.push(m);
        self.ids.push(new_id);
        self.removed.push(false);
        self.members.len() - 1
    }

    /// Starts a member announced with `member_add_unstarted` and waits until ready.
    pub async fn start_added_member(&mut self, i: usize) {
        self.members[i].respawn();
        self.members[i].wait_until_ready().await;
    }

    /// MemberAdd plus starting the new member with `--initial-cluster-state existing`.
    pub async fn add_member(&mut self, learner: bool) -> usize {
        let i = self.member_add_unstarted(learner).await;
        self.start_added_member(i).await;
        i
    }

    /// Member `i` loses its data: killed, its data dir deleted, and its later starts told to
    /// join the existing cluster (what a pod restarted on an empty volume gets).
    pub fn lose_data(&mut self, i: usize) {
        let m = &mut self.members[i];
        m.kill9();
        let _ = std::fs::remove_dir_all(m.data_dir());
        if let Some(state) = m
            .cluster_flags
            .iter()
            .position(|f| f == "--initial-cluster-state")
        {
            m.cluster_flags[state + 1] = "existing".to_string();
        }
    }

    /// Records that member `i` has been removed (e.g. by a MemberRemove the
    /// test sent itself); it no longer counts for `endpoints()` or `leader()`.
    pub fn mark_removed(&mut self, i: usize) {
        self.removed[i] = true;
    }

    /// Waits until member `i`'s member list shows every current member with
    /// its name and client URLs (etcd publishes them before serving clients,
    /// so with etcd this holds as soon as all members are ready).
    pub async fn wait_all_published(&self, i: usize, timeout: Duration) {
        let start = Instant::now();
        let mut c = self.member_client(i).await;
        loop {
            let list = c.member_list().await.expect("member list");
            let published = self.current().into_iter().all(|j| {
                list.members().iter().any(|m| {
                    m.id() == self.ids[j]
                        && m.name() == self.members[j].name
                        && m.client_urls() == [self.members[j].endpoint()]
                })
            });
            if published {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "members not published within {timeout:?}: {:?}",
                    list.members()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Serializable range over all keys, answered by member `i` alone.
    pub async fn dump(&self, i: usize) -> Vec<DumpedKv> {
        let mut c = self.member_client(i).await;
        let resp = c
            .get(
                "",
                Some(
                    etcd_client::GetOptions::new()
                        .with_all_keys()
                        .with_serializable(),
                ),
            )
            .await
            .unwrap_or_else(|e| panic!("serializable range on {}: {e}", self.members[i].name));
        dumped(resp.kvs())
    }

    /// (revision from a serializable count-only range, raft applied index) of member `i`.
    pub async fn progress(&self, i: usize) -> Result<(i64, u64), String> {
        let attempt = async {
            let m = &self.members[i];
            let mut c = Client::connect(
                [m.endpoint()],
                Some(
                    m.tls.apply(
                        ConnectOptions::new()
                            .with_connect_timeout(Duration::from_millis(500))
                            .with_timeout(Duration::from_secs(2)),
                        &m.data_dir(),
                    ),
                ),
            )
            .await?;
            let rev = c
                .get(
                    "",
                    Some(
                        etcd_client::GetOptions::new()
                            .with_all_keys()
                            .with_serializable()
                            .with_count_only(),
                    ),
                )
                .await?
                .header()
                .map(|h| h.revision())
                .unwrap_or(0);
            let applied = c.status().await?.raft_applied_index();
            Ok::<_, etcd_client::Error>((rev, applied))
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".to_string()),
        }
    }

    /// Waits until every current member reports the same revision and Raft
    /// applied index (twice in a row, 200ms apart); returns that revision.
    pub async fn wait_converged(&self, timeout: Duration) -> i64 {
        let start = Instant::now();
        let mut previous: Option<(i64, u64)> = None;
        loop {
            let mut seen = Vec::new();
            for i in self.current() {
                seen.push((self.members[i].name.clone(), self.progress(i).await));
            }
            let first = seen.first().and_then(|(_, r)| r.as_ref().ok()).copied();
            let all_same =
                first.is_some() && seen.iter().all(|(_, r)| r.as_ref().ok().copied() == first);
            if all_same && previous == first {
                let rev = first.unwrap().0;
                // Same revision and applied index; the key spaces must then hash the same
                // (etcd's HashKV, as etcd's own corruption check compares members).
                let mut hashes = Vec::new();
                for i in self.current() {
                    let c = self.member_client(i).await;
                    let h = c
                        .maintenance_client()
                        .hash_kv(rev)
                        .await
                        .map(|r| r.hash())
                        .map_err(|e| e.to_string());
                    hashes.push((self.members[i].name.clone(), h));
                }
                let h0 = hashes[0].1.clone();
                assert!(
                    h0.is_ok() && hashes.iter().all(|(_, h)| *h == h0),
                    "members at revision {rev} hash differently: {hashes:?}"
                );
                return rev;
            }
            previous = if all_same { first } else { None };
            if start.elapsed() > timeout {
                panic!(
                    "members did not converge within {timeout:?}: (revision, applied index) = {seen:?}\n{}",
                    self.describe().await
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Spawns, without waiting for it, a process that is *not* a member of this
    /// cluster: `--initial-cluster-state new` with the given `token`. With
    /// `impersonate = Some(i)` it takes member `i`'s name, ports and
    /// `--initial-cluster` (member `i` must be down) on a fresh data dir;
    /// otherwise it is a new name on fresh ports whose `--initial-cluster` is
    /// the current members plus itself. The caller owns (and kills) it.
    pub fn spawn_outsider(&self, token: &str, impersonate: Option<usize>) -> Server {
        let (name, client_port, peer_port) = match impersonate {
            Some(i) => (
                self.members[i].name.clone(),
                self.members[i].client_port,
                self.members[i].peer_port,
            ),
            None => (
                format!("x{}", self.members.len() + 1),
                free_port(),
                free_port(),
            ),
        };
        let mut m = Server::unstarted(self.kind, &name, &self.extra_args);
        m.client_port = client_port;
        m.peer_port = peer_port;
        let mut initial: Vec<String> = self
            .current()
            .into_iter()
            .map(|i| format!("{}={}", self.members[i].name, self.members[i].peer_url()))
            .collect();
        if impersonate.is_none() {
            initial.push(format!("{}={}", m.name, m.peer_url()));
        }
        m.cluster_flags = vec![
            "--initial-cluster".to_string(),
            initial.join(","),
            "--initial-cluster-token".to_string(),
            token.to_string(),
            "--initial-cluster-state".to_string(),
            "new".to_string(),
        ];
        m.spawn();
        m
    }

    /// Runs etcdctl with `--endpoints` set to all `endpoints()`.
    pub async fn etcdctl(&self, args: &[&str]) -> CmdOut {
        etcdctl_at(&self.endpoints().join(","), args, None).await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} cluster {} ---", self.kind.label(), self.token);
            for (i, m) in self.members.iter().enumerate() {
                eprintln!(
                    "  {} id={:x} client={} peer={}{}",
                    m.name,
                    self.ids[i],
                    m.endpoint(),
                    m.peer_url(),
                    if self.removed[i] { " (removed)" } else { "" }
                );
            }
        }
        // Each member's own Drop kills its process (and prints its log tail
        // when panicking).
        for m in self.members.iter_mut() {
            m.kill9();
        }
    }
}

pub mod linearizability;

/// An HTTP/1.1 response as a test sees it: status, headers (lower-case names) and body.
pub struct HttpResponse {
    pub status: u16,
    pub headers: std::collections::BTreeMap<String, String>,
    pub body: String,
}

/// Sends one HTTP/1.1 request to `endpoint` (`http://host:port`) and reads the whole response
/// (the request asks the server to close the connection). Bounded by a 10 s timeout.
pub async fn http_request(
    method: &str,
    endpoint: &str,
    path: &str,
) -> Result<HttpResponse, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = endpoint.trim_start_matches("http://");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(host)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("{method} {endpoint}{path}: timed out"))??;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP header in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad status line in {text:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect::<std::collections::BTreeMap<_, _>>();
    let body = if headers.get("transfer-encoding").map(String::as_str) == Some("chunked") {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
