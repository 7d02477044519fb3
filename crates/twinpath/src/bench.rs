//! `twinpath bench`: drive a vhost-user-blk socket with libblkio the way a guest's fio would,
//! and report IOPS, bandwidth and latency per test.

use std::io::Write;
use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde::Serialize;
use twinpath_client::{completion_message, Client, ClientOptions, Op, Req};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// The vhost-user-blk socket to measure.
    #[arg(long)]
    socket: PathBuf,
    /// Seconds per test.
    #[arg(long, default_value_t = 5.0)]
    runtime: f64,
    /// Tests to run, comma separated, named PATTERN-SIZE-qDEPTH: randread-4k-q1,
    /// randwrite-4k-q32, read-1m-q1, write-128k-q4, ...
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "randread-4k-q1,randread-4k-q32,randwrite-4k-q1,randwrite-4k-q32,read-1m-q1,write-1m-q1"
    )]
    tests: Vec<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// Before the tests, write 256 blocks of known data at random offsets, read them back and
    /// compare (this overwrites data on the disk).
    #[arg(long)]
    verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Test {
    write: bool,
    random: bool,
    block: usize,
    depth: usize,
}

impl Test {
    fn parse(name: &str) -> Result<Test, String> {
        let bad =
            || format!("bad test name `{name}` (expected e.g. randread-4k-q32 or write-1m-q1)");
        let mut parts = name.split('-');
        let (pattern, size, depth) = (
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
            parts.next().ok_or_else(bad)?,
        );
        if parts.next().is_some() {
            return Err(bad());
        }
        let (write, random) = match pattern {
            "read" => (false, false),
            "write" => (true, false),
            "randread" => (false, true),
            "randwrite" => (true, true),
            _ => return Err(bad()),
        };
        let block = twinpath_core::ByteSize::parse(size).map_err(|_| bad())?.0 as usize;
        let depth: usize = depth
            .strip_prefix('q')
            .and_then(|d| d.parse().ok())
            .ok_or_else(bad)?;
        if block == 0 || !block.is_multiple_of(512) || !(1..=256).contains(&depth) {
            return Err(bad());
        }
        Ok(Test {
            write,
            random,
            block,
            depth,
        })
    }
}

#[derive(Debug, Serialize)]
struct TestResult {
    test: String,
    iops: f64,
    mb_per_s: f64,
    lat_p50_us: f64,
    lat_p99_us: f64,
    ops: u64,
    seconds: f64,
}

pub fn run(args: BenchArgs) -> ExitCode {
    let tests: Result<Vec<_>, _> = args
        .tests
        .iter()
        .map(|t| Test::parse(t).map(|p| (t.clone(), p)))
        .collect();
    let tests = match tests {
        Ok(t) => t,
        Err(e) => {
            eprintln!("twinpath bench: {e}");
            return ExitCode::from(2);
        }
    };
    if args.verify {
        match verify(&args) {
            Ok(msg) => eprintln!("{msg}"),
            Err(e) => {
                eprintln!("twinpath bench: verify: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut results = Vec::new();
    for (name, test) in &tests {
        match run_test(&args, name, *test) {
            Ok(r) => results.push(r),
            Err(e) => {
                eprintln!("twinpath bench: {name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).expect("results serialise")
        );
    } else {
        println!(
            "{:<20} {:>10} {:>10} {:>10} {:>10}",
            "TEST", "IOPS", "MB/s", "p50 us", "p99 us"
        );
        for r in &results {
            println!(
                "{:<20} {:>10.0} {:>10.1} {:>10.1} {:>10.1}",
                r.test, r.iops, r.mb_per_s, r.lat_p50_us, r.lat_p99_us
            );
        }
    }
    ExitCode::SUCCESS
}

/// xorshift64*: fast, and good enough to scatter offsets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Writes distinct 4 KiB blocks at scattered offsets in one batch, reads them back in another.
fn verify(args: &BenchArgs) -> Result<String, String> {
    const BLOCKS: usize = 256;
    const BS: usize = 4096;
    let opts = ClientOptions {
        num_queues: 1,
        read_only: false,
        buffer_size: BLOCKS * BS,
    };
    let mut c = Client::connect(&args.socket, &opts).map_err(|e| e.to_string())?;
    let slots = c.capacity() / BS as u64;
    if slots < BLOCKS as u64 {
        return Err(format!("disk of {} bytes is too small", c.capacity()));
    }
    let stride = slots / BLOCKS as u64;
    let mut rng = Rng(0x5eed ^ std::process::id() as u64);
    let offsets: Vec<u64> = (0..BLOCKS as u64)
        .map(|i| (i * stride + rng.next() % stride) * BS as u64)
        .collect();
    let expected: Vec<u8> = (0..BLOCKS * BS).map(|_| rng.next() as u8).collect();
    c.buffer()[..expected.len()].copy_from_slice(&expected);
    let reqs = |op| -> Vec<Req> {
        (0..BLOCKS)
            .map(|i| Req {
                op,
                offset: offsets[i],
                len: BS,
                buf_offset: i * BS,
            })
            .collect()
    };
    for r in c.batch(0, &reqs(Op::Write)).map_err(|e| e.to_string())? {
        r.map_err(|e| e.to_string())?;
    }
    c.flush(0).map_err(|e| e.to_string())?;
    c.buffer().fill(0);
    for r in c.batch(0, &reqs(Op::Read)).map_err(|e| e.to_string())? {
        r.map_err(|e| e.to_string())?;
    }
    match (0..BLOCKS).find(|&i| c.buffer()[i * BS..(i + 1) * BS] != expected[i * BS..(i + 1) * BS])
    {
        Some(i) => Err(format!(
            "block at offset {} read back different data",
            offsets[i]
        )),
        None => Ok(format!(
            "verify: {BLOCKS} blocks of 4 KiB written, flushed and read back identical"
        )),
    }
}

fn run_test(args: &BenchArgs, name: &str, t: Test) -> Result<TestResult, String> {
    let opts = ClientOptions {
        num_queues: 1,
        read_only: false,
        buffer_size: t.block * t.depth,
    };
    let mut client = Client::connect(&args.socket, &opts).map_err(|e| e.to_string())?;
    let blocks = client.capacity() / t.block as u64;
    if blocks == 0 {
        return Err(format!(
            "disk of {} bytes is smaller than one {}-byte block",
            client.capacity(),
            t.block
        ));
    }
    if t.block > client.max_segment() {
        return Err(format!(
            "{name}: blocks of {} bytes are larger than the device's largest segment \
             (SIZE_MAX, {} bytes); a guest driver would split them: use at most that",
            t.block,
            client.max_segment()
        ));
    }
    let (queue, base, _) = client.queue_and_region(0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut next_seq = 0u64;
    let mut next_offset = |rng: &mut Rng| {
        let block = if t.random {
            rng.next() % blocks
        } else {
            let b = next_seq % blocks;
            next_seq += 1;
            b
        };
        block * t.block as u64
    };
    let submit = |q: &mut blkio::Blkioq, slot: usize, offset: u64| {
        // SAFETY: slot < depth and the region holds depth blocks.
        let buf = unsafe { base.add(slot * t.block) };
        if t.write {
            q.write(offset, buf, t.block, slot, blkio::ReqFlags::empty());
        } else {
            q.read(offset, buf, t.block, slot, blkio::ReqFlags::empty());
        }
    };

    let mut started = vec![Instant::now(); t.depth];
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let mut completions: Vec<MaybeUninit<blkio::Completion>> =
        (0..t.depth).map(|_| MaybeUninit::uninit()).collect();
    let begin = Instant::now();
    let deadline = begin + Duration::from_secs_f64(args.runtime);
    for (slot, start) in started.iter_mut().enumerate() {
        *start = Instant::now();
        submit(queue, slot, next_offset(&mut rng));
    }
    let mut inflight = t.depth;
    let mut ops = 0u64;
    let mut last_report = begin;
    let mut stopping = false;
    while inflight > 0 {
        let n = queue
            .do_io(&mut completions, 1, None, None)
            .map_err(|e| e.message().to_owned())?;
        let now = Instant::now();
        stopping |= now >= deadline;
        for c in &completions[..n] {
            // SAFETY: do_io initialised the first n entries.
            let c = unsafe { c.assume_init_ref() };
            if c.ret != 0 {
                return Err(format!("request failed: {}", completion_message(c)));
            }
            let slot = c.user_data;
            latencies.push(
                now.duration_since(started[slot])
                    .as_micros()
                    .min(u32::MAX as u128) as u32,
            );
            ops += 1;
            if stopping {
                inflight -= 1;
            } else {
                started[slot] = now;
                submit(queue, slot, next_offset(&mut rng));
            }
        }
        if !args.quiet && now.duration_since(last_report) >= Duration::from_secs(1) {
            last_report = now;
            let secs = now.duration_since(begin).as_secs_f64();
            eprint!("\r{name:<20} {secs:>4.0}s {:>10.0} IOPS", ops as f64 / secs);
            let _ = std::io::stderr().flush();
        }
    }
    let seconds = begin.elapsed().as_secs_f64();
    if !args.quiet {
        eprint!("\r{:<60}\r", "");
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(0) as f64
    };
    Ok(TestResult {
        test: name.to_owned(),
        iops: ops as f64 / seconds,
        mb_per_s: ops as f64 * t.block as f64 / seconds / 1e6,
        lat_p50_us: pct(0.5),
        lat_p99_us: pct(0.99),
        ops,
        seconds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_names_parse() {
        assert_eq!(
            Test::parse("randread-4k-q32").unwrap(),
            Test {
                write: false,
                random: true,
                block: 4096,
                depth: 32
            }
        );
        assert_eq!(
            Test::parse("write-1m-q1").unwrap(),
            Test {
                write: true,
                random: false,
                block: 1 << 20,
                depth: 1
            }
        );
        for bad in [
            "randread-4k",
            "read-100-q1",
            "read-4k-q0",
            "copy-4k-q1",
            "read-4k-q1-x",
        ] {
            assert!(Test::parse(bad).is_err(), "{bad}");
        }
    }
}
