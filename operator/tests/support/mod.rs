//! Test support for the operator's end-to-end tests: the Kubernetes API stand-in
//! (`standin.rs`), its StatefulSet controller and kubelet (`kubelet.rs`), and `Harness`, which
//! runs the real `oxcd-operator run` binary against them with a kubeconfig.
#![allow(dead_code)]

pub mod kubelet;
pub mod standin;

use kubelet::Kubelet;
use serde_json::{json, Value};
use standin::{collection, Collection, Store};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn clusters() -> Collection {
    collection("oxcd.io/v1alpha1", "etcdclusters")
}

pub fn events() -> Collection {
    collection("events.k8s.io/v1", "events")
}

/// The oxcd server binary, built by the workspace next to the operator.
pub fn oxcd_binary() -> PathBuf {
    let op = PathBuf::from(env!("CARGO_BIN_EXE_oxcd-operator"));
    let oxcd = op.with_file_name("oxcd");
    assert!(
        oxcd.exists(),
        "{} is missing: build the server first (cargo build --release --bin oxcd, or cargo test --workspace)",
        oxcd.display()
    );
    oxcd
}

static NEXT_NET: AtomicU8 = AtomicU8::new(0);

pub struct Harness {
    pub store: Store,
    pub kubelet: Arc<Kubelet>,
    pub ns: String,
    pub api_url: String,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    operator: Option<Child>,
    operator_runs: u32,
    /// Where the running operator serves /healthz, /readyz and /metrics.
    pub operator_http: String,
    /// Every operator process started, killed on drop even if a test panics.
    pids: Vec<u32>,
}

impl Harness {
    /// A stand-in API with its kubelet; `images` maps image references to binaries.
    pub async fn start(images: &[(&str, PathBuf)]) -> Harness {
        // A network (and namespace) of its own for each harness of this process: two tests
        // running at once must never share pod addresses or a namespace.
        let n = NEXT_NET.fetch_add(1, Ordering::Relaxed);
        assert!(n < 16, "at most 16 harnesses per test process");
        let net = 10 + (std::process::id() % 15) as u8 * 16 + n;
        let ns = format!("t{net}");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new();
        let api_url = standin::serve(store.clone()).await;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: standin\n  cluster:\n    server: {api_url}\n\
                 users:\n- name: test\n  user: {{}}\ncontexts:\n- name: test\n  context:\n    cluster: standin\n    user: test\n    namespace: {ns}\n\
                 current-context: test\n"
            ),
        )
        .unwrap();
        let mut images: BTreeMap<String, PathBuf> = images
            .iter()
            .map(|(i, p)| (i.to_string(), p.clone()))
            .collect();
        // Restored clusters run the operator's own image as an init container.
        images.insert(
            oxcd_operator::resources::default_operator_image(),
            PathBuf::from(env!("CARGO_BIN_EXE_oxcd-operator")),
        );
        let kubelet = Kubelet::new(store.clone(), &ns, net, dir.path().to_path_buf(), images);
        kubelet.spawn();
        Harness {
            store,
            kubelet,
            ns,
            api_url,
            dir,
            kubeconfig,
            operator: None,
            operator_runs: 0,
            operator_http: String::new(),
            pids: Vec::new(),
        }
    }

    /// Starts `oxcd-operator run`; `failpoint` is passed as OXCD_OPERATOR_FAILPOINT.
    pub fn start_operator(&mut self, failpoint: Option<&str>) {
        self.stop_operator();
        let (child, http) = self.spawn_operator(failpoint);
        self.operator = Some(child);
        self.operator_http = http;
    }

    /// Another operator replica (its identity is `operator-<n>`); the caller owns it.
    /// Returns the process and its /healthz, /readyz, /metrics URL.
    pub fn spawn_operator(&mut self, failpoint: Option<&str>) -> (Child, String) {
        self.operator_runs += 1;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let log = std::fs::File::create(
            self.dir
                .path()
                .join(format!("operator-{}.log", self.operator_runs)),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_oxcd-operator"));
        cmd.arg("run")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", &self.kubeconfig)
            .env("WATCH_NAMESPACES", &self.ns)
            .env("POD_NAMESPACE", &self.ns)
            .env("POD_NAME", format!("operator-{}", self.operator_runs))
            .env("OXCD_OPERATOR_HTTP_ADDR", &addr)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(fp) = failpoint {
            cmd.env("OXCD_OPERATOR_FAILPOINT", fp);
        }
        let child = cmd.spawn().unwrap();
        self.pids.push(child.id());
        (child, format!("http://{addr}"))
    }

    pub fn stop_operator(&mut self) {
        if let Some(mut c) = self.operator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the operator process to exit by itself.
    pub async fn operator_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.operator.as_mut() {
                if let Ok(Some(s)) = c.try_wait() {
                    self.operator = None;
                    return Some(s);
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Creates an EtcdCluster from a manifest, or merges a spec change into it.
    pub fn apply(&self, manifest: &str) {
        let obj: Value = serde_yaml::from_str(manifest).unwrap();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        match self.store.get(&clusters(), &self.ns, &name) {
            None => {
                self.store
                    .put(&clusters(), &self.ns, obj, None, true)
                    .unwrap();
            }
            Some(_) => {
                self.store
                    .patch(
                        &clusters(),
                        &self.ns,
                        &name,
                        &json!({"spec": obj["spec"]}),
                        false,
                        false,
                    )
                    .unwrap();
            }
        }
    }

    pub fn patch_spec(&self, name: &str, spec: Value) {
        self.store
            .patch(
                &clusters(),
                &self.ns,
                name,
                &json!({"spec": spec}),
                false,
                false,
            )
            .unwrap();
    }

    pub fn cluster(&self, name: &str) -> Value {
        self.store
            .get(&clusters(), &self.ns, name)
            .unwrap_or(Value::Null)
    }

    /// Polls the EtcdCluster until `done` holds; panics with the logs after `timeout`.
    pub async fn wait_for(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.cluster(name);
            if done(&c) {
                return c;
            }
            // An operator that panicked will not get there: fail now, with its log.
            let operator_died = self.operator_log().contains("panicked at");
            if Instant::now() > deadline || operator_died {
                panic!(
                    "timed out waiting for {what}\nstatus: {}\nevents: {:?}\n{}\n--- operator\n{}",
                    serde_json::to_string_pretty(&c["status"]).unwrap_or_default(),
                    self.events(),
                    self.kubelet.logs(),
                    self.operator_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Client URLs of members 0..n of cluster `name`, by their pod DNS names.
    pub fn endpoints(&self, name: &str, n: u32) -> Vec<String> {
        (0..n)
            .map(|k| format!("http://{name}-{k}.{name}-peer.{}.svc:2379", self.ns))
            .collect()
    }

    /// https:// client URLs of members 0..n of cluster `name`.
    pub fn tls_endpoints(&self, name: &str, n: u32) -> Vec<String> {
        self.endpoints(name, n)
            .into_iter()
            .map(|u| u.replace("http://", "https://"))
            .collect()
    }

    /// Certificates for cluster `name`, made with rcgen and stored as Secrets in the
    /// `tls.crt`/`tls.key`/`ca.crt` shape the operator reads: `<name>-server` (the members'
    /// client and peer certificate, valid for every pod DNS name) and `<name>-operator` (the
    /// certificate the operator presents). Returns the CA (PEM) and the client TLS options a
    /// test uses, with the operator's certificate.
    pub fn tls_secrets(&self, name: &str) -> (String, etcd_client::TlsOptions) {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        };
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf = |cn: &str, sans: Vec<String>| {
            let mut p = CertificateParams::new(sans).unwrap();
            p.distinguished_name.push(DnType::CommonName, cn);
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let key = KeyPair::generate().unwrap();
            let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let ns = &self.ns;
        let server = leaf(
            name,
            vec![
                format!("*.{name}-peer.{ns}.svc"),
                format!("{name}.{ns}.svc"),
                "localhost".into(),
            ],
        );
        let operator = leaf("oxcd-operator", vec![]);
        for (secret, (cert, key)) in [
            (format!("{name}-server"), &server),
            (format!("{name}-operator"), &operator),
        ] {
            self.store
                .put(
                    &collection("v1", "secrets"),
                    ns,
                    json!({"metadata": {"name": secret}, "stringData": {
                        "tls.crt": cert, "tls.key": key, "ca.crt": ca.pem()}}),
                    None,
                    true,
                )
                .unwrap();
        }
        let options = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(ca.pem()))
            .identity(etcd_client::Identity::from_pem(&operator.0, &operator.1));
        (ca.pem(), options)
    }

    /// (reason, note) of the operator's Events, oldest first.
    pub fn events(&self) -> Vec<(String, String)> {
        let (_, mut evs) = self.store.list(&events(), Some(&self.ns), &[]);
        evs.sort_by_key(|e| {
            e["metadata"]["resourceVersion"]
                .as_str()
                .and_then(|r| r.parse::<u64>().ok())
                .unwrap_or(0)
        });
        evs.iter()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or_default().to_string(),
                    e["note"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    pub fn operator_log(&self) -> String {
        let mut out = String::new();
        for i in 1..=self.operator_runs {
            let text = std::fs::read_to_string(self.dir.path().join(format!("operator-{i}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- operator run {i}\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// The StatefulSet's replicas as the operator set them.
    pub fn statefulset_replicas(&self, name: &str) -> Option<u64> {
        self.store
            .get(&kubelet::sts(), &self.ns, name)
            .and_then(|s| s["spec"]["replicas"].as_u64())
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop_operator();
        for pid in &self.pids {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
        self.kubelet.shutdown();
    }
}

/// Phase Running, every spec'd member healthy and voting, and the status up to date.
pub fn settled(c: &Value, replicas: u64) -> bool {
    let s = &c["status"];
    s["phase"] == "Running"
        && s["observedGeneration"] == c["metadata"]["generation"]
        && s["readyReplicas"].as_u64() == Some(replicas)
        && s["members"].as_array().is_some_and(|m| {
            m.len() as u64 == replicas
                && m.iter()
                    .all(|m| m["healthy"] == true && m["learner"] != true)
        })
}

/// An S3 endpoint: moto's server (PyPI `moto[server]`, installed by scripts/test.sh).
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub async fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("moto_server is required (pip install 'moto[server]')");
        let endpoint = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while http("GET", &endpoint, "/").await.is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Moto { child, endpoint }
    }

    pub async fn create_bucket(&self, bucket: &str) {
        let (status, body) = http("PUT", &self.endpoint, &format!("/{bucket}"))
            .await
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }

    /// Keys under `prefix` in `bucket`.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let (_, body) = http(
            "GET",
            &self.endpoint,
            &format!("/{bucket}?list-type=2&prefix={prefix}"),
        )
        .await
        .unwrap();
        body.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request; (status, body).
pub async fn http(method: &str, endpoint: &str, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = endpoint.trim_start_matches("http://").to_string();
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&host)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&raw).to_string())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| "timeout".to_string())??;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("bad response")?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
