//! A real etcd cluster on loopback, for tests and fault-injection demos: start `N` members, crash
//! some of them ([`EtcdCluster::kill`], a SIGKILL), bring them back with their data
//! ([`EtcdCluster::restart`]), and point [`EtcdArbiter`](crate::EtcdArbiter)s at them
//! ([`EtcdCluster::urls`], [`EtcdCluster::spec`]).
//!
//! Every member listens on `127.0.0.1` with a client and a peer port picked free when the cluster
//! starts (and kept across restarts), and keeps its data and its log under `DIR/member-I/`
//! (`data/`, `etcd.log`; etcd's output goes to the log, never to our stderr). The members run
//! with `--heartbeat-interval=50 --election-timeout=500`, so a lost leader is replaced in about
//! a second.
//!
//! Health is etcd's own `GET /health` (true only when the member has a leader and a quorum read
//! through Raft succeeds), and the leader is found with the v3 HTTP gateway's
//! `POST /v3/maintenance/status`; both over a plain std `TcpStream`, so this module needs no
//! HTTP client.
//!
//! Members are child processes of this one: dropping the [`EtcdCluster`] kills them all. A
//! process that dies without unwinding (SIGKILL, `abort`) leaves them running.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use ft_arbiter::etcd_cluster::{etcd_binary, EtcdCluster};
//! use ft_arbiter::{Arbiter, Decision, EtcdArbiter};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = std::env::temp_dir().join("ftvm-etcd-demo"); // must hold no members yet
//! let mut cluster = EtcdCluster::start(&etcd_binary()?, 3, &dir)?;
//! let mut arbiter = EtcdArbiter::new(cluster.urls())?; // or `cluster.spec()` for ftvm
//! let leader = cluster.wait_leader(Duration::from_secs(10))?;
//! cluster.kill(leader)?;
//! // The two others elect a new leader (about a second) and keep deciding; until then a call
//! // may be `Unavailable`, which means "ask again".
//! cluster.wait_leader(Duration::from_secs(10))?;
//! assert_eq!(arbiter.test_and_set("pair-1", "host-a", 0)?, Decision::Won { epoch: 1 });
//! cluster.restart(leader)?; // same ports and data; back once it has caught up
//! # Ok(())
//! # }
//! ```

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long [`EtcdCluster::start`] waits for every member to be healthy and a leader to be
/// elected.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`EtcdCluster::restart`] waits for the member to be healthy again.
pub const RESTART_TIMEOUT: Duration = Duration::from_secs(30);

/// How many times [`EtcdCluster::start`] picks fresh ports when one was taken under it.
const PORT_ATTEMPTS: usize = 3;
/// Between two polls of a member's health or status.
const POLL: Duration = Duration::from_millis(50);
/// Connecting to a member's client port (loopback: refused or accepted at once).
const CONNECT_TIMEOUT: Duration = Duration::from_millis(200);
/// Waiting for a member's HTTP answer. etcd's health check itself gives up after 1 s; a
/// connection made before the member is ready to serve is answered once it is (etcd binds its
/// client port early, then serves it only once it has joined the cluster).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(2);

/// Lets process `pid` (a member just started) run on every online CPU, whatever core the
/// process that started it is pinned to: the demo and the tests pin themselves (to a core next
/// to a replica's), the cluster is not what they measure, and a member sharing that one core
/// stalls with it. Best effort.
fn unpin(pid: u32) {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.clamp(1, 1024) as usize;
    // SAFETY: cpu_set_t is plain data, and all zeros is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for cpu in 0..cpus {
        // SAFETY: `set` is a valid cpu_set_t; CPU_SET ignores CPUs beyond its size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: `set` is a valid cpu_set_t of the size given; the kernel only reads it.
    let rc = unsafe { libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        tracing::debug!(
            "etcd member {pid} stays on its parent's CPUs: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Lines of a member's log quoted in an error.
const LOG_TAIL: usize = 15;

/// The Debian package that has etcd, named in every error about a missing binary.
const PACKAGE_HINT: &str = "etcd 3.4+ is needed: install the Debian package `etcd-server` \
                            (scripts/install-deps.sh does), or set FTVM_ETCD_BIN to an etcd binary";

/// Why the cluster could not be started, restarted or inspected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// No etcd binary where we looked, or it could not be executed; the text names the package.
    #[error("{0}")]
    Binary(String),
    /// A member count, member index or directory this cluster cannot use.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A member's port was taken by another process (the text quotes its log). `start` retries
    /// with fresh ports before giving this up.
    #[error("{0}")]
    AddrInUse(String),
    /// A member exited, or did not become healthy, or the cluster elected no leader, in time;
    /// the text quotes the member's log.
    #[error("{0}")]
    NotReady(String),
    /// A file-system or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_error(context: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// The etcd binary: `$FTVM_ETCD_BIN` if set, else `etcd` on the `PATH`, else Debian's
/// `/usr/bin/etcd`. The error names the Debian package (`etcd-server`).
pub fn etcd_binary() -> Result<PathBuf, ClusterError> {
    if let Some(bin) = std::env::var_os("FTVM_ETCD_BIN") {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(ClusterError::Binary(format!(
                "FTVM_ETCD_BIN={} is not a file; {PACKAGE_HINT}",
                bin.display()
            )))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            ClusterError::Binary(format!(
                "no etcd binary on the PATH nor at /usr/bin/etcd; {PACKAGE_HINT}"
            ))
        })
}

/// One member: its fixed name, ports and directory, and its process while it runs.
#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// Where this member's current launch began writing its log (earlier launches come before).
    log_offset: u64,
    /// The Raft member id, learned from its status once it answered.
    id: Option<u64>,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The exit status if the process has exited (it is then reaped).
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// The last lines this launch wrote to the log.
    fn log_tail(&self) -> String {
        let path = self.log_path();
        let mut text = String::new();
        let read = fs::File::open(&path).and_then(|mut f| {
            f.seek(SeekFrom::Start(self.log_offset))?;
            f.read_to_string(&mut text)
        });
        if let Err(e) = read {
            return format!("(reading {}: {e})", path.display());
        }
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LOG_TAIL)..];
        format!("{} (last lines):\n{}", path.display(), tail.join("\n"))
    }

    /// The error for a launch that failed: port taken, exited, or not ready in time.
    fn launch_error(&self, what: String) -> ClusterError {
        let tail = self.log_tail();
        if tail.contains("address already in use") {
            ClusterError::AddrInUse(format!(
                "etcd member {} {what}: its client port {} or peer port {} is taken by another \
                 process; {tail}",
                self.name, self.client_port, self.peer_port
            ))
        } else {
            ClusterError::NotReady(format!("etcd member {} {what}; {tail}", self.name))
        }
    }

    /// Kills (SIGKILL) and reaps the process, if there is one.
    fn kill(&mut self) -> Result<(), ClusterError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        // An already exited child: kill may fail (nothing to signal), wait reaps it all the same.
        let _ = child.kill();
        child
            .wait()
            .map_err(io_error(format!("reaping etcd member {}", self.name)))?;
        Ok(())
    }
}

/// A real etcd cluster of child processes on loopback; see the [module docs](self).
#[derive(Debug)]
pub struct EtcdCluster {
    bin: PathBuf,
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts a new cluster of `members` etcd processes from `bin`, with their data and logs
    /// under `dir` (created if missing; it must not already hold members), and waits until every
    /// member is healthy and the members agree on a leader. Ports are picked free on
    /// `127.0.0.1`; if one is taken before etcd binds it, the cluster is started again on fresh
    /// ports (up to three times).
    pub fn start(bin: &Path, members: usize, dir: &Path) -> Result<EtcdCluster, ClusterError> {
        if members == 0 {
            return Err(ClusterError::InvalidArgument(
                "an etcd cluster needs at least one member".into(),
            ));
        }
        fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
        for i in 0..members {
            let member_dir = member_dir(dir, i);
            if member_dir.exists() {
                return Err(ClusterError::InvalidArgument(format!(
                    "{} already exists: EtcdCluster::start makes a new cluster, give it a \
                     directory without members",
                    member_dir.display()
                )));
            }
        }
        let mut last = None;
        for attempt in 1..=PORT_ATTEMPTS {
            let ports = free_ports(2 * members)?;
            let mut cluster = EtcdCluster {
                bin: bin.to_owned(),
                dir: dir.to_owned(),
                token: cluster_token()?,
                members: (0..members)
                    .map(|i| Member {
                        name: format!("ftvm-etcd-{i}"),
                        client_port: ports[2 * i],
                        peer_port: ports[2 * i + 1],
                        dir: member_dir(dir, i),
                        child: None,
                        log_offset: 0,
                        id: None,
                    })
                    .collect(),
            };
            let started = Instant::now();
            match cluster.boot(started + START_TIMEOUT) {
                Ok(leader) => {
                    tracing::info!(
                        members,
                        urls = %cluster.urls().join(","),
                        leader = %cluster.members[leader].name,
                        dir = %dir.display(),
                        elapsed_ms = started.elapsed().as_millis() as u64,
                        "etcd cluster started"
                    );
                    return Ok(cluster);
                }
                Err(e @ ClusterError::AddrInUse(_)) if attempt < PORT_ATTEMPTS => {
                    tracing::warn!(
                        attempt,
                        error = %e,
                        "an etcd port was taken; retrying on fresh ports"
                    );
                    cluster.kill_all();
                    for i in 0..members {
                        let member_dir = member_dir(dir, i);
                        fs::remove_dir_all(&member_dir).map_err(io_error(format!(
                            "removing {} after a failed start",
                            member_dir.display()
                        )))?;
                    }
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| ClusterError::NotReady("the etcd cluster did not start".into())))
    }

    /// Launches every member as a new cluster and waits for health and a leader.
    fn boot(&mut self, deadline: Instant) -> Result<usize, ClusterError> {
        for i in 0..self.members.len() {
            self.launch(i, "new")?;
        }
        let mut healthy = vec![false; self.members.len()];
        while !healthy.iter().all(|h| *h) {
            for (i, ok) in healthy.iter_mut().enumerate() {
                if !*ok {
                    self.check_alive(i)?;
                    *ok = self.healthy(i);
                }
            }
            if Instant::now() > deadline {
                let i = healthy.iter().position(|h| !h).unwrap_or(0);
                return Err(self.members[i]
                    .launch_error(format!("was not healthy within {START_TIMEOUT:?}")));
            }
            if !healthy.iter().all(|h| *h) {
                std::thread::sleep(POLL);
            }
        }
        self.wait_leader_until(deadline)
    }

    /// Spawns member `i` with `--initial-cluster-state=STATE`, its output appended to its log.
    fn launch(&mut self, i: usize, state: &str) -> Result<(), ClusterError> {
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let m = &mut self.members[i];
        fs::create_dir_all(&m.dir).map_err(io_error(format!("creating {}", m.dir.display())))?;
        let log_path = m.log_path();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_error(format!("opening {}", log_path.display())))?;
        writeln!(
            log,
            "=== ft-arbiter: launching {} (--initial-cluster-state={state})",
            m.name
        )
        .map_err(io_error(format!("writing {}", log_path.display())))?;
        m.log_offset = log
            .metadata()
            .map_err(io_error(format!("reading {}", log_path.display())))?
            .len();
        let log_err = log
            .try_clone()
            .map_err(io_error(format!("opening {}", log_path.display())))?;
        let (client, peer) = (m.client_url(), m.peer_url());
        let child = Command::new(&self.bin)
            .arg(format!("--name={}", m.name))
            .arg(format!("--data-dir={}", m.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg(format!("--initial-cluster-state={state}"))
            .arg(format!("--initial-cluster-token={}", self.token))
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                ClusterError::Binary(format!(
                    "starting etcd member {} with {}: {e}; {PACKAGE_HINT}",
                    m.name,
                    self.bin.display()
                ))
            })?;
        unpin(child.id());
        tracing::debug!(
            member = %m.name,
            pid = child.id(),
            state,
            client = %client,
            "etcd member launched"
        );
        m.child = Some(child);
        Ok(())
    }

    /// An error if member `i` has exited since its launch.
    fn check_alive(&mut self, i: usize) -> Result<(), ClusterError> {
        let m = &mut self.members[i];
        match m.exited() {
            Some(status) => Err(m.launch_error(format!("exited with {status}"))),
            None if m.child.is_none() => Err(ClusterError::NotReady(format!(
                "etcd member {} is not running",
                m.name
            ))),
            None => Ok(()),
        }
    }

    fn member(&self, i: usize) -> Result<&Member, ClusterError> {
        self.members.get(i).ok_or_else(|| self.no_such_member(i))
    }

    fn no_such_member(&self, i: usize) -> ClusterError {
        ClusterError::InvalidArgument(format!(
            "no etcd member {i}: this cluster has members 0 to {}",
            self.members.len() - 1
        ))
    }

    /// The number of members.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    /// The directory holding the members' data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every member's client URL (`http://127.0.0.1:PORT`), in member order: the endpoints for
    /// [`EtcdArbiter::new`](crate::EtcdArbiter::new).
    pub fn urls(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// The arbiter spec of the whole cluster, `etcd:URL,URL,...`.
    pub fn spec(&self) -> String {
        format!("etcd:{}", self.urls().join(","))
    }

    /// Member `i`'s client URL.
    pub fn member_url(&self, i: usize) -> Result<String, ClusterError> {
        Ok(self.member(i)?.client_url())
    }

    /// Member `i`'s process id, while it runs (to signal it: a test freezes a member with
    /// SIGSTOP).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i)?.child.as_ref().map(Child::id)
    }

    /// Member `i`'s etcd name (`ftvm-etcd-I`).
    pub fn member_name(&self, i: usize) -> Result<&str, ClusterError> {
        Ok(&self.member(i)?.name)
    }

    /// Member `i`'s log file (etcd's output, every launch appended).
    pub fn log_path(&self, i: usize) -> Result<PathBuf, ClusterError> {
        Ok(self.member(i)?.log_path())
    }

    /// True if member `i`'s process is running (false for a killed member, one that exited on
    /// its own, and a member index out of range).
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members.get_mut(i).is_some_and(Member::running)
    }

    /// Crashes member `i`: SIGKILL (no clean shutdown), then reaps it. Killing a member that is
    /// not running does nothing.
    pub fn kill(&mut self, i: usize) -> Result<(), ClusterError> {
        if i >= self.members.len() {
            return Err(self.no_such_member(i));
        }
        let m = &mut self.members[i];
        if m.child.is_some() {
            m.kill()?;
            tracing::info!(member = %m.name, "etcd member killed (SIGKILL)");
        }
        Ok(())
    }

    /// Restarts killed member `i` with its name, ports and data directory
    /// (`--initial-cluster-state=existing`). If the running members, this one included, are a
    /// majority, waits until the member is healthy (it has a leader and has caught up far enough
    /// to serve a quorum read); otherwise it cannot become healthy on its own, and this waits
    /// only until it listens on its client port (use [`EtcdCluster::wait_healthy`] once enough
    /// members are back). A member that is still running is an error: kill it first.
    pub fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        if i >= self.members.len() {
            return Err(self.no_such_member(i));
        }
        if self.members[i].running() {
            return Err(ClusterError::InvalidArgument(format!(
                "etcd member {} is running; kill it before restarting it",
                self.members[i].name
            )));
        }
        self.members[i].kill()?; // reaps a member that exited on its own
        let started = Instant::now();
        self.launch(i, "existing")?;
        let running = (0..self.members.len())
            .filter(|&j| self.members[j].running())
            .count();
        let deadline = started + RESTART_TIMEOUT;
        if 2 * running > self.members.len() {
            self.wait_healthy_until(i, deadline)?;
            tracing::info!(
                member = %self.members[i].name,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "etcd member restarted and healthy"
            );
        } else {
            let port = self.members[i].client_port;
            while !listening(port) {
                self.check_alive(i)?;
                if Instant::now() > deadline {
                    return Err(self.members[i].launch_error(format!(
                        "did not listen on port {port} within {RESTART_TIMEOUT:?}"
                    )));
                }
                std::thread::sleep(POLL);
            }
            tracing::info!(
                member = %self.members[i].name,
                running,
                members = self.members.len(),
                "etcd member restarted without a quorum: it waits for its peers"
            );
        }
        Ok(())
    }

    /// Waits until member `i` reports healthy, at most `timeout`.
    pub fn wait_healthy(&mut self, i: usize, timeout: Duration) -> Result<(), ClusterError> {
        if i >= self.members.len() {
            return Err(self.no_such_member(i));
        }
        self.wait_healthy_until(i, Instant::now() + timeout)
    }

    fn wait_healthy_until(&mut self, i: usize, deadline: Instant) -> Result<(), ClusterError> {
        loop {
            self.check_alive(i)?;
            if self.healthy(i) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(self.members[i].launch_error("was not healthy in time".into()));
            }
            std::thread::sleep(POLL);
        }
    }

    /// True if member `i` answers `GET /health` with `{"health":"true"}` (within 2 s): it has a
    /// leader and a quorum read through Raft just succeeded.
    pub fn healthy(&self, i: usize) -> bool {
        let Some(m) = self.members.get(i) else {
            return false;
        };
        http(m.client_port, "GET", "/health", "")
            .is_some_and(|body| body.contains("\"health\":\"true\""))
    }

    /// Member `i`'s view of the cluster from `POST /v3/maintenance/status`: its own Raft id and
    /// its leader's (`None` while it has none), or `None` if it did not answer.
    fn status(&self, i: usize) -> Option<(u64, Option<u64>)> {
        let port = self.members.get(i)?.client_port;
        let body = http(port, "POST", "/v3/maintenance/status", "{}")?;
        let id = json_u64(&body, "member_id")?;
        let leader = json_u64(&body, "leader").filter(|&l| l != 0);
        Some((id, leader))
    }

    /// The leader as the running members see it: `Some(i)` if every running member that answers
    /// names the same leader and that leader is running member `i`; `None` while they have none,
    /// disagree (an election is under way) or do not answer. A leader cut off from its quorum
    /// keeps calling itself leader until its election timeout (500 ms) makes it step down.
    pub fn leader(&mut self) -> Option<usize> {
        let mut seen = None;
        for i in 0..self.members.len() {
            if !self.members[i].running() {
                continue;
            }
            let Some((id, leader)) = self.status(i) else {
                continue;
            };
            self.members[i].id = Some(id);
            match (leader, seen) {
                (None, _) => return None,
                (Some(l), Some(s)) if l != s => return None,
                (Some(l), _) => seen = Some(l),
            }
        }
        let leader = seen?;
        let i = self.members.iter().position(|m| m.id == Some(leader))?;
        self.members[i].running().then_some(i)
    }

    /// Waits until the running members agree on a running leader ([`EtcdCluster::leader`]), at
    /// most `timeout`, and returns its index.
    pub fn wait_leader(&mut self, timeout: Duration) -> Result<usize, ClusterError> {
        self.wait_leader_until(Instant::now() + timeout)
    }

    fn wait_leader_until(&mut self, deadline: Instant) -> Result<usize, ClusterError> {
        loop {
            if let Some(i) = self.leader() {
                return Ok(i);
            }
            if Instant::now() > deadline {
                let running: Vec<&str> = self
                    .members
                    .iter_mut()
                    .filter_map(|m| m.running().then_some(m.name.as_str()))
                    .collect();
                return Err(ClusterError::NotReady(format!(
                    "the etcd members running ({}) did not agree on a leader in time",
                    running.join(", ")
                )));
            }
            std::thread::sleep(POLL);
        }
    }

    fn kill_all(&mut self) {
        for m in &mut self.members {
            if let Err(e) = m.kill() {
                tracing::warn!(member = %m.name, error = %e, "killing an etcd member");
            }
        }
    }
}

impl Drop for EtcdCluster {
    /// Kills every member (the data stays in the directory).
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn member_dir(dir: &Path, i: usize) -> PathBuf {
    dir.join(format!("member-{i}"))
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago (all held until all are found).
fn free_ports(n: usize) -> Result<Vec<u16>, ClusterError> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_error("finding free ports on 127.0.0.1"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io_error("finding free ports on 127.0.0.1"))
}

/// A token no other cluster uses, so members of different clusters never join each other.
fn cluster_token() -> Result<String, ClusterError> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(|e| ClusterError::Io {
        context: "drawing a cluster token".into(),
        source: io::Error::other(e.to_string()),
    })?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("ftvm-{}-{hex}", std::process::id()))
}

/// True if something accepts connections on 127.0.0.1:`port`.
fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        CONNECT_TIMEOUT,
    )
    .is_ok()
}

/// One HTTP/1.0 request to 127.0.0.1:`port` (1.0: no chunked answer, the server closes); the
/// body of a `200 OK` answer, or `None` for anything else (refused, silent, another status).
fn http(port: u16, method: &str, path: &str, body: &str) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).ok()?;
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).ok()?;
    stream.set_write_timeout(Some(ANSWER_TIMEOUT)).ok()?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut answer = Vec::new();
    stream.take(1 << 16).read_to_end(&mut answer).ok()?;
    let answer = String::from_utf8(answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    let status = head.lines().next()?;
    let mut words = status.split_whitespace();
    (words.next()?.starts_with("HTTP/1.") && words.next()? == "200").then(|| body.to_owned())
}

/// The number in `"name":"DIGITS"` (the v3 gateway's JSON writes 64-bit integers as strings).
fn json_u64(json: &str, name: &str) -> Option<u64> {
    let start = json.find(&format!("\"{name}\":\""))? + name.len() + 4;
    let digits = &json[start..];
    let end = digits.find('"')?;
    digits[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_fields_parse() {
        let body = r#"{"header":{"cluster_id":"1165","member_id":"6090535317558273548","revision":"1"},"version":"3.4.23","leader":"7977665246368977040","raftIndex":"9"}"#;
        assert_eq!(json_u64(body, "member_id"), Some(6090535317558273548));
        assert_eq!(json_u64(body, "leader"), Some(7977665246368977040));
        assert_eq!(json_u64(body, "raft_term"), None);
        assert_eq!(json_u64(r#"{"leader":"x"}"#, "leader"), None);
        assert_eq!(json_u64(r#"{"leader":"12"#, "leader"), None);
    }

    #[test]
    fn bad_arguments_are_refused_with_reasons() {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let dir = tmp.path().join("cluster");
        let err =
            EtcdCluster::start(Path::new("/nonexistent/etcd"), 0, &dir).expect_err("no members");
        assert!(err.to_string().contains("at least one member"), "{err}");
        let err =
            EtcdCluster::start(Path::new("/nonexistent/etcd"), 3, &dir).expect_err("no binary");
        assert!(matches!(err, ClusterError::Binary(_)), "{err:?}");
        assert!(err.to_string().contains("etcd-server"), "{err}");
        let err = EtcdCluster::start(Path::new("/nonexistent/etcd"), 1, &dir)
            .expect_err("member-0 is left from the failed start");
        assert!(err.to_string().contains("already exists"), "{err}");
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(6).expect("ports");
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 6, "{ports:?}");
    }
}
