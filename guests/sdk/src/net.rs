//! The network device: requests in, responses out.
//!
//! The VMM writes the next client request into the receive buffer (`abi::RX_BUF_ADDR`, 4 KiB)
//! at a NET_RX hypercall; the guest writes a response into the transmit buffer
//! (`abi::TX_BUF_ADDR`, 4 KiB) and hands it over with NET_TX. The primary releases a response to
//! its client only once the backup has the log up to it (the output rule); the backup checks that
//! its replica produced the same bytes.
//!
//! Zero-copy both ways: a [`Request`] reads the receive buffer in place, and a response is
//! written straight into the transmit buffer ([`Tx`]). The borrow checker keeps this sound: a
//! [`Request`] borrows the [`Net`] handle, so the next NET_RX — the only hypercall after which
//! the VMM rewrites the receive buffer — cannot happen while anything still reads the previous
//! request.
//!
//! ```ignore
//! let mut net = Net::take();
//! while let Some(mut req) = net.next_request() {
//!     let id = req.word(0) as u32;             // bytes 0..8 of the request, little-endian
//!     let tx = req.tx();
//!     tx.set_word(0, u64::from(id));
//!     req.send(8);                              // NET_TX with the first 8 bytes of Tx
//! }
//! ```

use core::marker::PhantomData;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::abi::{NET_BUF_LEN, OP_NET_RX, OP_NET_TX, RX_BUF_ADDR, RX_SHUTDOWN, TX_BUF_ADDR};
use crate::{hypercall, irq};

/// Words in a network buffer.
pub const BUF_WORDS: usize = NET_BUF_LEN / 8;

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The guest's network device: the only way to receive requests and send responses. There is one
/// ([`Net::take`]).
#[derive(Debug)]
pub struct Net {
    /// Not `Send`/`Sync`, and only made by [`Net::take`].
    _own: PhantomData<*mut ()>,
}

/// The transmit buffer: a response is written here, then sent with [`Request::send`] or
/// [`Net::send`]. Word `i` is bytes `8 i .. 8 i + 8`, little-endian.
#[derive(Debug)]
#[repr(C, align(4096))]
pub struct Tx([u64; BUF_WORDS]);

/// A request in the receive buffer, valid until the next [`Net::next_request`] (which its borrow
/// of the [`Net`] prevents while it lives).
#[derive(Debug)]
pub struct Request<'n> {
    len: usize,
    _net: PhantomData<&'n mut Net>,
}

impl Net {
    /// The network device.
    ///
    /// # Panics
    /// When called a second time (a guest bug).
    pub fn take() -> Net {
        if TAKEN.swap(true, Ordering::Relaxed) {
            panic!("ftvm_guest::net::Net taken twice");
        }
        Net { _own: PhantomData }
    }

    /// Waits for the next request: NET_RX until the VMM hands one over, [`irq::wait`] between
    /// empty polls (a request that arrives during the wait comes with its interrupt). `None` once the VMM asks the guest to stop (`RX_SHUTDOWN`); the guest should
    /// then halt (returning from `main` does).
    #[inline(always)]
    pub fn next_request(&mut self) -> Option<Request<'_>> {
        loop {
            hypercall::call(OP_NET_RX);
            if hypercall::op_result() == RX_SHUTDOWN {
                return None;
            }
            let mut len = hypercall::rx_len() as usize;
            if len == 0 {
                irq::wait();
                // A request that arrived while the guest waited is already in the receive
                // buffer (network-receive interrupt); a timer tick leaves `rx_len` 0.
                len = hypercall::rx_len() as usize;
            }
            if len != 0 {
                return Some(Request {
                    len,
                    _net: PhantomData,
                });
            }
        }
    }

    /// The transmit buffer, for output that answers no request.
    #[inline(always)]
    pub fn tx(&mut self) -> &mut Tx {
        tx()
    }

    /// NET_TX: sends the first `len` bytes of the transmit buffer (at most its 4 KiB).
    #[inline(always)]
    pub fn send(&mut self, len: usize) {
        send(len);
    }
}

impl Request<'_> {
    /// Length of the request in bytes, as the VMM wrote it into `rx_len` (1..=4096 by the ABI).
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: an empty poll is not a request.
    #[inline(always)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The request's bytes, in place in the receive buffer.
    #[inline(always)]
    pub fn bytes(&self) -> &[u8] {
        let rx = rx();
        rx.get(..self.len).unwrap_or(rx)
    }

    /// The receive buffer's 8 bytes at `off` as a little-endian word, read in place. Bytes at or
    /// past [`Request::len`] are not part of the request (whatever the buffer held before: mask
    /// them); offsets past the buffer's end read as zero bytes.
    #[inline(always)]
    pub fn word(&self, off: usize) -> u64 {
        let mut w = [0; 8];
        if let Some(b) = rx().get(off..off.wrapping_add(8)) {
            w.copy_from_slice(b);
        }
        u64::from_le_bytes(w)
    }

    /// The receive buffer's byte at `off` (0 past its end); as for [`Request::word`], bytes past
    /// [`Request::len`] are not part of the request.
    #[inline(always)]
    pub fn byte(&self, off: usize) -> u8 {
        rx().get(off).copied().unwrap_or(0)
    }

    /// The transmit buffer, to write the response into.
    #[inline(always)]
    pub fn tx(&mut self) -> &mut Tx {
        tx()
    }

    /// NET_TX: sends the first `len` bytes of the transmit buffer (at most its 4 KiB) as the
    /// response. A request may be answered more than once, or not at all.
    #[inline(always)]
    pub fn send(&mut self, len: usize) {
        send(len);
    }
}

impl Tx {
    /// Word `i` (bytes `8 i .. 8 i + 8`); 0 past the buffer's end.
    #[inline(always)]
    pub fn word(&self, i: usize) -> u64 {
        self.0.get(i).copied().unwrap_or(0)
    }

    /// Sets word `i` (bytes `8 i .. 8 i + 8`); ignored past the buffer's end.
    #[inline(always)]
    pub fn set_word(&mut self, i: usize, w: u64) {
        if let Some(slot) = self.0.get_mut(i) {
            *slot = w;
        }
    }

    /// The whole buffer as words.
    #[inline(always)]
    pub fn words_mut(&mut self) -> &mut [u64; BUF_WORDS] {
        &mut self.0
    }

    /// The whole buffer as bytes.
    #[inline(always)]
    pub fn bytes_mut(&mut self) -> &mut [u8; NET_BUF_LEN] {
        // SAFETY: `Tx` is `NET_BUF_LEN` bytes of plain integers; any byte pattern is a valid u8
        // and u8 has no alignment, so viewing it as bytes for as long as it is borrowed is sound.
        unsafe { &mut *(self.0.as_mut_ptr() as *mut [u8; NET_BUF_LEN]) }
    }
}

/// The receive buffer.
#[inline(always)]
fn rx() -> &'static [u8; NET_BUF_LEN] {
    // SAFETY: the receive buffer is identity-mapped guest RAM of NET_BUF_LEN bytes. The VMM
    // writes it only at NET_RX, and every reference made here is reached through a `Request`,
    // whose borrow of the one `Net` ends before the next NET_RX can be issued; the `'static`
    // never escapes that borrow (callers narrow it to `&self`).
    unsafe { &*(RX_BUF_ADDR as *const [u8; NET_BUF_LEN]) }
}

/// The transmit buffer.
#[inline(always)]
fn tx() -> &'static mut Tx {
    // SAFETY: the transmit buffer is identity-mapped guest RAM of NET_BUF_LEN bytes, 4 KiB
    // aligned; the VMM only reads it (at NET_TX). Only `Net::tx` and `Request::tx` call this,
    // each narrowing the lifetime to a `&mut` borrow of the one `Net` (directly or through the
    // `Request` that borrows it), so no two references to it are ever live at once.
    unsafe { &mut *(TX_BUF_ADDR as *mut Tx) }
}

#[inline(always)]
fn send(len: usize) {
    let len = if len > NET_BUF_LEN { NET_BUF_LEN } else { len };
    hypercall::set_tx_len(len as u32);
    hypercall::call(OP_NET_TX);
}
