//! The client: [`ServerArbiter`], an [`Arbiter`] over TCP.
//!
//! The client keeps its connection between calls. If a reused connection fails, it reconnects
//! and asks once more, which is safe because test-and-set is idempotent for the recorded winner.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use transport::handshake::{primary_handshake, SessionParams};
use transport::{ChannelError, PreSharedKey};

use super::protocol::{Request, Response};
use super::session::{self, Sealed, MAX_MESSAGE};
use crate::{
    validate_candidate, validate_joins_at, validate_pair_id, validate_request, Arbiter,
    ArbiterError, Decision, Record,
};
use transport::session::End;

/// A client of an [`ArbiterServer`](super::ArbiterServer): an [`Arbiter`] over TCP.
#[derive(Debug)]
pub struct ServerArbiter {
    addr: String,
    params: SessionParams,
    connect_timeout: Duration,
    io_timeout: Duration,
    conn: Option<Sealed<TcpStream>>,
}

impl ServerArbiter {
    /// A client of the server at `addr` (`host:port`, resolved at each connection). It connects
    /// on first use, with a 1 s connect and a 3 s I/O timeout.
    pub fn new(addr: impl Into<String>, key: PreSharedKey) -> Self {
        ServerArbiter {
            addr: addr.into(),
            params: session::params(key),
            connect_timeout: Duration::from_secs(1),
            io_timeout: Duration::from_secs(3),
            conn: None,
        }
    }

    /// Sets the connect timeout (per address) and the timeout of each read and write.
    pub fn with_timeouts(mut self, connect: Duration, io: Duration) -> Self {
        self.connect_timeout = connect;
        self.io_timeout = io;
        self
    }

    fn connect(&self) -> Result<Sealed<TcpStream>, ArbiterError> {
        let addrs = self
            .addr
            .to_socket_addrs()
            .map_err(|e| ArbiterError::unavailable(&format!("resolving {}", self.addr), e))?;
        let mut last = None;
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.connect_timeout) {
                Ok(mut stream) => {
                    let setup = stream
                        .set_nodelay(true)
                        .and_then(|()| stream.set_read_timeout(Some(self.io_timeout)))
                        .and_then(|()| stream.set_write_timeout(Some(self.io_timeout)));
                    setup.map_err(|e| ArbiterError::unavailable("configuring a socket", e))?;
                    let accepted =
                        primary_handshake(&mut stream, &self.params).map_err(handshake_error)?;
                    return Ok(Sealed::new(
                        stream,
                        &accepted.keys,
                        End::Connecting,
                        MAX_MESSAGE,
                    ));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(ArbiterError::Unavailable(match last {
            Some(e) => format!("connecting to arbiter {}: {e}", self.addr),
            None => format!("arbiter {} resolves to no address", self.addr),
        }))
    }

    fn request(&mut self, req: &Request) -> Result<Response, ArbiterError> {
        let body = req.encode();
        loop {
            let reused = self.conn.is_some();
            let mut stream = match self.conn.take() {
                Some(s) => s,
                None => self.connect()?,
            };
            let answer = stream
                .write_message(&body)
                .and_then(|()| stream.read_message());
            match answer {
                Ok(answer) => {
                    let response = Response::decode(&answer).ok_or_else(|| {
                        ArbiterError::Protocol("malformed response from the arbiter".into())
                    })?;
                    self.conn = Some(stream);
                    return Ok(response);
                }
                // A kept connection may have died since (server restarted): ask once more on a
                // new one. Safe: the recorded winner asking again gets the same Won.
                Err(_) if reused => continue,
                Err(e) => {
                    return Err(ArbiterError::unavailable(
                        &format!("asking arbiter {}", self.addr),
                        e,
                    ))
                }
            }
        }
    }
}

fn handshake_error(e: ChannelError) -> ArbiterError {
    match e {
        ChannelError::AuthRejected | ChannelError::PeerNotAuthenticated => ArbiterError::Auth(e),
        ChannelError::PeerClosed
        | ChannelError::HandshakeTimeout { .. }
        | ChannelError::Timeout { .. }
        | ChannelError::Io { .. } => ArbiterError::unavailable("arbiter handshake", e),
        other => ArbiterError::Protocol(format!("arbiter handshake: {other}")),
    }
}

fn server_error(resp: Response, what: &str) -> ArbiterError {
    match resp {
        Response::Unavailable(msg) => ArbiterError::Unavailable(format!("arbiter server: {msg}")),
        Response::Refused(msg) => ArbiterError::Protocol(format!("arbiter server refused: {msg}")),
        other => ArbiterError::Protocol(format!("unexpected answer to {what}: {other:?}")),
    }
}

impl Arbiter for ServerArbiter {
    fn claim(
        &mut self,
        pair_id: &str,
        candidate: &str,
        epoch: u64,
        joins_at: Option<&str>,
    ) -> Result<Decision, ArbiterError> {
        let new_epoch = validate_request(pair_id, candidate, epoch, joins_at)?;
        let resp = self.request(&Request::Claim {
            pair: pair_id.to_owned(),
            candidate: candidate.to_owned(),
            epoch,
            joins_at: joins_at.map(str::to_owned),
        })?;
        match resp {
            Response::Won(e) if e == new_epoch => Ok(Decision::Won { epoch: e }),
            Response::Lost(winner, e) if e > epoch && validate_candidate(&winner).is_ok() => {
                Ok(Decision::Lost { winner, epoch: e })
            }
            other => Err(server_error(other, "claim")),
        }
    }

    fn latest(&mut self, pair_id: &str) -> Result<Option<Record>, ArbiterError> {
        validate_pair_id(pair_id)?;
        match self.request(&Request::Latest {
            pair: pair_id.to_owned(),
        })? {
            Response::Current(None) | Response::Latest(None) => Ok(None),
            Response::Latest(Some((winner, epoch, joins_at)))
                if validate_candidate(&winner).is_ok()
                    && joins_at
                        .as_deref()
                        .is_none_or(|a| validate_joins_at(a).is_ok()) =>
            {
                Ok(Some(Record {
                    winner,
                    epoch,
                    joins_at,
                }))
            }
            other => Err(server_error(other, "latest")),
        }
    }
}
