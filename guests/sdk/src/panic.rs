//! The panic handler: a guest that panics reports it through the ABI. It writes a short message
//! — `file:line: message`, cut to [`PANIC_MSG_MAX`] bytes — at [`PANIC_MSG_ADDR`] (a `u32`
//! length, then the bytes) and halts with [`HALT_PANIC`]; the VMM reads the message when it sees
//! that HALT (`vmm::vm::Vm::panic_message`) and logs it.
//!
//! A panic is deterministic like everything else the guest does, so the backup's replica panics
//! at the same exit with the same message. Formatting runs only here, once.

use core::fmt::{self, Write};
use core::panic::PanicInfo;
use core::ptr::write_volatile;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::abi::{HALT_PANIC, PANIC_MSG_ADDR, PANIC_MSG_MAX};

static PANICKING: AtomicBool = AtomicBool::new(false);

/// Writes the message into the mailbox page, byte by byte (volatile: the VMM reads it).
struct Message {
    len: usize,
}

impl Message {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len == PANIC_MSG_MAX {
                return;
            }
            // SAFETY: PANIC_MSG_ADDR + 4 .. + 4 + PANIC_MSG_MAX is guest RAM in the mailbox page,
            // written only here (the ABI reserves it for this), and `len < PANIC_MSG_MAX`.
            unsafe { write_volatile((PANIC_MSG_ADDR as *mut u8).add(4 + self.len), b) };
            self.len += 1;
        }
    }

    fn decimal(&mut self, mut n: u32) {
        let mut digits = [0u8; 10];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn finish(self) {
        // SAFETY: PANIC_MSG_ADDR is 4-byte aligned guest RAM in the mailbox page, reserved for
        // the message's length.
        unsafe { write_volatile(PANIC_MSG_ADDR as *mut u32, self.len as u32) };
    }
}

impl Write for Message {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    // A panic while reporting one: halt with what was written.
    if PANICKING.swap(true, Ordering::Relaxed) {
        crate::halt(HALT_PANIC);
    }
    let mut m = Message { len: 0 };
    if let Some(at) = info.location() {
        m.push(at.file().as_bytes());
        m.push(b":");
        m.decimal(at.line());
        m.push(b": ");
    }
    let msg = info.message();
    match msg.as_str() {
        Some(s) => m.push(s.as_bytes()),
        // The message stops where formatting fails or the space ends.
        None => {
            let _ = write!(m, "{msg}");
        }
    }
    m.finish();
    crate::halt(HALT_PANIC)
}
