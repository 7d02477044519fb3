//! A small vhost-user-blk client on the `blkio` crate (libblkio in Rust): what tests, the
//! `twinpath bench` command and the demo use to talk to a disk socket the way a guest would.
//!
//! Every buffer lives in one shared memory region that the device maps; requests address it
//! by offset.

use std::fmt;
use std::mem::MaybeUninit;
use std::path::Path;

use blkio::{iovec, Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// How long a call waits for the device's next completion: a device that stops completing
/// fails the call instead of hanging its caller (a test, the demo).
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A failed client call: the operation and the errno/message libblkio or the device gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub op: String,
    /// Negative errno from the completion, or from libblkio.
    pub errno: i32,
    pub message: String,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} (errno {})", self.op, self.message, -self.errno)
    }
}

impl std::error::Error for ClientError {}

pub type Result<T> = std::result::Result<T, ClientError>;

fn blkio_err(op: &str) -> impl FnOnce(blkio::Error) -> ClientError + '_ {
    move |e| ClientError {
        op: op.to_owned(),
        errno: -e.errno().raw_os_error(),
        message: e.message().to_owned(),
    }
}

#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub num_queues: usize,
    pub read_only: bool,
    /// Size of the shared buffer region in bytes (rounded up to the alignment).
    pub buffer_size: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            num_queues: 1,
            read_only: false,
            buffer_size: 4 << 20,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes { unmap: bool },
}

/// One request of a batch: `len` bytes at disk `offset`, data at `buf_offset` of the region.
#[derive(Debug, Clone, Copy)]
pub struct Req {
    pub op: Op,
    pub offset: u64,
    pub len: usize,
    pub buf_offset: usize,
}

pub struct Client {
    // Queues must go before the instance that owns the memory region (drop order).
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
    capacity: u64,
    /// The device's largest segment (SIZE_MAX; `usize::MAX` if it gives none): longer
    /// buffers go as several segments, as a guest driver sends them.
    max_segment: usize,
    /// The segment lists of the requests submitted last: libblkio reads them when it hands
    /// the requests to the device, which may be after `submit` returns.
    iovecs: Vec<Segments>,
}

/// A request's segment list, pointing into the client's own buffer region.
struct Segments {
    _held: Vec<iovec>,
}

// SAFETY: the pointers refer to the region the `Client` owns and moves with it; nothing here
// dereferences them (libblkio does, on the thread that drives the queue).
unsafe impl Send for Segments {}

impl Client {
    pub fn connect(socket: &Path, opts: &ClientOptions) -> Result<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("create"))?;
        b.set_str("path", &socket.to_string_lossy())
            .map_err(blkio_err("set path"))?;
        b.set_bool("read-only", opts.read_only)
            .map_err(blkio_err("set read-only"))?;
        b.connect().map_err(blkio_err("connect"))?;
        b.set_i32("num-queues", opts.num_queues as i32)
            .map_err(blkio_err("set num-queues"))?;
        let align = b
            .get_u64("mem-region-alignment")
            .map_err(blkio_err("mem-region-alignment"))? as usize;
        let size = opts.buffer_size.div_ceil(align) * align;
        let region = b
            .alloc_mem_region(size)
            .map_err(blkio_err("alloc region"))?;
        let started = b.start().map_err(blkio_err("start"))?;
        b.map_mem_region(&region).map_err(blkio_err("map region"))?;
        let capacity = b.get_u64("capacity").map_err(blkio_err("capacity"))?;
        let max_segment = match b.get_i32("max-segment-len") {
            Ok(n) if n > 0 => n as usize,
            _ => usize::MAX,
        };
        Ok(Client {
            queues: started.queues,
            region,
            blkio: b,
            capacity,
            max_segment,
            iovecs: Vec::new(),
        })
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The longest buffer one request segment may have (the device's SIZE_MAX).
    pub fn max_segment(&self) -> usize {
        self.max_segment
    }

    pub fn get_u64(&self, property: &str) -> Result<u64> {
        self.blkio.get_u64(property).map_err(blkio_err(property))
    }

    pub fn get_i32(&self, property: &str) -> Result<i32> {
        self.blkio.get_i32(property).map_err(blkio_err(property))
    }

    /// The shared buffer region.
    pub fn buffer(&mut self) -> &mut [u8] {
        // SAFETY: the region is our own mapping of `len` bytes; the device only touches it
        // while a request we submitted is in flight, and callers only use this between batches.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Queues `reqs` on `queue` (user_data = index) and hands them to the device without
    /// waiting: what `batch` builds on, and how a test leaves requests in flight.
    pub fn submit(&mut self, queue: usize, reqs: &[Req]) -> Result<()> {
        let base = self.region.addr as *mut u8;
        let region_len = self.region.len;
        let q = &mut self.queues[queue];
        self.iovecs.clear();
        for (i, r) in reqs.iter().enumerate() {
            assert!(
                r.buf_offset + r.len <= region_len,
                "request {i} overruns the buffer region"
            );
            // SAFETY: checked just above to lie inside the region.
            let buf = unsafe { base.add(r.buf_offset) };
            let split = matches!(r.op, Op::Read | Op::Write) && r.len > self.max_segment;
            if split {
                let iov: Vec<iovec> = (0..r.len)
                    .step_by(self.max_segment)
                    .map(|at| iovec {
                        // SAFETY: `at < r.len`, inside the region (checked above).
                        iov_base: unsafe { buf.add(at) }.cast(),
                        iov_len: (r.len - at).min(self.max_segment),
                    })
                    .collect();
                let (ptr, n) = (iov.as_ptr(), iov.len() as u32);
                // The Vec's heap buffer does not move when the Vec does.
                self.iovecs.push(Segments { _held: iov });
                if r.op == Op::Read {
                    q.readv(r.offset, ptr, n, i, ReqFlags::empty());
                } else {
                    q.writev(r.offset, ptr, n, i, ReqFlags::empty());
                }
                continue;
            }
            match r.op {
                Op::Read => q.read(r.offset, buf, r.len, i, ReqFlags::empty()),
                Op::Write => q.write(r.offset, buf, r.len, i, ReqFlags::empty()),
                Op::Flush => q.flush(i, ReqFlags::empty()),
                Op::Discard => q.discard(r.offset, r.len as u64, i, ReqFlags::empty()),
                Op::WriteZeroes { unmap } => {
                    let flags = if unmap {
                        ReqFlags::empty()
                    } else {
                        ReqFlags::NO_UNMAP
                    };
                    q.write_zeroes(r.offset, r.len as u64, i, flags)
                }
            }
        }
        q.do_io(&mut [], 0, None, None)
            .map_err(blkio_err("do_io"))?;
        Ok(())
    }

    /// Submits `reqs` on `queue` all at once and waits for all of them; results in order.
    pub fn batch(&mut self, queue: usize, reqs: &[Req]) -> Result<Vec<Result<()>>> {
        self.submit(queue, reqs)?;
        let q = &mut self.queues[queue];
        let mut results: Vec<Option<Result<()>>> = vec![None; reqs.len()];
        let mut pending = reqs.len();
        let mut completions: Vec<MaybeUninit<Completion>> = (0..reqs.len().max(1))
            .map(|_| MaybeUninit::uninit())
            .collect();
        while pending > 0 {
            let mut timeout = REPLY_TIMEOUT;
            let n = q
                .do_io(&mut completions, 1, Some(&mut timeout), None)
                .map_err(blkio_err("do_io (waiting for the device)"))?;
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first `n` completions.
                let c = unsafe { c.assume_init_ref() };
                let i = c.user_data;
                results[i] = Some(if c.ret == 0 {
                    Ok(())
                } else {
                    Err(ClientError {
                        op: format!("{:?} at {}", reqs[i].op, reqs[i].offset),
                        errno: c.ret,
                        message: completion_message(c),
                    })
                });
                pending -= 1;
            }
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every request completed"))
            .collect())
    }

    fn one(&mut self, queue: usize, req: Req) -> Result<()> {
        self.batch(queue, &[req])?.remove(0)
    }

    pub fn read(&mut self, queue: usize, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.one(
            queue,
            Req {
                op: Op::Read,
                offset,
                len,
                buf_offset: 0,
            },
        )?;
        Ok(self.buffer()[..len].to_vec())
    }

    pub fn write(&mut self, queue: usize, offset: u64, data: &[u8]) -> Result<()> {
        self.buffer()[..data.len()].copy_from_slice(data);
        self.one(
            queue,
            Req {
                op: Op::Write,
                offset,
                len: data.len(),
                buf_offset: 0,
            },
        )
    }

    pub fn flush(&mut self, queue: usize) -> Result<()> {
        self.one(
            queue,
            Req {
                op: Op::Flush,
                offset: 0,
                len: 0,
                buf_offset: 0,
            },
        )
    }

    pub fn discard(&mut self, queue: usize, offset: u64, len: usize) -> Result<()> {
        self.one(
            queue,
            Req {
                op: Op::Discard,
                offset,
                len,
                buf_offset: 0,
            },
        )
    }

    pub fn write_zeroes(
        &mut self,
        queue: usize,
        offset: u64,
        len: usize,
        unmap: bool,
    ) -> Result<()> {
        self.one(
            queue,
            Req {
                op: Op::WriteZeroes { unmap },
                offset,
                len,
                buf_offset: 0,
            },
        )
    }

    /// Direct access to a queue, for callers that run their own submission loop (benchmarks).
    pub fn queue_and_region(&mut self, queue: usize) -> (&mut Blkioq, *mut u8, usize) {
        (
            &mut self.queues[queue],
            self.region.addr as *mut u8,
            self.region.len,
        )
    }
}

/// The message libblkio attached to a failed completion.
pub fn completion_message(c: &Completion) -> String {
    if c.error_msg.is_null() {
        std::io::Error::from_raw_os_error(-c.ret).to_string()
    } else {
        // SAFETY: libblkio sets error_msg to a static NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
            .to_string_lossy()
            .into_owned()
    }
}
