#!/usr/bin/env bash
# The fault campaign: `ftvm demo --faults N` on a self-healing pair, one arbiter backend or
# several in turn. Writes target/campaign/<arbiter>.json (every fault, the totals) and
# target/campaign/<arbiter>.svg (failover and re-protect distributions), and fails if any run
# lost an acknowledged update, saw a split brain or a divergence, or ended unequal.
#
#   scripts/campaign.sh --faults 1000 [--arbiter file|server|etcd|all] [--heartbeat-timeout-ms 300]
#                       [-- extra ftvm demo options]
# With --arbiter all, the faults are spread over the three backends.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

faults=1000
arbiter=file
heartbeat=300
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --faults) faults="$2"; shift 2 ;;
        --arbiter) arbiter="$2"; shift 2 ;;
        --heartbeat-timeout-ms) heartbeat="$2"; shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "campaign.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$arbiter" in
    file|server|etcd) kinds=("$arbiter") ;;
    all) kinds=(file server etcd) ;;
    *) echo "campaign.sh: --arbiter file|server|etcd|all, not $arbiter" >&2; exit 2 ;;
esac

cargo build --release -q -p ftvm
out=target/campaign
mkdir -p "$out"
n=${#kinds[@]}
status=0
for i in "${!kinds[@]}"; do
    kind=${kinds[$i]}
    # Spread the faults: the first backends take the remainder.
    share=$(( faults / n + (i < faults % n ? 1 : 0) ))
    echo "==> campaign: $share faults, arbiter $kind, heartbeat timeout $heartbeat ms"
    if ! target/release/ftvm demo --faults "$share" --arbiter-kind "$kind" \
        --heartbeat-timeout-ms "$heartbeat" --json "$out/$kind.json" --plot "$out/$kind.svg" \
        "${extra[@]}"; then
        echo "campaign.sh: the $kind campaign failed; its summary is in $out/$kind.json" >&2
        status=1
    fi
done
echo "==> summaries and plots in $out/"
exit $status
