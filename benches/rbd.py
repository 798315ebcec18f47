#!/usr/bin/env python3
"""blockd's rbd driver through an NBD export (qemu-img bench) against
`rbd bench` on the same cluster and image (the ceiling: librbd without NBD
or blockd in between).

Usage:
    cargo build --release -p blockd --features rbd
    benches/rbd.py [--conf CEPH_CONF] [--blockd PATH] [--runs N] [--cases A,B] [--json]

Without --conf (or BLOCKD_CEPH_CONF) a throwaway cluster is started with
tests/ceph/cluster.sh and stopped at the end.

Cases: 4 KiB random reads and writes at depth 1 and 16, 1 MiB sequential
reads and writes at depth 16. qemu-img bench has no random mode: its
"random" offsets are a stride of 4099 * 4 KiB through a 1 GiB image,
wrapping around (every request in another 4 MiB object, as random ones
are); `rbd bench --io-pattern rand` is truly random. The image is filled
first, so that reads read data. Each case alternates blockd and rbd bench
--runs times; the medians are reported, ratio = blockd / rbd (>= 0.8 is
the goal at depth 16 and for 1 MiB).

CPU: each run also records the CPU seconds (user + system) of the client
(qemu-img bench, or rbd bench, which is librbd's own client), of blockd
and of the OSD (when the cluster is the throwaway one, whose pid file is
known). When the machine's CPUs are the limit, throughput follows the
total CPU per request. "bound" is the ratio blockd would reach if it cost
exactly what librbd costs inside rbd bench, with nothing for NBD:
(rbd + OSD) / (rbd + OSD + qemu-img), from the same runs.
"""
import argparse, json, os, re, resource, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 1 << 30

CASES = [
    # name, io size, depth, write, random, count
    ("4k-randread-d1", 4096, 1, False, True, 4000),
    ("4k-randwrite-d1", 4096, 1, True, True, 3000),
    ("4k-randread-d16", 4096, 16, False, True, 40000),
    ("4k-randwrite-d16", 4096, 16, True, True, 30000),
    ("1m-seqread-d16", 1 << 20, 16, False, False, 1024),
    ("1m-seqwrite-d16", 1 << 20, 16, True, False, 1024),
]
STRIDE = 4099 * 4096


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def sh(args, **kw):
    env = dict(os.environ)
    env.pop("CEPH_CONF", None)
    r = subprocess.run(args, capture_output=True, text=True, env=env, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed: {' '.join(args)}\n{r.stdout}{r.stderr}")
    return r.stdout


class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                self.s.connect(path)
                break
            except OSError:
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.f.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, command, **args):
        self.f.write(json.dumps({"execute": command, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            r = json.loads(self.f.readline())
            if "event" in r:
                continue
            if "error" in r:
                raise SystemExit(f"{command}: {r['error']['desc']}")
            return r["return"]


def cpu_of(pid):
    """User + system CPU seconds of a process (0 when unknown)."""
    if not pid:
        return 0.0
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def measured(fn, pids):
    """Runs fn(); returns (its result, CPU seconds of its child processes,
    CPU seconds of each of pids)."""
    before = [cpu_of(p) for p in pids]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    v = fn()
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return v, child, [cpu_of(p) - b for p, b in zip(pids, before)]


def osd_pid(conf):
    try:
        return int(open(os.path.join(os.path.dirname(conf), "run", "osd.0.pid")).read())
    except (OSError, ValueError):
        return None


def qemu_img_bench(url, size, depth, write, rnd, count):
    args = ["qemu-img", "bench", "-f", "raw", "-c", str(count), "-d", str(depth),
            "-s", str(size), "-S", str(STRIDE if rnd else size)]
    if write:
        args += ["-w", "--pattern", "0x5a"]
    out = sh(args + [url])
    secs = float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1))
    return count / secs


def rbd_bench(conf, spec, size, depth, write, rnd, count):
    out = sh(["rbd", "-c", conf, "bench", "--io-type", "write" if write else "read",
              "--io-size", str(size), "--io-threads", str(depth),
              "--io-total", str(size * count), "--io-pattern", "rand" if rnd else "seq", spec])
    return float(re.findall(r"ops/sec:\s*([0-9.]+)", out)[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--conf", default=os.environ.get("BLOCKD_CEPH_CONF"))
    ap.add_argument("--blockd", default=os.path.join(ROOT, "target/release/blockd"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    a = ap.parse_args()
    cases = [c for c in CASES if not a.cases or c[0] in a.cases.split(",")]
    started = None
    if not a.conf:
        log("starting a throwaway cluster")
        t = time.time()
        a.conf = sh([os.path.join(ROOT, "tests/ceph/cluster.sh"), "start"]).strip()
        started = a.conf
        log(f"cluster up in {time.time() - t:.1f} s: {a.conf}")
    name = f"bench-{os.getpid()}"
    spec = f"rbd/{name}"
    tmp = tempfile.mkdtemp(prefix="blockd-rbd-bench-")
    srv = None
    try:
        sh(["rbd", "-c", a.conf, "create", "--size", "1G", spec])
        log("filling the image")
        sh(["rbd", "-c", a.conf, "bench", "--io-type", "write", "--io-size", "4M",
            "--io-threads", "16", "--io-total", "1G", "--io-pattern", "seq", spec])
        qsock, nsock = os.path.join(tmp, "qmp"), os.path.join(tmp, "nbd")
        srv = subprocess.Popen([a.blockd, "--qmp", qsock], stderr=open(os.path.join(tmp, "err.log"), "w"))
        q = Qmp(qsock)
        q.cmd("blockdev-add", driver="rbd", **{"node-name": "r0"}, pool="rbd", image=name, conf=a.conf)
        q.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": nsock}})
        q.cmd("block-export-add", type="nbd", id="e0", **{"node-name": "r0"}, name="d", writable=True)
        url = f"nbd+unix:///d?socket={nsock}"
        osd = osd_pid(a.conf)
        results = {}
        for (case, size, depth, write, rnd, count) in cases:
            # per run: ops/s, client CPU, blockd CPU, OSD CPU
            b, r = [], []
            for i in range(a.runs):
                order = [("b", b), ("r", r)] if i % 2 == 0 else [("r", r), ("b", b)]
                for who, acc in order:
                    if who == "b":
                        v, cl, (sv, od) = measured(
                            lambda: qemu_img_bench(url, size, depth, write, rnd, count), [srv.pid, osd])
                    else:
                        v, cl, (sv, od) = measured(
                            lambda: rbd_bench(a.conf, spec, size, depth, write, rnd, count), [None, osd])
                    acc.append((v, cl, sv, od))
            med = lambda runs, k: statistics.median(x[k] for x in runs)
            mb, mr = med(b, 0), med(r, 0)
            per = count / 1000  # CPU seconds per 1000 requests
            cpu = {"client": med(b, 1) / per, "blockd": med(b, 2) / per, "osd": med(b, 3) / per,
                   "rbd_client": med(r, 1) / per, "rbd_osd": med(r, 3) / per}
            bound = (cpu["rbd_client"] + cpu["rbd_osd"]) / (
                cpu["rbd_client"] + cpu["rbd_osd"] + cpu["client"]) if osd else None
            results[case] = {"blockd_ops": round(mb, 1), "rbd_ops": round(mr, 1),
                             "blockd_mib_s": round(mb * size / (1 << 20), 1),
                             "rbd_mib_s": round(mr * size / (1 << 20), 1),
                             "ratio": round(mb / mr, 2),
                             "cpu_ms_per_req": {k: round(v, 4) for k, v in cpu.items()},
                             "bound": round(bound, 2) if bound else None}
            log(case, results[case])
        if a.json:
            print(json.dumps(results, indent=1))
        else:
            print("| case | blockd ops/s | rbd bench ops/s | blockd MiB/s | rbd bench MiB/s | ratio |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for c, v in results.items():
                print(f"| {c} | {v['blockd_ops']:.0f} | {v['rbd_ops']:.0f} | {v['blockd_mib_s']:.1f} "
                      f"| {v['rbd_mib_s']:.1f} | {v['ratio']:.2f}x |")
            print()
            print("CPU ms per request (medians): qemu-img + blockd + OSD against rbd bench + OSD")
            print()
            print("| case | qemu-img | blockd | OSD | rbd bench | OSD | bound |")
            print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
            for c, v in results.items():
                u = v["cpu_ms_per_req"]
                bound = f"{v['bound']:.2f}x" if v["bound"] else "-"
                print(f"| {c} | {u['client']:.3f} | {u['blockd']:.3f} | {u['osd']:.3f} "
                      f"| {u['rbd_client']:.3f} | {u['rbd_osd']:.3f} | {bound} |")
    finally:
        if srv:
            srv.send_signal(signal.SIGTERM)
            try:
                srv.wait(10)
            except subprocess.TimeoutExpired:
                srv.kill()
        subprocess.run(["rbd", "-c", a.conf, "rm", "--no-progress", spec], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if started:
            subprocess.run([os.path.join(ROOT, "tests/ceph/cluster.sh"), "stop", started])


if __name__ == "__main__":
    main()
