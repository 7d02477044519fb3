//! Write maps of sparse files while others write into their holes (issue 14, "no erased
//! writes"): the map server makes holes written only in ways that cannot overwrite a write
//! that lands meanwhile (dedupe from its zero file, then unshare, on xfs with reflink), or not
//! at all (ext4: holes stay on the network path). Real loop LUNs, real filesystems, the real
//! map server.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use twinpath_filemap::{file_extents, Access, ExtentClass, SpanKind};
use twinpath_mapproto::{Key, MapClient, MapGrant, Reply, Request};
use twinpath_tests::fileserver::{host_key, FileServer};
use twinpath_tests::lun::Fs;
use twinpath_tests::pattern;

const MIB: u64 = 1 << 20;
const ZERO_FILE: &str = ".twinpath-zeros";

fn key() -> Key {
    host_key("host-a")
}

fn start(fs: Fs) -> (FileServer, tokio::runtime::Runtime, MapClient) {
    let fs = FileServer::start(512 * MIB, fs, false, "allocation_chunk: 4M\n");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (c, _recalls) = rt
        .block_on(MapClient::connect(&fs.map_addr, &key(), "host-a"))
        .unwrap();
    (fs, rt, c)
}

fn write_map(rt: &tokio::runtime::Runtime, c: &MapClient, path: &str, len: u64) -> MapGrant {
    let reply = rt
        .block_on(c.call(Request::GetMap {
            path: path.into(),
            offset: 0,
            len,
            write: true,
        }))
        .unwrap();
    match reply {
        Reply::Map(m) => m,
        other => panic!("{path}: expected a map, got {other:?}"),
    }
}

fn give_back(rt: &tokio::runtime::Runtime, c: &MapClient, lease: u64) {
    assert_eq!(
        rt.block_on(c.call(Request::Return { lease })).unwrap(),
        Reply::Done
    );
}

/// Physical ranges of `path`'s extents.
fn physical_ranges(path: &Path) -> Vec<(u64, u64)> {
    file_extents(&File::open(path).unwrap())
        .unwrap()
        .iter()
        .map(|e| (e.physical, e.physical + e.len))
        .collect()
}

/// `xfs_io`'s dedupe of `len` bytes at `src_offset` of `src` into `dest` at `dest_offset`;
/// returns what it printed.
fn xfs_dedupe(src: &Path, src_offset: u64, dest: &Path, dest_offset: u64, len: u64) -> String {
    let out = std::process::Command::new("xfs_io")
        .arg("-c")
        .arg(format!(
            "dedupe {} {src_offset} {dest_offset} {len}",
            src.display()
        ))
        .arg(dest)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// How a trial's writer puts its bytes into the file.
#[derive(Debug, Clone, Copy)]
enum How {
    /// pwrite into the page cache, left for writeback.
    Buffered,
    /// pwrite, then fdatasync.
    Synced,
    /// O_DIRECT pwrite.
    Direct,
}

fn pwrite(path: &Path, how: How, offset: u64, data: &[u8]) {
    let mut o = OpenOptions::new();
    o.write(true);
    if let How::Direct = how {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o.open(path).unwrap();
    if let How::Direct = how {
        let layout = std::alloc::Layout::from_size_align(data.len(), 4096).unwrap();
        // SAFETY: non-zero size; filled, written and freed here.
        let ptr = unsafe { std::alloc::alloc(layout) };
        // SAFETY: `ptr` holds `data.len()` bytes we own until the dealloc below.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, data.len()) };
        buf.copy_from_slice(data);
        let r = f.write_all_at(buf, offset);
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) };
        r.unwrap();
    } else {
        f.write_all_at(data, offset).unwrap();
        if let How::Synced = how {
            f.sync_data().unwrap();
        }
    }
}

/// Trials of: a fresh sparse 8 MiB file, a write map of all of it, and another process
/// writing a pattern into one of its holes at a random moment around the map's work.
/// Returns (trials, lost writes, trials whose whole file was granted for writing, dedupes
/// the server found written meanwhile).
fn hole_writes_race_write_maps(trials: u64) -> (u64, u64, u64, u64, u64) {
    let (fs, rt, c) = start(Fs::Xfs);
    let mnt = fs.lun.mount_point();
    let size = 8 * MIB;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    // The writer's delay is drawn from 0 to 1.5 times the running mean of the map's time,
    // so it lands before, during and after the server's work on the file.
    let mut mean_map_us = 2000.0f64;
    let (mut lost, mut whole, mut recalled) = (0, 0, 0);
    for trial in 0..trials {
        let name = format!("t{trial}.raw");
        let path = mnt.join(&name);
        File::create(&path).unwrap().set_len(size).unwrap();
        let len = (1 + next() % 16) * 4096;
        let at = (next() % ((size - len) / 4096)) * 4096;
        let data = pattern(1000 + trial, len as usize);
        let how = [How::Buffered, How::Synced, How::Direct][(trial % 3) as usize];
        let delay = Duration::from_micros((next() % (mean_map_us * 1.5) as u64).max(1));
        let go = Arc::new(Barrier::new(2));
        let writer = std::thread::spawn({
            let (go, path, data) = (go.clone(), path.clone(), data.clone());
            move || {
                go.wait();
                std::thread::sleep(delay);
                pwrite(&path, how, at, &data);
            }
        });
        go.wait();
        let t = Instant::now();
        let reply = rt
            .block_on(c.call(Request::GetMap {
                path: name.clone(),
                offset: 0,
                len: size,
                write: true,
            }))
            .unwrap();
        mean_map_us = 0.9 * mean_map_us + 0.1 * t.elapsed().as_micros() as f64;
        writer.join().unwrap();
        match reply {
            Reply::Map(m) => {
                give_back(&rt, &c, m.lease);
                let writable: u64 = m
                    .spans
                    .iter()
                    .filter(|s| s.access == Access::ReadWrite)
                    .map(|s| s.len)
                    .sum();
                if writable == size {
                    whole += 1;
                }
            }
            // The write was seen while the map was made: no grant went out.
            Reply::Refused { reason } if reason.contains("recalled") => recalled += 1,
            other => panic!("{name}: {other:?}"),
        }
        let mut want = vec![0u8; size as usize];
        want[at as usize..(at + len) as usize].copy_from_slice(&data);
        let got = std::fs::read(&path).unwrap();
        if got != want {
            lost += 1;
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            eprintln!(
                "trial {trial}: {how:?} write of {len} at {at} after {delay:?}: the file differs \
                 from byte {first}"
            );
        }
        std::fs::remove_file(&path).unwrap();
    }
    drop(c);
    let map = fs.map.unwrap();
    let differed = map.log().matches("written meanwhile").count() as u64;
    assert!(map.stop().success());
    (trials, lost, whole, differed, recalled)
}

#[test]
fn writes_into_holes_while_write_maps_are_made_are_never_erased() {
    let trials = std::env::var("MAP_FILL_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let (trials, lost, whole, differed, recalled) = hole_writes_race_write_maps(trials);
    eprintln!(
        "{trials} trials: {lost} lost writes; {whole} whole-file write grants; {recalled} \
         maps refused because the write was seen while they were made; {differed} dedupes \
         found the hole written meanwhile"
    );
    assert_eq!(lost, 0, "{lost} of {trials} writes into holes were erased");
    assert!(
        whole >= trials / 4,
        "only {whole} of {trials} maps filled the file: the race proves little"
    );
}

#[test]
fn filled_holes_never_share_blocks_with_the_zero_file_and_it_stays_zeros() {
    let (fs, rt, c) = start(Fs::Xfs);
    let mnt = fs.lun.mount_point();
    let zeros = mnt.join(ZERO_FILE);
    let log = fs.map.as_ref().unwrap().log();
    assert!(log.contains("holes are filled by dedupe from"), "{log}");
    let zero_blocks = physical_ranges(&zeros);
    // Nobody may map it: a direct write into its blocks would make later fills someone's data.
    for write in [false, true] {
        let reply = rt
            .block_on(c.call(Request::GetMap {
                path: ZERO_FILE.into(),
                offset: 0,
                len: MIB,
                write,
            }))
            .unwrap();
        assert!(matches!(reply, Reply::Refused { .. }), "{reply:?}");
    }

    // A sparse file with a written middle and a preallocated tail.
    let img = mnt.join("vm.raw");
    let f = File::create(&img).unwrap();
    f.set_len(24 * MIB).unwrap();
    f.write_all_at(&pattern(7, MIB as usize), 4 * MIB).unwrap();
    // SAFETY: fallocate on a file we hold open.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            16 * MIB as i64,
            8 * MIB as i64,
        )
    };
    assert_eq!(r, 0);
    drop(f);
    let m = write_map(&rt, &c, "vm.raw", 24 * MIB);
    assert_eq!(
        m.spans.iter().map(|s| s.len).sum::<u64>(),
        24 * MIB,
        "{:?}",
        m.spans
    );
    for s in &m.spans {
        assert_eq!(
            s.access,
            Access::ReadWrite,
            "all of it made written: {:?}",
            m.spans
        );
        let SpanKind::Data { physical } = s.kind else {
            panic!("writable zeros: {s:?}");
        };
        for &(lo, hi) in &zero_blocks {
            assert!(
                physical + s.len <= lo || physical >= hi,
                "{s:?} shares blocks with the zero file at [{lo}, {hi})"
            );
        }
    }
    for e in file_extents(&File::open(&img).unwrap()).unwrap() {
        assert_eq!(e.class, ExtentClass::Written, "{e:?}");
    }
    give_back(&rt, &c, m.lease);
    let mut want = vec![0u8; 24 * MIB as usize];
    want[4 * MIB as usize..5 * MIB as usize].copy_from_slice(&pattern(7, MIB as usize));
    assert!(std::fs::read(&img).unwrap() == want, "the content changed");

    // What makes a stale FIEMAP harmless: a hole written meanwhile (still only in the page
    // cache) fails the dedupe's compare and keeps its bytes.
    let late = mnt.join("late.raw");
    File::create(&late).unwrap().set_len(4 * MIB).unwrap();
    let bytes = pattern(11, 8192);
    OpenOptions::new()
        .write(true)
        .open(&late)
        .unwrap()
        .write_all_at(&bytes, MIB + 4096)
        .unwrap();
    assert!(xfs_dedupe(&zeros, 0, &late, 0, 4 * MIB).contains("did not match"));
    let got = std::fs::read(&late).unwrap();
    assert!(got[MIB as usize + 4096..MIB as usize + 12288] == bytes[..]);

    // A dedupe of other bytes into the zero file fails the compare and changes nothing; the
    // server's dedupes only ever read it.
    let other = mnt.join("other.raw");
    std::fs::write(&other, pattern(8, MIB as usize)).unwrap();
    assert!(xfs_dedupe(&other, 0, &zeros, 0, MIB).contains("did not match"));
    let z = std::fs::read(&zeros).unwrap();
    assert_eq!(z.len() as u64, 16 * MIB);
    assert!(z.iter().all(|&b| b == 0), "the zero file holds data");
    drop(c);
    assert!(fs.map.unwrap().stop().success());
}

#[test]
fn ext4_grants_only_written_ranges_for_writing_and_fills_nothing() {
    let (fs, rt, c) = start(Fs::Ext4);
    let mnt = fs.lun.mount_point();
    let log = fs.map.as_ref().unwrap().log();
    assert!(log.contains("holes stay on the network path"), "{log}");
    assert!(!mnt.join(ZERO_FILE).exists(), "a zero file nobody uses");
    // Written [0, 1M), a hole [1M, 2M), preallocated [2M, 3M), written [3M, 4M).
    let img = mnt.join("vm.raw");
    let f = File::create(&img).unwrap();
    f.set_len(4 * MIB).unwrap();
    f.write_all_at(&pattern(9, MIB as usize), 0).unwrap();
    f.write_all_at(&pattern(10, MIB as usize), 3 * MIB).unwrap();
    // SAFETY: fallocate on a file we hold open.
    let r = unsafe {
        libc::fallocate(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            2 * MIB as i64,
            MIB as i64,
        )
    };
    assert_eq!(r, 0);
    drop(f);
    let blocks_before = std::fs::metadata(&img).unwrap().blocks();
    let m = write_map(&rt, &c, "vm.raw", 4 * MIB);
    let writable: Vec<(u64, u64)> = m
        .spans
        .iter()
        .filter(|s| s.access == Access::ReadWrite)
        .map(|s| (s.logical, s.logical + s.len))
        .collect();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (lo, hi) in writable {
        match merged.last_mut() {
            Some(last) if last.1 == lo => last.1 = hi,
            _ => merged.push((lo, hi)),
        }
    }
    assert_eq!(merged, vec![(0, MIB), (3 * MIB, 4 * MIB)], "{:?}", m.spans);
    assert!(
        m.spans
            .iter()
            .filter(|s| (MIB..3 * MIB).contains(&s.logical))
            .all(|s| s.kind == SpanKind::Zero && s.access == Access::Read),
        "{:?}",
        m.spans
    );
    match rt
        .block_on(c.call(Request::Allocate {
            lease: m.lease,
            offset: MIB,
            len: 4096,
        }))
        .unwrap()
    {
        Reply::Refused { reason } => assert!(reason.contains("network path"), "{reason}"),
        other => panic!("allocate on ext4: {other:?}"),
    }
    give_back(&rt, &c, m.lease);
    assert_eq!(
        std::fs::metadata(&img).unwrap().blocks(),
        blocks_before,
        "the server allocated or wrote nothing"
    );
    drop(c);
    assert!(fs.map.unwrap().stop().success());
}
