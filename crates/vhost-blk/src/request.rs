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

/// A chain the device refuses. If `status` is known, `code` goes there.
#[derive(Debug)]
pub struct Rejected {
    pub status: Option<StatusByte>,
    pub code: u8,
    pub reason: String,
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

fn reject(status: Option<StatusByte>, code: u8, reason: impl Into<String>) -> Rejected {
    Rejected {
        status,
        code,
        reason: reason.into(),
    }
}

/// Host segments for guest ranges; fails if any byte lies outside guest memory.
fn host_segments<M: GuestMemoryBackend>(
    mem: &M,
    ranges: &[(GuestAddress, usize)],
) -> Result<Vec<(*mut u8, usize)>, String> {
    let mut out = Vec::with_capacity(ranges.len());
    for &(addr, len) in ranges {
        for slice in mem.get_slices(addr, len) {
            let slice = slice.map_err(|e| format!("buffer at {:#x}+{len}: {e}", addr.0))?;
            out.push((slice.ptr_guard_mut().as_ptr(), slice.len()));
        }
    }
    Ok(out)
}

fn read_bytes<M: GuestMemoryBackend>(
    mem: &M,
    stream: &Stream,
    start: usize,
    out: &mut [u8],
) -> Result<(), String> {
    let mut done = 0;
    for (addr, len) in stream.slice(start, out.len()) {
        mem.read_slice(&mut out[done..done + len], addr)
            .map_err(|e| format!("read at {:#x}: {e}", addr.0))?;
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
    let mut breach: Option<String> = None;
    for (index, d) in descs.into_iter().enumerate() {
        // Stop reading a chain that is too long already: its segment list is memory.
        if limits
            .seg_max
            .is_some_and(|max| index as u64 >= u64::from(max) + 2)
        {
            return Err(reject(
                None,
                STATUS_IOERR,
                format!(
                    "more than {} descriptors (SEG_MAX, plus header and status)",
                    limits.seg_max.unwrap_or_default().saturating_add(2)
                ),
            ));
        }
        let len = d.len() as usize;
        if breach.is_none() {
            if d.addr().0.checked_add(u64::from(d.len())).is_none() {
                breach = Some(format!(
                    "descriptor at {:#x}+{} ends past the address space",
                    d.addr().0,
                    d.len()
                ));
            } else if limits.size_max.is_some_and(|max| d.len() > max) {
                breach = Some(format!(
                    "descriptor of {} bytes (SIZE_MAX {})",
                    d.len(),
                    limits.size_max.unwrap_or_default()
                ));
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
                .ok_or_else(|| {
                    reject(
                        None,
                        STATUS_IOERR,
                        format!("status descriptor at {:#x} wraps", d.addr().0),
                    )
                })?;
            let seg = host_segments(mem, &[(GuestAddress(last), 1)])
                .map_err(|e| reject(None, STATUS_IOERR, format!("status byte: {e}")))?;
            StatusByte(seg[0].0)
        }
        Some(_) => return Err(reject(None, STATUS_IOERR, "status descriptor is empty")),
        None => {
            return Err(reject(
                None,
                STATUS_IOERR,
                "no device-writable status descriptor",
            ))
        }
    };
    // Without the status byte, the writable stream is the request's read buffer.
    writable.len -= 1;
    if let Some(last) = writable.ranges.last_mut() {
        last.1 -= 1;
    }

    let fail = |code: u8, reason: String| reject(Some(status), code, reason);
    if let Some(breach) = breach {
        return Err(fail(STATUS_IOERR, breach));
    }
    if misordered {
        return Err(fail(
            STATUS_IOERR,
            "device-readable descriptor after a device-writable one".into(),
        ));
    }
    if readable.len < HEADER_LEN {
        return Err(fail(
            STATUS_IOERR,
            format!("header is {} bytes, need {HEADER_LEN}", readable.len),
        ));
    }
    let mut header = [0u8; HEADER_LEN];
    read_bytes(mem, &readable, 0, &mut header)
        .map_err(|e| fail(STATUS_IOERR, format!("header: {e}")))?;
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
                return Err(fail(
                    STATUS_IOERR,
                    format!("{} bytes of data in the wrong direction", other),
                ));
            }
            if write && limits.read_only {
                return Err(fail(STATUS_IOERR, "write to a read-only disk".into()));
            }
            check_range(limits, sector, len as u64).map_err(|r| fail(STATUS_IOERR, r))?;
            let offset = sector * SECTOR_SIZE;
            if write {
                RequestKind::Write { offset }
            } else {
                RequestKind::Read { offset }
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            if !limits.flush {
                return Err(fail(STATUS_UNSUPP, "flush not offered".into()));
            }
            RequestKind::Flush
        }
        VIRTIO_BLK_T_GET_ID => {
            if writable.len < ID_LEN {
                return Err(fail(
                    STATUS_IOERR,
                    format!("GET_ID buffer is {} bytes, need {ID_LEN}", writable.len),
                ));
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
                return Err(fail(
                    STATUS_UNSUPP,
                    format!("request type {req_type} not offered"),
                ));
            }
            if limits.read_only {
                return Err(fail(
                    STATUS_IOERR,
                    "discard/write-zeroes on a read-only disk".into(),
                ));
            }
            // We advertise one segment per request (max_*_seg = 1).
            if data_out != SEGMENT_LEN {
                return Err(fail(
                    STATUS_IOERR,
                    format!(
                        "{data_out} bytes of segments, expected exactly one ({SEGMENT_LEN} bytes)"
                    ),
                ));
            }
            let mut seg = [0u8; SEGMENT_LEN];
            read_bytes(mem, &readable, HEADER_LEN, &mut seg)
                .map_err(|e| fail(STATUS_IOERR, format!("segment: {e}")))?;
            let seg_sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let num = u32::from_le_bytes(seg[8..12].try_into().unwrap());
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
            let allowed = if discard {
                0
            } else {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            };
            if flags & !allowed != 0 {
                return Err(fail(
                    STATUS_UNSUPP,
                    format!("segment flags {flags:#x} not supported"),
                ));
            }
            if num == 0 || num > max {
                return Err(fail(
                    STATUS_IOERR,
                    format!("segment of {num} sectors (limit {max})"),
                ));
            }
            let len = u64::from(num) * SECTOR_SIZE;
            check_range(limits, seg_sector, len).map_err(|r| fail(STATUS_IOERR, r))?;
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
        other => return Err(fail(STATUS_UNSUPP, format!("unknown request type {other}"))),
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
    let data = host_segments(mem, &data_stream.ranges).map_err(|e| fail(STATUS_IOERR, e))?;
    Ok(Request {
        kind,
        data,
        data_len: data_stream.len,
        status,
    })
}

fn check_range(limits: &Limits, sector: u64, len: u64) -> Result<(), String> {
    let block = limits.block_sectors();
    if !len.is_multiple_of(u64::from(limits.block_size)) || !sector.is_multiple_of(block) {
        return Err(format!(
            "sector {sector} + {len} bytes is not aligned to the {}-byte block size",
            limits.block_size
        ));
    }
    let end = sector.checked_add(len / SECTOR_SIZE);
    match end {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(format!(
            "sector {sector} + {len} bytes is beyond the end of the disk ({} sectors)",
            limits.capacity_sectors
        )),
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
        assert!(
            e.status.is_none() && e.reason.contains("no device-writable"),
            "{e:?}"
        );
        let e = rejected(&m, vec![r(HDR, 16), w(STATUS, 0)], &limits());
        assert!(e.status.is_none() && e.reason.contains("empty"), "{e:?}");
        let e = rejected(&m, vec![r(HDR, 16), w(OUTSIDE, 1)], &limits());
        assert!(
            e.status.is_none() && e.reason.contains("status byte"),
            "{e:?}"
        );
    }

    #[test]
    fn malformed_chains_get_ioerr() {
        let m = mem();
        let l = limits();
        let ioerr = |e: Rejected| {
            assert_eq!(e.code, STATUS_IOERR, "{e:?}");
            assert!(e.status.is_some(), "{e:?}");
            e.reason
        };
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert!(
            ioerr(rejected(&m, vec![r(HDR, 8), w(STATUS, 1)], &l)).contains("header is 8 bytes")
        );
        assert!(ioerr(rejected(
            &m,
            vec![w(DATA, 512), r(HDR, 16), w(STATUS, 1)],
            &l
        ))
        .contains("after a device-writable"));
        assert!(ioerr(rejected(
            &m,
            vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
            &l
        ))
        .contains("wrong direction"));
        assert!(ioerr(rejected(
            &m,
            vec![r(HDR, 16), w(OUTSIDE, 512), w(STATUS, 1)],
            &l
        ))
        .contains("buffer at"));
        assert!(ioerr(rejected(&m, vec![r(OUTSIDE, 16), w(STATUS, 1)], &l)).contains("header"));
        assert!(ioerr(rejected(
            &m,
            vec![r(HDR, 16), w(DATA, 100), w(STATUS, 1)],
            &l
        ))
        .contains("not aligned"));

        header(&m, VIRTIO_BLK_T_IN, 2047);
        assert!(ioerr(rejected(
            &m,
            vec![r(HDR, 16), w(DATA, 1024), w(STATUS, 1)],
            &l
        ))
        .contains("beyond the end"));
        header(&m, VIRTIO_BLK_T_IN, u64::MAX);
        assert!(ioerr(rejected(
            &m,
            vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)],
            &l
        ))
        .contains("beyond the end"));

        header(&m, VIRTIO_BLK_T_OUT, 0);
        let ro = Limits {
            read_only: true,
            ..l
        };
        assert!(ioerr(rejected(
            &m,
            vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)],
            &ro
        ))
        .contains("read-only"));

        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        assert!(ioerr(rejected(
            &m,
            vec![r(HDR, 16), w(DATA, 10), w(STATUS, 1)],
            &l
        ))
        .contains("GET_ID"));
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
        assert!(
            e.code == STATUS_IOERR && e.reason.contains("limit"),
            "{e:?}"
        );
        segment(&m, 0, 8, 1);
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &l);
        assert!(
            e.code == STATUS_UNSUPP && e.reason.contains("flags"),
            "{e:?}"
        );
        segment(&m, 0, 8, 0);
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 32), w(STATUS, 1)], &l);
        assert!(
            e.code == STATUS_IOERR && e.reason.contains("exactly one"),
            "{e:?}"
        );
        segment(&m, 2040, 16, 0);
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &l);
        assert!(e.reason.contains("beyond the end"), "{e:?}");
        let big_blocks = Limits {
            block_size: 4096,
            ..l
        };
        segment(&m, 1, 8, 0);
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &big_blocks);
        assert!(e.reason.contains("not aligned"), "{e:?}");
        let no_discard = Limits {
            discard: false,
            ..l
        };
        let e = rejected(&m, vec![r(HDR, 16), r(DATA, 16), w(STATUS, 1)], &no_discard);
        assert_eq!(e.code, STATUS_UNSUPP);
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
        assert_eq!(e.code, STATUS_IOERR);
        assert!(e.status.is_some() && e.reason.contains("SIZE_MAX"), "{e:?}");
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
        assert!(e.reason.contains("SEG_MAX"), "{e:?}");
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
        assert!(
            e.status.is_some() && e.reason.contains("address space"),
            "{e:?}"
        );
        // A status descriptor that wraps: its last byte would be at a low address (which is
        // guest memory here).
        let e = rejected(&m, vec![r(HDR, 16), w(u64::MAX, 2)], &limits());
        assert!(e.status.is_none() && e.reason.contains("wraps"), "{e:?}");
    }

    #[test]
    fn unknown_types_are_unsupported() {
        let m = mem();
        for t in [2, 5, 14, 99, u32::MAX] {
            header(&m, t, 0);
            let e = rejected(&m, vec![r(HDR, 16), w(STATUS, 1)], &limits());
            assert_eq!(e.code, STATUS_UNSUPP, "type {t}: {e:?}");
        }
    }
}
