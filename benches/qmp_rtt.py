#!/usr/bin/env python3
"""qmp_rtt: QMP round trips of `query-version`, blockd vs qemu-storage-daemon.

Both servers are measured in the same run, on the same machine, with the same
client code:

  phase A  one connection, N sequential round trips (send a command, wait for
           its reply, repeat): commands/s, median and p99 latency (us)
  phase B  8 concurrent connections (separate processes), each doing N/8
           sequential round trips: aggregate commands/s

Every run starts a fresh server. Runs alternate between the servers (and the
order flips each run: b q, q b, b q, ...) so drift on a shared machine hits
both alike. The report gives, per metric, the median of the runs for each
server and the ratio blockd/QSD (for latencies QSD/blockd), so >1 always
means blockd is better.

blockd serves many clients on one socket (`blockd --qmp SOCK`); a QEMU socket
chardev serves one client at a time, so QSD gets 8 monitors and client k of
phase B uses monitor k. Clients connect 0.1 s after the socket files appear
(qemu-storage-daemon 10.0.2 garbles some earlier connections).

Python 3 standard library only. Progress goes to stderr.
"""

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_BLOCKD = os.path.join(HERE, "..", "target", "release", "blockd")
CLIENTS = 8
SETTLE_S = 0.1
WARMUP = 500
VERSION = b'{"execute":"query-version"}\r\n'
NEGOTIATE = b'{"execute":"qmp_capabilities"}\r\n'


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# client


class QMPClient:
    """Minimal QMP client: messages are read as CRLF-terminated lines."""

    def __init__(self, path, timeout=30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        # buffered reader: readline() is C code, so the client adds little
        # per round trip
        self.rfile = self.sock.makefile("rb", buffering=65536)
        self.events = 0

    def readline(self):
        line = self.rfile.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        if not line.endswith(b"\r\n"):
            # QMP ends every message with CRLF; a bare LF is tolerated but
            # noted once per connection
            if not getattr(self, "_warned_lf", False):
                self._warned_lf = True
                log("note: message not CRLF-terminated: %r" % line[:80])
        return line

    def handshake(self):
        greeting = json.loads(self.readline())
        if "QMP" not in greeting:
            raise RuntimeError("no QMP greeting: %r" % greeting)
        self.sock.sendall(NEGOTIATE)
        reply = json.loads(self.response())
        if reply.get("return") != {}:
            raise RuntimeError("qmp_capabilities failed: %r" % reply)
        return greeting

    def response(self):
        """Next line that is not an event (cheap test, no JSON parse)."""
        while True:
            line = self.readline()
            # events carry "event" and never "return"; responses have
            # "return" or "error"
            if b'"return"' in line:
                return line
            if b'"error"' in line and b'"event"' not in line:
                raise RuntimeError("error reply: %s" % line.decode(errors="replace").strip())
            self.events += 1

    def roundtrip(self, payload):
        self.sock.sendall(payload)
        return self.response()

    def close(self):
        try:
            self.rfile.close()
            self.sock.close()
        except OSError:
            pass


def timed_loop(client, n):
    """n sequential round trips; returns (latencies in ns, total ns)."""
    lat = [0] * n
    pc = time.perf_counter_ns
    rt = client.roundtrip
    payload = VERSION
    t0 = pc()
    for i in range(n):
        a = pc()
        rt(payload)
        lat[i] = pc() - a
    return lat, pc() - t0


def percentile(sorted_values, p):
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


# --------------------------------------------------------------------------
# server


class Server:
    """One server process with its scratch dir; stop() is idempotent."""

    def __init__(self, kind, binary, tmproot):
        self.kind = kind
        self.dir = tempfile.mkdtemp(prefix="qmp_rtt-%s-" % kind, dir=tmproot)
        if kind == "blockd":
            self.socks = [os.path.join(self.dir, "qmp.sock")]
            argv = [binary, "--qmp", self.socks[0]]
        else:
            self.socks = [os.path.join(self.dir, "qmp%d.sock" % k) for k in range(CLIENTS)]
            argv = [binary]
            for k, s in enumerate(self.socks):
                argv += ["--chardev", "socket,path=%s,server=on,wait=off,id=m%d" % (s, k),
                         "--monitor", "chardev=m%d" % k]
        self.argv = argv
        self.errpath = os.path.join(self.dir, "stderr.log")
        self.proc = None
        self.start()

    def start(self):
        with open(self.errpath, "wb") as err:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                         stdout=err, stderr=err, cwd=self.dir,
                                         start_new_session=True)
        deadline = time.monotonic() + 10
        while not all(os.path.exists(s) for s in self.socks):
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited with %s: %s" % (self.kind, self.proc.returncode,
                                                             self.stderr_tail()))
            if time.monotonic() > deadline:
                raise RuntimeError("%s: socket did not appear within 10 s" % self.kind)
            time.sleep(0.005)
        time.sleep(SETTLE_S)

    def sock_for(self, k):
        return self.socks[k % len(self.socks)]

    def stderr_tail(self):
        try:
            with open(self.errpath, "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                log("%s ignored SIGTERM for 5 s: SIGKILL" % self.kind)
                self.proc.kill()
                self.proc.wait()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


LIVE = []  # servers and worker processes to clean up on any exit


def cleanup():
    while LIVE:
        obj = LIVE.pop()
        try:
            if isinstance(obj, Server):
                obj.stop()
            elif obj.is_alive():
                obj.kill()
                obj.join(5)
        except Exception as e:  # noqa: BLE001
            log("cleanup: %s" % e)


# --------------------------------------------------------------------------
# phases


def phase_a(server, n):
    c = QMPClient(server.sock_for(0))
    try:
        c.handshake()
        for _ in range(WARMUP):
            c.roundtrip(VERSION)
        lat, total = timed_loop(c, n)
    finally:
        c.close()
    lat.sort()
    return {"cmds_per_s": n / (total / 1e9),
            "median_us": statistics.median(lat) / 1e3,
            "p99_us": percentile(lat, 99) / 1e3}


def worker(path, n, barrier, outq, idx):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent cleans up on Ctrl-C
    try:
        c = QMPClient(path)
        c.handshake()
        for _ in range(50):
            c.roundtrip(VERSION)
        barrier.wait(timeout=60)
        t0 = time.perf_counter_ns()  # CLOCK_MONOTONIC: comparable across processes
        lat, total = timed_loop(c, n)
        c.close()
        outq.put({"idx": idx, "start": t0, "end": t0 + total,
                  "median_ns": statistics.median(lat)})
    except Exception as e:  # noqa: BLE001
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001
            pass
        outq.put({"idx": idx, "error": "%s: %s" % (type(e).__name__, e)})


def phase_b(server, n):
    per_client = max(1, n // CLIENTS)
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(CLIENTS)
    outq = ctx.Queue()
    procs = []
    for k in range(CLIENTS):
        p = ctx.Process(target=worker, args=(server.sock_for(k), per_client, barrier, outq, k),
                        daemon=True)
        p.start()
        procs.append(p)
        LIVE.append(p)
    results = [outq.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(10)
        if p.is_alive():
            p.kill()
            p.join()
        LIVE.remove(p)
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        errors.sort(key=lambda e: e.startswith("BrokenBarrierError"))  # root cause first
        raise RuntimeError("concurrent phase: %s" % errors[0])
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    return {"cmds_per_s": per_client * CLIENTS / ((end - start) / 1e9),
            "median_us": statistics.median(r["median_ns"] for r in results) / 1e3}


def one_run(kind, binary, n, tmproot):
    server = Server(kind, binary, tmproot)
    LIVE.append(server)
    try:
        a = phase_a(server, n)
        b = phase_b(server, n)
    except Exception:
        log("%s stderr: %s" % (kind, server.stderr_tail().strip() or "(empty)"))
        raise
    finally:
        server.stop()
        LIVE.remove(server)
    return {"seq_cmds_per_s": a["cmds_per_s"], "seq_median_us": a["median_us"],
            "seq_p99_us": a["p99_us"], "conc_cmds_per_s": b["cmds_per_s"],
            "conc_median_us": b["median_us"]}


# metric, label, higher is better
METRICS = [
    ("seq_cmds_per_s", "A: 1 connection, commands/s", True),
    ("seq_median_us", "A: 1 connection, median latency (us)", False),
    ("seq_p99_us", "A: 1 connection, p99 latency (us)", False),
    ("conc_cmds_per_s", "B: 8 connections, total commands/s", True),
    ("conc_median_us", "B: 8 connections, median latency (us)", False),
]


def server_version(binary):
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, timeout=10)
        return out.stdout.decode(errors="replace").splitlines()[0].strip()
    except Exception as e:  # noqa: BLE001
        return "unknown (%s)" % e


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blockd", default=DEFAULT_BLOCKD,
                    help="blockd binary (default: %(default)s)")
    ap.add_argument("--qsd", default="qemu-storage-daemon",
                    help="qemu-storage-daemon binary (default: from PATH)")
    ap.add_argument("--count", type=int, default=20000,
                    help="round trips per phase (phase B: count/8 per client; default %(default)s)")
    ap.add_argument("--runs", type=int, default=5,
                    help="runs per server, alternating (default %(default)s)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object on stdout at the end (the table goes to stderr)")
    ap.add_argument("--time-limit", type=int, default=600,
                    help="abort after this many seconds (default %(default)s)")
    ap.add_argument("--tmpdir", default=None, help="parent of the scratch dirs (default $TMPDIR)")
    a = ap.parse_args()

    def on_alarm(signum, frame):
        raise TimeoutError("time limit of %d s reached" % a.time_limit)

    def on_term(signum, frame):
        raise KeyboardInterrupt("signal %d" % signum)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    signal.alarm(a.time_limit)

    binaries = {"blockd": os.path.abspath(a.blockd) if os.sep in a.blockd else a.blockd,
                "qsd": shutil.which(a.qsd) or a.qsd}
    for kind, path in binaries.items():
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            sys.exit("%s binary not found: %s" % (kind, path))

    results = {"blockd": [], "qsd": []}
    try:
        for r in range(a.runs):
            order = ("blockd", "qsd") if r % 2 == 0 else ("qsd", "blockd")
            for kind in order:
                res = one_run(kind, binaries[kind], a.count, a.tmpdir)
                results[kind].append(res)
                log("run %d/%d %-6s  A %8.0f cmd/s  median %6.1f us  p99 %6.1f us  |  B %8.0f cmd/s"
                    % (r + 1, a.runs, kind, res["seq_cmds_per_s"], res["seq_median_us"],
                       res["seq_p99_us"], res["conc_cmds_per_s"]))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        cleanup()
        if a.json:
            print(json.dumps({"bench": "qmp_rtt", "error": "%s: %s" % (type(e).__name__, e)}))
        log("error: %s: %s" % (type(e).__name__, e))
        sys.exit(1)
    finally:
        signal.alarm(0)
        cleanup()

    summary = {}
    for key, label, higher in METRICS:
        b = statistics.median(x[key] for x in results["blockd"])
        q = statistics.median(x[key] for x in results["qsd"])
        ratio = (b / q) if higher else (q / b)
        summary[key] = {"blockd": round(b, 1), "qsd": round(q, 1), "ratio": round(ratio, 2)}

    out = sys.stderr if a.json else sys.stdout
    print("\nquery-version round trips: count=%d, runs=%d, medians of runs; "
          "ratio > 1 means blockd is better" % (a.count, a.runs), file=out)
    print("| metric | blockd | QSD | ratio |", file=out)
    print("| --- | ---: | ---: | ---: |", file=out)
    for key, label, higher in METRICS:
        s = summary[key]
        fmt = "%.0f" if higher else "%.1f"
        print("| %s | %s | %s | %.2fx%s |" % (label, fmt % s["blockd"], fmt % s["qsd"], s["ratio"],
                                             "" if higher else " (QSD/blockd)"), file=out)
    if a.json:
        print(json.dumps({
            "bench": "qmp_rtt", "count": a.count, "runs": a.runs, "clients": CLIENTS,
            "blockd": binaries["blockd"], "blockd_version": server_version(binaries["blockd"]),
            "qsd": binaries["qsd"], "qsd_version": server_version(binaries["qsd"]),
            "cpus": os.cpu_count(), "summary": summary,
            "runs_detail": {k: [{m: round(v, 1) for m, v in x.items()} for x in xs]
                            for k, xs in results.items()},
        }))


if __name__ == "__main__":
    main()
