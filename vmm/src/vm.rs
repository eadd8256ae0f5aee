//! The KVM virtual machine: one vCPU in 64-bit long mode, ring 0, identity-mapped RAM, running
//! the guest program under the ABI of [`crate::layout`] (prose in `vmm/GUEST-ABI.md`).
//!
//! Everything guest-visible is set explicitly and deterministically at creation: RAM starts
//! zeroed and holds only the page tables, the GDT and the image; every general-purpose register
//! is zero except RIP, RSP and RFLAGS; control registers, segments and the FPU/SSE control words
//! are fixed values. Two [`Vm`]s built from the same image are therefore identical, and stay
//! identical as long as they are given identical inputs at identical exits.
//!
//! On the development host (KVM provided by PVM) every ring-0 guest instruction is executed by
//! KVM's instruction emulator: ~0.6 µs per register instruction, ~1 µs per memory access, ~7 µs
//! per hypercall exit, and instructions the emulator lacks (SSE arithmetic such as `xorps`) end in
//! [`VmExit::Other`] ("KVM internal error (suberror 1 …)"). The guest is therefore built without
//! SSE; SSE is still enabled in CR0/CR4 so that guests built with it work on VMX/SVM hosts.
//!
//! The guest image is a static ELF executable, checked and loaded by [`crate::image`] before any
//! KVM object exists.

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_userspace_memory_region, Msrs,
    KVM_API_VERSION, KVM_EXIT_INTERNAL_ERROR, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use xxhash_rust::xxh3::Xxh3;

use crate::layout::{
    CODE_SELECTOR, DATA_SELECTOR, GDT_ADDR, GDT_ENTRIES, HYPERCALL_PORT, INITIAL_RSP, MAX_MEM_SIZE,
    MEM_SIZE_ALIGN, MIN_MEM_SIZE, PDPT_ADDR, PD_ADDR, PML4_ADDR, TSS_ADDR, TSS_SELECTOR,
};
use crate::migrate::state::{VcpuState, SAVED_MSRS};

/// The deterministic key-value guest program (static ELF), built from `guests/kvstore` by build.rs.
pub const GUEST_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.elf"));

/// The same program built with the `nondet` feature: it mixes `rdtsc` into every response token,
/// so a primary and a backup running it diverge. For divergence-detection tests only.
pub const GUEST_NONDET_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-nondet.elf"));

/// The ledger (static ELF), the second example guest on the guest SDK, built from `guests/ledger`
/// by build.rs. Its wire format: [`crate::ledger`].
pub const GUEST_LEDGER_IMAGE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest-ledger.elf"));

/// The key-value program on the SDK's paravirtual interrupt scheme (the `polling` feature: no
/// IDT, NET_RX polled while idle), as every guest ran before interrupts were injected. For
/// comparison (`bench idle`).
pub const GUEST_POLLING_IMAGE: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/guest-polling.elf"));

const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always 1; IF = 0 (the guest never takes hardware interrupts).
const RFLAGS_INIT: u64 = 0x2;
/// CR0: protected mode, paging, native FPU errors, write-protect; EM clear so SSE works.
const CR0_INIT: u64 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
/// CR4: PAE (required by long mode), FXSAVE/SSE enabled with unmasked SIMD exceptions reported.
const CR4_INIT: u64 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
const EFER_INIT: u64 = EFER_LME | EFER_LMA;
/// x87 control word and MXCSR reset values.
const FCW_INIT: u16 = 0x37f;
const MXCSR_INIT: u32 = 0x1f80;

const INTERNAL_ERROR: &str = "KVM internal error";

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_HUGE: u64 = 1 << 7;
const TSS_LIMIT: u32 = 0x67;

/// Errors of the KVM layer.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available?)")]
    KvmOpen(kvm_ioctls::Error),
    /// The kernel speaks another KVM API version.
    #[error("KVM API version {0} unsupported (need {KVM_API_VERSION})")]
    KvmApiVersion(i32),
    /// A KVM ioctl failed.
    #[error("{op} failed: {err}")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// The OS error.
        err: kvm_ioctls::Error,
    },
    /// The requested guest memory size is out of range or misaligned.
    #[error(
        "bad guest memory size {0:#x} (need a multiple of {MEM_SIZE_ALIGN:#x} in {MIN_MEM_SIZE:#x}..={MAX_MEM_SIZE:#x})"
    )]
    MemSize(usize),
    /// Guest memory could not be mapped.
    #[error("cannot allocate guest memory: {0}")]
    MemAlloc(String),
    /// The guest image is not a loadable ELF for this ABI: what is wrong, and where.
    #[error("bad guest image: {0}")]
    Image(crate::image::ImageFault),
    /// The vCPU's state could not be taken or restored as a whole.
    #[error("vCPU state: {0}")]
    VcpuState(String),
    /// A guest memory access fell outside guest RAM.
    #[error("guest memory access out of range: {len} bytes at {gpa:#x}")]
    OutOfRange {
        /// Guest physical address.
        gpa: u64,
        /// Length of the access.
        len: usize,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |err| VmError::Kvm { op, err }
}

/// Why [`Vm::run`] returned: a guest-visible exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// `out dx, al` on [`HYPERCALL_PORT`](crate::layout::HYPERCALL_PORT) with `al = op`. The
    /// guest resumes after the `out` on the next [`Vm::run`].
    Hypercall {
        /// The operation (`OP_*` in [`crate::layout`]).
        op: u8,
    },
    /// The guest executed `hlt` (with interrupts disabled it will never wake up).
    Halt,
    /// Triple fault (e.g. any exception: the guest has no IDT).
    Shutdown,
    /// Anything else: I/O on another port, MMIO outside RAM, a failed entry, ... Reads from
    /// other ports or MMIO return all-ones bytes if the guest is resumed anyway.
    Other(String),
}

/// One KVM virtual machine with one vCPU and its guest memory.
///
/// Not `Sync`: guest memory is only ever touched from the thread that owns the `Vm` (the vCPU
/// runs inside [`Vm::run`], which takes `&mut self`), which is what lets [`Vm::memory_hash`] read
/// guest memory as a plain byte slice.
pub struct Vm {
    // Field order is drop order: the vCPU and VM file descriptors go before the memory they map.
    vcpu: VcpuFd,
    /// Shared with a [`DirtyLog`], which may outlive nothing it needs: it holds the memory too.
    vm_fd: Arc<VmFd>,
    _kvm: Kvm,
    mem: GuestMemoryMmap,
    /// Pages the VMM itself wrote while a dirty log is on (KVM logs only the guest's writes).
    host_dirty: Arc<HostDirty>,
    mem_size: usize,
    entry: u64,
    exits: u64,
    _not_sync: PhantomData<Cell<()>>,
}

impl fmt::Debug for Vm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vm")
            .field("mem_size", &self.mem_size)
            .field("entry", &format_args!("{:#x}", self.entry))
            .field("exits", &self.exits)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates a VM with `mem_size` bytes of zeroed RAM at guest physical 0, loads the static
    /// ELF `image` (e.g. [`GUEST_IMAGE`]) and sets up the vCPU in long mode at the image's entry
    /// point, ready for [`Vm::run`].
    pub fn new(mem_size: usize, image: &[u8]) -> Result<Vm, VmError> {
        if !(MIN_MEM_SIZE..=MAX_MEM_SIZE).contains(&mem_size)
            || !mem_size.is_multiple_of(MEM_SIZE_ALIGN)
        {
            return Err(VmError::MemSize(mem_size));
        }
        // Anonymous private mapping: every byte starts zero, independent of the host. Filled
        // before any KVM object exists, so a bad image is reported even without KVM.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mem_size)])
            .map_err(|e| VmError::MemAlloc(e.to_string()))?;
        let entry = crate::image::load(&mem, mem_size, image)?.addr;
        write_page_tables(&mem)?;
        write_gdt(&mem)?;
        // The guest's RAM size, in the mailbox (the same on every replica of this size).
        write_mem(
            &mem,
            crate::layout::MAILBOX_ADDR + crate::layout::MB_MEM_SIZE,
            &(mem_size as u64).to_le_bytes(),
        )?;

        let kvm = Kvm::new().map_err(VmError::KvmOpen)?;
        let api = kvm.get_api_version();
        if api != KVM_API_VERSION as i32 {
            return Err(VmError::KvmApiVersion(api));
        }
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let host_addr = mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmError::MemAlloc(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_size as u64,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: `host_addr` is the start of a live mapping of `mem_size` bytes owned by `mem`.
        // `mem` outlives the VM and vCPU fds: on the error paths below they are locals declared
        // after it (dropped first), and in the returned `Vm` they are fields declared before it.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;

        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        // The guest never executes CPUID (and on PVM hosts its result can't be controlled), but
        // KVM checks some register settings against the vCPU's CPUID, so give it the host's.
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        setup_sregs(&vcpu)?;
        let fpu = kvm_fpu {
            fcw: FCW_INIT,
            mxcsr: MXCSR_INIT,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        // All general-purpose registers zero (KVM's reset value of RDX is host-dependent).
        let regs = kvm_regs {
            rip: entry,
            rsp: INITIAL_RSP,
            rflags: RFLAGS_INIT,
            ..Default::default()
        };
        vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;

        Ok(Vm {
            vcpu,
            vm_fd: Arc::new(vm),
            _kvm: kvm,
            host_dirty: Arc::new(HostDirty::new(mem_size)),
            mem,
            mem_size,
            entry,
            exits: 0,
            _not_sync: PhantomData,
        })
    }

    /// Runs the vCPU until the next guest-visible exit. `EINTR`/`EAGAIN` from `KVM_RUN` (a
    /// signal, an immediate exit) are retried transparently and are not exits.
    pub fn run(&mut self) -> Result<VmExit, VmError> {
        self.run_to_exit(false, &mut || {}).map(|(exit, _)| exit)
    }

    /// Like [`Vm::run`], calling `on_signal` each time a signal ended `KVM_RUN` early (e.g. a
    /// primary's kick, [`transport::kick`]) before the guest runs on: the guest sees nothing of
    /// it, and it is not an exit.
    pub fn run_with(&mut self, on_signal: &mut dyn FnMut()) -> Result<VmExit, VmError> {
        self.run_to_exit(false, on_signal).map(|(exit, _)| exit)
    }

    /// Like [`Vm::run`], one guest instruction at a time (KVM single-step): returns the exit and
    /// the number of guest instructions executed before it, the exiting one excluded. Measures
    /// what guest code costs (the guest's state is the same as after [`Vm::run`]); slow, ~8 µs
    /// per instruction on the development hosts.
    pub fn run_counting_instructions(&mut self) -> Result<(VmExit, u64), VmError> {
        let debug = |control| kvm_bindings::kvm_guest_debug {
            control,
            ..Default::default()
        };
        self.vcpu
            .set_guest_debug(&debug(
                kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP,
            ))
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
        let result = self.run_to_exit(true, &mut || {});
        self.vcpu
            .set_guest_debug(&debug(0))
            .map_err(kvm_err("KVM_SET_GUEST_DEBUG"))?;
        result
    }

    /// The run loop of [`Vm::run`]; with `stepping`, KVM's single-step exits are counted (the
    /// count is returned with the exit) instead of returned.
    #[inline(always)]
    fn run_to_exit(
        &mut self,
        stepping: bool,
        on_signal: &mut dyn FnMut(),
    ) -> Result<(VmExit, u64), VmError> {
        let mut steps = 0;
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::Debug(_)) if stepping => steps += 1,
                Ok(exit) => {
                    self.exits += 1;
                    if matches!(exit, VcpuExit::InternalError) {
                        return Ok((VmExit::Other(self.internal_error_details()), steps));
                    }
                    return Ok((classify(exit), steps));
                }
                Err(e) if e.errno() == libc::EINTR => on_signal(),
                Err(e) if e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return Err(VmError::Kvm {
                        op: "KVM_RUN",
                        err: e,
                    })
                }
            }
        }
    }

    /// The message a guest that panicked left at [`crate::layout::PANIC_MSG_ADDR`], when it
    /// halted with [`crate::layout::HALT_PANIC`] in `op_result` (the guest SDK's panic handler
    /// does both); `None` otherwise.
    pub fn panic_message(&self) -> Result<Option<String>, VmError> {
        use crate::layout::{HALT_PANIC, OP_RESULT_ADDR, PANIC_MSG_ADDR, PANIC_MSG_MAX};
        if self.read_u64(OP_RESULT_ADDR)? != HALT_PANIC {
            return Ok(None);
        }
        let len = (self.read_u32(PANIC_MSG_ADDR)? as usize).min(PANIC_MSG_MAX);
        let mut msg = vec![0; len];
        self.read_bytes(PANIC_MSG_ADDR + 4, &mut msg)?;
        Ok(Some(String::from_utf8_lossy(&msg).into_owned()))
    }

    /// Whether the guest can take an injected interrupt at this exit: its RFLAGS.IF is set and
    /// KVM reports it ready for injection (no interrupt shadow, nothing queued). Both follow from
    /// the guest's own state, so a primary and a backup at the same exit agree.
    pub fn interrupt_ready(&mut self) -> bool {
        let run = self.vcpu.get_kvm_run();
        run.if_flag != 0 && run.ready_for_interrupt_injection != 0
    }

    /// Queues external interrupt `vector` (`KVM_INTERRUPT`; the VM has no in-kernel interrupt
    /// controller): the guest takes it through its IDT before its next instruction, when
    /// [`Vm::run`] resumes it. Only when [`Vm::interrupt_ready`] holds.
    pub fn inject_interrupt(&mut self, vector: u8) -> Result<(), VmError> {
        use std::os::fd::AsRawFd;
        let irq = kvm_bindings::kvm_interrupt {
            irq: u32::from(vector),
        };
        // SAFETY: KVM_INTERRUPT reads one `struct kvm_interrupt` (4 bytes) from the pointer,
        // which points at a live, initialised local; the fd is this VM's vCPU, owned by `self`.
        let ret = unsafe { libc::ioctl(self.vcpu.as_raw_fd(), KVM_INTERRUPT, &irq) };
        if ret < 0 {
            return Err(VmError::Kvm {
                op: "KVM_INTERRUPT",
                err: kvm_ioctls::Error::last(),
            });
        }
        Ok(())
    }

    /// Number of exits [`Vm::run`] has returned so far (the position at which the record/replay
    /// layer keys its events): the first exit is number 1.
    pub fn exit_count(&self) -> u64 {
        self.exits
    }

    /// The guest's entry point (from the image's ELF header).
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// Copies guest memory at `gpa` into `buf`; fails if any byte is outside RAM.
    pub fn read_bytes(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| VmError::OutOfRange {
                gpa,
                len: buf.len(),
            })
    }

    /// Copies `data` into guest memory at `gpa`; fails (writing nothing) if any byte is outside
    /// RAM.
    pub fn write_bytes(&self, gpa: u64, data: &[u8]) -> Result<(), VmError> {
        self.check_range(gpa, data.len())?;
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|_| VmError::OutOfRange {
                gpa,
                len: data.len(),
            })?;
        self.host_dirty.mark(gpa, data.len());
        Ok(())
    }

    /// Lends guest memory `gpa..gpa + len` to `f` as bytes, to be written in place (a joiner
    /// receives a state stream's pages straight into guest memory, without a copy through a
    /// buffer); fails, calling nothing, if any byte is outside RAM. Only between runs
    /// (`&mut self`: the vCPU is not in `KVM_RUN`).
    pub fn with_bytes_mut<T>(
        &mut self,
        gpa: u64,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> T,
    ) -> Result<T, VmError> {
        self.check_range(gpa, len)?;
        if len == 0 {
            return Ok(f(&mut []));
        }
        let host = self
            .mem
            .get_host_address(GuestAddress(gpa))
            .map_err(|_| VmError::OutOfRange { gpa, len })?;
        // SAFETY: `host..host + len` lies inside the VM's one private anonymous mapping
        // (checked against `mem_size` above; RAM is a single region from guest physical 0),
        // which lives as long as `self`. No other reference to it exists while `f` runs: the
        // vCPU is not running (`&mut self`), vm-memory and the dirty log's handles only copy
        // through raw volatile accesses, and the slice does not outlive `f`.
        let bytes = unsafe { std::slice::from_raw_parts_mut(host, len) };
        let out = f(bytes);
        self.host_dirty.mark(gpa, len);
        Ok(out)
    }

    /// Makes the `count` pages from page `first` zero without touching them: their host
    /// pages are dropped (`MADV_DONTNEED` on a private anonymous mapping reads back as zeros),
    /// so a page that was never written costs nothing and a written one is freed. Fails
    /// (changing nothing) if any page is outside RAM. Only between runs (`&mut self`: the vCPU
    /// is not in `KVM_RUN`; KVM drops its own mappings of the range through its MMU notifier).
    pub fn zero_pages(&mut self, first: u64, count: u64) -> Result<(), VmError> {
        let (gpa, len) = match (
            first.checked_mul(PAGE_SIZE as u64),
            count.checked_mul(PAGE_SIZE as u64),
        ) {
            (Some(g), Some(l)) => (g, l),
            _ => {
                return Err(VmError::OutOfRange {
                    gpa: u64::MAX,
                    len: usize::MAX,
                })
            }
        };
        let len_usize = usize::try_from(len).map_err(|_| VmError::OutOfRange {
            gpa,
            len: usize::MAX,
        })?;
        self.check_range(gpa, len_usize)?;
        if len_usize == 0 {
            return Ok(());
        }
        let host =
            self.mem
                .get_host_address(GuestAddress(gpa))
                .map_err(|_| VmError::OutOfRange {
                    gpa,
                    len: len_usize,
                })?;
        // SAFETY: `host..host + len` lies inside the VM's one private anonymous mapping
        // (checked against `mem_size` above; RAM is a single region from guest physical 0), and
        // page-aligned (`gpa` is a multiple of the page size, the mapping starts on a page).
        // Dropping those pages is the point: they read back as zeros. Nothing holds a Rust
        // reference into guest memory (vm-memory accesses it through volatile slices), and the
        // vCPU is not running (`&mut self`).
        let rc = unsafe { libc::madvise(host.cast(), len_usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            // Not expected on an anonymous mapping; write the zeros instead.
            let zero = [0u8; PAGE_SIZE];
            for p in 0..count {
                self.write_bytes(gpa + p * PAGE_SIZE as u64, &zero)?;
            }
            return Ok(());
        }
        self.host_dirty.mark(gpa, len_usize);
        Ok(())
    }

    /// Faults in all of guest RAM, writable, keeping its contents (`MADV_POPULATE_WRITE`):
    /// a backup that is about to take a running guest's state does it before it connects, so
    /// the transfer copies into memory that is there rather than allocating it page by page
    /// while the primary waits (on nested hosts first-touching memory dominates a transfer).
    /// Best effort: an error (an older kernel) leaves memory as it was.
    pub fn prefault(&self) -> std::io::Result<()> {
        for region in self.mem.iter() {
            let ptr = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            // SAFETY: `ptr..ptr + len` is the region's own live mapping; populating it only
            // allocates its pages, contents unchanged.
            let rc =
                unsafe { libc::madvise(ptr.cast(), region.len() as usize, MADV_POPULATE_WRITE) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Reads a little-endian `u32` at `gpa`.
    pub fn read_u32(&self, gpa: u64) -> Result<u32, VmError> {
        let mut b = [0; 4];
        self.read_bytes(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64` at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, VmError> {
        let mut b = [0; 8];
        self.read_bytes(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Writes a little-endian `u32` at `gpa`.
    pub fn write_u32(&self, gpa: u64, v: u32) -> Result<(), VmError> {
        self.write_bytes(gpa, &v.to_le_bytes())
    }

    /// Writes a little-endian `u64` at `gpa`.
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), VmError> {
        self.write_bytes(gpa, &v.to_le_bytes())
    }

    /// xxh3-64 over all of guest memory, from address 0 up, in order.
    pub fn memory_hash(&self) -> u64 {
        let mut h = Xxh3::new();
        for region in self.mem.iter() {
            let len = region.len() as usize;
            let Ok(ptr) = region.get_host_address(MemoryRegionAddress(0)) else {
                continue;
            };
            // SAFETY: `ptr..ptr + len` is the region's live mapping, owned by `self.mem` and
            // valid for `&self`'s lifetime. Nothing writes it while the slice exists: the vCPU
            // only runs inside `run(&mut self)`, the guest enables no asynchronous paravirtual
            // feature that would let KVM write outside KVM_RUN, `Vm` is not `Sync` so no other
            // thread can hold a `&Vm`, and this thread is busy here.
            let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
            h.update(bytes);
        }
        h.digest()
    }

    /// xxh3-64 over the general-purpose registers, RIP, RFLAGS, CR0, CR3, CR4 and EFER — for
    /// comparing a primary and a backup at the same exit.
    pub fn registers_digest(&self) -> Result<u64, VmError> {
        let r = self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let s = self.vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let words = [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags, s.cr0, s.cr3, s.cr4, s.efer,
        ];
        let mut bytes = [0u8; 22 * 8];
        for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
            chunk.copy_from_slice(&w.to_le_bytes());
        }
        Ok(xxhash_rust::xxh3::xxh3_64(&bytes))
    }

    /// The vCPU's general-purpose registers (for diagnostics).
    pub fn regs(&self) -> Result<kvm_regs, VmError> {
        self.vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))
    }

    /// Guest RAM size in bytes.
    pub fn mem_size(&self) -> usize {
        self.mem_size
    }

    /// The vCPU's state, taken at an exit boundary (after the exit was handled): KVM first
    /// completes the exit's pending I/O (a `KVM_RUN` with `immediate_exit` set finishes the
    /// `out` and returns before the guest runs another instruction), so RIP is past the
    /// hypercall and the state is what a fresh vCPU needs to go on from here.
    pub fn vcpu_state(&mut self) -> Result<VcpuState, VmError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let completed = self.vcpu.run().map(|_| ());
        self.vcpu.set_kvm_immediate_exit(0);
        match completed {
            Err(e) if e.errno() == libc::EINTR => {}
            Err(e) => {
                return Err(VmError::Kvm {
                    op: "KVM_RUN (completing the exit)",
                    err: e,
                })
            }
            Ok(()) => {
                return Err(VmError::VcpuState(
                    "the vCPU ran while its exit was being completed".into(),
                ))
            }
        }
        let v = &self.vcpu;
        let mut msrs = Msrs::from_entries(&SAVED_MSRS.map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        }))
        .map_err(|e| VmError::MemAlloc(format!("MSR list: {e:?}")))?;
        let read = v.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            exits: self.exits,
            regs: v.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: v.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            xsave: v.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?,
            xcrs: v.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
            debugregs: v.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            events: v
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            mp_state: v.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            msrs: msrs.as_slice()[..read.min(SAVED_MSRS.len())].to_vec(),
        })
    }

    /// Sets the vCPU to `state` (from [`Vm::vcpu_state`] on a VM of the same image and memory
    /// size): the next [`Vm::run`] goes on where that vCPU stopped, and the exit counter too.
    pub fn set_vcpu_state(&mut self, state: &VcpuState) -> Result<(), VmError> {
        let v = &self.vcpu;
        // Special registers first (mode, paging), then the rest, as KVM's own save/restore.
        v.set_sregs(&state.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        v.set_xcrs(&state.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
        // SAFETY: `state.xsave` is a whole `kvm_xsave` (4 KiB region) as KVM_GET_XSAVE gave it;
        // KVM reads only that structure.
        unsafe { v.set_xsave(&state.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        v.set_regs(&state.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        v.set_debug_regs(&state.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        let msrs = Msrs::from_entries(&state.msrs)
            .map_err(|e| VmError::MemAlloc(format!("MSR list: {e:?}")))?;
        let written = v.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if written != state.msrs.len() {
            return Err(VmError::VcpuState(format!(
                "KVM set {written} of the {} MSRs of the transferred state",
                state.msrs.len()
            )));
        }
        v.set_vcpu_events(&state.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        v.set_mp_state(state.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        self.exits = state.exits;
        Ok(())
    }

    /// Turns on KVM's dirty-page log for guest memory and returns the handle a copier thread
    /// reads memory and dirty pages through while the vCPU runs; dropping it turns the log off.
    pub fn dirty_log(&self) -> Result<DirtyLog, VmError> {
        self.memory_handle().start_dirty_log()
    }

    /// A handle on guest memory for another thread (a join's copier), from which it can turn
    /// the dirty-page log on while the vCPU runs.
    pub fn memory_handle(&self) -> MemoryHandle {
        MemoryHandle {
            vm: self.vm_fd.clone(),
            mem: self.mem.clone(),
            host_dirty: self.host_dirty.clone(),
            mem_size: self.mem_size,
        }
    }

    /// xxh3-64 over the xxh3-64 of every 4 KiB page, in order: the digest a join compares
    /// (the primary keeps its pages' hashes as it sends them, so it need not hash all of its
    /// memory while the guest is stopped).
    pub fn pages_digest(&self) -> u64 {
        pages_digest(&self.page_hashes())
    }

    /// The xxh3-64 of every 4 KiB page of guest memory, in order.
    pub fn page_hashes(&self) -> Vec<u64> {
        let mut page = [0u8; PAGE_SIZE];
        (0..self.mem_size / PAGE_SIZE)
            .map(|p| {
                // In range by construction: `p < mem_size / PAGE_SIZE`.
                match self.read_bytes((p * PAGE_SIZE) as u64, &mut page) {
                    Ok(()) => page_hash(&page),
                    Err(_) => 0,
                }
            })
            .collect()
    }

    /// Describes a `KVM_EXIT_INTERNAL_ERROR`: suberror, the kernel's extra data words, RIP.
    fn internal_error_details(&mut self) -> String {
        let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
        let run = self.vcpu.get_kvm_run();
        if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
            return format!("{INTERNAL_ERROR} at rip {rip:#x}");
        }
        // SAFETY: the exit reason says the kernel filled the `internal` member of the union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        format!(
            "{INTERNAL_ERROR} (suberror {}, data {:#x?}) at rip {rip:#x}",
            internal.suberror,
            &internal.data[..n]
        )
    }

    fn check_range(&self, gpa: u64, len: usize) -> Result<(), VmError> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.mem_size as u64 => Ok(()),
            _ => Err(VmError::OutOfRange { gpa, len }),
        }
    }
}

/// Guest page size for dirty logging and state transfer.
pub const PAGE_SIZE: usize = 4096;

/// A page's hash: xxh3-64 of its 4096 bytes (what [`pages_digest`] digests, and what a join
/// stream's PAGES checksum covers).
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// The pages digest of a table of page hashes ([`Vm::pages_digest`]): xxh3-64 over the hashes'
/// little-endian bytes.
pub fn pages_digest(hashes: &[u64]) -> u64 {
    let mut h = Xxh3::new();
    for v in hashes {
        h.update(&v.to_le_bytes());
    }
    h.digest()
}

/// A guest's memory and VM, shared with another thread (from [`Vm::memory_handle`]).
#[derive(Clone)]
pub struct MemoryHandle {
    // Field order is drop order: the VM fd (whose slot maps the memory) before the memory.
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    host_dirty: Arc<HostDirty>,
    mem_size: usize,
}

/// The pages the VMM writes into guest memory itself (requests into the RX buffer, values into
/// the mailbox): KVM's dirty log sees only the guest's writes, so while a log is on the VMM's
/// writes are marked here and merged into it.
#[derive(Debug)]
struct HostDirty {
    active: AtomicBool,
    bits: Vec<AtomicU64>,
}

impl HostDirty {
    fn new(mem_size: usize) -> Self {
        HostDirty {
            active: AtomicBool::new(false),
            bits: (0..(mem_size / PAGE_SIZE).div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn mark(&self, gpa: u64, len: usize) {
        if len == 0 || !self.active.load(Ordering::Acquire) {
            return;
        }
        let first = gpa as usize / PAGE_SIZE;
        let last = (gpa as usize + len - 1) / PAGE_SIZE;
        for page in first..=last {
            if let Some(w) = self.bits.get(page / 64) {
                w.fetch_or(1 << (page % 64), Ordering::AcqRel);
            }
        }
    }

    /// ORs the marked pages into `bitmap` and clears them.
    fn take_into(&self, bitmap: &mut Vec<u64>) {
        if bitmap.len() < self.bits.len() {
            bitmap.resize(self.bits.len(), 0);
        }
        for (b, w) in bitmap.iter_mut().zip(&self.bits) {
            *b |= w.swap(0, Ordering::AcqRel);
        }
    }
}

impl fmt::Debug for MemoryHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryHandle")
            .field("mem_size", &self.mem_size)
            .finish_non_exhaustive()
    }
}

impl MemoryHandle {
    /// Turns on KVM's dirty-page log (while the vCPU may run: KVM updates memory slots
    /// safely against running vCPUs); dropping the returned log turns it off.
    pub fn start_dirty_log(&self) -> Result<DirtyLog, VmError> {
        let log = DirtyLog { m: self.clone() };
        log.m.host_dirty.active.store(true, Ordering::Release);
        log.m.register(KVM_MEM_LOG_DIRTY_PAGES)?;
        // Pages dirtied before now are not in the log: every page is copied in round 0 anyway.
        log.take_dirty()?;
        Ok(log)
    }

    fn register(&self, flags: u32) -> Result<(), VmError> {
        let host_addr = self
            .mem
            .get_host_address(GuestAddress(0))
            .map_err(|e| VmError::MemAlloc(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags,
            guest_phys_addr: 0,
            memory_size: self.mem_size as u64,
            userspace_addr: host_addr as u64,
        };
        // SAFETY: the same slot, address and size as `Vm::new` registered, only the flags
        // differ; the mapping is owned by `self.mem` (a clone sharing the VM's regions), which
        // lives as long as this handle, and the VM fd is dropped before it (field order).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION (dirty log)"))
    }
}

/// A guest's memory with KVM's dirty-page log on, usable from another thread while the vCPU
/// runs (from [`Vm::dirty_log`] or [`MemoryHandle::start_dirty_log`]).
#[derive(Debug)]
pub struct DirtyLog {
    m: MemoryHandle,
}

impl DirtyLog {
    /// Pages of guest memory.
    pub fn pages(&self) -> usize {
        self.m.mem_size / PAGE_SIZE
    }

    /// The pages written since the last call, by the guest (KVM's log) or by the VMM (one bit
    /// per page, 64 per word), and clears them.
    pub fn take_dirty(&self) -> Result<Vec<u64>, VmError> {
        let mut bits = self
            .m
            .vm
            .get_dirty_log(0, self.m.mem_size)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        self.m.host_dirty.take_into(&mut bits);
        Ok(bits)
    }

    /// Copies page `page` into `buf` (the guest may be writing it meanwhile: then it is dirty
    /// again and copied again later).
    pub fn read_page(&self, page: usize, buf: &mut [u8; PAGE_SIZE]) -> Result<(), VmError> {
        let gpa = (page * PAGE_SIZE) as u64;
        self.m
            .mem
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| VmError::OutOfRange {
                gpa,
                len: PAGE_SIZE,
            })
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        self.m.host_dirty.active.store(false, Ordering::Release);
        if let Err(e) = self.m.register(0) {
            tracing::warn!("turning the dirty-page log off: {e}");
        }
    }
}

fn classify(exit: VcpuExit<'_>) -> VmExit {
    match exit {
        VcpuExit::IoOut(port, data) if port == HYPERCALL_PORT && data.len() == 1 => {
            VmExit::Hypercall { op: data[0] }
        }
        VcpuExit::IoOut(port, data) => VmExit::Other(format!("port write {port:#x} {data:02x?}")),
        VcpuExit::IoIn(port, data) => {
            data.fill(0xff);
            VmExit::Other(format!("port read {port:#x} ({} bytes)", data.len()))
        }
        VcpuExit::MmioRead(addr, data) => {
            data.fill(0xff);
            VmExit::Other(format!("MMIO read {addr:#x} ({} bytes)", data.len()))
        }
        VcpuExit::MmioWrite(addr, data) => {
            VmExit::Other(format!("MMIO write {addr:#x} {data:02x?}"))
        }
        VcpuExit::Hlt => VmExit::Halt,
        VcpuExit::Shutdown => VmExit::Shutdown,
        VcpuExit::FailEntry(reason, cpu) => VmExit::Other(format!(
            "VM entry failed: hardware reason {reason:#x} on cpu {cpu}"
        )),
        other => VmExit::Other(format!("{other:?}")),
    }
}

/// `_IOW(KVMIO, 0x86, struct kvm_interrupt)`: kvm-ioctls has no wrapper for it.
const KVM_INTERRUPT: libc::c_ulong = (1 << 30) | (4 << 16) | (0xAE << 8) | 0x86;

/// `madvise` advice: populate (prefault) page tables writable (Linux 5.14).
const MADV_POPULATE_WRITE: libc::c_int = 23;

fn write_mem(mem: &GuestMemoryMmap, gpa: u64, data: &[u8]) -> Result<(), VmError> {
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(|_| VmError::OutOfRange {
            gpa,
            len: data.len(),
        })
}

/// PML4[0] → PDPT, PDPT[0] → PD, PD[i] = 2 MiB page at i × 2 MiB: the first 1 GiB identity-mapped,
/// read/write, executable, supervisor.
fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), VmError> {
    write_mem(
        mem,
        PML4_ADDR,
        &(PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE).to_le_bytes(),
    )?;
    write_mem(
        mem,
        PDPT_ADDR,
        &(PD_ADDR | PTE_PRESENT | PTE_WRITABLE).to_le_bytes(),
    )?;
    let mut pd = [0u8; 4096];
    for (i, e) in pd.chunks_exact_mut(8).enumerate() {
        let pte = ((i as u64) << 21) | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE;
        e.copy_from_slice(&pte.to_le_bytes());
    }
    write_mem(mem, PD_ADDR, &pd)
}

/// A GDT descriptor: `flags` is access byte (bits 0-7) and the flags nibble (bits 12-15).
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = base as u64;
    let limit = limit as u64;
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
        | ((limit & 0x000f_0000) << 32)
        | (((flags as u64) & 0xf0ff) << 40)
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), VmError> {
    let gdt: [u64; GDT_ENTRIES] = [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // code: G, L, P, DPL 0, S, execute/read accessed
        gdt_entry(0xc093, 0, 0xfffff), // data: G, D/B, P, DPL 0, S, read/write accessed
        gdt_entry(0x008b, TSS_ADDR as u32, TSS_LIMIT), // 64-bit TSS (busy), low half
        0,                             // 64-bit TSS, high half (base bits 32-63)
    ];
    let mut bytes = [0u8; GDT_ENTRIES * 8];
    for (chunk, e) in bytes.chunks_exact_mut(8).zip(gdt) {
        chunk.copy_from_slice(&e.to_le_bytes());
    }
    write_mem(mem, GDT_ADDR, &bytes)
}

fn setup_sregs(vcpu: &VcpuFd) -> Result<(), VmError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: CODE_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: DATA_SELECTOR,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    let tss = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    // No IDT: any exception escalates to a triple fault, which KVM reports as a shutdown exit.
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_INIT;
    sregs.cr2 = 0;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_INIT;
    sregs.cr8 = 0;
    sregs.efer = EFER_INIT;
    sregs.interrupt_bitmap = [0; 4];
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_encode_like_the_manual() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x008b, 0x600, 0x67), 0x0000_8b00_0600_0067);
    }

    #[test]
    fn bad_sizes_and_images_are_rejected_before_kvm_is_opened() {
        for size in [
            0,
            MIN_MEM_SIZE - 4096,
            MIN_MEM_SIZE + 1,
            MAX_MEM_SIZE + 4096,
        ] {
            assert!(matches!(
                Vm::new(size, GUEST_IMAGE),
                Err(VmError::MemSize(_))
            ));
        }
        assert!(matches!(
            Vm::new(MIN_MEM_SIZE, b"MZ not an ELF"),
            Err(VmError::Image(crate::image::ImageFault::NotElf))
        ));
    }
}
