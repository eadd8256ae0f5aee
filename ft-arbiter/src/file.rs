//! The shared-storage backend: a directory both hosts mount, decided by atomic `link(2)`.
//!
//! # Layout
//!
//! ```text
//! DIR/ftvm-arbiter/STORE                         "ftvm-arbiter store v1" and a random store id
//! DIR/ftvm-arbiter/pairs/PAIR/decision-N         one immutable file per decision, N = 1, 2, 3…
//! DIR/ftvm-arbiter/pairs/PAIR/.tmp-…             a claim being written (or left by a crash)
//! ```
//!
//! A decision file holds the pair, its slot number `N`, the epoch, the winner and, if the winner
//! gave one, the address where it accepts joining backups (`joins ADDR`), as lines of text ending
//! in `end`. Slots are numbered without gaps and never change or disappear, so the
//! decisions of a pair form an append-only log whose last slot is the current decision.
//!
//! # The test-and-set
//!
//! 1. Check the store: `STORE` must exist and carry the id read at [`FileArbiter::open`].
//! 2. Find the last slot `N` (a directory listing as a hint, then probing `N+1`, `N+2`… until one
//!    is missing) and read it. If it holds an epoch greater than the caller's, answer `Lost` (or
//!    `Won` again for the recorded winner of exactly epoch + 1).
//! 3. Otherwise claim slot `N+1`: write the decision into a uniquely named temporary file in the
//!    pair's directory, `fsync` it, then `link(2)` it to `decision-(N+1)`. `link` fails with
//!    `EEXIST` if another host took that slot first; then go back to 2 and read its decision.
//! 4. On success `fsync` the pair's directory, remove the temporary name, answer `Won`.
//!
//! The link is a compare-and-swap on the log's tail: a claim of slot `N+1` succeeds only if slot
//! `N` was the last one when the claimant read it, so the test-and-set is atomic (linearizable)
//! even between callers with different epochs, not just within one round. A claim file is
//! complete before its name appears (written and synced first, then linked), so a reader never
//! sees half a decision. Stale reads are harmless: a host that reads an old tail only attempts a
//! link the filesystem refuses.
//!
//! # What the filesystem must provide
//!
//! - **Atomic exclusive name creation** shared by both hosts: `link(2)` failing with `EEXIST`
//!   when the name exists, evaluated by the one server that holds the directory. Every local
//!   POSIX filesystem, NFSv2/v3/v4 (LINK is an atomic server-side operation in every version, as is
//!   exclusive CREATE since NFSv3, which is why `O_EXCL` also works on v3+), and cluster
//!   filesystems (GFS2, OCFS2, CephFS) provide it. We use link rather than `O_EXCL` because it
//!   also works on NFSv2, and because the name appears only once the content is complete.
//!   Lost replies are handled as open(2) recommends for NFS: after a failed `link`, a link count
//!   of 2 on the temporary file means the link did happen.
//! - **Durability before the answer**: `fsync` of the claim file and of the directory reach
//!   stable storage. On NFS the server must be exported `sync` (the default); an `async` export
//!   may lose an acknowledged decision in a server crash. LINK is a synchronous metadata
//!   operation in NFSv3/v4 with a `sync` export.
//! - **Close-to-open consistency** (NFS's default, do not mount with `nocto`): opening a
//!   decision file after another host closed it shows its content. Decision files are immutable
//!   once named, so cached content is never wrong, only possibly absent.
//! - **Fresh negative lookups**: a cached "no such file" for `decision-(N+1)` after another host
//!   created it makes this host retry its claim (the link fails) until the cache expires; it
//!   gives up with [`ArbiterError::Unavailable`] after about a second. Mount the share with
//!   `lookupcache=positive` (Linux) or a short `acdirmax` to avoid that.
//! - **No deletion**: nothing removes or edits decision files while the pair may fail over. To
//!   reset a pair, stop both replicas first.
//! - **The store must be the mounted share**: an unmounted share leaves an empty local directory
//!   that would happily accept claims. Operations never create `DIR/ftvm-arbiter` (only
//!   [`FileArbiter::create_store`] does), so against an unmounted share they fail with
//!   `Unavailable`; the store id catches a different filesystem mounted in its place.
//!
//! Soft NFS mounts turn a server outage into `EIO`/`ETIMEDOUT` (here: `Unavailable`); hard mounts
//! (the default) block the caller until the server is back, so callers that need a bounded wait
//! should ask from a thread they can abandon, or mount `soft` with a short `timeo`.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{
    decide_against, validate_pair_id, validate_request, Arbiter, ArbiterError, Decision, Record,
};

const STORE_DIR: &str = "ftvm-arbiter";
const STORE_FILE: &str = "STORE";
const STORE_MAGIC: &str = "ftvm-arbiter store v1";
const PAIRS_DIR: &str = "pairs";
const SLOT_PREFIX: &str = "decision-";
const DECISION_MAGIC: &str = "ftvm-arbiter decision v1";
/// Largest file we read from the store (a decision is well under this).
const MAX_FILE: u64 = 4096;
/// How often a claim is retried when slots keep appearing or lookups are stale.
const CLAIM_ATTEMPTS: u32 = 64;
/// How often a slot known to exist is looked up again before giving up (stale NFS caches).
const STALE_RETRIES: u32 = 20;
const STALE_PAUSE: Duration = Duration::from_millis(50);

/// A decision read from a slot file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    epoch: u64,
    winner: String,
    joins_at: Option<String>,
}

/// An [`Arbiter`] over a directory on shared storage; see the [module docs](self) for what it
/// assumes of the filesystem.
#[derive(Debug)]
pub struct FileArbiter {
    root: PathBuf,
    store_id: String,
    /// The last slot seen per pair: slots never disappear, so this only grows.
    known: HashMap<String, u64>,
}

impl FileArbiter {
    /// Creates the store under `dir` (an existing directory, normally the shared mount) if it is
    /// not there yet. Idempotent, and safe if both hosts run it at once.
    pub fn create_store(dir: impl AsRef<Path>) -> Result<(), ArbiterError> {
        Self::create(dir.as_ref()).map(|_created| ())
    }

    /// `ftvm arbiter init file:DIR`: creates `dir` (and its parents) if missing, creates the
    /// store in it if it is not there yet, and opens it, which checks a store that was already
    /// there. Idempotent, and safe if both hosts run it at once. Returns the open store and
    /// whether this call created it. Run it where the shared storage is mounted: on a mount
    /// point without the share it would create a store that the share then hides.
    pub fn init(dir: impl AsRef<Path>) -> Result<(FileArbiter, bool), ArbiterError> {
        let dir = dir.as_ref();
        match fs::metadata(dir) {
            Ok(meta) if !meta.is_dir() => {
                return Err(ArbiterError::InvalidArgument(format!(
                    "{}: not a directory",
                    dir.display()
                )))
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(dir).map_err(|source| ArbiterError::Io {
                    context: "creating the store's directory",
                    source,
                })?;
            }
            Err(source) => {
                return Err(ArbiterError::Io {
                    context: "looking up the store's directory",
                    source,
                })
            }
        }
        let created = Self::create(dir)?;
        Ok((FileArbiter::open(dir)?, created))
    }

    /// Creates the store under `dir` unless it is there; true if this call created it.
    fn create(dir: &Path) -> Result<bool, ArbiterError> {
        let root = dir.join(STORE_DIR);
        let setup = |context: &'static str| move |source| ArbiterError::Io { context, source };
        for d in [&root, &root.join(PAIRS_DIR)] {
            match fs::create_dir(d) {
                Ok(()) => {
                    let parent = d.parent().unwrap_or(dir);
                    sync_dir(parent).map_err(setup("syncing the store's directory"))?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(setup("creating the store directory")(e)),
            }
        }
        let id = random_hex()?;
        let content = format!("{STORE_MAGIC}\nid {id}\n");
        // Written aside and linked into place, so both hosts agree on one id.
        let tmp = root.join(format!(".tmp-store-{}-{id}", std::process::id()));
        write_synced(&tmp, content.as_bytes()).map_err(setup("writing the store file"))?;
        let linked = fs::hard_link(&tmp, root.join(STORE_FILE));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => sync_dir(&root)
                .map(|()| true)
                .map_err(setup("syncing the store directory")),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(setup("linking the store file")(e)),
        }
    }

    /// Opens the store under `dir`. Fails with [`ArbiterError::Unavailable`] if there is none
    /// (not created yet, or the shared storage is not mounted).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, ArbiterError> {
        let root = dir.as_ref().join(STORE_DIR);
        let store_id = read_store_id(&root)?;
        Ok(FileArbiter {
            root,
            store_id,
            known: HashMap::new(),
        })
    }

    /// The store's own directory (`DIR/ftvm-arbiter`).
    pub fn store_dir(&self) -> &Path {
        &self.root
    }

    /// The store's random id (it tells this store from another one mounted in its place).
    pub fn store_id(&self) -> &str {
        &self.store_id
    }

    fn check_store(&self) -> Result<(), ArbiterError> {
        let id = read_store_id(&self.root)?;
        if id != self.store_id {
            return Err(ArbiterError::Unavailable(format!(
                "{}: store id changed ({} → {id}): another filesystem is mounted there",
                self.root.display(),
                self.store_id
            )));
        }
        Ok(())
    }

    fn pair_dir(&self, pair_id: &str) -> PathBuf {
        self.root.join(PAIRS_DIR).join(pair_id)
    }

    /// The last slot number and its decision (0 and `None` for a pair without decisions).
    fn last_slot(
        &mut self,
        pair_id: &str,
        dir: &Path,
    ) -> Result<(u64, Option<Slot>), ArbiterError> {
        let known = self.known.get(pair_id).copied().unwrap_or(0);
        let mut n = known.max(listed_max_slot(dir)?);
        let mut last = None;
        if n > 0 {
            last = Some(read_slot_retrying(dir, pair_id, n)?);
        }
        while let Some(next) = read_slot(dir, pair_id, n + 1)? {
            if let Some(prev) = &last {
                if next.epoch <= prev.epoch {
                    return Err(ArbiterError::Corrupt(format!(
                        "{}: slot {} has epoch {} after epoch {}",
                        dir.display(),
                        n + 1,
                        next.epoch,
                        prev.epoch
                    )));
                }
            }
            n += 1;
            last = Some(next);
        }
        self.known.insert(pair_id.to_owned(), n);
        Ok((n, last))
    }

    /// Tries to take `slot` for `candidate` at `epoch`; `Ok(false)` if another claim has it.
    fn claim_slot(
        &self,
        dir: &Path,
        pair_id: &str,
        slot: u64,
        candidate: &str,
        epoch: u64,
        joins_at: Option<&str>,
    ) -> Result<bool, ArbiterError> {
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), random_hex()?));
        let joins = joins_at.map_or(String::new(), |a| format!("joins {a}\n"));
        let content = format!(
            "{DECISION_MAGIC}\npair {pair_id}\nslot {slot}\nepoch {epoch}\nwinner {candidate}\n{joins}end\n"
        );
        if let Err(e) = write_synced(&tmp, content.as_bytes()) {
            let _ = fs::remove_file(&tmp);
            return Err(ArbiterError::unavailable("writing a claim", e));
        }
        let won = match fs::hard_link(&tmp, slot_path(dir, slot)) {
            Ok(()) => Ok(true),
            // Over NFS a lost reply can report failure for a link that happened (open(2)).
            Err(_) if fs::metadata(&tmp).is_ok_and(|m| m.nlink() == 2) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(ArbiterError::unavailable("linking a claim", e)),
        };
        let _ = fs::remove_file(&tmp);
        if won? {
            sync_dir(dir).map_err(|e| ArbiterError::unavailable("syncing a decision", e))?;
            return Ok(true);
        }
        Ok(false)
    }
}

impl Arbiter for FileArbiter {
    fn claim(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
        joins_at: Option<&str>,
    ) -> Result<Decision, ArbiterError> {
        let new_epoch = validate_request(pair_id, candidate, epoch, joins_at)?;
        self.check_store()?;
        let dir = self.pair_dir(pair_id);
        match fs::create_dir(&dir) {
            Ok(()) => sync_dir(&self.root.join(PAIRS_DIR))
                .map_err(|e| ArbiterError::unavailable("syncing the pairs directory", e))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            // In particular NotFound: the store vanished (unmounted) since the check.
            Err(e) => return Err(ArbiterError::unavailable("creating the pair directory", e)),
        }
        for attempt in 0..CLAIM_ATTEMPTS {
            let (n, last) = self.last_slot(pair_id, &dir)?;
            let latest = last.as_ref().map(|s| (s.winner.as_str(), s.epoch));
            if let Some(decision) = decide_against(latest, candidate, epoch) {
                return Ok(decision);
            }
            if self.claim_slot(&dir, pair_id, n + 1, candidate, new_epoch, joins_at)? {
                self.known.insert(pair_id.to_owned(), n + 1);
                return Ok(Decision::Won { epoch: new_epoch });
            }
            // Slot n+1 was taken: read it next round. If lookups keep missing it, the client's
            // negative lookup cache is stale; give it time.
            if attempt >= 4 {
                std::thread::sleep(STALE_PAUSE);
            }
        }
        Err(ArbiterError::Unavailable(format!(
            "{}: no stable view of the last decision after {CLAIM_ATTEMPTS} attempts \
             (stale NFS lookup cache? mount with lookupcache=positive)",
            dir.display()
        )))
    }

    fn latest(&mut self, pair_id: &str) -> Result<Option<Record>, ArbiterError> {
        validate_pair_id(pair_id)?;
        self.check_store()?;
        let dir = self.pair_dir(pair_id);
        if !dir.is_dir() {
            // Re-check: a missing pair directory must mean "no decision", not "unmounted".
            self.check_store()?;
            return Ok(None);
        }
        let (_, last) = self.last_slot(pair_id, &dir)?;
        Ok(last.map(|s| Record {
            winner: s.winner,
            epoch: s.epoch,
            joins_at: s.joins_at,
        }))
    }
}

fn slot_path(dir: &Path, slot: u64) -> PathBuf {
    dir.join(format!("{SLOT_PREFIX}{slot:020}"))
}

/// The highest slot number in a directory listing (0 if none or no directory).
fn listed_max_slot(dir: &Path) -> Result<u64, ArbiterError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(ArbiterError::unavailable("listing decisions", e)),
    };
    let mut max = 0;
    for entry in entries {
        let entry = entry.map_err(|e| ArbiterError::unavailable("listing decisions", e))?;
        let name = entry.file_name();
        let slot = name
            .to_str()
            .and_then(|n| n.strip_prefix(SLOT_PREFIX))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(slot) = slot {
            max = max.max(slot);
        }
    }
    Ok(max)
}

/// Reads a file of at most [`MAX_FILE`] bytes; `None` if it does not exist.
fn read_small(path: &Path) -> Result<Option<String>, ArbiterError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ArbiterError::unavailable("reading the arbiter store", e)),
    };
    let mut buf = Vec::new();
    file.take(MAX_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ArbiterError::unavailable("reading the arbiter store", e))?;
    if buf.len() as u64 > MAX_FILE {
        return Err(ArbiterError::Corrupt(format!(
            "{}: larger than {MAX_FILE} bytes",
            path.display()
        )));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| ArbiterError::Corrupt(format!("{}: not UTF-8", path.display())))
}

fn read_slot(dir: &Path, pair_id: &str, slot: u64) -> Result<Option<Slot>, ArbiterError> {
    let path = slot_path(dir, slot);
    let Some(text) = read_small(&path)? else {
        return Ok(None);
    };
    parse_slot(&text, pair_id, slot)
        .map(Some)
        .ok_or_else(|| ArbiterError::Corrupt(format!("{}: malformed decision", path.display())))
}

/// Reads a slot known to exist, allowing a stale cache some time to catch up.
fn read_slot_retrying(dir: &Path, pair_id: &str, slot: u64) -> Result<Slot, ArbiterError> {
    for _ in 0..STALE_RETRIES {
        if let Some(s) = read_slot(dir, pair_id, slot)? {
            return Ok(s);
        }
        std::thread::sleep(STALE_PAUSE);
    }
    Err(ArbiterError::Unavailable(format!(
        "{}: decision {slot} was seen but cannot be read",
        dir.display()
    )))
}

fn parse_slot(text: &str, pair_id: &str, slot: u64) -> Option<Slot> {
    fn field<'a>(lines: &mut std::str::Lines<'a>, name: &str) -> Option<&'a str> {
        lines.next()?.strip_prefix(name)?.strip_prefix(' ')
    }
    let mut lines = text.lines();
    (lines.next()? == DECISION_MAGIC).then_some(())?;
    (field(&mut lines, "pair")? == pair_id).then_some(())?;
    (field(&mut lines, "slot")?.parse::<u64>().ok()? == slot).then_some(())?;
    let epoch = field(&mut lines, "epoch")?.parse::<u64>().ok()?;
    let winner = field(&mut lines, "winner")?.to_owned();
    crate::validate_candidate(&winner).ok()?;
    let mut next = lines.next()?;
    let mut joins_at = None;
    if let Some(addr) = next.strip_prefix("joins ") {
        crate::validate_joins_at(addr).ok()?;
        joins_at = Some(addr.to_owned());
        next = lines.next()?;
    }
    (next == "end" && lines.next().is_none()).then_some(Slot {
        epoch,
        winner,
        joins_at,
    })
}

fn read_store_id(root: &Path) -> Result<String, ArbiterError> {
    let path = root.join(STORE_FILE);
    let text = read_small(&path)?.ok_or_else(|| {
        ArbiterError::Unavailable(format!(
            "{}: no arbiter store (shared storage not mounted, or never created)",
            root.display()
        ))
    })?;
    let mut lines = text.lines();
    match (
        lines.next(),
        lines.next().and_then(|l| l.strip_prefix("id ")),
    ) {
        (Some(STORE_MAGIC), Some(id)) if !id.is_empty() => Ok(id.to_owned()),
        _ => Err(ArbiterError::Corrupt(format!(
            "{}: not an arbiter store file",
            path.display()
        ))),
    }
}

/// Creates `path` (which must not exist), writes `data` and syncs it.
fn write_synced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn random_hex() -> Result<String, ArbiterError> {
    let mut bytes = [0u8; 12];
    getrandom::getrandom(&mut bytes).map_err(|e| ArbiterError::Io {
        context: "drawing random bytes",
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_trip_and_reject_garbage() {
        let text = format!("{DECISION_MAGIC}\npair p1\nslot 3\nepoch 9\nwinner host-a\nend\n");
        assert_eq!(
            parse_slot(&text, "p1", 3),
            Some(Slot {
                epoch: 9,
                winner: "host-a".into(),
                joins_at: None,
            })
        );
        let with_joins = text.replace("end\n", "joins 10.0.0.1:7420\nend\n");
        assert_eq!(
            parse_slot(&with_joins, "p1", 3).and_then(|s| s.joins_at),
            Some("10.0.0.1:7420".into())
        );
        assert_eq!(
            parse_slot(&text.replace("end\n", "joins \nend\n"), "p1", 3),
            None,
            "empty join address"
        );
        assert_eq!(
            parse_slot(&text.replace("end\n", "joins a\njoins b\nend\n"), "p1", 3),
            None,
            "two join addresses"
        );
        assert_eq!(parse_slot(&text, "p2", 3), None, "other pair");
        assert_eq!(parse_slot(&text, "p1", 4), None, "other slot");
        assert_eq!(parse_slot(&text[..text.len() - 4], "p1", 3), None, "torn");
        assert_eq!(parse_slot(&format!("{text}extra\n"), "p1", 3), None);
        assert_eq!(parse_slot("", "p1", 3), None);
        assert_eq!(
            parse_slot(&text.replace("epoch 9", "epoch -1"), "p1", 3),
            None
        );
    }
}
