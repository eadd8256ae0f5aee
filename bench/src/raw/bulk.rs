//! Raw bulk bandwidth of a stream socket: a plain copy of N bytes through a Unix socket or
//! loopback TCP between two pinned threads, 1 MiB per `write` and per `read` (the join stream's
//! buffer sizes on both ends), no framing, no checksums, nothing done with the bytes. `bench
//! join` measures it before each join over the medium the join stream takes, so a join's
//! stream bytes divided by it is the transfer time the medium alone would need.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};

/// What to copy through.
#[derive(Debug, Clone)]
pub enum Link {
    /// A Unix stream socket at this path (created and removed by the copy).
    Unix(PathBuf),
    /// TCP on 127.0.0.1, an ephemeral port.
    Tcp,
}

/// One measured copy.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Copied {
    /// Bytes the reader received (equal to what was sent, or the copy fails).
    pub bytes: u64,
    /// From the writer's first `write` to the reader's end of stream.
    pub seconds: f64,
}

impl Copied {
    /// Bytes per second.
    pub fn bytes_per_sec(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

/// Each side's I/O size: the join stream's `BufWriter` / `BufReader` capacity.
const IO_BYTES: usize = 1 << 20;
/// A copy that stalls this long fails instead of hanging.
const STALL: Duration = Duration::from_secs(30);

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn set_timeouts(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(STALL))?;
                s.set_write_timeout(Some(STALL))
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(STALL))?;
                s.set_write_timeout(Some(STALL))
            }
        }
    }

    fn shutdown_write(&self) -> std::io::Result<()> {
        match self {
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connected pair (writer end, reader end). Both ends are set up on the calling thread
/// (`connect` completes through the listen backlog before `accept`), so nothing waits on a
/// peer that failed.
fn connect(link: &Link) -> anyhow::Result<(Stream, Stream)> {
    let pair = match link {
        Link::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let l =
                UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
            let w = UnixStream::connect(path)
                .with_context(|| format!("connecting to {}", path.display()))?;
            let (r, _) = l.accept().context("accepting the copy's connection")?;
            let _ = std::fs::remove_file(path);
            (Stream::Unix(w), Stream::Unix(r))
        }
        Link::Tcp => {
            let l = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
            let w = TcpStream::connect(l.local_addr()?).context("connecting over loopback")?;
            let (r, _) = l.accept().context("accepting the copy's connection")?;
            (Stream::Tcp(w), Stream::Tcp(r))
        }
    };
    pair.0.set_timeouts()?;
    pair.1.set_timeouts()?;
    Ok(pair)
}

/// Copies `warmup` bytes (not timed), then `bytes` bytes (timed), each over a new connection:
/// the writer on a thread pinned to `writer_core`, the reader on one pinned to `reader_core`.
pub fn copy(
    link: &Link,
    warmup: u64,
    bytes: u64,
    writer_core: usize,
    reader_core: usize,
) -> anyhow::Result<Copied> {
    if warmup > 0 {
        copy_once(link, warmup, writer_core, reader_core).context("warm-up copy")?;
    }
    copy_once(link, bytes, writer_core, reader_core)
}

fn copy_once(
    link: &Link,
    bytes: u64,
    writer_core: usize,
    reader_core: usize,
) -> anyhow::Result<Copied> {
    let (mut w, mut r) = connect(link)?;
    // Both threads pinned and their buffers touched before the clock starts.
    let go = Arc::new(Barrier::new(2));
    let go_r = go.clone();
    let reader = std::thread::spawn(move || -> anyhow::Result<(u64, Instant)> {
        crate::pin::pin_current(reader_core, "bulk-copy reader");
        let mut buf = vec![0u8; IO_BYTES];
        go_r.wait();
        let mut got = 0u64;
        loop {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the copy"),
            }
        }
        Ok((got, Instant::now()))
    });
    let writer = std::thread::spawn(move || -> anyhow::Result<Instant> {
        crate::pin::pin_current(writer_core, "bulk-copy writer");
        // Not zeros: nothing along the way gets to treat the data as special.
        let buf: Vec<u8> = (0..IO_BYTES).map(|i| (i * 131 + 7) as u8).collect();
        go.wait();
        let start = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(IO_BYTES as u64) as usize;
            w.write_all(&buf[..n]).context("writing the copy")?;
            left -= n as u64;
        }
        w.shutdown_write()
            .context("closing the copy's write side")?;
        Ok(start)
    });
    let start = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the bulk-copy writer panicked"))?;
    let read = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the bulk-copy reader panicked"))?;
    let (start, (got, end)) = (start?, read?);
    ensure!(got == bytes, "the copy delivered {got} of {bytes} bytes");
    Ok(Copied {
        bytes,
        seconds: end.duration_since(start).as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_every_byte_over_both_links() {
        let dir = tempfile::tempdir().expect("tempdir");
        for link in [Link::Unix(dir.path().join("copy.sock")), Link::Tcp] {
            let c = copy(&link, 1 << 20, 5 << 20 | 123, 0, 0).expect("copy");
            assert_eq!(c.bytes, 5 << 20 | 123);
            assert!(c.seconds > 0.0 && c.bytes_per_sec() > 0.0, "{c:?}");
        }
    }
}
