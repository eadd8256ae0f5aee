//! The ledger workload (`ftvm client --workload ledger`, `ftvm demo --guest ledger`): balance
//! reads, deposits, transfers between the first [`Workload::keys`] accounts (some refused for
//! want of funds) and a few audits, every answer checked against [`LedgerModel`] — balances,
//! totals, and the transaction ids and times the guest drew, learnt from its answers to
//! transactions and then checked in BALANCE and AUDIT answers.
//!
//! Requests in flight together never share an account, and an AUDIT (which reads every account)
//! is alone in flight, so the guest applies them in an order the model can follow. The read-back
//! asks every account used for its balance and last transaction, then audits the ledger.
//! Retries are at most once as for the key-value service: the ledger answers a retry from its
//! reply cache (see `guests/ledger/README.md`).

use rand::rngs::SmallRng;
use rand::Rng;
use vmm::ledger::{self, op, status, LedgerModel, Request, ACCOUNTS};

use super::{Seen, Service, Workload};

/// The ledger's side of a workload.
#[derive(Debug, Default)]
pub(crate) struct LedgerService {
    model: LedgerModel,
    /// Accounts used: read back at the end.
    touched: std::collections::BTreeSet<u32>,
}

impl Service for LedgerService {
    type Op = Request;

    fn generate(&mut self, rng: &mut SmallRng, w: &Workload, id: u32) -> (Request, Vec<u8>) {
        let accounts = w.keys.clamp(2, ACCOUNTS as u32);
        let account = rng.gen_range(0..accounts);
        let req = if rng.gen_range(0..100u8) < w.get_percent {
            Request::balance(account)
        } else {
            match rng.gen_range(0..20u8) {
                0 => Request::audit(),
                1..=8 => Request::deposit(account, rng.gen_range(1..=1_000)),
                _ => {
                    let to = (account + rng.gen_range(1..accounts)) % accounts;
                    Request::transfer(account, to, rng.gen_range(1..=1_500))
                }
            }
        };
        (req, req.encode(id))
    }

    /// Accounts in common, or an AUDIT on either side.
    fn conflict(a: &Request, b: &Request) -> bool {
        match (a.accounts(), b.accounts()) {
            (Some(x), Some(y)) => x.iter().any(|i| y.contains(i)),
            _ => true,
        }
    }

    fn check(&mut self, id: u32, req: Request, response: &[u8]) -> Result<Seen, String> {
        let r = ledger::decode_response(response).ok_or_else(|| {
            format!(
                "request {id}: malformed response of {} bytes",
                response.len()
            )
        })?;
        if r.id != id {
            return Err(format!("request {id}: response for {}", r.id));
        }
        if let Some(accounts) = req.accounts() {
            self.touched.extend(accounts);
        }
        self.model
            .apply(&req, &r)
            .map_err(|e| format!("request {id}: {e}"))?;
        // A transaction's time is the guest's clock when it ran; a read's is an older one.
        let executed_now = req.is_transaction() && r.status == status::OK;
        Ok(Seen {
            clock_ns: executed_now.then_some(r.time_ns),
            ticks: None,
        })
    }

    fn read_back(&self) -> Vec<Request> {
        let mut reads: Vec<Request> = self.touched.iter().map(|&a| Request::balance(a)).collect();
        reads.push(Request::audit());
        reads
    }

    fn encode(&self, id: u32, req: &Request) -> Vec<u8> {
        req.encode(id)
    }

    fn verify(&mut self, req: &Request, response: &[u8]) -> Result<(), String> {
        debug_assert!(matches!(req.op, op::BALANCE | op::AUDIT));
        let r = ledger::decode_response(response)
            .ok_or_else(|| format!("read-back {req:?}: malformed response"))?;
        // Reads leave the model as it is.
        self.model
            .apply(req, &r)
            .map_err(|e| format!("read-back: {e} (acknowledged requests imply otherwise)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn the_mix_stays_inside_the_accounts_and_conflicts_are_found() {
        let mut w = Workload::new(0, 3, 10, 40);
        w.protocol = super::super::Protocol::Ledger;
        let mut svc = LedgerService::default();
        let mut rng = SmallRng::seed_from_u64(3);
        let mut ops = [0u32; 5];
        for id in 1..2_000 {
            let (req, bytes) = svc.generate(&mut rng, &w, id);
            assert_eq!(bytes, req.encode(id));
            ops[usize::from(req.op)] += 1;
            if let Some(a) = req.accounts() {
                assert!(a.iter().all(|&a| a < 10), "{req:?}");
                if req.op == op::TRANSFER {
                    assert_ne!(req.account, req.to);
                }
            }
        }
        assert!(ops[1..].iter().all(|&n| n > 20), "{ops:?}");
        let t = Request::transfer(1, 2, 5);
        assert!(LedgerService::conflict(&t, &Request::balance(2)));
        assert!(!LedgerService::conflict(&t, &Request::deposit(3, 1)));
        assert!(LedgerService::conflict(
            &Request::audit(),
            &Request::deposit(3, 1)
        ));
    }
}
