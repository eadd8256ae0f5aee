//! The one test suite every backend must pass, written once over [`Fixture`]s.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use ft_arbiter::{Arbiter, ArbiterError, Decision, Record};

use super::Fixture;

/// Threads (or processes) racing in each round.
pub const RACERS: usize = 8;
/// Rounds of the in-process race.
pub const ROUNDS: usize = 50;
/// Rounds of the cross-process race.
pub const PROCESS_ROUNDS: usize = 20;
/// Time between the starts of two cross-process rounds.
const ROUND_SPACING_MS: u64 = 50;

fn won(epoch: u64) -> Decision {
    Decision::Won { epoch }
}

fn lost(winner: &str, epoch: u64) -> Decision {
    Decision::Lost {
        winner: winner.into(),
        epoch,
    }
}

fn tas(a: &mut impl Arbiter, pair: &str, candidate: &str, epoch: u64) -> Decision {
    a.test_and_set(pair, candidate, epoch)
        .unwrap_or_else(|e| panic!("test_and_set({pair}, {candidate}, {epoch}): {e}"))
}

fn current(a: &mut impl Arbiter, pair: &str) -> Option<(String, u64)> {
    a.current(pair)
        .unwrap_or_else(|e| panic!("current({pair}): {e}"))
}

/// Checks one round's answers: exactly one `Won { epoch + 1 }`, every other answer a `Lost`
/// naming that winner at that epoch. Returns the winner.
pub fn check_round(round: &str, epoch: u64, answers: &[(String, Decision)]) -> String {
    let winners: Vec<&String> = answers
        .iter()
        .filter(|(_, d)| d.won())
        .map(|(c, _)| c)
        .collect();
    assert_eq!(
        winners.len(),
        1,
        "round {round}: exactly one winner expected, got {answers:?}"
    );
    let winner = winners[0].clone();
    for (candidate, decision) in answers {
        let expected = if *candidate == winner {
            won(epoch + 1)
        } else {
            lost(&winner, epoch + 1)
        };
        assert_eq!(decision, &expected, "round {round}: answer to {candidate}");
    }
    winner
}

/// `RACERS` clients race `ROUNDS` times, each round on a fresh pair at epoch 7, released
/// together by a barrier.
fn race<A: Arbiter + 'static>(
    clients: Vec<A>,
    rounds: usize,
    pair_prefix: &str,
    epoch: u64,
) -> Vec<Vec<(String, Decision)>> {
    let barrier = Arc::new(Barrier::new(clients.len()));
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut arbiter)| {
            let barrier = barrier.clone();
            let pair_prefix = pair_prefix.to_owned();
            std::thread::spawn(move || {
                let candidate = format!("host-{i}");
                (0..rounds)
                    .map(|round| {
                        barrier.wait();
                        let pair = format!("{pair_prefix}-{round}");
                        let d = tas(&mut arbiter, &pair, &candidate, epoch);
                        (candidate.clone(), d)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let per_thread: Vec<Vec<(String, Decision)>> = threads
        .into_iter()
        .map(|t| t.join().expect("racer thread"))
        .collect();
    (0..rounds)
        .map(|round| per_thread.iter().map(|t| t[round].clone()).collect())
        .collect()
}

pub fn race_exactly_one_winner<F: Fixture>() {
    let start = Instant::now();
    let fixture = F::start();
    let clients: Vec<_> = (0..RACERS).map(|_| fixture.client()).collect();
    let rounds = race(clients, ROUNDS, "race", 7);
    let mut wins = BTreeMap::<String, usize>::new();
    let mut check = fixture.client();
    for (round, answers) in rounds.iter().enumerate() {
        let winner = check_round(&round.to_string(), 7, answers);
        assert_eq!(
            current(&mut check, &format!("race-{round}")),
            Some((winner.clone(), 8)),
            "round {round}: current must report the winner"
        );
        *wins.entry(winner).or_default() += 1;
    }
    eprintln!(
        "{RACERS} racers x {ROUNDS} rounds: one winner each round; wins per racer {wins:?}; {:?}",
        start.elapsed()
    );
}

/// The child side of [`race_across_processes`]: races through the rounds and prints each answer.
pub fn child_worker() {
    let Ok(spec) = std::env::var("FT_ARBITER_CHILD_SPEC") else {
        return; // an ordinary test run: nothing to do
    };
    let me = std::env::var("FT_ARBITER_CHILD_NAME").expect("child name");
    let rounds: usize = std::env::var("FT_ARBITER_CHILD_ROUNDS")
        .expect("rounds")
        .parse()
        .expect("rounds number");
    let start_at: u64 = std::env::var("FT_ARBITER_CHILD_START_MS")
        .expect("start time")
        .parse()
        .expect("start time number");
    let spec: ft_arbiter::ArbiterSpec = spec.parse().expect("spec");
    // Generous timeouts: eight processes share two cores with the backend.
    let mut arbiter: Box<dyn Arbiter> = match spec {
        ft_arbiter::ArbiterSpec::Server(addr) => Box::new(
            ft_arbiter::ServerArbiter::new(addr, super::key())
                .with_timeouts(Duration::from_secs(2), Duration::from_secs(10)),
        ),
        #[cfg(feature = "etcd")]
        ft_arbiter::ArbiterSpec::Etcd(urls) => Box::new(
            ft_arbiter::EtcdArbiter::new(urls)
                .expect("etcd client")
                .with_timeout(Duration::from_secs(10)),
        ),
        other => other.open(None).expect("opening the arbiter"),
    };
    // Connect first, then start together with the other processes.
    arbiter.current("xproc-warmup").expect("warming up");
    for round in 0..rounds {
        // Every round starts at the same moment in every process, so each one is a real race.
        let now = unix_ms();
        let at = start_at + (round as u64) * ROUND_SPACING_MS;
        if at > now {
            std::thread::sleep(Duration::from_millis(at - now));
        }
        let pair = format!("xproc-{round}");
        match arbiter.test_and_set(&pair, &me, 3) {
            Ok(Decision::Won { epoch }) => println!("ARB {round} won {epoch}"),
            Ok(Decision::Lost { winner, epoch }) => println!("ARB {round} lost {winner} {epoch}"),
            Err(e) => println!("ARB {round} error {e}"),
        }
    }
}

/// `RACERS` processes (this test binary re-run as [`child_worker`]) race through
/// `PROCESS_ROUNDS` pairs at once.
pub fn race_across_processes<F: Fixture>() {
    let start = Instant::now();
    let fixture = F::start();
    let exe = std::env::current_exe().expect("test binary");
    let start_at = unix_ms() + 1000;
    let children: Vec<_> = (0..RACERS)
        .map(|i| {
            let name = format!("proc-{i}");
            let child = Command::new(&exe)
                .args(["child_worker", "--exact", "--nocapture", "--test-threads=1"])
                .env("FT_ARBITER_CHILD_SPEC", fixture.spec())
                .env("FT_ARBITER_CHILD_NAME", &name)
                .env("FT_ARBITER_CHILD_ROUNDS", PROCESS_ROUNDS.to_string())
                .env("FT_ARBITER_CHILD_START_MS", start_at.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawning a racer process");
            (name, child)
        })
        .collect();
    let mut rounds: Vec<Vec<(String, Decision)>> = vec![Vec::new(); PROCESS_ROUNDS];
    for (name, child) in children {
        let out = child.wait_with_output().expect("racer process");
        assert!(out.status.success(), "{name} failed: {:?}", out.status);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut seen = 0;
        // The harness may print "test child_worker ... " before the first line.
        for line in stdout
            .lines()
            .filter_map(|l| l.find("ARB ").map(|i| &l[i + 4..]))
        {
            let f: Vec<&str> = line.split(' ').collect();
            let round: usize = f[0].parse().expect("round");
            let decision = match f[1] {
                "won" => won(f[2].parse().expect("epoch")),
                "lost" => lost(f[2], f[3].parse().expect("epoch")),
                _ => panic!("{name}, round {round}: {line}"),
            };
            rounds[round].push((name.clone(), decision));
            seen += 1;
        }
        assert_eq!(
            seen, PROCESS_ROUNDS,
            "{name} answered every round:\n{stdout}"
        );
    }
    let mut wins = BTreeMap::<String, usize>::new();
    for (round, answers) in rounds.iter().enumerate() {
        *wins
            .entry(check_round(&format!("xproc-{round}"), 3, answers))
            .or_default() += 1;
    }
    eprintln!(
        "{RACERS} processes x {PROCESS_ROUNDS} rounds: one winner each round; wins per process \
         {wins:?}; {:?} (rounds start every {ROUND_SPACING_MS} ms)",
        start.elapsed()
    );
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn later_epochs_can_win_again<F: Fixture>() {
    let fixture = F::start();
    let (mut a, mut b, mut c) = (fixture.client(), fixture.client(), fixture.client());
    let p = "pair-later";
    // Round 1: a and b split at epoch 1; a wins epoch 2.
    assert_eq!(tas(&mut a, p, "a", 1), won(2));
    assert_eq!(tas(&mut b, p, "b", 1), lost("a", 2));
    // a attaches a new backup c at epoch 2; they split; c gets there first.
    assert_eq!(tas(&mut c, p, "c", 2), won(3));
    assert_eq!(tas(&mut a, p, "a", 2), lost("c", 3));
    // c and a (re-attached at 3) split again: a wins epoch 4.
    assert_eq!(tas(&mut a, p, "a", 3), won(4));
    assert_eq!(tas(&mut c, p, "c", 3), lost("a", 4));
    assert_eq!(current(&mut b, p), Some(("a".into(), 4)));
}

pub fn stale_epoch_loses<F: Fixture>() {
    let fixture = F::start();
    let (mut a, mut b) = (fixture.client(), fixture.client());
    let p = "pair-stale";
    assert_eq!(tas(&mut a, p, "a", 5), won(6));
    for stale in [5, 4, 1, 0] {
        assert_eq!(tas(&mut b, p, "b", stale), lost("a", 6), "epoch {stale}");
    }
    // A later round, then the old winner retrying its old round: it lost its place.
    assert_eq!(tas(&mut b, p, "b", 6), won(7));
    assert_eq!(tas(&mut a, p, "a", 5), lost("b", 7));
    assert_eq!(tas(&mut a, p, "a", 0), lost("b", 7));
    // Fencing: a replica in epoch 6 is deposed, one in 7 is not.
    assert!(a.deposed(p, 6).expect("deposed"));
    assert!(!a.deposed(p, 7).expect("deposed"));
    // An epoch far ahead of every decision (say, configured by hand) may still win, above all.
    assert_eq!(tas(&mut a, p, "a", 40), won(41));
    assert_eq!(tas(&mut b, p, "b", 7), lost("a", 41));
}

pub fn winner_retry_is_idempotent<F: Fixture>() {
    let fixture = F::start();
    let (mut a, mut a_again, mut b) = (fixture.client(), fixture.client(), fixture.client());
    let p = "pair-retry";
    assert_eq!(tas(&mut a, p, "host-a", 1), won(2));
    // The answer was lost; the same candidate asks again, on the same or a new connection.
    assert_eq!(tas(&mut a, p, "host-a", 1), won(2));
    assert_eq!(tas(&mut a_again, p, "host-a", 1), won(2));
    assert_eq!(tas(&mut b, p, "host-b", 1), lost("host-a", 2));
    assert_eq!(current(&mut b, p), Some(("host-a".into(), 2)));
}

pub fn current_reports_the_decision<F: Fixture>() {
    let fixture = F::start();
    let (mut a, mut b) = (fixture.client(), fixture.client());
    assert_eq!(current(&mut a, "pair-p"), None);
    assert!(!a.deposed("pair-p", 0).expect("deposed"));
    assert_eq!(tas(&mut a, "pair-p", "a", 10), won(11));
    assert_eq!(current(&mut b, "pair-p"), Some(("a".into(), 11)));
    // Pairs are independent.
    assert_eq!(current(&mut b, "pair-q"), None);
    assert_eq!(tas(&mut b, "pair-q", "b", 0), won(1));
    assert_eq!(current(&mut a, "pair-q"), Some(("b".into(), 1)));
    assert_eq!(current(&mut a, "pair-p"), Some(("a".into(), 11)));
    // A pair whose id is a prefix of another's does not see the other's decisions.
    assert_eq!(current(&mut a, "pair"), None);
}

fn record(winner: &str, epoch: u64, joins_at: Option<&str>) -> Option<Record> {
    Some(Record {
        winner: winner.into(),
        epoch,
        joins_at: joins_at.map(str::to_owned),
    })
}

fn latest(a: &mut impl Arbiter, pair: &str) -> Option<Record> {
    a.latest(pair)
        .unwrap_or_else(|e| panic!("latest({pair}): {e}"))
}

/// Each epoch's winner is kept with where it accepts joins; a loser's claim changes nothing.
pub fn join_address_is_kept_with_the_winner<F: Fixture>() {
    let mut fixture = F::start();
    let (mut a, mut b) = (fixture.client(), fixture.client());
    let (p, addr_a, addr_b) = ("pair-j", "127.0.0.1:7420", "/run/ftvm/node-b/joins.sock");
    assert_eq!(latest(&mut a, p), None);
    // A new pair: both nodes claim epoch 1 with their join addresses; one wins.
    assert_eq!(
        a.claim(p, "node-a.1", 0, Some(addr_a)).expect("claim"),
        won(1)
    );
    assert_eq!(
        b.claim(p, "node-b.1", 0, Some(addr_b)).expect("claim"),
        lost("node-a.1", 1)
    );
    assert_eq!(latest(&mut b, p), record("node-a.1", 1, Some(addr_a)));
    assert_eq!(current(&mut b, p), Some(("node-a.1".into(), 1)));
    // The winner's retry wins again and keeps its address (even if it sends another).
    assert_eq!(
        a.claim(p, "node-a.1", 0, Some(addr_b)).expect("retry"),
        won(1)
    );
    assert_eq!(latest(&mut a, p), record("node-a.1", 1, Some(addr_a)));
    // A takeover records the new winner's address; one without an address records none.
    assert_eq!(
        b.claim(p, "node-b.2", 1, Some(addr_b)).expect("claim"),
        won(2)
    );
    assert_eq!(latest(&mut a, p), record("node-b.2", 2, Some(addr_b)));
    assert_eq!(tas(&mut a, p, "node-a.2", 2), won(3));
    assert_eq!(latest(&mut b, p), record("node-a.2", 3, None));
    // Kept across a restart of the backend.
    assert_eq!(
        a.claim("pair-k", "node-a.3", 4, Some(addr_a))
            .expect("claim"),
        won(5)
    );
    fixture.take_down();
    fixture.bring_up();
    let mut c = fixture.client();
    assert_eq!(
        latest(&mut c, "pair-k"),
        record("node-a.3", 5, Some(addr_a))
    );
    assert_eq!(latest(&mut c, p), record("node-a.2", 3, None));
    // Addresses no backend could keep are refused before anything is decided.
    for bad in [
        "",
        "two words",
        "line\nbreak",
        &"x".repeat(ft_arbiter::MAX_JOINS_AT + 1),
    ] {
        match c.claim(p, "node-c", 3, Some(bad)) {
            Err(ArbiterError::InvalidArgument(_)) => {}
            other => panic!("join address {bad:?} gave {other:?}"),
        }
    }
    assert_eq!(latest(&mut c, p), record("node-a.2", 3, None));
}

pub fn invalid_arguments_are_refused<F: Fixture>() {
    let fixture = F::start();
    let mut a = fixture.client();
    for (pair, candidate, epoch) in [
        ("", "a", 1),
        ("a/b", "a", 1),
        ("../x", "a", 1),
        ("p", "", 1),
        ("p", "two words", 1),
        ("p", "a", u64::MAX),
    ] {
        match a.test_and_set(pair, candidate, epoch) {
            Err(ArbiterError::InvalidArgument(_)) => {}
            other => panic!("({pair:?}, {candidate:?}, {epoch}) gave {other:?}"),
        }
    }
    assert!(matches!(
        a.current("a/b"),
        Err(ArbiterError::InvalidArgument(_))
    ));
    assert_eq!(current(&mut a, "p"), None);
}

pub fn decision_survives_restart<F: Fixture>() {
    let mut fixture = F::start();
    let mut a = fixture.client();
    assert_eq!(tas(&mut a, "pair-r", "a", 2), won(3));
    fixture.take_down();
    fixture.bring_up();
    let mut b = fixture.client();
    assert_eq!(current(&mut b, "pair-r"), Some(("a".into(), 3)));
    assert_eq!(tas(&mut b, "pair-r", "b", 2), lost("a", 3));
    // The client from before the restart works on.
    assert_eq!(current(&mut a, "pair-r"), Some(("a".into(), 3)));
}

/// Clients that kept their connection from before a restart of the backend decide correctly,
/// each at its first call and well within its timeout (a connection the restart closed fails at
/// once and is replaced; it does not wait out a timeout).
pub fn kept_clients_decide_after_a_restart<F: Fixture>() {
    let mut fixture = F::start();
    let mut a = fixture.client();
    let mut b = fixture.client();
    assert_eq!(tas(&mut a, "kept-1", "a", 4), won(5));
    assert_eq!(current(&mut b, "kept-1"), Some(("a".into(), 5)));
    fixture.take_down();
    fixture.bring_up();
    let bound = Duration::from_secs(5);
    let timed = |what: &str, call: &mut dyn FnMut() -> Decision| {
        let t = Instant::now();
        let d = call();
        assert!(t.elapsed() < bound, "{what}: {:?}", t.elapsed());
        d
    };
    assert_eq!(
        timed("the loser's claim", &mut || tas(&mut b, "kept-1", "b", 4)),
        lost("a", 5)
    );
    assert_eq!(
        timed("the winner's retry", &mut || tas(&mut a, "kept-1", "a", 4)),
        won(5)
    );
    assert_eq!(
        timed("a new pair", &mut || tas(&mut b, "kept-2", "b", 0)),
        won(1)
    );
    assert_eq!(
        timed("the next epoch", &mut || tas(&mut a, "kept-1", "a", 5)),
        won(6)
    );
}

pub fn down_is_unavailable_then_one_winner<F: Fixture>() {
    let mut fixture = F::start();
    let mut clients: Vec<_> = (0..RACERS).map(|_| fixture.client()).collect();
    assert_eq!(tas(&mut clients[0], "pair-before", "host-0", 1), won(2));
    fixture.take_down();
    let mut slowest = Duration::ZERO;
    for (i, c) in clients.iter_mut().enumerate() {
        let t = Instant::now();
        match c.test_and_set("pair-down", &format!("host-{i}"), 1) {
            Err(e) if e.is_unavailable() => {}
            other => panic!("test_and_set with the arbiter down gave {other:?}"),
        }
        match c.current("pair-before") {
            Err(e) if e.is_unavailable() => {}
            other => panic!("current with the arbiter down gave {other:?}"),
        }
        slowest = slowest.max(t.elapsed());
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "an unavailable arbiter must fail in bounded time, took {:?}",
            t.elapsed()
        );
    }
    eprintln!("backend down: every call Unavailable, slowest {slowest:?}");
    fixture.bring_up();
    // The same clients (their connections died with the backend) race once it is back.
    let rounds = race(clients, 1, "pair-down", 1);
    check_round("after restart", 1, &rounds[0]);
    let mut check = fixture.client();
    assert_eq!(
        current(&mut check, "pair-before"),
        Some(("host-0".into(), 2))
    );
}
