//! The etcd backend against a real three-member etcd cluster on loopback (`EtcdCluster`):
//! racing clients on different members, members crashing (the leader too), losing the quorum,
//! and every member crashing and coming back.
//!
//! The tests take turns (one cluster at a time): three etcd members each, with a 50 ms heartbeat,
//! on two cores, are enough load; and the timings they print mean something only when alone.

#![cfg(feature = "etcd")]

mod common;

use std::sync::{Arc, Barrier, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::suite::check_round;
use common::TempDir;
use ft_arbiter::etcd_cluster::{etcd_binary, ClusterError, EtcdCluster};
use ft_arbiter::{Arbiter, ArbiterError, Decision, EtcdArbiter};

/// Every client's bound on one call.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The client timeout of the silent-member test.
const SILENT_TEST_TIMEOUT: Duration = Duration::from_secs(6);
/// How long a failed call may take beyond the client's bound (scheduling on a busy machine).
const SLACK: Duration = Duration::from_secs(1);
/// The longest a call may take to fail: `EtcdArbiter` bounds a call, with every member it tries,
/// by its timeout.
const FAIL_BOUND: Duration = CLIENT_TIMEOUT.saturating_add(SLACK);
/// How long a cluster that has a quorum may take to decide again (an election, a client finding
/// a live endpoint).
const RECOVERY: Duration = Duration::from_secs(15);

static SERIAL: Mutex<()> = Mutex::new(());

struct Cluster {
    // Field order is drop order: the members die before their directory is removed.
    etcd: EtcdCluster,
    _dir: TempDir,
    _turn: MutexGuard<'static, ()>,
}

fn start() -> Cluster {
    let turn = SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let bin = etcd_binary().unwrap_or_else(|e| panic!("{e}"));
    let dir = common::temp_dir("etcd-cluster");
    let t = Instant::now();
    let etcd = EtcdCluster::start(&bin, 3, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "3-member cluster healthy with a leader in {:?}",
        t.elapsed()
    );
    Cluster {
        etcd,
        _dir: dir,
        _turn: turn,
    }
}

fn client(urls: Vec<String>) -> EtcdArbiter {
    EtcdArbiter::new(urls)
        .expect("etcd client")
        .with_timeout(CLIENT_TIMEOUT)
}

/// A client that talks to member `i` only.
fn member_client(cluster: &EtcdCluster, i: usize) -> EtcdArbiter {
    client(vec![cluster.member_url(i).expect("member url")])
}

fn won(epoch: u64) -> Decision {
    Decision::Won { epoch }
}

fn lost(winner: &str, epoch: u64) -> Decision {
    Decision::Lost {
        winner: winner.into(),
        epoch,
    }
}

/// A test-and-set as a real caller makes it while the cluster has a quorum: `Unavailable` means
/// "no decision for you, ask again", so it asks again, for at most [`RECOVERY`]. Returns the
/// answer and how many calls it took.
fn decide(a: &mut EtcdArbiter, pair: &str, candidate: &str, epoch: u64) -> (Decision, usize) {
    let deadline = Instant::now() + RECOVERY;
    let mut calls = 0;
    loop {
        calls += 1;
        match a.test_and_set(pair, candidate, epoch) {
            Ok(d) => return (d, calls),
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {}
            Err(e) => panic!("test_and_set({pair}, {candidate}, {epoch}) after {calls} calls: {e}"),
        }
    }
}

/// [`Arbiter::current`], asked again on `Unavailable` like [`decide`].
fn read(a: &mut EtcdArbiter, pair: &str) -> Option<(String, u64)> {
    let deadline = Instant::now() + RECOVERY;
    loop {
        match a.current(pair) {
            Ok(c) => return c,
            Err(e) if e.is_unavailable() && Instant::now() < deadline => {}
            Err(e) => panic!("current({pair}): {e}"),
        }
    }
}

/// Asserts that a call fails with `Unavailable` within [`FAIL_BOUND`], and returns how long it
/// took.
fn assert_unavailable<T: std::fmt::Debug>(
    what: &str,
    call: impl FnOnce() -> Result<T, ArbiterError>,
) -> Duration {
    let t = Instant::now();
    let result = call();
    let took = t.elapsed();
    match result {
        Err(ArbiterError::Unavailable(_)) => {}
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
    assert!(
        took <= FAIL_BOUND,
        "{what}: Unavailable only after {took:?}"
    );
    took
}

#[test]
fn racers_on_different_members_get_one_winner_per_round() {
    const RACERS: usize = 6;
    const ROUNDS: usize = 30;
    let c = start();
    // Two racers per member, each talking to its member only, as separate hosts would.
    let clients: Vec<EtcdArbiter> = (0..RACERS).map(|r| member_client(&c.etcd, r % 3)).collect();
    let barrier = Arc::new(Barrier::new(RACERS));
    let t = Instant::now();
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(r, mut a)| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let me = format!("racer-{r}-on-member-{}", r % 3);
                (0..ROUNDS)
                    .map(|round| {
                        barrier.wait();
                        let d = a
                            .test_and_set(&format!("race-{round}"), &me, 7)
                            .unwrap_or_else(|e| panic!("{me}, round {round}: {e}"));
                        (me.clone(), d)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let answers: Vec<Vec<(String, Decision)>> = threads
        .into_iter()
        .map(|t| t.join().expect("racer thread"))
        .collect();
    let elapsed = t.elapsed();
    let mut check = client(c.etcd.urls());
    let mut wins = [0usize; 3];
    for round in 0..ROUNDS {
        let round_answers: Vec<(String, Decision)> =
            answers.iter().map(|a| a[round].clone()).collect();
        let winner = check_round(&round.to_string(), 7, &round_answers);
        assert_eq!(
            check.current(&format!("race-{round}")).expect("current"),
            Some((winner.clone(), 8)),
            "round {round}: current must report the winner"
        );
        let member: usize = winner
            .rsplit('-')
            .next()
            .and_then(|m| m.parse().ok())
            .expect("member in the winner's name");
        wins[member] += 1;
    }
    eprintln!(
        "{RACERS} racers on 3 members x {ROUNDS} rounds: one winner each round; wins by the \
         winner's member {wins:?}; {elapsed:?}"
    );
}

#[test]
fn one_member_down_decisions_continue_even_without_the_leader() {
    let mut c = start();
    let mut own: Vec<EtcdArbiter> = (0..3).map(|i| member_client(&c.etcd, i)).collect();
    let mut all = client(c.etcd.urls());
    // Every member is killed once: the leader first, then a follower (the leader moves as members
    // die), then the member left, whatever it is by then.
    let mut not_yet_killed: Vec<usize> = (0..3).collect();
    let mut roles = Vec::new();
    for round in 0..3 {
        let leader = c.etcd.wait_leader(RECOVERY).expect("a leader");
        let victim = match round {
            0 => leader,
            1 => *not_yet_killed
                .iter()
                .find(|&&i| i != leader)
                .expect("a follower not yet killed"),
            _ => not_yet_killed[0],
        };
        not_yet_killed.retain(|&i| i != victim);
        let survivors: Vec<usize> = (0..3).filter(|&i| i != victim).collect();
        let t = Instant::now();
        c.etcd.kill(victim).expect("kill");
        assert!(!c.etcd.is_running(victim));
        let new_leader = c
            .etcd
            .wait_leader(RECOVERY)
            .expect("a leader among the survivors");
        assert_ne!(new_leader, victim);
        let role = if victim == leader {
            "leader"
        } else {
            "follower"
        };
        roles.push(role);
        eprintln!(
            "killed member {victim} ({role}): leader {new_leader} after {:?}",
            t.elapsed()
        );

        // Each survivor's own client decides a fresh pair; the other survivor loses it.
        for &s in &survivors {
            let other = survivors[usize::from(survivors[0] == s)];
            let pair = format!("down-{victim}-by-{s}");
            let me = format!("host-{s}");
            let (d, calls) = decide(&mut own[s], &pair, &me, 3);
            assert_eq!(d, won(4), "{pair}");
            assert_eq!(
                decide(&mut own[other], &pair, &format!("host-{other}"), 3).0,
                lost(&me, 4),
                "{pair}"
            );
            assert_eq!(read(&mut own[other], &pair), Some((me, 4)), "{pair}");
            if calls > 1 {
                eprintln!("  {pair}: won after {calls} calls");
            }
        }
        // The killed member's own client gets no answer from it, and says so in bounded time.
        let took = assert_unavailable("the killed member's client", || {
            own[victim].current("down-any")
        });
        eprintln!("  the killed member's client: Unavailable in {took:?}");
        // A client of all three members decides too.
        let pair = format!("down-{victim}-all");
        let t = Instant::now();
        let (d, calls) = decide(&mut all, &pair, "host-all", 3);
        assert_eq!(d, won(4), "{pair}");
        assert_eq!(read(&mut all, &pair), Some(("host-all".into(), 4)));
        eprintln!(
            "  a client of all members: won after {calls} call(s), {:?}",
            t.elapsed()
        );

        let t = Instant::now();
        c.etcd.restart(victim).expect("restart");
        eprintln!(
            "  member {victim} restarted, healthy after {:?}",
            t.elapsed()
        );
        assert!(c.etcd.is_running(victim));
        // What was decided while it was down, it now reads (linearizable: it has caught up).
        for &s in &survivors {
            assert_eq!(
                read(&mut own[victim], &format!("down-{victim}-by-{s}")),
                Some((format!("host-{s}"), 4))
            );
        }
    }
    assert_eq!(&roles[..2], ["leader", "follower"]);
}

/// A client of all three members, its first member being member `first`.
fn client_starting_at(cluster: &EtcdCluster, first: usize) -> EtcdArbiter {
    let mut urls = cluster.urls();
    urls.rotate_left(first);
    client(urls)
}

#[test]
fn one_member_down_every_call_answers_at_once_on_kept_and_new_connections() {
    // A call that finds its member dead goes on to the next one within the same call, whether
    // its connection was kept from before the member died or is new. (etcd-client's balancing
    // kept a dead member in its random pick: one call in three or so failed outright.)
    const NEW_CLIENTS: usize = 12;
    let mut c = start();
    for role in ["follower", "leader"] {
        let leader = c.etcd.wait_leader(RECOVERY).expect("a leader");
        let victim = if role == "leader" {
            leader
        } else {
            (leader + 1) % 3
        };
        // One client kept connected to each member.
        let mut kept: Vec<EtcdArbiter> = (0..3)
            .map(|i| {
                let mut a = client_starting_at(&c.etcd, i);
                read(&mut a, "warm-up");
                a
            })
            .collect();
        c.etcd.kill(victim).expect("kill");
        let t = Instant::now();
        let new_leader = c
            .etcd
            .wait_leader(RECOVERY)
            .expect("a leader among the survivors");
        eprintln!(
            "killed member {victim} ({role}): leader {new_leader} after {:?}",
            t.elapsed()
        );
        let mut slowest = Duration::ZERO;
        let mut each = |a: &mut EtcdArbiter, pair: String| {
            let t = Instant::now();
            let d = a
                .test_and_set(&pair, "host-a", 0)
                .unwrap_or_else(|e| panic!("{pair}, member {victim} ({role}) down: {e}"));
            assert_eq!(d, won(1), "{pair}");
            assert_eq!(
                a.test_and_set(&pair, "host-b", 0).ok(),
                Some(lost("host-a", 1))
            );
            slowest = slowest.max(t.elapsed());
        };
        for (i, a) in kept.iter_mut().enumerate() {
            each(a, format!("{role}-down-kept-{i}"));
        }
        for n in 0..NEW_CLIENTS {
            each(
                &mut client_starting_at(&c.etcd, n % 3),
                format!("{role}-down-new-{n}"),
            );
        }
        eprintln!("  every call answered at once; slowest claim and check: {slowest:?}");
        assert!(slowest < CLIENT_TIMEOUT, "{slowest:?}");
        c.etcd.restart(victim).expect("restart");
    }
}

/// SIGCONT for a member stopped with SIGSTOP, when dropped.
struct Frozen(libc::pid_t);

impl Frozen {
    fn freeze(pid: u32) -> Frozen {
        let pid = libc::pid_t::try_from(pid).expect("pid");
        // SAFETY: kill(2) with a valid signal on our own child process, which is not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as in `freeze`.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

#[test]
fn a_silent_member_holds_a_call_for_a_share_of_the_timeout_only() {
    // A stopped member accepts connections (the kernel does) and answers nothing: a call to it,
    // on a kept connection or a new one, waits for its share of the timeout, then goes on to the
    // next member within the same call. (Before: the whole timeout, then one retry.)
    let mut c = start();
    let leader = c.etcd.wait_leader(RECOVERY).expect("a leader");
    let silent = (leader + 1) % 3;
    // A long timeout: each member's share (2 s) stands far above a call that does not wait for
    // the silent member, even on a machine busy enough to slow etcd's writes tenfold.
    let slow_client = |first: usize| {
        let mut urls = c.etcd.urls();
        urls.rotate_left(first);
        EtcdArbiter::new(urls)
            .expect("etcd client")
            .with_timeout(SILENT_TEST_TIMEOUT)
    };
    let share = SILENT_TEST_TIMEOUT / 3;
    let mut kept = slow_client(silent);
    read(&mut kept, "warm-up");
    let frozen = Frozen::freeze(c.etcd.pid(silent).expect("a running member"));
    let mut times = Vec::new();
    for (name, a) in [("kept", &mut kept), ("new", &mut slow_client(silent))] {
        let pair = format!("silent-{name}");
        let t = Instant::now();
        let d = a
            .test_and_set(&pair, "host-a", 0)
            .unwrap_or_else(|e| panic!("{name} connection, member {silent} stopped: {e}"));
        let took = t.elapsed();
        assert_eq!(d, won(1), "{pair}");
        assert!(took < SILENT_TEST_TIMEOUT, "{name}: {took:?}");
        times.push((name, took));
        // The next call starts at the next member: no wait.
        let t = Instant::now();
        assert_eq!(
            a.test_and_set(&pair, "host-b", 0).ok(),
            Some(lost("host-a", 1))
        );
        assert!(
            t.elapsed() < share / 2,
            "{name}: {:?} (a member's share of the timeout: {share:?})",
            t.elapsed()
        );
    }
    eprintln!("member {silent} stopped: first claims answered in {times:?}");
    drop(frozen);
}

#[test]
fn two_members_down_no_decision_until_one_returns() {
    let mut c = start();
    let mut all = client(c.etcd.urls());
    assert_eq!(decide(&mut all, "before", "host-a", 0).0, won(1));
    // Kill both followers: the survivor is the leader, which still believes it leads until its
    // election timeout without a quorum makes it step down (the harder case for the client).
    let leader = c.etcd.wait_leader(RECOVERY).expect("a leader");
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &f in &followers {
        c.etcd.kill(f).expect("kill");
    }
    let mut lone = member_client(&c.etcd, leader);
    let mut times = Vec::new();
    for attempt in 0..3 {
        for (name, a) in [
            ("the survivor's client", &mut lone),
            ("all members' client", &mut all),
        ] {
            times.push(assert_unavailable(
                &format!("{name}, test_and_set #{attempt} with 2 of 3 down"),
                || a.test_and_set("dark", "host-b", 0),
            ));
        }
    }
    // Reads need the quorum too (they are linearizable).
    times.push(assert_unavailable("a read with 2 of 3 down", || {
        all.current("before")
    }));
    eprintln!("2 of 3 members down: every call Unavailable, in {times:?}");
    assert!(!c.etcd.healthy(leader), "a lone member must not be healthy");

    let t = Instant::now();
    c.etcd.restart(followers[0]).expect("restart");
    eprintln!(
        "member {} restarted: healthy (quorum back) after {:?}",
        followers[0],
        t.elapsed()
    );
    // A call that timed out may still have been appended by the lone leader and committed now
    // that the quorum is back: an error means "no decision for you", not "nothing happened".
    let dark = read(&mut all, "dark");
    assert!(
        matches!(&dark, None | Some((_, 1))),
        "dark pair after the quorum came back: {dark:?}"
    );
    if let Some((winner, _)) = &dark {
        assert_eq!(winner, "host-b");
    }
    eprintln!("the pair asked about without a quorum, once it is back: {dark:?}");
    // Decisions again: the caller that got only errors retries and wins (recorded or not).
    assert_eq!(decide(&mut all, "dark", "host-b", 0).0, won(1));
    assert_eq!(decide(&mut all, "dark", "host-c", 0).0, lost("host-b", 1));
    assert_eq!(decide(&mut all, "after", "host-a", 0).0, won(1));
    // And the decision from before is still there, on the member that stayed up and the one
    // that came back.
    for i in [leader, followers[0]] {
        assert_eq!(
            read(&mut member_client(&c.etcd, i), "before"),
            Some(("host-a".into(), 1)),
            "member {i}"
        );
    }
}

#[test]
fn decisions_survive_killing_and_restarting_every_member() {
    let mut c = start();
    let mut all = client(c.etcd.urls());
    for p in 0..5 {
        assert_eq!(
            decide(&mut all, &format!("kept-{p}"), &format!("host-{p}"), 5).0,
            won(6)
        );
    }
    for i in 0..3 {
        c.etcd.kill(i).expect("kill");
        assert!(!c.etcd.is_running(i));
    }
    assert_unavailable("a read with every member down", || all.current("kept-0"));

    // The first member back has no quorum: it runs, but is not healthy.
    c.etcd.restart(0).expect("restart 0");
    assert!(c.etcd.is_running(0));
    assert!(
        !c.etcd.healthy(0),
        "one member of three must not be healthy"
    );
    let t = Instant::now();
    c.etcd.restart(2).expect("restart 2");
    c.etcd
        .wait_healthy(0, RECOVERY)
        .expect("member 0 healthy with member 2 back");
    eprintln!("2 of 3 members back: healthy after {:?}", t.elapsed());
    c.etcd.restart(1).expect("restart 1");

    for i in 0..3 {
        let mut a = member_client(&c.etcd, i);
        for p in 0..5 {
            let (pair, winner) = (format!("kept-{p}"), format!("host-{p}"));
            assert_eq!(
                read(&mut a, &pair),
                Some((winner.clone(), 6)),
                "{pair} on {i}"
            );
            assert_eq!(decide(&mut a, &pair, "rival", 5).0, lost(&winner, 6));
            assert_eq!(decide(&mut a, &pair, &winner, 5).0, won(6), "retry");
        }
    }

    // A member whose port another process took cannot come back, and says why; once the port is
    // free again, it can.
    c.etcd.kill(1).expect("kill 1");
    let url = c.etcd.member_url(1).expect("url");
    let port: u16 = url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).expect("taking the port");
    let err = c.etcd.restart(1).expect_err("the client port is taken");
    assert!(matches!(err, ClusterError::AddrInUse(_)), "{err:?}");
    assert!(err.to_string().contains("address already in use"), "{err}");
    assert!(!c.etcd.is_running(1));
    drop(squatter);
    c.etcd.restart(1).expect("restart 1 on its free port");
    assert_eq!(
        read(&mut member_client(&c.etcd, 1), "kept-0"),
        Some(("host-0".into(), 6))
    );

    // Misuse is refused with reasons.
    let err = c.etcd.kill(3).expect_err("no member 3");
    assert!(matches!(err, ClusterError::InvalidArgument(_)), "{err:?}");
    assert!(err.to_string().contains("members 0 to 2"), "{err}");
    let err = c.etcd.restart(1).expect_err("member 1 runs");
    assert!(err.to_string().contains("kill it"), "{err}");
    assert!(c.etcd.member_url(3).is_err());
    assert!(!c.etcd.is_running(3));
}
