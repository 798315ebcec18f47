#!/usr/bin/env python3
"""NBD over TLS vs plain: 1 MiB sequential reads through blockd's server.

Two blockd processes export the same raw image read-only over TCP on
localhost, one plain and one with tls-creds (X.509, certificates made
here with openssl, EC P-256, client certificate verified). Two clients,
both GnuTLS-based, read in 1 MiB requests: nbdcopy (libnbd) copies the
whole image to null: with --depth requests in flight, qemu-io (QEMU's
client, with a tls-creds-x509 object: qemu-img bench has no --object)
reads --count MiB one request at a time. Rounds alternate plain/TLS with
the order flipped each round. Reported: MiB/s per round, the medians, and
TLS's cost (1 - TLS/plain).

Python 3 standard library only; needs openssl, nbdcopy, qemu-io and a blockd
build (default target/release/blockd).
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

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_MIB = 1024


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, capture_output=True, text=True, **kw)


def make_certs(d):
    ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes"
    sh(f"openssl req -x509 {ec} -keyout ca-key.pem -out ca-cert.pem -days 2 "
       "-subj '/CN=bench CA' -addext basicConstraints=critical,CA:TRUE "
       "-addext keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    for who, eku, extra in (("server", "serverAuth", "subjectAltName=IP:127.0.0.1\n"),
                            ("client", "clientAuth", "")):
        with open(os.path.join(d, who + ".ext"), "w") as f:
            f.write("basicConstraints=critical,CA:FALSE\n"
                    "keyUsage=critical,digitalSignature,keyEncipherment\n"
                    f"extendedKeyUsage={eku}\n{extra}")
        sh(f"openssl req {ec} -keyout {who}-key.pem -out {who}.csr -subj '/CN={who}'", cwd=d)
        sh(f"openssl x509 -req -in {who}.csr -CA ca-cert.pem -CAkey ca-key.pem "
           f"-CAcreateserial -out {who}-cert.pem -days 2 -extfile {who}.ext", cwd=d)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def start_qemu_nbd(d, img, port, tls):
    args = ["qemu-nbd", "-r", "-t", "-e", "8", "-f", "raw", "-x", "e",
            "--bind", "127.0.0.1", "-p", str(port)]
    if tls:
        args += ["--object", f"tls-creds-x509,id=t0,dir={d},endpoint=server",
                 "--tls-creds", "t0"]
    return wait_listening(subprocess.Popen(args + [img], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL), port)


def wait_listening(p, port):
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return p
        except OSError:
            if time.time() > deadline or p.poll() is not None:
                raise SystemExit("server did not start")
            time.sleep(0.05)


def start_blockd(blockd, d, img, port, tls):
    args = [blockd, "--qmp", os.path.join(d, f"qmp{port}.sock"),
            "--blockdev", f"file,node-name=f,filename={img},read-only=on",
            "--export", "nbd,id=e0,node-name=f,name=e"]
    srv = f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}"
    if tls:
        args += ["--object", f"tls-creds-x509,id=t0,dir={d},endpoint=server"]
        srv += ",tls-creds=t0"
    args += ["--nbd-server", srv]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return wait_listening(p, port)


def bench(d, port, tls, count, depth, client):
    """MiB/s of `count` sequential 1 MiB reads by `client`."""
    if client == "nbdcopy":
        # libnbd (GnuTLS): `depth` requests in flight, one connection.
        uri = (f"nbds://127.0.0.1:{port}/e?tls-certificates={d}" if tls
               else f"nbd://127.0.0.1:{port}/e")
        cmd = ["nbdcopy", "-C", "1", "--request-size=1048576", "-R", str(depth),
               uri, "null:"]
        size = None
    else:
        # QEMU's client (GnuTLS), one read at a time (qemu-img bench has
        # no --object, so it cannot use TLS credentials).
        opts = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=e"
        cmd = ["qemu-io", "-r"]
        if tls:
            cmd += ["--object", f"tls-creds-x509,id=c0,dir={d},endpoint=client"]
            opts += ",tls-creds=c0"
        cmd += ["--image-opts", opts]
        for i in range(count):
            cmd += ["-c", "read -q %d 1M" % ((i % IMAGE_MIB) << 20)]
        size = count
    t0 = time.monotonic()
    subprocess.run(cmd, check=True, capture_output=True)
    dt = time.monotonic() - t0
    return (size if size is not None else IMAGE_MIB) / dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blockd", default=os.path.join(HERE, "..", "target", "release", "blockd"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--count", type=int, default=1024, help="qemu-io: 1 MiB reads per round")
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--server", choices=["blockd", "qemu-nbd"], default="blockd",
                    help="qemu-nbd: the same measurement of QEMU's server, for reference")
    a = ap.parse_args()
    global IMAGE_MIB
    IMAGE_MIB = a.size_mib
    d = tempfile.mkdtemp(prefix="nbd-tls-bench-")
    procs = []
    try:
        make_certs(d)
        img = os.path.join(d, "disk.raw")
        sh(f"head -c {a.size_mib}M /dev/urandom > {img}")
        plain_port, tls_port = free_port(), free_port()
        if a.server == "blockd":
            procs.append(start_blockd(a.blockd, d, img, plain_port, False))
            procs.append(start_blockd(a.blockd, d, img, tls_port, True))
        else:
            procs.append(start_qemu_nbd(d, img, plain_port, False))
            procs.append(start_qemu_nbd(d, img, tls_port, True))
        clients = ["nbdcopy", "qemu-io"]
        for c in clients:  # warm-up (page cache)
            bench(d, plain_port, False, 64, a.depth, c)
            bench(d, tls_port, True, 64, a.depth, c)
        rows = {c: {"plain": [], "tls": []} for c in clients}
        for r in range(a.rounds):
            order = ["plain", "tls"] if r % 2 == 0 else ["tls", "plain"]
            for c in clients:
                for k in order:
                    port = tls_port if k == "tls" else plain_port
                    rows[c][k].append(bench(d, port, k == "tls", a.count, a.depth, c))
                print(f"round {r + 1} {c}: plain {rows[c]['plain'][-1]:.0f} MiB/s, "
                      f"tls {rows[c]['tls'][-1]:.0f} MiB/s", file=sys.stderr)
        med = {c: {k: statistics.median(v) for k, v in rows[c].items()} for c in clients}
        cost = {c: 1 - med[c]["tls"] / med[c]["plain"] for c in clients}
        out = {"rounds": rows, "median_mib_s": med, "tls_cost": cost,
               "depth": a.depth, "image_mib": a.size_mib}
        if a.json:
            print(json.dumps(out))
        else:
            print("| client (1 MiB sequential reads) | plain MiB/s | TLS MiB/s | TLS cost |")
            print("| --- | ---: | ---: | ---: |")
            names = {"nbdcopy": "nbdcopy, %d in flight, whole image" % a.depth,
                     "qemu-io": "qemu-io, 1 at a time, %d reads" % a.count}
            for c in clients:
                print("| %s | %.0f | %.0f | %.1f%% |" % (
                    names[c], med[c]["plain"], med[c]["tls"], 100 * cost[c]))
    finally:
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
