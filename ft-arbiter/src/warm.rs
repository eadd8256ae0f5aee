//! A client that connects before it is needed.
//!
//! The arbiter is asked when a replica has just lost its peer, and every millisecond of that
//! call is failover time. A `server:` or `etcd:` client connects on its first call, so
//! [`warm_up`] makes that first call (a read of the pair's latest decision) when the replica
//! starts, on a thread of its own: the replica goes on at once (a backup's replay answers its
//! primary's heartbeats meanwhile), and the decision after a failure finds the connection made.
//! The backends keep their connection between calls and replace one that was closed since (the
//! etcd client tries a kept connection that fails once more on a new one, within the same call).
//!
//! An arbiter that does not answer the warm-up is only logged (a warning): it is asked again,
//! as usual, when a decision is needed. A call made while the warm-up still runs waits for it
//! (at most the backend's timeout) and is then made as usual.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::{Arbiter, ArbiterError, Decision, Record};

/// `arbiter`, with a read of `pair_id`'s latest decision started on a thread of its own, so that
/// its connection is made before the first call that matters; see the [module docs](self).
/// `name` names the arbiter in the log (its spec, say). If no thread can be started, the
/// arbiter is returned as it is (it connects on its first call), with a warning.
pub fn warm_up(arbiter: Box<dyn Arbiter>, pair_id: &str, name: &str) -> Box<dyn Arbiter> {
    let shared = Arc::new(Mutex::new(arbiter));
    let (inner, pair, name) = (shared.clone(), pair_id.to_owned(), name.to_owned());
    let spawned = std::thread::Builder::new()
        .name("arbiter-warm-up".into())
        .spawn(move || {
            let started = Instant::now();
            let answer = lock(&inner).current(&pair);
            match answer {
                Ok(_) => tracing::debug!(
                    "the arbiter {name} answered the warm-up in {:?}",
                    started.elapsed()
                ),
                Err(e) => tracing::warn!(
                    "the arbiter {name} does not answer yet ({e}); it is asked again when a \
                     decision is needed"
                ),
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no warm-up for the arbiter ({e}): it connects on its first call");
    }
    Box::new(Warm { shared })
}

/// The arbiter, locked; a warm-up that panicked leaves it usable.
fn lock(a: &Mutex<Box<dyn Arbiter>>) -> MutexGuard<'_, Box<dyn Arbiter>> {
    a.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The arbiter [`warm_up`] returns: shared with the warm-up thread until that ends.
struct Warm {
    shared: Arc<Mutex<Box<dyn Arbiter>>>,
}

impl Arbiter for Warm {
    fn claim(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
        joins_at: Option<&str>,
    ) -> Result<Decision, ArbiterError> {
        lock(&self.shared).claim(pair_id, candidate, epoch, joins_at)
    }

    fn test_and_set(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
    ) -> Result<Decision, ArbiterError> {
        lock(&self.shared).test_and_set(pair_id, candidate, epoch)
    }

    fn latest(&mut self, pair_id: &str) -> Result<Option<Record>, ArbiterError> {
        lock(&self.shared).latest(pair_id)
    }

    fn current(&mut self, pair_id: &str) -> Result<Option<(String, u64)>, ArbiterError> {
        lock(&self.shared).current(pair_id)
    }

    fn deposed(&mut self, pair_id: &str, epoch: u64) -> Result<bool, ArbiterError> {
        lock(&self.shared).deposed(pair_id, epoch)
    }
}
