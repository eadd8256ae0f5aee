//! Builds the guest program (`vmm/guest`, its own workspace) twice — the deterministic key-value
//! service and its deliberately non-deterministic `nondet` variant — and leaves the static ELF
//! executables in `$OUT_DIR/guest.elf` and `$OUT_DIR/guest-nondet.elf` for `include_bytes!`.
//!
//! The inner cargo runs with `vmm/guest` as its working directory so that the guest's own
//! `.cargo/config.toml` (target, static relocation model) applies, and with every flag- or
//! wrapper-carrying variable of the outer build removed, so that e.g. coverage or sanitizer
//! RUSTFLAGS, `cargo clippy`'s wrapper or a custom target directory never leak into the guest.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The only target installed on the development machines; the guest is a freestanding static
/// executable for it (no libc, own linker script).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const GUEST_BIN: &str = "ftvm-guest";

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guest_dir = manifest_dir.join("guest");
    let target_dir = out_dir.join("guest-target");

    for path in [
        "guest/Cargo.toml",
        "guest/Cargo.lock",
        "guest/build.rs",
        "guest/link.ld",
        "guest/.cargo/config.toml",
        "guest/src",
        // Shared with the guest through `#[path]`.
        "src/layout.rs",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest_dir.join(path).display()
        );
    }

    build_guest(&guest_dir, &target_dir, None, &out_dir.join("guest.elf"));
    build_guest(
        &guest_dir,
        &target_dir,
        Some("nondet"),
        &out_dir.join("guest-nondet.elf"),
    );
}

fn build_guest(guest_dir: &Path, target_dir: &Path, feature: Option<&str>, dest: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guest_dir)
        .arg("build")
        .arg("--release")
        .arg("--offline")
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--manifest-path")
        .arg(guest_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if let Some(f) = feature {
        cmd.arg("--features").arg(f);
    }
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = matches!(
            key,
            "RUSTFLAGS"
                | "RUSTDOCFLAGS"
                | "RUSTC_WRAPPER"
                | "RUSTC_WORKSPACE_WRAPPER"
                | "CLIPPY_ARGS"
                | "CLIPPY_CONF_DIR"
                | "CARGO_INCREMENTAL"
                | "CARGO_MANIFEST_DIR"
                | "CARGO_PRIMARY_PACKAGE"
                | "CARGO_TARGET_DIR"
        ) || key.starts_with("CARGO_ENCODED_")
            || key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_PROFILE_")
            || key.starts_with("CARGO_TARGET_")
            || key.starts_with("CARGO_FEATURE_")
            || key.starts_with("CARGO_CFG_")
            || key.starts_with("CARGO_PKG_");
        if leaks {
            cmd.env_remove(key);
        }
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the guest: {e}"));
    assert!(
        status.success(),
        "building the guest program ({}) failed: {status}",
        feature.unwrap_or("default")
    );
    let built = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join(GUEST_BIN);
    std::fs::copy(&built, dest)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", built.display(), dest.display()));
}
