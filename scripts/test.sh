#!/usr/bin/env bash
# The project's test command (README, CI): installs what the tests need, then runs formatting,
# lints, the whole test suite, the RDMA medium on soft-RoCE (in a QEMU guest), and the ring under miri;
# then prints the current commit/raw and FT/unreplicated ratios (reported, not enforced).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

scripts/install-deps.sh
# Hugepages + hugetlbfs (net_af_xdp) and the benchmark's veth pairs; a no-op without root.
scripts/dpdk-setup.sh

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "the guest programs (guests/, a workspace of its own): cargo fmt --check, cargo clippy"
(cd guests && cargo fmt --all -- --check && cargo clippy --release -- -D warnings)

step "cargo clippy --workspace --all-targets -- -D warnings (and with the DPDK and RDMA media)"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p transport --features dpdk --all-targets -- -D warnings
cargo clippy -p transport --features rdma --all-targets -- -D warnings
cargo clippy -p bench --features dpdk --all-targets -- -D warnings
cargo clippy -p bench --features rdma --all-targets -- -D warnings
cargo clippy -p bench --features trace --all-targets -- -D warnings
cargo clippy -p ftvm --features dpdk --all-targets -- -D warnings
cargo clippy -p ftvm --features rdma --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace
cargo test -p transport --features trace --lib trace

step "a guest author's path: build the ledger example, check it, run it under FT and kill its primary; the interrupt-driven kvstore for 100,000 requests"
scripts/guest-author.sh target/debug/ftvm

step "a fault campaign: 100 faults on a self-healing pair, spread over the file, server and etcd arbiters"
scripts/campaign.sh --faults 100 --arbiter all

step "the DPDK medium: two processes over net_memif (no root) and net_af_packet on a veth pair (root); an FT pair over DPDK"
cargo test -p transport --features dpdk
cargo test -p bench --features dpdk
cargo test -p ftvm --features dpdk --test ft_dpdk

step "the RDMA medium on soft-RoCE: tests, commit bench and ib_write_lat in a QEMU guest (rdma_rxe)"
scripts/softroce-ci.sh

step "miri: the ring's unit tests under the interpreter's UB and data-race checks"
scripts/miri-ring.sh

step "the current numbers (reported, not enforced): output commit against the raw medium in alternating rounds, and ftvm demo (FT/unreplicated throughput, commit latency, ACK kicks)"
cargo build --release -p bench -p ftvm
target/release/bench commit --transport tcp-spin,shm --rounds 3 --count 20000 \
    || echo "(bench commit failed: a measurement, not a test)"
target/release/ftvm demo --requests 3000 \
    || echo "(ftvm demo failed: a measurement, not a test)"
