//! The `ftvm` binary's command line.

mod common;

use std::process::Command;

fn ftvm() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
}

#[test]
fn formats_prints_the_versions_this_build_speaks() {
    let out = ftvm().arg("formats").output().expect("run ftvm");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!(
        "log frame format version {}",
        logfmt::FORMAT_VERSION
    )));
    assert!(text.contains(&format!(
        "ring layout version {}",
        transport::ring::RING_LAYOUT_VERSION
    )));
}

#[test]
fn unknown_subcommands_fail_with_usage() {
    let out = ftvm().arg("no-such-command").output().expect("run ftvm");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Usage"));
}

#[test]
fn arbiter_serve_answers_an_authenticated_client_and_stops_on_sigterm() {
    use std::io::BufReader;
    use std::process::Stdio;

    let scratch = common::scratch("ftvm-cli-arbiter-");
    let dir = scratch.path();
    let key = common::write_key(dir, "psk", "cli-test-arbiter-key-0123456789");
    let mut child = ftvm()
        .args(["arbiter", "serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--key-file")
        .arg(&key)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let ready = common::ready::find(&mut BufReader::new(child.stdout.take().expect("stdout")))
        .expect("stdout")
        .expect("the arbiter's readiness line");
    assert_eq!(ready.role, "arbiter");
    let addr = ready.addr;
    let psk = ft_arbiter::PreSharedKey::from_file(&key).expect("psk");
    let mut client = ft_arbiter::ServerArbiter::new(addr, psk);
    use ft_arbiter::Arbiter;
    let first = client
        .test_and_set("pair-1", "backup-a", 1)
        .expect("decision");
    assert_eq!(first, ft_arbiter::Decision::Won { epoch: 2 });
    let second = client
        .test_and_set("pair-1", "primary-b", 1)
        .expect("decision");
    assert!(
        matches!(second, ft_arbiter::Decision::Lost { epoch: 2, .. }),
        "{second:?}"
    );
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
}

#[test]
fn arbiter_init_creates_a_file_store_the_replicas_can_use() {
    use ft_arbiter::{Arbiter, Decision, FileArbiter};

    let dir = std::env::temp_dir().join(format!("ftvm-cli-init-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let share = dir.join("share");
    let spec = format!("file:{}", share.display());
    // Before init, a replica finds no store.
    assert!(FileArbiter::open(&share).is_err());
    let out = ftvm()
        .args(["arbiter", "init", &spec])
        .output()
        .expect("run ftvm");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("created arbiter store"));
    let mut a = FileArbiter::open(&share).expect("the store init created");
    assert_eq!(
        a.test_and_set("pair-1", "backup-a", 1).ok(),
        Some(Decision::Won { epoch: 2 })
    );
    // Again (the other host, say): the store and its decision stay.
    let out = ftvm()
        .args(["arbiter", "init", &spec])
        .output()
        .expect("run ftvm");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("already exists"));
    let mut b = FileArbiter::open(&share).expect("store");
    assert_eq!(
        b.test_and_set("pair-1", "primary-b", 1).ok(),
        Some(Decision::Lost {
            winner: "backup-a".into(),
            epoch: 2
        })
    );
    // A path that cannot be a directory: a clear error naming it, and nothing created.
    let file = dir.join("a-file");
    std::fs::write(&file, b"not a directory").expect("write");
    let out = ftvm()
        .args(["arbiter", "init", &format!("file:{}", file.display())])
        .output()
        .expect("run ftvm");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&file.display().to_string()) && err.contains("not a directory"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).expect("read"), b"not a directory");
    // Other kinds of arbiter need no init, and say so.
    let out = ftvm()
        .args(["arbiter", "init", "server:127.0.0.1:7500"])
        .output()
        .expect("run ftvm");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("needs no init"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_etcd_arbiter_needs_no_init_or_says_how_to_rebuild() {
    let out = ftvm()
        .args(["arbiter", "init", "etcd:http://127.0.0.1:2379"])
        .output()
        .expect("run ftvm");
    if cfg!(feature = "etcd") {
        assert!(out.status.success(), "{out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("needs no init"));
    } else {
        // A build without the feature refuses the spec and names the feature.
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--features etcd"), "{err}");
    }
}

#[test]
fn a_missing_dev_kvm_is_a_clear_error() {
    // Hide /dev (and with it /dev/kvm) in a private mount namespace (needs root, as our test
    // machines have).
    let scratch = common::scratch("ftvm-cli-nokvm-");
    let key = common::write_key(scratch.path(), "psk", "cli-test-no-kvm-key-0123456789");
    let script = format!(
        "mount -t tmpfs none /dev && exec {} primary --unreplicated --service 127.0.0.1:0 --key-file {}",
        env!("CARGO_BIN_EXE_ftvm"),
        key.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("run unshare (util-linux)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail without KVM");
    assert!(
        stderr.contains("/dev/kvm") && stderr.contains("is KVM available?"),
        "unclear error: {stderr}"
    );
}

#[test]
fn a_key_file_readable_by_others_is_refused_naming_file_and_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = common::scratch("ftvm-cli-key-");
    let key = common::write_key(dir.path(), "psk", "cli-test-open-key-0123456789");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = ftvm()
        .args(["front", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(&key)
        .output()
        .expect("run ftvm front");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a 0644 key must be refused: {stderr}"
    );
    assert!(
        stderr.contains(&format!(
            "permissions 0644 for '{}' are too open",
            key.display()
        )),
        "unclear error: {stderr}"
    );
    // The same file, owner-only, is accepted (the front starts and says so).
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let mut child = ftvm()
        .args(["front", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ftvm front");
    // Kept open: the front prints its statistics when it stops.
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let ready = common::ready::find(&mut stdout).expect("stdout");
    assert!(
        ready.as_ref().is_some_and(|r| r.role == "front"),
        "front said {ready:?}"
    );
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(child.wait().expect("wait").success());
}

/// `ftvm client --workload ledger` against a primary running the ledger (unreplicated: the
/// client's side is what this tests): 8 requests in flight, never two on one account and an
/// audit alone, every answer and the read-back checked against the ledger model.
#[test]
fn the_ledger_client_keeps_a_window_of_requests_and_checks_them_all() {
    let dir = common::scratch("ftvm-cli-ledger-");
    let key = common::write_key(dir.path(), "psk", "cli-test-ledger-key-0123456789");
    let args: Vec<String> = ["primary", "--guest", "ledger", "--unreplicated"]
        .into_iter()
        .map(String::from)
        .chain(["--service".into(), "127.0.0.1:0".into()])
        .chain(["--key-file".into(), key.display().to_string()])
        .collect();
    let (mut primary, ready) = common::Proc::start(env!("CARGO_BIN_EXE_ftvm"), &args);
    let ready = ready.unwrap_or_else(|| panic!("the primary did not start: {}", primary.log()));
    let out = ftvm()
        .args(["client", "--workload", "ledger", "--service", &ready.addr])
        .args([
            "--requests",
            "3000",
            "--keys",
            "16",
            "--window",
            "8",
            "--verify",
        ])
        .output()
        .expect("run ftvm client");
    let v = common::client_ok(out);
    assert_eq!(v["responses_ok"], 3000, "{v}");
    assert_eq!(v["keys_verified"], 17, "16 accounts and the audit: {v}");
    primary.signal(libc::SIGTERM);
    assert_eq!(
        primary.wait(std::time::Duration::from_secs(20)),
        Some(0),
        "{}",
        primary.log()
    );
}

/// The built-in guests written to files, for the commands that take an image file.
fn guest_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let kv = dir.join("kvstore.elf");
    let nd = dir.join("nondet.elf");
    std::fs::write(&kv, vmm::vm::GUEST_IMAGE).expect("write kvstore.elf");
    std::fs::write(&nd, vmm::vm::GUEST_NONDET_IMAGE).expect("write nondet.elf");
    (kv, nd)
}

#[test]
fn check_guest_passes_kvstore_and_lists_the_rdtsc_of_nondet() {
    let dir = common::scratch("ftvm-cli-check-");
    let (kv, nd) = guest_files(dir.path());

    let out = ftvm().arg("check-guest").arg(&kv).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("no findings"), "{text}");
    assert_eq!(text.lines().count(), 1, "one summary line: {text}");

    // The rdtsc of the nondet guest, at the address of its bytes.
    let elf = vmm::image::parse(vmm::vm::GUEST_NONDET_IMAGE).expect("nondet parses");
    let code = elf.segments.iter().find(|s| s.executable).expect("code");
    let at = code.addr
        + code
            .data
            .windows(2)
            .position(|w| w == [0x0f, 0x31])
            .expect("rdtsc bytes") as u64;
    let out = ftvm().arg("check-guest").arg(&nd).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines().next().is_some_and(|l| l
            == format!(
                "{at:#x}  rdtsc  reads the host's time-stamp counter, which differs between \
                 primary and backup"
            )),
        "{text}"
    );
    assert!(text.contains("1 finding(s)"), "{text}");

    let out = ftvm()
        .args(["check-guest", "--json"])
        .arg(&nd)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["passes"], false, "{v}");
    assert_eq!(v["findings"][0]["mnemonic"], "rdtsc", "{v}");
    assert_eq!(v["findings"][0]["addr"], at, "{v}");
    assert_eq!(
        v["sha256"],
        vmm::migrate::hex(&vmm::migrate::image_digest(vmm::vm::GUEST_NONDET_IMAGE))
    );

    // Not an image: exit 2, naming the file and the fault.
    let bad = dir.path().join("notes.txt");
    std::fs::write(&bad, "not an ELF file").expect("write");
    let out = ftvm().arg("check-guest").arg(&bad).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&bad.display().to_string()) && err.contains("not an ELF file"),
        "{err}"
    );
    let out = ftvm()
        .args(["check-guest", "--json"])
        .arg(dir.path().join("missing.elf"))
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot read")),
        "{v}"
    );
}

#[test]
fn primary_refuses_a_guest_that_fails_the_check_unless_told_to_skip_it() {
    let dir = common::scratch("ftvm-cli-refuse-");
    let key = common::write_key(dir.path(), "psk", "cli-test-guest-check-key-0123");
    let (kv, nd) = guest_files(dir.path());
    let base = |extra: &[&std::ffi::OsStr]| {
        let mut c = ftvm();
        c.args(["primary", "--unreplicated", "--service", "127.0.0.1:0"])
            .arg("--key-file")
            .arg(&key)
            .args(extra);
        c
    };
    for guest in [
        vec!["--guest".as_ref(), "nondet".as_ref()],
        vec!["--guest-image".as_ref(), nd.as_os_str()],
    ] {
        let out = base(&guest).output().expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{guest:?} must be refused: {err}");
        assert!(
            err.contains("fails the determinism check") && err.contains("rdtsc"),
            "{guest:?}: {err}"
        );
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains("FTVM-READY"),
            "a refused primary never says it is ready"
        );
    }
    // A malformed image file is refused, naming the file and the fault.
    let bad = dir.path().join("bad.elf");
    std::fs::write(&bad, &vmm::vm::GUEST_IMAGE[..100]).expect("write");
    let out = base(&["--guest-image".as_ref(), bad.as_os_str()])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.elf") && err.contains("truncated"),
        "{err}"
    );

    // With --skip-guest-check it starts, warning with the findings; the kvstore file starts
    // without a word about them.
    for (guest, warns) in [
        (
            vec![
                "--guest".as_ref(),
                "nondet".as_ref(),
                "--skip-guest-check".as_ref(),
            ],
            true,
        ),
        (vec!["--guest-image".as_ref(), kv.as_os_str()], false),
    ] {
        let args: Vec<String> = base(&guest)
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let (mut p, ready) = common::Proc::start(env!("CARGO_BIN_EXE_ftvm"), &args);
        assert!(ready.is_some(), "{guest:?}:\n{}", p.log());
        p.signal(libc::SIGTERM);
        assert_eq!(
            p.wait(std::time::Duration::from_secs(30)),
            Some(0),
            "{}",
            p.log()
        );
        let log = p.log();
        assert_eq!(
            log.contains("--skip-guest-check") && log.contains("rdtsc"),
            warns,
            "{guest:?}:\n{log}"
        );
    }
}
