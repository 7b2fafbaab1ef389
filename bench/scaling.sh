#!/usr/bin/env bash
# The scaling tables of docs/performance.md: `accord bench` at 1 KiB for 1, 4, 16, 64 and
# 256 senders, one sender offering 20 msg/s (light load), then at 16 senders for 1 KiB, 64 KiB and 1 MiB bodies, then the backlog
# scenario (after 200,000 envelopes end to end, so VN restarts on a log of about 1M
# entries). Each row is one `accord bench ... --json` run; the JSON lines go to --out and
# the tables, with the command of each row, to stdout.
#
# Usage: bench/scaling.sh [--out bench/scaling.jsonl] [--quick]
#   --quick   a tenth of the messages (a smoke run, not for the docs)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=bench/scaling.jsonl
SCALE=1
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --quick) SCALE=10; shift ;;
        *) echo "scaling.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done

cargo build --release -p accord-client --bin accord >&2
ACCORD=target/release/accord
: >"$OUT"

run() { # label, then accord bench arguments
    local label=$1; shift
    echo "[scaling] $label: accord bench $*" >&2
    local json
    json=$("$ACCORD" bench "$@" --json)
    python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["row"]=sys.argv[2]; r["command"]=sys.argv[3]; print(json.dumps(r))' \
        "$json" "$label" "accord bench $*" >>"$OUT"
}

n() { echo $(( $1 / SCALE )); }

for s in 1 4 16 64 256; do
    case $s in 1) c=3000 ;; 4) c=6000 ;; *) c=12000 ;; esac
    run "senders=$s" --senders "$s" --size 1024 --count "$(n $c)" --warmup "$(n 500)"
done
# The latency target's setting: one alert stream at light load, 20 msg/s offered.
run "light load, 1 sender at 20 msg/s" --senders 1 --rate 20 --size 1024 --count "$(n 1200)" --warmup "$(n 100)"
run "size=64KiB" --senders 16 --size 65536 --count "$(n 3000)" --warmup "$(n 200)"
run "size=1MiB" --senders 16 --size 1048576 --count "$(n 400)" --warmup "$(n 40)"
run "backlog=100k" --backlog "$(n 100000)" --history "$(n 200000)" --senders 64 --size 1024

python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ex = [r for r in rows if "end_to_end" in r]
m = rows[0]["machine"]
print(f"Machine: {m['cores']} cores ({m['cpu']}), Linux {m['kernel']}, run folder on {m['run_dir_filesystem']}.\n")
print("| row | submit alone msg/s | alone p50 / p99 ms | drain msg/s | submit msg/s | submit p50 / p99 ms | end to end msg/s | e2e p50 / p99 / p99.9 ms | echo msg/s | crypto ceiling | store tx/s | e2e/crypto | VN / KH CPU µs/msg | VN / KH peak RSS MiB | disk B/msg |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in ex:
    p = {x["name"]: x for x in r["processes"]}
    vn, kh = p["vn-gateway"], p["kh-gateway"]
    s, e, l = r["submit"], r["end_to_end"], r["limits"]
    a, d = r["submit_alone"], r["drain"]
    print(f"| {r['row']} | {a['throughput_per_sec']:.0f} | {a['p50_ms']:.1f} / {a['p99_ms']:.1f} | "
          f"{d['throughput_per_sec']:.0f} | {s['throughput_per_sec']:.0f} | {s['p50_ms']:.1f} / {s['p99_ms']:.1f} | "
          f"{e['throughput_per_sec']:.0f} | {e['p50_ms']:.0f} / {e['p99_ms']:.0f} / {e['p999_ms']:.0f} | "
          f"{l['transport']['throughput_per_sec']:.0f} | {l['crypto']['ceiling_per_sec']:.0f} | "
          f"{l['store']['throughput_per_sec']:.0f} | {r['ratios']['end_to_end_vs_crypto']*100:.0f}% | "
          f"{vn['cpu_us_per_message']:.0f} / {kh['cpu_us_per_message']:.0f} | "
          f"{vn['peak_rss_mib']:.0f} / {kh['peak_rss_mib']:.0f} | {r['disk_bytes_per_message']:.0f} |")
def pct(v):
    return "n/a" if v is None else f"{v:.1f}%"
print("\nEnd to end by stage (p50 / p99 ms) and the machine's noise meanwhile:\n")
stages = ex[0]["end_to_end_stages"]
print("| row | " + " | ".join(st["stage"] for st in stages) + " | CPU stolen | waiting for CPU / I/O |")
print("|---|" + "---|" * len(stages) + "---|---|")
for r in ex:
    n = r["end_to_end_noise"]
    cells = " | ".join(f"{st['p50_ms']:.1f} / {st['p99_ms']:.1f}" for st in r["end_to_end_stages"])
    print(f"| {r['row']} | {cells} | {pct(n['steal_percent'])} | "
          f"{pct(n['cpu_pressure_percent'])} / {pct(n['io_pressure_percent'])} |")
print("\nCommands:\n")
for r in rows:
    print(f"- {r['row']}: `{r['command']}`")
for r in rows:
    if "backlog" in r:
        print(f"\nBacklog of {r['backlog']}: submit {r['submit']['throughput_per_sec']:.0f} msg/s with KH down; "
              f"VN peak RSS {r['vn_peak_rss_with_backlog_mib']:.0f} MiB, store {r['vn_disk_mib']:.0f} MiB; "
              f"restart to ready {r['restart_to_ready_ms']:.0f} ms with {r['vn_log_entries']} log entries "
              f"({r['history']} envelopes exchanged end to end before the backlog); "
              f"drain {r['drain']['throughput_per_sec']:.0f} msg/s ({r['drain']['seconds']:.0f} s); "
              f"peak RSS after the drain VN {r['vn_peak_rss_after_drain_mib']:.0f} MiB, KH {r['kh_peak_rss_after_drain_mib']:.0f} MiB.")
PY
