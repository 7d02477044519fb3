//! Guest memory that its frontend shrinks under us (an ftruncate of the memfd after
//! SET_MEM_TABLE) raises SIGBUS at the next access, which would kill the daemon and every disk
//! it serves. Guest mappings are registered here; a SIGBUS inside one replaces the faulting
//! page with a private page of zeros (the access then completes on it: reads see zeros,
//! writes go nowhere) and marks the mapping poisoned, and the device ends that frontend's
//! connection. A SIGBUS anywhere else goes to the handler that was there before (the Rust
//! runtime's) or kills the process as it always did.
//!
//! Sealed memfds (QEMU's memory-backend-memfd seals by default) cannot be shrunk at all; this
//! covers the frontends whose memory cannot be sealed (files on hugetlbfs or /dev/shm) and
//! those that did not seal it.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// Mappings watched at once, over all connections; a memory table that would need more is
/// refused (never is a watched mapping dropped from the table while it may be used).
const SLOTS: usize = 4096;

struct Slot {
    /// `[start, end)` of the mapping; `start == 0`: free.
    start: AtomicUsize,
    end: AtomicUsize,
    poisoned: AtomicBool,
}

static WATCHED: [Slot; SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        poisoned: AtomicBool::new(false),
    }
}; SLOTS];
/// Registrations change slots under this; the handler only reads atomics.
static REGISTERING: Mutex<()> = Mutex::new(());
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
/// The SIGBUS action before ours, for faults that are not in guest memory.
static mut PREVIOUS: Option<libc::sigaction> = None;

/// A watched guest mapping; `poisoned` once the frontend shrank memory under it. Dropping
/// it frees its slot: only when nothing will touch the mapping any more.
#[derive(Debug)]
pub struct Watched {
    slot: usize,
    start: usize,
    end: usize,
}

impl Watched {
    pub fn poisoned(&self) -> bool {
        let s = &WATCHED[self.slot];
        s.start.load(Ordering::Acquire) == self.start && s.poisoned.load(Ordering::Acquire)
    }

    /// Whether this watches exactly `[start, start + len)`.
    pub fn covers(&self, start: *const u8, len: usize) -> bool {
        (self.start, self.end) == (start as usize, start as usize + len)
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        let _one = crate::lock(&REGISTERING);
        let s = &WATCHED[self.slot];
        if s.start.load(Ordering::Acquire) == self.start {
            s.start.store(0, Ordering::Release);
        }
    }
}

/// Installs the handler (once per process).
fn install() {
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: a zeroed sigaction is valid; we fill in a handler with the SA_SIGINFO
        // signature and keep the previous action for faults that are not ours. PREVIOUS is
        // written once, here, before the handler can run.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &action, &mut previous) == 0 {
                PREVIOUS = Some(previous);
            } else {
                tracing::warn!(
                    "cannot install the SIGBUS handler: a frontend shrinking its memory would \
                     stop the daemon"
                );
            }
        }
    });
}

/// Watches the mapping `[start, start + len)` of guest memory; `None` when the table is full.
pub fn watch(start: *const u8, len: usize) -> Option<Watched> {
    install();
    let (start, end) = (start as usize, start as usize + len);
    let _one = crate::lock(&REGISTERING);
    // A slot overlapping the new mapping belongs to a mapping gone (its addresses are reused:
    // the kernel maps nothing over a live mapping).
    for s in &WATCHED {
        let (s0, s1) = (
            s.start.load(Ordering::Acquire),
            s.end.load(Ordering::Acquire),
        );
        if s0 != 0 && s0 < end && start < s1 {
            s.start.store(0, Ordering::Release);
        }
    }
    let slot = WATCHED
        .iter()
        .position(|s| s.start.load(Ordering::Acquire) == 0)?;
    let s = &WATCHED[slot];
    // Free while it is filled in: the handler never sees half a slot.
    s.start.store(0, Ordering::Release);
    s.poisoned.store(false, Ordering::Release);
    s.end.store(end, Ordering::Release);
    s.start.store(start, Ordering::Release);
    Some(Watched { slot, start, end })
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for s in &WATCHED {
        let start = s.start.load(Ordering::Acquire);
        if start == 0 || addr < start || addr >= s.end.load(Ordering::Acquire) {
            continue;
        }
        let page = addr & !(PAGE.load(Ordering::Relaxed) - 1);
        // SAFETY: the page lies in a guest mapping the daemon made and still holds; a private
        // anonymous page in its place is what the faulting access (a copy to or from guest
        // memory) completes on. mmap is async-signal-safe.
        let replaced = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE.load(Ordering::Relaxed),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if replaced != libc::MAP_FAILED {
            s.poisoned.store(true, Ordering::Release);
            return;
        }
    }
    // Not guest memory: what would have happened without us.
    // SAFETY: PREVIOUS was written before this handler was installed and never since.
    let previous = unsafe { *std::ptr::addr_of!(PREVIOUS) };
    match previous {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(signal, info, context);
            } else {
                // SAFETY: the previous handler was installed with this signature.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(signal);
            }
        }
        _ => {
            // SAFETY: restoring the default action; the faulting access runs again and the
            // process ends with SIGBUS, as without this handler.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_shrunk_watched_mapping_reads_zeros_and_is_poisoned() {
        let f = tempfile::tempfile().unwrap();
        let len = 4 * 4096;
        f.set_len(len as u64).unwrap();
        // SAFETY: a shared mapping of our own file, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        let w = watch(p, len).unwrap();
        // SAFETY: inside the mapping.
        unsafe { p.add(3 * 4096).write_volatile(7) };
        assert!(!w.poisoned());
        f.set_len(4096).unwrap();
        // SAFETY: inside the mapping; past the file's new end, so it faults: the handler
        // puts a page of zeros there.
        let (read, first) = unsafe {
            p.add(3 * 4096 + 8).write_volatile(9);
            (p.add(3 * 4096 + 8).read_volatile(), p.read_volatile())
        };
        assert_eq!((read, first), (9, 0));
        assert!(w.poisoned());
        // SAFETY: our mapping.
        unsafe { libc::munmap(p.cast(), len) };
    }
}
