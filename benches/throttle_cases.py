#!/usr/bin/env python3
"""Throttle accuracy: blockd vs qemu-storage-daemon, alternating rounds.

Every case exports `throttle` filter nodes over a null-co node (the
`filter` method of ../shared/bench/throttle.py, which both servers have)
and drives them with `qemu-img bench` (reads, depth 8):

  bps     bps-total 20 MB/s, 64 KiB reads, one 10 s run
  iops    iops-total 500, 4 KiB reads, one 10 s run
  burst   bps-total 10 MB/s, bps-total-max 50 MB/s, max-length 2: 200 MB
          of 64 KiB reads. QEMU's semantics: the bucket holds max x length
          = 100 MB and fills at max - avg = 40 MB/s while the burst runs at
          50 MB/s, so 125 MB go in 2.5 s and the other 75 MB at 10 MB/s:
          10 s in all. ratio = 10 s / measured seconds.
  group   a group of three nodes, bps-total 20 MB/s: three benches of
          66.7 MB each at once; ratio = combined rate / limit, share =
          slowest member's rate / fastest member's rate.
  unthrottled_after  the bps node's limits lifted (qom-set limits to 0),
          then 2 GB of 64 KiB reads: rate vs the same on a node that never
          had limits (ratio > 0.98 is the goal).

Each round starts a fresh server of each kind (order flipped every round);
each metric is the median over the rounds. Ratios are achieved/limit
(1.000 is exact).
"""

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "..", "shared", "bench"))
import benchlib as B  # noqa: E402

QSD = ("qemu-storage-daemon --chardev socket,path={sock},server=on,wait=off,id=m0 "
       "--monitor chardev=m0")
BLOCKD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                      "target", "release", "blockd") + " --qmp {sock}"


def throttled(q, nbd, name, group):
    q.cmd("blockdev-add", {"driver": "throttle", "node-name": name,
                           "throttle-group": group, "file": "data"})
    B.nbd_export(q, "e-" + name, name, name, writable=False)
    return B.nbd_uri(name, nbd)


def one_round(server, seconds):
    out = {}
    with B.Server(server, None, False, "thrc") as srv:
        q = srv.connect()
        nbd = os.path.join(srv.tmp, "nbd.sock")
        q.cmd("blockdev-add", {"driver": "null-co", "node-name": "data", "size": 1 << 40})
        B.nbd_server_start(q, nbd)
        B.nbd_export(q, "e-plain", "data", "plain", writable=False)
        groups = {
            "tb": {"bps-total": 20_000_000},
            "ti": {"iops-total": 500},
            "tu": {"bps-total": 10_000_000, "bps-total-max": 50_000_000,
                   "bps-total-max-length": 2},
            "tg": {"bps-total": 20_000_000},
        }
        for g, limits in groups.items():
            q.cmd("object-add", {"qom-type": "throttle-group", "id": g, "limits": limits})
        ub = throttled(q, nbd, "b", "tb")
        ui = throttled(q, nbd, "i", "ti")
        uu = throttled(q, nbd, "u", "tu")
        ug = [throttled(q, nbd, "g%d" % k, "tg") for k in range(3)]

        n = round(20_000_000 * seconds / 65536)
        r = B.img_bench(ub, count=n, size=65536, depth=8, timeout=seconds * 4)
        out["bps"] = n * 65536 / r["seconds"] / 20e6
        n = 500 * seconds
        r = B.img_bench(ui, count=n, size=4096, depth=8, timeout=seconds * 4)
        out["iops"] = n / r["seconds"] / 500
        n = round(200_000_000 / 65536)
        r = B.img_bench(uu, count=n, size=65536, depth=8, timeout=60)
        out["burst"] = 10.0 * (n * 65536 / 200e6) / r["seconds"]

        # Three members at once, each with a third of 10 s at the limit.
        import concurrent.futures as cf
        n = round(20_000_000 * seconds / 3 / 65536)
        with cf.ThreadPoolExecutor(3) as ex:
            rs = list(ex.map(lambda u: B.img_bench(u, count=n, size=65536, depth=8,
                                                   timeout=seconds * 4), ug))
        rates = [n * 65536 / r["seconds"] for r in rs]
        out["group"] = 3 * n * 65536 / max(r["seconds"] for r in rs) / 20e6
        out["group_share"] = min(rates) / max(rates)

        # Limits lifted: as fast as a node that never had them?
        q.cmd("qom-set", {"path": "/objects/tb", "property": "limits",
                          "value": {"bps-total": 0}})
        n = 30000
        plain = B.img_bench(B.nbd_uri("plain", nbd), count=n, size=65536, depth=8)
        lifted = B.img_bench(ub, count=n, size=65536, depth=8)
        out["unthrottled_after"] = plain["seconds"] / lifted["seconds"]
        q.close()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blockd", default=BLOCKD)
    ap.add_argument("--qsd", default=QSD)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    a = ap.parse_args()
    res = {"blockd": [], "qsd": []}
    for k in range(a.rounds):
        order = [("blockd", a.blockd), ("qsd", a.qsd)]
        if k % 2:
            order.reverse()
        for name, server in order:
            r = one_round(server, a.seconds)
            B.log(name, json.dumps({k: round(v, 4) for k, v in r.items()}))
            res[name].append(r)
    summary = {}
    for name, rounds in res.items():
        summary[name] = {k: round(statistics.median(r[k] for r in rounds), 4)
                         for k in rounds[0]}
    print(json.dumps({"rounds": a.rounds, "seconds": a.seconds, "median": summary,
                      "machine": B.machine_facts()}, indent=1))


if __name__ == "__main__":
    main()
