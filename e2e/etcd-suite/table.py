#!/usr/bin/env python3
"""Per-area table of two run.sh result files (reference etcd first, oxcd second), as
markdown, for docs/CONFORMANCE.md. Usage: table.py REF.tsv OXCD.tsv [REF-LABEL]."""
import re
import sys

AREAS = [
    ("etcdctl: auth, users, roles", r"^TestCtlV3(Auth|User|Role)"),
    ("etcdctl: put, get, del, txn, compact", r"^TestCtlV3(Put|Get|Del|Txn|Compact)"),
    ("etcdctl: watch", r"^TestCtlV3Watch"),
    ("etcdctl: lease", r"^TestCtlV3Lease"),
    ("etcdctl: lock, elect", r"^TestCtlV3(Lock|Elect)"),
    ("etcdctl: members, endpoints, move-leader", r"^TestCtlV3(Member|Endpoint|MoveLeader)"),
    ("etcdctl: alarm, defrag, snapshot, version, make-mirror", r"^TestCtlV3(Alarm|Defrag|Snapshot|Version|MakeMirror|Migrate)"),
    ("etcdctl: other", r"^TestCtl"),
    ("JSON gateway (curl /v3/...)", r"^TestV3Curl"),
    ("server flags, TLS, peers", r"^Test(Etcd|Issue|DialWith)"),
    ("gateway and grpc-proxy commands", r"^Test(Gateway|Grpcproxy)"),
    ("upgrades from an older etcd", r"^TestRelease"),
    ("etcd 3.6 tests/common: KV, txn, lease, watch, compaction", r"^Test(KV|Txn|Lease|Watch|Compact|Defrag|Alarm)"),
    ("etcd 3.6 tests/common: auth, users, roles", r"^Test(Auth|User|Role|Root|.*With(No|Invalid|Root|User)Auth$)"),
    ("etcd 3.6 tests/common: members, endpoints, status", r"^Test(Member|Endpoint|Status|WaitLeader|Downgrade)"),
    ("snapshots, corruption, recovery", r"^Test.*(Snap|Corrupt|Recover|Reproduce|Issue|Hash)"),
    ("other", r"."),
]


def load(path):
    out = {}
    for line in open(path):
        parts = line.rstrip("\n").split("\t")
        if len(parts) < 2 or parts[0] == "test":
            continue
        r = parts[1]
        out[parts[0]] = "pass" if r == "flaky" else r
    return out


def area(name):
    for label, rx in AREAS:
        if re.search(rx, name):
            return label
    return "other"


def main():
    ref, sub = load(sys.argv[1]), load(sys.argv[2])
    ref_label = sys.argv[3] if len(sys.argv) > 3 else "etcd 3.4"
    rows = {}
    for name in sorted(set(ref) | set(sub)):
        a = area(name)
        r = rows.setdefault(a, [0, 0, 0, 0, 0])
        r[0] += 1
        r[1] += ref.get(name) == "pass"
        r[2] += sub.get(name) == "pass"
        r[3] += sub.get(name) in ("fail", "timeout")
        r[4] += sub.get(name) == "skip"
    print(f"| area | tests | {ref_label} passed | oxcd passed | oxcd failed | skipped |")
    print("| --- | --- | --- | --- | --- | --- |")
    tot = [0, 0, 0, 0, 0]
    for label, _ in AREAS:
        if label in rows:
            r = rows[label]
            tot = [x + y for x, y in zip(tot, r)]
            print(f"| {label} | {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} |")
    print(f"| **all** | {tot[0]} | {tot[1]} | {tot[2]} | {tot[3]} | {tot[4]} |")
    print()
    failing = [n for n in sorted(sub) if sub[n] in ("fail", "timeout")]
    print("Failing on oxcd: " + (", ".join(f"`{n}`" for n in failing) or "none") + ".")


if __name__ == "__main__":
    main()
