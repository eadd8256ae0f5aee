#!/usr/bin/env bash
# Sets up what the DPDK media need on this machine (root; idempotent: safe to run again):
#   - 2 MiB hugepages (at least $FTVM_HUGEPAGES, default 128) and hugetlbfs on /dev/hugepages,
#     for net_af_xdp (net_memif and net_af_packet run with --no-huge);
#   - the veth pairs the benchmark uses: ftvm-ap0 <-> ftvm-ap1 (net_af_packet) and
#     ftvm-xd0 <-> ftvm-xd1 (net_af_xdp), up, IPv6 off (no router solicitations on the link).
# The tests create their own uniquely named veth pairs and remove them afterwards.
# `bench commit/throughput --transport dpdk-af-packet,dpdk-af-xdp` runs this script itself
# (bench/src/raw/memif/ports.rs, with FTVM_HUGEPAGES set to what its EAL needs): this is the
# one place these steps live.
# Without root this prints what it cannot do and exits 0 (the tests that need it then say so).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
    echo "dpdk-setup: not root: no hugepages, no veth pairs (the af_packet/af_xdp tests and rows need root)" >&2
    exit 0
fi

want=${FTVM_HUGEPAGES:-128}
have=$(cat /proc/sys/vm/nr_hugepages)
if [ "$have" -lt "$want" ]; then
    echo "$want" > /proc/sys/vm/nr_hugepages || true
    echo "dpdk-setup: hugepages $have -> $(cat /proc/sys/vm/nr_hugepages)"
fi
mkdir -p /dev/hugepages
if ! mountpoint -q /dev/hugepages; then
    mount -t hugetlbfs none /dev/hugepages
    echo "dpdk-setup: mounted hugetlbfs on /dev/hugepages"
fi

if ! command -v ip > /dev/null; then
    echo "dpdk-setup: 'ip' (iproute2) is missing: apt-get install iproute2" >&2
    exit 1
fi

veth_pair() {
    local a=$1 b=$2
    if ! ip link show "$a" > /dev/null 2>&1; then
        ip link add "$a" type veth peer name "$b"
        echo "dpdk-setup: created veth pair $a <-> $b"
    fi
    for i in "$a" "$b"; do
        sysctl -qw "net.ipv6.conf.$i.disable_ipv6=1" > /dev/null 2>&1 || true
        ip link set "$i" up
    done
}

veth_pair ftvm-ap0 ftvm-ap1
veth_pair ftvm-xd0 ftvm-xd1
