//! Builds the DPDK binding against the system DPDK (Debian 12: `dpdk dpdk-dev libdpdk-dev`,
//! DPDK 22.11) found with pkg-config:
//!
//! 1. `pkg-config --cflags libdpdk` (which includes `-include rte_config.h`; DPDK's headers do
//!    not compile without it) feeds both the C shim and bindgen;
//! 2. `shim/shim.c` is compiled with `cc`: exported wrappers for DPDK's static-inline fast path;
//! 3. bindgen generates declarations for an allowlist only (EAL, ethdev, mbuf/mempool, lcore,
//!    errors, Ethernet header types, a few constants, and the shim), not the whole headers;
//! 4. the libraries `pkg-config --libs libdpdk` names are linked after the shim (rustc links
//!    with `--as-needed`, so only those actually referenced end up in the binary). Poll-mode
//!    drivers (net_memif, net_af_packet, bus_vdev, mempool_ring, ...) are not linked: EAL loads
//!    them at run time from its plugin directory (`RTE_EAL_PMD_PATH`).

use std::env;
use std::path::PathBuf;
use std::process::Command;

const MIN_VERSION: &str = "22.11";
const PACKAGES: &str = "dpdk dpdk-dev libdpdk-dev libclang-dev pkg-config";

fn missing_dpdk(detail: &str) -> ! {
    fail(&format!(
        "DPDK >= {MIN_VERSION} was not found with pkg-config (libdpdk.pc).\n\
         On Debian 12 install the packages: apt-get install {PACKAGES}\n\
         (scripts/install-deps.sh installs them), or point PKG_CONFIG_PATH at another DPDK build.\n\
         pkg-config said: {detail}"
    ))
}

/// Stops the build with `message` (no panic backtrace to bury it).
fn fail(message: &str) -> ! {
    // The headline (first two lines) as warnings, so it is not buried in cargo's output.
    for line in message.lines().take(2) {
        println!("cargo:warning=dpdk-sys: {line}");
    }
    eprintln!("\nerror: dpdk-sys: {message}\n");
    std::process::exit(1);
}

fn pkg_config_cflags() -> Vec<String> {
    let pkg_config = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".to_string());
    let out = match Command::new(&pkg_config)
        .args(["--cflags", "libdpdk"])
        .output()
    {
        Ok(out) => out,
        Err(e) => missing_dpdk(&format!("cannot run {pkg_config}: {e}")),
    };
    if !out.status.success() {
        missing_dpdk(String::from_utf8_lossy(&out.stderr).trim());
    }
    // DPDK's flags contain no quoted paths with spaces; split on whitespace, keeping
    // `-include rte_config.h` as two consecutive arguments.
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=shim/shim.c");
    for var in [
        "PKG_CONFIG",
        "PKG_CONFIG_PATH",
        "PKG_CONFIG_LIBDIR",
        "PKG_CONFIG_SYSROOT_DIR",
        "LIBCLANG_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    // Version check and library list; link metadata is emitted by hand below, after the shim.
    let lib = pkg_config::Config::new()
        .atleast_version(MIN_VERSION)
        .cargo_metadata(false)
        .probe("libdpdk")
        .unwrap_or_else(|e| missing_dpdk(&e.to_string()));
    let cflags = pkg_config_cflags();

    // ---- the C shim
    let mut build = cc::Build::new();
    build
        .file("shim/shim.c")
        .include("shim")
        // The shim is the fast path: optimise it even in debug builds.
        .opt_level(2)
        .warnings(true)
        // DPDK headers trip a few of these; they are not ours to fix.
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations");
    for flag in &cflags {
        build.flag(flag);
    }
    build.compile("ftvm_dpdk_shim");

    // ---- link: the shim archive first (cc emitted it above), then DPDK's shared libraries.
    for path in &lib.link_paths {
        println!("cargo:rustc-link-search=native={}", path.display());
    }
    for name in &lib.libs {
        println!("cargo:rustc-link-lib=dylib={name}");
    }

    // ---- bindgen
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let builder = bindgen::Builder::default()
        .header("shim/shim.h")
        .clang_arg("-Ishim")
        .clang_args(&cflags)
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        // Functions: EAL, ethdev control path, mempool, mbuf pool, lcore, errors, and the shim.
        .allowlist_function("rte_eal_.*")
        .allowlist_function("rte_eth_.*")
        .allowlist_function("rte_pktmbuf_.*")
        .allowlist_function("rte_mempool_.*")
        .allowlist_function("rte_lcore.*")
        .allowlist_function("rte_get_main_lcore")
        .allowlist_function("rte_thread_register")
        .allowlist_function("rte_thread_unregister")
        .allowlist_function("rte_socket_id")
        .allowlist_function("rte_strerror")
        .allowlist_function("rte_ether_.*")
        .allowlist_function("rte_intr_instance_alloc")
        .allowlist_function("rte_intr_fd_set")
        .allowlist_function("rte_intr_type_set")
        .allowlist_function("rte_intr_callback_register")
        .allowlist_function("ftvm_.*")
        // Types the safe layer reads field by field.
        .allowlist_type("rte_ether_hdr")
        .allowlist_type("rte_ether_addr")
        .allowlist_type("rte_eth_conf")
        .allowlist_type("rte_eth_dev_info")
        .allowlist_type("rte_eth_stats")
        .allowlist_type("rte_eth_link")
        // Constants.
        .allowlist_var("RTE_ETHER_.*")
        .allowlist_var("RTE_ETH_LINK_.*")
        .allowlist_var("RTE_PKTMBUF_HEADROOM")
        .allowlist_var("RTE_MBUF_DEFAULT_.*")
        .allowlist_var("RTE_MAX_ETHPORTS")
        .allowlist_var("RTE_MAX_LCORE")
        .allowlist_var("RTE_MEMPOOL_CACHE_MAX_SIZE")
        .allowlist_var("RTE_ETH_NAME_MAX_LEN")
        .allowlist_var("RTE_ETH_DEV_NO_OWNER")
        .allowlist_var("LCORE_ID_ANY")
        .allowlist_var("SOCKET_ID_ANY")
        .allowlist_var("E_RTE_.*")
        // The safe layer only ever handles these through pointers and the shim; keeping them
        // opaque avoids bindgen's trouble with DPDK's packed/cache-aligned unions.
        .opaque_type("rte_mbuf")
        .opaque_type("rte_mempool")
        .derive_default(true)
        .layout_tests(false)
        .generate_comments(false)
        .prepend_enum_name(false);

    // bindgen panics (inside clang-sys) if libclang is missing: say which package provides it.
    let generated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.generate()));
    let bindings = match generated {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => fail(&format!(
            "bindgen could not parse the DPDK headers: {e}\n\
             (needs {PACKAGES}; cflags were {cflags:?})"
        )),
        Err(_) => fail(
            "bindgen failed, most likely because libclang is missing: \
             apt-get install libclang-dev (or set LIBCLANG_PATH)",
        ),
    };
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("writing bindings.rs");
}
