#!/usr/bin/env python3
"""Side-by-side benchmark of oxcd and etcd 3.4 on this machine.

Starts real etcd 3.4 (Debian's etcd-server, installed if missing) and oxcd with the same
flags, on the same disk and loopback, and runs every workload on both alternately
(A B A B ...), each run on a fresh cluster with fresh data dirs, with the same load generator
(`oxcd benchmark`). Prints a table of medians and oxcd/etcd ratios and writes it, with the
machine and the exact command, between the result markers of BENCHMARKS.md.

    scripts/bench-compare.py                 # full run: 3 rounds, 1 and 3 members, 1M keys
    scripts/bench-compare.py --quick         # a few minutes: 1 round, shorter runs, 100k keys
    scripts/bench-compare.py --quick --server OTHER/oxcd --out /tmp/other.md   # another build
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OXCD = os.path.join(ROOT, "target", "release", "oxcd")
# The oxcd server measured (--server); the load generator is always OXCD.
OXCD_SERVER = OXCD
ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
DATA = os.path.join(ROOT, "target", "bench")
MARK_START = "<!-- bench-compare:start -->"
MARK_END = "<!-- bench-compare:end -->"


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def ensure_tools():
    missing = [p for b, p in ((ETCD, "etcd-server"), (ETCDCTL, "etcd-client")) if not os.path.exists(b)]
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run(sudo + ["apt-get", "update"], check=True)
        subprocess.run(sudo + ["apt-get", "install", "-y"] + missing, check=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        for stop in (["systemctl", "stop", "etcd"], ["pkill", "-x", "etcd"]):
            subprocess.run(sudo + stop, stderr=subprocess.DEVNULL)
    log("building oxcd (release)")
    # Built as the test suite builds it (scripts/test.sh): `cargo build --bin oxcd` resolves the
    # dependencies' features without the dev-dependencies and would recompile them all.
    subprocess.run(["cargo", "test", "--workspace", "--release", "--no-run"], cwd=ROOT, check=True)


def fsync_rate(directory, seconds=2.0):
    """4 KiB writes + fdatasync per second on the benchmark disk."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    n, start, block = 0, time.time(), b"x" * 4096
    try:
        while time.time() - start < seconds:
            os.write(fd, block)
            os.fdatasync(fd)
            n += 1
    finally:
        os.close(fd)
        os.unlink(path)
    return n / (time.time() - start)


def machine(fsync):
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({cpu}), {mem // 1024} GiB memory, disk {fsync:.0f} fdatasync/s (4 KiB)"


class ClusterRun:
    """One fresh cluster of `impl` ("etcd" or "oxcd") with `n` members."""

    def __init__(self, impl, n, base_port):
        self.impl, self.n = impl, n
        self.dir = tempfile.mkdtemp(prefix=f"{impl}-", dir=DATA)
        self.clients = [f"127.0.0.1:{base_port + 10 * i}" for i in range(n)]
        self.peers = [f"http://127.0.0.1:{base_port + 10 * i + 1}" for i in range(n)]
        self.procs = []

    def args(self, i):
        initial = ",".join(f"m{j}={self.peers[j]}" for j in range(self.n))
        return [
            "--name", f"m{i}",
            "--data-dir", os.path.join(self.dir, f"m{i}"),
            "--listen-client-urls", f"http://{self.clients[i]}",
            "--advertise-client-urls", f"http://{self.clients[i]}",
            "--listen-peer-urls", self.peers[i],
            "--initial-advertise-peer-urls", self.peers[i],
            "--initial-cluster", initial,
            "--initial-cluster-token", "bench",
            "--initial-cluster-state", "new",
        ]

    def start(self):
        binary = ETCD if self.impl == "etcd" else OXCD_SERVER
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        self.started = time.time()
        self.procs = []
        for i in range(self.n):
            logf = open(os.path.join(self.dir, f"m{i}.log"), "ab")
            self.procs.append(subprocess.Popen([binary] + self.args(i), stdout=logf,
                                               stderr=subprocess.STDOUT, env=env))
        return self.wait_ready()

    def wait_ready(self, timeout=120):
        """Seconds from start until a linearizable read succeeds."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run([ETCDCTL, "--endpoints", ",".join(self.clients),
                                "--command-timeout=2s", "get", "bench-ready"],
                               env=dict(os.environ, ETCDCTL_API="3"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if r.returncode == 0:
                return time.time() - self.started
            time.sleep(0.05)
        raise RuntimeError(f"{self.impl} cluster did not become ready; logs in {self.dir}")

    def peak_rss_mib(self):
        """Largest VmHWM among the members, MiB."""
        peak = 0
        for p in self.procs:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peak = max(peak, int(line.split()[1]))
            except OSError:
                pass
        return peak / 1024

    def data_size_mib(self):
        total = 0
        for root, _, files in os.walk(self.dir):
            for f in files:
                if not f.endswith(".log"):
                    try:
                        total += os.path.getsize(os.path.join(root, f))
                    except OSError:
                        pass
        return total / (1 << 20) / self.n

    def stop(self):
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def destroy(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def etcdctl(self, *args):
        return subprocess.run([ETCDCTL, "--endpoints", self.clients[0], "--command-timeout=600s"] + list(args),
                              env=dict(os.environ, ETCDCTL_API="3"), capture_output=True, text=True)


def bench(cluster, args, conns=None):
    """Runs `oxcd benchmark` against the cluster and returns its JSON report."""
    out = os.path.join(cluster.dir, "report.json")
    cmd = [OXCD, "benchmark", "--endpoints", ",".join(cluster.clients), "--json", out, "--no-progress"] + args
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    with open(out) as f:
        return json.load(f)


def workloads(duration):
    """(name, setup args or None, benchmark args, target note)."""
    d = ["--duration", duration]
    put = ["--key-size", "8", "--val-size", "256", "--key-space-size", "100000"]
    return [
        ("put, 1 client", None, d + ["--clients", "1", "--conns", "1"] + put + ["put"]),
        ("put, 16 clients / 1 conn", None, d + ["--clients", "16", "--conns", "1"] + put + ["put"]),
        ("put, 100 clients / 10 conns", None, d + ["--clients", "100", "--conns", "10"] + put + ["put"]),
        ("put, 1000 clients / 100 conns", None, d + ["--clients", "1000", "--conns", "100"] + put + ["put"]),
        ("range 1 key, linearizable", ["--total", "1000", "--sequential-keys", "--key-space-size", "1000", "--val-size", "256", "put"],
         d + ["--clients", "100", "--conns", "10", "--key-space-size", "1000", "--consistency", "l", "range"]),
        ("range 1 key, serializable", ["--total", "1000", "--sequential-keys", "--key-space-size", "1000", "--val-size", "256", "put"],
         d + ["--clients", "100", "--conns", "10", "--key-space-size", "1000", "--consistency", "s", "range"]),
        ("range 1000-key prefix", ["--total", "1000", "--sequential-keys", "--key-space-size", "1000", "--val-size", "256", "--clients", "10", "put"],
         d + ["--clients", "16", "--conns", "4", "range", "--key", "00000", "--prefix"]),
        ("txn compare-and-swap, 10 hot keys", None,
         d + ["--clients", "16", "--conns", "4", "--key-space-size", "10", "--val-size", "64", "txn-put"]),
        ("watch: 1000 watchers, 1 writer (events)", None,
         ["--total", "300", "--clients", "1", "--val-size", "64", "--key-space-size", "1000",
          "watch", "--watchers", "1000", "--streams", "10"]),
        ("lease keep-alive, 10000 leases", None,
         d + ["--clients", "16", "--conns", "4", "lease-keepalive", "--leases", "10000", "--ttl", "600"]),
    ]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def run_workloads(members, rounds, duration, port):
    """results[name][impl] = list of reports."""
    results = {}
    wl = workloads(duration)
    order = ["etcd", "oxcd"]
    for r in range(rounds):
        for name, setup, args in wl:
            for impl in (order if r % 2 == 0 else order[::-1]):
                c = ClusterRun(impl, members, port)
                try:
                    c.start()
                    if setup:
                        bench(c, setup)
                    rep = bench(c, args)
                    rep["rss_mib"] = c.peak_rss_mib()
                finally:
                    c.destroy()
                results.setdefault(name, {}).setdefault(impl, []).append(rep)
                log(f"[{members} member(s), round {r + 1}] {name} {impl}: "
                    f"{rep['throughput']:.0f}/s p99 {rep['latency_ms']['p99']:.2f} ms errors {rep['errors']}")
    return results


def run_rated_put(members, rounds, duration, port, etcd_max):
    """p99 put latency of both at the same offered load: half of etcd's maximum."""
    rate = max(1.0, etcd_max / 2)
    args = ["--duration", duration, "--clients", "100", "--conns", "10", "--rate", f"{rate:.0f}",
            "--key-size", "8", "--val-size", "256", "--key-space-size", "100000", "put"]
    out = {}
    for r in range(rounds):
        for impl in (["etcd", "oxcd"] if r % 2 == 0 else ["oxcd", "etcd"]):
            c = ClusterRun(impl, members, port)
            try:
                c.start()
                rep = bench(c, args)
            finally:
                c.destroy()
            out.setdefault(impl, []).append(rep)
            log(f"[{members} member(s), round {r + 1}] put at {rate:.0f}/s {impl}: p99 {rep['latency_ms']['p99']:.2f} ms")
    return rate, out


def run_big(members, keys, rounds, port):
    """Peak RSS and data size with `keys` keys of 256 bytes, size after compaction + defrag,
    and time from start to the first linearizable read after a restart."""
    out = {}
    for r in range(rounds):
        for impl in (["etcd", "oxcd"] if r % 2 == 0 else ["oxcd", "etcd"]):
            c = ClusterRun(impl, members, port)
            try:
                c.start()
                load = bench(c, ["--total", str(keys), "--clients", "100", "--conns", "10", "--sequential-keys",
                                 "--key-space-size", str(keys), "--key-size", "8", "--val-size", "256", "put"])
                rss = c.peak_rss_mib()
                size = c.data_size_mib()
                rev = json.loads(c.etcdctl("get", "x", "-w", "json").stdout)["header"]["revision"]
                c.etcdctl("compact", str(rev), "--physical")
                d = c.etcdctl("defrag")
                defrag = d.returncode == 0
                size_after = c.data_size_mib()
                c.stop()
                restart = c.start()
                rss_restart = c.peak_rss_mib()
            finally:
                c.destroy()
            out.setdefault(impl, []).append({
                "load_throughput": load["throughput"], "rss_mib": rss, "size_mib": size,
                "size_after_mib": size_after if defrag else None, "restart_s": restart,
                "rss_after_restart_mib": rss_restart,
            })
            log(f"[{members} member(s), {keys} keys, round {r + 1}] {impl}: rss {rss:.0f} MiB, size {size:.0f} MiB, "
                f"after compact+defrag {size_after if defrag else 'n/a'}, restart {restart:.2f} s")
    return out


def fmt(x, digits=0):
    if x is None or x != x:
        return "n/a"
    return f"{x:,.{digits}f}"


def ratio(a, b, digits=2):
    if a is None or b is None or not b or a != a or b != b:
        return "n/a"
    return f"{a / b:.{digits}f}"


def tables(members, results, rated, big, keys):
    lines = [f"### {members} member{'s' if members > 1 else ''}", "",
             "| workload | etcd ops/s | oxcd ops/s | ratio | etcd p50 ms | oxcd p50 ms | etcd p99 ms | oxcd p99 ms | p99 ratio | errors (etcd / oxcd) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, by in results.items():
        e, o = by.get("etcd", []), by.get("oxcd", [])
        et, ot = median([x["throughput"] for x in e]), median([x["throughput"] for x in o])
        e50, o50 = median([x["latency_ms"]["p50"] for x in e]), median([x["latency_ms"]["p50"] for x in o])
        e99, o99 = median([x["latency_ms"]["p99"] for x in e]), median([x["latency_ms"]["p99"] for x in o])
        errs = lambda rs: sum(sum(r["errors"].values()) for r in rs)
        lines.append(f"| {name} | {fmt(et)} | {fmt(ot)} | {ratio(ot, et)} | {fmt(e50, 2)} | {fmt(o50, 2)} | "
                     f"{fmt(e99, 2)} | {fmt(o99, 2)} | {ratio(o99, e99)} | {errs(e)} / {errs(o)} |")
    if rated:
        rate, by = rated
        e99 = median([x["latency_ms"]["p99"] for x in by["etcd"]])
        o99 = median([x["latency_ms"]["p99"] for x in by["oxcd"]])
        lines.append(f"| put at {rate:,.0f}/s offered (half of etcd's max), 100 clients | | | | "
                     f"{fmt(median([x['latency_ms']['p50'] for x in by['etcd']]), 2)} | "
                     f"{fmt(median([x['latency_ms']['p50'] for x in by['oxcd']]), 2)} | {fmt(e99, 2)} | {fmt(o99, 2)} | {ratio(o99, e99)} | |")
    if big:
        lines += ["", f"With {keys:,} keys of 256 bytes (loaded by 100 clients; one round):", "",
                  "| measure | etcd | oxcd | ratio |", "| --- | ---: | ---: | ---: |"]
        for key, label, d in (("rss_mib", "peak RSS while loading, MiB", 0),
                              ("size_mib", "data dir size, MiB", 0),
                              ("size_after_mib", "data dir after compact + defrag, MiB", 0),
                              ("restart_s", "restart to first linearizable read, s", 2),
                              ("rss_after_restart_mib", "RSS after restart, MiB", 0),
                              ("load_throughput", "load rate, puts/s", 0)):
            def m(impl):
                xs = [x[key] for x in big[impl] if x[key] is not None]
                return median(xs) if xs else None
            lines.append(f"| {label} | {fmt(m('etcd'), d)} | {fmt(m('oxcd'), d)} | {ratio(m('oxcd'), m('etcd'))} |")
    lines.append("")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--members", default="1,3", help="cluster sizes, e.g. 1,3")
    ap.add_argument("--duration", default="5s", help="length of each timed run")
    ap.add_argument("--keys", type=int, default=1_000_000, help="keys for the memory/size/restart measures")
    ap.add_argument("--quick", action="store_true", help="1 round, 2s runs, 100k keys")
    ap.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    ap.add_argument("--port", type=int, default=41000)
    ap.add_argument("--server", default=OXCD,
                    help="the oxcd binary to measure (another build, to compare two versions)")
    a = ap.parse_args()
    global OXCD_SERVER
    OXCD_SERVER = os.path.abspath(a.server)
    if a.quick:
        a.rounds, a.duration, a.keys = 1, "2s", 100_000
    ensure_tools()
    os.makedirs(DATA, exist_ok=True)
    fsync = fsync_rate(DATA)
    started = datetime.datetime.now(datetime.timezone.utc)
    etcd_version = subprocess.run([ETCD, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    out = [MARK_START, "",
           f"Run {started:%Y-%m-%d %H:%M} UTC on {machine(fsync)}; {etcd_version} (Debian) vs oxcd "
           f"{subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()}"
           f"{'' if OXCD_SERVER == OXCD else f' (server binary {OXCD_SERVER})'}; "
           f"medians of {a.rounds} round(s), runs alternating etcd/oxcd, each on a fresh cluster and data dir "
           f"in `target/bench`; load generator `oxcd benchmark` for both.", "",
           "Command: `scripts/bench-compare.py " + " ".join(sys.argv[1:]) + "`", ""]
    for members in [int(x) for x in a.members.split(",") if x]:
        results = run_workloads(members, a.rounds, a.duration, a.port)
        etcd_max = median([x["throughput"] for x in results["put, 100 clients / 10 conns"]["etcd"]])
        rated = run_rated_put(members, a.rounds, a.duration, a.port, etcd_max)
        # Loading a million keys takes minutes per server: one round, 1 member only.
        big = run_big(members, a.keys, 1, a.port) if members == 1 else None
        out += tables(members, results, rated, big, a.keys)
        print("\n".join(tables(members, results, rated, big, a.keys)), flush=True)
    out.append(MARK_END)
    text = open(a.out).read() if os.path.exists(a.out) else f"# Benchmarks\n\n{MARK_START}\n{MARK_END}\n"
    if MARK_START in text and MARK_END in text:
        pre, rest = text.split(MARK_START, 1)
        post = rest.split(MARK_END, 1)[1]
        text = pre + "\n".join(out) + post
    else:
        text += "\n" + "\n".join(out) + "\n"
    with open(a.out, "w") as f:
        f.write(text)
    log(f"wrote {a.out}")


if __name__ == "__main__":
    main()
