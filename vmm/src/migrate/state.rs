//! The vCPU's state as a join transfers it: everything the guest can observe of its CPU,
//! captured at an exit boundary and set on the joiner's fresh vCPU.
//!
//! Encoding (all integers little-endian): `u32 version` ([`STATE_VERSION`]), `u64 exits` (the
//! VMM's exit counter), then the parts in this order, each as `u32 length` + the KVM
//! structure's bytes exactly as the kernel defines it: `kvm_regs`, `kvm_sregs`, `kvm_xsave`,
//! `kvm_xcrs`, `kvm_debugregs`, `kvm_vcpu_events`, `kvm_mp_state`, then `u32 count` and
//! `count` × `kvm_msr_entry`. A length that is not the structure's size, a count above
//! [`MAX_MSRS`], a short or over-long buffer: [`StateError`], never a panic.

use kvm_bindings::{
    kvm_debugregs, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use zerocopy::{FromBytes, IntoBytes};

/// Version of the encoding.
pub const STATE_VERSION: u32 = 1;
/// Most MSR entries a state may carry.
pub const MAX_MSRS: usize = 64;

/// Model-specific registers a 64-bit ring-0 guest's state includes beyond `kvm_sregs` (which
/// carries EFER, the segment bases and APIC base): SYSENTER, SYSCALL targets and mask, the
/// swapped GS base, TSC_AUX, PAT and MISC_ENABLE. Those KVM cannot read here are skipped on
/// both sides alike.
pub const SAVED_MSRS: [u32; 10] = [
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0x277,       // IA32_PAT
    0x1A0,       // IA32_MISC_ENABLE
    0xC000_0081, // STAR
    0xC000_0082, // LSTAR
    0xC000_0083, // CSTAR
    0xC000_0084, // SFMASK
    0xC000_0102, // KERNEL_GS_BASE
];

/// A malformed vCPU state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// Another version of the encoding.
    #[error("vCPU state version {found}, this build reads {STATE_VERSION}")]
    Version {
        /// The version found.
        found: u32,
    },
    /// The bytes end early.
    #[error("vCPU state ends inside {what}")]
    Truncated {
        /// The part being read.
        what: &'static str,
    },
    /// A part's length is not its structure's size.
    #[error("vCPU state: {what} is {found} bytes, expected {expected}")]
    Length {
        /// The part.
        what: &'static str,
        /// Its stated length.
        found: usize,
        /// The structure's size.
        expected: usize,
    },
    /// Too many MSR entries.
    #[error("vCPU state carries {0} MSRs (at most {MAX_MSRS})")]
    TooManyMsrs(usize),
    /// Bytes after the last part.
    #[error("vCPU state has {0} bytes after its end")]
    Trailing(usize),
}

/// Everything the guest can observe of its vCPU, and the VMM's exit counter.
pub struct VcpuState {
    /// Exits the VM has taken ([`crate::vm::Vm::exit_count`]).
    pub exits: u64,
    /// General-purpose registers, RIP, RFLAGS.
    pub regs: kvm_regs,
    /// Segments, descriptor tables, control registers, EFER, APIC base.
    pub sregs: kvm_sregs,
    /// x87, SSE and extended state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Pending exceptions, interrupts, NMIs, interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Running, halted, ...
    pub mp_state: kvm_mp_state,
    /// The [`SAVED_MSRS`] KVM could read, in that order.
    pub msrs: Vec<kvm_msr_entry>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("exits", &self.exits)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

fn put<T: IntoBytes + zerocopy::Immutable>(out: &mut Vec<u8>, v: &T) {
    let b = v.as_bytes();
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], StateError> {
        if self.rest.len() < n {
            return Err(StateError::Truncated { what });
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        let b = self.take(8, what)?;
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        Ok(u64::from_le_bytes(w))
    }

    fn part<T: FromBytes>(&mut self, what: &'static str) -> Result<T, StateError> {
        let len = self.u32(what)? as usize;
        let expected = std::mem::size_of::<T>();
        if len != expected {
            return Err(StateError::Length {
                what,
                found: len,
                expected,
            });
        }
        let bytes = self.take(len, what)?;
        T::read_from_bytes(bytes).map_err(|_| StateError::Truncated { what })
    }
}

impl VcpuState {
    /// The encoding described in the module docs.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&self.exits.to_le_bytes());
        put(&mut out, &self.regs);
        put(&mut out, &self.sregs);
        put(&mut out, &self.xsave);
        put(&mut out, &self.xcrs);
        put(&mut out, &self.debugregs);
        put(&mut out, &self.events);
        put(&mut out, &self.mp_state);
        out.extend_from_slice(&(self.msrs.len() as u32).to_le_bytes());
        for m in &self.msrs {
            out.extend_from_slice(m.as_bytes());
        }
        out
    }

    /// Reads [`VcpuState::encode`]'s bytes, checking every length.
    pub fn decode(bytes: &[u8]) -> Result<Self, StateError> {
        let mut r = Reader { rest: bytes };
        let version = r.u32("the version")?;
        if version != STATE_VERSION {
            return Err(StateError::Version { found: version });
        }
        let exits = r.u64("the exit counter")?;
        let regs = r.part("kvm_regs")?;
        let sregs = r.part("kvm_sregs")?;
        let xsave = r.part("kvm_xsave")?;
        let xcrs = r.part("kvm_xcrs")?;
        let debugregs = r.part("kvm_debugregs")?;
        let events = r.part("kvm_vcpu_events")?;
        let mp_state = r.part("kvm_mp_state")?;
        let n = r.u32("the MSR count")? as usize;
        if n > MAX_MSRS {
            return Err(StateError::TooManyMsrs(n));
        }
        let size = std::mem::size_of::<kvm_msr_entry>();
        let mut msrs = Vec::with_capacity(n);
        for _ in 0..n {
            let b = r.take(size, "an MSR entry")?;
            msrs.push(
                kvm_msr_entry::read_from_bytes(b).map_err(|_| StateError::Truncated {
                    what: "an MSR entry",
                })?,
            );
        }
        if !r.rest.is_empty() {
            return Err(StateError::Trailing(r.rest.len()));
        }
        Ok(VcpuState {
            exits,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            events,
            mp_state,
            msrs,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> VcpuState {
        let mut s = VcpuState {
            exits: 42,
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x277,
                data: 0x0007_0406_0007_0406,
                ..Default::default()
            }],
        };
        s.regs.rip = 0x10_1234;
        s.regs.rax = 7;
        s.sregs.cr3 = 0x1000;
        s
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let bytes = s.encode();
        let back = VcpuState::decode(&bytes).expect("decodes");
        assert_eq!(back.encode(), bytes);
        assert_eq!(back.regs.rip, 0x10_1234);
        assert_eq!(back.msrs[0].data, 0x0007_0406_0007_0406);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = sample().encode();
        for n in 0..bytes.len() {
            assert!(
                VcpuState::decode(&bytes[..n]).is_err(),
                "{n} bytes accepted"
            );
        }
    }

    #[test]
    fn bad_versions_lengths_counts_and_trailers_are_refused() {
        let bytes = sample().encode();
        let mut v = bytes.clone();
        v[0] = 9;
        assert_eq!(
            VcpuState::decode(&v).expect_err("refused"),
            StateError::Version { found: 9 }
        );
        let mut l = bytes.clone();
        l[12] ^= 1; // kvm_regs's length
        assert!(matches!(
            VcpuState::decode(&l),
            Err(StateError::Length {
                what: "kvm_regs",
                ..
            })
        ));
        let mut t = bytes.clone();
        t.push(0);
        assert_eq!(
            VcpuState::decode(&t).expect_err("refused"),
            StateError::Trailing(1)
        );
        let count_at = bytes.len() - std::mem::size_of::<kvm_msr_entry>() - 4;
        let mut c = bytes;
        c[count_at..count_at + 4].copy_from_slice(&1000u32.to_le_bytes());
        assert_eq!(
            VcpuState::decode(&c).expect_err("refused"),
            StateError::TooManyMsrs(1000)
        );
    }
}
