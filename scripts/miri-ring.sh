#!/usr/bin/env bash
# Runs the ring's unit tests (including its two-thread test) under miri, which checks every
# raw-pointer access for out-of-bounds, alignment and data races. Needs the nightly toolchain
# with the miri and rust-src components; installs those components if rustup can.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  echo "miri-ring: no nightly toolchain; installing it with rustup"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly miri --version >/dev/null 2>&1 || \
   ! rustup +nightly component list --installed 2>/dev/null | grep -q '^rust-src'; then
  echo "miri-ring: adding the miri and rust-src components to nightly"
  rustup component add --toolchain nightly miri rust-src
fi
# Separate target dir: miri's artefacts must not invalidate the stable build's.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/miri"
MIRIFLAGS="${MIRIFLAGS:-} -Zmiri-disable-isolation" \
  cargo +nightly miri test -p transport --lib -- ring:: region::
