//! The crate's one error type.

/// Why an arbiter operation failed. No variant ever means "you won": a caller that gets any
/// error must stay halted (or keep retrying) and must not go live.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArbiterError {
    /// The backend could not be reached or could not decide durably (network down, server
    /// stopped, shared storage unmounted or failing, etcd without quorum). Retrying later is safe.
    #[error("arbiter unavailable: {0}")]
    Unavailable(String),
    /// The arbiter server and this client hold different pre-shared keys (or the peer is not an
    /// arbiter server).
    #[error("arbiter authentication failed: {0}")]
    Auth(#[source] transport::ChannelError),
    /// A pair id, candidate or epoch the arbiter cannot record.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Stored decisions that do not parse or contradict each other; never read as a decision.
    #[error("corrupt arbiter state: {0}")]
    Corrupt(String),
    /// A backend this build does not include (a cargo feature left out); the text says how to
    /// rebuild.
    #[error("not in this build: {0}")]
    NotBuilt(&'static str),
    /// The peer broke the arbiter protocol or answered something impossible.
    #[error("arbiter protocol error: {0}")]
    Protocol(String),
    /// An operating-system call failed while setting up (not while deciding: that is
    /// [`ArbiterError::Unavailable`]).
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl ArbiterError {
    /// An I/O failure while deciding: the backend is unavailable.
    pub(crate) fn unavailable(context: &str, err: impl std::fmt::Display) -> Self {
        ArbiterError::Unavailable(format!("{context}: {err}"))
    }

    /// True for [`ArbiterError::Unavailable`]: the backend may answer if asked again later.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, ArbiterError::Unavailable(_))
    }
}
