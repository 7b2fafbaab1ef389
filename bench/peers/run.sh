#!/usr/bin/env bash
# Side-by-side peer benchmark (issue #6): RabbitMQ quorum queue + publisher
# confirms (durable reference) and NATS JetStream 2.9 (non-durable upper
# reference) against Accord's own `accord bench`, same senders / size / count.
#
# Usage: bench/peers/run.sh [--senders 1,64] [--size 1024] [--count 20000]
#                           [--out bench/peers/results.json] [--skip-accord]
#                           [--systems rabbitmq,nats] [--no-e2e]
#                           [--connections 1] [--data-dir DIR]
#
# Debian bookworm, as root (for apt). Brokers run on loopback with mutual TLS,
# in a temporary directory that is removed at exit, whatever the outcome.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

SENDERS=1,64
SIZE=1024
COUNT=20000
OUT=$HERE/results.json
SKIP_ACCORD=0
SYSTEMS=rabbitmq,nats
NO_E2E=0
CONNECTIONS=1
DATA_PARENT=${TMPDIR:-/tmp}

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --senders) SENDERS=$2; shift 2 ;;
        --size) SIZE=$2; shift 2 ;;
        --count) COUNT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --skip-accord) SKIP_ACCORD=1; shift ;;
        --systems) SYSTEMS=$2; shift 2 ;;
        --no-e2e) NO_E2E=1; shift ;;
        --connections) CONNECTIONS=$2; shift 2 ;;
        --data-dir) DATA_PARENT=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "run.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

is_uint() { case "$1" in ''|*[!0-9]*) return 1 ;; *) return 0 ;; esac; }
for v in "$SIZE" "$COUNT" "$CONNECTIONS"; do
    is_uint "$v" || { echo "run.sh: not a number: $v" >&2; exit 2; }
done
IFS=, read -r -a SENDER_LIST <<<"$SENDERS"
for n in "${SENDER_LIST[@]}"; do
    if ! is_uint "$n" || [ "$n" -eq 0 ]; then
        echo "run.sh: bad --senders entry: $n" >&2
        exit 2
    fi
done
IFS=, read -r -a SYSTEM_LIST <<<"$SYSTEMS"
for s in "${SYSTEM_LIST[@]}"; do
    case "$s" in rabbitmq|nats) ;; *) echo "run.sh: unknown system: $s" >&2; exit 2 ;; esac
done
case "$OUT" in /*) ;; *) OUT=$PWD/$OUT ;; esac

log() { printf '[peers] %s\n' "$*" >&2; }

# ---------------------------------------------------------------------------
# State for cleanup
# ---------------------------------------------------------------------------
WORK=""
RABBIT_PID=""
EPMD_PID=""
NATS_PID=""
RABBIT_NODE=""
EPMD_PORT=""
CREATED_POLICY_RC=0

rabbitmqctl_local() {
    # rabbitmqctl against our node only: our cookie (HOME), our epmd.
    HOME=$WORK/rabbit LC_ALL=C.UTF-8 ERL_EPMD_PORT=$EPMD_PORT \
        RABBITMQ_CONF_ENV_FILE=$WORK/rabbit/rabbitmq-env.conf \
        /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$RABBIT_NODE" "$@"
}

stop_pid() { # pid name: TERM, wait up to 30 s, then KILL
    local pid=$1 name=$2 _
    kill -0 "$pid" 2>/dev/null || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name did not stop after 30 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

stop_rabbit() {
    if [ -n "$RABBIT_PID" ]; then
        # The foreground wrapper turns SIGTERM into a clean node stop.
        stop_pid "$RABBIT_PID" "rabbitmq-server"
        RABBIT_PID=""
    fi
    if [ -n "$EPMD_PID" ]; then
        stop_pid "$EPMD_PID" "epmd"
        EPMD_PID=""
    fi
}

stop_nats() {
    if [ -n "$NATS_PID" ]; then
        stop_pid "$NATS_PID" "nats-server"
        NATS_PID=""
    fi
}

# Every process this script starts runs in its own session (setsid), in the
# background: a Ctrl-C reaches only this script, whose traps then stop them in
# order. The load generator and the Accord bench are waited for with `wait`, so
# that a signal is handled at once, and are ended by process group.
CHILD_PID=""
run_child() {
    setsid -w "$@" &
    CHILD_PID=$!
    local rc=0
    wait "$CHILD_PID" || rc=$?
    CHILD_PID=""
    return "$rc"
}

stop_child() {
    [ -n "$CHILD_PID" ] || return 0
    local _
    log "stopping the running benchmark client (process group $CHILD_PID)"
    kill -TERM -- "-$CHILD_PID" 2>/dev/null || kill -TERM "$CHILD_PID" 2>/dev/null || true
    for _ in $(seq 1 20); do
        kill -0 "$CHILD_PID" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL -- "-$CHILD_PID" 2>/dev/null || true
    wait "$CHILD_PID" 2>/dev/null || true
    CHILD_PID=""
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_child
    stop_rabbit
    stop_nats
    if [ "$CREATED_POLICY_RC" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------
# Packages
# ---------------------------------------------------------------------------
pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

ensure_packages() {
    local missing=() p
    for p in rabbitmq-server nats-server openssl; do
        pkg_installed "$p" || missing+=("$p")
    done
    command -v python3 >/dev/null || missing+=(python3)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "run.sh: missing packages (${missing[*]}) and not root; install them first" >&2
        exit 1
    fi
    log "installing ${missing[*]}"
    # Keep apt from starting the packaged services: we run our own instances.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        CREATED_POLICY_RC=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
    if [ "$CREATED_POLICY_RC" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
        CREATED_POLICY_RC=0
    fi
    # Do not leave the packaged services enabled at boot on a systemd host.
    if [ -d /run/systemd/system ]; then
        for p in "${missing[@]}"; do
            case "$p" in
                rabbitmq-server|nats-server)
                    systemctl disable --now "$p.service" >/dev/null 2>&1 || true ;;
            esac
        done
    fi
}

pkg_version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo unknown; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

wait_port() { # port seconds
    local port=$1 secs=$2 _
    for _ in $(seq 1 $((secs * 4))); do
        if python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 0.5).close()' "$port" 2>/dev/null; then
            return 0
        fi
        sleep 0.25
    done
    return 1
}

# ---------------------------------------------------------------------------
# TLS material: throwaway CA, server cert for 127.0.0.1/localhost, client cert
# ---------------------------------------------------------------------------
make_certs() {
    local d=$WORK/tls
    mkdir -p "$d"
    (
        cd "$d"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout ca.key -out ca.pem -days 2 -subj "/CN=accord-peers-bench CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null
        printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=serverAuth" "subjectAltName=DNS:localhost,IP:127.0.0.1" >server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -days 2 -out server.pem -extfile server.ext 2>/dev/null
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout client.key -out client.csr -subj "/CN=peers-loadgen" 2>/dev/null
        printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" \
            "extendedKeyUsage=clientAuth" >client.ext
        openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -days 2 -out client.pem -extfile client.ext 2>/dev/null
        chmod 600 ./*.key
    )
}

# ---------------------------------------------------------------------------
# RabbitMQ
# ---------------------------------------------------------------------------
start_rabbit() {
    local d=$WORK/rabbit port dist
    mkdir -p "$d/mnesia" "$d/log"
    port=$(free_port)
    dist=$(free_port)
    EPMD_PORT=$(free_port)
    RABBIT_NODE="accordpeers$$@localhost"
    RABBIT_PORT=$port
    cat >"$d/rabbitmq.conf" <<EOF
listeners.tcp = none
listeners.ssl.default = 127.0.0.1:$port
ssl_options.cacertfile = $WORK/tls/ca.pem
ssl_options.certfile = $WORK/tls/server.pem
ssl_options.keyfile = $WORK/tls/server.key
ssl_options.verify = verify_peer
ssl_options.fail_if_no_peer_cert = true
ssl_options.versions.1 = tlsv1.3
ssl_options.versions.2 = tlsv1.2
loopback_users.guest = true
disk_free_limit.absolute = 100MB
log.console = false
log.file.level = info
EOF
    echo '[].' >"$d/enabled_plugins"
    : >"$d/rabbitmq-env.conf"

    # Our own epmd on its own port, so no stray `epmd -daemon` outlives us.
    setsid -w epmd -port "$EPMD_PORT" -address 127.0.0.1 >"$d/log/epmd.log" 2>&1 &
    EPMD_PID=$!
    wait_port "$EPMD_PORT" 10 || { echo "run.sh: epmd did not start" >&2; exit 1; }

    log "starting rabbitmq-server $(pkg_version rabbitmq-server) as $RABBIT_NODE, AMQPS 127.0.0.1:$port (mutual TLS), epmd port $EPMD_PORT"
    HOME=$d LC_ALL=C.UTF-8 ERL_EPMD_PORT=$EPMD_PORT \
        RABBITMQ_NODENAME=$RABBIT_NODE \
        RABBITMQ_DIST_PORT=$dist \
        RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf \
        RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config \
        RABBITMQ_CONF_ENV_FILE=$d/rabbitmq-env.conf \
        RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins \
        RABBITMQ_MNESIA_BASE=$d/mnesia \
        RABBITMQ_LOG_BASE=$d/log \
        RABBITMQ_PID_FILE=$d/rabbit.pid \
        setsid -w /usr/lib/rabbitmq/bin/rabbitmq-server >"$d/log/stdout.log" 2>&1 &
    RABBIT_PID=$!
    # await_startup gives up at once while the node is not yet registered with
    # epmd, so poll it (up to 3 minutes) while the server process lives.
    local up=0 _
    for _ in $(seq 1 90); do
        if ! kill -0 "$RABBIT_PID" 2>/dev/null; then
            break
        fi
        if rabbitmqctl_local await_startup --timeout 60 >/dev/null 2>&1; then
            up=1
            break
        fi
        sleep 2
    done
    if [ "$up" != 1 ] || ! wait_port "$port" 30; then
        echo "run.sh: rabbitmq-server did not come up; its log:" >&2
        tail -n 40 "$d/log/stdout.log" "$d"/log/*.log >&2 || true
        exit 1
    fi
}

# Every queue the load generator made must be a quorum queue; then drop them.
check_and_drop_queues() {
    local listing bad
    listing=$(rabbitmqctl_local list_queues --no-table-headers name type durable)
    printf '%s\n' "$listing" | sed 's/^/[peers]   queue: /' >&2
    bad=$(printf '%s\n' "$listing" | awk '$1 ~ /^peerbench-/ && $2 != "quorum"')
    if [ -n "$bad" ]; then
        echo "run.sh: non-quorum queue(s) found: $bad" >&2
        exit 1
    fi
    printf '%s\n' "$listing" | awk '$1 ~ /^peerbench-/ {print $1}' | while read -r q; do
        rabbitmqctl_local delete_queue "$q" </dev/null >/dev/null
    done
}

# ---------------------------------------------------------------------------
# NATS
# ---------------------------------------------------------------------------
start_nats() {
    local d=$WORK/nats port
    mkdir -p "$d/js"
    port=$(free_port)
    NATS_PORT=$port
    cat >"$d/nats.conf" <<EOF
server_name: accord_peers_bench
listen: 127.0.0.1:$port
tls {
  cert_file: "$WORK/tls/server.pem"
  key_file: "$WORK/tls/server.key"
  ca_file: "$WORK/tls/ca.pem"
  verify: true
  timeout: 5
}
EOF
    log "starting nats-server $(pkg_version nats-server) on tls://127.0.0.1:$port (mutual TLS, JetStream file store; non-durable upper reference: nats-server 2.9 acknowledges before fsync)"
    setsid -w nats-server -js -sd "$d/js" -c "$d/nats.conf" >"$d/nats.log" 2>&1 &
    NATS_PID=$!
    if ! wait_port "$port" 30 || ! grep -q "Server is ready" "$d/nats.log"; then
        sleep 1
        grep -q "Server is ready" "$d/nats.log" || {
            echo "run.sh: nats-server did not come up; its log:" >&2
            tail -n 40 "$d/nats.log" >&2 || true
            exit 1
        }
    fi
}

# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------
ensure_packages

LOADGEN_DIR=$HERE/loadgen
LOADGEN=$HERE/target/release/accord-peers-loadgen
log "building the load generator (nice, one job)"
(cd "$LOADGEN_DIR" && CARGO_TARGET_DIR=$HERE/target nice -n 10 cargo build --release --locked -j 1 >&2)

mkdir -p "$DATA_PARENT"
WORK=$(mktemp -d "$DATA_PARENT/accord-peers.XXXXXX")
mkdir -p "$WORK/results"
FS_TYPE=$(stat -f -c %T "$WORK")
log "broker data under $WORK (filesystem: $FS_TYPE)"
if [ "$FS_TYPE" = tmpfs ] || [ "$FS_TYPE" = ramfs ]; then
    log "WARNING: $WORK is on $FS_TYPE: fsync costs nothing there, durable figures will be flattering; use --data-dir on a disk"
fi
# How much a durable acknowledgement costs on this disk: 1 KiB append + fdatasync.
FSYNC_PROBE=$(python3 - "$WORK/fsync-probe" <<'PY'
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
lat = []
for _ in range(300):
    t = time.perf_counter()
    os.write(fd, b"x" * 1024)
    os.fdatasync(fd)
    lat.append(time.perf_counter() - t)
os.close(fd)
os.unlink(sys.argv[1])
lat.sort()
print(f"{lat[len(lat) // 2] * 1e3:.3f} {lat[int(len(lat) * 0.99)] * 1e3:.3f}")
PY
)
log "1 KiB append + fdatasync in $WORK: p50 ${FSYNC_PROBE% *} ms, p99 ${FSYNC_PROBE#* } ms"
make_certs

E2E_FLAG=()
[ "$NO_E2E" = 1 ] && E2E_FLAG=(--no-e2e)

run_loadgen() { # broker url senders outfile [extra loadgen args]
    local broker=$1 url=$2 n=$3 out=$4
    shift 4
    log "$broker: senders=$n size=$SIZE count=$COUNT"
    if ! run_child "$LOADGEN" --broker "$broker" --url "$url" \
        --ca "$WORK/tls/ca.pem" --cert "$WORK/tls/client.pem" --key "$WORK/tls/client.key" \
        --senders "$n" --size "$SIZE" --count "$COUNT" --connections "$CONNECTIONS" \
        "${E2E_FLAG[@]}" "$@" >"$out.tmp"; then
        echo "run.sh: $broker load generator failed (senders=$n)" >&2
        exit 1
    fi
    mv "$out.tmp" "$out"
}

for sys in "${SYSTEM_LIST[@]}"; do
    case "$sys" in
        rabbitmq)
            start_rabbit
            for n in "${SENDER_LIST[@]}"; do
                # --keep: the queues stay until their type has been checked.
                run_loadgen rabbitmq "amqps://guest:guest@127.0.0.1:$RABBIT_PORT/%2f" "$n" \
                    "$WORK/results/rabbitmq-$n.json" --keep
                check_and_drop_queues
            done
            stop_rabbit
            ;;
        nats)
            start_nats
            for n in "${SENDER_LIST[@]}"; do
                run_loadgen nats "tls://127.0.0.1:$NATS_PORT" "$n" "$WORK/results/nats-$n.json"
            done
            stop_nats
            ;;
    esac
done

ACCORD_STATUS=skipped
if [ "$SKIP_ACCORD" = 0 ]; then
    ACCORD_STATUS=ok
    log "accord: running 'cargo run --release -p accord-client --bin accord -- bench' from $ROOT (builds it first if needed)"
    for n in "${SENDER_LIST[@]}"; do
        [ "$ACCORD_STATUS" = ok ] || break # one failure is enough: no retries per sender count
        log "accord: senders=$n size=$SIZE count=$COUNT"
        if run_child env -C "$ROOT" cargo run --release -p accord-client --bin accord -- \
            bench --senders "$n" --size "$SIZE" --count "$COUNT" --json \
            >"$WORK/results/accord-$n.out" 2>"$WORK/results/accord-$n.err"; then
            # The last line that is a JSON object is the result.
            if ! python3 - "$WORK/results/accord-$n.out" "$WORK/results/accord-$n.json" <<'PY'
import json, sys
obj = None
for line in open(sys.argv[1], encoding="utf-8", errors="replace"):
    line = line.strip()
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except ValueError:
            pass
if obj is None:
    try:
        obj = json.load(open(sys.argv[1]))
    except ValueError:
        sys.exit(1)
json.dump(obj, open(sys.argv[2], "w"))
PY
            then
                echo "ACCORD BENCH: 'accord bench' printed no JSON object (senders=$n); broker figures only" >&2
                ACCORD_STATUS=failed
            fi
        else
            echo "ACCORD BENCH FAILED: 'cargo run --release -p accord-client --bin accord -- bench ...' exited non-zero (senders=$n); broker figures only. Last lines:" >&2
            tail -n 5 "$WORK/results/accord-$n.err" | sed 's/^/    /' >&2
            tail -n 5 "$WORK/results/accord-$n.err" >"$WORK/results/accord-error.txt"
            ACCORD_STATUS=failed
        fi
    done
fi

mkdir -p "$(dirname "$OUT")"
python3 - "$WORK/results" "$OUT" "$SENDERS" "$SIZE" "$COUNT" "$ACCORD_STATUS" \
    "$(pkg_version rabbitmq-server)" "$(pkg_version nats-server)" "$(pkg_version erlang-base)" \
    "$FS_TYPE" "$CONNECTIONS" "$FSYNC_PROBE" <<'PY'
import json, os, platform, sys, time

(res_dir, out, senders, size, count, accord_status,
 rabbit_v, nats_v, erlang_v, fs_type, connections, fsync_probe) = sys.argv[1:]
fsync_p50, fsync_p99 = (float(x) for x in fsync_probe.split())
senders = [int(s) for s in senders.split(",")]

def load(name):
    p = os.path.join(res_dir, name)
    if os.path.exists(p):
        with open(p) as f:
            return json.load(f)
    return None

rows = []
for sysname in ("accord", "rabbitmq", "nats"):
    for n in senders:
        r = load(f"{sysname}-{n}.json")
        if r is None:
            continue
        if sysname == "accord":
            r = {"system": "accord", "durable": True, "senders": n,
                 "body_bytes": int(size), "messages": int(count), **r,
                 "_src": "accord bench --json"}
        rows.append(r)

def get(r, *path):
    for k in path:
        if not isinstance(r, dict) or r.get(k) is None:
            return None
        r = r[k]
    return r

def pub(r):
    # Accord's submit with nothing else running (KH down) is what a broker's publish phase
    # is; its "submit" figure is taken while the same gateways forward and deliver.
    return get(r, "submit_alone") if r["system"] == "accord" else get(r, "publish")

def drain(r):
    return get(r, "drain") if r["system"] == "accord" else get(r, "consume")

def ratio(a, b):
    if a is None or b in (None, 0):
        return None
    return round(a / b, 3)

ratios = []
for n in senders:
    by = {r["system"]: r for r in rows if r.get("senders") == n}
    acc = by.get("accord")
    entry = {"senders": n}
    for key, other in (("rabbitmq", "rabbitmq-quorum"), ("nats", "nats-jetstream")):
        o = by.get(other)
        entry[f"accord_over_{key}_submit"] = ratio(get(pub(acc), "throughput_per_sec"),
                                                   get(pub(o), "throughput_per_sec")) if acc and o else None
        entry[f"accord_over_{key}_drain"] = ratio(get(drain(acc), "throughput_per_sec"),
                                                  get(drain(o), "throughput_per_sec")) if acc and o else None
        entry[f"accord_over_{key}_end_to_end"] = ratio(get(acc, "end_to_end", "throughput_per_sec"),
                                                       get(o, "end_to_end", "throughput_per_sec")) if acc and o else None
    ratios.append(entry)

combined = {
    "benchmark": "accord issue #6: side-by-side peers",
    "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "parameters": {"senders": senders, "body_bytes": int(size), "messages": int(count),
                   "connections": int(connections)},
    "labels": {"rabbitmq-quorum": "durable reference: RabbitMQ quorum queue with publisher confirms",
               "nats-jetstream": "non-durable upper reference: nats-server 2.9 acknowledges before fsync"},
    "environment": {"rabbitmq_server": rabbit_v, "nats_server": nats_v, "erlang": erlang_v,
                    "kernel": platform.release(), "cpus": os.cpu_count(),
                    "broker_data_filesystem": fs_type,
                    "fdatasync_1kib_p50_ms": fsync_p50, "fdatasync_1kib_p99_ms": fsync_p99,
                    "transport": "loopback, mutual TLS"},
    "accord_status": accord_status,
    **({"accord_error": open(os.path.join(res_dir, "accord-error.txt")).read()}
       if os.path.exists(os.path.join(res_dir, "accord-error.txt")) else {}),
    "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
    "ratios": ratios,
}
with open(out, "w") as f:
    json.dump(combined, f, indent=2)
    f.write("\n")

def f(x, nd=0):
    if x is None:
        return "-"
    if isinstance(x, float) and x != x:
        return "-"
    return f"{x:,.{nd}f}"

hdr = ["system", "durable", "senders", "body B", "publish/submit msg/s", "p50 ms", "p99 ms",
       "p999 ms", "drain msg/s", "e2e msg/s", "e2e p50 ms", "e2e p99 ms"]
table = []
for r in rows:
    p = pub(r) or {}
    e = get(r, "end_to_end") or {}
    name = r["system"] + ("*" if r["system"] == "nats-jetstream" else "")
    table.append([name, "yes" if r.get("durable") else "NO", str(r.get("senders")),
                  str(r.get("body_bytes")), f(p.get("throughput_per_sec")),
                  f(p.get("p50_ms"), 2), f(p.get("p99_ms"), 2), f(p.get("p999_ms"), 2),
                  f(get(drain(r), "throughput_per_sec")),
                  f(e.get("throughput_per_sec")), f(e.get("p50_ms"), 2), f(e.get("p99_ms"), 2)])
w = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(hdr)]
line = lambda cells: "  ".join(c.rjust(w[i]) if i >= 2 else c.ljust(w[i]) for i, c in enumerate(cells))
print(line(hdr))
print("  ".join("-" * x for x in w))
for row in table:
    print(line(row))
print()
print("* nats-jetstream: non-durable upper reference: nats-server 2.9 acknowledges before fsync.")
print("durable = yes: a message is acknowledged only once it is on disk (RabbitMQ: quorum queue "
      "WAL fsync before the publisher confirm).")
print(f"disk: 1 KiB append + fdatasync p50 {fsync_p50:.3f} ms, p99 {fsync_p99:.3f} ms ({fs_type}).")
print("publish/submit = senders alone (Accord: submit with the peer gateway down); "
      "drain = consume+ack of a pre-filled queue/stream (Accord: the peer gateway comes up, "
      "the recipient opens and acks); e2e = consumer running while senders publish "
      "(publish start -> received and acked).")
print()
if accord_status == "skipped":
    print("Accord: skipped (--skip-accord); ratios n/a")
elif accord_status != "ok":
    print("Accord: FAILED - 'accord bench' did not produce figures (see the ACCORD BENCH line "
          "above on stderr); broker figures only, ratios n/a")
print("ratios (Accord / peer, throughput; above 1 means Accord is faster; NATS* is the "
      "non-durable upper reference):")
for e in ratios:
    def rf(x):
        return "n/a" if x is None else f"{x:.2f}x"
    print(f"  senders={e['senders']}: submit vs RabbitMQ {rf(e['accord_over_rabbitmq_submit'])}, "
          f"vs NATS* {rf(e['accord_over_nats_submit'])}; drain vs RabbitMQ "
          f"{rf(e['accord_over_rabbitmq_drain'])}; end-to-end vs RabbitMQ "
          f"{rf(e['accord_over_rabbitmq_end_to_end'])}, vs NATS* {rf(e['accord_over_nats_end_to_end'])}")
print()
print(f"combined JSON written to {out}")
PY
