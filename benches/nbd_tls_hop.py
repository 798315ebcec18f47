#!/usr/bin/env python3
"""TLS between two servers of the same kind: 1 MiB reads through a hop.

An origin process exports a 1 GiB raw image of random data (in the page
cache) read-only on TCP (127.0.0.1), plain or with `tls-creds` (x509,
client certificate verified); a hop process of the same server adds a
`driver: nbd` node on it (with `tls-creds` of a client endpoint when the
origin has TLS) and exports that node on a Unix socket, where
`qemu-img bench` reads the image in 1 MiB requests at depth 8. So TLS is
spoken by the server on both ends: blockd's rustls for blockd, GnuTLS
for qemu-storage-daemon. Rounds alternate plain and TLS (the order flips
every round) and blockd and qemu-storage-daemon; medians.

    cargo build --release -p blockd
    benches/nbd_tls_hop.py [--rounds 5]

Needs openssl (the certificates are made here, as by nbd_tls.py).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "shared", "bench"))
sys.path.insert(0, HERE)
import benchlib as B  # noqa: E402
from nbd_client import free_port, nbd_node, tls_object, BLOCKD, QSD  # noqa: E402
from nbd_tls import make_certs  # noqa: E402

COUNT = 2048


def one(server, d, img, tls_dir):
    with B.Server(server, None, False, "tls-origin") as o, \
            B.Server(server, None, False, "tls-hop") as h:
        qo, qh = o.connect(), h.connect()
        tls_object(qo, tls_dir, "server")
        tls_object(qh, tls_dir, "client")
        B.add_file_node(qo, "f", img)
        B.add_format_node(qo, "n", "raw", "f")
        port = free_port()
        start = {"addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(port)}}}
        if tls_dir:
            start["tls-creds"] = "tls0"
        qo.cmd("nbd-server-start", start)
        B.nbd_export(qo, "e", "n", "e", writable=False)
        node = nbd_node("r", {"type": "inet", "host": "127.0.0.1", "port": str(port)},
                        "e", tls_dir)
        node["read-only"] = True
        qh.cmd("blockdev-add", node)
        sock = os.path.join(h.tmp, "nbd.sock")
        B.nbd_server_start(qh, sock)
        B.nbd_export(qh, "x", "r", "x", writable=False)
        r = B.img_bench(B.nbd_uri("x", sock), "raw", COUNT, 1 << 20, 8, False, None,
                        timeout=600)
        qh.close()
        qo.close()
        return r["MBps"]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blockd", default=BLOCKD)
    ap.add_argument("--qsd", default=QSD)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="bench-tls-hop-", dir="/var/tmp")
    try:
        certs = os.path.join(d, "certs")
        os.mkdir(certs)
        make_certs(certs)
        img = os.path.join(d, "img.raw")
        subprocess.run(["dd", "if=/dev/urandom", "of=" + img, "bs=1M", "count=1024",
                        "status=none"], check=True)
        res = {k: {"plain": [], "tls": []} for k in ("blockd", "qsd")}
        for r in range(a.rounds):
            order = [("blockd", a.blockd), ("qsd", a.qsd)]
            modes = ["plain", "tls"]
            if r % 2:
                order.reverse()
                modes.reverse()
            for name, srv in order:
                for m in modes:
                    v = one(srv, d, img, certs if m == "tls" else None)
                    res[name][m].append(v)
                    print(f"round {r + 1} {name} {m}: {v} MB/s", flush=True)
        out = {}
        for name, v in res.items():
            p, t = statistics.median(v["plain"]), statistics.median(v["tls"])
            out[name] = {"plain_MBps": p, "tls_MBps": t,
                         "tls_cost_pct": round(100 * (1 - t / p), 1)}
        print(json.dumps({"rounds": a.rounds, "median": out}, indent=1))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
