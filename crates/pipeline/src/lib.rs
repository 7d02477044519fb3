//! The pipeline engine: how one guest request becomes many outstanding network (or device)
//! operations without losing track of any.
//!
//! A request larger than the transport's maximum is split into sections of at most that size.
//! Sections are issued without waiting for earlier replies, up to a window of
//! min(configured maximum, the transport's current credits). Each operation carries its
//! section index, so replies that arrive out of order land in their own place of the guest
//! buffer. A [`SectionTracker`] keeps one bit per section, set when the request starts and
//! cleared when that section succeeds; the request is done when no bit is left. The first
//! error stops further sends, the sections already in flight are drained, and the whole
//! request fails with that error. A request that does not finish within the timeout fails
//! too, and its in-flight operations are cancelled (dropped).
//!
//! The engine knows nothing of SMB or LUNs: a transport implements [`SectionIo`].

use std::time::Duration;

use async_trait::async_trait;
use bitvec::vec::BitVec;
use futures::stream::{FuturesUnordered, StreamExt};
use twinpath_core::{Error, ErrorKind, GuestBuffers, Result};

/// One transport the engine drives: an SMB open file, a LUN, a test double.
#[async_trait]
pub trait SectionIo: Send + Sync {
    /// The largest section the other side accepts (e.g. SMB MaxRead/MaxWrite).
    fn max_section_len(&self) -> usize;

    /// How many operations may be outstanding right now (e.g. SMB credits); at least 1 is
    /// assumed.
    fn credits(&self) -> usize;

    /// Reads up to `len` bytes at `offset`. Fewer bytes mean end of file: the rest reads as
    /// zeros.
    async fn read_at(&self, offset: u64, len: usize) -> Result<SectionData>;

    /// Writes all of `data` at `offset`.
    async fn write_at(&self, offset: u64, data: Vec<u8>) -> Result<()>;
}

/// The bytes a section read returned: a part of a buffer the transport already holds (e.g.
/// the payload inside a reply frame), so it reaches guest memory with one copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionData {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl SectionData {
    /// `buf[range]`; `None` if the range is not inside `buf`.
    pub fn slice(buf: Vec<u8>, range: std::ops::Range<usize>) -> Option<SectionData> {
        (range.start <= range.end && range.end <= buf.len()).then_some(SectionData {
            start: range.start,
            end: range.end,
            buf,
        })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

impl From<Vec<u8>> for SectionData {
    fn from(buf: Vec<u8>) -> Self {
        let end = buf.len();
        SectionData { buf, start: 0, end }
    }
}

/// Engine settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineConfig {
    /// Section size cap, below the transport's maximum (`None`: the transport's maximum).
    pub section_len: Option<usize>,
    /// Most sections of one request outstanding at once.
    pub max_in_flight: usize,
    /// Whole-request deadline.
    pub timeout: Duration,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            section_len: None,
            max_in_flight: 64,
            timeout: Duration::from_secs(30),
        }
    }
}

/// One bit per section: set while the section is outstanding or not yet sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionTracker {
    pending: BitVec,
}

impl SectionTracker {
    /// All `sections` bits set: nothing has succeeded yet.
    pub fn new(sections: usize) -> Self {
        let mut pending = BitVec::with_capacity(sections);
        pending.resize(sections, true);
        SectionTracker { pending }
    }

    pub fn succeeded(&mut self, section: usize) {
        self.pending.set(section, false);
    }

    pub fn is_pending(&self, section: usize) -> bool {
        self.pending[section]
    }

    /// True when every section has succeeded.
    pub fn done(&self) -> bool {
        self.pending.not_any()
    }

    pub fn remaining(&self) -> usize {
        self.pending.count_ones()
    }
}

/// How a request is cut: `count` sections of `len` bytes, the last one possibly shorter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Sections {
    total: usize,
    len: usize,
}

impl Sections {
    fn count(&self) -> usize {
        self.total.div_ceil(self.len)
    }

    /// Byte range of section `i` within the request.
    fn range(&self, i: usize) -> (usize, usize) {
        let start = i * self.len;
        (start, self.len.min(self.total - start))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

#[derive(Debug, Clone)]
pub struct Pipeline {
    config: PipelineConfig,
}

impl Pipeline {
    pub fn new(config: PipelineConfig) -> Self {
        Pipeline { config }
    }

    /// Reads `bufs.len()` bytes at `offset` into `bufs`, section by section.
    pub async fn read(&self, io: &dyn SectionIo, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        self.run(io, offset, bufs, Direction::Read).await
    }

    /// Writes `bufs` at `offset`, section by section.
    pub async fn write(&self, io: &dyn SectionIo, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        self.run(io, offset, bufs, Direction::Write).await
    }

    async fn run(
        &self,
        io: &dyn SectionIo,
        offset: u64,
        bufs: &GuestBuffers,
        dir: Direction,
    ) -> Result<()> {
        let len = self
            .config
            .section_len
            .map_or(io.max_section_len(), |l| l.min(io.max_section_len()))
            .max(1);
        let sections = Sections {
            total: bufs.len(),
            len,
        };
        let what = match dir {
            Direction::Read => "read",
            Direction::Write => "write",
        };
        match tokio::time::timeout(
            self.config.timeout,
            self.pump(io, offset, bufs, dir, sections),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{what} at offset {offset} length {} not done after {:?}",
                    bufs.len(),
                    self.config.timeout
                ),
            )),
        }
    }

    async fn pump(
        &self,
        io: &dyn SectionIo,
        offset: u64,
        bufs: &GuestBuffers,
        dir: Direction,
        sections: Sections,
    ) -> Result<()> {
        let count = sections.count();
        let mut tracker = SectionTracker::new(count);
        let mut in_flight = FuturesUnordered::new();
        let mut next = 0;
        let mut failure: Option<Error> = None;
        loop {
            let window = self.config.max_in_flight.min(io.credits()).max(1);
            while failure.is_none() && next < count && in_flight.len() < window {
                let i = next;
                next += 1;
                let (start, len) = sections.range(i);
                let at = offset + start as u64;
                in_flight.push(async move {
                    let result = match dir {
                        Direction::Read => io.read_at(at, len).await.map(Some),
                        Direction::Write => {
                            let mut data = vec![0u8; len];
                            bufs.copy_to_slice(start, &mut data);
                            io.write_at(at, data).await.map(|()| None)
                        }
                    };
                    (i, result)
                });
            }
            let Some((i, result)) = in_flight.next().await else {
                break;
            };
            match result {
                Ok(data) => {
                    if let Some(data) = data {
                        let data = data.as_slice();
                        let (start, len) = sections.range(i);
                        let got = bufs.copy_from_slice(start, &data[..data.len().min(len)]);
                        if got < len {
                            bufs.fill_zero(start + got, len - got);
                        }
                    }
                    tracker.succeeded(i);
                }
                Err(e) => {
                    let (start, len) = sections.range(i);
                    let e = e.within(format!(
                        "section {i} of {count} (offset {}, {len} bytes)",
                        offset + start as u64
                    ));
                    tracing::debug!("{e}; draining {} sections in flight", in_flight.len());
                    failure.get_or_insert(e);
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => {
                debug_assert!(
                    tracker.done(),
                    "all sections sent and drained without error"
                );
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests;
