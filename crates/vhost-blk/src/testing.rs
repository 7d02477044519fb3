//! A virtqueue rig (feature `test-util`): one device queue in front of a
//! [`MemBackend`], fed chains through virtio-queue's mock split queue and driven by calling
//! the worker's event handler directly, so a test sees exactly what one pass of the queue
//! worker does (what reached the backend, the status bytes, the used ring) without a
//! frontend, a socket or threads.

use std::sync::Arc;

use twinpath_core::testing::MemBackend;
use twinpath_core::{CacheMode, DiskInfo};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::device::BlkDevice;
use crate::{Disk, DiskSettings};

/// Entries of the rig's queue.
pub const QUEUE_SIZE: u16 = 64;
/// The used ring: virtio-queue's mock puts it `size` bytes after the available ring, which
/// is longer than that.
pub const USED_RING: u64 = 0x8000;
const STATUS_BASE: u64 = 0x20000;
const HDR_BASE: u64 = 0x30000;
const DATA_BASE: u64 = 0x40000;
/// The rig's guest memory, and its disk's size.
const MEMORY: usize = 0x100000;

pub struct Rig {
    pub mem: GuestMemoryMmap<()>,
    pub vq: MockSplitQueue<'static, GuestMemoryMmap<()>>,
    pub vring: VringRwLock,
    pub device: BlkDevice,
    pub backend: Arc<MemBackend>,
    next_desc: u16,
}

/// How the rig's disk is set up.
#[derive(Debug, Clone, Copy)]
pub struct RigOptions {
    pub read_only: bool,
    pub max_inflight_bytes: u32,
    /// Whether the backend has a volatile cache (then the device offers FLUSH).
    pub volatile_cache: bool,
}

impl Default for RigOptions {
    fn default() -> Self {
        RigOptions {
            read_only: false,
            max_inflight_bytes: 64 << 20,
            volatile_cache: true,
        }
    }
}

impl Rig {
    pub fn new(options: RigOptions) -> Rig {
        let mem: GuestMemoryMmap<()> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
        // The mock borrows the memory for its lifetime; leak a clone (regions are shared).
        let leaked: &'static GuestMemoryMmap<()> = Box::leak(Box::new(mem.clone()));
        let vq = MockSplitQueue::create(leaked, GuestAddress(0), QUEUE_SIZE);
        let vring = VringRwLock::new(GuestMemoryAtomic::new(mem.clone()), QUEUE_SIZE).unwrap();
        vring.set_queue_size(QUEUE_SIZE);
        vring
            .set_queue_info(vq.desc_table_addr().0, vq.avail_addr().0, USED_RING)
            .unwrap();
        vring.set_queue_ready(true);
        vring.set_enabled(true);
        let backend = Arc::new(MemBackend::new(DiskInfo {
            volatile_cache: options.volatile_cache,
            ..DiskInfo::new(MEMORY as u64)
        }));
        let settings = DiskSettings {
            name: "t".into(),
            num_queues: 1,
            read_only: options.read_only,
            serial: Some("serial-1".into()),
            cache: CacheMode::Writeback,
            poll_us: 0,
            max_inflight_bytes: options.max_inflight_bytes,
        };
        let disk = Arc::new(Disk::new(settings, backend.clone()));
        let device = BlkDevice::new(disk).unwrap();
        device
            .update_memory(GuestMemoryAtomic::new(mem.clone()))
            .unwrap();
        Rig {
            mem,
            vq,
            vring,
            device,
            backend,
            next_desc: 0,
        }
    }

    /// Makes available a request of `req_type` at `sector` with one data buffer of
    /// `(length, device writes it)`; returns its status byte's address (preset to 0xff).
    pub fn push(&mut self, req_type: u32, sector: u64, data: Option<(u32, bool)>) -> GuestAddress {
        let n = u64::from(self.next_desc);
        let hdr = GuestAddress(HDR_BASE + n * 16);
        let status = GuestAddress(STATUS_BASE + n);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, hdr).unwrap();
        self.mem.write_obj(0xffu8, status).unwrap();
        let first = self.next_desc;
        let next = VRING_DESC_F_NEXT as u16;
        let mut descs = vec![RawDescriptor::from(Descriptor::new(
            hdr.0,
            16,
            next,
            first + 1,
        ))];
        if let Some((len, device_writes)) = data {
            let flags = next
                | if device_writes {
                    VRING_DESC_F_WRITE as u16
                } else {
                    0
                };
            let d = Descriptor::new(DATA_BASE + n * 0x1000, len, flags, first + 2);
            descs.push(RawDescriptor::from(d));
        }
        descs.push(RawDescriptor::from(Descriptor::new(
            status.0,
            1,
            VRING_DESC_F_WRITE as u16,
            0,
        )));
        self.vq.add_desc_chains(&descs, self.next_desc).unwrap();
        self.next_desc += descs.len() as u16;
        status
    }

    /// The data buffer of the request whose first descriptor is `index`.
    pub fn data_addr(&self, index: u64) -> GuestAddress {
        GuestAddress(DATA_BASE + index * 0x1000)
    }

    /// What the worker does on a kick.
    pub fn kick(&self) {
        self.device
            .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    /// What the worker does when its completion eventfd fires.
    pub fn completion(&self) {
        let id = self.device.completion_event_id() as u16;
        self.device
            .handle_event(id, EventSet::IN, std::slice::from_ref(&self.vring), 0)
            .unwrap();
    }

    /// The heads in the used ring, in order (the last [`QUEUE_SIZE`] once it wrapped).
    pub fn used(&self) -> Vec<u32> {
        let n: u16 = self.mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
        (0..n)
            .map(|i| {
                let at = USED_RING + 4 + u64::from(i % QUEUE_SIZE) * 8;
                self.mem.read_obj(GuestAddress(at)).unwrap()
            })
            .collect()
    }

    pub fn status(&self, addr: GuestAddress) -> u8 {
        self.mem.read_obj(addr).unwrap()
    }
}
