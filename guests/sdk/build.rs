//! Ships the SDK's linker script: `ftvm-guest.ld` is copied into this build's `OUT_DIR`, which
//! goes on the linker's search path of every guest that depends on the SDK (link search paths
//! propagate to dependents), so a guest's `-Tftvm-guest.ld` (in `guests/.cargo/config.toml`)
//! finds it wherever the SDK lives.
//!
//! It also stops a guest build that forgot the guest configuration (built from outside
//! `guests/`, say, so that `.cargo/config.toml` did not apply): without it the code would use SSE
//! (which the development hosts cannot run in ring 0) and link as an ordinary Linux program.
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let script = dir.join("ftvm-guest.ld");
    std::fs::copy(&script, out.join("ftvm-guest.ld"))
        .unwrap_or_else(|e| panic!("copying {}: {e}", script.display()));
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");

    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if arch != "x86_64" || features.split(',').any(|f| f == "sse" || f == "sse2") {
        panic!(
            "ftvm-guest: this build lacks the guest configuration (target {arch}, features \
             {features}): build guests from their directory under guests/, e.g. \
             `cd guests/ledger && cargo build --release`, so that guests/.cargo/config.toml \
             applies (a guest crate elsewhere copies that file into its own .cargo/; see \
             guests/sdk/README.md)"
        );
    }
}
