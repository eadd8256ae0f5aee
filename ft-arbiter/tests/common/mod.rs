//! Test fixtures: a temporary directory, a real etcd process, and one fixture per backend that
//! can start its backend, hand out clients (as separate hosts would have), and take the backend
//! down and bring it back.

#![allow(dead_code)]

pub mod suite;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[cfg(feature = "etcd")]
use ft_arbiter::EtcdArbiter;
use ft_arbiter::{Arbiter, ArbiterServer, FileArbiter, PreSharedKey, ServerArbiter};

/// The key every test server and client shares (unless a test wants another one).
pub const KEY: &[u8] = b"ft-arbiter-test-key-0123456789ab";

pub fn key() -> PreSharedKey {
    PreSharedKey::new(KEY.to_vec()).expect("test key")
}

pub use tempfile::TempDir;

/// A fresh private temporary directory (0700), removed on drop.
pub fn temp_dir(name: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("ft-arbiter-{name}-"))
        .tempdir()
        .expect("creating a temporary directory")
}

/// A backend under test.
pub trait Fixture: Sized {
    type A: Arbiter + 'static;
    /// Starts a fresh backend with no decisions.
    fn start() -> Self;
    /// A new client, as another host would open it.
    fn client(&self) -> Self::A;
    /// The backend as an `ArbiterSpec` string, for child processes (which use [`key`]).
    fn spec(&self) -> String;
    /// Makes the backend unreachable (stops the server or etcd, unmounts the share).
    fn take_down(&mut self);
    /// Brings it back with its state.
    fn bring_up(&mut self);
}

// ------------------------------------------------------------------------------ file

pub struct FileFixture {
    _dir: TempDir,
    share: PathBuf,
}

impl FileFixture {
    pub fn share(&self) -> &Path {
        &self.share
    }
}

impl Fixture for FileFixture {
    type A = FileArbiter;

    fn start() -> Self {
        let dir = temp_dir("file");
        let share = dir.path().join("share");
        FileArbiter::init(&share).expect("creating the store");
        FileFixture { _dir: dir, share }
    }

    fn client(&self) -> FileArbiter {
        FileArbiter::open(&self.share).expect("opening the store")
    }

    fn spec(&self) -> String {
        format!("file:{}", self.share.display())
    }

    /// Unmounting leaves the mount point empty: the store directory disappears from view.
    fn take_down(&mut self) {
        std::fs::rename(
            self.share.join("ftvm-arbiter"),
            self.share.join("elsewhere"),
        )
        .expect("hiding the store");
    }

    fn bring_up(&mut self) {
        std::fs::rename(
            self.share.join("elsewhere"),
            self.share.join("ftvm-arbiter"),
        )
        .expect("restoring the store");
    }
}

// ------------------------------------------------------------------------------ server

pub struct ServerFixture {
    state: TempDir,
    addr: SocketAddr,
    pub server: Option<ArbiterServer>,
}

impl ServerFixture {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }
}

impl Fixture for ServerFixture {
    type A = ServerArbiter;

    fn start() -> Self {
        let state = temp_dir("server");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = ArbiterServer::serve(listener, state.path(), key()).expect("serve");
        ServerFixture {
            state,
            addr,
            server: Some(server),
        }
    }

    fn client(&self) -> ServerArbiter {
        ServerArbiter::new(self.addr.to_string(), key())
            .with_timeouts(Duration::from_secs(2), Duration::from_secs(10))
    }

    fn spec(&self) -> String {
        format!("server:{}", self.addr)
    }

    fn take_down(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
    }

    fn bring_up(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {}: {e}; retrying", self.addr);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        self.server =
            Some(ArbiterServer::serve(listener, self.state.path(), key()).expect("serve"));
    }
}

// ------------------------------------------------------------------------------ etcd

/// The etcd binary: `$FTVM_ETCD_BIN`, else `etcd` on the PATH, else Debian's `/usr/bin/etcd`.
pub fn etcd_binary() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("FTVM_ETCD_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "the etcd binary is missing: the etcd tests need a real etcd 3.4+. Install the Debian \
             package `etcd-server` (scripts/install-deps.sh does), or set FTVM_ETCD_BIN"
                .to_owned()
        })
}

/// A real single-member etcd on 127.0.0.1, with its data in a temporary directory.
pub struct EtcdProcess {
    bin: PathBuf,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("finding a free port")
        .port()
}

impl EtcdProcess {
    /// Starts etcd from `bin` and waits until it reports healthy.
    pub fn start(bin: &Path) -> Result<Self, String> {
        let mut last = String::new();
        for _ in 0..3 {
            let mut etcd = EtcdProcess {
                bin: bin.to_owned(),
                dir: temp_dir("etcd"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            };
            match etcd.launch() {
                Ok(()) => return Ok(etcd),
                // A port taken between our probe and etcd's bind: try other ports.
                Err(e) if e.contains("address already in use") => last = e,
                Err(e) => return Err(e),
            }
        }
        Err(last)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// (Re)starts etcd on the same ports and data directory.
    pub fn launch(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let child = Command::new(&self.bin)
            .arg("--name=ftarb")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=ftarb={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| {
                format!(
                    "starting {}: {e}. The etcd tests need a real etcd: install the Debian \
                     package `etcd-server` (scripts/install-deps.sh does)",
                    self.bin.display()
                )
            })?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.healthy() {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                self.kill();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(format!(
                    "etcd did not become healthy ({}):\n{}",
                    match exited {
                        Some(status) => format!("exited with {status}"),
                        None => "timed out after 30 s".into(),
                    },
                    tail.join("\n")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn healthy(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Kills etcd (SIGKILL: a crash, not a clean shutdown) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(feature = "etcd")]
pub struct EtcdFixture {
    pub etcd: EtcdProcess,
}

#[cfg(feature = "etcd")]
impl Fixture for EtcdFixture {
    type A = EtcdArbiter;

    fn start() -> Self {
        let bin = etcd_binary().unwrap_or_else(|e| panic!("{e}"));
        let etcd = EtcdProcess::start(&bin).unwrap_or_else(|e| panic!("{e}"));
        EtcdFixture { etcd }
    }

    fn client(&self) -> EtcdArbiter {
        EtcdArbiter::new(vec![self.etcd.url()])
            .expect("etcd client")
            .with_timeout(Duration::from_secs(10))
    }

    fn spec(&self) -> String {
        format!("etcd:{}", self.etcd.url())
    }

    fn take_down(&mut self) {
        self.etcd.kill();
    }

    fn bring_up(&mut self) {
        self.etcd.launch().unwrap_or_else(|e| panic!("{e}"));
    }
}
