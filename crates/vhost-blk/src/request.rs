//! Parsing one virtio-blk descriptor chain into a request, without trusting the guest.
//!
//! The chain is read as the spec's byte streams (VIRTIO_F_ANY_LAYOUT): all device-readable
//! descriptors first (header, then write data or discard segments), then the device-writable
//! ones (read data, then the status byte in the last byte of the last descriptor). Every
//! address is translated and bounds-checked here, so the rest of the device only sees host
//! pointers that lie inside guest memory.

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub const SECTOR_SIZE: u64 = 512;
const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 16;
pub const ID_LEN: usize = 20;

/// Status codes as written to the guest.
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What the device accepts; derived from the backend and the disk config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// Logical block size in bytes; I/O must be aligned to it.
    pub block_size: u32,
    pub read_only: bool,
    pub flush: bool,
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
    /// The largest descriptor, where the driver accepted VIRTIO_BLK_F_SIZE_MAX (a driver
    /// that did not, firmware among them, may send one buffer of a whole transfer).
    pub size_max: Option<u32>,
    /// The most data descriptors per request (the header and the status take two more);
    /// `None`: no limit.
    pub seg_max: Option<u32>,
}

impl Limits {
    fn block_sectors(&self) -> u64 {
        u64::from(self.block_size) / SECTOR_SIZE
    }
}

/// A pointer to the guest's status byte, checked to lie in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusByte(*mut u8);

// SAFETY: the pointer refers to shared guest memory whose mapping the request keeps alive; it
// is only written with `write_volatile`.
unsafe impl Send for StatusByte {}

impl StatusByte {
    /// # Safety
    /// The mapping the pointer was taken from must still be alive.
    pub unsafe fn write(self, status: u8) {
        // SAFETY: the caller keeps the mapping alive; the byte was bounds-checked at parse time.
        unsafe { self.0.write_volatile(status) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read { offset: u64 },
    Write { offset: u64 },
    Flush,
    GetId,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64, unmap: bool },
}

/// A request that passed every check.
#[derive(Debug)]
pub struct Request {
    pub kind: RequestKind,
    /// Host segments of the data buffers (read/write data, or the GET_ID buffer).
    pub data: Vec<(*mut u8, usize)>,
    pub data_len: usize,
    pub status: StatusByte,
}

/// A chain the device refuses. If `status` is known, [`Rejected::code`] goes there.
#[derive(Debug)]
pub struct Rejected {
    pub status: Option<StatusByte>,
    pub reason: Reject,
}

impl Rejected {
    /// The status the guest is told: UNSUPP for what the device does not offer, IOERR for
    /// a malformed chain.
    pub fn code(&self) -> u8 {
        match self.reason {
            Reject::NotOffered(_) | Reject::SegmentFlags(_) | Reject::UnknownType(_) => {
                STATUS_UNSUPP
            }
            _ => STATUS_IOERR,
        }
    }
}

/// Why a chain is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Reject {
    #[error("more than {0} descriptors (SEG_MAX, plus header and status)")]
    TooManyDescriptors(u64),
    #[error("descriptor at {addr:#x}+{len} ends past the address space")]
    PastAddressSpace { addr: u64, len: u32 },
    #[error("descriptor of {len} bytes (SIZE_MAX {max})")]
    OverSizeMax { len: u32, max: u32 },
    #[error("status descriptor at {0:#x} wraps")]
    StatusWraps(u64),
    #[error("status descriptor is empty")]
    EmptyStatus,
    #[error("no device-writable status descriptor")]
    NoStatus,
    #[error("{what} at {addr:#x}+{len} lies outside guest memory")]
    OutsideMemory {
        what: &'static str,
        addr: u64,
        len: usize,
    },
    #[error("device-readable descriptor after a device-writable one")]
    Misordered,
    #[error("header is {0} bytes, need {HEADER_LEN}")]
    ShortHeader(usize),
    #[error("{0} bytes of data in the wrong direction")]
    WrongDirection(usize),
    #[error("a write-class request to a read-only disk")]
    ReadOnly,
    #[error("sector {sector} + {len} bytes is not aligned to the {block_size}-byte block size")]
    Unaligned {
        sector: u64,
        len: u64,
        block_size: u32,
    },
    #[error("sector {sector} + {len} bytes is beyond the end of the disk ({capacity} sectors)")]
    BeyondEnd {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("GET_ID buffer is {0} bytes, need {ID_LEN}")]
    ShortIdBuffer(usize),
    #[error("request type {0} not offered")]
    NotOffered(u32),
    #[error("{0} bytes of segments, expected exactly one ({SEGMENT_LEN} bytes)")]
    SegmentCount(usize),
    #[error("segment flags {0:#x} not supported")]
    SegmentFlags(u32),
    #[error("segment of {num} sectors (limit {max})")]
    SegmentSize { num: u32, max: u32 },
    #[error("unknown request type {0}")]
    UnknownType(u32),
}

impl Request {
    /// Bytes the device writes into the chain on success (data read plus the status byte).
    pub fn used_len(&self) -> u32 {
        let data = match self.kind {
            RequestKind::Read { .. } | RequestKind::GetId => self.data_len,
            _ => 0,
        };
        (data + 1) as u32
    }
}

struct Stream {
    ranges: Vec<(GuestAddress, usize)>,
    len: usize,
}

impl Stream {
    fn new() -> Self {
        Stream {
            ranges: Vec::new(),
            len: 0,
        }
    }

    /// The guest ranges covering `[start, start + len)` of the stream.
    fn slice(&self, mut start: usize, mut len: usize) -> Vec<(GuestAddress, usize)> {
        let mut out = Vec::new();
        for &(addr, rlen) in &self.ranges {
            if len == 0 {
                break;
            }
            if start >= rlen {
                start -= rlen;
                continue;
            }
            let take = (rlen - start).min(len);
            out.push((GuestAddress(addr.0 + start as u64), take));
            len -= take;
            start = 0;
        }
        out
    }
}

fn reject(status: Option<StatusByte>, reason: Reject) -> Rejected {
    Rejected { status, reason }
}

/// Host segments for guest ranges (`what` they hold); fails if any byte lies outside guest
/// memory.
fn host_segments<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    ranges: &[(GuestAddress, usize)],
) -> Result<Vec<(*mut u8, usize)>, Reject> {
    let mut out = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        for slice in mem.get_slices(addr, len) {
            let slice = slice.map_err(|_| Reject::OutsideMemory {
                what,
                addr: addr.0,
                len,
            })?;
            out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    Ok(out)
}

fn read_bytes<M: GuestMemoryBackend>(
    mem: &M,
    what: &'static str,
    stream: &Stream,
    start: usize,
    out: &mut [u8],
) -> Result<(), Reject> {
    let mut done = 0;
    for (addr, len) in stream.slice(start, out.len()) {
        mem.read_slice(&mut out[done..done + len], addr)
            .map_err(|_| Reject::OutsideMemory {
                what,
                addr: addr.0,
                len,
            })?;
        done += len;
    }
    Ok(())
}

/// Parses one chain. `descs` is the chain as the queue yields it.
pub fn parse<M: GuestMemoryBackend>(
    mem: &M,
    descs: impl IntoIterator<Item = Descriptor>,
    limits: &Limits,
) -> Result<Request, Rejected> {
    let mut readable = Stream::new();
    let mut writable = Stream::new();
    let mut last_writable: Option<Descriptor> = None;
    let mut misordered = false;
    // The first breach of the negotiated limits or of the address space; refused once the
    // status byte is known.
    let mut breach: Option<Reject> = None;
    for (index, d) in descs.into_iter().enumerate() {
        // Stop reading a chain that is too long already: its segment list is memory.
        if limits
            .seg_max
            .is_some_and(|max| index as u64 >= u64::from(max) + 2)
        {
            let limit = u64::from(limits.seg_max.unwrap_or_default()) + 2;
            return Err(reject(None, Reject::TooManyDescriptors(limit)));
        }
        let len = d.len() as usize;
        if breach.is_none() {
            if d.addr().0.checked_add(u64::from(d.len())).is_none() {
                breach = Some(Reject::PastAddressSpace {
                    addr: d.addr().0,
                    len: d.len(),
                });
            } else if let Some(max) = limits.size_max.filter(|max| d.len() > *max) {
                breach = Some(Reject::OverSizeMax { len: d.len(), max });
            }
        }
        if d.is_write_only() {
            writable.ranges.push((d.addr(), len));
            writable.len += len;
            last_writable = Some(d);
        } else {
            if !writable.ranges.is_empty() {
                misordered = true;
            }
            readable.ranges.push((d.addr(), len));
            readable.len += len;
        }
    }

    // The status byte first: without it the guest cannot be told anything.
    let status = match last_writable {
        Some(d) if d.len() > 0 => {
            let last = d
                .addr()
                .0
                .checked_add(u64::from(d.len()) - 1)
                .ok_or_else(|| reject(None, Reject::StatusWraps(d.addr().0)))?;
            let seg = host_segments(mem, "status byte", &[(GuestAddress(last), 1)])
                .map_err(|e| reject(None, e))?;
            StatusByte(seg[0].0)
        }
        Some(_) => return Err(reject(None, Reject::EmptyStatus)),
        None => return Err(reject(None, Reject::NoStatus)),
    };
    // Without the status byte, the writable stream is the request's read buffer.
    writable.len -= 1;
    if let Some(last) = writable.ranges.last_mut() {
        last.1 -= 1;
    }

    let fail = |reason: Reject| reject(Some(status), reason);
    if let Some(breach) = breach {
        return Err(fail(breach));
    }
    if misordered {
        return Err(fail(Reject::Misordered));
    }
    if readable.len < HEADER_LEN {
        return Err(fail(Reject::ShortHeader(readable.len)));
    }
    let mut header = [0u8; HEADER_LEN];
    read_bytes(mem, "header", &readable, 0, &mut header).map_err(fail)?;
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());

    let data_out = readable.len - HEADER_LEN;
    let kind = match req_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = req_type == VIRTIO_BLK_T_OUT;
            let (len, other) = if write {
                (data_out, writable.len)
            } else {
                (writable.len, data_out)
            };
            if other != 0 {
                return Err(fail(Reject::WrongDirection(other)));
            }
            if write && limits.read_only {
                return Err(fail(Reject::ReadOnly));
            }
            check_range(limits, sector, len as u64).map_err(fail)?;
            let offset = sector * SECTOR_SIZE;
            if write {
                RequestKind::Write { offset }
            } else {
                RequestKind::Read { offset }
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if !limits.flush {
                return Err(fail(Reject::NotOffered(req_type)));
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if writable.len < ID_LEN {
                return Err(fail(Reject::ShortIdBuffer(writable.len)));
            }
            writable.ranges = writable.slice(0, ID_LEN);
            writable.len = ID_LEN;
            RequestKind::GetId
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            let (offered, max) = if discard {
                (limits.discard, limits.max_discard_sectors)
            } else {
                (limits.write_zeroes, limits.max_write_zeroes_sectors)
            };
            if !offered {
                return Err(fail(Reject::NotOffered(req_type)));
            }
            if limits.read_only {
                return Err(fail(Reject::ReadOnly));
            }
            // We advertise one segment per request (max_*_seg = 1).
            if data_out != SEGMENT_LEN {
                return Err(fail(Reject::SegmentCount(data_out)));
            }
            let mut seg = [0u8; SEGMENT_LEN];
            read_bytes(mem, "segment", &readable, HEADER_LEN, &mut seg).map_err(fail)?;
            let seg_sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let num = u32::from_le_bytes(seg[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(fail(Reject::SegmentFlags(flags)));
            }
            if num == 0 || num > max {
                return Err(fail(Reject::SegmentSize { num, max }));
            }
            let len = u64::from(num) * SECTOR_SIZE;
            check_range(limits, seg_sector, len).map_err(fail)?;
            let offset = seg_sector * SECTOR_SIZE;
            if discard {
                RequestKind::Discard { offset, len }
            } else {
                RequestKind::WriteZeroes {
                    offset,
                    len,
                    unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                }
            }
        }
        other => return Err(fail(Reject::UnknownType(other))),
    };

    let data_stream = match kind {
        RequestKind::Write { .. } => {
            let ranges = readable.slice(HEADER_LEN, data_out);
            Stream {
                ranges,
                len: data_out,
            }
        }
        RequestKind::Read { .. } | RequestKind::GetId => writable,
        _ => Stream::new(),
    };
    let data = host_segments(mem, "buffer", &data_stream.ranges).map_err(fail)?;
    Ok(Request {
        kind,
        data,
        data_len: data_stream.len,
        status,
    })
}

fn check_range(limits: &Limits, sector: u64, len: u64) -> Result<(), Reject> {
    let block = limits.block_sectors();
    if !len.is_multiple_of(u64::from(limits.block_size)) || !sector.is_multiple_of(block) {
        return Err(Reject::Unaligned {
            sector,
            len,
            block_size: limits.block_size,
        });
    }
    let end = sector.checked_add(len / SECTOR_SIZE);
    match end {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(Reject::BeyondEnd {
            sector,
            len,
            capacity: limits.capacity_sectors,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::GuestMemoryMmap;

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x8000;
    const OUTSIDE: u64 = 0x10_0000_0000;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            capacity_sectors: 2048,
            block_size: 512,
            read_only: false,
            flush: true,
            discard: true,
            write_zeroes: true,
            max_discard_sectors: 1024,
            max_write_zeroes_sectors: 1024,
            size_max: None,
            seg_max: None,
        }
    }

    fn header(mem: &GuestMemoryMmap<()>, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn segment(mem: &GuestMemoryMmap<()>, sector: u64, num: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&s, GuestAddress(DATA)).unwrap();
    }

    fn r(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_NEXT as u16, 0)
    }

    fn w(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(
            addr,
            len,
            (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16,
            0,
        )
    }

    fn rejected(mem: &GuestMemoryMmap<()>, chain: Vec<Descriptor>, l: &Limits) -> Rejected {
        parse(mem, chain, l).expect_err("chain must be refused")
    }

    #[test]
    fn read_write_and_get_id_parse() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let req = parse(&m, vec![r(HDR, 16), w(DATA, 4096), w(STATUS, 1)], &limits()).unwrap();
        assert_eq!(req.kind, RequestKind::Read { offset: 8 * 512 });
        assert_eq!((req.data_len, req.used_len()), (4096, 4097));

        header(&m, VIRTIO_BLK_T_OUT, 0);
        let req = parse(&m, vec![r(HDR, 16), r(DATA, 1024), w(STATUS, 1)], &limits()).unwrap();
        assert_eq!(req.kind, RequestKind::Write { offset: 0 });
        assert_eq!((req.data_len, req.used_len()), (1024, 1));

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse(&m, vec![r(HDR, 16), w(DATA, 20), w(STATUS, 1)], &limits()).unwrap();
        assert_eq!((req.kind, req.data_len), (RequestKind::GetId, 20));
    }

    #[test]
    fn any_layout_is_accepted() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 1);
        // Header split over two descriptors; status in the same descriptor as the data.
        let req = parse(
            &m,
            vec![r(HDR, 10), r(HDR + 10, 6), w(DATA, 513)],
            &limits(),
        )
        .unwrap();
        assert_eq!(
            (req.kind, req.data_len),
            (RequestKind::Read { offset: 512 }, 512)
        );
    }

    #[test]
    fn chain_without_status_cannot_be_answered() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = rejected(&m, vec![r(HDR, 16)], &limits());
        assert!(e.status.is_none() && e.reason == Reject::NoStatus, "{e:?}");
        let e = rejected(&m, vec![r(HDR, 16), w(STATUS, 0)], &limits());
        assert!(
            e.status.is_none() && e.reason == Reject::EmptyStatus,
            "{e:?}"
        );
        let e = rejected(&m, vec![r(HDR, 16), w(OUTSIDE, 1)], &limits());
        assert!(
            e.status.is_none()
                && matches!(
                    e.reason,
                    Reject::OutsideMemory {
                        what: "status byte",
                        ..
                    }
                ),
            "{e:?}"
        );
    }

    #[test]
    fn malformed_chains_get_ioerr() {
        let m = mem();
        let l = limits();
        let ioerr = |chain: Vec<Descriptor>, l: &Limits| {
            let e = rejected(&m, chain, l);
            assert_eq!(e.code(), STATUS_IOERR, "{e:?}");
            assert!(e.status.is_some(), "{e:?}");
            e.reason
        };
        header(&m, VIRTIO_BLK_T_IN, 0);
        let e = ioerr(vec![r(HDR, 8), w(STATUS, 1)], &l);
        assert_eq!(e, Reject::ShortHeader(8));
        let e = ioerr(vec![w(DATA, 512), r(HDR, 16), w(STATUS, 1)], &l);
        assert_eq!(e, Reject::Misordered);
        let e = ioerr(vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &l);
        assert_eq!(e, Reject::WrongDirection(512));
        let e = ioerr(vec![r(HDR, 16), w(OUTSIDE, 512), w(STATUS, 1)], &l);
        assert!(
            matches!(e, Reject::OutsideMemory { what: "buffer", .. }),
            "{e:?}"
        );
        let e = ioerr(vec![r(OUTSIDE, 16), w(STATUS, 1)], &l);
        assert!(
            matches!(e, Reject::OutsideMemory { what: "header", .. }),
            "{e:?}"
        );
        let e = ioerr(vec![r(HDR, 16), w(DATA, 100), w(STATUS, 1)], &l);
        assert!(matches!(e, Reject::Unaligned { len: 100, .. }), "{e:?}");

        header(&m, VIRTIO_BLK_T_IN, 2047);
        let e = ioerr(vec![r(HDR, 16), w(DATA, 1024), w(STATUS, 1)], &l);
        assert!(matches!(e, Reject::BeyondEnd { sector: 2047, .. }), "{e:?}");
        header(&m, VIRTIO_BLK_T_IN, u64::MAX);
        let e = ioerr(vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &l);
        assert!(matches!(e, Reject::BeyondEnd { .. }), "{e:?}");

        header(&m, VIRTIO_BLK_T_OUT, 0);
        let ro = Limits {
            read_only: true,
            ..l
        };
        let e = ioerr(vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &ro);
        assert_eq!(e, Reject::ReadOnly);

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let e = ioerr(vec![r(HDR, 16), w(DATA, 10), w(STATUS, 1)], &l);
        assert_eq!(e, Reject::ShortIdBuffer(10));
    }

    #[test]
    fn discard_and_write_zeroes_are_checked() {
        let m = mem();
        let l = limits();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        segment(&m, 8, 16, 0);
        let req = parse(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &l).unwrap();
        assert_eq!(
            req.kind,
            RequestKind::Discard {
                offset: 4096,
                len: 8192
            }
        );

        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&m, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let req = parse(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &l).unwrap();
        assert_eq!(
            req.kind,
            RequestKind::WriteZeroes {
                offset: 0,
                len: 4096,
                unmap: true
            }
        );

        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        segment(&m, 0, 2048, 0);
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &l);
        assert_eq!(e.code(), STATUS_IOERR);
        assert_eq!(
            e.reason,
            Reject::SegmentSize {
                num: 2048,
                max: 1024
            }
        );
        segment(&m, 0, 8, 1);
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &l);
        assert_eq!(e.code(), STATUS_UNSUPP);
        assert_eq!(e.reason, Reject::SegmentFlags(1));
        segment(&m, 0, 8, 0);
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 32), w(STATUS, 1)], &l);
        assert_eq!(e.code(), STATUS_IOERR);
        assert_eq!(e.reason, Reject::SegmentCount(32));
        segment(&m, 2040, 16, 0);
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &l);
        assert!(
            matches!(e.reason, Reject::BeyondEnd { sector: 2040, .. }),
            "{e:?}"
        );
        let big_blocks = Limits {
            block_size: 4096,
            ..l
        };
        segment(&m, 1, 8, 0);
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &big_blocks);
        assert!(
            matches!(e.reason, Reject::Unaligned { sector: 1, .. }),
            "{e:?}"
        );
        let no_discard = Limits {
            discard: false,
            ..l
        };
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &no_discard);
        assert_eq!(e.code(), STATUS_UNSUPP);
        assert_eq!(e.reason, Reject::NotOffered(VIRTIO_BLK_T_DISCARD));
    }

    #[test]
    fn negotiated_segment_limits_are_enforced() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let chain = || vec![r(HDR, 16), w(DATA, 8192), w(STATUS, 1)];
        // Not negotiated (firmware): one buffer of any size is fine.
        assert!(parse(&m, chain(), &limits()).is_ok());
        let l = Limits {
            size_max: Some(4096),
            seg_max: Some(2),
            ..limits()
        };
        let e = rejected(&m, chain(), &l);
        assert_eq!(e.code(), STATUS_IOERR);
        assert!(e.status.is_some(), "{e:?}");
        assert_eq!(
            e.reason,
            Reject::OverSizeMax {
                len: 8192,
                max: 4096
            }
        );
        let two = vec![
            r(HDR, 16),
            w(DATA, 4096),
            w(DATA + 4096, 4096),
            w(STATUS, 1),
        ];
        assert!(parse(&m, two, &l).is_ok());
        let three = vec![
            r(HDR, 16),
            w(DATA, 1024),
            w(DATA + 1024, 1024),
            w(DATA + 2048, 2048),
            w(STATUS, 1),
        ];
        let e = rejected(&m, three, &l);
        assert_eq!(e.reason, Reject::TooManyDescriptors(4));
    }

    #[test]
    fn descriptors_ending_past_the_address_space_are_refused() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        // A data buffer ending exactly at 2^64.
        let e = rejected(
            &m,
            vec![r(HDR, 16), w(u64::MAX - 4095, 4096), w(STATUS, 1)],
            &limits(),
        );
        assert!(e.status.is_some(), "{e:?}");
        assert!(matches!(e.reason, Reject::PastAddressSpace { .. }), "{e:?}");
        // A status descriptor that wraps: its last byte would be at a low address (which is
        // guest memory here).
        let e = rejected(&m, vec![r(HDR, 16), w(u64::MAX, 2)], &limits());
        assert!(e.status.is_none(), "{e:?}");
        assert_eq!(e.reason, Reject::StatusWraps(u64::MAX));
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let m = mem();
        for t in [2, 5, 14, 99, u32::MAX] {
            header(&m, t, 0);
            let e = rejected(&m, vec![r(HDR, 16), w(STATUS, 1)], &limits());
            assert_eq!(e.code(), STATUS_UNSUPP, "type {t}: {e:?}");
            assert_eq!(e.reason, Reject::UnknownType(t));
        }
    }
}
