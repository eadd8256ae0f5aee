#!/usr/bin/env bash
# Output-commit latency with and without ACK kicks: `ftvm demo` (shm) in alternating rounds,
# every `--ack-kick-us` setting once per round, so a machine that changes state between runs
# affects every setting alike. Prints each run and, per setting, the median of the rounds;
# keeps every run's JSON in the output directory.
#
#   scripts/ack-kick.sh [--rounds R] [--requests N] [--kicks 0,4,...] [--out DIR]
#
# Defaults: 3 rounds, 10,000 requests, settings 0 (never kick) and 20 µs (the default), ./ack-kick-results.
# Needs a release build (`cargo build --release`) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
requests=10000
kicks="0,20"
out="ack-kick-results"
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --requests) requests="$2"; shift 2 ;;
        --kicks) kicks="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "ack-kick.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
ftvm=target/release/ftvm
[ -x "$ftvm" ] || { echo "ack-kick.sh: build first: cargo build --release" >&2; exit 2; }
mkdir -p "$out"
IFS=',' read -r -a settings <<< "$kicks"
for r in $(seq 1 "$rounds"); do
    for k in "${settings[@]}"; do
        echo "==> round $r/$rounds, --ack-kick-us $k"
        "$ftvm" demo --requests "$requests" --ack-kick-us "$k" --json "$out/kick$k-round$r.json" \
            >"$out/kick$k-round$r.log" 2>&1 || { echo "   failed: see $out/kick$k-round$r.log"; exit 1; }
    done
done
python3 - "$out" "$rounds" "${settings[@]}" <<'EOF'
import json, statistics, sys
out, rounds, settings = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
keys = ["commit_p50_us", "commit_p99_us", "ack_kicks", "ft_requests_per_sec", "ft_throughput_ratio"]
print(f"{'kick µs':>8} {'round':>5} {'p50 µs':>8} {'p99 µs':>9} {'kicks':>7} {'FT req/s':>9} {'FT/unrep':>9}")
med = {}
for k in settings:
    rows = []
    for r in range(1, rounds + 1):
        d = json.load(open(f"{out}/kick{k}-round{r}.json"))
        row = [d.get(x) or 0 for x in keys]
        rows.append(row)
        print(f"{k:>8} {r:>5} {row[0]:8.2f} {row[1]:9.2f} {row[2]:7d} {row[3]:9.0f} {row[4]:9.3f}")
    med[k] = [statistics.median(c) for c in zip(*rows)]
print("median of rounds:")
for k, m in med.items():
    print(f"{k:>8} {'':>5} {m[0]:8.2f} {m[1]:9.2f} {m[2]:7.0f} {m[3]:9.0f} {m[4]:9.3f}")
EOF
