//! ftvm's failover arbiter: an atomic test-and-set, with fencing epochs, that decides which side
//! of a split pair may go live.
//!
//! When the log channel between primary and backup goes silent, neither side can tell a dead
//! peer from a cut link. Each survivor therefore asks a third party, the arbiter, and goes live
//! only if the arbiter says [`Decision::Won`]; the loser halts. This crate holds the one
//! [`Arbiter`] trait and three backends that implement it:
//!
//! - [`file`](mod@file): a directory on storage both hosts mount (local disk for tests, NFS or a cluster
//!   filesystem in production), decided by atomic `link(2)`;
//! - [`server`]: a small arbiter server ([`ArbiterServer`]) with a durable log, reached by
//!   [`ServerArbiter`] over TCP after ftvm's pre-shared-key handshake;
//! - `etcd`: an etcd v3 cluster (`EtcdArbiter`), decided by one transaction; behind the cargo
//!   feature `etcd` (on by default; its build needs protoc).
//!
//! [`warm_up`] makes a client's connection before its first decision is needed.
//!
//! # Semantics
//!
//! Every FT pair has a **pair id**, and every replica runs in a **fencing epoch** (a `u64`): the
//! epoch travels in every log frame and every released output, and the newest epoch wins
//! everywhere (the channel handshake refuses an older primary, the output path refuses an older
//! sender). The arbiter keeps, per pair, a history of decisions `(winner, epoch)` whose epochs
//! strictly increase. [`Arbiter::test_and_set`]`(pair, candidate, e)` is one atomic step:
//!
//! - if the pair has no decision at an epoch **greater than `e`**, it records `candidate` as the
//!   winner at epoch `e + 1` (which is then greater than every epoch recorded for the pair) and
//!   returns [`Decision::Won`]` { epoch: e + 1 }`;
//! - otherwise it returns [`Decision::Lost`] with the latest decision (its winner and epoch,
//!   which is `> e`) — except that the recorded winner of exactly epoch `e + 1` asking again gets
//!   `Won { epoch: e + 1 }` again, so a caller whose answer was lost (timeout, crash, dropped
//!   connection) can simply retry. Candidates must therefore be unique per replica (host name and
//!   VMM instance, say); two replicas sharing a name would share a win.
//!
//! **One round.** Both survivors of a split were running in the same epoch `e` and call
//! `test_and_set(pair, me, e)`. The first to reach the arbiter wins epoch `e + 1`; the second
//! finds a decision at `e + 1 > e` and loses, naming the winner. Exactly one side goes live, and
//! it runs in epoch `e + 1`, so everything it sends outranks everything the deposed side ever
//! sent.
//!
//! **Later rounds.** The winner attaches a new backup in its epoch `e + 1`; when that pair
//! splits, both call with `e + 1` and one wins `e + 2`. A straggler still holding `e` (the old
//! loser, or an old primary that was merely paused) loses against the decision at `e + 2`.
//!
//! **Fencing.** Winning is not enough to be safe against a primary that was paused rather than
//! dead: it may wake up still believing it is live. The epochs are fencing tokens in the sense
//! of Chubby's sequencers (Burrows, OSDI 2006) and Kleppmann's fencing tokens ("How to do
//! distributed locking", 2016): every output a primary releases carries its epoch, and whatever
//! stands between the primary and the client (the backup's channel, the output path, a client
//! proxy) refuses an epoch lower than the newest it has seen; before releasing output after any
//! doubt, a primary can also ask [`Arbiter::deposed`]. A deposed primary thus never gets an
//! output to a client, even if it runs on.
//!
//! **Errors.** Every error, in particular [`ArbiterError::Unavailable`] for an unreachable
//! backend, means "no decision for you": the caller stays halted and may retry. Only a `Won` lets
//! a replica go live. All three backends answer only after the decision is durable (fsync, or an
//! etcd commit), so a decision survives a crash and restart of the arbiter.
//!
//! # Example
//!
//! ```
//! use ft_arbiter::{Arbiter, Decision, FileArbiter};
//!
//! # fn main() -> Result<(), ft_arbiter::ArbiterError> {
//! # let dir = std::env::temp_dir().join(format!("ft-arbiter-doc-{}", std::process::id()));
//! FileArbiter::init(&dir)?; // once, when the shared storage is set up (`ftvm arbiter init file:DIR`)
//! let mut host_a = FileArbiter::open(&dir)?;
//! let mut host_b = FileArbiter::open(&dir)?;
//! // Both survivors ran in epoch 4.
//! assert_eq!(host_a.test_and_set("pair-1", "host-a", 4)?, Decision::Won { epoch: 5 });
//! assert_eq!(
//!     host_b.test_and_set("pair-1", "host-b", 4)?,
//!     Decision::Lost { winner: "host-a".into(), epoch: 5 }
//! );
//! assert!(host_b.deposed("pair-1", 4)?);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok(())
//! # }
//! ```

pub mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
#[cfg(feature = "etcd")]
pub mod etcd_cluster;
pub mod file;
pub mod server;
pub mod warm;

use std::path::PathBuf;
use std::str::FromStr;

pub use error::ArbiterError;
#[cfg(feature = "etcd")]
pub use etcd::EtcdArbiter;
pub use file::FileArbiter;
pub use server::{ArbiterServer, ServerArbiter, ServerStats, StopHandle};
pub use transport::PreSharedKey;
pub use warm::warm_up;

/// Longest pair id, in bytes.
pub const MAX_PAIR_ID: usize = 128;
/// Longest candidate name, in bytes.
pub const MAX_CANDIDATE: usize = 255;
/// Longest join address, in bytes.
pub const MAX_JOINS_AT: usize = 255;

/// The arbiter's answer to [`Arbiter::test_and_set`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The caller won: it may go live, running in `epoch`.
    Won {
        /// The new fencing epoch (the caller's epoch + 1).
        epoch: u64,
    },
    /// Another candidate holds a decision at a newer epoch: the caller must halt.
    Lost {
        /// The latest winner.
        winner: String,
        /// The latest winner's epoch (greater than the caller's).
        epoch: u64,
    },
}

impl Decision {
    /// True for [`Decision::Won`].
    pub fn won(&self) -> bool {
        matches!(self, Decision::Won { .. })
    }

    /// The epoch of the decision, won or lost.
    pub fn epoch(&self) -> u64 {
        match self {
            Decision::Won { epoch } | Decision::Lost { epoch, .. } => *epoch,
        }
    }
}

/// A pair's latest decision as the arbiter keeps it: the winner, its epoch, and where the winner
/// said it accepts joining backups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The winner (a candidate name).
    pub winner: String,
    /// The winner's epoch.
    pub epoch: u64,
    /// Where the winner accepts joining backups (`host:port` or a Unix socket path), if it
    /// said when it claimed the epoch: a new backup of the pair joins there.
    pub joins_at: Option<String>,
}

/// An atomic test-and-set on fencing epochs; see the [crate docs](crate) for the semantics.
pub trait Arbiter: Send {
    /// Atomically: if the pair has no decision at an epoch greater than `epoch`, records
    /// `candidate` as the winner at `epoch + 1` (greater than every epoch recorded for the pair),
    /// together with `joins_at`, where the winner accepts joining backups, and returns
    /// `Won { epoch: epoch + 1 }`; otherwise returns `Lost` with the latest decision. The
    /// recorded winner of exactly `epoch + 1` retrying gets `Won` again (and its decision keeps
    /// the `joins_at` it was recorded with). Answers only once the decision is durable.
    /// Unreachable backends give [`ArbiterError::Unavailable`]: callers must never go live
    /// without a `Won`.
    fn claim(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
        joins_at: Option<&str>,
    ) -> Result<Decision, ArbiterError>;

    /// [`Arbiter::claim`] without a join address.
    fn test_and_set(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
    ) -> Result<Decision, ArbiterError> {
        self.claim(pair_id, candidate, epoch, None)
    }

    /// The pair's latest decision, with its join address, if any.
    fn latest(&mut self, pair_id: &str) -> Result<Option<Record>, ArbiterError>;

    /// The latest decision for the pair, `(winner, epoch)`, if any (for fencing checks and
    /// diagnostics).
    fn current(&mut self, pair_id: &str) -> Result<Option<(String, u64)>, ArbiterError> {
        Ok(self.latest(pair_id)?.map(|r| (r.winner, r.epoch)))
    }

    /// True if a replica running in `epoch` has been deposed: the pair has a decision at a
    /// greater epoch. A replica that gets `true`, or an error, must not release output.
    fn deposed(&mut self, pair_id: &str, epoch: u64) -> Result<bool, ArbiterError> {
        Ok(matches!(self.current(pair_id)?, Some((_, latest)) if latest > epoch))
    }
}

impl<A: Arbiter + ?Sized> Arbiter for Box<A> {
    fn claim(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
        joins_at: Option<&str>,
    ) -> Result<Decision, ArbiterError> {
        (**self).claim(pair_id, candidate, epoch, joins_at)
    }

    fn test_and_set(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
    ) -> Result<Decision, ArbiterError> {
        (**self).test_and_set(pair_id, candidate, epoch)
    }

    fn latest(&mut self, pair_id: &str) -> Result<Option<Record>, ArbiterError> {
        (**self).latest(pair_id)
    }

    fn current(&mut self, pair_id: &str) -> Result<Option<(String, u64)>, ArbiterError> {
        (**self).current(pair_id)
    }

    fn deposed(&mut self, pair_id: &str, epoch: u64) -> Result<bool, ArbiterError> {
        (**self).deposed(pair_id, epoch)
    }
}

/// Checks a pair id: 1 to [`MAX_PAIR_ID`] bytes of `[A-Za-z0-9._-]`, not starting with `.`
/// (pair ids name files and etcd keys).
pub fn validate_pair_id(pair_id: &str) -> Result<(), ArbiterError> {
    let ok = !pair_id.is_empty()
        && pair_id.len() <= MAX_PAIR_ID
        && !pair_id.starts_with('.')
        && pair_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ArbiterError::InvalidArgument(format!(
            "pair id {pair_id:?}: need 1-{MAX_PAIR_ID} bytes of [A-Za-z0-9._-], not starting with '.'"
        )))
    }
}

/// Checks a candidate name: 1 to [`MAX_CANDIDATE`] printable ASCII bytes without spaces.
pub fn validate_candidate(candidate: &str) -> Result<(), ArbiterError> {
    validate_token("candidate", candidate, MAX_CANDIDATE)
}

/// Checks a join address: 1 to [`MAX_JOINS_AT`] printable ASCII bytes without spaces.
pub fn validate_joins_at(addr: &str) -> Result<(), ArbiterError> {
    validate_token("join address", addr, MAX_JOINS_AT)
}

/// `what` must be 1 to `max` printable ASCII bytes without spaces (backends store it as text).
fn validate_token(what: &str, s: &str, max: usize) -> Result<(), ArbiterError> {
    if !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ArbiterError::InvalidArgument(format!(
            "{what} {s:?}: need 1-{max} printable ASCII bytes without spaces"
        )))
    }
}

/// Checks the arguments of a claim and returns the epoch a win would get.
pub(crate) fn validate_request(
    pair_id: &str,
    candidate: &str,
    epoch: u64,
    joins_at: Option<&str>,
) -> Result<u64, ArbiterError> {
    validate_pair_id(pair_id)?;
    validate_candidate(candidate)?;
    if let Some(addr) = joins_at {
        validate_joins_at(addr)?;
    }
    epoch
        .checked_add(1)
        .ok_or_else(|| ArbiterError::InvalidArgument(format!("epoch {epoch} has no successor")))
}

/// The decision a backend returns when the pair's latest decision is `(winner, latest)` and the
/// caller asked with `epoch` on behalf of `candidate`; `None` if the caller may claim `epoch + 1`.
pub(crate) fn decide_against(
    latest: Option<(&str, u64)>,
    candidate: &str,
    epoch: u64,
) -> Option<Decision> {
    match latest {
        Some((winner, latest)) if latest > epoch => {
            if latest == epoch.wrapping_add(1) && winner == candidate {
                Some(Decision::Won { epoch: latest })
            } else {
                Some(Decision::Lost {
                    winner: winner.to_owned(),
                    epoch: latest,
                })
            }
        }
        _ => None,
    }
}

/// Where the arbiter is, as one string (for configuration files and command lines):
///
/// - `file:/mnt/shared/ftvm` — a [`FileArbiter`] store;
/// - `server:arbiter.example:7410` — an [`ArbiterServer`] (needs the pre-shared key);
/// - `etcd:http://10.0.0.1:2379,http://10.0.0.2:2379` — an etcd cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArbiterSpec {
    /// A [`FileArbiter`] store directory.
    File(PathBuf),
    /// An [`ArbiterServer`] address, `host:port`.
    Server(String),
    /// etcd client URLs.
    Etcd(Vec<String>),
}

impl FromStr for ArbiterSpec {
    type Err = ArbiterError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            ArbiterError::InvalidArgument(format!(
                "arbiter {s:?}: expected file:DIR, server:HOST:PORT or etcd:URL[,URL...]"
            ))
        };
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match kind {
            "file" => Ok(ArbiterSpec::File(PathBuf::from(rest))),
            "server" => Ok(ArbiterSpec::Server(rest.to_owned())),
            "etcd" if cfg!(feature = "etcd") => Ok(ArbiterSpec::Etcd(
                rest.split(',').map(str::to_owned).collect(),
            )),
            "etcd" => Err(etcd_not_built()),
            _ => Err(bad()),
        }
    }
}

impl std::fmt::Display for ArbiterSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ArbiterSpec::File(dir) => write!(f, "file:{}", dir.display()),
            ArbiterSpec::Server(addr) => write!(f, "server:{addr}"),
            ArbiterSpec::Etcd(urls) => write!(f, "etcd:{}", urls.join(",")),
        }
    }
}

/// The error for an `etcd:` arbiter in a build without the `etcd` feature.
fn etcd_not_built() -> ArbiterError {
    ArbiterError::NotBuilt(
        "the etcd arbiter backend: rebuild with the cargo feature `etcd` (on by default; \
         `cargo build --features etcd`; it needs protoc, Debian's protobuf-compiler)",
    )
}

/// What [`ArbiterSpec::init`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InitOutcome {
    /// A [`FileArbiter`] store, created by this call or found in place (and checked by opening
    /// it).
    FileStore {
        /// The store's own directory (`DIR/ftvm-arbiter`).
        store_dir: PathBuf,
        /// The store's random id.
        store_id: String,
        /// True if this call created the store; false if it was already there (left as it was).
        created: bool,
    },
    /// This kind of arbiter has nothing to create; the text says why.
    NotNeeded(&'static str),
}

impl std::fmt::Display for InitOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InitOutcome::FileStore {
                store_dir,
                store_id,
                created: true,
            } => write!(
                f,
                "created arbiter store {} (id {store_id})",
                store_dir.display()
            ),
            InitOutcome::FileStore {
                store_dir,
                store_id,
                created: false,
            } => write!(
                f,
                "arbiter store {} already exists (id {store_id}); left as it was",
                store_dir.display()
            ),
            InitOutcome::NotNeeded(why) => f.write_str(why),
        }
    }
}

impl ArbiterSpec {
    /// Opens a client of this arbiter with default settings. `key` is needed for `server:`.
    pub fn open(&self, key: Option<&PreSharedKey>) -> Result<Box<dyn Arbiter>, ArbiterError> {
        Ok(match self {
            ArbiterSpec::File(dir) => Box::new(FileArbiter::open(dir)?),
            ArbiterSpec::Server(addr) => {
                let key = key.ok_or_else(|| {
                    ArbiterError::InvalidArgument(
                        "a server arbiter needs the pre-shared key".into(),
                    )
                })?;
                Box::new(ServerArbiter::new(addr.clone(), key.clone()))
            }
            #[cfg(feature = "etcd")]
            ArbiterSpec::Etcd(urls) => Box::new(EtcdArbiter::new(urls.clone())?),
            #[cfg(not(feature = "etcd"))]
            ArbiterSpec::Etcd(_) => return Err(etcd_not_built()),
        })
    }

    /// Prepares the arbiter for its first decision (`ftvm arbiter init`). For `file:DIR` this is
    /// [`FileArbiter::init`]: it creates `DIR` if missing and the store in it, or checks the store
    /// already there; idempotent. `server:` and `etcd:` have nothing to create and return
    /// [`InitOutcome::NotNeeded`] (the server creates its decision log when it starts; etcd keys
    /// appear with a pair's first decision).
    pub fn init(&self) -> Result<InitOutcome, ArbiterError> {
        match self {
            ArbiterSpec::File(dir) => {
                let (store, created) = FileArbiter::init(dir)?;
                Ok(InitOutcome::FileStore {
                    store_dir: store.store_dir().to_owned(),
                    store_id: store.store_id().to_owned(),
                    created,
                })
            }
            ArbiterSpec::Server(_) => Ok(InitOutcome::NotNeeded(
                "a server arbiter needs no init: `ftvm arbiter serve --state-dir DIR` creates its \
                 decision log when it starts",
            )),
            ArbiterSpec::Etcd(_) if !cfg!(feature = "etcd") => Err(etcd_not_built()),
            ArbiterSpec::Etcd(_) => Ok(InitOutcome::NotNeeded(
                "an etcd arbiter needs no init: a pair's keys are created by its first decision \
                 (the etcd cluster must be running)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decide_against_follows_the_rules() {
        assert_eq!(decide_against(None, "a", 3), None);
        assert_eq!(decide_against(Some(("b", 3)), "a", 3), None);
        assert_eq!(decide_against(Some(("b", 2)), "a", 3), None);
        assert_eq!(
            decide_against(Some(("b", 4)), "a", 3),
            Some(Decision::Lost {
                winner: "b".into(),
                epoch: 4
            })
        );
        // The recorded winner of e+1 retrying wins again; of a later epoch, it does not.
        assert_eq!(
            decide_against(Some(("a", 4)), "a", 3),
            Some(Decision::Won { epoch: 4 })
        );
        assert_eq!(
            decide_against(Some(("a", 5)), "a", 3),
            Some(Decision::Lost {
                winner: "a".into(),
                epoch: 5
            })
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_pair_id("pair-1.a_b").is_ok());
        for bad in [
            "",
            ".hidden",
            "a/b",
            "a b",
            "ü",
            &"x".repeat(MAX_PAIR_ID + 1),
        ] {
            assert!(validate_pair_id(bad).is_err(), "{bad:?}");
        }
        assert!(validate_candidate("host-a:1234@vmm").is_ok());
        for bad in ["", "a b", "a\nb", &"x".repeat(MAX_CANDIDATE + 1)] {
            assert!(validate_candidate(bad).is_err(), "{bad:?}");
        }
        assert!(validate_request("p", "c", u64::MAX, None).is_err());
        assert_eq!(validate_request("p", "c", 7, None).ok(), Some(8));
        assert_eq!(
            validate_request("p", "c", 7, Some("/run/ftvm/joins.sock")).ok(),
            Some(8)
        );
        assert_eq!(
            validate_request("p", "c", 7, Some("10.0.0.1:7420")).ok(),
            Some(8)
        );
        for bad in ["", "a b", "x\n", &"x".repeat(MAX_JOINS_AT + 1)] {
            assert!(validate_request("p", "c", 7, Some(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn specs_parse_and_print() {
        for s in ["file:/mnt/shared", "server:10.0.0.3:7410"] {
            let spec: ArbiterSpec = s.parse().expect("parses");
            assert_eq!(spec.to_string(), s);
        }
        for bad in ["", "file:", "nfs:/x", "server"] {
            assert!(bad.parse::<ArbiterSpec>().is_err(), "{bad:?}");
        }
        assert!(matches!(
            ArbiterSpec::Server("x:1".into()).open(None),
            Err(ArbiterError::InvalidArgument(_))
        ));
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_specs_parse_and_print() {
        let s = "etcd:http://a:2379,http://b:2379";
        let spec: ArbiterSpec = s.parse().expect("parses");
        assert_eq!(spec.to_string(), s);
        assert_eq!(
            "etcd:http://a:2379,http://b:2379"
                .parse::<ArbiterSpec>()
                .ok(),
            Some(ArbiterSpec::Etcd(vec![
                "http://a:2379".into(),
                "http://b:2379".into()
            ]))
        );
    }

    #[cfg(not(feature = "etcd"))]
    #[test]
    fn etcd_specs_without_the_feature_say_how_to_rebuild() {
        let err = "etcd:http://a:2379"
            .parse::<ArbiterSpec>()
            .expect_err("no etcd backend in this build");
        assert!(matches!(err, ArbiterError::NotBuilt(_)), "{err:?}");
        assert!(err.to_string().contains("--features etcd"), "{err}");
        let spec = ArbiterSpec::Etcd(vec!["http://a:2379".into()]);
        assert!(matches!(spec.open(None), Err(ArbiterError::NotBuilt(_))));
        assert!(matches!(spec.init(), Err(ArbiterError::NotBuilt(_))));
    }
}
