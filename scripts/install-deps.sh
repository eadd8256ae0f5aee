#!/usr/bin/env bash
# Installs the Debian 12 packages ftvm's build and tests need, skipping those already present.
# Usage: scripts/install-deps.sh [extra-package ...]
set -euo pipefail

packages=(
  build-essential   # cc for C shims and -sys crates
  pkg-config        # finds system libraries (libdpdk, libibverbs)
  ca-certificates
  curl
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
