//! TLS on client and peer URLs. Client-side scenarios run against real etcd 3.4 first (the
//! expectation) and then against the subject, with the same flags and certificates; peer
//! scenarios run clusters of the subject. Certificates are made by the tests (rcgen).

mod support;

use std::path::Path;
use std::time::Duration;

use support::pki::{Ca, Leaf};
use support::{Cluster, Kind, Server, TlsClient};

fn arg(flag: &str, path: &Path) -> String {
    format!("--{flag}={}", path.display())
}

/// The flags of a server presenting `server` and, with `client_ca`, requiring client
/// certificates signed by it.
fn client_tls_flags(server: &Leaf, client_ca: Option<&Path>) -> Vec<String> {
    let mut f = vec![arg("cert-file", &server.cert), arg("key-file", &server.key)];
    if let Some(ca) = client_ca {
        f.push(arg("trusted-ca-file", ca));
        f.push("--client-cert-auth".into());
    }
    f
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `curl` over https with the given client identity; returns (exit ok, body).
async fn curl(url: &str, ca: &Path, identity: Option<&Leaf>) -> (bool, String) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "10", "--cacert"]).arg(ca);
    if let Some(id) = identity {
        cmd.arg("--cert").arg(&id.cert).arg("--key").arg(&id.key);
    }
    let out = cmd.arg(url).output().await.expect("run curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// `/health`'s body when healthy: etcd 3.6 added the reason (empty).
fn health_ok(kind: Kind) -> &'static str {
    match kind {
        Kind::Etcd => r#"{"health":"true"}"#,
        _ => r#"{"health":"true","reason":""}"#,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn client_certificate_auth_admits_signed_clients_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server_cert = ca.issue("server", "server");
    let client_cert = ca.issue("client", "root");
    let other_ca = Ca::new(&dir.path().join("other"), "other-ca");
    let stranger = other_ca.issue("stranger", "root");
    let flags = client_tls_flags(&server_cert, Some(&ca.pem));
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let tls = TlsClient {
            client_https: true,
            ca: Some(ca.pem.clone()),
            identity: Some(client_cert.clone()),
            ..Default::default()
        };
        let server = Server::start_tls(kind, &strs(&flags), tls).await;
        let mut c = server.client().await;
        c.put("k", "v", None).await.unwrap();
        let out = server.etcdctl(&["get", "k"]).await;
        assert_eq!(out.ok(), "k\nv\n", "{l}: etcdctl with a client certificate");

        // No certificate, or one from another CA: refused.
        for (who, args) in [
            (
                "no certificate",
                vec![format!("--cacert={}", ca.pem.display())],
            ),
            (
                "a stranger's certificate",
                vec![
                    format!("--cacert={}", ca.pem.display()),
                    arg("cert", &stranger.cert),
                    arg("key", &stranger.key),
                ],
            ),
        ] {
            let mut a = args.clone();
            a.extend(["--command-timeout=3s".to_string(), "get".into(), "k".into()]);
            let out = support::etcdctl_at(&server.endpoint(), &strs(&a), None).await;
            assert!(
                !out.status.success(),
                "{l}: {who} must be refused, got {}",
                out.stdout
            );
        }

        let url = format!("{}/health", server.endpoint());
        assert_eq!(
            curl(&url, &ca.pem, Some(&client_cert)).await,
            (true, health_ok(kind).to_string()),
            "{l}: /health over https"
        );
        assert!(
            !curl(&url, &ca.pem, None).await.0,
            "{l}: /health without a certificate"
        );
        if kind == Kind::Oxcd {
            assert!(
                server.log().contains("rejected connection"),
                "{l}: refused handshakes are logged"
            );
        }
    }
}

/// One port named by an http:// and an https:// URL serves both. (etcd 3.4 accepts the same
/// flags, but its plain gRPC side of a shared port fails in some of its processes, with
/// every retry, so it cannot be the reference here: only the subject is checked.)
#[tokio::test(flavor = "multi_thread")]
async fn one_port_serves_http_and_https() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server_cert = ca.issue("server", "server");
    let flags = client_tls_flags(&server_cert, None);
    let tls = TlsClient {
        client_https: true,
        client_plain_too: true,
        ca: Some(ca.pem.clone()),
        ..Default::default()
    };
    let server = Server::start_tls(Kind::subject(), &strs(&flags), tls).await;
    let out = server.etcdctl(&["put", "k", "secure"]).await;
    assert_eq!(out.ok(), "OK\n");
    let plain = server.endpoint().replace("https://", "http://");
    let out = support::etcdctl_at(&plain, &["get", "k", "--print-value-only"], None).await;
    assert_eq!(out.ok(), "secure\n", "the same port over http://");
    let (ok, body) = curl(&format!("{}/version", server.endpoint()), &ca.pem, None).await;
    assert!(ok && body.contains("etcdserver"), "{body}");
    let r = support::http_request("GET", &plain, "/health")
        .await
        .expect("GET /health over http://");
    assert_eq!(r.status, 200, "{}", r.body);
}

/// The server's certificate and key files are replaced while it runs: new connections get
/// the new certificate (trusted only by the new CA), without a restart.
#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_certificate_is_used_without_restart() {
    for kind in [Kind::Etcd, Kind::subject()] {
        let l = kind.label();
        let dir = tempfile::tempdir().unwrap();
        let old_ca = Ca::new(&dir.path().join("old"), "old-ca");
        let new_ca = Ca::new(&dir.path().join("new"), "new-ca");
        let live = old_ca.issue("server", "server");
        let flags = client_tls_flags(&live, None);
        let tls = TlsClient {
            client_https: true,
            ca: Some(old_ca.pem.clone()),
            ..Default::default()
        };
        let server = Server::start_tls(kind, &strs(&flags), tls).await;
        let get = |ca: &Path| {
            let a = vec![
                format!("--cacert={}", ca.display()),
                "--command-timeout=3s".to_string(),
                "put".to_string(),
                "k".to_string(),
                "v".to_string(),
            ];
            let ep = server.endpoint();
            async move { support::etcdctl_at(&ep, &strs(&a), None).await }
        };
        assert!(
            get(&old_ca.pem).await.status.success(),
            "{l}: before rotation"
        );
        assert!(
            !get(&new_ca.pem).await.status.success(),
            "{l}: new CA before rotation"
        );

        let rotated = new_ca.issue("rotated", "server");
        // Write to temporary names and rename over, as cert-manager and friends do.
        for (from, to) in [(&rotated.key, &live.key), (&rotated.cert, &live.cert)] {
            let tmp = to.with_extension("tmp");
            std::fs::copy(from, &tmp).unwrap();
            std::fs::rename(&tmp, to).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if get(&new_ca.pem).await.status.success() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{l}: the rotated certificate is never served"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            !get(&old_ca.pem).await.status.success(),
            "{l}: old CA after rotation"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let server_cert = ca.issue("server", "server");
    let good = ca.issue("good", "root");
    let revoked = ca.issue("revoked", "root");
    let pem = ca.revoke("crl", &[&revoked]);
    let der = pem.with_extension("der");
    // A CRL file in PEM or in DER (both read by etcd).
    for (kind, crl) in [
        (Kind::Etcd, &pem),
        (Kind::subject(), &pem),
        (Kind::Etcd, &der),
        (Kind::subject(), &der),
    ] {
        let mut flags = client_tls_flags(&server_cert, Some(&ca.pem));
        flags.push(arg("client-crl-file", crl));
        let l = format!("{} with {}", kind.label(), crl.display());
        let tls = TlsClient {
            client_https: true,
            ca: Some(ca.pem.clone()),
            identity: Some(good.clone()),
            ..Default::default()
        };
        let server = Server::start_tls(kind, &strs(&flags), tls).await;
        assert_eq!(server.etcdctl(&["put", "k", "v"]).await.ok(), "OK\n", "{l}");
        let a = vec![
            format!("--cacert={}", ca.pem.display()),
            arg("cert", &revoked.cert),
            arg("key", &revoked.key),
            "--command-timeout=3s".to_string(),
            "get".into(),
            "k".into(),
        ];
        let out = support::etcdctl_at(&server.endpoint(), &strs(&a), None).await;
        assert!(
            !out.status.success(),
            "{l}: a revoked certificate is refused"
        );
    }
}

/// Members talk over https:// with client certificates required on the peer port; the
/// cluster replicates and elects like any other.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_tls_cluster_replicates() {
    let _serial = support::serial_cluster_test();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let peer = ca.issue("peer", "member");
    let server_cert = ca.issue("server", "server");
    let client = ca.issue("client", "root");
    let mut flags = client_tls_flags(&server_cert, Some(&ca.pem));
    flags.extend([
        arg("peer-cert-file", &peer.cert),
        arg("peer-key-file", &peer.key),
        arg("peer-trusted-ca-file", &ca.pem),
        "--peer-client-cert-auth".to_string(),
        "--peer-cert-allowed-cn=member".to_string(),
    ]);
    let tls = TlsClient {
        client_https: true,
        peer_https: true,
        ca: Some(ca.pem.clone()),
        identity: Some(client),
        ..Default::default()
    };
    let mut cluster = Cluster::start_tls(Kind::subject(), 3, &strs(&flags), tls).await;
    let mut c = cluster.client().await;
    for i in 0..20 {
        c.put(format!("k{i}"), "v", None).await.unwrap();
    }
    let rev = cluster.wait_converged(Duration::from_secs(20)).await;
    assert!(rev >= 21, "revision {rev}");
    let list = c.member_list().await.unwrap();
    for m in list.members() {
        assert!(
            m.peer_urls().iter().all(|u| u.starts_with("https://")),
            "{:?}",
            m.peer_urls()
        );
    }
    // A leader change over TLS.
    let leader = cluster.leader().await;
    cluster.kill9(leader);
    let (next, _) = cluster
        .wait_for_leader_change(leader, Duration::from_secs(20))
        .await;
    assert_ne!(next, leader);
    cluster.restart(leader).await;
    cluster.wait_converged(Duration::from_secs(20)).await;
}

/// `--peer-cert-allowed-cn`: a member whose peer certificate carries another CommonName
/// cannot join (its connections are refused, and the log says why); with the right one it
/// can.
#[tokio::test(flavor = "multi_thread")]
async fn a_peer_with_a_disallowed_cn_is_refused() {
    let _serial = support::serial_cluster_test();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "ca");
    let member = ca.issue("peer", "member");
    let intruder = ca.issue("intruder", "intruder");
    let peer_flags = |leaf: &Leaf| {
        vec![
            arg("peer-cert-file", &leaf.cert),
            arg("peer-key-file", &leaf.key),
            arg("peer-trusted-ca-file", &ca.pem),
            "--peer-client-cert-auth".to_string(),
            "--peer-cert-allowed-cn=member".to_string(),
        ]
    };
    let tls = TlsClient {
        peer_https: true,
        ..Default::default()
    };
    let mut cluster =
        Cluster::start_tls(Kind::subject(), 1, &strs(&peer_flags(&member)), tls).await;
    let i = cluster.member_add_unstarted(false).await;
    for a in peer_flags(&member) {
        cluster.members[i].remove_arg(&a);
    }
    for a in peer_flags(&intruder) {
        cluster.members[i].push_arg(&a);
    }
    cluster.members[i].respawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let log = cluster.members[0].log();
        // The refused member hears why, as Go words a bad_certificate alert.
        if log.contains("rejected connection")
            && log.contains("client certificate authentication failed")
            && cluster.members[i]
                .log()
                .contains("remote error: tls: bad certificate")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no refusal logged:\n{}",
            support::tail(&log, 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        cluster.members[i].status().await.is_err(),
        "the intruder must not be serving"
    );

    cluster.members[i].kill9();
    for a in peer_flags(&intruder) {
        cluster.members[i].remove_arg(&a);
    }
    for a in peer_flags(&member) {
        cluster.members[i].push_arg(&a);
    }
    cluster.start_added_member(i).await;
    let mut c = cluster.client().await;
    c.put("joined", "yes", None).await.unwrap();
    cluster.wait_converged(Duration::from_secs(20)).await;
}

/// `--auto-tls` and `--peer-auto-tls`: the members generate their own pairs under the data
/// dir and form a cluster over https:// without any certificate given.
#[tokio::test(flavor = "multi_thread")]
async fn auto_tls_cluster_forms_and_serves() {
    let _serial = support::serial_cluster_test();
    let tls = TlsClient {
        client_https: true,
        peer_https: true,
        ca_in_data_dir: Some("fixtures/client/cert.pem"),
        ..Default::default()
    };
    let cluster = Cluster::start_tls(Kind::Oxcd, 3, &["--auto-tls", "--peer-auto-tls"], tls).await;
    let mut c = cluster.member_client(0).await;
    c.put("k", "v", None).await.unwrap();
    cluster.wait_converged(Duration::from_secs(20)).await;
    for m in &cluster.members {
        for side in ["client", "peer"] {
            let f = m.data_dir().join("fixtures").join(side);
            assert!(
                f.join("cert.pem").exists() && f.join("key.pem").exists(),
                "{f:?}"
            );
        }
        let out = support::etcdctl_at(
            &m.endpoint(),
            &[
                "--insecure-skip-tls-verify",
                "--insecure-transport=false",
                "get",
                "k",
                "--print-value-only",
            ],
            None,
        )
        .await;
        assert_eq!(out.ok(), "v\n");
    }
}
