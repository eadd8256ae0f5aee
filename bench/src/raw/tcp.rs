//! Loopback TCP, `TCP_NODELAY` on both ends: blocking `write_all`/`read_exact`, or
//! non-blocking sockets busy-polled.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};

use anyhow::{bail, ensure, Context};
use hdrhistogram::Histogram;

use super::{drive, Backoff, Endpoint, FailFlag, Plan, STALL_TIMEOUT};

/// The blocking ping-pong: every wait is in the kernel, bounded by [`STALL_TIMEOUT`].
pub(super) fn blocking(
    hist: Histogram<u64>,
    plan: &Plan,
    peer_failed: &FailFlag,
) -> anyhow::Result<Histogram<u64>> {
    let (client, server) = tcp_pair()?;
    for s in [&client, &server] {
        s.set_read_timeout(Some(STALL_TIMEOUT))
            .context("setting the socket read timeout")?;
        s.set_write_timeout(Some(STALL_TIMEOUT))
            .context("setting the socket write timeout")?;
    }
    drive(
        BlockingTcp(client),
        BlockingTcp(server),
        hist,
        plan,
        peer_failed,
    )
}

/// The busy-polled ping-pong over non-blocking sockets.
pub(super) fn spin(
    hist: Histogram<u64>,
    plan: &Plan,
    peer_failed: &FailFlag,
) -> anyhow::Result<Histogram<u64>> {
    let (client, server) = tcp_pair()?;
    for s in [&client, &server] {
        s.set_nonblocking(true)
            .context("making the socket non-blocking")?;
    }
    drive(
        SpinTcp::new(client, peer_failed),
        SpinTcp::new(server, peer_failed),
        hist,
        plan,
        peer_failed,
    )
}

/// A connected loopback pair, `TCP_NODELAY` on both ends: (client, server).
pub(super) fn tcp_pair() -> anyhow::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding a 127.0.0.1 listener on an ephemeral port")?;
    let addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    // The connection completes in the listen backlog, so one thread can connect, then accept.
    let client = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    let client_addr = client
        .local_addr()
        .context("reading the client socket's address")?;
    let (server, peer) = listener
        .accept()
        .with_context(|| format!("accepting on {addr}"))?;
    ensure!(
        peer == client_addr,
        "accepted a connection from {peer}, expected our own client at {client_addr}"
    );
    for s in [&client, &server] {
        s.set_nodelay(true).context("setting TCP_NODELAY")?;
    }
    Ok((client, server))
}

#[derive(Debug)]
struct BlockingTcp(TcpStream);

impl Endpoint for BlockingTcp {
    fn send(&mut self, buf: &[u8]) -> anyhow::Result<()> {
        self.0
            .write_all(buf)
            .with_context(|| format!("writing {} bytes to the TCP socket", buf.len()))
    }

    fn recv(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        self.0.read_exact(buf).map_err(|e| {
            let timed_out = matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut);
            let what = if timed_out {
                format!("no data on the TCP socket for {STALL_TIMEOUT:?}")
            } else {
                format!("reading {} bytes from the TCP socket", buf.len())
            };
            anyhow::Error::new(e).context(what)
        })
    }
}

#[derive(Debug)]
pub(super) struct SpinTcp<'a> {
    stream: TcpStream,
    peer_failed: &'a FailFlag,
}

impl<'a> SpinTcp<'a> {
    pub(super) fn new(stream: TcpStream, peer_failed: &'a FailFlag) -> Self {
        SpinTcp {
            stream,
            peer_failed,
        }
    }
}

impl Endpoint for SpinTcp<'_> {
    fn send(&mut self, buf: &[u8]) -> anyhow::Result<()> {
        let mut done = 0;
        let mut backoff = Backoff::new(self.peer_failed);
        while done < buf.len() {
            match self.stream.write(&buf[done..]) {
                Ok(0) => bail!(
                    "the TCP socket accepted 0 bytes ({done} of {} written)",
                    buf.len()
                ),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    backoff.snooze("room in the TCP send buffer")?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "writing to the TCP socket ({done} of {} bytes written)",
                        buf.len()
                    )))
                }
            }
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        let mut done = 0;
        let mut backoff = Backoff::new(self.peer_failed);
        while done < buf.len() {
            match self.stream.read(&mut buf[done..]) {
                Ok(0) => bail!(
                    "the TCP peer closed the connection ({done} of {} bytes read)",
                    buf.len()
                ),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    backoff.snooze("data on the TCP socket")?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "reading from the TCP socket ({done} of {} bytes read)",
                        buf.len()
                    )))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::raw::tests::check;
    use crate::raw::RawMedium;

    #[test]
    fn tcp_blocking_64() -> anyhow::Result<()> {
        check(RawMedium::TcpBlocking, 64)
    }

    #[test]
    fn tcp_blocking_1500() -> anyhow::Result<()> {
        check(RawMedium::TcpBlocking, 1500)
    }

    #[test]
    fn tcp_spin_64() -> anyhow::Result<()> {
        check(RawMedium::TcpSpin, 64)
    }

    #[test]
    fn tcp_spin_1500() -> anyhow::Result<()> {
        check(RawMedium::TcpSpin, 1500)
    }
}
