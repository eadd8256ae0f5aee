#!/bin/sh
# Runs inside the soft-RoCE CI guest (called by /init): rxe0@veth0 <-> rxe1@veth1, then every
# RDMA test binary in /ftvm/tests, then the commit-latency bench, then perftest's ib_write_lat.
# Results go to the second serial port (/dev/ttyS1, a file on the host), each as
#   FTVM-RESULT-BEGIN <kind> <name>
#   <base64 of the output>
#   FTVM-RESULT-END <kind> <name> rc=<exit status> secs=<wall seconds>
# and the run ends with FTVM-ALL-DONE; the host treats anything missing as a failure.
# Settings come from /ftvm/config (sourced): BENCH_TRANSPORTS, BENCH_COUNT, BENCH_WARMUP,
# PERF_ITERS, ROUNDS, WIRE_BYTES, TEST_TIMEOUT,
# BENCH_TIMEOUT, PERF_TIMEOUT.

# Used by lib.sh: busybox's own `ip` applet would shadow iproute2's.
export IP_CMD=/usr/bin/ip RDMA_CMD=/usr/bin/rdma SYSCTL_CMD=sysctl
# shellcheck source=scripts/softroce/lib.sh
. /ftvm/lib.sh
# shellcheck source=/dev/null
. /ftvm/config

RES=/dev/ttyS1
stty -F "$RES" raw -echo 2>/dev/null
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "GUEST[$(up)]: $*"; }

# emit KIND NAME RC SECS FILE: one result block on the results port (at most the last MiB).
emit() {
  {
    echo "FTVM-RESULT-BEGIN $1 $2"
    tail -c 1048576 "$5" | base64
    echo "FTVM-RESULT-END $1 $2 rc=$3 secs=$4"
  } >"$RES"
}

# show NAME FILE: a log on the console, prefixed, at most its last 300 lines.
show() {
  _lines=$(wc -l <"$2")
  [ "$_lines" -le 300 ] || echo "  [$1] ... ($((_lines - 300)) earlier lines: target/softroce/logs/)"
  tail -n 300 "$2" | sed "s/^/  [$1] /"
}

# run_limited SECS OUTFILE CMD...: runs CMD in its own session with stdout+stderr to OUTFILE;
# after SECS seconds the whole session (children too) is killed. Returns CMD's status
# (124 on timeout).
run_limited() {
  _secs=$1
  _out=$2
  shift 2
  setsid "$@" >"$_out" 2>&1 </dev/null &
  _pid=$!
  (
    sleep "$_secs"
    if kill -0 "$_pid" 2>/dev/null; then
      touch "/tmp/timedout.$_pid"
      kill -KILL "-$_pid" 2>/dev/null
      kill -KILL "$_pid" 2>/dev/null
    fi
  ) &
  _wd=$!
  wait "$_pid"
  _rc=$?
  kill "$_wd" 2>/dev/null
  # Whatever the command left behind in its session (a test's child processes).
  kill -KILL "-$_pid" 2>/dev/null
  if [ -e "/tmp/timedout.$_pid" ]; then
    echo "FTVM: killed after ${_secs} s (timeout)" >>"$_out"
    _rc=124
  fi
  return "$_rc"
}

since() { awk -v a="$1" -v b="$(up)" 'BEGIN { printf "%.1f", b - a }'; }

# --- the network and the two rxe devices -----------------------------------------------------
setup_log=/tmp/setup.log
{
  softroce_veth_pair &&
    softroce_rxe_add rxe0 veth0 &&
    softroce_rxe_add rxe1 veth1 &&
    g0=$(softroce_wait_gid rxe0 "$SOFTROCE_IP_A") &&
    g1=$(softroce_wait_gid rxe1 "$SOFTROCE_IP_B")
} >"$setup_log" 2>&1
setup_rc=$?
{
  $RDMA_CMD link show
  ibv_devices
  echo "rxe0 gid $g0, rxe1 gid $g1"
} >>"$setup_log" 2>&1
cat "$setup_log"
printf 'FTVM_RDMA_GID_A=%s\nFTVM_RDMA_GID_B=%s\nkernel=%s\ncpus=%s\n' "$g0" "$g1" "$(uname -r)" "$(nproc)" >/tmp/env.txt
emit setup network "$setup_rc" 0 "$setup_log"
emit env env "$setup_rc" 0 /tmp/env.txt
if [ "$setup_rc" != 0 ]; then
  say "network/rxe setup failed; nothing else can run"
  echo "FTVM-ALL-DONE" >"$RES"
  exit 1
fi
say "rxe0@veth0 gid $g0 <-> rxe1@veth1 gid $g1"
say "clock source: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource 2>/dev/null) (available: $(cat /sys/devices/system/clocksource/clocksource0/available_clocksource 2>/dev/null))"

export FTVM_RDMA_DEV_A=rxe0 FTVM_RDMA_GID_A="$g0" FTVM_RDMA_IP_A="$SOFTROCE_IP_A"
export FTVM_RDMA_DEV_B=rxe1 FTVM_RDMA_GID_B="$g1" FTVM_RDMA_IP_B="$SOFTROCE_IP_B"
export RUST_BACKTRACE=1 HOME=/root TMPDIR=/tmp

# --- the RDMA transport's tests --------------------------------------------------------------
# (whatever the host packed: none with --perftest-only)
for t in /ftvm/tests/*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  say "test $name: start (timeout ${TEST_TIMEOUT} s)"
  t0=$(up)
  run_limited "$TEST_TIMEOUT" "/tmp/test-$name.log" "$t"
  rc=$?
  secs=$(since "$t0")
  show "$name" "/tmp/test-$name.log"
  say "test $name: exit $rc after $secs s"
  emit test "$name" "$rc" "$secs" "/tmp/test-$name.log"
done

# --- perftest's ib_write_lat: server on rxe1, client on rxe0, across the veth pair -----------
# perftest NAME BYTES [PREFIX]: one ib_write_lat run of BYTES-byte writes, emitted as NAME.
perftest() {
  # Each side pinned to its own vCPU: TCG's per-vCPU TSCs are not synchronised, and perftest turns
  # its TSC-vs-clock calibration into cycles per µs; a calibration that migrated between vCPUs
  # ("Correlation coefficient r^2 ... < 0.9") makes it print inf. Such a run is repeated (4 tries).
  perf_try=1
  while :; do
    say "${3}ib_write_lat $2 B x $PERF_ITERS (try $perf_try): server rxe1 (gid $g1) on cpu 1, client rxe0 (gid $g0) on cpu 0 -> $SOFTROCE_IP_B"
    t0=$(up)
    run_limited "$PERF_TIMEOUT" /tmp/perf-server.log \
      taskset -c 1 ib_write_lat -d rxe1 -i 1 -x "$g1" -s "$2" -n "$PERF_ITERS" -F &
    srv=$!
    sleep 1
    run_limited "$PERF_TIMEOUT" /tmp/perf-client.log \
      taskset -c 0 ib_write_lat -d rxe0 -i 1 -x "$g0" -s "$2" -n "$PERF_ITERS" -F "$SOFTROCE_IP_B"
    crc=$?
    wait "$srv"
    src=$?
    secs=$(since "$t0")
    cat /tmp/perf-client.log
    say "ib_write_lat: client exit $crc, server exit $src, $secs s"
    if [ "$crc" = 0 ] && [ "$src" = 0 ] && ! grep -Eq '(^|[[:space:]])(-?inf|-?nan)([[:space:]]|$)' /tmp/perf-client.log; then
      break
    fi
    [ "$perf_try" -lt 4 ] || break
    perf_try=$((perf_try + 1))
    say "ib_write_lat: no usable numbers, again"
    sleep 1
  done
  emit perftest-client "$1" "$crc" "$secs" /tmp/perf-client.log
  emit perftest-server "$1" "$src" "$secs" /tmp/perf-server.log
}

# --- the commit-latency bench and perftest's ib_write_lat, in ROUNDS alternating rounds ------
# Both move with the emulator's and the host's load (ib_write_lat's RTT ranged 37-50 µs between
# runs), so the comparison is made round by round, each bench next to its own ib_write_lat, and
# the host takes the median of the rounds' ratios.
round=1
while [ "$round" -le "$ROUNDS" ]; do
  if [ -x /ftvm/bench ]; then
    say "round $round/$ROUNDS: bench commit --transport $BENCH_TRANSPORTS --count $BENCH_COUNT --warmup $BENCH_WARMUP: start"
    t0=$(up)
    run_limited "$BENCH_TIMEOUT" "/tmp/bench-$round.log" /ftvm/bench commit --transport "$BENCH_TRANSPORTS" \
      --count "$BENCH_COUNT" --warmup "$BENCH_WARMUP" --rounds 1 --json "/tmp/bench-$round.json"
    rc=$?
    secs=$(since "$t0")
    show bench "/tmp/bench-$round.log"
    say "bench: exit $rc after $secs s"
    emit bench-log "bench-$round" "$rc" "$secs" "/tmp/bench-$round.log"
    [ -f "/tmp/bench-$round.json" ] && emit bench-json "bench-$round" "$rc" "$secs" "/tmp/bench-$round.json"
  fi

  perftest "ib_write_lat-$round" 64 "round $round/$ROUNDS: "

  round=$((round + 1))
done

# For the record, not for the target: one more, shorter bench run with `--trace`, the commit
# broken into its steps on both sides (the stamps cost time here, so the rounds above run
# without them).
if [ -x /ftvm/bench ]; then
  say "bench commit --transport rdma --trace (for the record)"
  t0=$(up)
  run_limited "$BENCH_TIMEOUT" /tmp/bench-trace.log /ftvm/bench commit --transport rdma \
    --count 5000 --warmup 1000 --rounds 1 --trace
  rc=$?
  secs=$(since "$t0")
  show bench-trace /tmp/bench-trace.log
  say "bench --trace: exit $rc after $secs s"
fi

# For the record, not for the target: ib_write_lat with as many bytes per write as one commit
# puts on the wire (record header, frame, seal), so the commit can also be read against the
# medium at equal size.
if [ -n "${WIRE_BYTES:-}" ] && [ "$WIRE_BYTES" != 64 ]; then
  perftest ib_write_lat-wire "$WIRE_BYTES" "at the commit's wire size: "
fi

echo "FTVM-ALL-DONE" >"$RES"
say "all done"
