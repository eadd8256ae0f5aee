# shellcheck shell=sh
# Soft-RoCE helpers shared by the QEMU guest (busybox sh) and scripts/softroce-up.sh (bash).
# POSIX sh only. Callers may set IP_CMD (the guest needs /usr/bin/ip: busybox's own `ip` applet
# shadows iproute2's), RDMA_CMD and SYSCTL_CMD.

IP_CMD=${IP_CMD:-ip}
RDMA_CMD=${RDMA_CMD:-rdma}
SYSCTL_CMD=${SYSCTL_CMD:-sysctl}

# softroce_gid_idx DEV IPV4 -> prints the index of DEV's port-1 RoCE v2 GID that maps IPV4
# (::ffff:a.b.c.d), the number perftest's -x and the tests' FTVM_RDMA_GID_* want.
softroce_gid_idx() {
  _dev=$1
  _hex=$(echo "$2" | awk -F. '{printf "%02x%02x:%02x%02x", $1, $2, $3, $4}')
  for _g in /sys/class/infiniband/"$_dev"/ports/1/gids/*; do
    [ -r "$_g" ] || continue
    if grep -q "0000:0000:0000:0000:0000:ffff:$_hex" "$_g" 2>/dev/null; then
      # RoCE v1 and v2 share the GID value; prefer the v2 entry when the type is readable.
      _i=$(basename "$_g")
      _t=/sys/class/infiniband/$_dev/ports/1/gid_attrs/types/$_i
      if [ -r "$_t" ] && ! grep -qi 'v2' "$_t" 2>/dev/null; then continue; fi
      echo "$_i"
      return 0
    fi
  done
  return 1
}

# softroce_wait_gid DEV IPV4: the GID table fills asynchronously after `rdma link add`.
softroce_wait_gid() {
  _n=0
  while [ "$_n" -lt 100 ]; do
    softroce_gid_idx "$1" "$2" && return 0
    sleep 0.1
    _n=$((_n + 1))
  done
  echo "softroce: no RoCE GID for $2 on $1 after 10 s" >&2
  return 1
}

# softroce_veth_pair: veth0 10.99.0.1/24 <-> veth1 10.99.0.2/24 in one network namespace, with
# policy routing so traffic between the two local addresses really crosses the veth wire
# (rxe devices in separate namespaces do not complete RDMA on Debian 12's 6.1 kernel).
SOFTROCE_IP_A=10.99.0.1
SOFTROCE_IP_B=10.99.0.2
softroce_veth_pair() {
  $IP_CMD link add veth0 type veth peer name veth1 || return 1
  $IP_CMD addr add "$SOFTROCE_IP_A/24" dev veth0
  $IP_CMD addr add "$SOFTROCE_IP_B/24" dev veth1
  $IP_CMD link set veth0 up
  $IP_CMD link set veth1 up
  for _c in all default veth0 veth1; do
    $SYSCTL_CMD -qw "net.ipv4.conf.$_c.accept_local=1" "net.ipv4.conf.$_c.rp_filter=0" >/dev/null
  done
  # Locally generated packets to the peer address leave through the other end of the pair,
  # instead of being short-cut through the local table.
  $IP_CMD rule add pref 10 to "$SOFTROCE_IP_B" iif lo lookup 100
  $IP_CMD rule add pref 11 to "$SOFTROCE_IP_A" iif lo lookup 101
  $IP_CMD rule add pref 100 lookup local
  $IP_CMD rule del pref 0 lookup local
  $IP_CMD route add "$SOFTROCE_IP_B" dev veth0 src "$SOFTROCE_IP_A" table 100
  $IP_CMD route add "$SOFTROCE_IP_A" dev veth1 src "$SOFTROCE_IP_B" table 101
}

# softroce_veth_pair_down: undoes softroce_veth_pair (and any rxe devices on it).
softroce_veth_pair_down() {
  $RDMA_CMD link delete rxe0 2>/dev/null
  $RDMA_CMD link delete rxe1 2>/dev/null
  $IP_CMD link del veth0 2>/dev/null
  $IP_CMD rule del pref 10 2>/dev/null
  $IP_CMD rule del pref 11 2>/dev/null
  $IP_CMD rule show | grep -q '^0:' || $IP_CMD rule add pref 0 lookup local
  $IP_CMD rule del pref 100 2>/dev/null
  $IP_CMD route flush table 100 2>/dev/null
  $IP_CMD route flush table 101 2>/dev/null
  return 0
}

# softroce_rxe_add NAME NETDEV: an rxe device on NETDEV (no-op when NAME already exists).
softroce_rxe_add() {
  [ -e "/sys/class/infiniband/$1" ] && return 0
  $RDMA_CMD link add "$1" type rxe netdev "$2"
}
