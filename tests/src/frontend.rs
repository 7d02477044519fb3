//! A vhost-user-blk frontend that builds descriptor chains itself, for tests that play a
//! hostile guest or a hostile QEMU: any descriptor, any length, any address, memory it can
//! shrink afterwards. Guest memory is one memfd; guest physical address = offset in it.
//!
//! Layout of guest memory: the split ring of queue 0 in the first pages, then request
//! headers and status bytes, then the data area from [`DATA`] on.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const QUEUE_SIZE: u16 = 256;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADERS: u64 = 0x3000;
const STATUS: u64 = 0x4000;
/// Where the data area starts.
pub const DATA: u64 = 0x10000;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VIRTIO_BLK_T_IN: u32 = 0;

/// One descriptor of a chain's data: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// The error of setup step `what`.
fn step<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> String {
    move |e| format!("{what}: {e}")
}

/// SET_VRING_ADDR of queue 0 with the rings at guest addresses `avail` and `used` (the
/// descriptor table at its place), for guest memory mapped at `base` here.
fn set_rings(frontend: &mut Frontend, base: *mut u8, avail: u64, used: u64) -> Result<(), String> {
    let at = |gpa: u64| base as u64 + gpa;
    frontend
        .set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: at(DESC),
                used_ring_addr: at(used),
                avail_ring_addr: at(avail),
                log_addr: None,
            },
        )
        .map_err(step("set_vring_addr"))
}

/// The vhost-user set-up of one connection: owner, features, the memory table (`memfd`,
/// mapped at `base` here, `size` bytes at guest address 0), queue 0 starting at
/// `ring_base`, its call and kick eventfds.
fn handshake(
    socket: &Path,
    memfd: &File,
    base: *mut u8,
    size: usize,
    protocol: bool,
    extra_features: u64,
    ring_base: u16,
) -> Result<(Frontend, EventFd, EventFd), String> {
    let mut frontend = Frontend::connect(socket, 1).map_err(step("connect"))?;
    frontend.set_owner().map_err(step("set_owner"))?;
    let features = frontend.get_features().map_err(step("get_features"))?;
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    let want = if protocol {
        VIRTIO_F_VERSION_1 | (1 << 30) | (1 << 28)
    } else {
        VIRTIO_F_VERSION_1
    };
    frontend
        .set_features(want | (features & extra_features))
        .map_err(step("set_features"))?;
    if protocol {
        let pf = frontend
            .get_protocol_features()
            .map_err(step("get_protocol_features"))?;
        frontend
            .set_protocol_features(
                pf & (VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                    | VhostUserProtocolFeatures::REPLY_ACK),
            )
            .map_err(step("set_protocol_features"))?;
    }
    let region = VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: base as u64,
        mmap_offset: 0,
        mmap_handle: memfd.as_raw_fd(),
    };
    frontend
        .set_mem_table(&[region])
        .map_err(step("set_mem_table"))?;
    frontend
        .set_vring_num(0, QUEUE_SIZE)
        .map_err(step("set_vring_num"))?;
    set_rings(&mut frontend, base, AVAIL, USED)?;
    frontend
        .set_vring_base(0, ring_base)
        .map_err(step("set_vring_base"))?;
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    frontend
        .set_vring_call(0, &call)
        .map_err(step("set_vring_call"))?;
    frontend
        .set_vring_kick(0, &kick)
        .map_err(step("set_vring_kick"))?;
    if protocol {
        frontend
            .set_vring_enable(0, true)
            .map_err(step("set_vring_enable"))?;
    }
    // The device answers only requests that want a reply: this one shows it is still
    // there (it hangs up on a memory table it refused).
    frontend.get_features().map_err(step("get_features"))?;
    Ok((frontend, call, kick))
}

pub struct RawFrontend {
    frontend: Frontend,
    memfd: File,
    base: *mut u8,
    size: usize,
    kick: EventFd,
    _call: EventFd,
    next_desc: u16,
    /// Requests made so far (the avail index).
    posted: u16,
    protocol: bool,
    extra_features: u64,
}

impl RawFrontend {
    /// Connects to `socket`, hands over `data_len` bytes of guest data area (plus the ring
    /// pages) and starts queue 0. Accepts only VIRTIO_F_VERSION_1: like firmware, it takes
    /// neither SIZE_MAX nor SEG_MAX, so the device must take any descriptor length.
    pub fn connect(socket: &Path, data_len: usize) -> RawFrontend {
        Self::try_connect(socket, data_len, None).unwrap()
    }

    /// [`RawFrontend::connect`], with the memfd only `file_len` bytes long if given (the
    /// memory table still says the full size); the first step the device refuses is the error.
    pub fn try_connect(
        socket: &Path,
        data_len: usize,
        file_len: Option<usize>,
    ) -> Result<RawFrontend, String> {
        Self::try_connect_with(socket, data_len, file_len, false)
    }

    /// [`RawFrontend::try_connect`]; with `protocol`, also negotiates the protocol features
    /// (CONFIGURE_MEM_SLOTS, REPLY_ACK) and enables the ring, and acks INDIRECT_DESC.
    pub fn try_connect_with(
        socket: &Path,
        data_len: usize,
        file_len: Option<usize>,
        protocol: bool,
    ) -> Result<RawFrontend, String> {
        Self::try_connect_features(socket, data_len, file_len, protocol, 0)
    }

    /// [`RawFrontend::connect`] that also acks VIRTIO_RING_F_EVENT_IDX (the device then
    /// looks for more chains after it re-arms notifications).
    pub fn connect_event_idx(socket: &Path, data_len: usize) -> RawFrontend {
        Self::try_connect_features(socket, data_len, None, false, 1 << 29).unwrap()
    }

    /// [`RawFrontend::connect_event_idx`] that also negotiates the protocol features and
    /// acks INDIRECT_DESC, as QEMU with a Linux guest does.
    pub fn connect_event_idx_indirect(socket: &Path, data_len: usize) -> RawFrontend {
        Self::try_connect_features(socket, data_len, None, true, 1 << 29).unwrap()
    }

    fn try_connect_features(
        socket: &Path,
        data_len: usize,
        file_len: Option<usize>,
        protocol: bool,
        extra_features: u64,
    ) -> Result<RawFrontend, String> {
        let size = DATA as usize + data_len;
        // SAFETY: plain syscalls; the descriptor is owned by the File from here on.
        let memfd = unsafe {
            let fd = libc::memfd_create(c"twinpath-guest".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
            File::from_raw_fd(fd)
        };
        memfd.set_len(size as u64).unwrap();
        // SAFETY: a shared mapping of the whole memfd, unmapped in Drop.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        let base = base.cast::<u8>();
        if let Some(len) = file_len {
            memfd.set_len(len as u64).unwrap();
        }
        let (frontend, call, kick) =
            handshake(socket, &memfd, base, size, protocol, extra_features, 0)?;
        Ok(RawFrontend {
            frontend,
            memfd,
            base,
            size,
            kick,
            _call: call,
            next_desc: 0,
            posted: 0,
            protocol,
            extra_features,
        })
    }

    /// What QEMU does when its backend went away (killed, restarted) and a new one listens on
    /// `socket`: the same guest memory and rings on a new connection, the queue going on from
    /// the used ring's index (QEMU cannot ask a dead backend where it stopped, so it takes
    /// every request the used ring does not hold as not done, and the new backend pops them
    /// again). No kick: the caller kicks.
    pub fn reconnect(&mut self, socket: &Path) -> Result<(), String> {
        let (frontend, call, kick) = handshake(
            socket,
            &self.memfd,
            self.base,
            self.size,
            self.protocol,
            self.extra_features,
            self.used(),
        )?;
        self.frontend = frontend;
        self._call = call;
        self.kick = kick;
        Ok(())
    }

    /// What QEMU does when *its* side of the connection breaks (chardev reset, QEMU
    /// restarted on the same memory): the socket is shut down without GET_VRING_BASE, then a
    /// new connection resumes the queue at the used ring's index, as in
    /// [`RawFrontend::reconnect`].
    pub fn hang_up_and_reconnect(&mut self, socket: &Path) -> Result<(), String> {
        // SAFETY: shutdown(2) on the connection's own socket, which stays open until replaced.
        unsafe { libc::shutdown(self.frontend.as_raw_fd(), libc::SHUT_RDWR) };
        self.reconnect(socket)
    }

    /// Adds a guest memory region of `len` bytes at `gpa` (ADD_MEM_REG; needs `protocol`),
    /// backed by a new memfd, which is returned.
    pub fn add_region(&mut self, gpa: u64, len: usize) -> Result<File, String> {
        // SAFETY: plain syscall; the descriptor is owned by the File from here on.
        let memfd = unsafe {
            let fd = libc::memfd_create(c"twinpath-extra".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            File::from_raw_fd(fd)
        };
        memfd.set_len(len as u64).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: gpa,
            memory_size: len as u64,
            userspace_addr: 0x6000_0000_0000 + gpa,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        };
        self.frontend
            .add_mem_region(&region)
            .map_err(step("add_mem_region"))?;
        Ok(memfd)
    }

    /// Sends a new memory table like the first but over a fresh memfd only `file_len` bytes
    /// long: a table the device must refuse before anything of it is read (the rings lie in
    /// it). Returns the memfd, which must live until the device has answered.
    pub fn replace_memory_with_short_file(&mut self, file_len: usize) -> Result<File, String> {
        // SAFETY: plain syscall; the descriptor is owned by the File from here on.
        let memfd = unsafe {
            let fd = libc::memfd_create(c"twinpath-short".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            File::from_raw_fd(fd)
        };
        memfd.set_len(file_len as u64).unwrap();
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size as u64,
            userspace_addr: self.base as u64,
            mmap_offset: 0,
            mmap_handle: memfd.as_raw_fd(),
        };
        self.frontend
            .set_mem_table(&[region])
            .map_err(step("set_mem_table"))?;
        Ok(memfd)
    }

    /// Moves queue 0's available ring to guest address `gpa` (SET_VRING_ADDR on the running
    /// queue); at 0 the device sees a queue that is not set up.
    pub fn move_avail_ring(&mut self, gpa: u64) -> Result<(), String> {
        set_rings(&mut self.frontend, self.base, gpa, USED)
    }

    /// Moves queue 0's used ring to guest address `gpa` (SET_VRING_ADDR on the running
    /// queue); the device reads the used index there.
    pub fn move_used_ring(&mut self, gpa: u64) -> Result<(), String> {
        set_rings(&mut self.frontend, self.base, AVAIL, gpa)
    }

    /// GET_VRING_BASE of queue 0 (stops the ring); how long the device took to answer.
    pub fn get_vring_base_timed(&mut self) -> (Result<u32, String>, Duration) {
        let t = Instant::now();
        let r = self
            .frontend
            .get_vring_base(0)
            .map_err(|e| format!("get_vring_base: {e}"));
        (r, t.elapsed())
    }

    /// What a driver reset does after GET_VRING_BASE: rings zeroed, queue set up
    /// again from index 0 (SET_VRING_NUM/ADDR/BASE/KICK), descriptors and requests numbered
    /// from 0 again.
    pub fn restart_queue(&mut self) -> Result<(), String> {
        self.fill(DESC, (HEADERS - DESC) as usize, 0);
        self.frontend
            .set_vring_num(0, QUEUE_SIZE)
            .map_err(step("set_vring_num"))?;
        set_rings(&mut self.frontend, self.base, AVAIL, USED)?;
        self.frontend
            .set_vring_base(0, 0)
            .map_err(step("set_vring_base"))?;
        self.frontend
            .set_vring_kick(0, &self.kick)
            .map_err(step("set_vring_kick"))?;
        self.next_desc = 0;
        self.posted = 0;
        Ok(())
    }

    /// What QEMU does to resume a queue it stopped with GET_VRING_BASE (VM paused and
    /// continued, vhost restarted): the same rings and requests, the queue set up again
    /// from `base` (SET_VRING_NUM/ADDR/BASE/CALL/KICK). No kick: the caller kicks.
    pub fn resume_queue(&mut self, base: u16) -> Result<(), String> {
        self.frontend
            .set_vring_num(0, QUEUE_SIZE)
            .map_err(step("set_vring_num"))?;
        set_rings(&mut self.frontend, self.base, AVAIL, USED)?;
        self.frontend
            .set_vring_base(0, base)
            .map_err(step("set_vring_base"))?;
        self.frontend
            .set_vring_call(0, &self._call)
            .map_err(step("set_vring_call"))?;
        self.frontend
            .set_vring_kick(0, &self.kick)
            .map_err(step("set_vring_kick"))?;
        Ok(())
    }

    /// Posts a WRITE of `segs` at `sector`; status byte preset to `preset`.
    pub fn write_req(&mut self, sector: u64, segs: &[Seg], preset: u8) -> u16 {
        let status = STATUS + u64::from(self.posted % QUEUE_SIZE);
        self.write_at(status, preset);
        self.post(1, sector, segs, status)
    }

    /// Reads a little-endian u16 of guest memory at `gpa`.
    pub fn read_u16(&self, gpa: u64) -> u16 {
        u16::from_le(self.read_at(gpa))
    }

    /// The queue's kick, for a thread that kicks while this one sends messages.
    pub fn kicker(&self) -> EventFd {
        self.kick.try_clone().unwrap()
    }

    /// Writes raw bytes into guest memory at `gpa`.
    pub fn write_bytes(&self, gpa: u64, data: &[u8]) {
        assert!(gpa as usize + data.len() <= self.size);
        // SAFETY: inside our mapping (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.base.add(gpa as usize), data.len())
        }
    }

    /// Posts a request of type `req_type` at `sector` with `segs` (header and status
    /// added), status byte at `status`.
    pub fn post(&mut self, req_type: u32, sector: u64, segs: &[Seg], status: u64) -> u16 {
        let n = self.posted;
        let header = HEADERS + u64::from(n % QUEUE_SIZE) * 16;
        self.write_at(header, req_type.to_le());
        self.write_at(header + 4, 0u32);
        self.write_at(header + 8, sector.to_le());
        let head = self.desc(header, 16, F_NEXT);
        for s in segs {
            let flags = F_NEXT | if s.write { F_WRITE } else { 0 };
            self.desc(s.addr, s.len, flags);
        }
        self.desc(status, 1, F_WRITE);
        self.publish(head)
    }

    /// Posts a GET_ID whose 20-byte answer goes to guest address `addr`; returns the request's
    /// number.
    pub fn get_id(&mut self, addr: u64) -> u16 {
        let status = STATUS + u64::from(self.posted % QUEUE_SIZE);
        self.write_at(status, 0xffu8);
        let segs = [Seg {
            addr,
            len: 20,
            write: true,
        }];
        self.post(8 /* VIRTIO_BLK_T_GET_ID */, 0, &segs, status)
    }

    /// Makes available a "chain" whose head is outside the descriptor table: what a broken
    /// or hostile driver can put in the available ring.
    pub fn post_bad_head(&mut self) -> u16 {
        self.publish(QUEUE_SIZE + 7)
    }

    /// Makes `head` available as it is, whatever it names (a head beyond the descriptor
    /// table, or one already in flight): what a hostile driver can put in the available
    /// ring. Returns the request's number.
    pub fn publish_head(&mut self, head: u16) -> u16 {
        self.publish(head)
    }

    /// Sets the available ring's index further ahead than the ring has entries.
    pub fn post_bad_avail_index(&mut self) {
        let idx = self.posted.wrapping_add(QUEUE_SIZE + 10);
        self.write_at(AVAIL + 2, idx.to_le());
    }

    /// Makes the chain at `head` available to the device; returns the request's number.
    fn publish(&mut self, head: u16) -> u16 {
        let n = self.posted;
        let slot = AVAIL + 4 + u64::from(n % QUEUE_SIZE) * 2;
        self.write_at(slot, head.to_le());
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.posted = n.wrapping_add(1);
        self.write_at(AVAIL + 2, self.posted.to_le());
        n
    }

    /// Posts a request whose whole chain is one indirect descriptor pointing at the table of
    /// `count` descriptors at guest address `table` (which the caller filled in).
    pub fn post_indirect(&mut self, table: u64, count: u32) -> u16 {
        let head = self.desc(table, count * 16, 4 /* VRING_DESC_F_INDIRECT */);
        self.publish(head)
    }

    /// Guest address of request `n`'s status byte, as [`RawFrontend::read`] places it.
    pub fn status_addr(&self, n: u16) -> u64 {
        STATUS + u64::from(n % QUEUE_SIZE)
    }

    /// Guest address of header slot `n`.
    pub fn header_addr(&self, n: u16) -> u64 {
        HEADERS + u64::from(n % QUEUE_SIZE) * 16
    }

    /// The guest memory's file: what a hostile frontend can truncate under the device.
    pub fn memfd(&self) -> &File {
        &self.memfd
    }

    fn write_at<T: Copy>(&self, gpa: u64, v: T) {
        assert!(gpa as usize + size_of::<T>() <= self.size);
        // SAFETY: inside our mapping (checked); the device reads it concurrently, as a guest's
        // memory is read.
        unsafe { self.base.add(gpa as usize).cast::<T>().write_volatile(v) }
    }

    fn read_at<T: Copy>(&self, gpa: u64) -> T {
        assert!(gpa as usize + size_of::<T>() <= self.size);
        // SAFETY: as in `write_at`.
        unsafe { self.base.add(gpa as usize).cast::<T>().read_volatile() }
    }

    /// Fills `len` bytes of guest memory at `gpa`.
    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        assert!(gpa as usize + len <= self.size);
        // SAFETY: inside our mapping (checked).
        unsafe { std::ptr::write_bytes(self.base.add(gpa as usize), byte, len) }
    }

    fn desc(&mut self, addr: u64, len: u32, flags: u16) -> u16 {
        let i = self.next_desc;
        self.next_desc = (self.next_desc + 1) % QUEUE_SIZE;
        let at = DESC + u64::from(i) * 16;
        let next = (i + 1) % QUEUE_SIZE;
        self.write_at(at, addr.to_le());
        self.write_at(at + 8, len.to_le());
        self.write_at(at + 12, flags.to_le());
        self.write_at(at + 14, next.to_le());
        i
    }

    /// Copies guest memory at `gpa` into `out`.
    pub fn read_bytes(&self, gpa: u64, out: &mut [u8]) {
        assert!(gpa as usize + out.len() <= self.size);
        // SAFETY: inside our mapping (checked).
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), out.as_mut_ptr(), out.len())
        }
    }

    /// Posts a READ of `segs` at `sector` (header and status added); returns the request's
    /// number, for [`RawFrontend::status`].
    pub fn read(&mut self, sector: u64, segs: &[Seg]) -> u16 {
        let status = STATUS + u64::from(self.posted % QUEUE_SIZE);
        self.write_at(status, 0xffu8);
        self.read_with_status(sector, segs, status)
    }

    /// [`RawFrontend::read`] with the status byte at guest address `status` (which this
    /// frontend does not touch: it may lie outside its memory).
    pub fn read_with_status(&mut self, sector: u64, segs: &[Seg], status: u64) -> u16 {
        self.post(VIRTIO_BLK_T_IN, sector, segs, status)
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    /// How many requests the device has completed.
    pub fn used(&self) -> u16 {
        u16::from_le(self.read_at(USED + 2))
    }

    /// The head of request `n`, as the available ring holds it.
    pub fn head(&self, n: u16) -> u16 {
        self.read_u16(AVAIL + 4 + u64::from(n % QUEUE_SIZE) * 2)
    }

    /// The heads in the used ring, in the order the device put them there.
    pub fn used_heads(&self) -> Vec<u16> {
        (0..self.used())
            .map(|i| {
                let id: u32 = self.read_at(USED + 4 + u64::from(i % QUEUE_SIZE) * 8);
                u32::from_le(id) as u16
            })
            .collect()
    }

    /// Waits until `n` requests are complete; false if `timeout` passed first.
    pub fn wait_used(&self, n: u16, timeout: Duration) -> bool {
        let start = Instant::now();
        while self.used() < n {
            if start.elapsed() > timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// The status byte of request `n` (0xff until the device writes it).
    pub fn status(&self, n: u16) -> u8 {
        self.read_at(STATUS + u64::from(n % QUEUE_SIZE))
    }

    /// How many times the device signalled the queue's call eventfd since the last call
    /// (interrupts a guest would have had); 0 if none.
    pub fn take_calls(&self) -> u64 {
        self._call.read().unwrap_or(0)
    }

    /// Whether the device still answers on the socket.
    pub fn alive(&self) -> bool {
        self.frontend.get_features().is_ok()
    }
}

impl Drop for RawFrontend {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `connect`, of `size` bytes.
        unsafe { libc::munmap(self.base.cast(), self.size) };
    }
}
