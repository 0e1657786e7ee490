//! The server image, as Kubernetes will run it, with no container engine: the archive
//! `scripts/build-image.sh` writes holds what a runtime needs (entrypoint, user, env, ports,
//! volume, a layer with the binary and its libraries), and a 3-member cluster runs from it,
//! each member unpacked and run by runc as the image's user, on a host of its own (a network
//! namespace) addressed by name. One test stops a member; one cuts a member off its peers
//! (a partition) and checks that the majority serves, the minority refuses what it must, and
//! everyone converges afterwards.

mod support;

use etcd_client::GetOptions;
use sha2::{Digest, Sha256};
use std::process::Command;
use std::time::{Duration, Instant};
use support::{server_image, Cluster, Kind, Placement};

/// Retries a write until it succeeds, within `within` (a member may still be electing).
async fn put_retrying(c: &mut etcd_client::Client, key: String, value: String, within: Duration) {
    let deadline = Instant::now() + within;
    while let Err(e) = c.put(key.as_str(), value.as_str(), None).await {
        assert!(Instant::now() < deadline, "write {key} kept failing: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One file of the image archive (the archive is a tar of an OCI layout).
fn archive_file(archive: &std::path::Path, path: &str) -> Vec<u8> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg(path)
        .output()
        .expect("run tar");
    assert!(out.status.success(), "{path} is not in the archive");
    out.stdout
}

fn blob(archive: &std::path::Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let data = archive_file(archive, &format!("blobs/sha256/{hex}"));
    assert_eq!(
        format!("{:x}", Sha256::digest(&data)),
        hex,
        "blob {digest} does not match its digest"
    );
    data
}

#[test]
fn image_archive_holds_what_a_runtime_needs() {
    let archive = server_image();
    let json = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b).expect("JSON");
    let layout = json(&archive_file(&archive, "oci-layout"));
    assert_eq!(layout["imageLayoutVersion"], "1.0.0");
    let index = json(&archive_file(&archive, "index.json"));
    let m = &index["manifests"][0];
    assert_eq!(
        m["annotations"]["io.containerd.image.name"],
        "docker.io/library/oxcd:test"
    );
    let manifest = json(&blob(&archive, m["digest"].as_str().unwrap()));
    let config = json(&blob(
        &archive,
        manifest["config"]["digest"].as_str().unwrap(),
    ));
    let c = &config["config"];
    assert_eq!(c["Entrypoint"], serde_json::json!(["/usr/local/bin/oxcd"]));
    assert_eq!(c["User"], "65532:65532");
    assert!(c["Env"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("ETCD_DATA_DIR=/var/lib/oxcd/data")));
    assert_eq!(
        c["ExposedPorts"],
        serde_json::json!({"2379/tcp": {}, "2380/tcp": {}})
    );
    assert_eq!(c["Volumes"], serde_json::json!({"/var/lib/oxcd": {}}));
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    assert_eq!(
        (config["os"].as_str(), config["architecture"].as_str()),
        (Some("linux"), Some(arch))
    );

    // `docker load` reads Docker's own manifest beside the OCI one.
    let docker = json(&archive_file(&archive, "manifest.json"));
    assert_eq!(docker[0]["RepoTags"], serde_json::json!(["oxcd:test"]));

    // The one layer: the binary, every library it links, the volume owned by the user.
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    let layer = blob(&archive, layers[0]["digest"].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("layer.tgz"), &layer).unwrap();
    let listing = Command::new("tar")
        .args(["-tvzf"])
        .arg(dir.path().join("layer.tgz"))
        .arg("--numeric-owner")
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout).to_string();
    // The uncompressed layer is the config's diff_id.
    let gunzip = Command::new("gzip")
        .args(["-dc"])
        .arg(dir.path().join("layer.tgz"))
        .output()
        .unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0].as_str().unwrap(),
        format!("sha256:{:x}", Sha256::digest(&gunzip.stdout))
    );
    let has = |path: &str| listing.lines().any(|l| l.ends_with(&format!(" {path}")));
    assert!(has("usr/local/bin/oxcd"), "no binary in:\n{listing}");
    let ldd = Command::new("ldd")
        .arg(Kind::Oxcd.binary())
        .output()
        .unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        assert!(has(&lib[1..]), "{lib} is not in the layer:\n{listing}");
    }
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("drwxr-xr-x 65532/65532") && l.ends_with(" var/lib/oxcd/")),
        "the volume is not owned by the image's user:\n{listing}"
    );
    assert!(
        listing.lines().count() < 40,
        "the layer holds more than it should:\n{listing}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn three_member_cluster_from_the_image_survives_a_stopped_member() {
    let _serial = support::serial_cluster_test();
    let mut cluster = Cluster::start_on_hosts(Kind::Oxcd, 3, &[], Placement::Image).await;

    // Members are known by their host names, as StatefulSet pods are by DNS.
    let mut c = cluster.client().await;
    let members = c.member_list().await.unwrap();
    assert_eq!(members.members().len(), 3);
    for m in &cluster.members {
        let n = &m.name;
        assert!(
            members.members().iter().any(|x| x.name() == n
                && x.peer_urls() == [format!("http://{n}:2380")]
                && x.client_urls() == [format!("http://{n}:2379")]),
            "{n} is not listed by name: {members:?}"
        );
        // The container runs as the image's user, on its volume.
        let pid = m.server_pid().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid.split_whitespace().skip(1).all(|u| u == "65532"),
            "{n} runs as {uid}"
        );
        assert!(m.data_dir().join("member").exists());
    }
    for i in 0..50 {
        put_retrying(
            &mut c,
            format!("k{i}"),
            format!("v{i}"),
            Duration::from_secs(10),
        )
        .await;
    }

    // Stop the third member; the other two keep serving writes and linearizable reads.
    cluster.stop(2);
    let mut c2 = cluster.client_without(2).await;
    for i in 50..100 {
        put_retrying(
            &mut c2,
            format!("k{i}"),
            format!("v{i}"),
            Duration::from_secs(10),
        )
        .await;
    }
    let r = c2
        .get("k", Some(GetOptions::new().with_prefix().with_count_only()))
        .await
        .unwrap();
    assert_eq!(r.count(), 100);

    // Back again: it catches up from the others.
    cluster.restart(2).await;
    cluster.wait_converged(Duration::from_secs(30)).await;
    let mut c3 = cluster.member_client(2).await;
    let r = c3
        .get(
            "k",
            Some(GetOptions::new().with_prefix().with_serializable()),
        )
        .await
        .unwrap();
    assert_eq!(r.kvs().len(), 100, "restarted member has every key");
}

#[tokio::test(flavor = "multi_thread")]
async fn partitioned_minority_refuses_writes_and_the_cluster_heals() {
    let _serial = support::serial_cluster_test();
    let cluster = Cluster::start_on_hosts(Kind::Oxcd, 3, &[], Placement::Image).await;
    let net = cluster.net.as_ref().unwrap();
    let mut all = cluster.client().await;
    put_retrying(
        &mut all,
        "before".into(),
        "1".into(),
        Duration::from_secs(30),
    )
    .await;
    cluster.wait_converged(Duration::from_secs(10)).await;

    // Cut the third member off its peers (the test still reaches it).
    net.isolate(2);
    // Give it time to notice it lost the leader (check-quorum / election timeout).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut minority = cluster.member_client(2).await;
    let w = tokio::time::timeout(Duration::from_secs(8), minority.put("cut-off", "x", None)).await;
    assert!(
        !matches!(w, Ok(Ok(_))),
        "the partitioned member accepted a write: {w:?}"
    );
    let r = tokio::time::timeout(Duration::from_secs(8), minority.get("before", None)).await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "the partitioned member served a linearizable read: {r:?}"
    );
    let s = minority
        .get("before", Some(GetOptions::new().with_serializable()))
        .await
        .expect("serializable read on the minority");
    assert_eq!(s.kvs()[0].value(), b"1");

    // The majority keeps serving.
    let mut majority = cluster.client_without(2).await;
    for i in 0..50 {
        put_retrying(
            &mut majority,
            format!("p{i}"),
            format!("v{i}"),
            Duration::from_secs(10),
        )
        .await;
    }
    let r = majority.get("p49", None).await.unwrap();
    assert_eq!(r.kvs()[0].value(), b"v49");

    // Heal: the member catches up and serves linearizable reads again.
    net.heal();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Ok(r)) =
            tokio::time::timeout(Duration::from_secs(3), minority.get("p49", None)).await
        {
            assert_eq!(r.kvs()[0].value(), b"v49");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "healed member never served a linearizable read"
        );
    }
    // Every member converges: same revision, applied index and HashKV.
    cluster.wait_converged(Duration::from_secs(20)).await;
}
