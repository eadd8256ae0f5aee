//! Typed errors for the safe layer.

/// Everything the safe layer can fail with. DPDK failures carry the errno DPDK reported and its
/// `rte_strerror` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DpdkError {
    /// [`crate::Eal::init`] was already called in this process (EAL can be initialised once per
    /// process, even after a failed attempt or after cleanup).
    #[error(
        "DPDK EAL already initialised in this process (one EAL per process; start another process)"
    )]
    AlreadyInitialized,
    /// No live EAL: [`crate::Eal::init`] was not called, or every handle was dropped.
    #[error("DPDK EAL is not initialised (call Eal::init first)")]
    NotInitialized,
    /// `rte_eal_init` failed.
    #[error("rte_eal_init failed: {message} (rte_errno {errno})")]
    EalInit {
        /// `rte_errno` after the call.
        errno: i32,
        /// `rte_strerror(errno)`.
        message: String,
    },
    /// An argument was rejected before calling into DPDK.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A DPDK call failed.
    #[error("{call} failed: {message} (errno {errno})")]
    Call {
        /// The DPDK function.
        call: &'static str,
        /// The (positive) errno or `E_RTE_*` code.
        errno: i32,
        /// `rte_strerror(errno)`.
        message: String,
    },
    /// `port_id` is not an ethdev port of this process.
    #[error("no DPDK port {0}")]
    NoSuchPort(u16),
    /// Another [`crate::Port`] handle owns this port.
    #[error("DPDK port {0} is already owned by another Port handle")]
    PortBusy(u16),
    /// The mempool has no free mbuf.
    #[error("mempool {0:?} has no free mbuf")]
    PoolExhausted(String),
    /// Not enough room in an mbuf's segment.
    #[error("mbuf has {available} bytes of {which}room, {requested} requested")]
    NoRoom {
        /// "tail" or "head".
        which: &'static str,
        /// Bytes asked for.
        requested: usize,
        /// Bytes available.
        available: usize,
    },
}

impl DpdkError {
    /// A failed DPDK call: `errno` may be given with either sign (ethdev returns `-errno`).
    pub(crate) fn call(call: &'static str, errno: i32) -> Self {
        let errno = errno.saturating_abs();
        DpdkError::Call {
            call,
            errno,
            message: crate::strerror(errno),
        }
    }

    /// A failed DPDK call that reported its error through `rte_errno`.
    pub(crate) fn from_rte_errno(call: &'static str) -> Self {
        Self::call(call, crate::rte_errno())
    }

    /// The errno DPDK reported, if this error came from DPDK.
    pub fn errno(&self) -> Option<i32> {
        match self {
            DpdkError::EalInit { errno, .. } | DpdkError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Checks an ethdev-style return value (`0` or positive on success, `-errno` on failure).
pub(crate) fn check(call: &'static str, ret: i32) -> Result<i32, DpdkError> {
    if ret < 0 {
        Err(DpdkError::call(call, ret))
    } else {
        Ok(ret)
    }
}
