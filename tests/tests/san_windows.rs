//! Sequential writes across the 64 MiB map windows of fresh sparse images on san disks: a
//! write straddling two windows goes over SMB whole while its neighbours, in flight with it,
//! go direct under write maps whose holes the map server fills at that moment. Nothing may
//! be lost: every image reads back as written through the san disk, through an smb disk on
//! the same image afterwards, and through the server's filesystem.

use twinpath_tests::fileserver::FileServer;
use twinpath_tests::lun::Fs;
use twinpath_tests::*;

use std::time::Duration;

const MIB: u64 = 1 << 20;
/// plugins/san/src/direct.rs WINDOW.
const WINDOW: u64 = 64 * MIB;
const IMAGE: u64 = 3 * WINDOW;
const IMAGES: usize = 20;
/// Images per daemon: the images of a group are removed before the next, so the LUN holds
/// only one group's allocations.
const GROUP: usize = 5;
/// 1 MiB writes per window boundary, in sequence.
const RUN: u64 = 8;
/// The map server's lease time: how long the blocks of a removed image may stay allocated
/// while a lease on it is outstanding.
const LEASE_TIME: Duration = Duration::from_secs(30);

/// One 1 MiB write: where, and its bytes.
struct Write {
    offset: u64,
    data: Vec<u8>,
}

/// The writes to image `i`: around each window boundary, a run of RUN sequential 1 MiB
/// writes starting at an offset that is not a multiple of 1 MiB, so that one of them
/// straddles the boundary (by a different amount on each image).
fn writes(i: usize) -> Vec<Write> {
    let skew = 4096 * (1 + (i as u64 * 37) % 255);
    (1..IMAGE / WINDOW)
        .flat_map(|k| {
            let start = k * WINDOW - RUN / 2 * MIB + skew;
            (0..RUN).map(move |j| Write {
                offset: start + j * MIB,
                data: pattern((i as u64) << 16 | k << 8 | j, MIB as usize),
            })
        })
        .collect()
}

/// What `[offset, offset + len)` of an image holds after `writes`: zeros elsewhere.
fn expected(writes: &[Write], offset: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    for w in writes {
        let (lo, hi) = (w.offset.max(offset), (w.offset + MIB).min(offset + len));
        if lo < hi {
            out[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&w.data[(lo - w.offset) as usize..(hi - w.offset) as usize]);
        }
    }
    out
}

fn client(sock: &std::path::Path) -> Client {
    Client::connect(
        sock,
        &ClientOptions {
            buffer_size: (RUN * MIB) as usize,
            ..Default::default()
        },
    )
    .unwrap()
}

/// Writes image `i`'s runs with `depth` requests in flight at a time.
fn write_runs(c: &mut Client, writes: &[Write], depth: usize) {
    for run in writes.chunks(RUN as usize) {
        for (j, w) in run.iter().enumerate() {
            c.buffer()[j * MIB as usize..(j + 1) * MIB as usize].copy_from_slice(&w.data);
        }
        let reqs: Vec<Req> = run
            .iter()
            .enumerate()
            .map(|(j, w)| Req {
                op: Op::Write,
                offset: w.offset,
                len: MIB as usize,
                buf_offset: j * MIB as usize,
            })
            .collect();
        for batch in reqs.chunks(depth) {
            for r in c.batch(0, batch).unwrap() {
                r.unwrap();
            }
        }
    }
    c.flush(0).unwrap();
}

/// Reads `[offset, offset + len)` in 4 MiB requests and compares it with `writes`.
fn check(c: &mut Client, writes: &[Write], offset: u64, len: u64, what: &str) {
    let mut at = offset;
    while at < offset + len {
        let n = (4 * MIB).min(offset + len - at);
        let got = c.read(0, at, n as usize).unwrap();
        let want = expected(writes, at, n);
        if got != want {
            let first = got.iter().zip(&want).position(|(a, b)| a != b).unwrap();
            panic!("{what}: differs at byte {}", at + first as u64);
        }
        at += n;
    }
}

fn disks(fs: &FileServer, dir: &std::path::Path, group: &[usize], san: bool) -> String {
    let lun = fs.lun.device().display().to_string();
    let mut yaml = String::from("disks:\n");
    for &i in group {
        let (name, backend) = if san {
            (format!("san{i}"), fs.backend_yaml(&image(i), Some(&lun)))
        } else {
            (format!("smb{i}"), fs.backend_yaml(&image(i), None))
        };
        yaml += &format!(
            "  - name: {name}\n    socket: {}\n    backend: {backend}\n",
            dir.join(format!("{name}.sock")).display()
        );
    }
    yaml
}

fn image(i: usize) -> String {
    format!("w{i}.raw")
}

#[test]
fn writes_straddling_map_windows_of_sparse_images_are_all_kept() {
    let started = std::time::Instant::now();
    let mut fs = FileServer::start(
        (GROUP as u64 * IMAGE) + 512 * MIB,
        Fs::Xfs,
        true,
        &format!("lease_time: {}s\n", LEASE_TIME.as_secs()),
    );
    let mnt = fs.lun.mount_point();
    let empty = fs_used(&mnt);
    let groups: Vec<Vec<usize>> = (0..IMAGES)
        .collect::<Vec<_>>()
        .chunks(GROUP)
        .map(<[usize]>::to_vec)
        .collect();
    let mut direct_disks = 0;
    let mut waited = Duration::ZERO;
    for (g, group) in groups.iter().enumerate() {
        // The LUN holds one group's images: the last group's must be gone first. Their
        // blocks stay allocated while a lease on them is outstanding (the map server keeps
        // a stopped host's leases until they run out), and never longer.
        let wait = std::time::Instant::now();
        let freed = twinpath_core::wait_until(LEASE_TIME + Duration::from_secs(15), || {
            fs_used(&mnt) <= empty + 16 * MIB
        });
        assert!(
            freed,
            "group {g}: {} MiB of removed images still allocated after the lease time",
            (fs_used(&mnt) - empty) / MIB
        );
        waited += wait.elapsed();
        let writes: std::collections::HashMap<usize, Vec<Write>> =
            group.iter().map(|&i| (i, writes(i))).collect();
        for &i in group {
            let f = std::fs::File::create(mnt.join(image(i))).unwrap();
            f.set_len(IMAGE).unwrap();
        }
        let dir = fs.dir.path().join(format!("group{g}"));
        std::fs::create_dir_all(dir.join("san")).unwrap();
        std::fs::create_dir_all(dir.join("smb")).unwrap();

        let daemon = Daemon::start(&dir.join("san"), &disks(&fs, &dir, group, true));
        let log = daemon.log();
        assert_eq!(
            log.matches("direct path ready").count(),
            group.len(),
            "{log}"
        );
        for &i in group {
            let mut c = client(&dir.join(format!("san{i}.sock")));
            let w = &writes[&i];
            write_runs(&mut c, w, 2 + i % 7);
            // The runs and a MiB around them; the server's own read below covers the rest.
            // (The straddling writes through smbd recall the disk's lease, so these reads may
            // well go over SMB too.)
            for k in 1..IMAGE / WINDOW {
                let around = k * WINDOW - (RUN / 2 + 1) * MIB;
                check(
                    &mut c,
                    w,
                    around,
                    (RUN + 2) * MIB,
                    &format!("san disk, image {i}"),
                );
            }
        }
        let log = daemon.log_after_stop();
        let totals: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("direct path totals"))
            .collect();
        assert_eq!(totals.len(), group.len(), "{log}");
        // A window whose file was written through smbd while its map was made is refused
        // and rests on SMB for 5 s (fanotify names no range), so a disk may well do all of
        // its short run over SMB; the run as a whole must have used the direct path.
        direct_disks += totals.iter().filter(|l| !l.contains(" bytes=0")).count();

        let daemon = Daemon::start(&dir.join("smb"), &disks(&fs, &dir, group, false));
        for &i in group {
            let mut c = client(&dir.join(format!("smb{i}.sock")));
            let w = &writes[&i];
            // Around each boundary: the straddling write and its neighbours (the server's
            // own read below covers the rest).
            for k in 1..IMAGE / WINDOW {
                let around = k * WINDOW - 2 * MIB;
                check(&mut c, w, around, 4 * MIB, &format!("smb disk, image {i}"));
            }
        }
        assert!(daemon.stop().success());
        for &i in group {
            let path = mnt.join(image(i));
            let on_server = std::fs::read(&path).unwrap();
            assert!(
                on_server == expected(&writes[&i], 0, IMAGE),
                "server's file, image {i}"
            );
            std::fs::remove_file(&path).unwrap();
        }
    }
    // smbd and the map server hold files on the volume: stop them before it is unmounted.
    assert!(fs.map.take().unwrap().stop().success());
    drop(fs.smb.take());
    eprintln!(
        "{IMAGES} images, {} straddling writes each, in {:.1} s ({:.1} s of it waiting for \
         removed images' blocks); {direct_disks} disks wrote directly",
        IMAGE / WINDOW - 1,
        started.elapsed().as_secs_f64(),
        waited.as_secs_f64()
    );
    assert!(direct_disks > 0, "no disk ever used the direct path");
}
