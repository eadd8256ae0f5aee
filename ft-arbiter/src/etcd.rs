//! The etcd backend: one etcd v3 transaction per test-and-set.
//!
//! # Keys
//!
//! A decision of pair `P` at epoch `E` is the key `PREFIX/P/EEEEEEEEEEEEEEEEEEEE` (the epoch in
//! 20 zero-padded decimal digits, so keys sort like epochs) whose value is the winner, followed,
//! if the winner gave one, by a space and the address where it accepts joining backups (neither
//! contains a space). The
//! default prefix is `/ftvm/arbiter`. Pair ids cannot contain `/`, so the range
//! `[PREFIX/P/, PREFIX/P0)` holds exactly the pair's decisions.
//!
//! # The test-and-set
//!
//! `test_and_set(P, candidate, e)` sends one transaction:
//!
//! ```text
//! if   create_revision(range [PREFIX/P/(e+1), PREFIX/P0)) == 0   // no decision at any epoch > e
//! then put PREFIX/P/(e+1) = candidate
//! ```
//!
//! The compare is the brief's `create_revision(key) == 0` on the new key, widened to a range
//! (etcd ≥ 3.3): a range compare on `create_revision` holds only if no key in the range exists.
//! It covers the key of epoch `e+1` itself, so two callers in the same round cannot both
//! succeed, and every later epoch, so the transaction is a true test-and-set on "no decision
//! newer than mine" even between callers with different epochs. etcd runs transactions
//! serializably through Raft and acknowledges them only once a quorum has them on disk, so a
//! `Won` is durable and linearizable. When the compare fails, a linearizable range read (newest
//! key first, limit 1) fetches the latest decision for the `Lost` answer (or for the recorded
//! winner's idempotent retry).
//!
//! # No lease
//!
//! Decisions are written without a lease, on purpose. A lease would make a decision evaporate
//! when its holder stops refreshing it — exactly when the holder is partitioned or paused — and
//! the next test-and-set at the old epoch would then succeed: the loser (or the paused old
//! primary) would go live while the winner still runs, in the *same* epoch, so fencing could not
//! tell them apart. Liveness of the winner is the FT pair's business (the log channel's
//! heartbeats), not the arbiter's. The keys are tiny and few (one per failover); an operator
//! may delete decisions older than a pair's latest one, never the latest.
//!
//! # The runtime
//!
//! `etcd-client` is async; [`EtcdArbiter`] owns a current-thread tokio runtime and blocks on it,
//! so the trait stays synchronous. Every call is bounded by the arbiter's timeout (default 3 s)
//! and asks etcd to refuse it outright when the member has no leader; an unreachable cluster, or
//! one without quorum, gives [`ArbiterError::Unavailable`].
//!
//! # Connections
//!
//! A client talks to one member at a time, over one connection it keeps between calls. A call
//! that fails on a new connection goes on at once to the next member; one that fails outright
//! on a kept connection is first tried again on a new connection to the same member (it may have
//! restarted since). So within one call every member is tried once, the kept one twice, until
//! one answers or the timeout runs out; each try may take an equal share of the time left, so a
//! member that says nothing at all (stopped, cut off) holds a call for a share, not for the whole
//! timeout, and the next call starts at the next member. Trying again is safe: a test-and-set is
//! idempotent for the recorded winner, and reads change nothing.
//!
//! Measured on loopback, a connection to a member that was killed or restarted since fails in
//! well under a millisecond (the kernel has closed it), so a kept connection costs a failover
//! one quick extra try, not a timeout. (etcd-client's own balancing over several endpoints is
//! not used: it keeps a dead member's endpoint in its random choice, and a call failed outright
//! about one time in three with one member of three down.) HTTP/2 keepalive pings cannot find a
//! silent connection while it is idle: etcd's gRPC server answers pings on a connection without
//! a call in progress with GOAWAY `too_many_pings` (its enforcement policy does not permit
//! them), so none are sent.

use std::future::Future;
use std::time::{Duration, Instant};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp,
};

use crate::{
    decide_against, validate_candidate, validate_joins_at, validate_pair_id, validate_request,
    Arbiter, ArbiterError, Decision, Record,
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/ftvm/arbiter";

/// A failed try: the error, and whether the member said nothing at all (no answer in time).
struct Failure {
    error: ArbiterError,
    silent: bool,
}

/// An [`Arbiter`] backed by an etcd v3 cluster.
pub struct EtcdArbiter {
    runtime: tokio::runtime::Runtime,
    endpoints: Vec<String>,
    prefix: String,
    timeout: Duration,
    /// The member a new connection goes to: the last one that answered, or the one after a
    /// member that did not.
    member: usize,
    /// The connection to `member` kept from the last call that it answered.
    client: Option<Client>,
}

impl std::fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArbiter")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("member", &self.member)
            .field("connected", &self.client.is_some())
            .finish()
    }
}

impl EtcdArbiter {
    /// A client of the etcd cluster at `endpoints` (`http://host:port` URLs, one per member). It
    /// connects on first use, to the first endpoint.
    pub fn new(endpoints: Vec<String>) -> Result<Self, ArbiterError> {
        if endpoints.is_empty() {
            return Err(ArbiterError::InvalidArgument("no etcd endpoints".into()));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ArbiterError::Io {
                context: "starting the etcd client's runtime",
                source,
            })?;
        Ok(EtcdArbiter {
            runtime,
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            timeout: Duration::from_secs(3),
            member: 0,
            client: None,
        })
    }

    /// Puts the decisions under `prefix` instead of [`DEFAULT_PREFIX`] (a trailing `/` is
    /// dropped).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix: String = prefix.into();
        self.prefix = prefix.trim_end_matches('/').to_owned();
        self
    }

    /// Bounds every call (connecting and trying other members included) by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The key of a pair's decision at `epoch`.
    pub fn key(&self, pair_id: &str, epoch: u64) -> String {
        format!("{}/{pair_id}/{epoch:020}", self.prefix)
    }

    fn pair_prefix(&self, pair_id: &str) -> String {
        format!("{}/{pair_id}/", self.prefix)
    }

    /// End of the pair's key range: the prefix with its final `/` turned into `0`.
    fn pair_range_end(&self, pair_id: &str) -> String {
        format!("{}/{pair_id}0", self.prefix)
    }

    /// Runs one etcd call, bounded by the timeout as a whole: on the kept connection if there is
    /// one, else on a new connection to the current member; a failure drops the connection and
    /// the call goes on as the [module docs](self) say. All tries failing is `Unavailable` (the
    /// last failure's).
    fn call<T, F, Fut>(&mut self, what: &str, f: F) -> Result<T, ArbiterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let tries = self.endpoints.len() + usize::from(self.client.is_some());
        let mut failure = None;
        for i in 0..tries {
            let Some(left) = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
            else {
                break;
            };
            // An equal share of what is left, so that a silent member leaves time for the others.
            let share = u32::try_from(tries - i).unwrap_or(u32::MAX);
            let kept = self.client.is_some();
            match self.attempt(what, &f, left / share) {
                Ok(value) => return Ok(value),
                Err(Failure { error, silent }) => {
                    // A kept connection that failed outright is closed (its member restarted, or
                    // died): its member gets a new connection first. Otherwise, the next member.
                    if silent || !kept {
                        self.member = (self.member + 1) % self.endpoints.len();
                    }
                    failure = Some(error);
                }
            }
        }
        Err(failure.unwrap_or_else(|| {
            ArbiterError::Unavailable(format!(
                "etcd {what} at {}: no answer within {:?}",
                self.endpoints.join(","),
                self.timeout
            ))
        }))
    }

    /// One try of a call, bounded by `budget`; keeps the connection if it answered.
    fn attempt<T, F, Fut>(&mut self, what: &str, f: &F, budget: Duration) -> Result<T, Failure>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.timeout;
        let endpoint = &self.endpoints[self.member];
        let cached = self.client.take();
        let kept = cached.is_some();
        let started = Instant::now();
        let result = self.runtime.block_on(async move {
            tokio::time::timeout(budget, async move {
                let client = match cached {
                    Some(c) => c,
                    None => {
                        // Without a leader, fail at once rather than wait out the timeout.
                        let options = ConnectOptions::new()
                            .with_connect_timeout(timeout)
                            .with_timeout(timeout)
                            .with_require_leader(true);
                        Client::connect([endpoint.as_str()], Some(options)).await?
                    }
                };
                let value = f(client.clone()).await?;
                Ok::<_, etcd_client::Error>((client, value))
            })
            .await
        });
        let connection = if kept { "kept" } else { "new" };
        let took = started.elapsed();
        match result {
            Ok(Ok((client, value))) => {
                tracing::debug!(
                    "etcd {what} at {endpoint}: answered in {took:?} on a {connection} connection"
                );
                self.client = Some(client);
                Ok(value)
            }
            Ok(Err(e)) => {
                tracing::debug!(
                    "etcd {what} at {endpoint}: failed in {took:?} on a {connection} connection: {e}"
                );
                Err(Failure {
                    error: ArbiterError::unavailable(&format!("etcd {what} at {endpoint}"), e),
                    silent: false,
                })
            }
            Err(_) => {
                tracing::debug!(
                    "etcd {what} at {endpoint}: no answer in {took:?} on a {connection} connection"
                );
                Err(Failure {
                    error: ArbiterError::Unavailable(format!(
                        "etcd {what} at {endpoint}: no answer within {budget:?}"
                    )),
                    silent: true,
                })
            }
        }
    }

    /// The pair's newest decision, by a linearizable read.
    fn read_latest(&mut self, pair_id: &str) -> Result<Option<Record>, ArbiterError> {
        let prefix = self.pair_prefix(pair_id);
        let options = GetOptions::new()
            .with_range(self.pair_range_end(pair_id))
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(1);
        let kv = self.call("read", |mut c| {
            let (start, options) = (prefix.clone(), options.clone());
            async move {
                let resp = c.get(start, Some(options)).await?;
                Ok(resp
                    .kvs()
                    .first()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec())))
            }
        })?;
        let Some((key, value)) = kv else {
            return Ok(None);
        };
        let epoch = key
            .strip_prefix(prefix.as_bytes())
            .filter(|digits| digits.len() == 20)
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| digits.parse::<u64>().ok());
        let decision = String::from_utf8(value).ok().and_then(|v| {
            let (winner, joins_at) = match v.split_once(' ') {
                Some((w, a)) => (w.to_owned(), Some(a.to_owned())),
                None => (v, None),
            };
            let valid = validate_candidate(&winner).is_ok()
                && joins_at
                    .as_deref()
                    .is_none_or(|a| validate_joins_at(a).is_ok());
            valid.then_some((winner, joins_at))
        });
        match (epoch, decision) {
            (Some(epoch), Some((winner, joins_at))) => Ok(Some(Record {
                winner,
                epoch,
                joins_at,
            })),
            _ => Err(ArbiterError::Corrupt(format!(
                "etcd key {:?} is not an arbiter decision",
                String::from_utf8_lossy(&key)
            ))),
        }
    }
}

impl Arbiter for EtcdArbiter {
    fn claim(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
        joins_at: Option<&str>,
    ) -> Result<Decision, ArbiterError> {
        let new_epoch = validate_request(pair_id, candidate, epoch, joins_at)?;
        let key = self.key(pair_id, new_epoch);
        let value = match joins_at {
            Some(addr) => format!("{candidate} {addr}"),
            None => candidate.to_owned(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)
                .with_range(self.pair_range_end(pair_id))])
            .and_then([TxnOp::put(key, value, None)]);
        let succeeded = self.call("transaction", |mut c| {
            let txn = txn.clone();
            async move { Ok(c.txn(txn).await?.succeeded()) }
        })?;
        if succeeded {
            return Ok(Decision::Won { epoch: new_epoch });
        }
        let latest = self.read_latest(pair_id)?;
        decide_against(
            latest.as_ref().map(|r| (r.winner.as_str(), r.epoch)),
            candidate,
            epoch,
        )
        .ok_or_else(|| {
            ArbiterError::Corrupt(format!(
                "etcd refused epoch {new_epoch} of pair {pair_id} but holds no newer decision \
                 (were keys deleted?)"
            ))
        })
    }

    fn latest(&mut self, pair_id: &str) -> Result<Option<Record>, ArbiterError> {
        validate_pair_id(pair_id)?;
        self.read_latest(pair_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_like_epochs_and_stay_in_the_pair_range() {
        let a = EtcdArbiter::new(vec!["http://127.0.0.1:1".into()])
            .expect("runtime")
            .with_prefix("/x/");
        assert_eq!(a.key("p", 7), "/x/p/00000000000000000007");
        assert!(a.key("p", 9) < a.key("p", 10));
        assert!(a.key("p", 10) < a.key("p", u64::MAX));
        let (start, end) = (a.pair_prefix("p"), a.pair_range_end("p"));
        for e in [0, 1, u64::MAX] {
            let k = a.key("p", e);
            assert!(start <= k && k < end);
        }
        for other in ["p.x", "p-", "p0", "p_", "pa", "o", "q"] {
            let k = a.key(other, 5);
            assert!(!(start <= k && k < end), "{other}");
        }
    }
}
