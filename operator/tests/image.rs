//! The operator's container image, built FROM scratch as an OCI archive by
//! `scripts/build-image.sh --operator` from the binary under test, runs: unpacked and run by
//! runc (`scripts/oci-image.py run --runc`, as its user, with no network), it executes the
//! binary with the libraries the script copied and prints the same CRD as `crds/`. No
//! container engine is needed.

use std::process::Command;

/// Runs `cmd`, failing the test with `what` and its stderr unless it succeeds; its stdout.
fn run_ok(what: &str, cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn operator_image_runs_and_prints_the_crd() {
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("operator.oci.tar");
    run_ok(
        "the image build",
        Command::new("bash")
            .arg(format!("{repo}/scripts/build-image.sh"))
            .args(["--operator", "oxcd-operator:test"])
            .env("OXCD", env!("CARGO_BIN_EXE_oxcd-operator"))
            .env("OUT", &archive),
    );
    let script = format!("{repo}/scripts/oci-image.py");
    let unpacked = dir.path().join("image");
    run_ok(
        "unpacking the image",
        Command::new("python3")
            .arg(&script)
            .arg("unpack")
            .arg(&archive)
            .arg(&unpacked),
    );
    // With runc, in a network namespace of its own with nothing in it (--network none).
    let id = format!("oxcd-operator-test-{}", std::process::id());
    let printed = run_ok(
        "running `oxcd-operator crd` in the image",
        Command::new("python3")
            .arg(&script)
            .args(["run", "--runc", "", &id])
            .arg(&unpacked)
            .arg("crd"),
    );
    let shipped = std::fs::read_to_string(format!("{repo}/crds/etcdcluster.yaml")).unwrap();
    assert_eq!(
        printed, shipped,
        "the image's CRD differs from crds/etcdcluster.yaml"
    );
}
