//! Panic-free little-endian cursors shared by the decoder and the encoder.
//!
//! Every read or write returns `None` instead of panicking when the bytes run out, so the
//! decoder can turn a short buffer into a typed error and no input can reach an out-of-bounds
//! index. All multi-byte integers in the format are little-endian; this is the only place that
//! converts them.

/// A forward-only reader over a borrowed byte slice.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `bytes`.
    #[inline]
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }

    /// The number of bytes not yet read.
    #[inline]
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }

    /// Takes the next `N` bytes as a borrowed array.
    #[inline]
    pub(crate) fn chunk<const N: usize>(&mut self) -> Option<&'a [u8; N]> {
        let (head, tail) = self.rest.split_first_chunk::<N>()?;
        self.rest = tail;
        Some(head)
    }

    /// Takes the next `N` bytes as an array.
    #[inline]
    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.chunk().copied()
    }

    /// Takes the next `len` bytes as a borrowed slice (the zero-copy path for payloads).
    #[inline]
    pub(crate) fn bytes(&mut self, len: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(len)?;
        self.rest = tail;
        Some(head)
    }

    /// Reads a `u8`.
    #[inline]
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    /// Reads a little-endian `u16`.
    #[inline]
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }

    /// Reads a little-endian `u32`.
    #[inline]
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }

    /// Reads a little-endian `u64`.
    #[inline]
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
}

/// A forward-only writer into a borrowed mutable byte slice.
#[derive(Debug)]
pub(crate) struct Writer<'a> {
    rest: &'a mut [u8],
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buf`.
    #[inline]
    pub(crate) fn new(buf: &'a mut [u8]) -> Self {
        Self { rest: buf }
    }

    /// Writes a fixed-size byte array.
    #[inline]
    pub(crate) fn array<const N: usize>(&mut self, bytes: [u8; N]) -> Option<()> {
        let rest = core::mem::take(&mut self.rest);
        let (head, tail) = rest.split_first_chunk_mut::<N>()?;
        *head = bytes;
        self.rest = tail;
        Some(())
    }

    /// Writes a byte slice.
    #[inline]
    pub(crate) fn bytes(&mut self, bytes: &[u8]) -> Option<()> {
        let rest = core::mem::take(&mut self.rest);
        let (head, tail) = rest.split_at_mut_checked(bytes.len())?;
        // Cannot panic: `split_at_mut_checked` made `head` exactly `bytes.len()` long.
        head.copy_from_slice(bytes);
        self.rest = tail;
        Some(())
    }

    /// Writes a `u8`.
    #[inline]
    pub(crate) fn u8(&mut self, v: u8) -> Option<()> {
        self.array([v])
    }

    /// Writes a little-endian `u16`.
    #[inline]
    pub(crate) fn u16(&mut self, v: u16) -> Option<()> {
        self.array(v.to_le_bytes())
    }

    /// Writes a little-endian `u32`.
    #[inline]
    pub(crate) fn u32(&mut self, v: u32) -> Option<()> {
        self.array(v.to_le_bytes())
    }

    /// Writes a little-endian `u64`.
    #[inline]
    pub(crate) fn u64(&mut self, v: u64) -> Option<()> {
        self.array(v.to_le_bytes())
    }
}
