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

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp,
};

use crate::{
    decide_against, validate_candidate, validate_joins_at, validate_pair_id, validate_request,
    Arbiter, ArbiterError, Decision, Record,
};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "/ftvm/arbiter";

/// An [`Arbiter`] backed by an etcd v3 cluster.
pub struct EtcdArbiter {
    runtime: tokio::runtime::Runtime,
    endpoints: Vec<String>,
    prefix: String,
    timeout: Duration,
    client: Option<Client>,
}

impl std::fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArbiter")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("connected", &self.client.is_some())
            .finish()
    }
}

impl EtcdArbiter {
    /// A client of the etcd cluster at `endpoints` (`http://host:port` URLs). It connects on
    /// first use.
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

    /// Bounds every call (connecting included) by `timeout`.
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

    /// Runs one etcd call with a connected client, bounded by the timeout; any failure drops
    /// the client and is `Unavailable`. A failure on a kept connection (etcd restarted since) is
    /// retried once on a new one: safe, as test-and-set is idempotent for the recorded winner.
    fn call<T, F, Fut>(&mut self, what: &str, f: F) -> Result<T, ArbiterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let reused = self.client.is_some();
        match self.attempt(what, &f) {
            Err(_) if reused => self.attempt(what, &f),
            result => result,
        }
    }

    fn attempt<T, F, Fut>(&mut self, what: &str, f: &F) -> Result<T, ArbiterError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.timeout;
        let endpoints = &self.endpoints;
        let cached = self.client.take();
        let result = self.runtime.block_on(async move {
            tokio::time::timeout(timeout, async move {
                let client = match cached {
                    Some(c) => c,
                    None => {
                        // Without a leader, fail at once rather than wait out the timeout.
                        let options = ConnectOptions::new()
                            .with_connect_timeout(timeout)
                            .with_timeout(timeout)
                            .with_require_leader(true);
                        Client::connect(endpoints, Some(options)).await?
                    }
                };
                let value = f(client.clone()).await?;
                Ok::<_, etcd_client::Error>((client, value))
            })
            .await
        });
        match result {
            Ok(Ok((client, value))) => {
                self.client = Some(client);
                Ok(value)
            }
            Ok(Err(e)) => Err(ArbiterError::unavailable(
                &format!("etcd {what} at {}", self.endpoints.join(",")),
                e,
            )),
            Err(_) => Err(ArbiterError::Unavailable(format!(
                "etcd {what} at {}: no answer within {timeout:?}",
                self.endpoints.join(",")
            ))),
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
