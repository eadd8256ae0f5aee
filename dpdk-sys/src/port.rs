//! Ethernet ports (ethdev) with one rx and one tx queue.

use std::cell::Cell;
use std::ffi::CStr;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{check, DpdkError};
use crate::ffi;
use crate::intr;
use crate::{Mbuf, Mempool};

/// Ports owned by a live [`Port`] handle (bit per port id), so two handles never drive the same
/// queues.
static CLAIMED: AtomicU64 = AtomicU64::new(0);

const _: () = assert!(ffi::RTE_MAX_ETHPORTS <= 64, "CLAIMED has one bit per port");

/// Burst size [`Port::rx_burst`] reserves when the caller's vector has no spare capacity.
pub const DEFAULT_BURST: usize = 32;

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct EtherAddr(pub [u8; 6]);

impl std::fmt::Display for EtherAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Link state (`rte_eth_link_get_nowait`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkStatus {
    /// Link up.
    pub up: bool,
    /// Speed in Mbit/s as the driver reports it (0 if unknown).
    pub speed_mbps: u32,
    /// Full duplex.
    pub full_duplex: bool,
}

/// Basic port counters (`rte_eth_stats_get`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Packets the hardware/driver dropped on receive (rx queue full).
    pub rx_missed: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Receive failures for lack of mbufs.
    pub rx_nombuf: u64,
}

/// An ethdev port configured with one rx queue (filled from a [`Mempool`]) and one tx queue.
/// Stopped and closed on drop (for a `--vdev` device that also removes it, e.g. a memif socket).
///
/// `Send` but not `Sync`: the burst functions take `&mut self` because a DPDK queue must only
/// be polled by one thread at a time.
pub struct Port {
    id: u16,
    pool: Mempool,
    rx_queue_size: u16,
    tx_queue_size: u16,
    started: bool,
    _not_sync: PhantomData<Cell<()>>,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port")
            .field("id", &self.id)
            .field("name", &self.name())
            .field("started", &self.started)
            .field("rx_queue_size", &self.rx_queue_size)
            .field("tx_queue_size", &self.tx_queue_size)
            .field("pool", &self.pool.name())
            .finish()
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        // One teardown at a time, never overlapping the interrupt thread's work for this port
        // or its peer (see `intr`): stopping one end of a memif pair makes the interrupt thread
        // disconnect the other end.
        let _one = intr::TEARDOWN.lock().unwrap_or_else(|e| e.into_inner());
        intr::barrier(intr::BARRIER_TIMEOUT);
        if self.started {
            // SAFETY: we own the port (CLAIMED), it is started, and nothing polls its queues
            // any more (&mut self).
            unsafe { ffi::rte_eth_dev_stop(self.id) };
            intr::barrier(intr::BARRIER_TIMEOUT);
        }
        // SAFETY: we own the port and it is stopped; close releases the device. The interrupt
        // thread has nothing of this port's left to handle (barrier above).
        unsafe { ffi::rte_eth_dev_close(self.id) };
        CLAIMED.fetch_and(!(1u64 << self.id), Ordering::SeqCst);
    }
}

impl Port {
    /// Configures `port_id` with one rx queue of `rx_queue_size` descriptors, whose buffers come
    /// from `mempool`, and one tx queue of `tx_queue_size` descriptors (both adjusted to the
    /// driver's limits). Call [`Port::start`] next. The port is stopped and closed when the
    /// returned handle drops, also if configuration fails part-way.
    pub fn configure(
        port_id: u16,
        mempool: &Mempool,
        rx_queue_size: u16,
        tx_queue_size: u16,
    ) -> Result<Port, DpdkError> {
        if u32::from(port_id) >= ffi::RTE_MAX_ETHPORTS {
            return Err(DpdkError::NoSuchPort(port_id));
        }
        // SAFETY: checks a port id against ethdev's table (the EAL is alive: mempool holds it).
        if unsafe { ffi::rte_eth_dev_is_valid_port(port_id) } != 1 {
            return Err(DpdkError::NoSuchPort(port_id));
        }
        let bit = 1u64 << port_id;
        if CLAIMED.fetch_or(bit, Ordering::SeqCst) & bit != 0 {
            return Err(DpdkError::PortBusy(port_id));
        }
        // From here on, dropping `port` closes the device and releases the claim.
        let mut port = Port {
            id: port_id,
            pool: mempool.clone(),
            rx_queue_size,
            tx_queue_size,
            started: false,
            _not_sync: PhantomData,
        };

        let conf = ffi::rte_eth_conf::default();
        // SAFETY: valid port id and a zeroed (default) configuration.
        check("rte_eth_dev_configure", unsafe {
            ffi::rte_eth_dev_configure(port_id, 1, 1, &conf)
        })?;
        let (mut rxd, mut txd) = (rx_queue_size, tx_queue_size);
        // SAFETY: valid port id and out-pointers.
        check("rte_eth_dev_adjust_nb_rx_tx_desc", unsafe {
            ffi::rte_eth_dev_adjust_nb_rx_tx_desc(port_id, &mut rxd, &mut txd)
        })?;
        port.rx_queue_size = rxd;
        port.tx_queue_size = txd;
        // SAFETY: valid port id. -1 (unknown) becomes SOCKET_ID_ANY in the u32 cast DPDK expects.
        let socket = unsafe { ffi::rte_eth_dev_socket_id(port_id) } as u32;
        // SAFETY: valid port, queue 0 of the 1 configured, NULL = default rxconf; the pool is a
        // live pktmbuf pool, kept alive by `port` for as long as the queue exists.
        check("rte_eth_rx_queue_setup", unsafe {
            ffi::rte_eth_rx_queue_setup(port_id, 0, rxd, socket, std::ptr::null(), mempool.as_ptr())
        })?;
        // SAFETY: valid port, queue 0 of the 1 configured, NULL = default txconf.
        check("rte_eth_tx_queue_setup", unsafe {
            ffi::rte_eth_tx_queue_setup(port_id, 0, txd, socket, std::ptr::null())
        })?;
        Ok(port)
    }

    /// Starts the port (`rte_eth_dev_start`).
    pub fn start(&mut self) -> Result<(), DpdkError> {
        if !self.started {
            // SAFETY: the port is configured with its queues set up.
            check("rte_eth_dev_start", unsafe {
                ffi::rte_eth_dev_start(self.id)
            })?;
            self.started = true;
        }
        Ok(())
    }

    /// Stops the port (`rte_eth_dev_stop`); [`Port::start`] restarts it.
    pub fn stop(&mut self) -> Result<(), DpdkError> {
        if self.started {
            let _one = intr::TEARDOWN.lock().unwrap_or_else(|e| e.into_inner());
            intr::barrier(intr::BARRIER_TIMEOUT);
            // SAFETY: the port is started and nobody is polling it (&mut self).
            let rc = check("rte_eth_dev_stop", unsafe {
                ffi::rte_eth_dev_stop(self.id)
            });
            // What the stop set off on the interrupt thread (e.g. the peer's disconnect) is
            // over before anyone stops or closes another port.
            intr::barrier(intr::BARRIER_TIMEOUT);
            rc?;
            self.started = false;
        }
        Ok(())
    }

    /// Whether the port is started.
    pub fn is_started(&self) -> bool {
        self.started
    }

    /// The ethdev port id.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// The mempool the rx queue allocates from.
    pub fn mempool(&self) -> &Mempool {
        &self.pool
    }

    /// rx queue size (descriptors) after adjustment to the driver's limits.
    pub fn rx_queue_size(&self) -> u16 {
        self.rx_queue_size
    }

    /// tx queue size (descriptors) after adjustment to the driver's limits.
    pub fn tx_queue_size(&self) -> u16 {
        self.tx_queue_size
    }

    /// The device name (e.g. `net_memif0`).
    pub fn name(&self) -> String {
        let mut buf = [0 as std::ffi::c_char; ffi::RTE_ETH_NAME_MAX_LEN as usize];
        // SAFETY: buf has RTE_ETH_NAME_MAX_LEN bytes, as the function requires.
        let ret = unsafe { ffi::rte_eth_dev_get_name_by_port(self.id, buf.as_mut_ptr()) };
        if ret != 0 {
            return String::new();
        }
        // SAFETY: on success buf holds a NUL-terminated name.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// The port's MAC address.
    pub fn mac_address(&self) -> Result<EtherAddr, DpdkError> {
        let mut addr = ffi::rte_ether_addr::default();
        // SAFETY: valid port id and out-pointer.
        check("rte_eth_macaddr_get", unsafe {
            ffi::rte_eth_macaddr_get(self.id, &mut addr)
        })?;
        Ok(EtherAddr(addr.addr_bytes))
    }

    /// Link state, without waiting.
    pub fn link(&self) -> Result<LinkStatus, DpdkError> {
        let mut link = ffi::rte_eth_link::default();
        // SAFETY: valid port id and out-pointer.
        check("rte_eth_link_get_nowait", unsafe {
            ffi::rte_eth_link_get_nowait(self.id, &mut link)
        })?;
        Ok(LinkStatus {
            up: link.link_status() == ffi::RTE_ETH_LINK_UP as u16,
            speed_mbps: link.link_speed,
            full_duplex: link.link_duplex() == ffi::RTE_ETH_LINK_FULL_DUPLEX as u16,
        })
    }

    /// Port counters.
    pub fn stats(&self) -> Result<PortStats, DpdkError> {
        let mut s = ffi::rte_eth_stats::default();
        // SAFETY: valid port id and out-pointer.
        check("rte_eth_stats_get", unsafe {
            ffi::rte_eth_stats_get(self.id, &mut s)
        })?;
        Ok(PortStats {
            rx_packets: s.ipackets,
            tx_packets: s.opackets,
            rx_bytes: s.ibytes,
            tx_bytes: s.obytes,
            rx_missed: s.imissed,
            rx_errors: s.ierrors,
            tx_errors: s.oerrors,
            rx_nombuf: s.rx_nombuf,
        })
    }

    /// Enables or disables promiscuous mode (needed to receive frames for other MACs on real
    /// or af_packet ports; memif delivers everything anyway).
    pub fn set_promiscuous(&mut self, on: bool) -> Result<(), DpdkError> {
        // SAFETY: valid port id.
        let ret = unsafe {
            if on {
                ffi::rte_eth_promiscuous_enable(self.id)
            } else {
                ffi::rte_eth_promiscuous_disable(self.id)
            }
        };
        check("rte_eth_promiscuous_enable/disable", ret).map(|_| ())
    }

    /// Receives up to `out`'s spare capacity (reserving [`DEFAULT_BURST`] if it has none) of
    /// frames, appending them to `out`; returns how many arrived. Never blocks. Keep `out`
    /// around between calls to avoid allocating.
    #[inline]
    pub fn rx_burst(&mut self, out: &mut Vec<Mbuf>) -> usize {
        if !self.started {
            return 0;
        }
        if out.capacity() == out.len() {
            out.reserve(DEFAULT_BURST);
        }
        let spare = out.spare_capacity_mut();
        let want = u16::try_from(spare.len()).unwrap_or(u16::MAX);
        // SAFETY: the port is started and polled only through &mut self; `spare` has room for
        // `want` pointers, and Mbuf is a repr(transparent) non-null mbuf pointer, so the driver
        // fills the first `got` slots with mbufs it hands over to us.
        let got =
            unsafe { ffi::ftvm_rte_eth_rx_burst(self.id, 0, spare.as_mut_ptr().cast(), want) };
        let got = usize::from(got);
        // SAFETY: the driver initialised `got` <= spare capacity slots with owned mbufs.
        unsafe { out.set_len(out.len() + got) };
        got
    }

    /// Queues the frames in `pkts` for transmission, from the front; the ones the driver took
    /// are removed from `pkts` (the driver frees them once sent), the rest stay for a retry.
    /// Returns how many were taken.
    #[inline]
    pub fn tx_burst(&mut self, pkts: &mut Vec<Mbuf>) -> usize {
        if !self.started || pkts.is_empty() {
            return 0;
        }
        let len = pkts.len();
        let n = u16::try_from(len).unwrap_or(u16::MAX);
        // SAFETY: the port is started and used only through &mut self; pkts holds `len` owned
        // mbufs laid out as `struct rte_mbuf *` (repr(transparent)).
        let sent = usize::from(unsafe {
            ffi::ftvm_rte_eth_tx_burst(self.id, 0, pkts.as_mut_ptr().cast(), n)
        });
        // SAFETY: the first `sent` mbufs now belong to the driver: forget them (no drop) by
        // moving the unsent tail to the front and shortening the vector.
        unsafe {
            let p = pkts.as_mut_ptr();
            pkts.set_len(0);
            std::ptr::copy(p.add(sent), p, len - sent);
            pkts.set_len(len - sent);
        }
        sent
    }

    /// Queues one frame; gives it back if the tx queue is full (or the port is stopped).
    #[inline]
    pub fn tx_one(&mut self, m: Mbuf) -> Result<(), Mbuf> {
        if !self.started {
            return Err(m);
        }
        let mut raw = m.as_ptr();
        // SAFETY: as in tx_burst, with a one-element array.
        let sent = unsafe { ffi::ftvm_rte_eth_tx_burst(self.id, 0, &mut raw, 1) };
        if sent == 1 {
            // The driver owns it now.
            let _ = m.into_raw();
            Ok(())
        } else {
            Err(m)
        }
    }
}
