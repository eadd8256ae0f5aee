//! Helpers shared by the `ftvm` binary's integration tests (each test crate uses a part).
#![allow(dead_code)]

/// The readiness line `ftvm` processes print, and its parser (the binary's own module).
#[path = "../../src/ready.rs"]
pub mod ready;

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Writes a pre-shared key file `dir/name` readable by its owner only (0600): `ftvm` refuses a
/// key file that group or others can read.
pub fn write_key(dir: &Path, name: &str, key: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .and_then(|mut f| f.write_all(key.as_bytes()))
        .unwrap_or_else(|e| panic!("writing key file {}: {e}", path.display()));
    path
}

/// A private scratch directory (0700), removed when dropped.
pub fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("scratch directory {prefix}: {e}"))
}

/// An `ftvm` child process, killed on drop.
pub struct Proc {
    pub child: std::process::Child,
    /// Its stderr, collected by a thread (the log lines).
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
    log_thread: Option<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Starts `ftvm ARGS` and waits for its readiness line (`None` if it exited first, with
    /// the process kept for its exit status and log).
    pub fn start(bin: &str, args: &[String]) -> (Proc, Option<ready::Ready>) {
        let (p, ready) = Proc::spawn(bin, args);
        let ready = ready.recv().ok().flatten();
        (p, ready)
    }

    /// Starts `ftvm ARGS` without waiting: its readiness line (or `None` when its stdout
    /// closes without one) arrives on the receiver.
    pub fn spawn(
        bin: &str,
        args: &[String],
    ) -> (Proc, std::sync::mpsc::Receiver<Option<ready::Ready>>) {
        use std::io::{BufRead, BufReader, Read};
        use std::process::{Command, Stdio};
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ftvm");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err = child.stderr.take().expect("stderr");
        let sink = log.clone();
        let log_thread = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut l = sink
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(ready::find(&mut reader).ok().flatten());
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        let p = Proc {
            child,
            log,
            log_thread: Some(log_thread),
        };
        (p, rx)
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid")
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Its exit code within `within` (-1: killed by a signal), or `None`.
    pub fn wait(&mut self, within: std::time::Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                // Its whole log, up to its last line.
                if let Some(t) = self.log_thread.take() {
                    let _ = t.join();
                }
                return Some(st.code().unwrap_or(-1));
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Waits until its log contains `what` (`false` after `within`, or if it exited first).
    pub fn wait_for_log(&mut self, what: &str, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if self.log().contains(what) {
                return true;
            }
            if std::time::Instant::now() >= deadline
                || self.child.try_wait().ok().flatten().is_some()
            {
                return self.log().contains(what);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a pair runs in: a private directory, the pair's key file (0600), a file arbiter store
/// and an in-process service front.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub key: PathBuf,
    pub arbiter: ft_arbiter::ArbiterSpec,
    pub front: vmm::service::Front,
}

impl Site {
    pub fn new(prefix: &str) -> Site {
        let dir = scratch(prefix);
        let key = write_key(
            dir.path(),
            "psk",
            &format!("test-key-{:032x}", rand::random::<u128>()),
        );
        let arbiter = ft_arbiter::ArbiterSpec::File(dir.path().join("store"));
        arbiter.init().expect("arbiter store");
        let psk = transport::PreSharedKey::from_file(&key).expect("key");
        let front = vmm::service::Front::bind(([127, 0, 0, 1], 0).into(), psk, 1).expect("front");
        Site {
            dir,
            key,
            arbiter,
            front,
        }
    }
}

/// A pipelined `ftvm client` with read-back through the front at `front`, on keys `PREFIX-N`
/// (40 keys, 4 in flight, long timeouts: it rides through failovers and joins).
pub fn client(front: std::net::SocketAddr, requests: u64, prefix: &str) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args([
            "client",
            "--service",
            &front.to_string(),
            "--requests",
            &requests.to_string(),
            "--keys",
            "40",
            "--key-prefix",
            prefix,
            "--window",
            "4",
            "--verify",
            "--timeout-ms",
            "30000",
            "--retry-ms",
            "1000",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("client")
}

/// The client's JSON report, asserting it succeeded with nothing lost and nothing wrong.
pub fn client_ok(out: std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "client: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json_start = text.find('{').expect("client JSON");
    let v: serde_json::Value = serde_json::from_str(&text[json_start..]).expect("client JSON");
    assert_eq!(v["acknowledged_lost"], 0, "{v}");
    assert_eq!(v["responses_bad"], 0, "{v}");
    v
}
