//! The determinism checker (`ftvm check-guest`): disassembles a guest image's executable
//! segments and reports every instruction whose result our hosts cannot make the same on the
//! primary and the backup, or that leaves the guest ABI.
//!
//! The hosts have no PMU, so a non-deterministic input can only be given to the guest at a VM
//! exit (`GUEST-ABI.md`, "What a guest must not do"); an instruction that reads host state
//! without an exit (`rdtsc`, `rdrand`, `cpuid` here, ...) gives the backup another value than
//! the primary, and nothing in the log can correct it. The rules:
//!
//! | instructions | why |
//! |---|---|
//! | `rdtsc`, `rdtscp`, `rdpid` | the host's time-stamp counter / TSC_AUX |
//! | `rdrand`, `rdseed` | hardware random numbers |
//! | `cpuid` | the host CPU's identity, which KVM here cannot control |
//! | `rdpmc`, `rdmsr`, `wrmsr` (and the MSR-list forms), `xgetbv` | host-dependent state |
//! | `in`, `ins`, `outs`, `out imm8`, `out dx, ax/eax` | no device behind them: the one device is `out dx, al` to port 0x500 |
//! | `xbegin`, `xabort` | transactional aborts (interrupts, cache conflicts) are not reproducible |
//! | `vmcall`, `vmmcall`, `vmgexit`, `tdcall` | the host's hypervisor, outside the ABI |
//! | `syscall`, `sysenter` | jump through MSRs the ABI does not set (host-dependent) |
//! | `monitor`/`mwait` and their `x`/`u` forms, `tpause` | when they wake depends on host timing |
//! | `sti`, unless the image also loads an IDT (`lidt`) | a guest enables interrupts only after installing an IDT; ftvm injects interrupts only at exits |
//!
//! The sweep is linear over each executable segment's bytes from the file (bss is zeros):
//! exact for code without data between instructions, as the linker lays out ours. It sees
//! instructions, not values: `out dx, al` to a port other than 0x500 is not found (it stops the
//! VM at run time), nor is a `popf`/`iretq` that sets IF.

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

use crate::vm::VmError;

/// One instruction the hosts cannot make deterministic.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// Its guest address.
    pub addr: u64,
    /// Its mnemonic (with the operand form where that decides, as in `out imm8`).
    pub mnemonic: &'static str,
    /// Why it is refused, in one line.
    pub reason: &'static str,
}

/// What the checker found in an image.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    /// The findings, by address.
    pub findings: Vec<Finding>,
    /// Instructions decoded (each undecodable byte counted as one).
    pub instructions: u64,
    /// Bytes of executable code swept.
    pub code_bytes: u64,
    /// Bytes at which no instruction starts (data among the code, or garbage); the sweep goes
    /// on at the next byte.
    pub undecodable: u64,
    /// The image loads an IDT (`lidt`), so its `sti` instructions are allowed.
    pub loads_idt: bool,
    /// `sti` instructions allowed because of that.
    pub sti_allowed: u64,
}

impl Report {
    /// No findings: the image may run under ftvm.
    pub fn passes(&self) -> bool {
        self.findings.is_empty()
    }

    /// The findings as lines, `0x1000a3  rdtsc  reads the host's time-stamp counter, …`.
    pub fn lines(&self) -> Vec<String> {
        self.findings
            .iter()
            .map(|f| format!("{:#x}  {}  {}", f.addr, f.mnemonic, f.reason))
            .collect()
    }
}

const DEVICE: &str = "no device answers there: the one device is `out dx, al` to port 0x500";
const HOST_TSC: &str =
    "reads the host's time-stamp counter, which differs between primary and backup";
const MSR: &str = "accesses a model-specific register: host-dependent state";
const HYPERVISOR: &str =
    "calls the host's hypervisor, outside ftvm's ABI: its effect is host-dependent";
const WAIT: &str =
    "waits for a memory write, an interrupt or a deadline: when it wakes depends on host timing";
const STI: &str = "enables hardware interrupts, but the image loads no IDT (`lidt`): ftvm \
                   injects interrupts only at exits, into a guest that installed an IDT";

/// The rule `ins` breaks, if any: its printed mnemonic and the reason.
fn rule(ins: &Instruction) -> Option<(&'static str, &'static str)> {
    use Mnemonic as M;
    Some(match ins.mnemonic() {
        M::Rdtsc => ("rdtsc", HOST_TSC),
        M::Rdtscp => (
            "rdtscp",
            "reads the host's time-stamp counter and TSC_AUX, which differ between primary and \
             backup",
        ),
        M::Rdpid => (
            "rdpid",
            "reads the host's TSC_AUX (its processor id), which differs between hosts",
        ),
        M::Rdrand => (
            "rdrand",
            "returns hardware random numbers: the backup would draw others",
        ),
        M::Rdseed => (
            "rdseed",
            "returns hardware random seeds: the backup would draw others",
        ),
        M::Cpuid => (
            "cpuid",
            "returns the host CPU's identity, which KVM here cannot control: it may differ \
             between the primary's and the backup's hosts",
        ),
        M::Rdpmc => (
            "rdpmc",
            "reads a performance counter: host-dependent (and these hosts have no PMU)",
        ),
        M::Rdmsr => ("rdmsr", MSR),
        M::Wrmsr => ("wrmsr", MSR),
        M::Rdmsrlist => ("rdmsrlist", MSR),
        M::Wrmsrlist => ("wrmsrlist", MSR),
        M::Wrmsrns => ("wrmsrns", MSR),
        M::Xgetbv => (
            "xgetbv",
            "reads the extended-state features the host enabled (XCR0), which may differ \
             between hosts",
        ),
        M::In => ("in", DEVICE),
        M::Insb | M::Insw | M::Insd => ("ins", DEVICE),
        M::Outsb | M::Outsw | M::Outsd => ("outs", DEVICE),
        M::Out if ins.op0_kind() == OpKind::Immediate8 => ("out imm8", DEVICE),
        M::Out if ins.op1_kind() == OpKind::Register && ins.op1_register() == Register::AX => (
            "out dx, ax",
            "a 2-byte write is no hypercall (`out dx, al` to port 0x500), and no other device \
             exists",
        ),
        M::Out if ins.op1_kind() == OpKind::Register && ins.op1_register() == Register::EAX => (
            "out dx, eax",
            "a 4-byte write is no hypercall (`out dx, al` to port 0x500), and no other device \
             exists",
        ),
        M::Xbegin => (
            "xbegin",
            "starts a hardware transaction, whose aborts (interrupts, cache conflicts) are not \
             reproducible",
        ),
        M::Xabort => (
            "xabort",
            "belongs to a hardware transaction, whose aborts are not reproducible",
        ),
        M::Vmcall => ("vmcall", HYPERVISOR),
        M::Vmmcall => ("vmmcall", HYPERVISOR),
        M::Vmgexit => ("vmgexit", HYPERVISOR),
        M::Tdcall => ("tdcall", HYPERVISOR),
        M::Syscall => (
            "syscall",
            "jumps through the LSTAR/STAR MSRs, which the ABI does not set: host-dependent",
        ),
        M::Sysenter => (
            "sysenter",
            "jumps through the SYSENTER MSRs, which the ABI does not set: host-dependent",
        ),
        M::Monitor => ("monitor", WAIT),
        M::Mwait => ("mwait", WAIT),
        M::Monitorx => ("monitorx", WAIT),
        M::Mwaitx => ("mwaitx", WAIT),
        M::Umonitor => ("umonitor", WAIT),
        M::Umwait => ("umwait", WAIT),
        M::Tpause => ("tpause", WAIT),
        M::Sti => ("sti", STI),
        _ => return None,
    })
}

/// A sweep over one or more code regions.
#[derive(Debug, Default)]
struct Sweep {
    report: Report,
    sti: Vec<Finding>,
}

impl Sweep {
    fn code(&mut self, ip: u64, code: &[u8]) {
        self.report.code_bytes += code.len() as u64;
        let Ok(mut decoder) = Decoder::try_with_ip(64, code, ip, DecoderOptions::NONE) else {
            // Only a bitness other than 16, 32 or 64 fails.
            self.report.undecodable += 1;
            return;
        };
        let mut ins = Instruction::default();
        while decoder.can_decode() {
            let at = decoder.position();
            decoder.decode_out(&mut ins);
            self.report.instructions += 1;
            if ins.is_invalid() {
                // The decoder may take several bytes as one invalid instruction (`06 0f` in
                // `06 0f 31`); go on at the next byte instead, so that nothing behind a bad
                // byte is skipped.
                self.report.undecodable += 1;
                if decoder.set_position(at + 1).is_err() {
                    break;
                }
                decoder.set_ip(ip.wrapping_add(at as u64 + 1));
                continue;
            }
            if ins.mnemonic() == Mnemonic::Lidt {
                self.report.loads_idt = true;
            }
            if let Some((mnemonic, reason)) = rule(&ins) {
                let f = Finding {
                    addr: ins.ip(),
                    mnemonic,
                    reason,
                };
                if ins.mnemonic() == Mnemonic::Sti {
                    self.sti.push(f);
                } else {
                    self.report.findings.push(f);
                }
            }
        }
    }

    fn finish(mut self) -> Report {
        if self.report.loads_idt {
            self.report.sti_allowed = self.sti.len() as u64;
        } else {
            self.report.findings.append(&mut self.sti);
        }
        self.report.findings.sort_by_key(|f| f.addr);
        self.report
    }
}

/// Checks one region of 64-bit code at guest address `ip` (as if it were a whole image's only
/// executable segment).
pub fn check_code(ip: u64, code: &[u8]) -> Report {
    let mut s = Sweep::default();
    s.code(ip, code);
    s.finish()
}

/// Checks an image: [`super::parse`] (a malformed image is its error), then every executable
/// segment's bytes from the file.
pub fn check_image(image: &[u8]) -> Result<Report, VmError> {
    let elf = super::parse(image)?;
    let mut s = Sweep::default();
    for seg in elf.segments.iter().filter(|seg| seg.executable) {
        s.code(seg.addr, seg.data);
    }
    Ok(s.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fuzz::ElfBuilder;
    use crate::vm::{GUEST_IMAGE, GUEST_NONDET_IMAGE};

    const NOP: u8 = 0x90;

    /// The findings' (offset from 0x100000, mnemonic) pairs.
    fn found(code: &[u8]) -> Vec<(u64, &'static str)> {
        check_code(0x100000, code)
            .findings
            .iter()
            .map(|f| (f.addr - 0x100000, f.mnemonic))
            .collect()
    }

    #[test]
    fn each_rule_finds_its_instruction() {
        for (bytes, mnemonic) in [
            (&[0x0f, 0x31][..], "rdtsc"),
            (&[0x0f, 0x01, 0xf9], "rdtscp"),
            (&[0xf3, 0x0f, 0xc7, 0xf8], "rdpid"),
            (&[0x0f, 0xc7, 0xf0], "rdrand"),
            (&[0x48, 0x0f, 0xc7, 0xf8], "rdseed"),
            (&[0x0f, 0xa2], "cpuid"),
            (&[0x0f, 0x33], "rdpmc"),
            (&[0x0f, 0x32], "rdmsr"),
            (&[0x0f, 0x30], "wrmsr"),
            (&[0x0f, 0x01, 0xd0], "xgetbv"),
            (&[0xec], "in"),
            (&[0xe4, 0x60], "in"),
            (&[0x6c], "ins"),
            (&[0xf3, 0x6e], "outs"),
            (&[0xe6, 0x80], "out imm8"),
            (&[0x66, 0xef], "out dx, ax"),
            (&[0xef], "out dx, eax"),
            (&[0xc7, 0xf8, 0, 0, 0, 0], "xbegin"),
            (&[0xc6, 0xf8, 0x01], "xabort"),
            (&[0x0f, 0x01, 0xc1], "vmcall"),
            (&[0x0f, 0x01, 0xd9], "vmmcall"),
            (&[0x0f, 0x05], "syscall"),
            (&[0x0f, 0x34], "sysenter"),
            (&[0x0f, 0x01, 0xc8], "monitor"),
            (&[0x0f, 0x01, 0xc9], "mwait"),
            (&[0xfb], "sti"),
        ] {
            let mut code = vec![NOP, NOP];
            code.extend_from_slice(bytes);
            code.push(NOP);
            assert_eq!(found(&code), vec![(2, mnemonic)], "{bytes:02x?}");
            let report = check_code(0x100000, &code);
            assert!(!report.passes());
            assert_eq!(report.instructions, 4);
            let line = &report.lines()[0];
            assert!(
                line.starts_with(&format!("0x100002  {mnemonic}  ")) && line.len() > 30,
                "{line}"
            );
        }
    }

    #[test]
    fn the_hypercall_and_ordinary_code_pass() {
        // mov dx, 0x500; mov al, 1; out dx, al; hlt; ret; int3; ud2
        let code = [
            0x66, 0xba, 0x00, 0x05, 0xb0, 0x01, 0xee, 0xf4, 0xc3, 0xcc, 0x0f, 0x0b,
        ];
        let r = check_code(0x100000, &code);
        assert!(r.passes(), "{:?}", r.findings);
        assert_eq!(r.instructions, 7);
        assert_eq!(r.code_bytes, code.len() as u64);
        assert_eq!(r.undecodable, 0);
    }

    #[test]
    fn sti_is_allowed_only_in_an_image_that_loads_an_idt() {
        // sti; nop
        assert_eq!(found(&[0xfb, NOP]), vec![(0, "sti")]);
        // lidt [rax]; sti — in one region, or the lidt in another executable segment.
        let r = check_code(0x100000, &[0x0f, 0x01, 0x18, 0xfb]);
        assert!(r.passes() && r.loads_idt && r.sti_allowed == 1, "{r:?}");
        let image = ElfBuilder::new(0x100000)
            .code(0x100000, vec![0xfb, 0xf4])
            .code(0x102000, vec![0x0f, 0x01, 0x18, 0xc3])
            .build();
        let r = check_image(&image).expect("image");
        assert!(r.passes() && r.loads_idt, "{r:?}");
        // The same code without the lidt: the sti is found, with the other findings, in order.
        let image = ElfBuilder::new(0x100000)
            .code(0x100000, vec![0xfb, 0x0f, 0xa2])
            .code(0x102000, vec![0x0f, 0x31, 0xc3])
            .build();
        let r = check_image(&image).expect("image");
        let got: Vec<_> = r.findings.iter().map(|f| (f.addr, f.mnemonic)).collect();
        assert_eq!(
            got,
            [(0x100000, "sti"), (0x100001, "cpuid"), (0x102000, "rdtsc")]
        );
    }

    #[test]
    fn only_executable_segments_are_swept() {
        // rdtsc bytes in a data segment are data.
        let image = ElfBuilder::new(0x100000)
            .code(0x100000, vec![0xc3])
            .data(0x101000, vec![0x0f, 0x31, 0x0f, 0xa2])
            .build();
        let r = check_image(&image).expect("image");
        assert!(r.passes(), "{r:?}");
        assert_eq!(r.code_bytes, 1);
    }

    #[test]
    fn undecodable_bytes_are_counted_not_fatal() {
        // 0x06 (push es) does not exist in 64-bit mode (the decoder takes `06 0f` as one bad
        // instruction); the rdtsc right after it is still found.
        let r = check_code(0x100000, &[0x06, 0x0f, 0x31]);
        assert_eq!(r.undecodable, 1);
        assert_eq!(r.findings.len(), 1);
        assert_eq!(r.findings[0].addr, 0x100001);
    }

    #[test]
    fn the_nondet_guest_is_caught_at_its_rdtsc_and_kvstore_passes() {
        let r = check_image(GUEST_IMAGE).expect("kvstore image");
        assert!(r.passes(), "kvstore: {:?}", r.lines());
        assert!(r.instructions > 500 && r.undecodable == 0, "{r:?}");
        let r = check_image(GUEST_NONDET_IMAGE).expect("nondet image");
        let found: Vec<_> = r.findings.iter().map(|f| f.mnemonic).collect();
        assert_eq!(found, ["rdtsc"], "{:?}", r.lines());
        // The finding points at the instruction's bytes.
        let elf = crate::image::parse(GUEST_NONDET_IMAGE).expect("parse");
        let at = r.findings[0].addr;
        let seg = elf
            .segments
            .iter()
            .find(|s| (s.addr..s.data_end()).contains(&at))
            .expect("in a segment");
        let off = (at - seg.addr) as usize;
        assert_eq!(&seg.data[off..off + 2], &[0x0f, 0x31]);
    }

    #[test]
    fn a_malformed_image_is_an_error_not_a_report() {
        assert!(matches!(
            check_image(b"\x7fELF\x02"),
            Err(VmError::Image(crate::image::ImageFault::Truncated { .. }))
        ));
    }
}
