#!/usr/bin/env python3
"""query_block: latency of query-block and query-blockstats with many backends.

Starts `blockd --qmp SOCK`, creates N devices with a backend each over QMP
(libvirt style: blockdev-add of a raw node over a file, or a null-co node,
then device_add virtio-blk-pci drive=NODE), and times round trips of
`query-block` and `query-blockstats` (send, read the whole reply line).
Reports the median and p99 in milliseconds (send to last byte), the median
time to the first byte of the reply (the server's share) and the reply
sizes; the goal is query-block under 5 ms with 1000 backends.

Python 3 standard library only. Progress goes to stderr; the last stdout line
is one JSON object with the figures.

    cargo build --release -p blockd
    benches/query_block.py                       # 1000 raw-over-file backends
    benches/query_block.py --backends 1000 --media null --count 500
"""

import argparse
import json
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


class Qmp:
    """A minimal QMP client reading CRLF-terminated lines.

    Lines are read with recv() into one growing buffer, so that reading a
    large reply costs the client as little as possible.
    """

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray()
        self.line()  # greeting
        self.cmd("qmp_capabilities")

    def line(self):
        """The next line; also records when its first byte arrived."""
        self.first_byte = None
        start = 0
        while True:
            i = self.buf.find(b"\n", start)
            if i >= 0:
                if self.first_byte is None:
                    self.first_byte = time.perf_counter()
                data = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return data
            start = len(self.buf)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("server closed the connection")
            if self.first_byte is None:
                self.first_byte = time.perf_counter()
            self.buf += chunk

    def send(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def reply_raw(self):
        while True:
            data = self.line()
            if not data.startswith(b'{"event"'):
                return data

    def cmd(self, name, args=None):
        self.send(name, args)
        r = json.loads(self.reply_raw())
        if "error" in r:
            raise RuntimeError(f"{name}: {r['error']['desc']}")
        return r["return"]


def percentile(xs, p):
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def time_query(q, name, args, count, warmup):
    for _ in range(warmup):
        q.send(name, args)
        q.reply_raw()
    lat = []
    ttfb = []
    size = 0
    for _ in range(count):
        t0 = time.perf_counter()
        q.send(name, args)
        data = q.reply_raw()
        lat.append((time.perf_counter() - t0) * 1000.0)
        ttfb.append((q.first_byte - t0) * 1000.0)
        size = len(data)
    return {
        "median_ms": round(statistics.median(lat), 3),
        "p99_ms": round(percentile(lat, 99), 3),
        "first_byte_median_ms": round(statistics.median(ttfb), 3),
        "reply_bytes": size,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blockd", default=DEFAULT_BLOCKD, help="blockd binary")
    ap.add_argument("--backends", type=int, default=1000)
    ap.add_argument("--media", choices=["file", "null"], default="file")
    ap.add_argument("--count", type=int, default=300, help="timed queries each")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--time-limit", type=int, default=300)
    ap.add_argument("--keep-tmp", action="store_true")
    a = ap.parse_args()
    signal.alarm(a.time_limit)

    tmp = tempfile.mkdtemp(prefix="qb-")
    sock = os.path.join(tmp, "qmp.sock")
    srv = subprocess.Popen([a.blockd, "--qmp", sock], stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 20
        while not os.path.exists(sock):
            if srv.poll() is not None or time.time() > deadline:
                raise RuntimeError("blockd did not start")
            time.sleep(0.01)
        q = Qmp(sock)
        t0 = time.perf_counter()
        for i in range(a.backends):
            if a.media == "file":
                path = os.path.join(tmp, f"d{i}.raw")
                with open(path, "wb") as f:
                    f.truncate(1 << 20)
                node = {"driver": "raw", "node-name": f"n{i}",
                        "file": {"driver": "file", "filename": path}}
            else:
                node = {"driver": "null-co", "node-name": f"n{i}", "size": 1 << 20}
            q.cmd("blockdev-add", node)
            q.cmd("device_add", {"driver": "virtio-blk-pci", "id": f"vd{i}",
                                 "drive": f"n{i}"})
        setup = time.perf_counter() - t0
        print(f"{a.backends} backends ({a.media}) set up in {setup:.2f} s",
              file=sys.stderr)
        listed = len(q.cmd("query-block"))
        assert listed == a.backends, f"query-block lists {listed}"
        res = {
            "bench": "query_block",
            "backends": a.backends,
            "media": a.media,
            "query-block": time_query(q, "query-block", None, a.count, a.warmup),
            "query-blockstats": time_query(q, "query-blockstats", None, a.count,
                                           a.warmup),
        }
        for k in ("query-block", "query-blockstats"):
            r = res[k]
            print(f"{k:18} median {r['median_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
                  f"  first byte {r['first_byte_median_ms']:.3f} ms"
                  f"  ({r['reply_bytes']} bytes)", file=sys.stderr)
        print(json.dumps(res))
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(timeout=10)
        except subprocess.TimeoutExpired:
            srv.kill()
        if not a.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - report any failure as JSON
        print(json.dumps({"bench": "query_block", "error": str(e)}))
        sys.exit(1)
