//! The decision log: the server's durable state.
//!
//! The server keeps its decisions in `STATE_DIR/decisions.log`: an 8-byte header `FTARBLG1`,
//! then records `body_len: u32, crc32c(body): u32, body` with body `epoch: u64, pair_len: u16,
//! pair, winner_len: u16, winner` and, if the winner gave one, `joins_len: u16, joins` (where it
//! accepts joining backups; records without it, as older servers wrote them, read as none). A test-and-set that wins appends its record and `fdatasync`s
//! it before answering; on start the server replays the log, so a decision survives a crash. A
//! torn last record (a crash mid-append, never acknowledged) is cut off; damage before the last
//! record stops the server with [`ArbiterError::Corrupt`]. If an append or sync fails, the log
//! answers every later test-and-set with `Unavailable` until restarted (after an fsync failure
//! the kernel may have dropped the data, so retrying it would be unsafe). The log file is
//! locked, so a second server on the same state directory refuses to start.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::protocol::{put_str, Cursor, Response};
use crate::{
    decide_against, validate_candidate, validate_joins_at, validate_pair_id, validate_request,
    ArbiterError, Decision, Record,
};

/// The name of the decision log inside the state directory.
pub const LOG_FILE: &str = "decisions.log";

const LOG_MAGIC: [u8; 8] = *b"FTARBLG1";
const RECORD_HEADER: usize = 8;
const MAX_RECORD_BODY: usize =
    8 + 2 + crate::MAX_PAIR_ID + 2 + crate::MAX_CANDIDATE + 2 + crate::MAX_JOINS_AT;

/// The decisions and the append-only log that makes them durable.
#[derive(Debug)]
pub(super) struct DecisionLog {
    file: File,
    pub(super) path: PathBuf,
    pub(super) latest: HashMap<String, Record>,
    /// Set when an append failed: the log's tail is unknown, so nothing more is decided.
    failed: Option<String>,
}

pub(super) fn encode_record(
    pair: &str,
    winner: &str,
    epoch: u64,
    joins_at: Option<&str>,
) -> Vec<u8> {
    let mut body = Vec::with_capacity(MAX_RECORD_BODY);
    body.extend_from_slice(&epoch.to_le_bytes());
    put_str(&mut body, pair);
    put_str(&mut body, winner);
    if let Some(addr) = joins_at {
        put_str(&mut body, addr);
    }
    let mut rec = Vec::with_capacity(RECORD_HEADER + body.len());
    rec.extend_from_slice(&(body.len() as u32).to_le_bytes());
    rec.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    rec.extend_from_slice(&body);
    rec
}

/// One record at the start of `buf`: `(pair, its decision, record length)`, or `None` if the
/// bytes there are not a whole valid record.
pub(super) fn decode_record(buf: &[u8]) -> Option<(String, Record, usize)> {
    let mut c = Cursor(buf);
    let mut b = [0u8; 4];
    b.copy_from_slice(c.bytes(4)?);
    let len = u32::from_le_bytes(b) as usize;
    b.copy_from_slice(c.bytes(4)?);
    let crc = u32::from_le_bytes(b);
    if len > MAX_RECORD_BODY {
        return None;
    }
    let body = c.bytes(len)?;
    if crc32c::crc32c(body) != crc {
        return None;
    }
    let mut body = Cursor(body);
    let epoch = body.u64()?;
    let pair = body.string()?;
    let winner = body.string()?;
    let joins_at = match body.end() {
        Some(()) => None,
        None => Some(body.string()?),
    };
    body.end()?;
    validate_pair_id(&pair).ok()?;
    validate_candidate(&winner).ok()?;
    if let Some(addr) = &joins_at {
        validate_joins_at(addr).ok()?;
    }
    let record = Record {
        winner,
        epoch,
        joins_at,
    };
    Some((pair, record, RECORD_HEADER + len))
}

impl DecisionLog {
    /// Opens (creating if needed), locks and replays the log in `state_dir`.
    pub(super) fn open(state_dir: &Path) -> Result<Self, ArbiterError> {
        let io = |context: &'static str| move |source| ArbiterError::Io { context, source };
        fs::create_dir_all(state_dir).map_err(io("creating the state directory"))?;
        let path = state_dir.join(LOG_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io("opening the decision log"))?;
        file.try_lock().map_err(|e| ArbiterError::Io {
            context: "locking the decision log (another arbiter server on this state directory?)",
            source: e.into(),
        })?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf)
            .map_err(io("reading the decision log"))?;
        let corrupt = |what: String| ArbiterError::Corrupt(format!("{}: {what}", path.display()));

        if buf.len() < LOG_MAGIC.len() {
            // New, or a crash while writing the header of a new log.
            if !LOG_MAGIC.starts_with(&buf) {
                return Err(corrupt("not an arbiter decision log".into()));
            }
            file.set_len(0).map_err(io("resetting the decision log"))?;
            file.write_all(&LOG_MAGIC)
                .and_then(|()| file.sync_all())
                .map_err(io("writing the decision log header"))?;
            File::open(state_dir)
                .and_then(|d| d.sync_all())
                .map_err(io("syncing the state directory"))?;
            buf = LOG_MAGIC.to_vec();
        } else if buf[..LOG_MAGIC.len()] != LOG_MAGIC {
            return Err(corrupt("not an arbiter decision log".into()));
        }

        let mut latest: HashMap<String, Record> = HashMap::new();
        let mut pos = LOG_MAGIC.len();
        while pos < buf.len() {
            match decode_record(&buf[pos..]) {
                Some((pair, record, len)) => {
                    if let Some(prev) = latest.get(&pair) {
                        if record.epoch <= prev.epoch {
                            return Err(corrupt(format!(
                                "pair {pair}: epoch {} recorded after {}",
                                record.epoch, prev.epoch
                            )));
                        }
                    }
                    latest.insert(pair, record);
                    pos += len;
                }
                None if buf.len() - pos < RECORD_HEADER + MAX_RECORD_BODY => {
                    // A torn last append: it was never acknowledged, so drop it.
                    tracing::warn!(
                        log = %path.display(),
                        offset = pos,
                        bytes = buf.len() - pos,
                        "cutting off a torn record at the end of the decision log"
                    );
                    file.set_len(pos as u64)
                        .and_then(|()| file.sync_all())
                        .map_err(io("truncating a torn decision record"))?;
                    break;
                }
                None => {
                    return Err(corrupt(format!("damaged record at byte {pos}")));
                }
            }
        }
        file.seek(SeekFrom::End(0))
            .map_err(io("seeking the decision log"))?;
        Ok(DecisionLog {
            file,
            path,
            latest,
            failed: None,
        })
    }

    #[cfg(test)]
    pub(super) fn test_and_set(&mut self, pair: &str, candidate: &str, epoch: u64) -> Response {
        self.claim(pair, candidate, epoch, None)
    }

    pub(super) fn claim(
        &mut self,
        pair: &str,
        candidate: &str,
        epoch: u64,
        joins_at: Option<&str>,
    ) -> Response {
        let new_epoch = match validate_request(pair, candidate, epoch, joins_at) {
            Ok(e) => e,
            Err(e) => return Response::Refused(e.to_string()),
        };
        let latest = self.latest.get(pair).map(|r| (r.winner.as_str(), r.epoch));
        match decide_against(latest, candidate, epoch) {
            Some(Decision::Won { epoch }) => return Response::Won(epoch),
            Some(Decision::Lost { winner, epoch }) => return Response::Lost(winner, epoch),
            None => {}
        }
        if let Some(why) = &self.failed {
            return Response::Unavailable(why.clone());
        }
        let record = encode_record(pair, candidate, new_epoch, joins_at);
        if let Err(e) = self
            .file
            .write_all(&record)
            .and_then(|()| self.file.sync_data())
        {
            let why = format!("decision log {} failed: {e}", self.path.display());
            tracing::error!("{why}; refusing further decisions until restarted");
            self.failed = Some(why.clone());
            return Response::Unavailable(why);
        }
        self.latest.insert(
            pair.to_owned(),
            Record {
                winner: candidate.to_owned(),
                epoch: new_epoch,
                joins_at: joins_at.map(str::to_owned),
            },
        );
        Response::Won(new_epoch)
    }

    pub(super) fn current(&self, pair: &str) -> Response {
        match validate_pair_id(pair) {
            Ok(()) => Response::Current(self.latest.get(pair).map(|r| (r.winner.clone(), r.epoch))),
            Err(e) => Response::Refused(e.to_string()),
        }
    }

    pub(super) fn latest(&self, pair: &str) -> Response {
        match validate_pair_id(pair) {
            Ok(()) => Response::Latest(
                self.latest
                    .get(pair)
                    .map(|r| (r.winner.clone(), r.epoch, r.joins_at.clone())),
            ),
            Err(e) => Response::Refused(e.to_string()),
        }
    }

    /// The epoch of the pair's latest decision.
    pub(super) fn latest_epoch(&self, pair: &str) -> Option<u64> {
        self.latest.get(pair).map(|r| r.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ft-arbiter-unit-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn log_replays_and_cuts_a_torn_tail() {
        let dir = temp_dir("torn");
        {
            let mut log = DecisionLog::open(&dir).expect("new log");
            assert_eq!(log.test_and_set("p", "a", 1), Response::Won(2));
            assert_eq!(log.test_and_set("q", "b", 5), Response::Won(6));
        }
        let path = dir.join(LOG_FILE);
        let good_len = fs::metadata(&path).expect("meta").len();
        // A crash halfway through a third append.
        let rec = encode_record("p", "c", 3, None);
        let mut f = OpenOptions::new().append(true).open(&path).expect("append");
        f.write_all(&rec[..rec.len() - 3]).expect("torn write");
        drop(f);
        let log = DecisionLog::open(&dir).expect("replay");
        assert_eq!(log.latest_epoch("p"), Some(2));
        assert_eq!(log.latest.get("p").map(|r| r.winner.as_str()), Some("a"));
        assert_eq!(log.latest_epoch("q"), Some(6));
        assert_eq!(fs::metadata(&path).expect("meta").len(), good_len);
        drop(log);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn log_refuses_damage_before_the_tail_and_foreign_files() {
        let dir = temp_dir("damage");
        {
            let mut log = DecisionLog::open(&dir).expect("new log");
            for e in 1..40 {
                assert_eq!(log.test_and_set("p", "a", e), Response::Won(e + 1));
            }
        }
        let path = dir.join(LOG_FILE);
        let mut bytes = fs::read(&path).expect("read");
        bytes[LOG_MAGIC.len() + 10] ^= 0xff;
        fs::write(&path, &bytes).expect("write");
        assert!(matches!(
            DecisionLog::open(&dir),
            Err(ArbiterError::Corrupt(_))
        ));
        fs::write(&path, b"something else entirely").expect("write");
        assert!(matches!(
            DecisionLog::open(&dir),
            Err(ArbiterError::Corrupt(_))
        ));
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn second_server_on_the_same_state_is_refused() {
        let dir = temp_dir("lock");
        let first = DecisionLog::open(&dir).expect("first");
        let err = DecisionLog::open(&dir).expect_err("second must fail");
        assert!(matches!(err, ArbiterError::Io { .. }), "{err:?}");
        drop(first);
        DecisionLog::open(&dir).expect("free again");
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn records_round_trip_and_refuse_what_no_server_writes() {
        let rec = encode_record("pair-1", "host-a", 9, None);
        let record = |joins_at: Option<&str>| Record {
            winner: "host-a".into(),
            epoch: 9,
            joins_at: joins_at.map(str::to_owned),
        };
        assert_eq!(
            decode_record(&rec),
            Some(("pair-1".into(), record(None), rec.len()))
        );
        let with_joins = encode_record("pair-1", "host-a", 9, Some("10.0.0.1:7420"));
        assert_eq!(
            decode_record(&with_joins),
            Some((
                "pair-1".into(),
                record(Some("10.0.0.1:7420")),
                with_joins.len()
            ))
        );
        // Followed by more bytes: the record still ends where it says.
        let mut two = rec.clone();
        two.extend_from_slice(&encode_record("q", "b", 1, None));
        assert_eq!(decode_record(&two).map(|r| r.2), Some(rec.len()));
        // A checksummed record with a name a server never records.
        let bad = encode_record("../etc", "host-a", 9, None);
        assert_eq!(decode_record(&bad), None);
        let bad = encode_record("p", "host-a", 9, Some("a b"));
        assert_eq!(decode_record(&bad), None);
        for n in 0..rec.len() {
            assert_eq!(decode_record(&rec[..n]), None, "{n} bytes");
        }
    }

    #[test]
    fn a_failed_append_refuses_every_later_decision() {
        let dir = temp_dir("failed");
        let mut log = DecisionLog::open(&dir).expect("new log");
        assert_eq!(log.test_and_set("p", "a", 1), Response::Won(2));
        // The log's file now refuses writes, as a failing disk would.
        log.file = File::open(dir.join(LOG_FILE)).expect("read-only handle");
        assert!(matches!(
            log.test_and_set("q", "b", 1),
            Response::Unavailable(_)
        ));
        assert!(log.failed.is_some());
        // Nothing more is decided, even for another pair.
        assert!(matches!(
            log.test_and_set("r", "c", 1),
            Response::Unavailable(_)
        ));
        // What is already durable is still answered: a retry of the recorded winner, a loser.
        assert_eq!(log.test_and_set("p", "a", 1), Response::Won(2));
        assert_eq!(log.test_and_set("p", "b", 1), Response::Lost("a".into(), 2));
        assert_eq!(log.current("q"), Response::Current(None));
        drop(log);
        // A restart decides again, from what reached the log.
        let mut log = DecisionLog::open(&dir).expect("reopen");
        assert_eq!(log.current("p"), Response::Current(Some(("a".into(), 2))));
        assert_eq!(log.test_and_set("q", "b", 1), Response::Won(2));
        drop(log);
        fs::remove_dir_all(&dir).ok();
    }

    /// A writer into a shared buffer, for a test subscriber.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_append_is_reported_through_tracing() {
        let dir = temp_dir("traced");
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            // Another test thread may have cached "nobody listens" for these call sites while
            // this scoped subscriber was being registered: recompute with it in place.
            tracing::callsite::rebuild_interest_cache();
            let mut log = DecisionLog::open(&dir).expect("new log");
            log.file = File::open(dir.join(LOG_FILE)).expect("read-only handle");
            assert!(matches!(
                log.test_and_set("q", "b", 1),
                Response::Unavailable(_)
            ));
        });
        let text = String::from_utf8_lossy(&captured.0.lock().unwrap_or_else(|p| p.into_inner()))
            .into_owned();
        assert!(text.contains("ERROR"), "{text}");
        assert!(
            text.contains("refusing further decisions until restarted"),
            "{text}"
        );
        assert!(text.contains(LOG_FILE), "{text}");
        fs::remove_dir_all(&dir).ok();
    }
}
