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
        let section = self.section_len(io.max_section_len());
        let op = |s: Section| async move {
            let data = io.read_at(s.at, s.len).await?;
            let data = data.as_slice();
            let got = bufs.copy_from_slice(s.start, &data[..data.len().min(s.len)]);
            if got < s.len {
                bufs.fill_zero(s.start + got, s.len - got);
            }
            Ok(())
        };
        let credits = || io.credits();
        self.sections("read", offset, bufs.len(), section, &credits, op)
            .await
    }

    /// Writes `bufs` at `offset`, section by section.
    pub async fn write(&self, io: &dyn SectionIo, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        let section = self.section_len(io.max_section_len());
        let op = |s: Section| async move {
            let mut data = vec![0u8; s.len];
            bufs.copy_to_slice(s.start, &mut data);
            io.write_at(s.at, data).await
        };
        let credits = || io.credits();
        self.sections("write", offset, bufs.len(), section, &credits, op)
            .await
    }

    /// The section size: the configured cap, below the transport's maximum.
    fn section_len(&self, max: usize) -> usize {
        self.config.section_len.map_or(max, |l| l.min(max)).max(1)
    }

    /// The engine itself, for any transport: cuts `[offset, offset + total)` into sections of
    /// at most `section` bytes and runs `op` on each, up to min(max in flight, `credits()`)
    /// at once, in any order of completion; the first error stops further sections and fails
    /// the request once those under way are done; the whole request has the configured
    /// deadline. `op` does the section's I/O and puts its data in place (zero-copy where the
    /// transport allows).
    pub async fn sections<F, Fut>(
        &self,
        what: &str,
        offset: u64,
        total: usize,
        section: usize,
        credits: &(dyn Fn() -> usize + Sync),
        op: F,
    ) -> Result<()>
    where
        F: Fn(Section) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let sections = Sections {
            total,
            len: section.max(1),
        };
        match tokio::time::timeout(
            self.config.timeout,
            self.pump(offset, sections, credits, op),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{what} at offset {offset} length {total} not done after {:?}",
                    self.config.timeout
                ),
            )),
        }
    }

    async fn pump<F, Fut>(
        &self,
        offset: u64,
        sections: Sections,
        credits: &(dyn Fn() -> usize + Sync),
        op: F,
    ) -> Result<()>
    where
        F: Fn(Section) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let count = sections.count();
        let mut tracker = SectionTracker::new(count);
        let mut in_flight = FuturesUnordered::new();
        let mut next = 0;
        let mut failure: Option<Error> = None;
        loop {
            let window = self.config.max_in_flight.min(credits()).max(1);
            while failure.is_none() && next < count && in_flight.len() < window {
                let i = next;
                next += 1;
                let (start, len) = sections.range(i);
                let run = op(Section {
                    at: offset + start as u64,
                    start,
                    len,
                });
                in_flight.push(async move { (i, run.await) });
            }
            let Some((i, result)) = in_flight.next().await else {
                break;
            };
            match result {
                Ok(()) => tracker.succeeded(i),
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

/// One section of a request, as the engine hands it to the operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    /// Where it goes on the transport (request offset + `start`).
    pub at: u64,
    /// Where it sits in the request's buffers.
    pub start: usize,
    pub len: usize,
}

#[cfg(test)]
mod tests;
