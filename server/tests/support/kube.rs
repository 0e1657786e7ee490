//! A real Kubernetes control plane on loopback: kube-apiserver, kube-controller-manager and
//! kube-scheduler of the release pinned in `e2e/k8s-ref/` (built from `k8s.io/kubernetes` on
//! first use, cached outside the checkout), storing their state in the etcd endpoints a test
//! gives them. Certificates come from the test PKI, clients authenticate with static tokens, and
//! RBAC is on: the controller manager runs each controller with its own service account and the
//! scheduler with its bootstrap role, as kubeadm sets them up. `kubectl` is the same release.
//!
//! No kubelet runs: Pods are created, scheduled and bound, never started.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::pki::Ca;
use super::{free_port, run_ok, tail, CmdOut};

/// How long one kubectl call may take before the test calls it hung.
const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the API server may take to report ready (it lists every resource from storage).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The path of a Kubernetes binary of the pinned release (`e2e/k8s-ref/bin.sh <cmd>`).
pub fn k8s_ref(cmd: &str) -> &'static str {
    static PATHS: Mutex<Vec<(String, &'static str)>> = Mutex::new(Vec::new());
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, p)) = paths.iter().find(|(k, _)| k == cmd) {
        return p;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../e2e/k8s-ref/bin.sh");
    let path = run_ok(
        &format!("e2e/k8s-ref/bin.sh {cmd}"),
        Command::new(script).arg(cmd),
    );
    let path: &'static str = Box::leak(path.trim().to_string().into_boxed_str());
    paths.push((cmd.to_string(), path));
    path
}

/// One control-plane process and its log.
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

pub struct ControlPlane {
    dir: tempfile::TempDir,
    pub port: u16,
    /// The administrator's kubeconfig (a member of `system:masters`).
    pub kubeconfig: PathBuf,
    components: Vec<Component>,
}

/// Static tokens: (token, user, groups). Tokens are random per control plane.
fn users() -> Vec<(String, &'static str, &'static str)> {
    let token = || format!("{:032x}", rand::random::<u128>());
    vec![
        (token(), "admin", "system:masters"),
        (token(), "system:kube-controller-manager", ""),
        (token(), "system:kube-scheduler", ""),
    ]
}

impl ControlPlane {
    /// Starts the API server on `etcd_servers` (with `apiserver_args` added), then the
    /// controller manager and the scheduler, and waits until the API server is ready.
    pub async fn start(etcd_servers: &[String], apiserver_args: &[&str]) -> ControlPlane {
        let apiserver = k8s_ref("kube-apiserver");
        let dir = tempfile::Builder::new()
            .prefix("oxcd-test-k8s-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let ca = Ca::new(&root.join("pki"), "kubernetes-ca");
        let serving = ca.issue("apiserver", "kube-apiserver");
        // The service-account signing key (ECDSA P-256): the API server signs with the private
        // half (PKCS#8), checks with the public half, and so does the controller manager.
        let sa = rcgen::KeyPair::generate().expect("sa key");
        let sa_key = root.join("pki/sa-key.pem");
        let sa_pub = root.join("pki/sa.pub");
        std::fs::write(&sa_key, sa.serialize_pem()).expect("write sa key");
        std::fs::write(&sa_pub, sa.public_key_pem()).expect("write sa public key");
        let users = users();
        let tokens = root.join("tokens.csv");
        let csv: String = users
            .iter()
            .enumerate()
            .map(|(i, (t, u, g))| format!("{t},{u},uid-{i},\"{g}\"\n"))
            .collect();
        std::fs::write(&tokens, csv).expect("write tokens");
        let port = free_port();
        let server = format!("https://127.0.0.1:{port}");
        let kubeconfig = |file: &str, token: &str| -> PathBuf {
            let path = root.join(file);
            std::fs::write(
                &path,
                format!(
                    "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    \
                     server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  \
                     user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    \
                     cluster: test\n    user: user\ncurrent-context: test\n",
                    ca.pem.display()
                ),
            )
            .expect("write kubeconfig");
            path
        };
        let admin = kubeconfig("admin.kubeconfig", &users[0].0);
        let kcm = kubeconfig("controller-manager.kubeconfig", &users[1].0);
        let scheduler = kubeconfig("scheduler.kubeconfig", &users[2].0);

        let mut plane = ControlPlane {
            port,
            kubeconfig: admin,
            components: Vec::new(),
            dir,
        };
        let sa = sa_key.display().to_string();
        let sa_pub = sa_pub.display().to_string();
        let mut args: Vec<String> = vec![
            format!("--etcd-servers={}", etcd_servers.join(",")),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", root.join("pki").display()),
            format!("--tls-cert-file={}", serving.cert.display()),
            format!("--tls-private-key-file={}", serving.key.display()),
            format!("--client-ca-file={}", ca.pem.display()),
            format!("--token-auth-file={}", tokens.display()),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={sa_pub}"),
            format!("--service-account-signing-key-file={sa}"),
            // The `kubernetes` Service's endpoints would be 127.0.0.1, which Endpoints refuse.
            "--endpoint-reconciler-type=none".into(),
        ];
        args.extend(apiserver_args.iter().map(|s| s.to_string()));
        plane.spawn("kube-apiserver", apiserver, &args);
        plane.wait_ready().await;
        plane.spawn(
            "kube-controller-manager",
            k8s_ref("kube-controller-manager"),
            &[
                format!("--kubeconfig={}", kcm.display()),
                format!("--service-account-private-key-file={sa}"),
                format!("--root-ca-file={}", ca.pem.display()),
                "--use-service-account-credentials=true".into(),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()),
                // A Node without a kubelet is marked unreachable after this long; tests that
                // bind Pods to one finish well within it.
                "--node-monitor-grace-period=5m".into(),
            ],
        );
        plane.spawn(
            "kube-scheduler",
            k8s_ref("kube-scheduler"),
            &[
                format!("--kubeconfig={}", scheduler.display()),
                "--leader-elect=false".into(),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", free_port()),
            ],
        );
        plane
    }

    fn spawn(&mut self, name: &'static str, bin: &str, args: &[String]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let out = File::create(&log).expect("create log");
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        self.components.push(Component { name, child, log });
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let out = self.kubectl(&["get", "--raw", "/readyz"]).await;
            if out.status.success() && out.stdout.trim() == "ok" {
                return;
            }
            for c in &mut self.components {
                if let Ok(Some(status)) = c.child.try_wait() {
                    panic!("{} exited ({status}):\n{}", c.name, tail(&read(&c.log), 40));
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "kube-apiserver not ready within {READY_TIMEOUT:?}: {}\n{}",
                    out.stderr,
                    tail(&self.log("kube-apiserver"), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The log of one component so far.
    pub fn log(&self, name: &str) -> String {
        self.components
            .iter()
            .find(|c| c.name == name)
            .map(|c| read(&c.log))
            .unwrap_or_default()
    }

    /// Runs kubectl of the same release as the administrator.
    pub async fn kubectl(&self, args: &[&str]) -> CmdOut {
        self.kubectl_stdin(args, None).await
    }

    /// `kubectl apply -f -` of `manifest` (YAML or JSON).
    pub async fn apply(&self, manifest: &str) -> CmdOut {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(manifest))
            .await
    }

    pub async fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> CmdOut {
        use tokio::io::AsyncWriteExt;
        let mut child = self
            .kubectl_command(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn kubectl");
        if let Some(input) = stdin {
            let mut pipe = child.stdin.take().expect("kubectl stdin");
            pipe.write_all(input.as_bytes()).await.expect("write stdin");
        }
        let out = tokio::time::timeout(KUBECTL_TIMEOUT, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("kubectl {args:?} hung for {KUBECTL_TIMEOUT:?}"))
            .expect("wait for kubectl");
        CmdOut {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            status: out.status,
            args: std::iter::once("kubectl")
                .chain(args.iter().copied())
                .map(String::from)
                .collect(),
        }
    }

    /// A kubectl command as the administrator, for tests that read its output as it runs
    /// (`kubectl get -w`).
    pub fn kubectl_command(&self, args: &[&str]) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(k8s_ref("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args);
        cmd
    }

    /// The API server's `/metrics`, as text.
    pub async fn metrics(&self) -> String {
        self.kubectl(&["get", "--raw", "/metrics"])
            .await
            .ok()
            .to_string()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn read(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // Clients first, then the API server.
        for c in self.components.iter_mut().rev() {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        if std::thread::panicking() {
            for c in &self.components {
                eprintln!(
                    "--- {} log tail ({}) ---\n{}\n--- end ---",
                    c.name,
                    c.log.display(),
                    tail(&read(&c.log), 30)
                );
            }
            if std::env::var_os("OXCD_KEEP_TEST_DIRS").is_some() {
                let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
                eprintln!("keeping {}", dir.path().display());
                let _ = dir.keep();
            }
        }
    }
}
