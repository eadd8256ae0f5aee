#!/usr/bin/env bash
# Installs the Debian 12 packages ftvm's build and tests need, skipping those already present.
# Usage: scripts/install-deps.sh [extra-package ...]
set -euo pipefail

packages=(
  build-essential   # cc for C shims and -sys crates
  pkg-config        # finds system libraries (libdpdk, libibverbs)
  ca-certificates
  curl
  protobuf-compiler # protoc, for etcd-client's generated gRPC code (ft-arbiter's etcd backend)
  libprotobuf-dev   # google/protobuf/*.proto, which etcd-client's protos import
  etcd-server       # the real etcd 3.4 that ft-arbiter's etcd tests start on 127.0.0.1
  dpdk              # DPDK 22.11 runtime: EAL/ethdev libraries, PMD plugins (net_memif, net_af_packet) (dpdk-sys)
  dpdk-dev          # dpdk-sys: DPDK test/debug tools (dpdk-testpmd is in dpdk; dpdk-test, dpdk-pdump)
  libdpdk-dev       # dpdk-sys: DPDK headers and libdpdk.pc for pkg-config
  libclang-dev      # dpdk-sys: libclang for bindgen
  libibverbs-dev    # rdma-sys (transport feature rdma): verbs headers and libibverbs
  librdmacm-dev     # rdma-sys: rdma_cm headers and librdmacm
  iproute2          # ip: the veth pairs of the DPDK af_packet/af_xdp tests and bench rows
  chromium          # headless: the bench report's rendering test opens the page and screenshots it
)
packages+=("$@")

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if ((${#missing[@]})); then
  echo "ftvm: installing ${missing[*]}"
  sudo_cmd=()
  [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo_cmd[@]}" apt-get update -qq
  "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    echo "ftvm: cargo is in ~/.cargo/bin; add it to PATH" >&2
  else
    echo "ftvm: no Rust toolchain: install one with rustup (https://rustup.rs), stable channel" >&2
  fi
  exit 1
fi
