//! The gate between libiscsi and the target: every byte libiscsi sends waits here until the
//! service thread, having just asked the permits of all live tasks, sends it on with one
//! write.
//!
//! libiscsi writes in a loop of its own (a command, then the data the target asked for with
//! R2T, PDU after PDU), and a process stopped between two of those writes (SIGSTOP, a paused
//! VM, a CPU-throttled cgroup) would go on with the rest when it resumes, long after the
//! check before the loop. So after login libiscsi's socket is swapped for one end of a
//! socket pair, and the service thread carries the bytes between the pair and the target:
//! towards the target only right after a check, in a single write system call.
//!
//! The kernel's own send queue is the other place bytes could wait: a target or path that
//! stops taking them leaves them there, to go out whenever it takes them again. So the gate
//! keeps it short (`TCP_NOTSENT_LOWAT`, and at most that much per write), the service thread
//! also asks the permits while the kernel holds unsent bytes, and a gate that goes resets its
//! connection: what the kernel had not sent is dropped, never sent. Only bytes already on the
//! network can still arrive.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// How many bytes wait in each direction at most.
const CAPACITY: usize = 1 << 20;

/// The most the kernel holds unsent for the target after a write (it reports the socket
/// writable only below it, and a write gives it at most this much).
const UNSENT: usize = 256 << 10;

/// `SIOCOUTQNSD` (linux/sockios.h): bytes in a TCP socket's send queue not sent yet.
const SIOCOUTQNSD: libc::c_ulong = 0x894b;

pub(crate) struct Gate {
    /// The connection to the target.
    target: OwnedFd,
    /// This side of the pair; libiscsi's socket is the other.
    near: OwnedFd,
    /// From libiscsi, for the target.
    outbound: Bytes,
    /// From the target, for libiscsi.
    inbound: Bytes,
}

impl Gate {
    /// Puts a gate on libiscsi's connected socket `fd`: from now on libiscsi talks to the gate.
    pub(crate) fn install(fd: RawFd) -> io::Result<Gate> {
        // SAFETY: duplicates a descriptor libiscsi keeps open; the copy is ours.
        let target = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if target < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just made, owned by nobody else.
        let target = unsafe { OwnedFd::from_raw_fd(target) };
        let mut pair = [0; 2];
        let kind = libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        // SAFETY: writes two new descriptors into `pair`.
        if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, pair.as_mut_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both were just made and are owned by nobody else.
        let (far, near) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
        // Room for a whole large write each way, so that one turn moves it.
        for fd in [&far, &near] {
            for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
                set_option(fd, libc::SOL_SOCKET, option, CAPACITY as libc::c_int)?;
            }
        }
        // libiscsi's descriptor number now names the pair's far end (non-blocking, as
        // libiscsi wants); the connection lives on in `target`.
        // SAFETY: `fd` is libiscsi's open descriptor and `far` a valid one.
        if unsafe { libc::dup3(far.as_raw_fd(), fd, libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        set_option(
            &target,
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            UNSENT as libc::c_int,
        )?;
        Ok(Gate {
            target,
            near,
            outbound: Bytes::default(),
            inbound: Bytes::default(),
        })
    }

    /// What to poll for: (this side of the pair, the target).
    pub(crate) fn interest(&self) -> [libc::pollfd; 2] {
        let mut near = 0;
        let mut target = 0;
        if self.outbound.room() > 0 {
            near |= libc::POLLIN;
        }
        if !self.inbound.is_empty() {
            near |= libc::POLLOUT;
        }
        if self.inbound.room() > 0 {
            target |= libc::POLLIN;
        }
        if !self.outbound.is_empty() {
            target |= libc::POLLOUT;
        }
        [
            pollfd(self.near.as_raw_fd(), near),
            pollfd(self.target.as_raw_fd(), target),
        ]
    }

    /// Carries what is ready, except towards the target: libiscsi's bytes are taken in, the
    /// target's passed on. An error ends the connection.
    pub(crate) fn pump(&mut self) -> io::Result<()> {
        if self.outbound.fill(&self.near)? == Flow::Closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "libiscsi closed its socket",
            ));
        }
        if self.inbound.fill(&self.target)? == Flow::Closed {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the target closed the connection",
            ));
        }
        self.inbound.drain(&self.near)
    }

    /// Whether bytes wait to go to the target, here.
    pub(crate) fn holds_outbound(&self) -> bool {
        !self.outbound.is_empty()
    }

    /// Whether bytes wait to go to the target, here or unsent in the kernel.
    pub(crate) fn holds_unsent(&self) -> bool {
        let mut unsent: libc::c_int = 0;
        // SAFETY: SIOCOUTQNSD writes one int through the pointer.
        let r = unsafe { libc::ioctl(self.target.as_raw_fd(), SIOCOUTQNSD, &mut unsent) };
        self.holds_outbound() || r < 0 || unsent > 0
    }

    /// Sends what waits for the target, at most [`UNSENT`] bytes, with one write (the rest
    /// waits for the next check). Call it only right after the permits allowed it.
    pub(crate) fn send(&mut self) -> io::Result<()> {
        self.outbound.write(&self.target, UNSENT).map(|_| ())
    }
}

impl Drop for Gate {
    /// The close resets the connection: the kernel drops what it had not sent yet.
    fn drop(&mut self) {
        let reset = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: sets a linger struct option on our socket.
        unsafe {
            libc::setsockopt(
                self.target.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::addr_of!(reset).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
    }
}

fn set_option(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: sets an int option on our socket from a live int.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::addr_of!(value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[derive(PartialEq)]
enum Flow {
    Open,
    Closed,
}

/// Bytes on their way in one direction, `data[start..end]`.
struct Bytes {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Default for Bytes {
    fn default() -> Bytes {
        Bytes {
            data: vec![0; CAPACITY].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }
}

impl Bytes {
    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn room(&self) -> usize {
        CAPACITY - (self.end - self.start)
    }

    /// Reads from `from` until it has nothing more or this is full.
    fn fill(&mut self, from: &OwnedFd) -> io::Result<Flow> {
        if self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        while self.end < CAPACITY {
            let free = &mut self.data[self.end..];
            // SAFETY: reads into the free tail of our buffer.
            let n = unsafe { libc::read(from.as_raw_fd(), free.as_mut_ptr().cast(), free.len()) };
            match n {
                0 => return Ok(Flow::Closed),
                n if n > 0 => self.end += n as usize,
                _ => return again_is_ok(Flow::Open),
            }
        }
        Ok(Flow::Open)
    }

    /// Writes to `to` until it takes nothing more or this is empty.
    fn drain(&mut self, to: &OwnedFd) -> io::Result<()> {
        while !self.is_empty() {
            if self.write(to, CAPACITY)? == 0 {
                break;
            }
        }
        Ok(())
    }

    /// One write of at most `most` bytes; how much it took (0 if `to` would block).
    fn write(&mut self, to: &OwnedFd, most: usize) -> io::Result<usize> {
        let waiting = &self.data[self.start..self.end.min(self.start + most)];
        let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT;
        // SAFETY: sends from our buffer; a closed peer gives EPIPE, not SIGPIPE.
        let n = unsafe {
            libc::send(
                to.as_raw_fd(),
                waiting.as_ptr().cast(),
                waiting.len(),
                flags,
            )
        };
        if n < 0 {
            return again_is_ok(0);
        }
        self.start += n as usize;
        if self.is_empty() {
            (self.start, self.end) = (0, 0);
        }
        Ok(n as usize)
    }
}

/// `ok` if the last error was "would block" (or an interrupted call), the error otherwise.
fn again_is_ok<T>(ok: T) -> io::Result<T> {
    let e = io::Error::last_os_error();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(ok),
        _ => Err(e),
    }
}
