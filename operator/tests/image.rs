//! The operator's container image, built FROM scratch as an OCI archive by
//! `scripts/build-image.sh --operator` from the binary under test, runs: unpacked and run by
//! runc (`scripts/oci-image.py run --runc`, as its user, with no network), it executes the
//! binary with the libraries the script copied and prints the same CRD as `crds/`. No
//! container engine is needed.

use std::process::Command;

#[test]
fn operator_image_runs_and_prints_the_crd() {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("operator.oci.tar");
    let build = Command::new("bash")
        .arg(format!("{repo}/scripts/build-image.sh"))
        .args(["--operator", "oxcd-operator:test"])
        .env("OXCD", env!("CARGO_BIN_EXE_oxcd-operator"))
        .env("OUT", &archive)
        .output()
        .expect("run scripts/build-image.sh");
    assert!(
        build.status.success(),
        "image build failed: {}",
        String::from_utf8_lossy(&build.stderr)
    );
    let script = format!("{repo}/scripts/oci-image.py");
    let unpacked = dir.path().join("image");
    let unpack = Command::new("python3")
        .arg(&script)
        .arg("unpack")
        .arg(&archive)
        .arg(&unpacked)
        .output()
        .unwrap();
    assert!(
        unpack.status.success(),
        "{}",
        String::from_utf8_lossy(&unpack.stderr)
    );
    // With runc, in a network namespace of its own with nothing in it (--network none).
    let id = format!("oxcd-operator-test-{}", std::process::id());
    let run = Command::new("python3")
        .arg(&script)
        .args(["run", "--runc", "", &id])
        .arg(&unpacked)
        .arg("crd")
        .output()
        .expect("run the image");
    assert!(
        run.status.success(),
        "the image did not run `oxcd-operator crd`: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let printed = String::from_utf8(run.stdout).unwrap();
    let shipped = std::fs::read_to_string(format!("{repo}/crds/etcdcluster.yaml")).unwrap();
    assert_eq!(
        printed, shipped,
        "the image's CRD differs from crds/etcdcluster.yaml"
    );
}
