//! Kubernetes itself on oxcd. A real kube-apiserver, kube-controller-manager and kube-scheduler
//! (the release pinned in `e2e/k8s-ref/`, see `support::kube`) keep their state in a 3-member
//! cluster while the test drives them with kubectl. The same scenario runs on etcd 3.6 first:
//! everything Kubernetes shows of its store must be the same on oxcd, and each step also has
//! an absolute check, so a scenario that silently does nothing cannot pass.

mod support;

use std::time::{Duration, Instant};

use etcd_client::{CompactionOptions, GetOptions};
use serde_json::Value;
use support::kube::ControlPlane;
use support::{Cluster, Kind, REFERENCE};
use tokio::io::{AsyncBufReadExt, BufReader};

/// What Kubernetes showed of its store, compared between etcd 3.6 and oxcd.
#[derive(Debug, PartialEq)]
struct Seen {
    /// No endpoint failed kube-apiserver's RequestWatchProgress check (its etcd version gate).
    watch_progress_supported: bool,
    /// Consistent lists were served from the watch cache (which needs the check to pass).
    consistent_lists_from_cache: bool,
    secret: String,
    /// ReplicaSets of the Deployment, and its Pods bound to the test's Node.
    replica_sets: usize,
    pods_bound: usize,
    widget_size: String,
    widget_refused: String,
    /// The TTL kube-apiserver granted the lease of an Event.
    event_lease_ttl: i64,
    /// (type, name) of the events of a watch resumed from a resourceVersion.
    resumed_watch: Vec<(String, String)>,
    /// What `kubectl get -w` printed: the initial value, then the update.
    get_w: Vec<String>,
    /// The second page of a paginated list whose first page was read before a compaction.
    continue_after_compaction: Result<Vec<String>, String>,
    /// A watch from a resourceVersion the store has compacted.
    watch_from_compacted: Result<Vec<(String, String)>, String>,
    /// kube-apiserver's own compactor compacted the store (its `compact_rev_key` exists).
    apiserver_compacted: bool,
    /// ConfigMaps created after one member was killed with SIGKILL.
    created_after_kill: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_stores_its_state_as_on_etcd() {
    let _serial = support::serial_cluster_test();
    let reference = scenario(REFERENCE).await;
    let subject = scenario(Kind::subject()).await;
    eprintln!("what Kubernetes saw on both: {subject:#?}");
    assert_eq!(
        subject,
        reference,
        "Kubernetes saw {} differently from {}",
        Kind::subject().label(),
        REFERENCE.label()
    );
}

const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {kubernetes.io/hostname: node-a}
"#;

const CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.com}
spec:
  group: example.com
  scope: Namespaced
  names: {kind: Widget, plural: widgets, singular: widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: {type: integer, minimum: 1}
"#;

const EVENT: &str = r#"
apiVersion: v1
kind: Event
metadata: {name: ev1, namespace: t}
involvedObject: {kind: ConfigMap, name: cm-00, namespace: t}
reason: Tested
message: stored with a lease
type: Normal
"#;

async fn scenario(kind: Kind) -> Seen {
    let mut cluster = Cluster::start(kind, 3).await;
    let started = Instant::now();
    // The API server compacts every 10 s (5 min by default) so its compactor runs in the test.
    let k = ControlPlane::start(&cluster.endpoints(), &["--etcd-compaction-interval=10s"]).await;
    let mut etcd = cluster.client().await;

    k.kubectl(&["create", "namespace", "t"]).await.ok();
    for i in 0..12 {
        k.kubectl(&[
            "create",
            "configmap",
            &format!("cm-{i:02}"),
            "-n",
            "t",
            &format!("--from-literal=v={i}"),
        ])
        .await
        .ok();
    }

    // A Secret round-trips, and is stored the way Kubernetes stores it (protobuf, "k8s\0").
    k.kubectl(&[
        "create",
        "secret",
        "generic",
        "s",
        "-n",
        "t",
        "--from-literal=pw=hunter2",
    ])
    .await
    .ok();
    let secret = k
        .kubectl(&["get", "secret", "s", "-n", "t", "-o", "jsonpath={.data.pw}"])
        .await
        .ok()
        .to_string();
    assert_eq!(secret, "aHVudGVyMg==", "base64 of the value written");
    let stored = etcd.get("/registry/secrets/t/s", None).await.expect("get");
    assert!(
        stored.kvs()[0].value().starts_with(b"k8s\0"),
        "the Secret is stored as Kubernetes' protobuf"
    );

    // A Deployment becomes a ReplicaSet and Pods (controller manager), bound to a Node (scheduler).
    k.apply(NODE).await.ok();
    let now = utc_now();
    let status = format!(
        r#"{{"status":{{"capacity":{{"cpu":"4","memory":"8Gi","pods":"110"}},"allocatable":{{"cpu":"4","memory":"8Gi","pods":"110"}},"conditions":[{{"type":"Ready","status":"True","reason":"KubeletReady","message":"test node","lastHeartbeatTime":"{now}","lastTransitionTime":"{now}"}}]}}}}"#
    );
    k.kubectl(&[
        "patch",
        "node",
        "node-a",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status,
    ])
    .await
    .ok();
    k.kubectl(&[
        "create",
        "deployment",
        "web",
        "-n",
        "t",
        "--image=registry.k8s.io/pause:3.10",
        "--replicas=2",
    ])
    .await
    .ok();
    let (replica_sets, pods_bound) = eventually("the Deployment's Pods bound", 90, || async {
        let rs = k
            .kubectl(&["get", "rs", "-n", "t", "-l", "app=web", "-o", "name"])
            .await
            .ok()
            .lines()
            .count();
        let pods = k
            .kubectl(&[
                "get",
                "pods",
                "-n",
                "t",
                "-l",
                "app=web",
                "-o",
                "jsonpath={range .items[*]}{.spec.nodeName}{\"\\n\"}{end}",
            ])
            .await
            .ok()
            .lines()
            .filter(|n| *n == "node-a")
            .count();
        (pods == 2).then_some((rs, pods))
    })
    .await;

    // A CRD and a custom object; the CRD's schema is enforced.
    k.apply(CRD).await.ok();
    k.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/widgets.example.com",
        "--timeout=60s",
    ])
    .await
    .ok();
    let widget = |size: i64| {
        format!("{{\"apiVersion\":\"example.com/v1\",\"kind\":\"Widget\",\"metadata\":{{\"name\":\"w{size}\",\"namespace\":\"t\"}},\"spec\":{{\"size\":{size}}}}}")
    };
    k.apply(&widget(3)).await.ok();
    let widget_size = k
        .kubectl(&[
            "get",
            "widget",
            "w3",
            "-n",
            "t",
            "-o",
            "jsonpath={.spec.size}",
        ])
        .await
        .ok()
        .to_string();
    assert_eq!(widget_size, "3");
    let stored = etcd
        .get("/registry/example.com/widgets/t/w3", None)
        .await
        .expect("get");
    assert_eq!(stored.kvs().len(), 1, "the custom object is in the store");
    let widget_refused = first_line(k.apply(&widget(0)).await.err());

    // An Event is written with a lease, as TTL objects are.
    k.apply(EVENT).await.ok();
    let stored = etcd.get("/registry/events/t/ev1", None).await.expect("get");
    let lease = stored.kvs()[0].lease();
    assert_ne!(lease, 0, "an Event carries a lease");
    let ttl = etcd
        .lease_time_to_live(lease, None)
        .await
        .expect("lease ttl");
    assert!(ttl.ttl() > 0, "the lease is alive");
    let event_lease_ttl = ttl.granted_ttl();

    // A watch resumed from a resourceVersion sees exactly what changed after it.
    let rv = k
        .kubectl(&[
            "get",
            "configmap",
            "cm-00",
            "-n",
            "t",
            "-o",
            "jsonpath={.metadata.resourceVersion}",
        ])
        .await
        .ok()
        .to_string();
    k.kubectl(&[
        "patch",
        "configmap",
        "cm-01",
        "-n",
        "t",
        "--type=merge",
        "-p",
        r#"{"data":{"v":"one"}}"#,
    ])
    .await
    .ok();
    k.kubectl(&["delete", "configmap", "cm-02", "-n", "t"])
        .await
        .ok();
    let out = k
        .kubectl(&[
            "get",
            "--raw",
            &format!(
                "/api/v1/namespaces/t/configmaps?watch=1&resourceVersion={rv}&timeoutSeconds=3"
            ),
        ])
        .await;
    let resumed_watch = watch_events(out.ok());
    assert!(
        resumed_watch.contains(&("MODIFIED".into(), "cm-01".into()))
            && resumed_watch.contains(&("DELETED".into(), "cm-02".into())),
        "resumed watch: {resumed_watch:?}"
    );

    // `kubectl get -w` prints the object, then its update.
    let mut watcher = k
        .kubectl_command(&[
            "get",
            "configmap",
            "cm-03",
            "-n",
            "t",
            "-w",
            "-o",
            "jsonpath={.data.v}{\"\\n\"}",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kubectl get -w");
    let mut lines = BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    let mut get_w = vec![next_line(&mut lines).await];
    k.kubectl(&[
        "patch",
        "configmap",
        "cm-03",
        "-n",
        "t",
        "--type=merge",
        "-p",
        r#"{"data":{"v":"watched"}}"#,
    ])
    .await
    .ok();
    get_w.push(next_line(&mut lines).await);
    drop(watcher);
    assert_eq!(get_w, ["3", "watched"]);

    // kube-apiserver's own compactor: it writes compact_rev_key, then compacts.
    let wait = Duration::from_secs(25).saturating_sub(started.elapsed());
    tokio::time::sleep(wait).await;
    let apiserver_compacted = eventually("kube-apiserver's compaction", 60, || {
        let mut etcd = etcd.clone();
        async move {
            let key = etcd.get("compact_rev_key", None).await.ok()?;
            let version = key.kvs().first()?.version();
            // Its first pass only records the revision; the second compacts to it.
            let old = etcd
                .get("x", Some(GetOptions::new().with_revision(2)))
                .await;
            (version >= 2 && old.is_err()).then_some(true)
        }
    })
    .await;

    // A list read page by page, with a compaction between the pages.
    let page = k
        .kubectl(&["get", "--raw", "/api/v1/namespaces/t/configmaps?limit=4"])
        .await;
    let page: Value = serde_json::from_str(page.ok()).expect("list JSON");
    let token = page["metadata"]["continue"]
        .as_str()
        .expect("continue token")
        .to_string();
    for i in 0..3 {
        k.kubectl(&["create", "configmap", &format!("late-{i}"), "-n", "t"])
            .await
            .ok();
    }
    let head = etcd
        .get("x", None)
        .await
        .expect("get")
        .header()
        .expect("header")
        .revision();
    etcd.compact(head, Some(CompactionOptions::new().with_physical()))
        .await
        .expect("compact");
    let rest = k
        .kubectl(&[
            "get",
            "--raw",
            &format!("/api/v1/namespaces/t/configmaps?limit=100&continue={token}"),
        ])
        .await;
    let continue_after_compaction = if rest.status.success() {
        let list: Value = serde_json::from_str(&rest.stdout).expect("list JSON");
        Ok(list["items"]
            .as_array()
            .expect("items")
            .iter()
            .map(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .collect())
    } else {
        Err(first_line(&rest.stderr))
    };
    // Served by the watch cache, not by the compacted store: what it sends must not depend on
    // the store either.
    let from_compacted = k
        .kubectl(&[
            "get",
            "--raw",
            "/api/v1/namespaces/t/configmaps?watch=1&resourceVersion=2&timeoutSeconds=2",
        ])
        .await;
    let watch_from_compacted = if from_compacted.status.success() {
        Ok(watch_events(&from_compacted.stdout))
    } else {
        Err(first_line(&from_compacted.stderr))
    };

    // What the API server's metrics and log say about its store.
    let metrics = k.metrics().await;
    let consistent_lists_from_cache = support::metric_sum(
        &metrics,
        "apiserver_watch_cache_consistent_read_total",
        &["success=\"true\"", "fallback=\"false\""],
    ) > 0.0;
    let log = k.log("kube-apiserver");
    let watch_progress_supported = !log.contains("RequestWatchProgress feature is not supported")
        && !log.contains("Failed to parse etcd version");
    // The watch cache's initial lists: RangeStream where the store has it (Kubernetes counts a
    // RangeStream as `listStream`, and falls back to pages on Unimplemented, as from etcd 3.6).
    let stream = |family| support::metric_sum(&metrics, family, &["operation=\"listStream\""]);
    let streamed = stream("etcd_requests_total") - stream("etcd_request_errors_total");
    if kind == Kind::subject() {
        assert!(
            streamed > 0.0,
            "Kubernetes 1.37 lists with RangeStream from oxcd:\n{}",
            metrics
                .lines()
                .filter(|l| l.contains("listStream"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }

    // One member killed with SIGKILL: kubectl keeps working through the others.
    let leader = cluster.leader().await;
    cluster.kill9(leader);
    let mut created_after_kill = 0;
    for i in 0..5 {
        let name = format!("after-kill-{i}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = k.kubectl(&["create", "configmap", &name, "-n", "t"]).await;
            if out.status.success() || out.stderr.contains("AlreadyExists") {
                created_after_kill += 1;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "create {name} kept failing: {}",
                out.stderr
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    let listed = k
        .kubectl(&["get", "configmaps", "-n", "t", "-o", "name"])
        .await
        .ok()
        .lines()
        .filter(|l| l.contains("after-kill-"))
        .count();
    assert_eq!(
        listed, 5,
        "every ConfigMap created after the kill is listed"
    );

    Seen {
        watch_progress_supported,
        consistent_lists_from_cache,
        secret,
        replica_sets,
        pods_bound,
        widget_size,
        widget_refused,
        event_lease_ttl,
        resumed_watch,
        get_w,
        continue_after_compaction,
        watch_from_compacted,
        apiserver_compacted,
        created_after_kill,
    }
}

/// Polls `f` every half second until it returns Some, for at most `secs` seconds.
async fn eventually<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {secs} s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> String {
    tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("kubectl get -w printed nothing within 20 s")
        .expect("read kubectl output")
        .expect("kubectl get -w ended")
}

/// (type, name) of the events of a watch's JSON lines, for the test's own ConfigMaps.
fn watch_events(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default().to_string(),
                e["object"]["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .filter(|(_, name)| name.starts_with("cm-") || name.starts_with("late-"))
        .collect()
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

/// The current time in RFC 3339 (UTC), as Kubernetes writes timestamps.
fn utc_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The operator installed as users install it (`helm install` of `charts/oxcd-operator`) on a
/// real control plane that stores its state in oxcd, and run with the chart's ServiceAccount
/// and RBAC, so a permission the chart forgot fails here. The real API server enforces the
/// CRD's schema and CEL rules, the real StatefulSet controller takes the operator's
/// StatefulSet, and the real garbage collector removes what the operator owned. Without a
/// kubelet the members never start: what is checked is everything up to running them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_runs_on_a_real_api_server_with_its_charts_rbac() {
    let _serial = support::serial_cluster_test();
    let cluster = Cluster::start(Kind::subject(), 1).await;
    let k = ControlPlane::start(&cluster.endpoints(), &[]).await;

    let chart = concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/oxcd-operator");
    support::run_ok(
        "helm install",
        std::process::Command::new("helm")
            .args(["install", "oxcd", chart, "--namespace", "oxcd-system"])
            .args(["--create-namespace", "--kubeconfig"])
            .arg(&k.kubeconfig),
    );
    let sa = k
        .kubectl(&[
            "get",
            "deployments",
            "-n",
            "oxcd-system",
            "-o",
            "jsonpath={.items[0].spec.template.spec.serviceAccountName}",
        ])
        .await
        .ok()
        .trim()
        .to_string();
    assert!(
        !sa.is_empty(),
        "the chart's Deployment names no ServiceAccount"
    );
    let token = k
        .kubectl(&["create", "token", &sa, "-n", "oxcd-system", "--duration=1h"])
        .await
        .ok()
        .trim()
        .to_string();
    let admin = std::fs::read_to_string(&k.kubeconfig).expect("read kubeconfig");
    let (before, _) = admin
        .split_once("token: ")
        .expect("a token in the kubeconfig");
    let after = &admin[before.len() + "token: ".len()..];
    let rest = &after[after.find('\n').unwrap_or(after.len())..];
    let operator_kubeconfig = k.dir().join("operator.kubeconfig");
    std::fs::write(
        &operator_kubeconfig,
        format!("{before}token: {token}{rest}"),
    )
    .expect("write kubeconfig");

    // The operator's binary, beside the server's (`cargo test --workspace` builds both).
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_oxcd")).with_file_name("oxcd-operator");
    assert!(
        binary.exists(),
        "{} is missing: `cargo build --release -p oxcd-operator` (cargo test --workspace builds it)",
        binary.display()
    );
    let log_path = k.dir().join("oxcd-operator.log");
    let log_file = std::fs::File::create(&log_path).expect("create log");
    let mut operator = tokio::process::Command::new(&binary)
        .args(["run", "--http-addr"])
        .arg(format!("127.0.0.1:{}", support::free_port()))
        .env("KUBECONFIG", &operator_kubeconfig)
        .env("POD_NAMESPACE", "oxcd-system")
        .env("POD_NAME", "oxcd-operator-test")
        .stdout(log_file.try_clone().expect("clone log"))
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn oxcd-operator");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    // Every call the chart's RBAC refuses is logged by the operator with the API's "forbidden".
    let assert_allowed = || {
        let text = log();
        let refused: Vec<&str> = text.lines().filter(|l| l.contains("forbidden")).collect();
        assert!(
            refused.is_empty(),
            "the chart's RBAC refused the operator:\n{}",
            refused.join("\n")
        );
    };

    k.kubectl(&["create", "namespace", "db"]).await.ok();
    k.apply(&etcd_cluster("demo", r#"{replicas: 3, version: "0.1.0"}"#))
        .await
        .ok();
    // The operator's StatefulSet, taken by the real StatefulSet controller: it creates Pods.
    eventually(
        "the StatefulSet controller to create the first member's Pod",
        60,
        || async {
            assert_allowed();
            k.kubectl(&["get", "pod", "demo-0", "-n", "db", "-o", "name"])
                .await
                .status
                .success()
                .then_some(())
        },
    )
    .await;
    for (kind, name) in [
        ("statefulset", "demo"),
        ("service", "demo"),
        ("service", "demo-peer"),
        ("poddisruptionbudget", "demo"),
        ("configmap", "demo-bootstrap"),
    ] {
        let owner = k
            .kubectl(&[
                "get",
                kind,
                name,
                "-n",
                "db",
                "-o",
                "jsonpath={.metadata.ownerReferences[0].kind}/{.metadata.ownerReferences[0].name}",
            ])
            .await;
        assert_eq!(owner.ok(), "EtcdCluster/demo", "owner of {kind} {name}");
    }
    // The operator reports status through the status subresource, and the printer columns show it.
    eventually("the operator to report a phase", 60, || async {
        let phase = k
            .kubectl(&[
                "get",
                "etcdc",
                "demo",
                "-n",
                "db",
                "-o",
                "jsonpath={.status.phase}",
            ])
            .await;
        (!phase.ok().trim().is_empty()).then_some(())
    })
    .await;
    let table = k.kubectl(&["get", "etcdc", "-n", "db"]).await;
    let header = first_line(table.ok());
    for column in [
        "NAME", "REPLICAS", "READY", "VERSION", "LEADER", "PHASE", "AGE",
    ] {
        assert!(
            header.contains(column),
            "no {column} column in `kubectl get etcdc`: {header}"
        );
    }

    let restored = |source: &str| {
        let spec = format!(r#"{{replicas: 1, version: "0.1.0", restore: {{source: "{source}"}}}}"#);
        etcd_cluster("restored", &spec)
    };
    // The CRD's schema and CEL rules, enforced by the API server; nothing is created.
    let refused = [
        (
            "bad-replicas",
            r#"{replicas: 0, version: "0.1.0"}"#,
            "should be greater than or equal to 1",
        ),
        (
            "bad-field",
            r#"{replica: 3, version: "0.1.0"}"#,
            "unknown field \"spec.replica\"",
        ),
        (
            "bad-destination",
            r#"{replicas: 1, version: "0.1.0", backup: {schedule: "0 * * * *", destination: "http://example.com/backups"}}"#,
            "destination must be an s3://, gs://, az:// or file:/// URL",
        ),
    ];
    for (name, spec, message) in refused {
        let out = k.apply(&etcd_cluster(name, spec)).await;
        assert!(out.err().contains(message), "{name}: {}", out.stderr);
        let get = k.kubectl(&["get", "etcdc", name, "-n", "db"]).await;
        assert!(
            get.err().contains("NotFound"),
            "{name} was created: {}",
            get.stderr
        );
    }
    k.apply(&restored("s3://backups/a.db")).await.ok();
    let changed = k.apply(&restored("s3://backups/b.db")).await;
    assert!(
        changed.err().contains("restore is immutable"),
        "a changed spec.restore: {}",
        changed.stderr
    );

    // Deleting the cluster: the garbage collector removes everything the operator owned.
    k.kubectl(&["delete", "etcdcluster", "demo", "-n", "db", "--wait=false"])
        .await
        .ok();
    eventually(
        "the garbage collector to delete the StatefulSet",
        60,
        || async {
            let left = k
                .kubectl(&[
                    "get",
                    "statefulset,service,pdb,configmap",
                    "-n",
                    "db",
                    "-o",
                    "name",
                ])
                .await;
            let left = left.ok();
            (!left.lines().any(|l| l.contains("/demo"))).then_some(())
        },
    )
    .await;

    if let Ok(Some(status)) = operator.try_wait() {
        panic!(
            "the operator exited ({status}):\n{}",
            support::tail(&log(), 40)
        );
    }
    let _ = operator.kill().await;
    assert_allowed();
}

/// An EtcdCluster named `name` in the test's namespace, with `spec` as a YAML flow map.
fn etcd_cluster(name: &str, spec: &str) -> String {
    format!(
        "apiVersion: oxcd.io/v1alpha1\nkind: EtcdCluster\n\
         metadata: {{name: {name}, namespace: db}}\nspec: {spec}\n"
    )
}
