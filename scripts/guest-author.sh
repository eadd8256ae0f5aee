#!/usr/bin/env bash
# What a guest author does, run for real (scripts/test.sh calls it; README "Your own guest"):
# build the ledger example with the one documented cargo command, check it with
# `ftvm check-guest`, run it under FT from the image file (10,000 requests, equal replicas), kill
# its primary mid-run (nothing acknowledged lost), and run the interrupt-driven kvstore for
# 100,000 requests (replicas bit-identical). Usage: scripts/guest-author.sh [FTVM-BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
ftvm=${1:-target/debug/ftvm}
[[ -x $ftvm ]] || cargo build --bin ftvm
ftvm=$(realpath "$ftvm")
work=$(mktemp -d /tmp/ftvm-guest-author-XXXXXX)
trap 'rm -rf "$work"' EXIT

say() { printf '\n--> %s\n' "$*"; }
field() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }
equal() { # file key-a key-b
  local a b; a=$(field "$1" "$2"); b=$(field "$1" "$3")
  [[ $a == "$b" ]] || { echo "FAIL: $2 $a != $3 $b ($1)"; exit 1; }
  echo "    $2 = $3 = $a"
}

say "build: (cd guests/ledger && cargo build --release)"
(cd guests/ledger && cargo build --release)
image=guests/target/x86_64-unknown-linux-gnu/release/ftvm-ledger
[[ -f $image ]] || { echo "FAIL: no $image"; exit 1; }

say "check: ftvm check-guest $image"
"$ftvm" check-guest "$image"

say "run: ftvm demo --guest-image $image --workload ledger --requests 10000"
"$ftvm" demo --guest-image "$image" --workload ledger --requests 10000 --no-baseline --json "$work/run.json"
[[ $(field "$work/run.json" responses_ok) == 10000 ]] || { echo "FAIL: responses"; exit 1; }
[[ $(field "$work/run.json" divergences) == 0 ]] || { echo "FAIL: divergences"; exit 1; }
equal "$work/run.json" primary_memory_hash backup_memory_hash
equal "$work/run.json" primary_registers_digest backup_registers_digest

say "failover: ftvm demo --guest-image $image --workload ledger --kill-primary-after 500"
"$ftvm" demo --guest-image "$image" --workload ledger --kill-primary-after 500 --requests 10000 --json "$work/kill.json"
[[ $(field "$work/kill.json" acknowledged_lost) == 0 ]] || { echo "FAIL: acknowledged updates lost"; exit 1; }
equal "$work/kill.json" survivor_memory_hash journal_replay_memory_hash

say "the interrupt-driven kvstore, 100,000 requests: ftvm demo --requests 100000"
"$ftvm" demo --requests 100000 --no-baseline --json "$work/long.json"
[[ $(field "$work/long.json" responses_ok) == 100000 ]] || { echo "FAIL: responses"; exit 1; }
equal "$work/long.json" primary_memory_hash backup_memory_hash
equal "$work/long.json" primary_registers_digest backup_registers_digest
echo "guest author's path: ok"
