#!/usr/bin/env python3
"""The NBD client driver: blockd vs qemu-storage-daemon, alternating rounds.

  reads   one `qemu-nbd` export of a 1 GiB raw image full of data (TCP on
          127.0.0.1, or a Unix socket with --transport unix); each server
          adds a `driver: nbd` node on it and exports that node with its
          own NBD server (Unix socket); `qemu-img bench` against that
          export: 4 KiB reads at depth 1 and 16 (scattered, step 7919
          blocks, as ../shared/bench/nbd_throughput.py), and 1 MiB
          sequential reads at depth 8. Rows in IOPS or MB/s.
  mirror  storage migration: two processes of one server (blockd->blockd,
          qsd->qsd); the destination exports an empty 1 GiB raw image
          writable on TCP, the source mirrors (sync=full) the 1 GiB image
          into a `driver: nbd` node on it: seconds from blockdev-mirror to
          BLOCK_JOB_READY, and to BLOCK_JOB_COMPLETED after
          block-job-cancel (libvirt's switch-over). The target is compared
          with the source (qemu-img compare) every round.

The reads also report the server's CPU time per request (`_cpu_us`,
from /proc: user + system), which a busy machine disturbs less than the
rates. Each metric is the median over the rounds (the server order flips every
round); ratios are blockd/QSD for rates and QSD/blockd for times, so > 1
means blockd is faster. --tls-dir (x509 credentials in QEMU's file names)
puts TLS on the TCP connections between servers (mirror) and between the
qemu-nbd export and the nbd nodes (reads).

    cargo build --release -p blockd
    benches/nbd_client.py [--rounds 3] [--blockd CMD] [--qsd CMD] [--only reads|mirror]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "shared", "bench"))
import benchlib as B  # noqa: E402

QSD = ("qemu-storage-daemon --chardev socket,path={sock},server=on,wait=off,id=m0 "
       "--monitor chardev=m0")
BLOCKD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                      "target", "release", "blockd") + " --qmp {sock}"
GIB = 1 << 30
STEP = 7919 * 4096
# name: (count, size, depth, step)
READS = {
    "read4k_qd1": (20000, 4096, 1, STEP),
    "read4k_qd16": (100000, 4096, 16, STEP),
    "read1m_qd8": (2048, 1 << 20, 8, None),
}
TLS_ID = "tls0"


def cpu_s(pid):
    """User + system CPU seconds of a process so far."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=10):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def make_image(d):
    img = os.path.join(d, "disk.raw")
    B.qemu_img("create", "-q", "-f", "raw", img, "1G")
    cmds = []
    for m in range(0, 1024, 64):
        cmds += ["-c", "write -q -P %d %dM 64M" % (m // 64 + 1, m)]
    B.qemu_io("-f", "raw", *cmds, img)
    subprocess.run(["sync"], check=True)
    return img


def tls_object(q, tls_dir, endpoint):
    if tls_dir:
        q.cmd("object-add", {"qom-type": "tls-creds-x509", "id": TLS_ID,
                             "endpoint": endpoint, "dir": tls_dir})


def nbd_node(node, server, export, tls_dir):
    args = {"driver": "nbd", "node-name": node, "server": server, "export": export}
    if tls_dir:
        args["tls-creds"] = TLS_ID
    return args


class QemuNbd:
    """qemu-nbd serving img as export 'exp' (TCP or Unix socket)."""

    def __init__(self, img, d, transport, tls_dir):
        argv = ["qemu-nbd", "-t", "-e", "16", "-f", "raw", "-x", "exp", "--cache=writeback"]
        if tls_dir:
            argv += ["--object", "tls-creds-x509,id=%s,endpoint=server,dir=%s"
                     % (TLS_ID, tls_dir), "--tls-creds", TLS_ID]
        if transport == "tcp":
            self.port = free_port()
            argv += ["-b", "127.0.0.1", "-p", str(self.port)]
            self.server = {"type": "inet", "host": "127.0.0.1", "port": str(self.port)}
        else:
            path = os.path.join(d, "qemu-nbd.sock")
            argv += ["-k", path]
            self.server = {"type": "unix", "path": path}
        self.proc = subprocess.Popen(argv + [img], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        if transport == "tcp":
            wait_port(self.port)
        else:
            deadline = time.monotonic() + 10
            while not os.path.exists(path):
                if time.monotonic() > deadline:
                    raise RuntimeError("qemu-nbd did not start")
                time.sleep(0.02)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


def reads_round(server, qnbd, tls_dir, scale):
    out = {}
    with B.Server(server, None, False, "nbdc") as srv:
        q = srv.connect()
        tls_object(q, tls_dir, "client")
        q.cmd("blockdev-add", nbd_node("n", qnbd.server, "exp", tls_dir))
        sock = os.path.join(srv.tmp, "nbd.sock")
        B.nbd_server_start(q, sock)
        B.nbd_export(q, "e", "n", "again", writable=False)
        uri = B.nbd_uri("again", sock)
        for name, (count, size, depth, step) in READS.items():
            count = max(1, int(count * scale))
            c0 = cpu_s(srv.pid)
            r = B.img_bench(uri, "raw", count, size, depth, False, step, timeout=600)
            out[name] = r["iops"] if size == 4096 else r["MBps"]
            # the server's CPU time per request, in microseconds
            out[name + "_cpu_us"] = (cpu_s(srv.pid) - c0) / count * 1e6
        q.close()
    return out


def mirror_round(server, d, src_img, tls_dir):
    dst_img = os.path.join(d, "dst.raw")
    B.qemu_img("create", "-q", "-f", "raw", dst_img, "1G")
    out = {}
    with B.Server(server, None, False, "mig-dst") as dst, \
            B.Server(server, None, False, "mig-src") as src:
        qd, qs = dst.connect(), src.connect()
        tls_object(qd, tls_dir, "server")
        tls_object(qs, tls_dir, "client")
        B.add_file_node(qd, "disk-f", dst_img)
        B.add_format_node(qd, "disk", "raw", "disk-f")
        port = free_port()
        start = {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}}
        if tls_dir:
            start["tls-creds"] = TLS_ID
        qd.cmd("nbd-server-start", start)
        B.nbd_export(qd, "mig", "disk", "disk", writable=True)
        B.add_file_node(qs, "disk-f", src_img)
        B.add_format_node(qs, "disk", "raw", "disk-f")
        qs.cmd("blockdev-add", nbd_node(
            "tgt", {"type": "inet", "host": "127.0.0.1", "port": str(port)}, "disk", tls_dir))
        t0 = time.perf_counter()
        qs.cmd("blockdev-mirror", {"job-id": "m", "device": "disk", "target": "tgt",
                                   "sync": "full"})
        qs.wait_event("BLOCK_JOB_READY", timeout=300)
        out["mirror_ready_s"] = time.perf_counter() - t0
        qs.cmd("block-job-cancel", {"device": "m"})
        ev = qs.wait_event("BLOCK_JOB_COMPLETED", timeout=300)
        out["mirror_completed_s"] = time.perf_counter() - t0
        if ev.get("data", {}).get("error"):
            raise RuntimeError("mirror failed: %s" % ev)
        qs.cmd("blockdev-del", {"node-name": "tgt"})
        B.nbd_unexport(qd, "mig")
        qd.cmd("nbd-server-stop")
        qd.close()
        qs.close()
    r = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                        src_img, dst_img])
    if r.returncode != 0:
        raise RuntimeError("mirror target differs from the source")
    os.unlink(dst_img)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blockd", default=BLOCKD)
    ap.add_argument("--qsd", default=QSD)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the request counts")
    ap.add_argument("--transport", choices=("tcp", "unix"), default="tcp",
                    help="how the nbd nodes reach qemu-nbd (default tcp)")
    ap.add_argument("--only", choices=("reads", "mirror"))
    ap.add_argument("--tls-dir", help="x509 credentials directory: TLS between servers")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="bench-nbdc-", dir="/var/tmp")
    qnbd = None
    try:
        img = make_image(d)
        if a.only != "mirror":
            qnbd = QemuNbd(img, d, a.transport, a.tls_dir)
        res = {"blockd": [], "qsd": []}
        for k in range(a.rounds):
            order = [("blockd", a.blockd), ("qsd", a.qsd)]
            if k % 2:
                order.reverse()
            for name, server in order:
                r = {}
                if a.only != "mirror":
                    r.update(reads_round(server, qnbd, a.tls_dir, a.scale))
                if a.only != "reads":
                    r.update(mirror_round(server, d, img, a.tls_dir))
                B.log(name, json.dumps({x: round(v, 4) for x, v in r.items()}))
                res[name].append(r)
        med = {n: {x: round(statistics.median(r[x] for r in rs), 4) for x in rs[0]}
               for n, rs in res.items()}
        rng = {n: {x: [round(min(r[x] for r in rs), 4), round(max(r[x] for r in rs), 4)]
                   for x in rs[0]} for n, rs in res.items()}
        ratios = {}
        for x in med["blockd"]:
            b, q = med["blockd"][x], med["qsd"][x]
            ratios[x] = round(q / b if x.endswith(("_s", "_us")) else b / q, 2)
        print(json.dumps({"rounds": a.rounds, "transport": a.transport,
                          "tls": bool(a.tls_dir), "median": med, "range": rng,
                          "blockd_better": ratios, "machine": B.machine_facts()},
                         indent=1))
    finally:
        if qnbd:
            qnbd.stop()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
