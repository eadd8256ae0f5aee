#!/usr/bin/env bash
# Soft-RoCE CI: the RDMA medium's tests and a short commit-latency bench on real rdma_rxe devices,
# inside a QEMU guest (TCG) that boots Debian's own kernel, next to perftest's ib_write_lat in the
# same guest. Our machines' kernel has no RDMA, so the guest brings its own.
#
#   1. installs what it needs (apt, skipped when present), downloads and unpacks Debian's
#      linux-image-amd64 into target/softroce/work (cached across runs);
#   2. builds the RDMA test binaries (`cargo test -p transport --features rdma --no-run`, the
#      test targets named rdma*) and the bench (`cargo build --release -p bench --features
#      rdma,trace`);
#   3. packs them with busybox, the rxe modules and perftest into an initramfs and boots it:
#      rxe0@veth0 (10.99.0.1) <-> rxe1@veth1 (10.99.0.2), each test binary run with
#      FTVM_RDMA_{DEV,GID,IP}_{A,B}, then `bench commit --transport rdma`, then ib_write_lat;
#   4. reads the results back from the guest's second serial port and writes
#      target/softroce/bench.json (the bench's rows plus an ib_write_lat row).
#
# Exits non-zero if a test fails, a result is missing (e.g. the guest died), or nothing was built.
# The rdma-commit-vs-ib_write_lat target is printed loudly but does not fail the run.
#
# Usage: scripts/softroce-ci.sh [--perftest-only]
#   --perftest-only   skip building/running the Rust side (plumbing check: boot + ib_write_lat)
# Environment (defaults): SOFTROCE_BENCH_TRANSPORTS=rdma (e.g. rdma,shm; the target
#   check uses the rdma row) SOFTROCE_BENCH_COUNT=20000 SOFTROCE_BENCH_WARMUP=2000
#   SOFTROCE_PERF_ITERS=5000 SOFTROCE_ROUNDS=3 (bench + ib_write_lat rounds; the target check
#   takes the median of the rounds' ratios) SOFTROCE_TEST_TIMEOUT=600 (per test binary, s)
#   SOFTROCE_BENCH_TIMEOUT=300 SOFTROCE_PERF_TIMEOUT=90 SOFTROCE_VM_TIMEOUT=1200 (whole VM, s)
#   SOFTROCE_VM_MEM=2048 (MiB) SOFTROCE_SMP=2 SOFTROCE_ACCEL=tcg (kvm cannot boot it on PVM hosts)
#   SOFTROCE_KERNEL_ARGS="clocksource=tsc tsc=reliable" (appended to the guest's command line)
#   development aids: SOFTROCE_EXTRA_TESTS="NAME=PATH ..." (more test executables),
#   SOFTROCE_BENCH_EXE=PATH (a bench binary built elsewhere), SOFTROCE_NO_TESTS=1 (bench only)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$HOME/.cargo/bin:$PATH"

PERFTEST_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --perftest-only) PERFTEST_ONLY=1 ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "softroce-ci: unknown argument $arg (see --help)" >&2
      exit 2
      ;;
  esac
done

BENCH_TRANSPORTS=${SOFTROCE_BENCH_TRANSPORTS:-rdma}
BENCH_COUNT=${SOFTROCE_BENCH_COUNT:-20000}
BENCH_WARMUP=${SOFTROCE_BENCH_WARMUP:-2000}
PERF_ITERS=${SOFTROCE_PERF_ITERS:-5000}
ROUNDS=${SOFTROCE_ROUNDS:-3}
# Bytes one 64 B commit writes to the backup: an 8-byte ring record header, the 154-byte frame
# (40-byte header, the input entry: 16 + 2 + 64, the output marker: 16 + 16) and the 16-byte seal.
# ib_write_lat runs once more at this size, for the record (not for the target).
WIRE_BYTES=${SOFTROCE_WIRE_BYTES:-178}
TEST_TIMEOUT=${SOFTROCE_TEST_TIMEOUT:-600}
BENCH_TIMEOUT=${SOFTROCE_BENCH_TIMEOUT:-300}
PERF_TIMEOUT=${SOFTROCE_PERF_TIMEOUT:-90}
VM_TIMEOUT=${SOFTROCE_VM_TIMEOUT:-1200}
VM_MEM=${SOFTROCE_VM_MEM:-2048}
SMP=${SOFTROCE_SMP:-2}
# The guest's clock source: TCG's emulated HPET makes every clock read cost ~1.7 µs, which the
# channel and the bench pay and perftest (which counts TSC cycles) does not; use the TSC.
KERNEL_ARGS=${SOFTROCE_KERNEL_ARGS-clocksource=tsc tsc=reliable}
ACCEL=${SOFTROCE_ACCEL:-tcg}

OUT=$ROOT/target/softroce
WORK=$OUT/work
S=$ROOT/scripts/softroce
START=$SECONDS
log() { printf '\n==> softroce: %s (%d s)\n' "$*" "$((SECONDS - START))"; }
die() {
  echo "softroce-ci: FAILED: $*" >&2
  exit 1
}
mkdir -p "$OUT" "$WORK/debs"
# One run at a time per checkout: they share the rootfs, the initramfs and the result files.
exec 9>"$OUT/.lock"
if ! flock -n 9; then
  echo "softroce: another softroce-ci.sh is running in this checkout; waiting for it"
  flock 9
fi
rm -f "$OUT/bench.json" "$OUT/results.txt" "$OUT/console.log"

# --- 1. packages and the guest kernel ---------------------------------------------------------
log "host packages"
as_root=()
[[ $(id -u) -eq 0 ]] || as_root=(sudo)
guest_pkgs=(qemu-system-x86 busybox-static cpio gzip kmod binutils python3
  rdma-core ibverbs-providers ibverbs-utils perftest iproute2 libibverbs-dev librdmacm-dev)
if ((PERFTEST_ONLY)); then
  missing=()
  for p in "${guest_pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "softroce: installing ${missing[*]}"
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  fi
else
  scripts/install-deps.sh "${guest_pkgs[@]}"
fi

log "guest kernel (Debian linux-image-amd64, cached in ${WORK#"$ROOT"/})"
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
KPKG=$(kpkg || true)
if [[ -z $KPKG ]]; then
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq || true
  KPKG=$(kpkg || true)
fi
if [[ -z $KPKG ]]; then
  # No package lists (offline?): fall back to a kernel unpacked by an earlier run.
  cached=$(find "$WORK/kernel/boot" -name 'vmlinuz-*' 2>/dev/null | sort | tail -1)
  [[ -n $cached ]] || die "cannot resolve linux-image-amd64 with apt-cache and no cached kernel"
  KPKG=linux-image-${cached##*/vmlinuz-}
fi
KVER=${KPKG#linux-image-}
KDIR=$WORK/kernel
if [[ ! -f $KDIR/boot/vmlinuz-$KVER || ! -f $KDIR/.complete-$KVER ]]; then
  deb=$(find "$WORK/debs" -name "${KPKG}_*.deb" | sort | tail -1)
  if [[ -z $deb ]]; then
    sandbox=()
    [[ $(id -u) -ne 0 ]] || sandbox=(-o APT::Sandbox::User=root) # root: no _apt permission warning
    (cd "$WORK/debs" && apt-get download -q "${sandbox[@]}" "$KPKG" >/dev/null) ||
      die "apt-get download $KPKG failed"
    deb=$(find "$WORK/debs" -name "${KPKG}_*.deb" | sort | tail -1)
    find "$WORK/debs" -name 'linux-image-*.deb' ! -name "${KPKG}_*" -delete # older kernels
  fi
  rm -rf "$KDIR"
  dpkg -x "$deb" "$KDIR"
  depmod -b "$KDIR" "$KVER"
  touch "$KDIR/.complete-$KVER"
fi
echo "softroce: kernel $KVER"

# --- 2. the Rust side -------------------------------------------------------------------------
tests=()
bench_exe=
if ((PERFTEST_ONLY)); then
  log "--perftest-only: not building the RDMA tests or the bench"
else
  log "cargo test -p transport --features rdma --no-run"
  cargo test -p transport --features rdma --no-run --message-format=json-render-diagnostics \
    >"$OUT/cargo-test.json" || die "building the RDMA tests failed"
  mapfile -t tests < <(python3 - "$OUT/cargo-test.json" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") \
            and m["profile"].get("test") and m["target"]["name"].startswith("rdma"):
        print(m["target"]["name"] + "\t" + m["executable"])
EOF
  )
  ((${#tests[@]})) || die "no RDMA test binaries: cargo test -p transport --features rdma built no test target named rdma* (transport/tests/rdma_*.rs)"
  printf 'softroce: test binary %s\n' "${tests[@]}"

  log "cargo build --release -p bench --features rdma,trace"
  cargo build --release -p bench --features rdma,trace --message-format=json-render-diagnostics \
    >"$OUT/cargo-bench.json" || die "building the bench failed"
  bench_exe=$(python3 - "$OUT/cargo-bench.json" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "bench":
        print(m["executable"])
EOF
  )
  [[ -x $bench_exe ]] || die "cargo build -p bench produced no bench executable"
fi

# Development aid: SOFTROCE_EXTRA_TESTS="NAME=PATH ..." runs more executables as tests in the guest.
# SOFTROCE_BENCH_EXE=PATH runs PATH as the bench instead.
# SOFTROCE_NO_TESTS=1 runs no test binary (a bench-only run while tuning; CI never sets it).
if [[ ${SOFTROCE_NO_TESTS:-0} == 1 ]]; then
  tests=()
fi
for extra in ${SOFTROCE_EXTRA_TESTS:-}; do
  tests+=("${extra%%=*}"$'\t'"${extra#*=}")
done
bench_exe=${SOFTROCE_BENCH_EXE:-$bench_exe}

# --- 3. initramfs -----------------------------------------------------------------------------
log "initramfs"
R=$WORK/rootfs
rm -rf "$R"
mkdir -p "$R"/{bin,sbin,etc,proc,sys,dev,run,tmp,var,root,modules,ftvm/tests,usr/bin,usr/sbin,usr/lib,usr/lib64}
ln -s usr/lib "$R/lib"
ln -s usr/lib64 "$R/lib64"
ln -s ../run "$R/var/run"
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do
  case "$a" in ip | busybox) continue ;; esac # iproute2's ip, not busybox's
  [[ -e $R/bin/$a ]] || ln -s busybox "$R/bin/$a"
done

modules=(crc32_generic crc32-pclmul udp_tunnel ip6_udp_tunnel ib_core ib_uverbs rdma_rxe veth
  configfs ib_cm iw_cm rdma_cm rdma_ucm)
: >"$R/ftvm/modules.list"
for m in "${modules[@]}"; do
  f=$(find "$KDIR/lib/modules/$KVER/kernel" -name "$m.ko*" | head -1)
  if [[ -z $f ]]; then
    # Built into this kernel (or absent): /init's insmod would only complain.
    echo "softroce: no module $m.ko in $KVER (built in?)"
    continue
  fi
  case "$f" in
    *.ko) cp "$f" "$R/modules/$m.ko" ;;
    *.ko.xz) xz -dc "$f" >"$R/modules/$m.ko" ;;
    *.ko.zst) zstd -qdc "$f" >"$R/modules/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$R/modules/$m.ko" ;;
  esac
  echo "$m" >>"$R/ftvm/modules.list"
done

# copy_with_libs SRC DEST: SRC into the rootfs at DEST, with the shared libraries ldd names.
copy_with_libs() {
  local src=$1 dest=$2 lib
  mkdir -p "$R$(dirname "$dest")"
  cp -L "$src" "$R$dest"
  while read -r lib; do
    [[ -n $lib && -e $lib && ! -e $R$lib ]] || continue
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
  done < <(ldd "$src" 2>/dev/null | awk '/=>/ && $3 ~ /^\// {print $3} /^\t\// {print $1}')
}
for b in ib_write_lat ibv_devices ibv_devinfo rdma ip; do
  p=$(command -v "$b") || die "$b not found on the host"
  copy_with_libs "$p" "/usr/bin/$b"
done
provider=$(find /usr/lib/x86_64-linux-gnu/libibverbs -name 'librxe-rdmav*.so' | head -1)
[[ -n $provider ]] || die "no librxe provider (ibverbs-providers)"
copy_with_libs "$provider" "$provider"
mkdir -p "$R/etc/libibverbs.d"
cp /etc/libibverbs.d/rxe.driver "$R/etc/libibverbs.d/"
for t in "${tests[@]}"; do
  copy_with_libs "${t#*$'\t'}" "/ftvm/tests/${t%%$'\t'*}"
  strip --strip-debug "$R/ftvm/tests/${t%%$'\t'*}" 2>/dev/null || true
done
if [[ -n $bench_exe ]]; then
  copy_with_libs "$bench_exe" /ftvm/bench
  strip --strip-debug "$R/ftvm/bench" 2>/dev/null || true
fi
echo "root:x:0:0:root:/root:/bin/sh" >"$R/etc/passwd"
echo "root:x:0:" >"$R/etc/group"
printf '127.0.0.1 localhost\n' >"$R/etc/hosts"
cp "$S/init" "$R/init"
cp "$S/guest-run.sh" "$S/lib.sh" "$R/ftvm/"
chmod +x "$R/init" "$R/ftvm/guest-run.sh"
cat >"$R/ftvm/config" <<EOF
BENCH_TRANSPORTS=$BENCH_TRANSPORTS
BENCH_COUNT=$BENCH_COUNT
BENCH_WARMUP=$BENCH_WARMUP
PERF_ITERS=$PERF_ITERS
ROUNDS=$ROUNDS
WIRE_BYTES=$WIRE_BYTES
TEST_TIMEOUT=$TEST_TIMEOUT
BENCH_TIMEOUT=$BENCH_TIMEOUT
PERF_TIMEOUT=$PERF_TIMEOUT
EOF
# The guest powers itself off a little before the host gives up on it.
echo $((VM_TIMEOUT > 60 ? VM_TIMEOUT - 30 : VM_TIMEOUT)) >"$R/ftvm/guest-timeout"
(cd "$R" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 >"$WORK/initramfs.cpio.gz"
echo "softroce: initramfs $(du -h "$WORK/initramfs.cpio.gz" | cut -f1)"

# --- 4. boot and run --------------------------------------------------------------------------
case "$ACCEL" in
  kvm) accel=(-accel kvm -cpu host) ;;
  *) accel=(-accel "tcg,thread=multi" -cpu max) ;;
esac
log "booting the guest ($ACCEL, ${SMP} cpus, ${VM_MEM} MiB, at most ${VM_TIMEOUT} s)"
: >"$OUT/results.txt"
vm_rc=0
timeout --kill-after=10 "$VM_TIMEOUT" qemu-system-x86_64 "${accel[@]}" -m "$VM_MEM" -smp "$SMP" \
  -display none -monitor none -no-reboot -nic none \
  -chardev stdio,id=console,signal=off -serial chardev:console \
  -serial "file:$OUT/results.txt" \
  -kernel "$KDIR/boot/vmlinuz-$KVER" -initrd "$WORK/initramfs.cpio.gz" \
  -append "console=ttyS0 panic=-1 loglevel=4 quiet $KERNEL_ARGS" \
  </dev/null 2>&1 | tee "$OUT/console.log" || vm_rc=$?
((vm_rc == 0)) || echo "softroce: qemu exited with status $vm_rc (124: host timeout ${VM_TIMEOUT} s)"

# --- 5. results -------------------------------------------------------------------------------
log "results"
expected=()
for t in "${tests[@]}"; do expected+=("${t%%$'\t'*}"); done
report_args=(--results "$OUT/results.txt" --out "$OUT" --kernel "$KVER" --perf-iters "$PERF_ITERS"
  --rounds "$ROUNDS")
[[ -z $bench_exe ]] || report_args+=(--expect-bench)
rc=0
python3 -B "$S/report.py" "${report_args[@]}" "${expected[@]}" || rc=$?
echo "softroce: total $((SECONDS - START)) s"
exit "$rc"
