#!/usr/bin/env bash
# The long fuzz campaign: every cargo-fuzz target in fuzz/ (libFuzzer, nightly), each for a fixed
# number of runs, from its seeds; prints a table (target, runs, crashes, seconds) and fails if
# any target found a crash or a hang. CI runs the same checks on stable as corpus tests
# (`cargo test`, see fuzz/README.md); this is the long run.
#
#   scripts/fuzz.sh [--runs N] [--targets a,b,...] [--timeout S] [--jobs J]
#
# Defaults: 10,000,000 runs per target, every target, 10 s per input before it counts as a
# hang, one process. With --jobs J, J libFuzzer workers share a target's corpus and each runs
# N/J inputs (the runs column is their sum). Installs the nightly toolchain and cargo-fuzz if they are missing. Findings go to
# fuzz/artifacts/<target>/, the grown corpus to target/fuzz-corpus/<target>/ (not in git).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=10000000
targets=""
timeout=10
jobs=1
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="$2"; shift 2 ;;
        --targets) targets="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        --jobs) jobs="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

all=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^logfmt-fuzz$' || true)
if [ -z "$targets" ]; then
    targets=$(echo "$all" | tr '\n' ',' | sed 's/,$//')
fi

if ! rustup toolchain list | grep -q '^nightly'; then
    echo "==> installing the nightly toolchain (cargo-fuzz needs it)"
    rustup toolchain install nightly --profile minimal
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

# Seeds per target: files under fuzz/seeds/<target>/ (and the images for load_image).
seeds_for() {
    case "$1" in
        decode_frame|decode_frame_crc_fixed) echo "fuzz/seeds" ;;
        load_image) echo "fuzz/image-seeds" ;;
        *) if [ -d "fuzz/seeds/$1" ]; then echo "fuzz/seeds/$1"; fi ;;
    esac
}

report=$(mktemp)
trap 'rm -f "$report"' EXIT
failed=0
IFS=',' read -r -a list <<< "$targets"
for t in "${list[@]}"; do
    if ! echo "$all" | grep -qx "$t"; then
        echo "fuzz.sh: no target '$t' (targets: $(echo "$all" | tr '\n' ' '))" >&2
        exit 2
    fi
    corpus="target/fuzz-corpus/$t"
    mkdir -p "$corpus" "fuzz/artifacts/$t"
    echo "==> $t: $runs runs"
    start=$(date +%s)
    log="target/fuzz-corpus/$t.log"
    # The seed directories are found from the repository root, before the `cd fuzz` below
    # (looked up inside it, `fuzz/seeds/<target>` never existed and no seeds were passed).
    seed_dirs=()
    for d in $(seeds_for "$t"); do seed_dirs+=("../$d"); done
    par=()
    if [ "$jobs" -gt 1 ]; then
        par=(-jobs="$jobs" -workers="$jobs")
        rm -f fuzz/fuzz-*.log
    fi
    set +e
    (cd fuzz && cargo +nightly fuzz run "$t" "../$corpus" ${seed_dirs[@]+"${seed_dirs[@]}"} -- \
        -runs="$(( runs / jobs ))" "${par[@]+"${par[@]}"}" -timeout="$timeout" \
        -print_final_stats=1) >"$log" 2>&1
    rc=$?
    set -e
    secs=$(( $(date +%s) - start ))
    if [ "$jobs" -gt 1 ]; then
        # libFuzzer copies each worker's fuzz/fuzz-<job>.log into its own output when the
        # worker exits: the runs are the sum of the workers' final stats.
        rm -f fuzz/fuzz-*.log
        done_runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | awk '{s+=$1} END {print s+0}')
    else
        done_runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    fi
    crashes=$(find "fuzz/artifacts/$t" -type f \( -name 'crash-*' -o -name 'timeout-*' -o -name 'oom-*' \) | wc -l)
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        echo "   $t FAILED (exit $rc, $crashes finding(s) in fuzz/artifacts/$t; log: $log)"
        tail -20 "$log" | sed 's/^/   | /'
    fi
    printf '%-24s %12s %8s %8s\n' "$t" "${done_runs:-?}" "$crashes" "$secs" >>"$report"
done

echo
printf '%-24s %12s %8s %8s\n' target runs crashes seconds
cat "$report"
exit "$failed"
