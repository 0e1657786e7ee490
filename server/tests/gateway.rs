//! The JSON gateway under /v3/: the curl recipes of etcd's docs (dev-guide/api_grpc_gateway),
//! and more calls of each service, run with curl against the reference etcd (3.6) and the subject; the
//! answers must be the same JSON, apart from values that name the cluster or the member.

mod support;

use serde_json::Value;
use support::Server;

/// POSTs `body` to `path` with curl; (HTTP status, body).
async fn curl(server: &Server, path: &str, body: &str, token: Option<&[u8]>) -> (u16, String) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "10",
        "-X",
        "POST",
        "-w",
        "\n%{http_code}",
    ]);
    if let Some(t) = token {
        // Bytes, not text: a client may send a token that is not UTF-8.
        use std::os::unix::ffi::OsStringExt;
        let header = [b"Authorization: ".as_slice(), t].concat();
        cmd.arg("-H").arg(std::ffi::OsString::from_vec(header));
    }
    let out = cmd
        .arg("-d")
        .arg(body)
        .arg(format!("{}{path}", server.endpoint()))
        .output()
        .await
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Values that differ between any two clusters: IDs, terms, tokens, sizes, hashes.
fn normalize(v: &mut Value) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match k.as_str() {
                    "cluster_id" | "member_id" | "raft_term" | "ID" | "token" | "leader"
                    | "dbSize" | "dbSizeInUse" | "raftIndex" | "raftTerm" | "raftAppliedIndex"
                    | "hash" | "peerURLs" | "clientURLs" | "name" => *x = Value::String("*".into()),
                    _ => normalize(x),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(normalize),
        _ => {}
    }
}

fn parsed(body: &str) -> Value {
    let mut v: Value = serde_json::from_str(body)
        .unwrap_or_else(|e| Value::String(format!("not JSON ({e}): {body}")));
    normalize(&mut v);
    v
}

/// (path, body) in order; a body may use `<lease>`, replaced by the lease the script granted.
const SCRIPT: &[(&str, &str)] = &[
    // etcd's documented recipes.
    ("/v3/kv/put", r#"{"key": "Zm9v", "value": "YmFy"}"#),
    ("/v3/kv/range", r#"{"key": "Zm9v"}"#),
    ("/v3/kv/range", r#"{"key": "Zm9v", "range_end": "Zm9w"}"#),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"target":"CREATE","key":"Zm9v","createRevision":"2"}],"success":[{"requestPut":{"key":"Zm9v","value":"YmFy"}}]}"#,
    ),
    (
        "/v3/kv/txn",
        r#"{"compare":[{"version":"4","result":"EQUAL","target":"VERSION","key":"Zm9v"}],"success":[{"requestRange":{"key":"Zm9v"}}]}"#,
    ),
    // More of each service, and errors.
    (
        "/v3beta/kv/range",
        r#"{"key": "Zm9v", "limit": "1", "keys_only": true}"#,
    ),
    ("/v3/kv/range", r#"{"key": ""}"#),
    ("/v3/kv/range", r#"{"key": "Zm9v", "revision": "1000"}"#),
    ("/v3/kv/range", r#"{"key": "#),
    (
        "/v3/kv/put",
        r#"{"key": "YQ==", "value": "MQ==", "prev_kv": true}"#,
    ),
    (
        "/v3/kv/put",
        r#"{"key": "YQ==", "value": "Mg==", "prev_kv": true}"#,
    ),
    ("/v3/kv/deleterange", r#"{"key": "YQ==", "prev_kv": true}"#),
    (
        "/v3/kv/compaction",
        r#"{"revision": "2", "physical": true}"#,
    ),
    ("/v3/kv/range", r#"{"key": "Zm9v", "revision": "1"}"#),
    ("/v3/lease/grant", r#"{"TTL": "60", "ID": "4242"}"#),
    ("/v3/lease/timetolive", r#"{"ID": "4242", "keys": true}"#),
    ("/v3/kv/lease/timetolive", r#"{"ID": "99"}"#),
    ("/v3/lease/leases", r#"{}"#),
    ("/v3/lease/revoke", r#"{"ID": "4242"}"#),
    ("/v3/lease/revoke", r#"{"ID": "4242"}"#),
    ("/v3/cluster/member/list", r#"{}"#),
    ("/v3/maintenance/alarm", r#"{"action": "GET"}"#),
    ("/v3/maintenance/status", r#""#),
    ("/v3/election/leader", r#"{"name": "eA=="}"#),
    ("/v3/lock/lock", r#"{"name": "bA=="}"#),
    ("/v3/nope", r#"{}"#),
    // Auth, as in etcd's recipe.
    (
        "/v3/auth/user/add",
        r#"{"name": "root", "password": "pass"}"#,
    ),
    ("/v3/auth/role/add", r#"{"name": "root"}"#),
    ("/v3/auth/user/grant", r#"{"user": "root", "role": "root"}"#),
    ("/v3/auth/enable", r#"{}"#),
    ("/v3/kv/put", r#"{"key": "Zm9v", "value": "YmFy"}"#),
    (
        "/v3/auth/authenticate",
        r#"{"name": "root", "password": "nope"}"#,
    ),
    (
        "/v3/auth/authenticate",
        r#"{"name": "root", "password": "pass"}"#,
    ),
];

async fn run(server: &Server) -> Vec<(String, u16, Value)> {
    let mut out = Vec::new();
    let mut token: Option<String> = None;
    for (path, body) in SCRIPT {
        let (code, text) = curl(server, path, body, None).await;
        let mut v = parsed(&text);
        if *path == "/v3/lock/lock" {
            // The lock key ends in the session's lease ID.
            v["key"] = Value::String("*".into());
        }
        if *path == "/v3/auth/authenticate" && code == 200 {
            token = serde_json::from_str::<Value>(&text).unwrap()["token"]
                .as_str()
                .map(str::to_string);
        }
        out.push((format!("{path} {body}"), code, v));
    }
    // The token in the Authorization header, as the recipe shows.
    let (code, text) = curl(
        server,
        "/v3/kv/put",
        r#"{"key": "Zm9v", "value": "YmFy"}"#,
        token.as_deref().map(str::as_bytes),
    )
    .await;
    out.push(("put with the token".into(), code, parsed(&text)));
    let (code, text) = curl(server, "/v3/kv/range", r#"{"key": "Zm9v"}"#, Some(b"bad")).await;
    out.push(("range with a bad token".into(), code, parsed(&text)));
    let (code, text) = curl(
        server,
        "/v3/kv/range",
        r#"{"key": "Zm9v"}"#,
        Some(b"a\xff\xfe.\x80"),
    )
    .await;
    out.push((
        "range with a token that is not UTF-8".into(),
        code,
        parsed(&text),
    ));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_recipes_answer_as_etcd() {
    let [etcd, subject] = support::both(&[]).await;
    let (expected, got) = tokio::join!(run(&etcd), run(&subject));
    let diffs: Vec<String> = expected
        .iter()
        .zip(&got)
        .filter(|(e, g)| e != g)
        .map(|(e, g)| {
            format!(
                "{}\n  etcd:    {} {}\n  subject: {} {}",
                e.0, e.1, e.2, g.1, g.2
            )
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} gateway answers differ from the reference etcd:\n{}",
        diffs.len(),
        expected.len(),
        diffs.join("\n")
    );
}

/// A watch over the gateway streams one `{"result": ...}` line per response, and stays open
/// after its request body ended.
#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_results_as_etcd() {
    let [etcd, subject] = support::both(&[]).await;
    let mut outputs = Vec::new();
    for server in [&etcd, &subject] {
        let watch = tokio::process::Command::new("curl")
            .args(["-sS", "-N", "--max-time", "3", "-X", "POST", "-d"])
            .arg(r#"{"create_request": {"key": "Zm9v"}}"#)
            .arg(format!("{}/v3/watch", server.endpoint()))
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        for v in ["YmFy", "YmF6"] {
            let body = format!(r#"{{"key": "Zm9v", "value": "{v}"}}"#);
            assert_eq!(curl(server, "/v3/kv/put", &body, None).await.0, 200);
        }
        let out = watch.wait_with_output().await.unwrap();
        let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(parsed)
            .collect();
        outputs.push(lines);
    }
    assert_eq!(
        outputs[0].len(),
        3,
        "etcd: created + two events: {:?}",
        outputs[0]
    );
    assert_eq!(
        outputs[0], outputs[1],
        "etcd (left) and the subject (right) differ"
    );
}
