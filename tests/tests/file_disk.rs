//! The daemon with `file` disks, driven by a real vhost-user client (libblkio).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use twinpath_tests::*;

const MIB: u64 = 1 << 20;

/// Serves one `file` disk of `size` bytes; the extras are YAML lines for the disk and the
/// backend mapping.
fn serve_disk(
    dir: &Path,
    size: u64,
    disk_extra: &str,
    backend_extra: &str,
) -> (Daemon, PathBuf, PathBuf) {
    let img = dir.join("disk.img");
    let sock = dir.join("disk.sock");
    make_image(&img, size);
    let cfg = format!(
        "disks:\n{}{backend_extra}",
        file_disk_yaml("d0", &sock, &img, disk_extra)
    );
    (Daemon::start(dir, &cfg), img, sock)
}

fn one_disk(dir: &Path, disk_extra: &str) -> (Daemon, PathBuf, PathBuf) {
    serve_disk(dir, 64 * MIB, disk_extra, "")
}

/// Whether `dir` is on ext4 or xfs, whose O_DIRECT needs aligned memory.
fn block_fs(dir: &Path) -> bool {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statfs fills the zeroed struct we pass for a NUL-terminated path.
    let f_type = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        assert_eq!(libc::statfs(path.as_ptr(), &mut st), 0);
        st.f_type as i64
    };
    matches!(f_type, 0xEF53 | 0x5846_5342)
}

fn assert_engine(daemon: &Daemon, engine: &str) {
    let log = daemon.log();
    assert!(log.contains(&format!("engine=\"{engine}\"")), "{log}");
}

#[test]
fn random_writes_read_back_across_queues() {
    let dir = scratch();
    let (daemon, img, sock) = one_disk(dir.path(), "    num_queues: 2\n");
    let opts = ClientOptions {
        num_queues: 2,
        buffer_size: 64 * 4096,
        ..Default::default()
    };
    let mut c = Client::connect(&sock, &opts).unwrap();
    assert_eq!(c.capacity(), 64 * MIB);
    assert_eq!(c.get_i32("max-queues").unwrap(), 2);

    // 64 distinct 4 KiB blocks, written 32 at a time per queue, all in flight together.
    let blocks: Vec<u64> = (0..64u64)
        .map(|i| (i * 2654435761) % (64 * MIB / 4096))
        .collect();
    let mut uniq = blocks.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 64);
    for (i, _) in blocks.iter().enumerate() {
        c.buffer()[i * 4096..(i + 1) * 4096].copy_from_slice(&pattern(i as u64, 4096));
    }
    for q in 0..2 {
        let reqs: Vec<Req> = (q * 32..q * 32 + 32)
            .map(|i| Req {
                op: Op::Write,
                offset: blocks[i] * 4096,
                len: 4096,
                buf_offset: i * 4096,
            })
            .collect();
        for r in c.batch(q, &reqs).unwrap() {
            r.unwrap();
        }
    }
    c.buffer().fill(0);
    // Read back on the other queue.
    for q in 0..2 {
        let reqs: Vec<Req> = ((1 - q) * 32..(1 - q) * 32 + 32)
            .map(|i| Req {
                op: Op::Read,
                offset: blocks[i] * 4096,
                len: 4096,
                buf_offset: i * 4096,
            })
            .collect();
        for r in c.batch(q, &reqs).unwrap() {
            r.unwrap();
        }
    }
    for i in 0..64 {
        assert_eq!(
            c.buffer()[i * 4096..(i + 1) * 4096],
            pattern(i as u64, 4096)[..],
            "block {i}"
        );
    }
    c.flush(0).unwrap();
    // The image file holds the data too.
    let data = std::fs::read(&img).unwrap();
    let b = blocks[5] as usize * 4096;
    assert_eq!(&data[b..b + 4096], &pattern(5, 4096)[..]);
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn discard_and_write_zeroes_read_back_as_zeros() {
    let dir = scratch();
    let (daemon, img, sock) = one_disk(dir.path(), "");
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    assert!(c.get_u64("max-discard-len").unwrap() >= MIB);
    assert!(c.get_u64("max-write-zeroes-len").unwrap() >= MIB);
    let data = pattern(1, MIB as usize);
    for i in 0..4 {
        c.write(0, i * MIB, &data).unwrap();
    }
    c.flush(0).unwrap();
    let allocated_before = std::fs::metadata(&img).unwrap().blocks();

    c.discard(0, 0, MIB as usize).unwrap();
    c.write_zeroes(0, MIB, MIB as usize, true).unwrap();
    c.write_zeroes(0, 2 * MIB + 4096, 8192, false).unwrap();
    assert!(
        c.read(0, 0, MIB as usize).unwrap().iter().all(|&b| b == 0),
        "discarded range"
    );
    assert!(
        c.read(0, MIB, MIB as usize)
            .unwrap()
            .iter()
            .all(|&b| b == 0),
        "zeroed + unmapped"
    );
    let third = c.read(0, 2 * MIB, MIB as usize).unwrap();
    assert!(
        third[4096..4096 + 8192].iter().all(|&b| b == 0),
        "zeroed range"
    );
    assert_eq!(
        &third[..4096],
        &data[..4096],
        "data before the zeroed range"
    );
    assert_eq!(
        &third[12288..],
        &data[12288..],
        "data after the zeroed range"
    );
    assert_eq!(
        c.read(0, 3 * MIB, MIB as usize).unwrap(),
        data,
        "untouched MiB"
    );
    // Discard punched holes: the image holds fewer blocks now.
    let allocated_after = std::fs::metadata(&img).unwrap().blocks();
    assert!(
        allocated_after + 2 * MIB / 512 <= allocated_before,
        "{allocated_before} -> {allocated_after} blocks"
    );
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = scratch();
    let (daemon, img, sock) = one_disk(dir.path(), "    read_only: true\n");
    std::fs::write(&img, pattern(9, 8192)).unwrap();
    // The device advertises RO: a read-write client is refused at start.
    let e = Client::connect(&sock, &ClientOptions::default())
        .err()
        .expect("rw client must fail");
    assert!(e.message.contains("read-only"), "{e}");
    let ro = ClientOptions {
        read_only: true,
        ..Default::default()
    };
    let mut c = Client::connect(&sock, &ro).unwrap();
    assert_eq!(c.read(0, 0, 8192).unwrap(), pattern(9, 8192));
    assert!(c.write(0, 0, &[1u8; 512]).is_err());
    assert!(c.discard(0, 0, 4096).is_err());
    assert_eq!(
        std::fs::read(&img).unwrap()[..8192],
        pattern(9, 8192)[..],
        "image unchanged"
    );
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn out_of_range_io_fails_and_the_disk_keeps_working() {
    let dir = scratch();
    let metrics = twinpath_tests::samba::free_port();
    let (daemon, _img, sock) = serve_disk(
        dir.path(),
        64 * MIB,
        "",
        &format!("metrics:\n  listen: 127.0.0.1:{metrics}\n"),
    );
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    let cap = c.capacity();
    let e = c.read(0, cap, 4096).unwrap_err();
    assert_eq!(e.errno, -libc::EIO, "{e}");
    let e = c.write(0, cap - 512, &[1u8; 1024]).unwrap_err();
    assert_eq!(e.errno, -libc::EIO, "{e}");
    c.write(0, cap - 512, &[3u8; 512]).unwrap();
    assert_eq!(c.read(0, cap - 512, 512).unwrap(), vec![3u8; 512]);
    drop(c);
    assert_eq!(
        sample(
            &scrape(metrics),
            "twinpath_disk_rejected_total{disk=\"d0\"}"
        ),
        2.0,
        "both requests refused by the device"
    );
    let log = daemon.log();
    assert!(
        log.contains("beyond the end of the disk") && log.contains("disk=d0"),
        "rejections say why and name the disk: {log}"
    );
    assert!(daemon.stop().success());
}

#[test]
fn two_disks_serve_at_once() {
    let dir = scratch();
    let d = dir.path();
    let (ia, ib) = (d.join("a.img"), d.join("b.img"));
    let (sa, sb) = (d.join("a.sock"), d.join("b.sock"));
    make_image(&ia, 16 * MIB);
    make_image(&ib, 32 * MIB);
    let cfg = format!(
        "disks:\n{}{}",
        file_disk_yaml("a", &sa, &ia, ""),
        file_disk_yaml("b", &sb, &ib, "")
    );
    let daemon = Daemon::start(d, &cfg);
    let threads: Vec<_> = [(sa, 16 * MIB, 1u64), (sb, 32 * MIB, 2u64)]
        .into_iter()
        .map(|(sock, size, seed)| {
            std::thread::spawn(move || {
                let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
                assert_eq!(c.capacity(), size);
                for i in 0..200u64 {
                    let data = pattern(seed * 1000 + i, 4096);
                    let off = (i * 7919 % (size / 4096)) * 4096;
                    c.write(0, off, &data).unwrap();
                    assert_eq!(c.read(0, off, 4096).unwrap(), data);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(daemon.stop().success());
}

#[test]
fn client_disconnect_then_reconnect() {
    let dir = scratch();
    let (daemon, _img, sock) = one_disk(dir.path(), "");
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    c.write(0, 4096, &pattern(4, 4096)).unwrap();
    drop(c);
    for round in 0..3 {
        let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
        assert_eq!(
            c.read(0, 4096, 4096).unwrap(),
            pattern(4, 4096),
            "round {round}"
        );
    }
    assert!(daemon.stop().success());
}

/// What inotify saw happen to `name` in the watched directory: (mask, name) per event.
fn inotify_events(fd: i32) -> Vec<(u32, String)> {
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: reading into a buffer we own, at most its length (the descriptor is non-blocking).
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    let mut out = Vec::new();
    let mut at = 0usize;
    const HEAD: usize = std::mem::size_of::<libc::inotify_event>();
    while n > 0 && at + HEAD <= n as usize {
        // SAFETY: at least HEAD bytes of a kernel-written event; read_unaligned copes with
        // any alignment.
        let ev: libc::inotify_event =
            unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
        let name = &buf[at + HEAD..at + HEAD + ev.len as usize];
        let name = String::from_utf8_lossy(name)
            .trim_end_matches('\0')
            .to_owned();
        out.push((ev.mask, name));
        at += HEAD + ev.len as usize;
    }
    out
}

#[test]
fn socket_is_private_from_its_first_moment_and_removed_on_sigterm() {
    socket_appears_whole("", 0o600, None);
}

/// A frontend running as another user (QEMU under libvirt) gets the socket through its group,
/// set before the socket appears.
#[test]
fn socket_group_and_mode_are_set_before_the_socket_appears() {
    let gid = twinpath_core::group_id("nogroup").unwrap();
    socket_appears_whole(
        "    socket_group: nogroup\n    socket_mode: \"0660\"\n",
        0o660,
        Some(gid),
    );
}

fn socket_appears_whole(disk_extra: &str, mode: u32, gid: Option<u32>) {
    let dir = scratch();
    // Watch the directory from before the daemon starts: a socket bound in place and chmod'ed
    // afterwards shows as created there (with the umask's mode) and then changed.
    // SAFETY: plain syscalls; the descriptor is closed below.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0);
    let c_dir = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and our inotify descriptor.
    let wd = unsafe {
        libc::inotify_add_watch(
            fd,
            c_dir.as_ptr(),
            libc::IN_CREATE | libc::IN_ATTRIB | libc::IN_MOVED_TO,
        )
    };
    assert!(wd >= 0);
    let (daemon, _img, sock) = one_disk(dir.path(), disk_extra);
    let events: Vec<(u32, String)> = inotify_events(fd)
        .into_iter()
        .filter(|(_, name)| name == "disk.sock")
        .collect();
    // SAFETY: closing the descriptor we opened.
    unsafe { libc::close(fd) };
    assert_eq!(
        events,
        vec![(libc::IN_MOVED_TO, "disk.sock".to_owned())],
        "the socket must appear whole, with its final mode"
    );
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, mode);
    if let Some(gid) = gid {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(meta.gid(), gid);
    }
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    c.write(0, 0, &[5u8; 4096]).unwrap();
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    assert!(!sock.exists(), "socket removed");
}

#[test]
fn missing_image_is_reported_and_other_disks_serve() {
    let dir = scratch();
    let d = dir.path();
    let good = d.join("good.img");
    make_image(&good, 8 * MIB);
    let (sg, sm) = (d.join("good.sock"), d.join("missing.sock"));
    let cfg = format!(
        "disks:\n{}{}",
        file_disk_yaml("good", &sg, &good, ""),
        file_disk_yaml("missing", &sm, &d.join("nope.img"), "")
    );
    let daemon = Daemon::start(d, &cfg);
    let log = daemon.log();
    assert!(
        log.contains("disk `missing`") && log.contains("does not exist"),
        "{log}"
    );
    assert!(log.contains("1 of 2 disks served"), "{log}");
    assert!(!sm.exists());
    let mut c = Client::connect(&sg, &ClientOptions::default()).unwrap();
    c.write(0, 0, &[1u8; 512]).unwrap();
    drop(c);
    assert!(daemon.stop().success());

    // With no disk at all, the daemon exits with status 1.
    let only_missing = format!(
        "disks:\n{}",
        file_disk_yaml("missing", &sm, &d.join("nope.img"), "")
    );
    let status = spawn_daemon(d, &only_missing).wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
}

#[test]
fn create_size_creates_a_sparse_image() {
    let dir = scratch();
    let d = dir.path();
    let img = d.join("new.img");
    let sock = d.join("new.sock");
    let cfg = format!(
        "disks:\n  - name: new\n    socket: {}\n    backend: {{type: file, path: {}, create_size: 3M}}\n",
        sock.display(),
        img.display()
    );
    let daemon = Daemon::start(d, &cfg);
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 3 * MIB);
    assert_eq!(meta.blocks(), 0, "sparse");
    let c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    assert_eq!(c.capacity(), 3 * MIB);
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn check_prints_disks_and_names_bad_keys() {
    let dir = scratch();
    let d = dir.path();
    let cfg = d.join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "disks:\n{}",
            file_disk_yaml("vm1", &d.join("s"), &d.join("i.img"), "    num_queues: 4\n")
        ),
    )
    .unwrap();
    let (status, out, _) = run_twinpath(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(status.success());
    assert!(
        out.contains("vm1") && out.contains("file ") && out.contains("     4 rw"),
        "{out}"
    );

    std::fs::write(
        &cfg,
        "disks:\n  - name: vm2\n    socket: /tmp/x.sock\n    backend: {type: file, path: /x.img, direkt: true}\n",
    )
    .unwrap();
    let (status, _, err) = run_twinpath(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2));
    assert!(
        err.contains("disk `vm2`") && err.contains("key `backend.direkt`"),
        "{err}"
    );

    std::fs::write(&cfg, "disks:\n  - name: vm3\n    socket: /tmp/y.sock\n    backend: {type: file, path: relative.img}\n").unwrap();
    let (status, _, err) = run_twinpath(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2));
    assert!(
        err.contains("key `backend.path`") && err.contains("absolute"),
        "{err}"
    );
}

#[test]
fn every_engine_serves_the_same_data() {
    for engine in ["inline", "uring", "threads"] {
        let dir = scratch();
        let backend = format!("      engine: {engine}\n");
        let (daemon, _img, sock) =
            serve_disk(dir.path(), 16 * MIB, "    num_queues: 2\n", &backend);
        assert_engine(&daemon, engine);
        let opts = ClientOptions {
            num_queues: 2,
            buffer_size: 32 * 65536,
            ..Default::default()
        };
        let mut c = Client::connect(&sock, &opts).unwrap();
        for i in 0..32 {
            c.buffer()[i * 65536..(i + 1) * 65536].copy_from_slice(&pattern(i as u64, 65536));
        }
        let writes: Vec<Req> = (0..32)
            .map(|i| Req {
                op: Op::Write,
                offset: (31 - i as u64) * 65536,
                len: 65536,
                buf_offset: i * 65536,
            })
            .collect();
        assert!(
            c.batch(0, &writes).unwrap().into_iter().all(|r| r.is_ok()),
            "{engine}"
        );
        c.flush(1).unwrap();
        c.write_zeroes(1, 0, 65536, false).unwrap();
        c.discard(1, 65536, 65536).unwrap();
        c.buffer().fill(0xaa);
        let reads: Vec<Req> = (0..32)
            .map(|i| Req {
                op: Op::Read,
                offset: i as u64 * 65536,
                len: 65536,
                buf_offset: i * 65536,
            })
            .collect();
        assert!(
            c.batch(1, &reads).unwrap().into_iter().all(|r| r.is_ok()),
            "{engine}"
        );
        for i in 0..32usize {
            let got = &c.buffer()[i * 65536..(i + 1) * 65536];
            if i < 2 {
                assert!(got.iter().all(|&b| b == 0), "{engine}: block {i} zeroed");
            } else {
                assert_eq!(
                    got,
                    &pattern(31 - i as u64, 65536)[..],
                    "{engine}: block {i}"
                );
            }
        }
        drop(c);
        assert!(daemon.stop().success(), "{engine}");
    }
}

/// Deep batches, over and over: the `uring` engine's worker polls its ring between rounds
/// (with `poll_us: 0` it sleeps instead); the `threads` engine's completions come from its
/// pool, so its worker never polls. A round that lost a wake would wait for the client's
/// reply timeout; data read back is checked against what was written.
#[test]
fn deep_queues_complete_with_and_without_polling() {
    const BLOCK: usize = 4096;
    const DEPTH: usize = 32;
    for (engine, poll) in [("uring", 50), ("uring", 0), ("threads", 50)] {
        let dir = scratch();
        let (daemon, _img, sock) = serve_disk(
            dir.path(),
            16 * MIB,
            &format!("    poll_us: {poll}\n"),
            &format!("      engine: {engine}\n"),
        );
        assert_engine(&daemon, engine);
        let opts = ClientOptions {
            buffer_size: DEPTH * BLOCK,
            ..Default::default()
        };
        let mut c = Client::connect(&sock, &opts).unwrap();
        let blocks = (16 * MIB) as usize / BLOCK;
        let mut model = vec![0u64; blocks];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        for round in 0..1000u64 {
            // Distinct blocks per batch, so the order within one does not matter.
            let mut picked = std::collections::BTreeSet::new();
            while picked.len() < DEPTH {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                picked.insert(rng as usize % blocks);
            }
            let write = round % 2 == 0;
            let reqs: Vec<Req> = picked
                .iter()
                .enumerate()
                .map(|(i, &b)| Req {
                    op: if write { Op::Write } else { Op::Read },
                    offset: (b * BLOCK) as u64,
                    len: BLOCK,
                    buf_offset: i * BLOCK,
                })
                .collect();
            if write {
                for (i, &b) in picked.iter().enumerate() {
                    model[b] = round * 100_000 + b as u64 + 1;
                    c.buffer()[i * BLOCK..(i + 1) * BLOCK]
                        .copy_from_slice(&pattern(model[b], BLOCK));
                }
            }
            let results = c.batch(0, &reqs).unwrap();
            assert!(
                results.iter().all(|r| r.is_ok()),
                "{engine}, poll_us {poll}, round {round}: {results:?}\ndaemon log:\n{}",
                daemon.log()
            );
            if !write {
                for (i, &b) in picked.iter().enumerate() {
                    let want = if model[b] == 0 {
                        vec![0; BLOCK]
                    } else {
                        pattern(model[b], BLOCK)
                    };
                    assert!(
                        c.buffer()[i * BLOCK..(i + 1) * BLOCK] == want[..],
                        "{engine}, poll {poll}: block {b} in round {round}"
                    );
                }
            }
        }
        drop(c);
        assert!(daemon.stop().success(), "{engine}");
    }
}

#[test]
fn direct_io_on_tmpfs_and_on_a_disk_filesystem() {
    // tmpfs (inline engine) and the work tree's filesystem (io_uring), both with O_DIRECT.
    let disk_dir = tempfile::Builder::new()
        .prefix("twinpath-direct-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    for (dir, engine) in [(scratch(), "inline"), (disk_dir, "uring")] {
        let (daemon, img, sock) = serve_disk(dir.path(), 8 * MIB, "", "      direct: true\n");
        assert_engine(&daemon, engine);
        let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
        let data = pattern(11, 256 * 1024);
        c.write(0, 4096 * 3, &data).unwrap();
        c.flush(0).unwrap();
        assert_eq!(c.read(0, 4096 * 3, data.len()).unwrap(), data, "{engine}");
        c.write_zeroes(0, 4096 * 3, 4096, false).unwrap();
        assert!(
            c.read(0, 4096 * 3, 4096).unwrap().iter().all(|&b| b == 0),
            "{engine}"
        );
        // Guest buffers that O_DIRECT cannot take as they are (odd addresses) go through a
        // bounce buffer.
        let odd = pattern(12, 8192);
        c.buffer()[1..1 + odd.len()].copy_from_slice(&odd);
        for (op, buf_offset) in [(Op::Write, 1), (Op::Read, 4099)] {
            let req = Req {
                op,
                offset: 4096 * 20,
                len: odd.len(),
                buf_offset,
            };
            c.batch(0, &[req]).unwrap().remove(0).unwrap();
        }
        assert_eq!(&c.buffer()[4099..4099 + odd.len()], &odd[..], "{engine}");
        // Larger than the bounce buffer (1 MiB): moved in pieces.
        let big = pattern(13, 2 * MIB as usize + 512 * 1024 + 4096);
        c.buffer()[1..1 + big.len()].copy_from_slice(&big);
        for (op, buf_offset) in [(Op::Write, 1), (Op::Read, 4099)] {
            let req = Req {
                op,
                offset: 4096 * 64,
                len: big.len(),
                buf_offset,
            };
            c.batch(0, &[req]).unwrap().remove(0).unwrap();
        }
        assert!(
            c.buffer()[4099..4099 + big.len()] == big[..],
            "{engine}: large bounced read"
        );
        drop(c);
        if engine == "uring" && block_fs(dir.path()) {
            // ext4 and xfs insist on aligned memory for O_DIRECT (tmpfs does not).
            assert!(daemon.log().contains("bounce buffer"), "{}", daemon.log());
        }
        let on_disk = std::fs::read(&img).unwrap();
        assert_eq!(&on_disk[4096 * 20..4096 * 22], &odd[..], "{engine}");
        assert!(
            on_disk[4096 * 64..4096 * 64 + big.len()] == big[..],
            "{engine}: large bounced write"
        );
        assert_eq!(
            &on_disk[4096 * 4..4096 * 4 + 4096],
            &data[4096..8192],
            "{engine}"
        );
        assert!(daemon.stop().success(), "{engine}");
    }
}

/// Serves `device` as a `file` disk with O_DIRECT; `disk_extra` are YAML lines for the disk.
fn serve_block_device(dir: &Path, device: &Path, disk_extra: &str) -> (Daemon, PathBuf) {
    let sock = dir.join("dev.sock");
    let cfg = format!(
        "disks:\n{}      direct: true\n",
        file_disk_yaml("dev", &sock, device, disk_extra)
    );
    (Daemon::start(dir, &cfg), sock)
}

#[test]
fn a_block_device_never_gets_the_inline_engine() {
    // A device node lives on devtmpfs; `auto` must look at the device, not at /dev.
    let lun = twinpath_tests::lun::LoopLun::new(512 << 20, twinpath_tests::lun::Fs::Ext4);
    let dir = scratch();
    let (daemon, sock) = serve_block_device(dir.path(), lun.device(), "");
    let log = daemon.log();
    let engine = log
        .lines()
        .find(|l| l.contains("I/O engine"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(!engine.contains("inline"), "{engine}");
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    assert_eq!(c.capacity(), 512 << 20);
    assert!(c.read(0, 0, 4096).is_ok());
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn block_device_io_on_the_queue_workers_survives_a_frontend_leaving_mid_batch() {
    // A block device gets io_uring, whose rings live on the device's queue workers: many
    // requests on two queues at once, then a frontend that goes away with requests in flight
    // (the worker exits and its ring is freed with them), then a new frontend.
    let mut lun = twinpath_tests::lun::LoopLun::new(512 << 20, twinpath_tests::lun::Fs::Ext4);
    lun.unmount();
    let dir = scratch();
    let (daemon, sock) = serve_block_device(dir.path(), lun.device(), "    num_queues: 2\n");
    assert_engine(&daemon, "uring");
    const BLOCK: usize = 65536;
    let opts = ClientOptions {
        num_queues: 2,
        buffer_size: 128 * BLOCK,
        ..Default::default()
    };
    let reqs = |op: Op, queue: usize| -> Vec<Req> {
        (0..64)
            .map(|i| Req {
                op,
                offset: ((queue * 64 + i) * BLOCK) as u64,
                len: BLOCK,
                buf_offset: (queue * 64 + i) * BLOCK,
            })
            .collect()
    };
    let expected: Vec<u8> = (0..128).flat_map(|i| pattern(i, BLOCK)).collect();
    let mut c = Client::connect(&sock, &opts).unwrap();
    c.buffer().copy_from_slice(&expected);
    for queue in 0..2 {
        let results = c.batch(queue, &reqs(Op::Write, queue)).unwrap();
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    }
    c.flush(0).unwrap();
    // Leave 64 reads in flight on each queue and hang up.
    c.buffer().fill(0);
    for queue in 0..2 {
        c.submit(queue, &reqs(Op::Read, queue)).unwrap();
    }
    drop(c);
    let mut c = Client::connect(&sock, &opts).unwrap();
    c.buffer().fill(0);
    for queue in 0..2 {
        let results = c.batch(queue, &reqs(Op::Read, queue)).unwrap();
        assert!(results.iter().all(|r| r.is_ok()), "{results:?}");
    }
    assert!(c.buffer() == &expected[..], "data read back differs");
    // And one request at a time, the batch of one the worker submits on its own.
    for i in 0..8 {
        let at = (i * 8 * BLOCK) as u64;
        assert_eq!(
            c.read(1, at, 4096).unwrap(),
            pattern(i as u64 * 8, BLOCK)[..4096]
        );
    }
    drop(c);
    let log = daemon.log();
    assert!(daemon.stop().success(), "{log}");
}

#[test]
fn stats_needs_metrics_listen_and_a_running_daemon() {
    let dir = scratch();
    let (daemon, _img, _sock) = one_disk(dir.path(), "");
    let cfg = dir.path().join("twinpath.yaml");
    let (status, _, err) = run_twinpath(&["stats", "--config", &cfg.to_string_lossy()]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("no `metrics.listen`"), "{err}");
    assert!(daemon.stop().success());

    // Nobody listening: a clear error, not a hang.
    let port = twinpath_tests::samba::free_port().to_string();
    let (status, _, err) = run_twinpath(&["stats", "--address", &format!("127.0.0.1:{port}")]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("is `twinpath serve` running"), "{err}");
}

/// qemu-storage-daemon exporting `img` read-write over vhost-user-blk at `sock`; it takes
/// QEMU's image locks on the file. Returns the process, or its exit status and stderr if it
/// stopped within a second (refused).
fn qsd(img: &Path, sock: &Path) -> Result<std::process::Child, String> {
    let mut child = std::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={}",
            img.display()
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={},writable=on",
            sock.display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("qemu-storage-daemon");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(1) {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return Err(format!("{status}: {err}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// twinpath and qemu-storage-daemon refuse each other's image, as two QEMUs would (QEMU's
/// OFD locks); before, both served it and wrote it at once.
#[test]
fn image_locks_keep_twinpath_and_qemu_storage_daemon_apart() {
    let dir = scratch();
    let (daemon, img, sock) = one_disk(dir.path(), "");
    let refused = qsd(&img, &dir.path().join("qsd.sock")).map(|mut c| {
        let _ = c.kill();
        let _ = c.wait();
    });
    let err = refused.expect_err("qemu-storage-daemon served an image twinpath writes");
    assert!(err.contains("lock"), "{err}");
    assert!(daemon.stop().success());

    // The other way round: qemu-storage-daemon first, twinpath refuses the disk.
    let mut q = qsd(&img, &dir.path().join("qsd.sock")).unwrap();
    let (status, _, err) = run_twinpath_serve_once(dir.path(), &img);
    let _ = q.kill();
    let _ = q.wait();
    assert!(!status.success());
    assert!(
        err.contains("is in use") && err.contains(&img.display().to_string()),
        "{err}"
    );
    drop(sock);
}

/// Serves one disk on `img` in a fresh directory; returns once the daemon exits (it does
/// when no disk could be opened): status, stdout, stderr.
fn run_twinpath_serve_once(dir: &Path, img: &Path) -> (std::process::ExitStatus, String, String) {
    let cfg = dir.join("second.yaml");
    std::fs::write(
        &cfg,
        format!(
            "disks:\n{}",
            file_disk_yaml("again", &dir.join("again.sock"), img, "")
        ),
    )
    .unwrap();
    run_twinpath(&["serve", "--config", cfg.to_str().unwrap()])
}

#[test]
fn two_disks_writing_one_image_are_a_config_error_unless_unlocked() {
    let dir = scratch();
    let img = dir.path().join("one.img");
    make_image(&img, MIB);
    let cfg = dir.path().join("t.yaml");
    let check = |a: &str, b: &str| {
        std::fs::write(
            &cfg,
            format!(
                "disks:\n{}{}",
                file_disk_yaml("a", &dir.path().join("a.sock"), &img, a),
                file_disk_yaml("b", &dir.path().join("b.sock"), &img, b)
            ),
        )
        .unwrap();
        run_twinpath(&["check", "--config", cfg.to_str().unwrap()])
    };
    let (status, _, err) = check("", "    read_only: true\n");
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("disk `a`'s too") && err.contains("lock: false"),
        "{err}"
    );
    let (status, _, err) = check("    read_only: true\n", "    read_only: true\n");
    assert!(status.success(), "two readers: {err}");
    let (status, _, err) = check("    lock: false\n", "    lock: false\n");
    assert!(status.success(), "unlocked: {err}");
}
