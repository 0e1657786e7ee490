//! Drive the server with the real etcdctl and compare its output with what the
//! same command prints against the reference etcd (3.6).
//!
//! Every test runs once per etcdctl (3.6, 3.7 and Debian's 3.4; `support::etcdctls`),
//! each time on a new `Pair`: a reference etcd and the subject (oxcd, or etcd 3.4
//! when `OXCD_TEST_SERVER=etcd`). Commands run against both in the same order, so revisions line up; the outputs are compared after normalising what
//! legitimately differs (ports, member/cluster IDs, raft term/index, lease IDs,
//! db sizes, timings, versions). Each test also asserts the expected content
//! explicitly, so it cannot pass just because both sides print nothing.

mod support;

use std::time::{Duration, Instant};

use etcd_client::GetOptions;
use serde_json::Value;
use support::{CmdOut, Kind, Server};
use tokio::io::AsyncReadExt;

/// Identity of one side, used to normalise its output.
struct SideIds {
    client_port: String,
    peer_port: String,
    member_id: u64,
    cluster_id: u64,
}

struct Pair {
    /// The etcdctl run against both sides: (label, path).
    ctl: (&'static str, &'static str),
    reference: Server,
    subject: Server,
    ref_ids: SideIds,
    sub_ids: SideIds,
    /// Lease IDs granted through `grant`, as (reference, subject), by order.
    leases: Vec<(i64, i64)>,
}

async fn side_ids(server: &Server) -> SideIds {
    let mut c = server.client().await;
    let st = c.status().await.expect("status");
    let h = st.header().expect("status header");
    let port = |url: String| url.rsplit(':').next().unwrap().to_string();
    SideIds {
        client_port: port(server.endpoint()),
        peer_port: port(server.peer_url()),
        member_id: h.member_id(),
        cluster_id: h.cluster_id(),
    }
}

impl Pair {
    async fn new(ctl: (&'static str, &'static str)) -> Pair {
        support::require_etcd();
        let (reference, subject) = tokio::join!(
            Server::start(support::REFERENCE),
            Server::start(Kind::subject())
        );
        let ref_ids = side_ids(&reference).await;
        let sub_ids = side_ids(&subject).await;
        Pair {
            ctl,
            reference,
            subject,
            ref_ids,
            sub_ids,
            leases: Vec::new(),
        }
    }

    /// Replaces `{L<i>}` placeholders with the side's lease ID in hex.
    fn subst(&self, args: &[&str], is_ref: bool) -> Vec<String> {
        args.iter()
            .map(|a| {
                let mut s = a.to_string();
                for (i, (r, x)) in self.leases.iter().enumerate() {
                    let id = if is_ref { *r } else { *x };
                    s = s.replace(&format!("{{L{i}}}"), &format!("{id:x}"));
                }
                let ids = if is_ref { &self.ref_ids } else { &self.sub_ids };
                s.replace("{PORT}", &ids.client_port)
            })
            .collect()
    }

    async fn run_both(&self, args: &[&str], stdin: Option<&str>) -> (CmdOut, CmdOut) {
        let ra = self.subst(args, true);
        let sa = self.subst(args, false);
        let ra: Vec<&str> = ra.iter().map(String::as_str).collect();
        let sa: Vec<&str> = sa.iter().map(String::as_str).collect();
        let (re, se) = (self.reference.endpoint(), self.subject.endpoint());
        tokio::join!(
            support::etcdctl_bin_at(self.ctl.1, &re, &ra, stdin),
            support::etcdctl_bin_at(self.ctl.1, &se, &sa, stdin)
        )
    }

    /// Runs the command on both sides, asserts identical exit status and
    /// identical normalised stdout and `Error:` lines; returns the subject's
    /// normalised stdout.
    async fn same(&self, args: &[&str]) -> String {
        self.same_io(args, None).await.0
    }

    async fn same_stdin(&self, args: &[&str], stdin: &str) -> String {
        self.same_io(args, Some(stdin)).await.0
    }

    /// Like `same`, for a command expected to fail on both sides: returns the
    /// subject's normalised `Error:` line(s).
    async fn same_err(&self, args: &[&str], stdin: Option<&str>) -> String {
        let (out, err, ok) = self.same_io(args, stdin).await;
        assert!(!ok, "etcdctl {args:?} unexpectedly succeeded: {out}");
        assert_eq!(out, "", "etcdctl {args:?} failed but printed output");
        err
    }

    /// Returns (normalised stdout, normalised `Error:` lines, success).
    async fn same_io(&self, args: &[&str], stdin: Option<&str>) -> (String, String, bool) {
        let (r, s) = self.run_both(args, stdin).await;
        let rn = self.normalize(&r.stdout, true);
        let sn = self.normalize(&s.stdout, false);
        let re = self.normalize(&error_lines(&r.stderr), true);
        let se = self.normalize(&error_lines(&s.stderr), false);
        assert_eq!(
            r.status.success(),
            s.status.success(),
            "{} {args:?}: exit status differs\netcd: {} stdout={:?} stderr={:?}\n{}: {} stdout={:?} stderr={:?}",
            self.ctl.0,
            r.status,
            r.stdout,
            r.stderr,
            self.subject.kind.label(),
            s.status,
            s.stdout,
            s.stderr
        );
        assert_eq!(
            sn,
            rn,
            "{} {args:?}: normalised stdout differs (left: {}, right: etcd)",
            self.ctl.0,
            self.subject.kind.label()
        );
        assert_eq!(
            se,
            re,
            "{} {args:?}: error output differs (left: {}, right: etcd)",
            self.ctl.0,
            self.subject.kind.label()
        );
        (sn, se, s.status.success())
    }

    /// Grants a lease with `etcdctl lease grant` on both sides; returns its
    /// placeholder index (use `{L<i>}` in later commands).
    async fn grant(&mut self, ttl: i64) -> (usize, String) {
        let ttl_s = ttl.to_string();
        let (r, s) = self.run_both(&["lease", "grant", &ttl_s], None).await;
        let rid = parse_granted(r.ok());
        let sid = parse_granted(s.ok());
        self.leases.push((rid, sid));
        let idx = self.leases.len() - 1;
        let rn = self.normalize(&r.stdout, true);
        let sn = self.normalize(&s.stdout, false);
        assert_eq!(sn, rn, "lease grant output differs");
        (idx, sn)
    }

    fn normalize(&self, text: &str, is_ref: bool) -> String {
        let ids = if is_ref { &self.ref_ids } else { &self.sub_ids };
        // Keep blank lines (keys-only output ends in one); drop only the final
        // newline so single-line outputs compare as plain strings.
        let text = text.strip_suffix('\n').unwrap_or(text);
        text.split('\n')
            .map(|line| {
                let trimmed = line.trim_start();
                if trimmed.starts_with('{') || trimmed.starts_with('[') {
                    if let Ok(mut v) = serde_json::from_str::<Value>(trimmed) {
                        self.normalize_json(&mut v, ids, is_ref, None);
                        return v.to_string();
                    }
                }
                self.normalize_text(line, ids, is_ref)
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn normalize_text(&self, line: &str, ids: &SideIds, is_ref: bool) -> String {
        let mut s = line
            .replace(&format!("127.0.0.1:{}", ids.client_port), "<CLIENT>")
            .replace(&format!("127.0.0.1:{}", ids.peer_port), "<PEER>");
        for (i, (r, x)) in self.leases.iter().enumerate() {
            let id = if is_ref { *r } else { *x };
            s = s.replace(&format!("{id:016x}"), &format!("<L{i}>"));
        }
        for (id, tag) in [(ids.member_id, "<MEMBER>"), (ids.cluster_id, "<CLUSTER>")] {
            s = s
                .replace(&format!("{id:016x}"), tag)
                .replace(&format!("{id:x}"), tag);
        }
        // etcd lists a lease's keys in Go map order, i.e. randomly: sort them.
        if let Some(start) = s.find("attached keys([") {
            let from = start + "attached keys([".len();
            if let Some(len) = s[from..].find("])") {
                let mut keys: Vec<&str> = s[from..from + len].split(' ').collect();
                keys.sort();
                let sorted = keys.join(" ");
                s.replace_range(from..from + len, &sorted);
            }
        }
        // Remaining TTL depends on wall-clock time; checked explicitly instead.
        s = replace_between(&s, "remaining(", "s)", "<N>");
        // `endpoint health` latency.
        if let Some(pos) = s.find("took = ") {
            s.truncate(pos + "took = ".len());
            s.push_str("<T>");
        }
        s
    }

    fn normalize_json(&self, v: &mut Value, ids: &SideIds, is_ref: bool, key: Option<&str>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    self.normalize_json(child, ids, is_ref, Some(k.as_str()));
                }
            }
            Value::Array(items) => {
                for child in items.iter_mut() {
                    self.normalize_json(child, ids, is_ref, key);
                }
                if matches!(key, Some("keys") | Some("leases")) {
                    // Lease keys and lease lists come in Go map order.
                    items.sort_by_key(|v| v.to_string());
                }
            }
            Value::Number(n) => {
                let k = key.unwrap_or("");
                let as_u64 = n.as_u64();
                let lease = self.leases.iter().position(|(r, x)| {
                    let id = if is_ref { *r } else { *x };
                    as_u64 == Some(id as u64)
                });
                if let Some(i) = lease {
                    *v = Value::String(format!("<L{i}>"));
                } else if as_u64 == Some(ids.member_id) {
                    *v = Value::String("<MEMBER>".into());
                } else if as_u64 == Some(ids.cluster_id) {
                    *v = Value::String("<CLUSTER>".into());
                } else if matches!(
                    k,
                    "raft_term"
                        | "raftTerm"
                        | "raftIndex"
                        | "raftAppliedIndex"
                        | "dbSize"
                        | "dbSizeInUse"
                ) {
                    // Raft bookkeeping and on-disk sizes are implementation details.
                    *v = Value::String(format!("<{k}>"));
                } else if k == "ttl" {
                    // Remaining TTL (timetolive / keep-alive) is wall-clock dependent.
                    *v = Value::String("<ttl>".into());
                }
            }
            Value::String(s) => {
                let k = key.unwrap_or("");
                if matches!(k, "version" | "took") {
                    *s = format!("<{k}>");
                } else {
                    *s = self.normalize_text(s, ids, is_ref);
                }
            }
            _ => {}
        }
    }
}

fn parse_granted(out: &str) -> i64 {
    // "lease 694d7b5f2a3c1e0b granted with TTL(60s)"
    let hex = out
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("unexpected lease grant output {out:?}"));
    i64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("bad lease id in {out:?}: {e}"))
}

/// etcdctl's stderr mixes timestamped client-side warnings with the final
/// `Error: ...` line; only the latter is meaningful to compare.
fn error_lines(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|l| l.starts_with("Error:"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn replace_between(s: &str, open: &str, close: &str, with: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find(open) {
        let after = &rest[i + open.len()..];
        match after.find(close) {
            Some(j) => {
                out.push_str(&rest[..i + open.len()]);
                out.push_str(with);
                rest = &after[j..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// Splits normalised output into lines, keeping empty ones.
fn lines(s: &str) -> Vec<&str> {
    s.split('\n').collect()
}

fn json(s: &str) -> Value {
    serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {s:?}"))
}

fn b64(s: &str) -> String {
    // Tiny base64 encoder, enough to check etcdctl's JSON keys/values.
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for chunk in b.chunks(3) {
        let n = (chunk[0] as u32) << 16
            | (*chunk.get(1).unwrap_or(&0) as u32) << 8
            | *chunk.get(2).unwrap_or(&0) as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

async fn seed_keys(p: &Pair) {
    // Revisions 2..=8 on both sides (a fresh store starts at revision 1).
    for (k, v) in [
        ("a", "va"),
        ("a/1", "v1"),
        ("a/2", "v2"),
        ("a/3", "v3"),
        ("b", "vb"),
        ("c/x", "vcx"),
        ("a/2", "v2-again"),
    ] {
        assert_eq!(p.same(&["put", k, v]).await, "OK");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn put_get_variants() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        seed_keys(&p).await;

        let out = p.same(&["get", "a", "--prefix"]).await;
        assert_eq!(
            lines(&out),
            ["a", "va", "a/1", "v1", "a/2", "v2-again", "a/3", "v3"]
        );

        let out = p.same(&["get", "a/", "--prefix", "--keys-only"]).await;
        assert_eq!(lines(&out), ["a/1", "", "a/2", "", "a/3", ""]);

        let out = p.same(&["get", "a/2", "--from-key", "--keys-only"]).await;
        assert_eq!(lines(&out), ["a/2", "", "a/3", "", "b", "", "c/x", ""]);

        let out = p.same(&["get", "", "--from-key", "--limit", "2"]).await;
        assert_eq!(lines(&out), ["a", "va", "a/1", "v1"]);

        // Range [a/1, b).
        let out = p.same(&["get", "a/1", "b", "--print-value-only"]).await;
        assert_eq!(lines(&out), ["v1", "v2-again", "v3"]);

        // Historical read: at revision 4 only a, a/1, a/2 existed.
        let out = p.same(&["get", "a", "--prefix", "--rev", "4"]).await;
        assert_eq!(lines(&out), ["a", "va", "a/1", "v1", "a/2", "v2"]);

        let out = p
            .same(&[
                "get",
                "",
                "--from-key",
                "--sort-by=modify",
                "--order=descend",
                "--keys-only",
            ])
            .await;
        assert_eq!(
            lines(&out),
            ["a/2", "", "c/x", "", "b", "", "a/3", "", "a/1", "", "a", ""]
        );

        let out = p
            .same(&[
                "get",
                "a",
                "--prefix",
                "--sort-by=value",
                "--order=descend",
                "--print-value-only",
            ])
            .await;
        assert_eq!(lines(&out), ["va", "v3", "v2-again", "v1"]);

        // etcd sorts by the real values even when it returns keys only.
        let out = p
            .same(&[
                "get",
                "a",
                "--prefix",
                "--sort-by=value",
                "--order=descend",
                "--keys-only",
            ])
            .await;
        assert_eq!(lines(&out), ["a", "", "a/3", "", "a/2", "", "a/1", ""]);

        let out = p
            .same(&[
                "get",
                "a",
                "--prefix",
                "--sort-by=version",
                "--order=descend",
                "--limit",
                "1",
            ])
            .await;
        assert_eq!(lines(&out), ["a/2", "v2-again"]);

        let out = p
            .same(&[
                "get",
                "",
                "--from-key",
                "--sort-by=create",
                "--order=ascend",
                "--keys-only",
            ])
            .await;
        assert_eq!(
            lines(&out),
            ["a", "", "a/1", "", "a/2", "", "a/3", "", "b", "", "c/x", ""]
        );

        let out = p.same(&["get", "missing"]).await;
        assert_eq!(out, "");

        // JSON: header revision, base64 keys/values, versions, count with limit.
        let out = p
            .same(&["get", "a", "--prefix", "--limit", "2", "-w", "json"])
            .await;
        let v = json(&out);
        assert_eq!(v["header"]["revision"], 8);
        assert_eq!(v["count"], 4, "count ignores limit: {v}");
        assert_eq!(v["more"], true, "{v}");
        assert_eq!(v["kvs"][0]["key"], b64("a"));
        assert_eq!(v["kvs"][1]["value"], b64("v1"));
        assert_eq!(v["kvs"][1]["create_revision"], 3);

        let out = p.same(&["get", "a/2", "-w", "json"]).await;
        let v = json(&out);
        assert_eq!(v["kvs"][0]["version"], 2);
        assert_eq!(v["kvs"][0]["create_revision"], 4);
        assert_eq!(v["kvs"][0]["mod_revision"], 8);
        assert_eq!(v["kvs"][0]["value"], b64("v2-again"));

        // Future revision fails identically on both.
        let err = p.same_err(&["get", "a", "--rev", "100"], None).await;
        assert_eq!(
            err,
            "Error: etcdserver: mvcc: required revision is a future revision"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn count_only_through_client() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        seed_keys(&p).await;
        let mut results = Vec::new();
        for server in [&p.reference, &p.subject] {
            let mut c = server.client().await;
            let r = c
                .get("a", Some(GetOptions::new().with_prefix().with_count_only()))
                .await
                .expect("count_only get");
            results.push((
                r.count(),
                r.kvs().len(),
                r.more(),
                r.header().unwrap().revision(),
            ));
        }
        assert_eq!(results[1], results[0], "count_only differs (subject, etcd)");
        assert_eq!(results[1], (4, 0, false, 8));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn del_prefix_prev_kv() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        seed_keys(&p).await;
        let out = p.same(&["del", "a/", "--prefix", "--prev-kv"]).await;
        assert_eq!(
            lines(&out),
            ["3", "a/1", "v1", "a/2", "v2-again", "a/3", "v3"]
        );
        let out = p.same(&["del", "a/", "--prefix"]).await;
        assert_eq!(out, "0");
        let out = p.same(&["del", "b", "-w", "json"]).await;
        let v = json(&out);
        assert_eq!(v["deleted"], 1);
        assert_eq!(v["header"]["revision"], 10);
        let out = p.same(&["get", "", "--from-key", "--keys-only"]).await;
        assert_eq!(lines(&out), ["a", "", "c/x", ""]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn txn_from_stdin() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        seed_keys(&p).await;

        // Compares hold: success branch runs.
        let script = "value(\"a\") = \"va\"\nmod(\"a/2\") > \"4\"\nversion(\"b\") = \"1\"\n\nput t yes\nget a/ --prefix\n\nput t no\n\n";
        let out = p.same_stdin(&["txn"], script).await;
        assert_eq!(
            lines(&out),
            ["SUCCESS", "", "OK", "", "a/1", "v1", "a/2", "v2-again", "a/3", "v3"]
        );

        // A compare fails: failure branch runs (put + delete).
        let script = "create(\"a\") = \"99\"\n\nput t yes\n\nput t no\ndel c/x\n\n";
        let out = p.same_stdin(&["txn"], script).await;
        assert_eq!(lines(&out), ["FAILURE", "", "OK", "", "1"]);

        let out = p.same(&["get", "t"]).await;
        assert_eq!(lines(&out), ["t", "no"]);

        // JSON form exposes the nested response headers.
        let script = "value(\"t\") != \"no\"\n\nput t yes\n\nget t\ndel nothing\n\n";
        let out = p.same_stdin(&["txn", "-w", "json"], script).await;
        let v = json(&out);
        assert_eq!(v["succeeded"], Value::Null, "{v}");
        assert_eq!(v["header"]["revision"], 10);
        let resps = v["responses"].as_array().expect("responses");
        assert_eq!(resps.len(), 2);
        // etcdctl 3.4 names the oneof field `ResponseRange`, 3.6 and 3.7 `response_range`.
        let range = &resps[0]["Response"];
        let range = match &range["ResponseRange"] {
            Value::Null => &range["response_range"],
            r => r,
        };
        assert_eq!(range["kvs"][0]["value"], b64("no"), "{}: {v}", p.ctl.0);

        // Duplicate key in one branch is rejected.
        let script = "\n\nput d 1\nput d 2\n\n\n";
        let err = p.same_err(&["txn"], Some(script)).await;
        assert_eq!(err, "Error: etcdserver: duplicate key given in txn request");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compaction_then_old_revision_fails() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        seed_keys(&p).await;
        let out = p.same(&["compaction", "5"]).await;
        assert_eq!(out, "compacted revision 5");
        // At or above the compaction point still readable.
        let out = p
            .same(&["get", "a", "--prefix", "--rev", "5", "--keys-only"])
            .await;
        assert_eq!(lines(&out), ["a", "", "a/1", "", "a/2", "", "a/3", ""]);
        // Below it: compacted.
        let err = p.same_err(&["get", "a", "--rev", "4"], None).await;
        assert_eq!(
            err,
            "Error: etcdserver: mvcc: required revision has been compacted"
        );
        // Compacting again at an older revision is an error too.
        let err = p.same_err(&["compaction", "3"], None).await;
        assert_eq!(
            err,
            "Error: etcdserver: mvcc: required revision has been compacted"
        );
        // Current data unaffected.
        let out = p.same(&["get", "a/2", "--print-value-only"]).await;
        assert_eq!(out, "v2-again");
    }
}

/// Reads a child's stdout until `done(text)` or the deadline, then kills it.
async fn collect_output(
    mut child: tokio::process::Child,
    deadline: Duration,
    done: impl Fn(&str) -> bool,
) -> String {
    let mut stdout = child.stdout.take().unwrap();
    let mut buf = Vec::new();
    let end = Instant::now() + deadline;
    let mut chunk = [0u8; 4096];
    while !done(&String::from_utf8_lossy(&buf)) {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match tokio::time::timeout(left, stdout.read(&mut chunk)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => panic!("read watch output: {e}"),
        }
    }
    let _ = child.kill().await;
    String::from_utf8_lossy(&buf).into_owned()
}

fn count_events(s: &str) -> usize {
    s.lines().filter(|l| *l == "PUT" || *l == "DELETE").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_prefix_from_revision_with_prev_kv() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        seed_keys(&p).await; // revisions 2..=8
        let args = ["watch", "a/", "--prefix", "--rev", "4", "--prev-kv"];
        let ref_child = p.reference.spawn_etcdctl(&args);
        let sub_child = p.subject.spawn_etcdctl(&args);
        // Give the watches a moment to register before writing live events.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for cmd in [
            vec!["put", "a/1", "new1"],  // rev 9
            vec!["put", "zzz", "other"], // rev 10, outside the prefix
            vec!["del", "a/3"],          // rev 11
            vec!["put", "a/4", "v4"],    // rev 12
            vec!["put", "a/3", "back"],  // rev 13: re-created, so no prev_kv
        ] {
            p.same(&cmd).await;
        }
        // History from rev 4: a/2(4) a/3(5) a/2(8), then live: a/1 a/3-del a/4 a/3.
        let expected_events = 7;
        let done = |s: &str| count_events(s) >= expected_events && s.ends_with("back\n");
        let (r, s) = tokio::join!(
            collect_output(ref_child, Duration::from_secs(10), done),
            collect_output(sub_child, Duration::from_secs(10), done)
        );
        assert_eq!(count_events(&r), expected_events, "etcd watch output: {r}");
        let (r, s) = (p.normalize(&r, true), p.normalize(&s, false));
        assert_eq!(s, r, "watch output differs (left: subject, right: etcd)");
        assert_eq!(
            lines(&s),
            [
                "PUT", "a/2", "v2", //
                "PUT", "a/3", "v3", //
                "PUT", "a/2", "v2", "a/2", "v2-again", //
                "PUT", "a/1", "v1", "a/1", "new1", //
                "DELETE", "a/3", "v3", "a/3", "", //
                "PUT", "a/4", "v4", //
                "PUT", "a/3", "back",
            ]
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_compacted_revision_is_canceled() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        seed_keys(&p).await;
        p.same(&["compaction", "6"]).await;
        let args = ["watch", "a", "--rev", "2", "-w", "json"];
        let done = |s: &str| s.contains("Canceled");
        let (r, s) = tokio::join!(
            collect_output(
                p.reference.spawn_etcdctl(&args),
                Duration::from_secs(10),
                done
            ),
            collect_output(
                p.subject.spawn_etcdctl(&args),
                Duration::from_secs(10),
                done
            )
        );
        let rn = p.normalize(&r, true);
        let sn = p.normalize(&s, false);
        assert!(rn.contains("\"CompactRevision\":6"), "etcd output: {rn}");
        assert_eq!(sn, rn, "compacted watch output differs (left: subject)");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_commands() {
    for ctl in support::etcdctls() {
        let mut p = Pair::new(ctl).await;
        let (l0, out) = p.grant(600).await;
        assert_eq!(out, format!("lease <L{l0}> granted with TTL(600s)"));
        let (l1, _) = p.grant(900).await;

        assert_eq!(p.same(&["put", "k1", "v1", "--lease={L0}"]).await, "OK");
        assert_eq!(p.same(&["put", "k2", "v2", "--lease={L0}"]).await, "OK");
        assert_eq!(p.same(&["put", "k3", "v3", "--lease={L1}"]).await, "OK");

        let out = p.same(&["lease", "keep-alive", "--once", "{L0}"]).await;
        assert_eq!(out, "lease <L0> keepalived with TTL(600)");

        let out = p.same(&["lease", "timetolive", "{L0}", "--keys"]).await;
        assert_eq!(
            out,
            "lease <L0> granted with TTL(600s), remaining(<N>s), attached keys([k1 k2])"
        );
        let (_, s) = p.run_both(&["lease", "timetolive", "{L0}"], None).await;
        let remaining: i64 = s
            .stdout
            .split("remaining(")
            .nth(1)
            .and_then(|r| r.split('s').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no remaining TTL in {:?}", s.stdout));
        assert!(
            (590..=600).contains(&remaining),
            "remaining TTL {remaining}"
        );

        let out = p
            .same(&["lease", "timetolive", "{L1}", "--keys", "-w", "json"])
            .await;
        let v = json(&out);
        assert_eq!(v["granted-ttl"], 900);
        assert_eq!(v["id"], format!("<L{l1}>"));
        assert_eq!(v["keys"], serde_json::json!([b64("k3")]));

        let out = p.same(&["lease", "list"]).await;
        let mut got = lines(&out);
        assert_eq!(got.remove(0), "found 2 leases");
        got.sort();
        assert_eq!(got, ["<L0>", "<L1>"]);

        let out = p.same(&["lease", "revoke", "{L0}"]).await;
        assert_eq!(out, "lease <L0> revoked");
        // Revoking deleted the attached keys.
        let out = p.same(&["get", "k", "--prefix", "--keys-only"]).await;
        assert_eq!(lines(&out), ["k3", ""]);
        let out = p.same(&["lease", "timetolive", "{L0}"]).await;
        assert_eq!(out, "lease <L0> already expired");
        let out = p.same(&["lease", "list"]).await;
        assert_eq!(lines(&out), ["found 1 leases", "<L1>"]);

        // Using a revoked lease fails the same way on both.
        let err = p
            .same_err(&["lease", "keep-alive", "--once", "{L0}"], None)
            .await;
        assert_eq!(err, "Error: etcdserver: requested lease not found");
        let err = p.same_err(&["put", "k9", "v", "--lease={L0}"], None).await;
        assert_eq!(err, "Error: etcdserver: requested lease not found");
        let err = p.same_err(&["lease", "revoke", "{L0}"], None).await;
        assert_eq!(
            err,
            "Error: failed to revoke lease (etcdserver: requested lease not found)"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn put_with_lease_expires() {
    for ctl in support::etcdctls() {
        let mut p = Pair::new(ctl).await;
        // etcd raises tiny TTLs to its minimum (2s with default timings).
        let (_, out) = p.grant(1).await;
        let granted: i64 = out
            .split("TTL(")
            .nth(1)
            .and_then(|r| r.split('s').next())
            .and_then(|n| n.parse().ok())
            .expect("granted TTL");
        assert!((1..=5).contains(&granted), "{out}");
        assert_eq!(
            p.same(&["put", "ephemeral", "x", "--lease={L0}"]).await,
            "OK"
        );
        assert_eq!(p.same(&["put", "durable", "y"]).await, "OK");
        assert_eq!(
            p.same(&["get", "ephemeral", "--print-value-only"]).await,
            "x"
        );

        // Bounded wait for expiry on each side independently.
        for (server, label) in [(&p.subject, "subject"), (&p.reference, "etcd")] {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let out = server.etcdctl(&["get", "ephemeral"]).await;
                if out.ok().is_empty() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{label}: key with expired lease still present"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let out = p.same(&["get", "", "--from-key", "--keys-only"]).await;
        assert_eq!(lines(&out), ["durable", ""]);
        let out = p.same(&["lease", "list"]).await;
        assert_eq!(out, "found 0 leases");
        // The expiry's delete bumped the revision identically (put, put, delete).
        let out = p.same(&["get", "durable", "-w", "json"]).await;
        assert_eq!(json(&out)["header"]["revision"], 4);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_status() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        seed_keys(&p).await;

        // etcdctl dials `endpoint status` targets itself: with a bare host:port
        // the HTTP/2 :authority is "127.0.0.1:PORT"; with a URL it is the whole
        // "http://127.0.0.1:PORT" string (etcd accepts both). Check both forms.
        let out = p
            .same(&[
                "endpoint",
                "status",
                "--endpoints=127.0.0.1:{PORT}",
                "-w",
                "json",
            ])
            .await;
        assert_eq!(json(&out)[0]["Status"]["header"]["revision"], 8);

        let out = p.same(&["endpoint", "status", "-w", "json"]).await;
        let v = json(&out);
        let st = &v[0]["Status"];
        assert_eq!(v[0]["Endpoint"], "http://<CLIENT>");
        assert_eq!(st["header"]["revision"], 8);
        assert_eq!(
            st["leader"], "<MEMBER>",
            "single member must lead itself: {v}"
        );
        assert_eq!(st["header"]["member_id"], "<MEMBER>");
        // Raw subject status: non-zero sizes/indices and a version string.
        let (_, s) = p
            .run_both(&["endpoint", "status", "-w", "json"], None)
            .await;
        let raw = json(s.ok());
        let raw = &raw[0]["Status"];
        assert!(raw["dbSize"].as_i64().unwrap_or(0) > 0, "dbSize: {raw}");
        assert!(
            raw["raftIndex"].as_u64().unwrap_or(0) > 0,
            "raftIndex: {raw}"
        );
        assert!(raw["raftTerm"].as_u64().unwrap_or(0) > 0, "raftTerm: {raw}");
        assert!(
            !raw["version"].as_str().unwrap_or("").is_empty(),
            "version: {raw}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn endpoint_health() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        // etcdctl 3.4's `endpoint health` prints to stderr, 3.6's to stdout: compare both.
        let (r, s) = p.run_both(&["endpoint", "health"], None).await;
        r.ok();
        s.ok();
        let rn = p.normalize(&format!("{}{}", r.stdout, r.stderr), true);
        let sn = p.normalize(&format!("{}{}", s.stdout, s.stderr), false);
        assert_eq!(sn, rn, "{}", p.ctl.0);
        assert_eq!(
            sn,
            "http://<CLIENT> is healthy: successfully committed proposal: took = <T>"
        );
        let out = p.same(&["endpoint", "health", "-w", "json"]).await;
        let v = json(&out);
        assert_eq!(v[0]["health"], true, "{v}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn member_list() {
    for ctl in support::etcdctls() {
        let p = Pair::new(ctl).await;
        let out = p.same(&["member", "list"]).await;
        assert_eq!(
            out,
            "<MEMBER>, started, node1, http://<PEER>, http://<CLIENT>, false"
        );
        let out = p.same(&["member", "list", "-w", "json"]).await;
        let v = json(&out);
        assert_eq!(v["members"][0]["name"], "node1");
        assert_eq!(v["members"][0]["ID"], "<MEMBER>");
        assert_eq!(v["header"]["cluster_id"], "<CLUSTER>");
    }
}
