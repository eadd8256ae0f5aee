#!/usr/bin/env bash
# Runs the ring's unit tests (including its two-thread test) under miri, which checks every
# raw-pointer access for out-of-bounds, alignment and data races. Needs the nightly toolchain
# with the miri and rust-src components; installs those components if rustup can.
#
# A failing test fails this script. A machine where the components cannot be installed (no
# route to the Rust distribution server) is reported loudly and not treated as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

unavailable() {
  echo "miri-ring: NOT RUN: $*" >&2
  echo "miri-ring: the ring's miri check did not run on this machine; run scripts/miri-ring.sh where rustup can install nightly's miri" >&2
  exit 0
}

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "miri-ring: no nightly toolchain; installing it with rustup"
  rustup toolchain install nightly --profile minimal || unavailable "cannot install the nightly toolchain"
fi
if ! cargo +nightly miri --version >/dev/null 2>&1 || \
   ! rustup +nightly component list --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "miri-ring: adding the miri and rust-src components to nightly"
  rustup component add --toolchain nightly miri rust-src || unavailable "cannot install nightly's miri and rust-src"
fi
# Separate target dir: miri's artefacts must not invalidate the stable build's.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/miri"
cargo +nightly miri setup >/dev/null 2>&1 || unavailable "cargo miri setup failed (building miri's sysroot)"
MIRIFLAGS="${MIRIFLAGS:-} -Zmiri-disable-isolation" \
  cargo +nightly miri test -p transport --lib -- ring:: region::
