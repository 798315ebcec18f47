#!/usr/bin/env python3
"""Block jobs: blockd vs qemu-storage-daemon, alternating rounds.

  mirror  blockdev-mirror sync=full of a 1 GiB qcow2 with every other MiB
          allocated (512 MiB of data) to an empty 1 GiB qcow2 target:
          seconds from the command to BLOCK_JOB_READY, and to
          BLOCK_JOB_COMPLETED after block-job-complete (the pivot).
  speed   the same mirror with speed=20 MiB/s: after 2 s of warm-up, the
          job's offset over the next 10 s; ratio = achieved / speed.

Images are made once per run (qemu-img/qemu-io) and copied afresh for
every experiment; page cache is synced before each. Each metric is the
median over the rounds; ratio QSD/blockd for times (> 1: blockd faster).
"""

import argparse
import json
import os
import shutil
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
MIB = 1 << 20


def make_images(d):
    src = os.path.join(d, "src0.qcow2")
    B.qemu_img("create", "-q", "-f", "qcow2", src, "1G")
    cmds = []
    for m in range(0, 1024, 2):
        cmds += ["-c", "write -q -P %d %dM 1M" % (m % 251 + 1, m)]
    B.qemu_io("-f", "qcow2", *cmds, src)
    dst = os.path.join(d, "dst0.qcow2")
    B.qemu_img("create", "-q", "-f", "qcow2", dst, "1G")
    return src, dst


def fresh(d, src0, dst0):
    src, dst = os.path.join(d, "src.qcow2"), os.path.join(d, "dst.qcow2")
    shutil.copyfile(src0, src)
    shutil.copyfile(dst0, dst)
    subprocess.run(["sync"], check=True)
    return src, dst


def wait_event(q, name, timeout=120):
    return q.wait_event(name, timeout=timeout)


def mirror_round(server, d, src0, dst0, speed=None, seconds=10):
    src, dst = fresh(d, src0, dst0)
    out = {}
    with B.Server(server, None, False, "jobs") as srv:
        q = srv.connect()
        B.add_file_node(q, "src-f", src)
        B.add_format_node(q, "src", "qcow2", "src-f")
        B.add_file_node(q, "dst-f", dst)
        B.add_format_node(q, "dst", "qcow2", "dst-f")
        args = {"job-id": "m", "device": "src", "target": "dst", "sync": "full"}
        if speed:
            args["speed"] = speed
        t0 = time.perf_counter()
        q.cmd("blockdev-mirror", args)
        if speed:
            time.sleep(2)
            o0, s0 = q.cmd("query-block-jobs")[0]["offset"], time.perf_counter()
            time.sleep(seconds)
            o1, s1 = q.cmd("query-block-jobs")[0]["offset"], time.perf_counter()
            out["ratio"] = (o1 - o0) / (s1 - s0) / speed
            q.cmd("block-job-cancel", {"device": "m", "force": True})
            wait_event(q, "BLOCK_JOB_CANCELLED")
        else:
            wait_event(q, "BLOCK_JOB_READY")
            out["ready_s"] = time.perf_counter() - t0
            q.cmd("block-job-complete", {"device": "m"})
            wait_event(q, "BLOCK_JOB_COMPLETED")
            out["completed_s"] = time.perf_counter() - t0
        q.close()
    if not speed:
        r = subprocess.run(["qemu-img", "compare", "-q", src, dst])
        if r.returncode != 0:
            raise RuntimeError("mirror target differs from the source")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blockd", default=BLOCKD)
    ap.add_argument("--qsd", default=QSD)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--no-speed", action="store_true")
    a = ap.parse_args()
    d = tempfile.mkdtemp(prefix="bench-jobs-", dir="/var/tmp")
    try:
        src0, dst0 = make_images(d)
        res = {"blockd": [], "qsd": []}
        for k in range(a.rounds):
            order = [("blockd", a.blockd), ("qsd", a.qsd)]
            if k % 2:
                order.reverse()
            for name, server in order:
                r = mirror_round(server, d, src0, dst0)
                if not a.no_speed:
                    r.update(mirror_round(server, d, src0, dst0, 20 * MIB, a.seconds))
                B.log(name, json.dumps({x: round(v, 4) for x, v in r.items()}))
                res[name].append(r)
        med = {n: {x: round(statistics.median(r[x] for r in rs), 4) for x in rs[0]}
               for n, rs in res.items()}
        ratios = {x: round(med["qsd"][x] / med["blockd"][x], 2)
                  for x in ("ready_s", "completed_s")}
        print(json.dumps({"rounds": a.rounds, "median": med, "qsd_over_blockd": ratios,
                          "machine": B.machine_facts()}, indent=1))
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
