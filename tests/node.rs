//! `ftvm node`, with real processes: two nodes behind the front, a file arbiter, clients that
//! verify every answer.
//!
//! - Two nodes started at once on a new pair: exactly one becomes primary, the other joins it.
//! - SIGKILL of the primary: the backup takes over, the killed node restarted (as a supervisor
//!   would) joins the survivor, and the pair is protected again — twice, in both directions.
//! - SIGSTOP of the primary beyond the heartbeat timeout: the backup takes over; after SIGCONT
//!   the deposed node halts (exit 3) and never serves; restarted, it rejoins.
//! - A node with another key, guest image or memory size, or with a guest the determinism
//!   checker refuses, is refused with the reason and exits 4 without touching the pair; a node
//!   whose arbiter is unreachable never serves.
//!
//! Needs /dev/kvm.

mod common;

use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::Duration;

use common::ready::Ready;
use common::{client, client_ok, Proc};
use ft_arbiter::Arbiter;

const FTVM: &str = env!("CARGO_BIN_EXE_ftvm");
const LONG: Duration = Duration::from_secs(60);

fn s(v: impl ToString) -> String {
    v.to_string()
}

/// A pair's site and its two nodes, `a` and `b`.
struct Pair {
    site: common::Site,
    nodes: [Option<Proc>; 2],
    /// TCP join and log addresses per node (else Unix sockets and shm).
    tcp: Option<[(String, String); 2]>,
}

const NAMES: [&str; 2] = ["a", "b"];

impl Pair {
    fn new(name: &str) -> Pair {
        Pair {
            site: common::Site::new(&format!("ftvm-node-{name}-")),
            nodes: [None, None],
            tcp: None,
        }
    }

    /// A pair whose nodes accept joins and log channels on TCP ports of their own.
    fn tcp(name: &str) -> Pair {
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .to_string()
        };
        let mut p = Pair::new(name);
        p.tcp = Some([(port(), port()), (port(), port())]);
        p
    }

    fn path(&self, name: &str) -> PathBuf {
        self.site.dir.path().join(name)
    }

    fn args(&self, name: &str, key: &std::path::Path, extra: &[String]) -> Vec<String> {
        let (joins, listen, transport) = match (&self.tcp, NAMES.iter().position(|n| *n == name)) {
            (Some(t), Some(i)) => (t[i].0.clone(), t[i].1.clone(), "tcp"),
            _ => (
                self.path(&format!("{name}-joins.sock"))
                    .display()
                    .to_string(),
                self.path(&format!("{name}-log.sock")).display().to_string(),
                "shm",
            ),
        };
        let mut args = vec![
            s("node"),
            s("--transport"),
            s(transport),
            s("--key-file"),
            key.display().to_string(),
            s("--arbiter"),
            self.site.arbiter.to_string(),
            s("--front"),
            self.site.front.local_addr().to_string(),
            s("--heartbeat-timeout-ms"),
            s(300),
            s("--name"),
            s(name),
            s("--accept-joins"),
            joins,
            s("--listen"),
            listen,
            s("--json"),
            self.path(&format!("{name}.json")).display().to_string(),
        ];
        args.extend(extra.iter().cloned());
        args
    }

    /// Starts node `i` (as a supervisor would, with the same options every time).
    fn spawn(&mut self, i: usize) -> Receiver<Option<Ready>> {
        let key = self.site.key.clone();
        let (p, ready) = Proc::spawn(FTVM, &self.args(NAMES[i], &key, &[]));
        self.nodes[i] = Some(p);
        ready
    }

    fn node(&mut self, i: usize) -> &mut Proc {
        self.nodes[i].as_mut().expect("node running")
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(p) = n {
                out.push_str(&format!("--- node {}\n{}", NAMES[i], p.log()));
            }
        }
        out
    }

    /// Starts both nodes at once; returns (primary, backup) indices once the backup joined.
    fn start_both(&mut self) -> (usize, usize) {
        let ready = [self.spawn(0), self.spawn(1)];
        let roles: Vec<Ready> = ready
            .iter()
            .map(|r| {
                r.recv_timeout(LONG)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| panic!("a node did not start:\n{}", self.logs()))
            })
            .collect();
        let primaries: Vec<usize> = (0..2).filter(|&i| roles[i].role == "primary").collect();
        assert_eq!(primaries.len(), 1, "exactly one primary: {roles:?}");
        let p = primaries[0];
        let b = 1 - p;
        assert!(roles[p].detail.contains("epoch 1"), "{roles:?}");
        assert_eq!(roles[b].role, "backup", "{roles:?}");
        assert!(roles[b].detail.contains("joined"), "{roles:?}");
        assert!(
            self.node(p).wait_for_log("protected again", LONG),
            "{}",
            self.logs()
        );
        (p, b)
    }

    /// Restarts node `i` and waits until it joined and the primary `p` is protected again
    /// (`protected` times so far).
    fn rejoin(&mut self, i: usize, p: usize, protected: usize) {
        let ready = self.spawn(i);
        let r = ready.recv_timeout(LONG).ok().flatten();
        assert!(
            r.as_ref()
                .is_some_and(|r| r.role == "backup" && r.detail.contains("joined")),
            "node {} rejoined: {r:?}\n{}",
            NAMES[i],
            self.logs()
        );
        let deadline = std::time::Instant::now() + LONG;
        while self.node(p).log().matches("protected again").count() < protected {
            assert!(
                std::time::Instant::now() < deadline,
                "protected again ({protected}):\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn latest(&self) -> ft_arbiter::Record {
        let mut a = self.site.arbiter.open(None).expect("arbiter");
        a.latest("ftvm-pair-1")
            .expect("latest")
            .expect("a decision")
    }

    fn client(&self, requests: u64, prefix: &str) -> std::process::Child {
        client(self.site.front.local_addr(), requests, prefix)
    }
}

#[test]
fn two_nodes_at_once_make_one_pair_that_heals_after_each_sigkill() {
    let mut pair = Pair::new("heal");
    let (mut p, mut b) = pair.start_both();
    let first = pair.latest();
    assert_eq!(first.epoch, 1);
    assert!(
        first.winner.starts_with(&format!("{}.", NAMES[p])),
        "{first:?}"
    );
    assert_eq!(
        first.joins_at.as_deref(),
        Some(
            pair.path(&format!("{}-joins.sock", NAMES[p]))
                .to_str()
                .expect("utf-8")
        )
    );
    let client = pair.client(6_000, "heal");
    for round in 0..2u64 {
        // Kill the primary under load: the backup takes over in the next epoch.
        assert!(pair.node(b).wait_for_log("peer connected", LONG));
        std::thread::sleep(Duration::from_millis(200));
        pair.node(p).signal(libc::SIGKILL);
        let won = format!("won epoch {}", round + 2);
        assert!(pair.node(b).wait_for_log(&won, LONG), "{}", pair.logs());
        let r = pair.latest();
        assert_eq!(r.epoch, round + 2, "{r:?}");
        assert!(r.winner.starts_with(&format!("{}.", NAMES[b])), "{r:?}");
        // The killed node, restarted, joins the survivor.
        pair.rejoin(p, b, 1);
        (p, b) = (b, p);
    }
    let c = client_ok(client.wait_with_output().expect("client"));
    println!("client across two heals: {c}");
    // The primary stops first; its backup replays to the stop point and ends too.
    for i in [p, b] {
        pair.node(i).signal(libc::SIGTERM);
        assert_eq!(pair.node(i).wait(LONG), Some(0), "{}", pair.logs());
    }
    let backup: serde_json::Value = serde_json::from_slice(
        &std::fs::read(pair.path(&format!("{}.json", NAMES[b]))).expect("backup json"),
    )
    .expect("json");
    assert_eq!(backup["divergence"], serde_json::Value::Null, "{backup}");
    assert!(backup["outputs_checked"].as_u64() > Some(0), "{backup}");
}

#[test]
fn a_stopped_primary_is_deposed_halts_and_its_restart_rejoins() {
    let mut pair = Pair::new("stop");
    let (p, b) = pair.start_both();
    let client = pair.client(3_000, "stop");
    assert!(pair.node(b).wait_for_log("peer connected", LONG));
    pair.node(p).signal(libc::SIGSTOP);
    assert!(
        pair.node(b).wait_for_log("won epoch 2", LONG),
        "{}",
        pair.logs()
    );
    pair.node(p).signal(libc::SIGCONT);
    // The deposed primary halts (exit 3) and never serves in the new epoch.
    assert_eq!(pair.node(p).wait(LONG), Some(3), "{}", pair.logs());
    pair.rejoin(p, b, 1);
    let c = client_ok(client.wait_with_output().expect("client"));
    println!("client across a deposition: {c}");
}

#[test]
fn misconfigured_nodes_are_refused_with_the_reason_and_the_pair_serves_on() {
    let mut pair = Pair::new("refuse");
    let (p, _b) = pair.start_both();
    let before = pair.latest();
    let other_key = common::write_key(
        pair.site.dir.path(),
        "other-key",
        "another-key-0123456789abcdef0123",
    );
    let key = pair.site.key.clone();
    let cases: [(&str, PathBuf, Vec<String>, &str); 3] = [
        ("c", other_key, vec![], "authenticat"),
        ("d", key.clone(), vec![s("--mem-mib"), s(32)], "memory size"),
        // Past its own determinism check, the live primary's handshake refuses the image.
        (
            "e",
            key,
            vec![s("--guest"), s("nondet"), s("--skip-guest-check")],
            "guest image",
        ),
    ];
    for (name, key, extra, reason) in cases {
        let (mut n, ready) = Proc::start(FTVM, &pair.args(name, &key, &extra));
        assert!(ready.is_none(), "{name} must not serve: {ready:?}");
        assert_eq!(n.wait(LONG), Some(4), "{name}:\n{}", n.log());
        let log = n.log();
        assert!(
            log.contains("refuses this node") && log.contains(reason),
            "{name}: {reason}:\n{log}"
        );
    }
    // A guest the determinism checker refuses: refused before the node asks anyone.
    let (mut n, ready) = Proc::start(
        FTVM,
        &pair.args("g", &pair.site.key, &[s("--guest"), s("nondet")]),
    );
    assert!(ready.is_none(), "a nondet node must not serve: {ready:?}");
    assert_eq!(n.wait(LONG), Some(4), "{}", n.log());
    assert!(
        n.log().contains("fails the determinism check") && n.log().contains("rdtsc"),
        "{}",
        n.log()
    );
    // Another pair id: its arbiter has no decision, but the front serves a pair already.
    let (mut n, ready) = Proc::start(
        FTVM,
        &pair.args("f", &pair.site.key, &[s("--pair-id"), s("another-pair")]),
    );
    assert!(ready.is_none(), "another pair id must not serve: {ready:?}");
    assert_eq!(n.wait(LONG), Some(4), "{}", n.log());
    assert!(n.log().contains("not the live pair's"), "{}", n.log());
    let mut a = pair.site.arbiter.open(None).expect("arbiter");
    assert_eq!(
        a.latest("another-pair").expect("latest"),
        None,
        "nothing claimed"
    );
    // Untouched: same decision, the primary still protected and serving.
    assert_eq!(pair.latest(), before);
    // (A node's primary starts unprotected until its backup joins: only losing protection counts.)
    assert!(
        !pair.node(p).log().contains("protected -> unprotected")
            && !pair.node(p).log().contains("lost the backup"),
        "{}",
        pair.logs()
    );
    client_ok(
        pair.client(300, "after")
            .wait_with_output()
            .expect("client"),
    );
}

#[test]
fn a_node_whose_arbiter_is_unreachable_does_not_serve() {
    let pair = Pair::new("noarb");
    // A server arbiter on a port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let mut args = pair.args("a", &pair.site.key, &[]);
    let i = args
        .iter()
        .position(|a| a == "--arbiter")
        .expect("--arbiter")
        + 1;
    args[i] = format!("server:127.0.0.1:{port}");
    let (mut n, ready) = Proc::spawn(FTVM, &args);
    assert!(
        n.wait_for_log("not serving", LONG),
        "says why it waits:\n{}",
        n.log()
    );
    n.signal(libc::SIGTERM);
    let code = n.wait(LONG);
    assert!(matches!(code, Some(c) if c != 0), "{code:?}\n{}", n.log());
    assert!(
        ready.recv().ok().flatten().is_none(),
        "it never announced itself"
    );
    assert_eq!(pair.site.front.stats().epoch, 0, "never registered");
}

/// With the etcd arbiter on a real three-member cluster: one member down, a failover still
/// happens; two members down, the survivor of a SIGKILL waits and does not go live until a
/// member returns.
#[cfg(feature = "etcd")]
#[test]
fn with_two_of_three_etcd_members_down_nobody_goes_live_until_one_returns() {
    use ft_arbiter::etcd_cluster::{etcd_binary, EtcdCluster};
    let bin = etcd_binary().expect("the etcd binary (Debian's etcd-server)");
    let mut pair = Pair::new("etcd");
    let mut cluster = EtcdCluster::start(&bin, 3, &pair.path("etcd")).expect("etcd cluster");
    pair.site.arbiter = cluster.spec().parse().expect("etcd spec");
    let (mut p, mut b) = pair.start_both();
    let client = pair.client(4_000, "etcd");
    // One member down: decisions are still made.
    cluster.kill(0).expect("kill member 0");
    assert!(pair.node(b).wait_for_log("peer connected", LONG));
    pair.node(p).signal(libc::SIGKILL);
    assert!(
        pair.node(b).wait_for_log("won epoch 2", LONG),
        "{}",
        pair.logs()
    );
    pair.rejoin(p, b, 1);
    (p, b) = (b, p);
    // Two members down: the survivor asks, gets no decision, and waits.
    cluster.kill(1).expect("kill member 1");
    assert!(pair.node(b).wait_for_log("peer connected", LONG));
    pair.node(p).signal(libc::SIGKILL);
    assert!(
        pair.node(b).wait_for_log("arbiter gave no decision", LONG),
        "{}",
        pair.logs()
    );
    assert_eq!(pair.site.front.stats().epoch, 2, "nobody went live");
    assert!(!pair.node(b).log().contains("won epoch 3"));
    // A member returns: the survivor wins and serves; the pair heals.
    cluster.restart(1).expect("restart member 1");
    assert!(
        pair.node(b).wait_for_log("won epoch 3", LONG),
        "{}",
        pair.logs()
    );
    pair.rejoin(p, b, 1);
    client_ok(client.wait_with_output().expect("client"));
}

/// SIGTERM of the backup node (`systemctl stop`): it leaves at once with exit 0, the primary
/// goes on alone in a new epoch, and the node started again rejoins.
#[test]
fn a_backup_node_stopped_by_sigterm_leaves_cleanly_and_rejoins() {
    let mut pair = Pair::new("term");
    let (p, b) = pair.start_both();
    let client = pair.client(2_000, "term");
    assert!(pair.node(b).wait_for_log("peer connected", LONG));
    pair.node(b).signal(libc::SIGTERM);
    assert_eq!(pair.node(b).wait(LONG), Some(0), "{}", pair.logs());
    assert!(
        pair.node(b)
            .log()
            .contains("the primary goes on without it"),
        "{}",
        pair.logs()
    );
    assert!(
        pair.node(p).wait_for_log("continuing unreplicated", LONG),
        "{}",
        pair.logs()
    );
    pair.rejoin(b, p, 2);
    client_ok(client.wait_with_output().expect("client"));
}

/// Over TCP join addresses: the node that loses a new pair's claim frees its join port (it
/// binds it again once joined), so the pair settles and heals like one on Unix sockets.
#[test]
fn two_nodes_at_once_over_tcp_settle_and_heal() {
    let mut pair = Pair::tcp("tcp");
    let (p, b) = pair.start_both();
    let client = pair.client(2_000, "tcp");
    assert!(pair.node(b).wait_for_log("peer connected", LONG));
    pair.node(p).signal(libc::SIGKILL);
    assert!(
        pair.node(b).wait_for_log("won epoch 2", LONG),
        "{}",
        pair.logs()
    );
    pair.rejoin(p, b, 1);
    client_ok(client.wait_with_output().expect("client"));
    assert_eq!(
        pair.latest().epoch,
        2,
        "no decisions beyond the one failover"
    );
}
