//! The StatefulSet controller and kubelet of the stand-in: realizes each StatefulSet's pods
//! as real processes (the image names a binary), each on its own loopback address with its
//! DNS name in /etc/hosts, its PersistentVolumeClaim as a directory, and its readiness from
//! the container's HTTP readiness probe.
//!
//! A container that exits is restarted after two seconds; its exit is recorded in the pod's
//! `containerStatuses` (`lastState.terminated`, with the log's last 2 KiB as the message under
//! `FallbackToLogsOnError`). Secret volumes are directories holding the Secret's keys, and
//! environment values under their mount paths point there.
//!
//! Not emulated: scheduling, resources, probes other than readiness (liveness/startup),
//! growing restart back-off, volumes other than the claim and Secrets.

use super::standin::{collection, Collection, Store};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn sts() -> Collection {
    collection("apps/v1", "statefulsets")
}
pub fn pods() -> Collection {
    collection("v1", "pods")
}
pub fn pvcs() -> Collection {
    collection("v1", "persistentvolumeclaims")
}
pub fn configmaps() -> Collection {
    collection("v1", "configmaps")
}

struct Proc {
    child: Child,
    uid: String,
    started: Instant,
    log: PathBuf,
    binary: PathBuf,
}

pub struct Kubelet {
    pub store: Store,
    pub ns: String,
    /// Third octet of this test's 127.77.x.y addresses.
    pub net: u8,
    pub dir: PathBuf,
    pub images: BTreeMap<String, PathBuf>,
    procs: Mutex<BTreeMap<String, Proc>>,
    hosts: Mutex<Vec<String>>,
    ips: Mutex<BTreeMap<String, u32>>,
    /// Pod names in the order they were deleted through the API (not by scale-down).
    pub deleted: Mutex<Vec<String>>,
    pub stop: AtomicBool,
}

impl Kubelet {
    pub fn new(
        store: Store,
        ns: &str,
        net: u8,
        dir: PathBuf,
        images: BTreeMap<String, PathBuf>,
    ) -> Arc<Kubelet> {
        Arc::new(Kubelet {
            store,
            ns: ns.into(),
            net,
            dir,
            images,
            procs: Mutex::default(),
            hosts: Mutex::default(),
            ips: Mutex::default(),
            deleted: Mutex::default(),
            stop: AtomicBool::new(false),
        })
    }

    /// The pod's own address, stable per pod name (each StatefulSet's pods get their own).
    pub fn ip(&self, pod: &str) -> String {
        let mut ips = self.ips.lock().unwrap();
        let next = ips.len() as u32 + 1;
        let n = *ips.entry(pod.to_string()).or_insert(next);
        format!("127.77.{}.{}", self.net, n)
    }

    /// Runs until `stop`.
    pub fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            while !me.stop.load(Ordering::Relaxed) {
                me.tick().await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }

    async fn tick(&self) {
        let (_, sets) = self.store.list(&sts(), Some(&self.ns), &[]);
        let (_, pod_objs) = self.store.list(&pods(), Some(&self.ns), &[]);
        // Pods deleted through the API: stop their processes (the set recreates them).
        let live: BTreeMap<String, String> = pod_objs
            .iter()
            .map(|p| {
                (
                    name(p),
                    p["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        let gone: Vec<String> = {
            let procs = self.procs.lock().unwrap();
            procs
                .iter()
                .filter(|(n, p)| live.get(*n) != Some(&p.uid))
                .map(|(n, _)| n.clone())
                .collect()
        };
        // Stopping a process waits for it like the kubelet does; keep that off the reactor.
        tokio::task::block_in_place(|| {
            for n in gone {
                self.deleted.lock().unwrap().push(n.clone());
                self.stop_process(&n);
            }
            for set in &sets {
                self.sync_set(set);
            }
        });
        self.probe_readiness().await;
    }

    fn sync_set(&self, set: &Value) {
        let set_name = name(set);
        let replicas = set["spec"]["replicas"].as_u64().unwrap_or(1) as u32;
        let template = &set["spec"]["template"];
        for k in 0..replicas {
            let pod = format!("{set_name}-{k}");
            let claim = format!("data-{pod}");
            if self.store.get(&pvcs(), &self.ns, &claim).is_none() {
                let tpl = &set["spec"]["volumeClaimTemplates"][0];
                let obj = json!({"metadata": {"name": claim, "labels": tpl["metadata"]["labels"]}, "spec": tpl["spec"]});
                let _ = std::fs::remove_dir_all(self.dir.join("volumes").join(&claim));
                self.store.put(&pvcs(), &self.ns, obj, None, true).ok();
            }
            let obj = match self.store.get(&pods(), &self.ns, &pod) {
                Some(o) => o,
                None => {
                    // Deleted through the API since this tick's first look: its process goes.
                    if self.procs.lock().unwrap().contains_key(&pod) {
                        self.deleted.lock().unwrap().push(pod.clone());
                        self.stop_process(&pod);
                    }
                    let obj = json!({
                        "metadata": {"name": pod, "labels": template["metadata"]["labels"],
                            "annotations": template["metadata"]["annotations"]},
                        "spec": template["spec"],
                        "status": {"phase": "Running", "podIP": self.ip(&pod),
                            "conditions": [{"type": "Ready", "status": "False"}]},
                    });
                    match self.store.put(&pods(), &self.ns, obj, None, true) {
                        Ok(o) => o,
                        Err(_) => continue,
                    }
                }
            };
            let (running, exited) = {
                let mut procs = self.procs.lock().unwrap();
                match procs.get_mut(&pod) {
                    Some(p) => match p.child.try_wait() {
                        Ok(None) => (true, None),
                        // The container exited: the kubelet restarts it after a pause.
                        Ok(Some(st)) => (
                            p.started.elapsed() < Duration::from_secs(2),
                            Some((st.code().unwrap_or(137), p.log.clone())),
                        ),
                        Err(_) => (p.started.elapsed() < Duration::from_secs(2), None),
                    },
                    None => (false, None),
                }
            };
            if !running {
                if let Some((code, log)) = exited {
                    self.record_exit(&obj, code, &log);
                }
                self.start_process(&set_name, &obj);
            }
        }
        // Scale-down: pods above the replica count go, their claims by the retention policy.
        let (_, pod_objs) = self.store.list(&pods(), Some(&self.ns), &[]);
        for p in pod_objs {
            let n = name(&p);
            let Some(k) = n
                .strip_prefix(&format!("{set_name}-"))
                .and_then(|k| k.parse::<u32>().ok())
            else {
                continue;
            };
            if k >= replicas {
                self.store.delete(&pods(), &self.ns, &n);
                self.stop_process(&n);
                let policy =
                    set["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"].as_str();
                if policy != Some("Retain") {
                    self.store.delete(&pvcs(), &self.ns, &format!("data-{n}"));
                }
            }
        }
        // Claims deleted through the API lose their data once no pod uses them.
        if let Ok(entries) = std::fs::read_dir(self.dir.join("volumes")) {
            for e in entries.flatten() {
                let claim = e.file_name().to_string_lossy().to_string();
                let pod = claim.trim_start_matches("data-").to_string();
                let used = self.procs.lock().unwrap().contains_key(&pod);
                if !used && self.store.get(&pvcs(), &self.ns, &claim).is_none() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
    }

    /// The container's exit in the pod's status, as the kubelet reports it.
    fn record_exit(&self, pod: &Value, code: i32, log: &std::path::Path) {
        let container = &pod["spec"]["containers"][0];
        let mut terminated =
            json!({"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }});
        if code != 0 && container["terminationMessagePolicy"] == "FallbackToLogsOnError" {
            let text = std::fs::read(log).unwrap_or_default();
            let tail = &text[text.len().saturating_sub(2048)..];
            terminated["message"] = json!(String::from_utf8_lossy(tail));
        }
        let restarts = pod["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .unwrap_or(0)
            + 1;
        let status = json!({"status": {"containerStatuses": [{
            "name": container["name"], "image": container["image"], "imageID": "",
            "ready": false, "restartCount": restarts,
            "state": {"running": {}}, "lastState": {"terminated": terminated},
        }]}});
        let _ = self
            .store
            .patch(&pods(), &self.ns, &name(pod), &status, true, false);
    }

    /// Secret volumes as directories holding the Secret's keys: (mount path, directory) for
    /// each of `container`'s mounts of one.
    fn secret_mounts(&self, pod: &Value, container: &Value) -> Vec<(String, PathBuf)> {
        let pod_name = name(pod);
        let mut out = Vec::new();
        for m in container["volumeMounts"].as_array().into_iter().flatten() {
            let vol_name = m["name"].as_str().unwrap_or_default();
            let Some(vol) = pod["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == vol_name)
            else {
                continue;
            };
            let Some(secret) = vol["secret"]["secretName"].as_str() else {
                continue;
            };
            let dir = self.dir.join("secrets").join(&pod_name).join(vol_name);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            if let Some(sec) = self
                .store
                .get(&collection("v1", "secrets"), &self.ns, secret)
            {
                for (key, v) in sec["data"].as_object().into_iter().flatten() {
                    let raw = super::standin::unbase64(v.as_str().unwrap_or_default());
                    std::fs::write(dir.join(key), raw).unwrap();
                }
            }
            let path = m["mountPath"].as_str().unwrap_or_default().to_string();
            out.push((path, dir));
        }
        out
    }

    fn start_process(&self, set_name: &str, pod: &Value) {
        let pod_name = name(pod);
        self.stop_process(&pod_name);
        let container = &pod["spec"]["containers"][0];
        let volume = self.dir.join("volumes").join(format!("data-{pod_name}"));
        std::fs::create_dir_all(&volume).unwrap();
        // Init containers run to completion first; a failure leaves the pod to retry.
        for (i, init) in pod["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let mounts = self.secret_mounts(pod, init);
            let env = self.container_env(init, &pod_name, &volume, &mounts);
            let binary = self.binary(init);
            let log = std::fs::File::create(
                self.dir
                    .join(format!("{pod_name}.init{i}.{}.log", unix_ms())),
            )
            .unwrap();
            let status = Command::new(binary)
                .args(
                    init["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str()),
                )
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(env)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .status()
                .unwrap();
            if !status.success() {
                std::thread::sleep(Duration::from_millis(500));
                return;
            }
        }
        let binary = self.binary(container);
        let mounts = self.secret_mounts(pod, container);
        let env = self.container_env(container, &pod_name, &volume, &mounts);
        self.add_host(
            &self.ip(&pod_name),
            &format!("{pod_name}.{set_name}-peer.{}.svc", self.ns),
        );
        let log_path = self.dir.join(format!("{pod_name}.{}.log", unix_ms()));
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(&binary)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let uid = pod["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        self.procs.lock().unwrap().insert(
            pod_name,
            Proc {
                child,
                uid,
                started: Instant::now(),
                log: log_path,
                binary,
            },
        );
    }

    fn binary(&self, container: &Value) -> PathBuf {
        let image = container["image"].as_str().unwrap_or_default();
        match self.images.get(image) {
            Some(b) => b.clone(),
            None => panic!("the stand-in has no binary for image {image}"),
        }
    }

    /// A container's environment as the kubelet builds it: envFrom (ConfigMaps, Secrets),
    /// then env in order with $(VAR) references expanded; plus this stand-in's pod network
    /// (listen on the pod's address) and volumes (directories).
    fn container_env(
        &self,
        container: &Value,
        pod_name: &str,
        volume: &std::path::Path,
        mounts: &[(String, PathBuf)],
    ) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = Vec::new();
        for from in container["envFrom"].as_array().into_iter().flatten() {
            if let Some(cm) = from["configMapRef"]["name"].as_str() {
                if let Some(cm) = self.store.get(&configmaps(), &self.ns, cm) {
                    for (key, v) in cm["data"].as_object().into_iter().flatten() {
                        env.push((key.clone(), v.as_str().unwrap_or_default().to_string()));
                    }
                }
            }
            if let Some(secret) = from["secretRef"]["name"].as_str() {
                if let Some(sec) = self
                    .store
                    .get(&collection("v1", "secrets"), &self.ns, secret)
                {
                    for (key, v) in sec["data"].as_object().into_iter().flatten() {
                        let raw = super::standin::unbase64(v.as_str().unwrap_or_default());
                        env.push((key.clone(), String::from_utf8_lossy(&raw).to_string()));
                    }
                }
            }
        }
        for e in container["env"].as_array().into_iter().flatten() {
            let key = e["name"].as_str().unwrap_or_default().to_string();
            let value = if e["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name" {
                pod_name.to_string()
            } else {
                let mut v = e["value"].as_str().unwrap_or_default().to_string();
                for (name, val) in &env {
                    v = v.replace(&format!("$({name})"), val);
                }
                v
            };
            env.retain(|(n, _)| *n != key);
            env.push((key, value));
        }
        for (key, v) in env.iter_mut() {
            if key.starts_with("ETCD_LISTEN_") {
                *v = v.replace("0.0.0.0", &self.ip(pod_name));
            }
            if key == "ETCD_DATA_DIR" {
                *v = v.replace("/var/lib/oxcd", &volume.to_string_lossy());
            }
            for (path, dir) in mounts {
                if let Some(rest) = v.strip_prefix(path.as_str()) {
                    *v = format!("{}{rest}", dir.display());
                }
            }
        }
        env
    }

    /// SIGTERM, then SIGKILL after 10 s, as the kubelet does.
    fn stop_process(&self, pod: &str) {
        let Some(mut p) = self.procs.lock().unwrap().remove(pod) else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(p.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = p.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// The binary each running pod's container runs (its image's), by pod name.
    pub fn binaries(&self) -> BTreeMap<String, PathBuf> {
        self.procs
            .lock()
            .unwrap()
            .iter()
            .map(|(n, p)| (n.clone(), p.binary.clone()))
            .collect()
    }

    /// Deletes a pod through the API, as `kubectl delete pod` would.
    pub fn delete_pod(&self, pod: &str) {
        self.store.delete(&pods(), &self.ns, pod);
    }

    async fn probe_readiness(&self) {
        let (_, pod_objs) = self.store.list(&pods(), Some(&self.ns), &[]);
        for p in pod_objs {
            let n = name(&p);
            let running = self.procs.lock().unwrap().contains_key(&n);
            let ip = p["status"]["podIP"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let probe = &p["spec"]["containers"][0]["readinessProbe"]["httpGet"];
            let path = probe["path"].as_str().unwrap_or("/readyz").to_string();
            let port = probe["port"].as_i64().unwrap_or(2379);
            let ready = running && http_ok(&format!("{ip}:{port}"), &path).await;
            let was = p["status"]["conditions"][0]["status"] == "True";
            if ready != was {
                let status = json!({"status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
                let _ = self
                    .store
                    .patch(&pods(), &self.ns, &n, &status, true, false);
            }
        }
    }

    fn add_host(&self, ip: &str, host: &str) {
        let line = format!("{ip} {host}");
        let mut hosts = self.hosts.lock().unwrap();
        if hosts.contains(&line) {
            return;
        }
        let current = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        if !current.lines().any(|l| l.trim() == line) {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open("/etc/hosts")
                .expect("the stand-in needs to write /etc/hosts (run as root)");
            writeln!(f, "{line}").unwrap();
        }
        hosts.push(line);
    }

    /// Stops every process and removes this test's /etc/hosts lines.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let names: Vec<String> = self.procs.lock().unwrap().keys().cloned().collect();
        for mut p in names
            .iter()
            .filter_map(|n| self.procs.lock().unwrap().remove(n))
        {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        let ours = self.hosts.lock().unwrap().clone();
        if let Ok(current) = std::fs::read_to_string("/etc/hosts") {
            let kept: Vec<&str> = current
                .lines()
                .filter(|l| !ours.iter().any(|o| o == l.trim()))
                .collect();
            let _ = std::fs::write("/etc/hosts", kept.join("\n") + "\n");
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            let mut files: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "log"))
                .collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                out.push_str(&format!("--- {}\n", f.display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn name(o: &Value) -> String {
    o["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

async fn http_ok(addr: &str, path: &str) -> bool {
    // The kubelet gives a probe two seconds.
    let base = format!("http://{addr}");
    let probe = super::http("GET", &base, path);
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok((200, _)))
    )
}
