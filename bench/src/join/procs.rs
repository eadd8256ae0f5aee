//! The `ftvm` processes `bench join` drives: started with piped output, their readiness line
//! read from stdout (a copy of `src/ready.rs`'s parser: the bench cannot depend on the binary
//! crate), their stderr (the log) collected by a thread, killed when dropped.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;

/// What every readiness line starts with (`src/ready.rs`).
const READY_PREFIX: &str = "FTVM-READY";

/// A process's readiness line: `FTVM-READY {"role":…,"addr":…,"detail":…}`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Ready {
    pub role: String,
    pub addr: String,
    #[serde(default)]
    pub detail: String,
}

/// The readiness in `line`, if it is a readiness line.
pub fn parse_ready(line: &str) -> Option<Ready> {
    serde_json::from_str(line.trim().strip_prefix(READY_PREFIX)?.trim()).ok()
}

/// An `ftvm` child process, SIGKILLed on drop if still running.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    log_thread: Option<std::thread::JoinHandle<()>>,
    stdout: Arc<Mutex<String>>,
    stdout_thread: Option<std::thread::JoinHandle<()>>,
    ready: mpsc::Receiver<Option<Ready>>,
}

fn collect(
    from: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
    ready: Option<mpsc::Sender<Option<Ready>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut ready = ready;
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            if let Some(r) = parse_ready(&line) {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Some(r));
                }
            }
            let mut text = into.lock().unwrap_or_else(PoisonError::into_inner);
            text.push_str(&line);
            text.push('\n');
        }
        // The stream ended without a readiness line: the process exited first.
        if let Some(tx) = ready {
            let _ = tx.send(None);
        }
    })
}

impl Proc {
    /// Starts `bin ARGS`; its readiness is read in the background ([`Proc::ready`]).
    pub fn spawn(name: &str, bin: &Path, args: &[String]) -> anyhow::Result<Proc> {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} {}", bin.display(), args.join(" ")))?;
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().context("the child's stderr")?;
        let out = child.stdout.take().context("the child's stdout")?;
        let (tx, rx) = mpsc::channel();
        Ok(Proc {
            name: name.into(),
            log_thread: Some(collect(err, log.clone(), None)),
            stdout_thread: Some(collect(out, stdout.clone(), Some(tx))),
            child,
            log,
            stdout,
            ready: rx,
        })
    }

    /// Waits for its readiness line: `Ok(None)` if it exited without one.
    pub fn ready(&self, within: Duration) -> anyhow::Result<Option<Ready>> {
        match self.ready.recv_timeout(within) {
            Ok(r) => Ok(r),
            Err(mpsc::RecvTimeoutError::Disconnected) => Ok(None),
            Err(mpsc::RecvTimeoutError::Timeout) => anyhow::bail!(
                "{} did not say it was ready within {within:?}; its log:\n{}",
                self.name,
                self.log()
            ),
        }
    }

    pub fn pid(&self) -> anyhow::Result<libc::pid_t> {
        libc::pid_t::try_from(self.child.id()).context("a process id beyond pid_t")
    }

    /// Sends `sig`, unless the process has already exited.
    pub fn signal(&mut self, sig: libc::c_int) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = self.pid()?;
        // SAFETY: kill(2) with the pid of our own child, which `try_wait` just found not yet
        // reaped, so the pid cannot have been reused by another process.
        if unsafe { libc::kill(pid, sig) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signal {sig} to {}", self.name));
        }
        Ok(())
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child
                .kill()
                .with_context(|| format!("killing {}", self.name))?;
        }
        self.child.wait()?;
        Ok(())
    }

    /// Its exit code within `within` (-1: killed by a signal), or `None`; once it has exited,
    /// its whole log and stdout have been read.
    pub fn wait(&mut self, within: Duration) -> anyhow::Result<Option<i32>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.child.try_wait()? {
                for t in [self.log_thread.take(), self.stdout_thread.take()]
                    .into_iter()
                    .flatten()
                {
                    let _ = t.join();
                }
                return Ok(Some(st.code().unwrap_or(-1)));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Its log (stderr) so far.
    pub fn log(&self) -> String {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Its stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many lines of its log contain `what`.
    pub fn count_in_log(&self, what: &str) -> usize {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .lines()
            .filter(|l| l.contains(what))
            .count()
    }

    /// Waits until at least `n` lines of its log contain one of `what` (polling every
    /// millisecond); the time it saw it, or `None` after `within` or once it exited.
    pub fn wait_for_count(&mut self, what: &[&str], n: usize, within: Duration) -> Option<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let seen: usize = what.iter().map(|w| self.count_in_log(w)).sum();
            if seen >= n {
                return Some(Instant::now());
            }
            if Instant::now() >= deadline || self.exited() {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lines_parse_and_others_do_not() {
        let r = parse_ready(
            r#"FTVM-READY {"role":"primary","addr":"127.0.0.1:9","detail":"unprotected, epoch 1, joins at /tmp/j.sock"}"#,
        )
        .expect("a readiness line");
        assert_eq!(r.role, "primary");
        assert!(r.detail.ends_with("joins at /tmp/j.sock"));
        let bare = parse_ready(r#"FTVM-READY {"role":"front","addr":"127.0.0.1:9"}"#)
            .expect("without a detail");
        assert_eq!(bare.detail, "");
        for other in ["", "FTVM-READY", "FTVM-READY {", "EAL: x", "INFO joined"] {
            assert_eq!(parse_ready(other), None, "{other:?}");
        }
    }
}
