#!/usr/bin/env bash
# Adds soft-RoCE (rdma_rxe) devices on a host whose kernel has rdma_rxe, and prints what perftest
# users and ftvm's RDMA tests need: the device and the GID index of its IPv4 address.
#
# Usage:
#   scripts/softroce-up.sh IFACE [NAME]   modprobe rdma_rxe; rdma link add NAME (rxe0) type rxe
#                                         netdev IFACE; print NAME and IFACE's IPv4 GID index,
#                                         and FTVM_RDMA_{DEV,GID,IP}_A (--side B: _B, the backup)
#   scripts/softroce-up.sh --veth         veth0 10.99.0.1 <-> veth1 10.99.0.2 (policy routing so
#                                         traffic crosses the pair), rxe0@veth0 and rxe1@veth1, and
#                                         the FTVM_RDMA_* variables the RDMA tests and bench read
#   scripts/softroce-up.sh --down         removes what --veth added
# Options: --env FILE   also append the FTVM_RDMA_* lines (KEY=VALUE) to FILE, e.g. "$GITHUB_ENV"
#          --side A|B   which end the IFACE device is for (A primary, B backup; default A)
#
# Then, e.g.:  ib_write_lat -d rxe1 -x GID1 -F &  ib_write_lat -d rxe0 -x GID0 -F 10.99.0.2
#              FTVM_RDMA_DEV_A=rxe0 FTVM_RDMA_GID_A=GID0 ... bench commit --transport rdma
# Needs root (modprobe, rdma link add), iproute2's `rdma`, and a kernel with CONFIG_RDMA_RXE
# (Debian/Ubuntu stock kernels; on Ubuntu cloud kernels install linux-modules-extra-$(uname -r)).
# Kernels without it (like our build machines'): use scripts/softroce-ci.sh, which boots a guest.
set -euo pipefail
S=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=scripts/softroce/lib.sh
. "$S/softroce/lib.sh"

mode=iface iface="" name=rxe0 env_file="" side=A
while (($#)); do
  case "$1" in
    --veth) mode=veth ;;
    --down) mode=down ;;
    --env)
      env_file=${2:?--env needs a file}
      shift
      ;;
    --side)
      side=${2:?--side needs A or B}
      [[ $side == A || $side == B ]] || { echo "softroce-up: --side A or B" >&2; exit 2; }
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
    -*)
      echo "softroce-up: unknown option $1 (see --help)" >&2
      exit 2
      ;;
    *)
      if [[ -z $iface ]]; then iface=$1; else name=$1; fi
      ;;
  esac
  shift
done

die() {
  echo "softroce-up: $*" >&2
  exit 1
}
as_root=()
[[ $(id -u) -eq 0 ]] || as_root=(sudo)
command -v rdma >/dev/null || die "no 'rdma' command: apt-get install iproute2 rdma-core ibverbs-providers ibverbs-utils"

if [[ $mode == down ]]; then
  "${as_root[@]}" bash -c ". '$S/softroce/lib.sh'; softroce_veth_pair_down"
  echo "softroce-up: removed rxe0, rxe1 and the veth pair"
  exit 0
fi

if [[ ! -d /sys/module/rdma_rxe ]]; then
  "${as_root[@]}" modprobe rdma_rxe 2>/dev/null ||
    die "modprobe rdma_rxe failed: this kernel ($(uname -r)) has no soft-RoCE module. On Ubuntu: apt-get install linux-modules-extra-\$(uname -r); kernels built without CONFIG_RDMA_RXE: scripts/softroce-ci.sh runs the RDMA tests in a QEMU guest instead"
fi
# rdma_ucm gives /dev/infiniband/rdma_cm (librdmacm); ib_uverbs gives the verbs devices.
"${as_root[@]}" modprobe ib_uverbs 2>/dev/null || true
"${as_root[@]}" modprobe rdma_ucm 2>/dev/null || true

emit_env() { # KEY=VALUE lines on stdout (and into --env FILE)
  local line
  for line in "$@"; do
    echo "$line"
    [[ -z $env_file ]] || echo "$line" >>"$env_file"
  done
}

if [[ $mode == veth ]]; then
  if [[ ! -e /sys/class/net/veth0 ]]; then
    "${as_root[@]}" bash -c ". '$S/softroce/lib.sh'; softroce_veth_pair" ||
      die "could not set up the veth pair (root needed)"
  fi
  "${as_root[@]}" bash -c ". '$S/softroce/lib.sh'; softroce_rxe_add rxe0 veth0 && softroce_rxe_add rxe1 veth1" ||
    die "rdma link add rxe0/rxe1 failed"
  g0=$(softroce_wait_gid rxe0 "$SOFTROCE_IP_A") || die "rxe0 has no GID for $SOFTROCE_IP_A"
  g1=$(softroce_wait_gid rxe1 "$SOFTROCE_IP_B") || die "rxe1 has no GID for $SOFTROCE_IP_B"
  rdma link show
  echo "# rxe0@veth0 $SOFTROCE_IP_A GID index $g0 <-> rxe1@veth1 $SOFTROCE_IP_B GID index $g1"
  echo "# perftest: ib_write_lat -d rxe1 -x $g1 -F &  ib_write_lat -d rxe0 -x $g0 -F $SOFTROCE_IP_B"
  emit_env "FTVM_RDMA_DEV_A=rxe0" "FTVM_RDMA_GID_A=$g0" "FTVM_RDMA_IP_A=$SOFTROCE_IP_A" \
    "FTVM_RDMA_DEV_B=rxe1" "FTVM_RDMA_GID_B=$g1" "FTVM_RDMA_IP_B=$SOFTROCE_IP_B"
  exit 0
fi

[[ -n $iface ]] || die "usage: softroce-up.sh IFACE [NAME] | --veth | --down (see --help)"
[[ -e /sys/class/net/$iface ]] || die "no network interface $iface"
if [[ -e /sys/class/infiniband/$name ]]; then
  echo "softroce-up: $name already exists"
else
  "${as_root[@]}" rdma link add "$name" type rxe netdev "$iface" || die "rdma link add $name type rxe netdev $iface failed"
fi
rdma link show "$name/1"
ip4=$(ip -4 -o addr show dev "$iface" | awk '{split($4, a, "/"); print a[1]; exit}')
if [[ -z $ip4 ]]; then
  echo "softroce-up: $iface has no IPv4 address; its GIDs:"
  grep -H . /sys/class/infiniband/"$name"/ports/1/gids/* 2>/dev/null | grep -v ':0000:0000:0000:0000:0000:0000:0000:0000$' || true
  exit 0
fi
gid=$(softroce_wait_gid "$name" "$ip4") || die "$name has no GID for $ip4"
echo "# $name on $iface ($ip4): RoCE v2 GID index $gid"
echo "# perftest: ib_write_lat -d $name -x $gid -F [server-ip]"
echo "# ftvm (side $side: A the primary's device, B the backup's and its address):"
emit_env "FTVM_RDMA_DEV_$side=$name" "FTVM_RDMA_GID_$side=$gid" "FTVM_RDMA_IP_$side=$ip4"
