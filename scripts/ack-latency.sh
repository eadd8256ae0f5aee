#!/usr/bin/env bash
# Output-commit latency of `ftvm demo` (shm) under different ways of getting the backup's ACK,
# in alternating rounds: every variant once per round, so a machine that changes state between
# runs affects every variant alike. Prints each run and, per variant, the median of the rounds;
# keeps every run's JSON and log in the output directory.
#
#   scripts/ack-latency.sh [--rounds R] [--requests N] [--out DIR] [--variant 'NAME=DEMO ARGS' ...]
#
# Defaults: 3 rounds, 10,000 requests, ./ack-latency-results, and the variants
#   none    = --ack-helper-us 0 --ack-kick-us 0   (the backup acknowledges at its next exit)
#   kick    = --ack-helper-us 0                    (a signal to the backup's vCPU thread)
#   helper  = (the defaults: the ACK helper on the primary's core, kicks as fallback)
# Needs a release build (`cargo build --release`) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=3
requests=10000
out="ack-latency-results"
variants=()
while [ $# -gt 0 ]; do
    case "$1" in
        --rounds) rounds="$2"; shift 2 ;;
        --requests) requests="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --variant) variants+=("$2"); shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "ack-latency.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ ${#variants[@]} -eq 0 ]; then
    variants=("none=--ack-helper-us 0 --ack-kick-us 0" "kick=--ack-helper-us 0" "helper=")
fi
ftvm=target/release/ftvm
[ -x "$ftvm" ] || { echo "ack-latency.sh: build first: cargo build --release" >&2; exit 2; }
mkdir -p "$out"
names=()
for v in "${variants[@]}"; do names+=("${v%%=*}"); done
for r in $(seq 1 "$rounds"); do
    for v in "${variants[@]}"; do
        name="${v%%=*}"
        read -r -a extra <<< "${v#*=}"
        echo "==> round $r/$rounds, $name: ftvm demo --requests $requests ${extra[*]+"${extra[*]}"}"
        "$ftvm" demo --requests "$requests" ${extra[@]+"${extra[@]}"} --json "$out/$name-round$r.json" \
            >"$out/$name-round$r.log" 2>&1 || { echo "   failed: see $out/$name-round$r.log"; exit 1; }
    done
done
python3 - "$out" "$rounds" "${names[@]}" <<'EOF'
import json, statistics, sys
out, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
keys = ["commit_p50_us", "commit_p99_us", "ack_helps", "ack_kicks", "ft_requests_per_sec",
        "ft_throughput_ratio"]
head = f"{'variant':>10} {'round':>5} {'p50 µs':>8} {'p99 µs':>9} {'helps':>7} {'kicks':>7} {'FT req/s':>9} {'FT/unrep':>9}"
print(head)
med = {}
for n in names:
    rows = []
    for r in range(1, rounds + 1):
        d = json.load(open(f"{out}/{n}-round{r}.json"))
        row = [d.get(k) or 0 for k in keys]
        rows.append(row)
        print(f"{n:>10} {r:>5} {row[0]:8.2f} {row[1]:9.2f} {row[2]:7d} {row[3]:7d} {row[4]:9.0f} {row[5]:9.3f}")
    med[n] = [statistics.median(c) for c in zip(*rows)]
print("median of rounds:")
for n, m in med.items():
    print(f"{n:>10} {'':>5} {m[0]:8.2f} {m[1]:9.2f} {m[2]:7.0f} {m[3]:7.0f} {m[4]:9.0f} {m[5]:9.3f}")
EOF
