//! Fuzzes the device as a hostile vhost-user frontend drives it: any message with any
//! payload, memory tables over a memfd whose bytes the input writes (descriptor tables, rings,
//! request headers), vring setup with any numbers, kicks. One daemon-side server (in this
//! process) serves an in-memory disk; each input is one frontend connection.
//! Input: steps of [op][arguments], see `step`.
//! Invariants: nothing panics or crashes (libFuzzer aborts on a panic in any thread); the
//! device ends the connection within a few seconds after the frontend hangs up, ready for the
//! next one (a hung device is a failure); and a connection leaves no descriptor behind (it
//! found every connection leaking an eventfd).
#![no_main]

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use libfuzzer_sys::fuzz_target;
use twinpath_core::{BlockBackend, BlockIo, CacheMode, DiskInfo, GuestBuffers, SocketAccess};
use twinpath_vhost_blk::{Disk, DiskServer, DiskSettings};

const DISK: usize = 1 << 20;
const GUEST: usize = 1 << 20;

struct Mem(Mutex<Vec<u8>>);

impl BlockBackend for Mem {
    fn info(&self) -> DiskInfo {
        DiskInfo::new(DISK as u64)
    }
}

#[async_trait]
impl BlockIo for Mem {
    async fn read(&self, offset: u64, bufs: GuestBuffers) -> twinpath_core::Result<()> {
        let data = self.0.lock().unwrap();
        bufs.copy_from_slice(0, &data[offset as usize..offset as usize + bufs.len()]);
        Ok(())
    }

    async fn write(&self, offset: u64, bufs: GuestBuffers) -> twinpath_core::Result<()> {
        let mut data = self.0.lock().unwrap();
        bufs.copy_to_slice(0, &mut data[offset as usize..offset as usize + bufs.len()]);
        Ok(())
    }

    async fn flush(&self) -> twinpath_core::Result<()> {
        Ok(())
    }
}

struct Server {
    socket: PathBuf,
    _server: DiskServer,
    _dir: tempfile::TempDir,
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("fuzz.sock");
        let settings = DiskSettings {
            name: "fuzz".into(),
            num_queues: 2,
            read_only: false,
            serial: None,
            cache: CacheMode::Writeback,
            poll_us: 0,
            max_inflight_bytes: 8 << 20,
        };
        let disk = Arc::new(Disk::new(
            settings,
            Arc::new(Mem(Mutex::new(vec![0; DISK]))),
        ));
        let server = DiskServer::start(disk, &socket, SocketAccess::default()).unwrap();
        Server {
            socket,
            _server: server,
            _dir: dir,
        }
    })
}

/// The guest memory of one input: a memfd mapped here, whose bytes the input writes.
struct Guest {
    fd: OwnedFd,
    base: *mut u8,
}

impl Guest {
    fn new() -> Guest {
        // SAFETY: plain syscalls; the descriptor is owned from here on, the mapping unmapped
        // in Drop.
        unsafe {
            let fd = OwnedFd::from_raw_fd(libc::memfd_create(
                c"fuzz-guest".as_ptr(),
                libc::MFD_CLOEXEC,
            ));
            assert_eq!(libc::ftruncate(fd.as_raw_fd(), GUEST as libc::off_t), 0);
            let base = libc::mmap(
                std::ptr::null_mut(),
                GUEST,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(base, libc::MAP_FAILED);
            Guest {
                fd,
                base: base.cast(),
            }
        }
    }

    fn write(&self, at: usize, bytes: &[u8]) {
        let at = at % GUEST;
        let n = bytes.len().min(GUEST - at);
        // SAFETY: inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(at), n) };
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.base.cast(), GUEST) };
    }
}

/// Sends one vhost-user message (version 1 flags) with `fds` attached.
fn send(sock: &UnixStream, request: u32, payload: &[u8], fds: &[RawFd]) -> bool {
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&request.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    let mut iov = libc::iovec {
        iov_base: msg.as_mut_ptr().cast(),
        iov_len: msg.len(),
    };
    let mut control = [0u8; 256];
    // SAFETY: a msghdr over our buffers; CMSG_* only write inside `control`.
    unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        if !fds.is_empty() {
            let space = libc::CMSG_SPACE((fds.len() * 4) as u32) as usize;
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = space;
            let cmsg = libc::CMSG_FIRSTHDR(&hdr);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
        }
        libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) == msg.len() as isize
    }
}

/// The input, read from the front.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from(self.u8()) | u16::from(self.u8()) << 8
    }

    fn u64(&mut self) -> u64 {
        let mut v = [0u8; 8];
        let b = self.bytes(8);
        v[..b.len()].copy_from_slice(b);
        u64::from_le_bytes(v)
    }
}

/// Where the frontend says guest memory is in its own address space.
const USER_BASE: u64 = 0x7f00_0000_0000;

fn eventfd() -> OwnedFd {
    // SAFETY: a new descriptor owned from here on.
    unsafe { OwnedFd::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)) }
}

/// One step; false once the device closed the connection.
fn step(sock: &UnixStream, guest: &Guest, kicks: &mut Vec<OwnedFd>, input: &mut Input) -> bool {
    match input.u8() % 9 {
        0 => {
            let request = u32::from(input.u8() % 48);
            let len = usize::from(input.u8());
            let payload = input.bytes(len).to_vec();
            send(sock, request, &payload, &[])
        }
        1 => {
            // SET_MEM_TABLE: 1 or 2 regions over the memfd, mostly sane.
            let regions = 1 + usize::from(input.u8() & 1);
            let mut p = Vec::new();
            p.extend_from_slice(&(regions as u32).to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            for i in 0..regions {
                let sane = input.u8() & 0x80 == 0;
                let (gpa, size, user, offset) = if sane {
                    let half = (GUEST / regions) as u64;
                    (
                        i as u64 * half,
                        half,
                        USER_BASE + i as u64 * half,
                        i as u64 * half,
                    )
                } else {
                    (input.u64(), input.u64(), input.u64(), input.u64())
                };
                for v in [gpa, size, user, offset] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
            }
            let fds = vec![guest.fd.as_raw_fd(); regions];
            send(sock, 5, &p, &fds)
        }
        2 => {
            // SET_VRING_NUM, SET_VRING_ADDR (inside the first region unless told otherwise),
            // SET_VRING_BASE.
            let index = u32::from(input.u8() % 3);
            let num = u32::from(input.u16());
            let mut ok = send(
                sock,
                8,
                &[index.to_le_bytes(), num.to_le_bytes()].concat(),
                &[],
            );
            let mut p = Vec::new();
            p.extend_from_slice(&index.to_le_bytes());
            p.extend_from_slice(&0u32.to_le_bytes());
            for _ in 0..3 {
                let at = u64::from(input.u16()) << 4;
                p.extend_from_slice(&(USER_BASE + at).to_le_bytes());
            }
            p.extend_from_slice(&0u64.to_le_bytes());
            ok &= send(sock, 9, &p, &[]);
            let base = u32::from(input.u16());
            ok & send(
                sock,
                10,
                &[index.to_le_bytes(), base.to_le_bytes()].concat(),
                &[],
            )
        }
        3 => {
            // SET_VRING_CALL and SET_VRING_KICK with new eventfds.
            let index = u64::from(input.u8() % 3);
            let (call, kick) = (eventfd(), eventfd());
            let ok = send(sock, 13, &index.to_le_bytes(), &[call.as_raw_fd()])
                && send(sock, 12, &index.to_le_bytes(), &[kick.as_raw_fd()]);
            kicks.push(kick);
            kicks.push(call);
            ok
        }
        4 => {
            for k in kicks.iter() {
                // SAFETY: writes 8 bytes to our eventfd.
                unsafe { libc::write(k.as_raw_fd(), 1u64.to_ne_bytes().as_ptr().cast(), 8) };
            }
            true
        }
        5 => {
            let at = usize::from(input.u16()) << 4;
            let len = usize::from(input.u8()) * 2;
            let bytes = input.bytes(len).to_vec();
            guest.write(at, &bytes);
            true
        }
        6 => {
            let features = input.u64() | 1 << 32;
            send(sock, 2, &features.to_le_bytes(), &[])
        }
        7 => {
            let index = u32::from(input.u8() % 3);
            let on = u32::from(input.u8() & 1);
            send(
                sock,
                18,
                &[index.to_le_bytes(), on.to_le_bytes()].concat(),
                &[],
            )
        }
        _ => send(sock, 3, &[], &[]),
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The descriptors open after the first connection: what later ones must come back to.
static BASELINE: OnceLock<usize> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let server = server();
    let sock = UnixStream::connect(&server.socket).unwrap();
    let guest = Guest::new();
    let mut kicks = Vec::new();
    let mut input = Input(data);
    for _ in 0..64 {
        if input.0.is_empty() || !step(&sock, &guest, &mut kicks, &mut input) {
            break;
        }
    }
    // Hang up; the device must end the connection (its read side then sees EOF) in time.
    sock.shutdown(std::net::Shutdown::Write).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let started = Instant::now();
    let mut sink = [0u8; 4096];
    let mut s = &sock;
    loop {
        match s.read(&mut sink) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the device did not end the connection 10 s after the frontend hung up"
        );
    }
    drop((sock, guest, kicks));
    // A connection leaves nothing behind (the device frees it before the next accept).
    let baseline = *BASELINE.get_or_init(open_fds);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds() > baseline + 8 {
        assert!(
            Instant::now() < deadline,
            "{} descriptors open after a connection, {baseline} after the first",
            open_fds()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
});
