//! Fuzzes the virtio-blk chain parser with arbitrary descriptors over arbitrary guest memory.
//! Input: [descriptor count][limits bits][capacity][count x (addr u32, len u32, flags u8)]
//! then the bytes of guest memory. Invariants checked on every accepted request: its data lies
//! inside guest memory, its length is what the chain says, and its range is inside the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinpath_vhost_blk::request::{parse, Limits, RequestKind, SECTOR_SIZE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const REGIONS: [(u64, usize); 2] = [(0, 0x4000), (0x8000, 0x2000)];

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let (count, bits, capacity) = (data[0] as usize % 16, data[1], u64::from(data[2]) * 8);
    let mut rest = &data[3..];
    let mut descs = Vec::new();
    for _ in 0..count {
        if rest.len() < 9 {
            break;
        }
        let addr = u32::from_le_bytes(rest[0..4].try_into().unwrap()) as u64;
        let len = u32::from_le_bytes(rest[4..8].try_into().unwrap()) % 0x6000;
        let flags = u16::from(rest[8] & 0x3);
        // Mostly inside memory, sometimes far outside, sometimes straddling the gap.
        let addr = if bits & 0x80 != 0 {
            addr
        } else {
            addr % 0xa000
        };
        descs.push(Descriptor::new(addr, len, flags, 0));
        rest = &rest[9..];
    }
    let mem: GuestMemoryMmap<()> =
        GuestMemoryMmap::from_ranges(&REGIONS.map(|(a, l)| (GuestAddress(a), l))).unwrap();
    let n = rest.len().min(0x4000);
    mem.write_slice(&rest[..n], GuestAddress(0)).unwrap();
    let limits = Limits {
        capacity_sectors: capacity,
        block_size: if bits & 1 != 0 { 4096 } else { 512 },
        read_only: bits & 2 != 0,
        flush: bits & 4 != 0,
        discard: bits & 8 != 0,
        write_zeroes: bits & 16 != 0,
        max_discard_sectors: 64,
        max_write_zeroes_sectors: 64,
        size_max: (bits & 32 != 0).then_some(4096),
        seg_max: (bits & 64 != 0).then_some(4),
    };
    let Ok(req) = parse(&mem, descs, &limits) else {
        return;
    };

    let total: usize = req.data.iter().map(|&(_, l)| l).sum();
    assert_eq!(total, req.data_len);
    if let Some(max) = limits.size_max {
        assert!(
            req.data.iter().all(|&(_, l)| l <= max as usize),
            "segment over SIZE_MAX"
        );
    }
    for &(ptr, len) in &req.data {
        let inside = REGIONS.iter().any(|&(a, l)| {
            let host = mem.get_host_address(GuestAddress(a)).unwrap() as usize;
            ptr as usize >= host && ptr as usize + len <= host + l
        });
        assert!(inside, "segment outside guest memory");
    }
    let end = |offset: u64, len: u64| (offset + len).div_ceil(SECTOR_SIZE);
    match req.kind {
        RequestKind::Read { offset } | RequestKind::Write { offset } => {
            assert!(end(offset, req.data_len as u64) <= capacity);
            assert!(!(limits.read_only && matches!(req.kind, RequestKind::Write { .. })));
        }
        RequestKind::Discard { offset, len } | RequestKind::WriteZeroes { offset, len, .. } => {
            assert!(end(offset, len) <= capacity && !limits.read_only);
        }
        RequestKind::Flush | RequestKind::GetId => {}
    }
});
