#!/usr/bin/env bash
# A throwaway single-host Ceph cluster for blockd's RBD tests.
#
#   tests/ceph/cluster.sh start [DIR]   starts one monitor and one memstore
#                                       OSD under DIR (default: a new temp
#                                       folder), creates pool 'rbd' (size 1)
#                                       and prints the ceph.conf path
#   tests/ceph/cluster.sh stop CONF|DIR stops it and removes the folder
#
# Everything (data, keyrings, logs, sockets, pid files) lives in the
# folder; the daemons listen on 127.0.0.1 only, on ports of their own
# (the monitor on a free port, the OSD in the 50 ports after it), so two
# clusters can run side by side. No systemd, no /etc/ceph. No manager
# daemon: RBD's data path and the rbd tool need only a monitor and an OSD
# (set BLOCKD_CEPH_MGR=1 to start one too). Needs Debian's ceph-mon,
# ceph-osd and ceph-common (and ceph-mgr for BLOCKD_CEPH_MGR=1).
set -euo pipefail

# A CEPH_CONF from the caller would leak into the tools run here.
unset CEPH_CONF CEPH_ARGS

die() { echo "cluster.sh: $*" >&2; exit 1; }

free_port() {
    # A port with 51 free ports after it, probed with SO_REUSEADDR (a
    # previous run's ports in TIME_WAIT count as free, as for the daemons).
    python3 - <<'PY'
import random, socket
def free(p):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
for _ in range(200):
    p = random.randrange(20000, 30000)
    if all(free(q) for q in range(p, p + 51)):
        print(p); break
else:
    raise SystemExit("no free port range")
PY
}

wait_for() { # seconds, command...
    local t=$1; shift
    local end=$((SECONDS + t))
    until "$@" >/dev/null 2>&1; do
        [ $SECONDS -lt $end ] || return 1
        sleep 0.1
    done
}

start() {
    local dir=${1:-}
    if [ -z "$dir" ]; then dir=$(mktemp -d /tmp/blockd-ceph.XXXXXX); fi
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    local port fsid conf=$dir/ceph.conf
    port=$(free_port)
    fsid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    mkdir -p "$dir/mon" "$dir/osd.0" "$dir/run" "$dir/log" "$dir/crash"
    cat > "$conf" <<CONF
[global]
fsid = $fsid
mon_host = v1:127.0.0.1:$port
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_port_min = $((port + 1))
ms_bind_port_max = $((port + 50))
ms_bind_msgr2 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
auth_allow_insecure_global_id_reclaim = false
keyring = $dir/admin.keyring
run_dir = $dir/run
pid_file = $dir/run/\$name.pid
admin_socket = $dir/run/\$name.\$pid.\$cctid.asok
log_file = $dir/log/\$name.log
mon_cluster_log_file = $dir/log/cluster.log
crash_dir = $dir/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_size_one = true
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
paxos_propose_interval = 0.1
[mon]
mon_data = $dir/mon
[osd]
osd_data = $dir/osd.0
osd_objectstore = memstore
memstore_device_bytes = 8589934592
osd_class_update_on_start = false
keyring = $dir/osd.0/keyring
[mgr]
mgr_data = $dir/mgr
keyring = $dir/mgr/keyring
CONF
    local empty=$dir/empty.conf
    : > "$empty"
    ceph-authtool -c "$empty" --create-keyring "$dir/mon.keyring" --gen-key -n mon. \
        --cap mon 'allow *' >/dev/null
    ceph-authtool -c "$empty" --create-keyring "$dir/admin.keyring" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    ceph-authtool -c "$empty" "$dir/mon.keyring" --import-keyring "$dir/admin.keyring" >/dev/null
    monmaptool -c "$empty" --create --fsid "$fsid" --addv a "[v1:127.0.0.1:$port]" \
        "$dir/monmap" >/dev/null
    ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
    ceph-mon -c "$conf" -i a
    local ceph=(ceph -c "$conf" --connect-timeout 10)
    wait_for 30 "${ceph[@]}" mon stat || die "the monitor did not start (see $dir/log)"

    local uuid id
    uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
    id=$("${ceph[@]}" osd new "$uuid")
    [ "$id" = 0 ] || die "unexpected OSD id $id"
    "${ceph[@]}" auth get-or-create osd.0 mon 'allow profile osd' osd 'allow *' \
        mgr 'allow profile osd' -o "$dir/osd.0/keyring" >/dev/null
    ceph-osd -c "$conf" -i 0 --mkfs --osd-uuid "$uuid" >/dev/null 2>&1 \
        || die "ceph-osd --mkfs failed (see $dir/log)"
    ceph-osd -c "$conf" -i 0 2>/dev/null

    if [ "${BLOCKD_CEPH_MGR:-0}" = 1 ]; then
        mkdir -p "$dir/mgr"
        "${ceph[@]}" auth get-or-create mgr.x mon 'allow profile mgr' osd 'allow *' \
            mds 'allow *' -o "$dir/mgr/keyring" >/dev/null
        ceph-mgr -c "$conf" -i x
    fi

    "${ceph[@]}" osd pool create rbd 8 8 >/dev/null 2>&1
    "${ceph[@]}" osd pool application enable rbd rbd >/dev/null 2>&1
    # The pool's placement groups are active once an object lookup answers
    # (pg stat needs a manager).
    pgs_ready() {
        local out
        out=$(timeout 5 rados -c "$conf" -p rbd stat blockd-probe 2>&1 || true)
        [[ $out == *"No such file"* ]]
    }
    wait_for 60 pgs_ready || die "the pool's placement groups did not become active (see $dir/log)"
    echo "$conf"
}

stop() {
    local arg=${1:-${BLOCKD_CEPH_CONF:-}}
    [ -n "$arg" ] || die "usage: $0 stop CONF|DIR"
    local dir=$arg
    [ -f "$arg" ] && dir=$(dirname "$arg")
    [ -f "$dir/ceph.conf" ] || die "$dir holds no cluster started by this script"
    # The OSD before the monitor: an OSD without its monitor waits for it.
    local name pid
    for name in osd.0 mgr.x mon.a; do
        [ -f "$dir/run/$name.pid" ] || continue
        pid=$(cat "$dir/run/$name.pid")
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
        kill -9 "$pid" 2>/dev/null || true
    done
    rm -rf "$dir"
}

case "${1:-}" in
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) die "usage: $0 start [DIR] | stop CONF|DIR" ;;
esac
