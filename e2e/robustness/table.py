"""Markdown table of two robustness runs (run.sh's results.tsv): per scenario, the runs that
passed on oxcd and on etcd, and the failpoints each picked."""
import collections
import datetime
import sys


def load(path):
    runs = collections.defaultdict(list)
    with open(path) as f:
        next(f)
        for line in f:
            scenario, _run, failpoint, result, _secs = line.rstrip("\n").split("\t")
            runs[scenario].append((failpoint, result))
    return runs


oxcd, etcd, commit = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
print(f"Run on {datetime.date.today()} at commit {commit} (etcd 3.6.16's suite; both servers on the same machine).\n")
print("| scenario | oxcd passed | etcd 3.6 passed | failpoints oxcd ran (failed ones marked) | failpoints etcd ran |")
print("|---|---|---|---|---|")
for scenario in sorted(set(oxcd) | set(etcd)):
    cells = []
    for runs in (oxcd, etcd):
        ok = sum(1 for _, r in runs.get(scenario, []) if r == "pass")
        cells.append(f"{ok}/{len(runs.get(scenario, []))}")
    fps = []
    for runs in (oxcd, etcd):
        seen = collections.Counter(
            fp + ("" if r == "pass" else f" ({r})") for fp, r in runs.get(scenario, [])
        )
        fps.append(", ".join(f"{fp} ×{n}" if n > 1 else fp for fp, n in sorted(seen.items())))
    name = scenario.replace("TestRobustness", "")
    print(f"| {name} | {cells[0]} | {cells[1]} | {fps[0]} | {fps[1]} |")
