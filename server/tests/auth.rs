//! Authentication and RBAC. The permission matrix (user x role x key range x operation) and
//! the etcdctl runbook run against the reference etcd (3.6) and the subject with the same script, and
//! their answers must be the same; token expiry and JWT likewise; replication and restarts
//! run on a cluster of the subject.

mod support;

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, DeleteOptions, GetOptions, Permission, PutOptions, Txn, TxnOp,
    WatchOptions,
};
use support::{grpc_error, Cluster, Kind, Server};

const PW: &str = "pw-1";

/// One operation's answer, comparable across servers: what it returned, or its gRPC error.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok(String),
    Err(tonic::Code, String),
}

fn outcome<T>(r: Result<T, etcd_client::Error>, show: impl FnOnce(T) -> String) -> Outcome {
    match r {
        Ok(v) => Outcome::Ok(show(v)),
        Err(e) => {
            let (c, m) = grpc_error(&e);
            Outcome::Err(c, m)
        }
    }
}

fn keys(kvs: &[etcd_client::KeyValue]) -> String {
    kvs.iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect::<Vec<_>>()
        .join(",")
}

/// Users, roles and keys of the matrix, made as an unauthenticated client before auth is
/// enabled:
/// - alice: READ on the key k1, READWRITE on the prefix p/
/// - bob: WRITE on the range [r1, r5), READ from the key z on
/// - carol: no role; root: the root role
async fn set_up(c: &mut Client) {
    let mut a = c.auth_client();
    for u in ["root", "alice", "bob", "carol"] {
        a.user_add(u, PW, None).await.unwrap();
    }
    a.user_grant_role("root", "root").await.unwrap();
    for r in ["rk", "rwp", "wr", "rf"] {
        a.role_add(r).await.unwrap();
    }
    a.role_grant_permission("rk", Permission::read("k1"))
        .await
        .unwrap();
    a.role_grant_permission("rwp", Permission::read_write("p/").with_prefix())
        .await
        .unwrap();
    a.role_grant_permission("wr", Permission::write("r1").with_range_end("r5"))
        .await
        .unwrap();
    a.role_grant_permission("rf", Permission::read("z").with_from_key())
        .await
        .unwrap();
    for (u, r) in [
        ("alice", "rk"),
        ("alice", "rwp"),
        ("bob", "wr"),
        ("bob", "rf"),
    ] {
        a.user_grant_role(u, r).await.unwrap();
    }
    for k in ["k1", "k2", "r1", "r3", "p/a", "p/b", "z1", "zz"] {
        c.put(k, "v1", None).await.unwrap();
    }
    a.auth_enable().await.unwrap();
}

/// Every operation of the matrix as `client` (the user `who`), in a fixed order; writes use
/// per-user keys so that the users' runs do not depend on each other.
async fn operations(who: &str, client: &mut Client, leased: i64) -> Vec<(String, Outcome)> {
    let mut out = Vec::new();
    let mut rec = |name: &str, o: Outcome| out.push((format!("{who}: {name}"), o));
    let get = |kvs: etcd_client::GetResponse| format!("{} count={}", keys(kvs.kvs()), kvs.count());

    rec("get k1", outcome(client.get("k1", None).await, get));
    rec("get k2", outcome(client.get("k2", None).await, get));
    rec(
        "get serializable k1",
        outcome(
            client
                .get("k1", Some(GetOptions::new().with_serializable()))
                .await,
            get,
        ),
    );
    rec(
        "get [r1,r5)",
        outcome(
            client
                .get("r1", Some(GetOptions::new().with_range("r5")))
                .await,
            get,
        ),
    );
    rec(
        "get prefix p/",
        outcome(
            client
                .get("p/", Some(GetOptions::new().with_prefix()))
                .await,
            get,
        ),
    );
    rec(
        "get from z",
        outcome(
            client
                .get("z", Some(GetOptions::new().with_from_key()))
                .await,
            get,
        ),
    );
    rec(
        "get all",
        outcome(
            client
                .get("", Some(GetOptions::new().with_all_keys()))
                .await,
            get,
        ),
    );
    let put = |_| "put".to_string();
    rec("put r2", outcome(client.put("r2", who, None).await, put));
    rec("put k1", outcome(client.put("k1", who, None).await, put));
    rec(
        "put p/<who>",
        outcome(client.put(format!("p/{who}"), who, None).await, put),
    );
    rec(
        "put r4 prev_kv",
        outcome(
            client
                .put("r4", who, Some(PutOptions::new().with_prev_key()))
                .await,
            put,
        ),
    );
    rec(
        "put p/<who>-leased with the setup lease",
        outcome(
            client
                .put(
                    format!("p/{who}-leased"),
                    who,
                    Some(PutOptions::new().with_lease(leased)),
                )
                .await,
            put,
        ),
    );
    let del = |d: etcd_client::DeleteResponse| format!("deleted={}", d.deleted());
    rec(
        "delete r3-<who>",
        outcome(client.delete(format!("r3-{who}"), None).await, del),
    );
    rec(
        "delete p/<who> prev_kv",
        outcome(
            client
                .delete(
                    format!("p/{who}"),
                    Some(DeleteOptions::new().with_prev_key()),
                )
                .await,
            del,
        ),
    );
    rec(
        "delete prefix r (beyond [r1,r5))",
        outcome(
            client
                .delete("r", Some(DeleteOptions::new().with_prefix()))
                .await,
            del,
        ),
    );
    let txn = |t: etcd_client::TxnResponse| format!("succeeded={}", t.succeeded());
    rec(
        "txn k1=v1 ? put p/t-<who> : get k2",
        outcome(
            client
                .txn(
                    Txn::new()
                        .when([Compare::value("k1", CompareOp::Equal, "v1")])
                        .and_then([TxnOp::put(format!("p/t-{who}"), "t", None)])
                        .or_else([TxnOp::get("k2", None)]),
                )
                .await,
            txn,
        ),
    );
    rec(
        "read-only txn z1 exists ? get p/a",
        outcome(
            client
                .txn(
                    Txn::new()
                        .when([Compare::version("z1", CompareOp::Greater, 0)])
                        .and_then([TxnOp::get("p/a", None)]),
                )
                .await,
            txn,
        ),
    );
    rec(
        "watch prefix p/",
        match client
            .watch("p/", Some(WatchOptions::new().with_prefix()))
            .await
        {
            Err(e) => {
                let (c, m) = grpc_error(&e);
                Outcome::Err(c, m)
            }
            Ok(mut stream) => {
                let first = tokio::time::timeout(Duration::from_secs(5), stream.message()).await;
                Outcome::Ok(match first {
                    Ok(Ok(Some(r))) => format!(
                        "watch_id={} created={} canceled={} reason={:?}",
                        r.watch_id(),
                        r.created(),
                        r.canceled(),
                        r.cancel_reason()
                    ),
                    other => format!("{other:?}"),
                })
            }
        },
    );
    rec(
        "lease grant",
        outcome(client.lease_grant(60, None).await, |l| {
            format!("ttl={}", l.ttl())
        }),
    );
    // etcd 3.6: listing leases, or a lease's keys, needs read access to every attached key.
    rec(
        "lease time-to-live with keys of the lease of p/leased",
        outcome(
            client
                .lease_time_to_live(
                    leased,
                    Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys()),
                )
                .await,
            |l| format!("keys={}", l.keys().len()),
        ),
    );
    rec(
        "lease time-to-live of the lease of p/leased",
        outcome(client.lease_time_to_live(leased, None).await, |l| {
            format!("granted={}", l.granted_ttl())
        }),
    );
    rec(
        "lease leases",
        outcome(client.leases().await, |l| format!("n={}", l.leases().len())),
    );
    rec(
        "lease revoke of the lease of p/leased",
        outcome(client.lease_revoke(leased).await, |_| "revoked".into()),
    );
    let mut auth = client.auth_client();
    rec(
        "user list",
        outcome(auth.user_list().await, |u| u.users().join(",")),
    );
    rec(
        "user get self",
        outcome(auth.user_get(who).await, |u| u.roles().join(",")),
    );
    rec(
        "user get alice",
        outcome(auth.user_get("alice").await, |u| u.roles().join(",")),
    );
    rec(
        "role get rwp",
        outcome(auth.role_get("rwp").await, |r| {
            r.permissions()
                .iter()
                .map(|p| {
                    format!(
                        "{:?} {:?}..{:?}",
                        p.get_type(),
                        String::from_utf8_lossy(p.key()),
                        String::from_utf8_lossy(p.range_end())
                    )
                })
                .collect::<Vec<_>>()
                .join(";")
        }),
    );
    rec(
        "role list",
        outcome(auth.role_list().await, |r| r.roles().join(",")),
    );
    rec(
        "role add",
        outcome(auth.role_add(format!("new-{who}")).await, |_| {
            "added".into()
        }),
    );
    rec(
        "member list",
        outcome(client.member_list().await, |m| {
            format!("members={}", m.members().len())
        }),
    );
    rec(
        "status",
        outcome(client.status().await, |_| "status".into()),
    );
    rec(
        "hash kv",
        outcome(client.hash_kv(0).await, |_| "hashed".into()),
    );
    rec(
        "defragment",
        outcome(client.defragment().await, |_| "defragmented".into()),
    );
    out
}

async fn matrix(server: &Server) -> Vec<(String, Outcome)> {
    let mut c = server.client().await;
    set_up(&mut c).await;
    let mut root = server.client_as("root", PW).await.expect("root logs in");
    let mut out = Vec::new();
    for who in ["alice", "bob", "carol", "root", "nobody"] {
        // Each user's lease holds one key under p/: revoking it needs write access there.
        let lease = root.lease_grant(60, None).await.unwrap().id();
        root.put(
            format!("p/leased-for-{who}"),
            "l",
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
        let mut client = if who == "nobody" {
            server.client().await
        } else {
            server.client_as(who, PW).await.expect("user logs in")
        };
        out.extend(operations(who, &mut client, lease).await);
    }
    let rec = |name: &str, o: Outcome| (name.to_string(), o);
    out.push(rec(
        "wrong password",
        outcome(server.client_as("alice", "nope").await, |_| {
            "logged in".into()
        }),
    ));
    out.push(rec(
        "unknown user",
        outcome(server.client_as("mallory", PW).await, |_| {
            "logged in".into()
        }),
    ));
    let mut a = root.auth_client();
    out.push(rec(
        "root: delete root",
        outcome(a.user_delete("root").await, |_| "deleted".into()),
    ));
    out.push(rec(
        "root: revoke root from root",
        outcome(a.user_revoke_role("root", "root").await, |_| {
            "revoked".into()
        }),
    ));
    out.push(rec(
        "root: delete role root",
        outcome(a.role_delete("root").await, |_| "deleted".into()),
    ));
    out.push(rec(
        "root: revoke a permission not granted",
        outcome(a.role_revoke_permission("rk", "k9", None).await, |_| {
            "revoked".into()
        }),
    ));
    out.push(rec(
        "root: revoke a role not granted",
        outcome(a.user_revoke_role("carol", "rk").await, |_| {
            "revoked".into()
        }),
    ));
    out.push(rec(
        "root: add an existing user",
        outcome(a.user_add("alice", PW, None).await, |_| "added".into()),
    ));
    out.push(rec(
        "root: add a user without a name",
        outcome(a.user_add("", PW, None).await, |_| "added".into()),
    ));
    out.push(rec(
        "root: grant a missing role",
        outcome(a.user_grant_role("carol", "nope").await, |_| {
            "granted".into()
        }),
    ));
    out.push(rec(
        "root: get a missing user",
        outcome(a.user_get("nope").await, |_| "got".into()),
    ));
    // Deleting a role takes it from its users: alice loses the prefix p/.
    out.push(rec(
        "root: delete role rwp",
        outcome(a.role_delete("rwp").await, |_| "deleted".into()),
    ));
    let mut alice = server.client_as("alice", PW).await.unwrap();
    out.push(rec(
        "alice after rwp was deleted: get p/a",
        outcome(alice.get("p/a", None).await, |g| keys(g.kvs())),
    ));
    out.push(rec(
        "alice: user get self",
        outcome(alice.auth_client().user_get("alice").await, |u| {
            u.roles().join(",")
        }),
    ));
    out.push(rec(
        "root: change alice's password",
        outcome(a.user_change_password("alice", "pw-2").await, |_| {
            "changed".into()
        }),
    ));
    out.push(rec(
        "alice with the old password",
        outcome(server.client_as("alice", PW).await, |_| "logged in".into()),
    ));
    out.push(rec(
        "alice with the new password",
        outcome(server.client_as("alice", "pw-2").await, |_| {
            "logged in".into()
        }),
    ));
    out.push(rec(
        "root: auth disable",
        outcome(a.auth_disable().await, |_| "disabled".into()),
    ));
    out.push(rec(
        "nobody after disable: get k2",
        outcome(c.get("k2", None).await, |g| keys(g.kvs())),
    ));
    out.push(rec(
        "authenticate when disabled",
        outcome(server.client_as("alice", "pw-2").await, |_| {
            "logged in".into()
        }),
    ));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn permission_matrix_matches_etcd() {
    let [etcd, subject] = support::both(&[]).await;
    let (expected, got) = tokio::join!(matrix(&etcd), matrix(&subject));
    assert_eq!(expected.len(), got.len());
    let diffs: Vec<String> = expected
        .iter()
        .zip(&got)
        .filter(|(e, g)| e != g)
        .map(|(e, g)| format!("{}\n  etcd:    {:?}\n  subject: {:?}", e.0, e.1, g.1))
        .collect();
    assert!(
        diffs.is_empty(),
        "{} of {} answers differ from the reference etcd:\n{}",
        diffs.len(),
        expected.len(),
        diffs.join("\n")
    );
    // The matrix is not vacuous: it holds grants, refusals of each kind and admin checks.
    let has = |s: &str| got.iter().any(|(_, o)| format!("{o:?}").contains(s));
    for s in [
        "permission denied",
        "user name is empty",
        "authentication failed",
        "invalid auth management",
        "count=",
    ] {
        assert!(has(s), "no answer contains {s:?}");
    }
}

/// etcdctl's auth runbook, output for output.
#[tokio::test(flavor = "multi_thread")]
async fn etcdctl_auth_runbook_matches_etcd() {
    let script: &[&[&str]] = &[
        &["user", "add", "root:rootpw"],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "app"],
        &[
            "role",
            "grant-permission",
            "app",
            "readwrite",
            "app/",
            "--prefix",
        ],
        &["role", "grant-permission", "app", "read", "conf"],
        &["user", "add", "svc:svcpw"],
        &["user", "grant-role", "svc", "app"],
        &["auth", "enable"],
        &["put", "app/x", "1"],
        &["--user=svc:svcpw", "put", "app/x", "1"],
        &["--user=svc:svcpw", "get", "app/", "--prefix"],
        &["--user=svc:svcpw", "put", "conf", "1"],
        &["--user=svc:wrong", "get", "app/x"],
        &["--user=svc:svcpw", "user", "list"],
        &["--user=root:rootpw", "user", "list"],
        &["--user=root:rootpw", "user", "get", "svc"],
        &["--user=root:rootpw", "role", "get", "app"],
        &["--user=root:rootpw", "role", "list"],
        &[
            "--user=root:rootpw",
            "role",
            "revoke-permission",
            "app",
            "conf",
        ],
        &["--user=root:rootpw", "user", "revoke-role", "svc", "app"],
        &["--user=svc:svcpw", "get", "app/x"],
        &["--user=root:rootpw", "user", "delete", "svc"],
        &["--user=root:rootpw", "auth", "disable"],
        &["get", "app/x", "--print-value-only"],
    ];
    // etcdctl's client logs its retries as JSON lines with times and addresses: not answers.
    fn answer(stderr: &str) -> String {
        stderr
            .lines()
            .filter(|l| !l.starts_with('{'))
            .collect::<Vec<_>>()
            .join("\n")
    }
    let [etcd, subject] = support::both(&[]).await;
    for step in script {
        let (e, s) = tokio::join!(etcd.etcdctl(step), subject.etcdctl(step));
        assert_eq!(
            (e.status.success(), e.stdout.trim(), answer(&e.stderr)),
            (s.status.success(), s.stdout.trim(), answer(&s.stderr)),
            "etcdctl {step:?}: etcd (left) and the subject (right) differ"
        );
    }
}

async fn enable_with_reader(server: &Server) {
    let mut c = server.client().await;
    let mut a = c.auth_client();
    a.user_add("root", PW, None).await.unwrap();
    a.user_grant_role("root", "root").await.unwrap();
    a.user_add("reader", PW, None).await.unwrap();
    a.role_add("r").await.unwrap();
    a.role_grant_permission("r", Permission::read("k"))
        .await
        .unwrap();
    a.user_grant_role("reader", "r").await.unwrap();
    c.put("k", "v", None).await.unwrap();
    a.auth_enable().await.unwrap();
}

/// A simple token unused for `--auth-token-ttl` is forgotten; one in use lives on.
#[tokio::test(flavor = "multi_thread")]
async fn simple_tokens_expire_after_the_ttl_unless_used() {
    let [etcd, subject] = support::both(&["--auth-token-ttl=3"]).await;
    for server in [&etcd, &subject] {
        let l = server.kind.label();
        enable_with_reader(server).await;
        let mut busy = server.client_as("reader", PW).await.unwrap();
        let mut idle = server.client_as("reader", PW).await.unwrap();
        for _ in 0..5 {
            busy.get("k", None)
                .await
                .unwrap_or_else(|e| panic!("{l}: {e}"));
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // 5 s unused, with a 3 s TTL (etcd sweeps every second).
        let e = idle
            .get("k", None)
            .await
            .expect_err("the idle token expired");
        assert_eq!(
            grpc_error(&e),
            (
                tonic::Code::Unauthenticated,
                "etcdserver: invalid auth token".into()
            ),
            "{l}"
        );
        busy.get("k", None)
            .await
            .unwrap_or_else(|e| panic!("{l}: {e}"));
    }
}

/// JWT tokens (ES256 keys made here): the token is a signed JWT naming the user, any member
/// accepts it, and it stops working at its `exp`.
#[tokio::test(flavor = "multi_thread")]
async fn jwt_tokens_are_signed_and_expire() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let (priv_path, pub_path) = (dir.path().join("jwt.key"), dir.path().join("jwt.pub"));
    std::fs::write(&priv_path, key.serialize_pem()).unwrap();
    std::fs::write(&pub_path, key.public_key_pem()).unwrap();
    let flag = format!(
        "--auth-token=jwt,pub-key={},priv-key={},sign-method=ES256,ttl=3s",
        pub_path.display(),
        priv_path.display()
    );
    let [etcd, subject] = support::both(&[&flag]).await;
    for server in [&etcd, &subject] {
        let l = server.kind.label();
        enable_with_reader(server).await;
        let c = server.client().await;
        let token = c
            .auth_client()
            .authenticate("reader".into(), PW.into())
            .await
            .unwrap_or_else(|e| panic!("{l}: {e}"))
            .token()
            .to_string();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3, "{l}: a JWT has three parts: {token}");
        use base64::Engine;
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(parts[1])
                .unwrap(),
        )
        .unwrap();
        assert_eq!(claims["username"], "reader", "{l}: {claims}");
        assert!(claims["revision"].as_u64().unwrap() > 0, "{l}: {claims}");
        assert!(claims["exp"].as_u64().is_some(), "{l}: {claims}");

        let mut reader = server.client_as("reader", PW).await.unwrap();
        reader
            .get("k", None)
            .await
            .unwrap_or_else(|e| panic!("{l}: {e}"));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let e = reader.get("k", None).await.expect_err("the JWT expired");
        assert_eq!(
            grpc_error(&e),
            (
                tonic::Code::Unauthenticated,
                "etcdserver: invalid auth token".into()
            ),
            "{l}"
        );
    }
}

/// The auth store is replicated and durable: users made through one member log in at the
/// others, permissions hold everywhere, and all of it survives a restart of every member
/// (one of them killed).
#[tokio::test(flavor = "multi_thread")]
async fn auth_replicates_and_survives_restart() {
    let _serial = support::serial_cluster_test();
    let mut cluster = Cluster::start(Kind::subject(), 3).await;
    enable_with_reader(&cluster.members[0]).await;
    async fn check(cluster: &Cluster, when: &str) {
        {
            for (i, m) in cluster.members.iter().enumerate() {
                let mut reader = m
                    .client_as("reader", PW)
                    .await
                    .unwrap_or_else(|e| panic!("{when}: member {i}: {e}"));
                let got = reader.get("k", None).await.unwrap();
                assert_eq!(got.kvs()[0].value(), b"v", "{when}: member {i}");
                let e = reader.put("k", "x", None).await.expect_err("read only");
                assert_eq!(
                    grpc_error(&e),
                    (
                        tonic::Code::PermissionDenied,
                        "etcdserver: permission denied".into()
                    ),
                    "{when}: member {i}"
                );
                let mut anonymous = m.client().await;
                let e = anonymous.get("k", None).await.expect_err("no user");
                assert_eq!(
                    grpc_error(&e),
                    (
                        tonic::Code::InvalidArgument,
                        "etcdserver: user name is empty".into()
                    ),
                    "{when}: member {i}"
                );
            }
        }
    }
    check(&cluster, "after enabling").await;
    cluster.kill9(1);
    cluster.restart(1).await;
    cluster.restart_all().await;
    check(&cluster, "after restarts").await;
}

/// Under `--client-cert-auth` a client certificate's CommonName is the user when the
/// request carries no token.
#[tokio::test(flavor = "multi_thread")]
async fn client_certificate_common_name_is_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::pki::Ca::new(dir.path(), "ca");
    let server_cert = ca.issue("server", "server");
    let reader_cert = ca.issue("reader", "reader");
    let flags = [
        format!("--cert-file={}", server_cert.cert.display()),
        format!("--key-file={}", server_cert.key.display()),
        format!("--trusted-ca-file={}", ca.pem.display()),
        "--client-cert-auth".to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let tls = support::TlsClient {
            client_https: true,
            ca: Some(ca.pem.clone()),
            identity: Some(reader_cert.clone()),
            ..Default::default()
        };
        let server = Server::start_tls(kind, &flags, tls).await;
        enable_with_reader(&server).await;
        let mut c = server.client().await;
        let got = c
            .get("k", None)
            .await
            .unwrap_or_else(|e| panic!("{l}: the CN reader may read k: {e}"));
        assert_eq!(got.kvs().len(), 1, "{l}");
        let e = c.put("k", "x", None).await.expect_err("read only");
        assert_eq!(
            grpc_error(&e),
            (
                tonic::Code::PermissionDenied,
                "etcdserver: permission denied".into()
            ),
            "{l}"
        );
    }
}

/// A backup carries the auth store both ways: etcd's backup restored into the subject, and
/// the subject's restored into etcd, keep the users, their permissions and auth enabled.
#[tokio::test(flavor = "multi_thread")]
async fn backups_carry_the_auth_store_both_ways() {
    let _serial = support::serial_cluster_test();
    support::require_etcd();
    let dir = tempfile::tempdir().unwrap();
    for (from, to) in [(Kind::Etcd, Kind::subject()), (Kind::subject(), Kind::Etcd)] {
        let what = format!("{} backup restored into {}", from.label(), to.label());
        let server = Server::start(from).await;
        enable_with_reader(&server).await;
        let backup = dir.path().join(format!("{}.db", from.label()));
        let user = format!("--user=root:{PW}");
        server
            .etcdctl(&[&user, "snapshot", "save", &backup.display().to_string()])
            .await
            .ok();
        drop(server);
        let cluster = Cluster::start_from_backup(to, 1, &backup).await;
        let m = &cluster.members[0];
        let mut reader = m
            .client_as("reader", PW)
            .await
            .unwrap_or_else(|e| panic!("{what}: reader logs in: {e}"));
        let got = reader.get("k", None).await.unwrap();
        assert_eq!(got.kvs()[0].value(), b"v", "{what}");
        let e = reader.put("k", "x", None).await.expect_err("read only");
        assert_eq!(grpc_error(&e).0, tonic::Code::PermissionDenied, "{what}");
        let e = m.client().await.get("k", None).await.expect_err("no user");
        assert_eq!(
            grpc_error(&e),
            (
                tonic::Code::InvalidArgument,
                "etcdserver: user name is empty".into()
            ),
            "{what}"
        );
    }
}

/// A Range sent with raw metadata `token` = `bytes` over a bare tonic client.
async fn range_with_raw_token(server: &Server, bytes: &[u8]) -> Outcome {
    use oxcd::pb::etcdserverpb::{kv_client::KvClient, RangeRequest};
    let mut kv = KvClient::connect(server.endpoint()).await.expect("connect");
    let mut req = tonic::Request::new(RangeRequest {
        key: b"k".to_vec(),
        ..Default::default()
    });
    req.metadata_mut().insert(
        "token",
        tonic::metadata::MetadataValue::try_from(bytes).expect("a header value"),
    );
    match kv.range(req).await {
        Ok(r) => Outcome::Ok(format!("count={}", r.into_inner().count)),
        Err(s) => Outcome::Err(s.code(), s.message().to_string()),
    }
}

/// A token that is not UTF-8 is a token all the same: with auth on it is an invalid one (it
/// was read as no token at all), with auth off it is ignored. Side by side with etcd.
#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_is_not_utf8_is_an_invalid_token() {
    let raw = [b'a', 0xff, 0xfe, b'.', 0x80];
    let mut seen = Vec::new();
    for server in &support::both(&[]).await {
        let off = range_with_raw_token(server, &raw).await;
        enable_with_reader(server).await;
        let on = range_with_raw_token(server, &raw).await;
        seen.push((server.kind.label(), off, on));
    }
    assert_eq!(
        seen[1].2,
        Outcome::Err(
            tonic::Code::Unauthenticated,
            "etcdserver: invalid auth token".into()
        ),
        "{seen:?}"
    );
    assert_eq!(
        (&seen[0].1, &seen[0].2),
        (&seen[1].1, &seen[1].2),
        "{seen:?}"
    );
}
