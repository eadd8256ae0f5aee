//! Builds the guest programs of `guests/` (their own workspace, on the guest SDK) — the
//! deterministic key-value service, its deliberately non-deterministic `nondet` variant and the
//! ledger — and leaves the static ELF executables in `$OUT_DIR/guest.elf`,
//! `$OUT_DIR/guest-nondet.elf` and `$OUT_DIR/guest-ledger.elf` for `include_bytes!`.
//!
//! The inner cargo runs with `guests/` as its working directory so that the guests' own
//! `.cargo/config.toml` (target, static relocation model, no SSE, the SDK's linker script)
//! applies, and with every flag- or wrapper-carrying variable of the outer build removed, so that
//! e.g. coverage or sanitizer RUSTFLAGS, `cargo clippy`'s wrapper or a custom target directory
//! never leak into the guests.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The only target installed on the development machines; guests are freestanding static
/// executables for it (no libc, the SDK's linker script).
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// One guest build: the package, its features, and where its ELF goes in `OUT_DIR`.
struct Guest {
    package: &'static str,
    features: Option<&'static str>,
    elf: &'static str,
}

/// Built in this order, one cargo run each (the `nondet` build replaces the kvstore binary in the
/// target directory, so each is copied out before the next).
const GUESTS: &[Guest] = &[
    Guest {
        package: "ftvm-kvstore",
        features: None,
        elf: "guest.elf",
    },
    Guest {
        package: "ftvm-kvstore",
        features: Some("nondet"),
        elf: "guest-nondet.elf",
    },
    Guest {
        package: "ftvm-ledger",
        features: None,
        elf: "guest-ledger.elf",
    },
    Guest {
        package: "ftvm-kvstore",
        features: Some("polling"),
        elf: "guest-polling.elf",
    },
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let guests_dir = manifest_dir
        .parent()
        .expect("vmm's parent directory")
        .join("guests");
    let target_dir = out_dir.join("guest-target");

    // Sources only: `guests/target` (a guest author's own builds) must not rerun this.
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "sdk/Cargo.toml",
        "sdk/build.rs",
        "sdk/ftvm-guest.ld",
        // Includes abi.rs, which vmm compiles as `layout` too.
        "sdk/src",
        "kvstore/Cargo.toml",
        "kvstore/src",
        "ledger/Cargo.toml",
        "ledger/src",
    ] {
        println!("cargo:rerun-if-changed={}", guests_dir.join(path).display());
    }

    for guest in GUESTS {
        build_guest(&guests_dir, &target_dir, guest);
        let built = target_dir
            .join(GUEST_TARGET)
            .join("release")
            .join(guest.package);
        let dest = out_dir.join(guest.elf);
        std::fs::copy(&built, &dest).unwrap_or_else(|e| {
            panic!("cannot copy {} to {}: {e}", built.display(), dest.display())
        });
    }
}

fn build_guest(guests_dir: &Path, target_dir: &Path, guest: &Guest) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(guests_dir)
        .arg("build")
        .arg("--release")
        .arg("--offline")
        .arg("--target")
        .arg(GUEST_TARGET)
        .arg("--manifest-path")
        .arg(guests_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--package")
        .arg(guest.package);
    if let Some(f) = guest.features {
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
        .unwrap_or_else(|e| panic!("cannot run cargo to build the guest programs: {e}"));
    assert!(
        status.success(),
        "building the guest program {} ({}) failed: {status}",
        guest.package,
        guest.features.unwrap_or("default features")
    );
}
