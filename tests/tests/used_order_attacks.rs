//! Attacks on the used ring's order (01255d2, crates/vhost-blk/src/order.rs): a daemon killed
//! at any moment must leave a used ring that the next one resumes exactly (QEMU restarts the
//! queue at the used index), a hostile frontend must not turn the line of waiting requests
//! into a hang, a CPU or a memory sink, and GET_VRING_BASE, SIGTERM and EVENT_IDX must still
//! complete every request once, in the order it was made available.
//!
//! Real parts only: the real daemon, a raw vhost-user frontend (tests/src/frontend.rs), a
//! private smbd, loop LUNs; each test starts what it needs and stops it by PID.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinpath_tests::frontend::{RawFrontend, Seg, DATA};
use twinpath_tests::relay::LatencyRelay;
use twinpath_tests::samba::{Samba, SHARE};
use twinpath_tests::*;

const MIB: u64 = 1 << 20;
/// Requests of one round use one data slot each.
const SLOT: u64 = 256 << 10;
/// The frontend's ring size (tests/src/frontend.rs).
const RING: u16 = 256;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const STATUS_UNSET: u8 = 0xff;

/// xorshift64*: reproducible rounds (the seed is printed).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::env::var("USED_ORDER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        })
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Read,
    Write,
    GetId,
    Flush,
}

/// One request of a round, as the guest made it.
struct Posted {
    n: u16,
    kind: Kind,
    offset: u64,
    len: usize,
    addr: u64,
    /// Its head, as the available ring named it.
    head: u16,
    /// What a write writes.
    data: Vec<u8>,
}

/// A guest's view of its disk: what every byte must hold, given the writes it saw completed.
struct Workload {
    rng: Rng,
    model: Vec<u8>,
    /// Whether the disk takes FLUSH (it answers UNSUPP otherwise).
    flush_ok: bool,
}

impl Workload {
    /// `n` requests of every kind and of sizes from 512 bytes to 256 KiB, in data slots
    /// 0..n, none of them touching a block another of them touches (a guest does not race its
    /// own reads and writes).
    fn plan(&mut self, n: usize) -> Vec<(Kind, u64, usize)> {
        let sizes = [512usize, 4096, 4096, 16384, 65536, 131072, 262144];
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let cap = self.model.len() as u64;
        (0..n)
            .map(|_| {
                let pick = self.rng.below(10);
                let kind = match pick {
                    0..=3 => Kind::Write,
                    4..=6 => Kind::Read,
                    7 | 8 => Kind::GetId,
                    _ if self.flush_ok => Kind::Flush,
                    _ => Kind::GetId,
                };
                if matches!(kind, Kind::GetId | Kind::Flush) {
                    return (kind, 0, 0);
                }
                let len = sizes[self.rng.below(sizes.len() as u64) as usize];
                for _ in 0..32 {
                    let offset = self.rng.below((cap - len as u64) / 4096) * 4096;
                    let end = offset + len as u64;
                    if taken.iter().all(|&(s, e)| end <= s || offset >= e) {
                        taken.push((offset, end));
                        return (kind, offset, len);
                    }
                }
                (Kind::GetId, 0, 0)
            })
            .collect()
    }
}

/// Posts request `kind` at `offset` with its data in slot `slot`; returns what was posted.
fn post(
    f: &mut RawFrontend,
    w: &mut Workload,
    next: u16,
    slot: u64,
    (kind, offset, len): (Kind, u64, usize),
) -> Posted {
    let addr = DATA + slot * SLOT;
    let mut written = Vec::new();
    let n = match kind {
        Kind::Read => {
            f.fill(addr, len, 0xcc);
            f.read(
                offset / 512,
                &[Seg {
                    addr,
                    len: len as u32,
                    write: true,
                }],
            )
        }
        Kind::Write => {
            written = pattern(w.rng.next(), len);
            f.write_bytes(addr, &written);
            f.write_req(
                offset / 512,
                &[Seg {
                    addr,
                    len: len as u32,
                    write: false,
                }],
                STATUS_UNSET,
            )
        }
        Kind::GetId => f.get_id(addr),
        Kind::Flush => {
            f.write_bytes(f.status_addr(next), &[STATUS_UNSET]);
            f.post(VIRTIO_BLK_T_FLUSH, 0, &[], f.status_addr(next))
        }
    };
    assert_eq!(n, next, "request numbers out of step");
    Posted {
        n,
        kind,
        offset,
        len,
        addr,
        head: f.head(n),
        data: written,
    }
}

/// The used ring entry at used index `i` (its head), as the device wrote it.
fn used_head(f: &RawFrontend, i: u16) -> u16 {
    let at = 0x2000 + 4 + u64::from(i % RING) * 8;
    f.read_u16(at)
}

/// Checks that used entries `from..to` name requests `from..to`, in that order: each request
/// once, none ahead of an earlier one. Returns the first mismatch.
fn in_order(f: &RawFrontend, from: u16, to: u16) -> Result<(), String> {
    let mut i = from;
    while i != to {
        let (got, want) = (used_head(f, i), f.head(i));
        if got != want {
            return Err(format!(
                "used entry {i} is head {got}, request {i} has head {want}"
            ));
        }
        i = i.wrapping_add(1);
    }
    Ok(())
}

/// Where a round stands when the daemon is killed.
#[derive(Default, Debug)]
struct Figures {
    rounds: usize,
    requests: usize,
    in_flight_at_kill: usize,
    /// Finished (status written) but not in the used ring when killed: the line held them.
    held_back_at_kill: usize,
    rounds_with_held_back: usize,
    replayed_writes_guarded: usize,
    /// The longest the dead daemon's image lock was still held after it was reaped.
    lock_lingered: Duration,
    slowest_recovery: Duration,
}

/// Kill -9 loop: each round makes `batch` requests available, kills the daemon `0..kill_us`
/// after the kick, lets the guest reuse the buffers of every request the used ring holds
/// (a write buffer gets other data: a replayed write would put it on disk), starts a new
/// daemon on the same config and reconnects as QEMU does (queue resumed at the used index).
/// Checks that the used ring holds every request exactly once, in order, that reads saw the
/// data of the last completed writes, and that the image holds exactly the model.
#[allow(clippy::too_many_arguments)]
fn kill_loop(
    dir: &Path,
    cfg: &Path,
    sock: &Path,
    image: &Path,
    model: Vec<u8>,
    event_idx: bool,
    rounds: usize,
    kill_us: u64,
) -> Figures {
    let seed = seed();
    let rounds = std::env::var("USED_ORDER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(rounds);
    eprintln!("seed {seed} (USED_ORDER_SEED to repeat)");
    let mut w = Workload {
        rng: Rng(seed),
        model,
        flush_ok: true,
    };
    let gen_dir = |g: usize| -> PathBuf {
        let d = dir.join(format!("gen{g}"));
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let mut daemon = Daemon::start_with(cfg, &gen_dir(0));
    let mut f = if event_idx {
        RawFrontend::connect_event_idx(sock, 64 * SLOT as usize)
    } else {
        RawFrontend::connect(sock, 64 * SLOT as usize)
    };
    let mut next: u16 = 0;
    let mut fig = Figures::default();
    for round in 0..rounds {
        let first = next;
        let batch = 8 + w.rng.below(40) as usize;
        let plan = w.plan(batch);
        let mut posted = Vec::new();
        for (slot, p) in plan.into_iter().enumerate() {
            posted.push(post(&mut f, &mut w, next, slot as u64, p));
            next = next.wrapping_add(1);
            // A guest kicks as it goes: some requests are running before others exist.
            if w.rng.below(8) == 0 {
                f.kick();
            }
        }
        f.kick();
        let wait = w.rng.below(kill_us);
        let t = Instant::now();
        while t.elapsed() < Duration::from_micros(wait) {
            std::hint::spin_loop();
        }
        daemon.kill();
        fig.rounds += 1;
        fig.requests += posted.len();

        // What the dead daemon left. A guest knows a request done by its head in the used
        // ring: each such one must carry its status, and only those may be taken as done.
        let used = f.used();
        let done = used.wrapping_sub(first);
        assert!(
            usize::from(done) <= posted.len(),
            "round {round}: used index {used} beyond the {} requests made",
            posted.len()
        );
        let heads_at_kill: Vec<u16> = (0..done)
            .map(|i| used_head(&f, first.wrapping_add(i)))
            .collect();
        let completed: Vec<&Posted> = posted
            .iter()
            .filter(|p| heads_at_kill.contains(&p.head))
            .collect();
        assert_eq!(
            completed.len(),
            heads_at_kill.len(),
            "round {round}: used entries {heads_at_kill:?} name heads no request of the round has"
        );
        for p in &completed {
            let status = f.status(p.n);
            assert!(
                status == 0 || (p.kind == Kind::Flush && status == 2),
                "round {round}: request {} ({:?}) used with status {status:#x}",
                p.n,
                p.kind
            );
        }
        // And the order: exactly the first `done` requests, as the next daemon assumes.
        in_order(&f, first, used).unwrap_or_else(|e| panic!("round {round} at the kill: {e}"));
        let held = posted
            .iter()
            .filter(|p| !heads_at_kill.contains(&p.head) && f.status(p.n) != STATUS_UNSET)
            .count();
        fig.in_flight_at_kill += posted.len() - usize::from(done);
        fig.held_back_at_kill += held;
        fig.rounds_with_held_back += usize::from(held > 0);
        // The guest takes what the used ring gave it back: reads are checked now, and the
        // buffers of completed writes get other data (as freed pages would).
        for p in &completed {
            check_read(&f, &w, p, round);
            if p.kind == Kind::Write {
                f.fill(p.addr, p.len, 0xee);
                fig.replayed_writes_guarded += 1;
            }
        }

        let t = Instant::now();
        // The dead daemon's image lock outlives it while its io_uring's last operations
        // finish (see `a_daemon_restarted_while_its_killed_predecessors_writes_are_stuck_serves_once_they_land`): wait for it.
        while write_lock_held(image) {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "image lock held 10 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        fig.lock_lingered = fig.lock_lingered.max(t.elapsed());
        daemon = Daemon::start_with(cfg, &gen_dir(round + 1));
        f.reconnect(sock)
            .unwrap_or_else(|e| panic!("round {round}: reconnect: {e}"));
        f.kick();
        let all = f.wait_used(next, Duration::from_secs(20));
        fig.slowest_recovery = fig.slowest_recovery.max(t.elapsed());
        assert!(
            all && f.used() == next,
            "round {round}: used {} of {next} after the restart\n{}",
            f.used(),
            daemon.log()
        );
        // Each request of the round once in the used ring: none taken twice, none lost.
        for p in &posted {
            let times = (0..next.wrapping_sub(first))
                .filter(|&i| used_head(&f, first.wrapping_add(i)) == p.head)
                .count();
            assert_eq!(
                times, 1,
                "round {round}: request {} ({:?}, head {}) is in the used ring {times} times",
                p.n, p.kind, p.head
            );
        }
        in_order(&f, first, next).unwrap_or_else(|e| panic!("round {round} after restart: {e}"));
        for p in &posted {
            let status = f.status(p.n);
            assert!(
                status == 0 || (p.kind == Kind::Flush && status == 2),
                "round {round}: request {} ({:?}) status {status:#x}",
                p.n,
                p.kind
            );
            if p.kind == Kind::Flush && status == 2 {
                w.flush_ok = false;
            }
            check_read(&f, &w, p, round);
        }
        for p in posted.iter().filter(|p| p.kind == Kind::Write) {
            w.model[p.offset as usize..][..p.len].copy_from_slice(&p.data);
        }
        check_image(image, &w.model, &posted, round);
        // The next round's first request comes after a quiet ring: nothing may be
        // taken again.
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(f.used(), next, "round {round}: a request was used twice");
    }
    drop(f);
    assert!(daemon.stop().success());
    let on_disk = std::fs::read(image).unwrap();
    assert!(
        on_disk == w.model,
        "the image differs from the model at byte {:?}",
        on_disk.iter().zip(&w.model).position(|(a, b)| a != b)
    );
    fig
}

fn check_read(f: &RawFrontend, w: &Workload, p: &Posted, round: usize) {
    if p.kind != Kind::Read {
        return;
    }
    let mut got = vec![0u8; p.len];
    f.read_bytes(p.addr, &mut got);
    let want = &w.model[p.offset as usize..][..p.len];
    assert!(
        got == want,
        "round {round}: read {} of {} bytes at {} saw other data (first difference at {:?})",
        p.n,
        p.len,
        p.offset,
        got.iter().zip(want).position(|(a, b)| a != b)
    );
}

/// The image holds, for every write of the round, exactly what was written (and nothing a
/// scribbled buffer held).
fn check_image(image: &Path, model: &[u8], posted: &[Posted], round: usize) {
    let on_disk = std::fs::read(image).unwrap();
    for p in posted.iter().filter(|p| p.kind == Kind::Write) {
        let range = p.offset as usize..p.offset as usize + p.len;
        assert!(
            on_disk[range.clone()] == model[range.clone()],
            "round {round}: write {} at {} does not hold its data",
            p.n,
            p.offset
        );
        assert!(
            !on_disk[range].iter().all(|&b| b == 0xee),
            "round {round}: write {} replayed from a reused buffer",
            p.n
        );
    }
}

/// A file disk, O_DIRECT on the machine's ext4 (real device latency: requests of different
/// sizes finish out of order), with `disk_extra` in its config, killed 40 times at random
/// moments with up to 47 requests made available; `event_idx` as the frontend acks it.
fn file_disk_kill_loop(seed: u64, disk_extra: &str, event_idx: bool) {
    let dir = scratch();
    let disk_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let image = disk_dir.path().join("vm.img");
    let model = pattern(seed, 64 * MIB as usize);
    std::fs::write(&image, &model).unwrap();
    let sock = dir.path().join("vm.sock");
    let cfg = dir.path().join("twinpath.yaml");
    std::fs::write(
        &cfg,
        format!(
            "disks:\n{}      direct: true\n",
            file_disk_yaml("vm", &sock, &image, disk_extra)
        ),
    )
    .unwrap();
    let fig = kill_loop(dir.path(), &cfg, &sock, &image, model, event_idx, 40, 3000);
    eprintln!("{fig:#?}");
    assert!(
        fig.in_flight_at_kill > 0,
        "no kill caught a request in flight"
    );
}

#[test]
fn a_file_disk_killed_at_random_moments_resumes_every_request_once_in_order() {
    file_disk_kill_loop(5, "", false);
}

/// The same with EVENT_IDX (the device re-arms notifications and looks again) and two queues
/// configured (the frontend drives queue 0).
#[test]
fn a_file_disk_with_event_idx_killed_at_random_moments_resumes_every_request_once_in_order() {
    file_disk_kill_loop(6, "    num_queues: 2\n", true);
}

/// An `smb` disk on a private smbd behind a relay adding 1 ms each way (requests in flight
/// at the server, finishing out of order by size; GET_ID never waits), killed 30 times.
#[test]
fn an_smb_disk_killed_at_random_moments_resumes_every_request_once_in_order() {
    let smb = Samba::start();
    let relay = LatencyRelay::start(smb.addr(), Duration::from_millis(1));
    let dir = scratch();
    let model = pattern(7, 64 * MIB as usize);
    let image = smb.share_dir().join("vm.raw");
    std::fs::write(&image, &model).unwrap();
    let sock = dir.path().join("vm.sock");
    let cfg = dir.path().join("twinpath.yaml");
    let disk = smb_yaml("vm", &sock, relay.addr(), "vm.raw");
    std::fs::write(&cfg, format!("disks:\n{disk}      section_size: 64K\n")).unwrap();
    let fig = kill_loop(dir.path(), &cfg, &sock, &image, model, true, 30, 20_000);
    eprintln!("{fig:#?}");
    assert!(
        fig.held_back_at_kill > 0,
        "no kill caught a finished request held back"
    );
    drop(relay);
}

/// Whether someone holds an OFD lock on byte 201 of `image` (twinpath's and QEMU's "does not
/// share write" byte).
fn write_lock_held(image: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(image).unwrap();
    // SAFETY: a zeroed flock filled in below, passed to fcntl on our own descriptor.
    unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = libc::F_WRLCK as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = 201;
        fl.l_len = 1;
        assert_eq!(libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl), 0);
        fl.l_type != libc::F_UNLCK as i16
    }
}

fn freeze(dir: &Path, on: bool) {
    let st = std::process::Command::new("fsfreeze")
        .arg(if on { "-f" } else { "-u" })
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Thaws the filesystem at `dir` when dropped, so that a failing test leaves no frozen mount.
struct Frozen(PathBuf, bool);

impl Frozen {
    fn new(dir: &Path) -> Frozen {
        freeze(dir, true);
        Frozen(dir.to_path_buf(), true)
    }

    fn thaw(&mut self) {
        if std::mem::take(&mut self.1) {
            freeze(&self.0, false);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// Continues smbd's process group when dropped, so that a failing test leaves no frozen smbd.
struct Stopped(u32, bool);

impl Stopped {
    fn new(smb: &Samba) -> Stopped {
        signal_group(smb.pid(), libc::SIGSTOP);
        Stopped(smb.pid(), true)
    }

    fn cont(&mut self) {
        if std::mem::take(&mut self.1) {
            signal_group(self.0, libc::SIGCONT);
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        self.cont();
    }
}

/// A one-disk `smb` config line set for `path` on `smb`'s share.
fn smb_yaml(name: &str, sock: &Path, server: impl std::fmt::Display, path: &str) -> String {
    format!(
        "  - name: {name}\n    socket: {}\n    backend:\n      type: smb\n      server: {server}\n      \
         share: {SHARE}\n      path: {path}\n",
        sock.display()
    )
}

/// A storage stall at the moment the daemon dies (its last O_DIRECT writes sit in the kernel:
/// a frozen filesystem here; a slow SAN or NFS server, a snapshot freeze elsewhere). The dead
/// daemon cannot be reaped, and its image lock (QEMU's OFD locks) stays held, until they land.
/// The supervisor starts a new daemon meanwhile, as it would after any crash. The lock is
/// right to keep the new one off the image until the old writes landed (else they could land
/// over newer ones); but the new daemon does not wait: "image is in use ... no disk could be
/// opened; exiting" - and the guest, whose requests the dead daemon held, hangs for good
/// unless someone starts the daemon again by hand. Even without a freeze the lock outlives a
/// killed daemon by 5 to 60 ms (its io_uring is torn down after the reap): the kill loop
/// above met a new daemon exiting on it in its second round before it waited for the lock.
/// That was the code this test was written against; the file plugin now waits (up to 30 s)
/// while no live process but itself has the image open (`LockError::InUse { exiting }`).
#[test]
fn a_daemon_restarted_while_its_killed_predecessors_writes_are_stuck_serves_once_they_land() {
    use twinpath_tests::lun::{Fs, LoopLun};
    let dir = scratch();
    let lun = LoopLun::new(256 * MIB, Fs::Ext4);
    let mnt = lun.mount_point();
    let image = mnt.join("vm.img");
    let mut model = pattern(8, 16 * MIB as usize);
    std::fs::write(&image, &model).unwrap();
    let sock = dir.path().join("vm.sock");
    let config = format!(
        "disks:\n{}      direct: true\n",
        file_disk_yaml("vm", &sock, &image, "")
    );
    let daemon = Daemon::start(dir.path(), &config);
    let mut f = RawFrontend::connect(&sock, 64 * SLOT as usize);
    let mut frozen = Frozen::new(&mnt);
    let mut writes = Vec::new();
    for i in 0..4u64 {
        let data = pattern(100 + i, 4096);
        f.write_bytes(DATA + i * 4096, &data);
        let n = f.write_req(
            i * 64,
            &[Seg {
                addr: DATA + i * 4096,
                len: 4096,
                write: false,
            }],
            STATUS_UNSET,
        );
        writes.push((n, i * 64 * 512, data));
    }
    let id = f.get_id(DATA + MIB);
    f.kick();
    assert!(twinpath_core::wait_until(Duration::from_secs(5), || f
        .status(id)
        == 0));
    assert_eq!(f.used(), 0, "a write finished on a frozen filesystem");

    // The daemon dies; it is reaped only once its writes land.
    let killer = std::thread::spawn(move || daemon.kill());
    std::thread::sleep(Duration::from_millis(300));
    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let mut next = spawn_daemon(&second, &config);
    std::thread::sleep(Duration::from_millis(700));
    let exited_early = !next.is_running();
    frozen.thaw();
    killer.join().unwrap();
    let t = Instant::now();
    let served = twinpath_core::wait_until(Duration::from_secs(10), || {
        next.log().contains("ready:") || !next.is_running()
    }) && next.is_running();
    assert!(
        served && !exited_early,
        "a daemon started while its killed predecessor's writes were stuck (storage frozen \
         700 ms) did not wait for them: running after the thaw {served}, exited while frozen \
         {exited_early}:\n{}",
        next.log()
    );
    eprintln!("served {:?} after the thaw", t.elapsed());
    f.reconnect(&sock).unwrap();
    f.kick();
    assert!(f.wait_used(5, Duration::from_secs(10)), "used {}", f.used());
    in_order(&f, 0, 5).unwrap();
    for (n, offset, data) in &writes {
        assert_eq!(f.status(*n), 0);
        model[*offset as usize..][..4096].copy_from_slice(data);
    }
    drop(f);
    assert!(next.stop().success());
    assert!(std::fs::read(&image).unwrap() == model);
}

/// Four O_DIRECT writes stuck at the worker's own io_uring (frozen filesystem: the worker
/// polls while 4 or more are in flight there), a line as long as the ring (refused heads
/// beyond the table wait in it behind the writes), and one entry more made available, the
/// frontend kicking once a millisecond. At each kick the worker's polling loop
/// (`poll_while_busy`) takes that entry for new work at every turn, calls `process`, which
/// pops nothing since the line is full, resets its polling deadline and goes round again
/// until the thread is preempted: ~90-98 % of a CPU (175-196 ticks in 2 s) for as long as
/// the storage stalls, against 10-14 ticks with the line full and nothing more made
/// available. Before the line the entry would have been popped (and refused).
/// That was the code this test was written against; the worker now counts waiting entries
/// as no work while the queue has no room (`Queue::no_room`).
#[test]
fn a_full_line_with_one_more_entry_made_available_spins_no_worker() {
    use twinpath_tests::lun::{Fs, LoopLun};
    let dir = scratch();
    let lun = LoopLun::new(256 * MIB, Fs::Ext4);
    let mnt = lun.mount_point();
    let image = mnt.join("vm.img");
    std::fs::write(&image, vec![0u8; 16 * MIB as usize]).unwrap();
    let sock = dir.path().join("vm.sock");
    let daemon = Daemon::start(
        dir.path(),
        &format!(
            "disks:\n{}      direct: true\n",
            file_disk_yaml("vm", &sock, &image, "")
        ),
    );
    assert!(
        daemon.log().contains("engine=\"uring\""),
        "{}",
        daemon.log()
    );
    let pid = daemon.pid();
    let mut f = RawFrontend::connect(&sock, 64 * SLOT as usize);
    let mut frozen = Frozen::new(&mnt);
    for i in 0..4u64 {
        f.write_req(
            i * 8,
            &[Seg {
                addr: DATA + i * 4096,
                len: 4096,
                write: false,
            }],
            STATUS_UNSET,
        );
    }
    f.kick();
    std::thread::sleep(Duration::from_millis(300));
    // 252 heads beyond the descriptor table: refused, finished, in line behind the writes.
    for i in 0..(RING - 4) {
        f.publish_head(RING + 44 + i);
    }
    f.kick();
    std::thread::sleep(Duration::from_millis(300));
    // The frontend kicks once a millisecond while the daemon's CPU time is measured (it
    // spends next to nothing itself).
    let busy = |f: &RawFrontend, secs: u64| {
        let c0 = cpu_ticks(pid);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(secs) {
            f.kick();
            std::thread::sleep(Duration::from_millis(1));
        }
        cpu_ticks(pid) - c0
    };
    let full = busy(&f, 2);
    f.publish_head(1000);
    f.kick();
    std::thread::sleep(Duration::from_millis(200));
    let waiting = busy(&f, 2);
    frozen.thaw();
    let n = {
        std::thread::sleep(Duration::from_millis(300));
        let n = f.get_id(DATA + MIB);
        f.kick();
        n
    };
    let recovered = f.wait_used(5, Duration::from_secs(5));
    eprintln!(
        "CPU ticks (100/s): line full {full} in 2 s; one more entry waiting {waiting} in 2 s; \
         recovered {recovered} (used {})",
        f.used()
    );
    assert!(recovered && f.status(n) == 0, "the queue did not recover");
    // The writes, then the GET_ID: the refused heads have no used entry.
    assert_eq!(f.used_heads(), [0, 3, 6, 9, 12]);
    drop(f);
    assert!(daemon.stop().success());
    assert!(
        waiting < 50,
        "the daemon burnt {waiting} CPU ticks in 2 s (100 = one CPU for 1 s; {full} with the \
         line full and nothing more made available) with its storage stalled"
    );
}

/// A daemon with one `smb` disk (`vm.raw`, 4 MiB of pattern 41) on `smb`, directly.
fn smb_daemon(dir: &Path, smb: &Samba) -> (Daemon, PathBuf, Vec<u8>) {
    let image = pattern(41, 4 * MIB as usize);
    std::fs::write(smb.share_dir().join("vm.raw"), &image).unwrap();
    let sock = dir.join("vm.sock");
    let daemon = Daemon::start(
        dir,
        &format!("disks:\n{}", smb_yaml("vm", &sock, smb.addr(), "vm.raw")),
    );
    (daemon, sock, image)
}

/// A 64 KiB READ at sector 8 held at a frozen smbd, then `ids` GET_IDs, which finish at once
/// and wait in line behind it. Returns the read's and the GET_IDs' numbers.
fn read_held_then_get_ids(f: &mut RawFrontend, ids: u16) -> (u16, Vec<u16>) {
    let read = f.read(
        8,
        &[Seg {
            addr: DATA,
            len: 65536,
            write: true,
        }],
    );
    let get_ids: Vec<u16> = (0..ids)
        .map(|i| f.get_id(DATA + 65536 + u64::from(i) * 32))
        .collect();
    f.kick();
    assert!(
        twinpath_core::wait_until(Duration::from_secs(10), || get_ids
            .iter()
            .all(|&n| f.status(n) == 0)),
        "GET_IDs not answered while smbd was frozen"
    );
    assert_eq!(
        f.status(read),
        STATUS_UNSET,
        "the read finished at a frozen smbd"
    );
    assert_eq!(
        f.used(),
        0,
        "a GET_ID went into the used ring ahead of the read"
    );
    (read, get_ids)
}

/// GET_VRING_BASE (QEMU stopping the queue: VM paused, vhost stopped) while a read is held at a
/// frozen smbd and ten finished GET_IDs wait in line behind it; smbd continues 1.5 s later.
/// The answer must come once the read finished, with every request in the used ring, in
/// order, by the time it comes (QEMU reads the used index right after); and the queue
/// resumed at that base serves on.
#[test]
fn get_vring_base_with_requests_in_line_answers_once_they_are_all_used() {
    let mut smb = Samba::start();
    let dir = scratch();
    let (daemon, sock, image) = smb_daemon(dir.path(), &smb);
    let mut f = RawFrontend::connect(&sock, MIB as usize);
    let mut stopped = Stopped::new(&smb);
    let (read, _) = read_held_then_get_ids(&mut f, 10);
    let pid = smb.pid();
    let thaw = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        signal_group(pid, libc::SIGCONT);
    });
    let (base, took) = f.get_vring_base_timed();
    let used_at_answer = f.used();
    thaw.join().unwrap();
    stopped.cont();
    eprintln!("GET_VRING_BASE {base:?} after {took:?}, used {used_at_answer}");
    assert_eq!(base, Ok(11));
    assert!(
        took >= Duration::from_millis(1400),
        "answered after {took:?}"
    );
    assert_eq!(
        used_at_answer, 11,
        "QEMU would read a used index short of the base"
    );
    in_order(&f, 0, 11).unwrap();
    assert_eq!(f.status(read), 0);
    let mut got = vec![0u8; 65536];
    f.read_bytes(DATA, &mut got);
    assert!(got == image[8 * 512..][..65536]);

    f.resume_queue(11).unwrap();
    let n = f.get_id(DATA + 65536);
    f.kick();
    assert!(f.wait_used(12, Duration::from_secs(5)), "used {}", f.used());
    assert_eq!((used_head(&f, 11), f.status(n)), (f.head(n), 0));
    drop(f);
    assert!(daemon.stop().success());
    smb.kill();
}

/// GET_VRING_BASE gives up after 30 s (the device's STOP_TIMEOUT) on a write stuck on a
/// frozen filesystem (an smb disk's own I/O timeout answers before that, so a file disk
/// here): the write is detached (it finishes without a used entry, by design). Ten GET_IDs
/// made available after it had *finished* (status byte written) within milliseconds and
/// waited in line; `stop_vring` forgets the line, so they never enter the used ring either.
/// QEMU took the base (every request before it handed over) and resumes the queue there: the
/// guest waits for ten requests that were done. Before the line they were in the used ring
/// within microseconds. (~35 s: the stop timeout is a constant.)
/// That was the code this test was written against; now a stop that gives up rewinds the
/// queue to its used index, so the frontend makes the whole line available again.
#[test]
fn get_vring_base_giving_up_on_a_stuck_request_loses_no_finished_one() {
    use twinpath_tests::lun::{Fs, LoopLun};
    let dir = scratch();
    let lun = LoopLun::new(256 * MIB, Fs::Ext4);
    let mnt = lun.mount_point();
    let image = mnt.join("vm.img");
    std::fs::write(&image, vec![0u8; 16 * MIB as usize]).unwrap();
    let sock = dir.path().join("vm.sock");
    let daemon = Daemon::start(
        dir.path(),
        &format!(
            "disks:\n{}      direct: true\n",
            file_disk_yaml("vm", &sock, &image, "")
        ),
    );
    let mut f = RawFrontend::connect(&sock, MIB as usize);
    let mut frozen = Frozen::new(&mnt);
    f.fill(DATA, 4096, 0xab);
    let write = f.write_req(
        8,
        &[Seg {
            addr: DATA,
            len: 4096,
            write: false,
        }],
        STATUS_UNSET,
    );
    let get_ids: Vec<u16> = (0..10u64).map(|i| f.get_id(DATA + 8192 + i * 32)).collect();
    f.kick();
    assert!(twinpath_core::wait_until(Duration::from_secs(5), || {
        get_ids.iter().all(|&n| f.status(n) == 0)
    }));
    assert_eq!((f.used(), f.status(write)), (0, STATUS_UNSET));
    let (base, took) = f.get_vring_base_timed();
    let used_at_answer = f.used();
    eprintln!("GET_VRING_BASE {base:?} after {took:?}, used {used_at_answer}");
    // QEMU resumes the queue at the base it got (VM continued); the storage comes back.
    let base = base.unwrap() as u16;
    f.resume_queue(base).unwrap();
    frozen.thaw();
    let n = f.get_id(DATA + 8192 + 11 * 32);
    f.kick();
    let new_head = f.head(n);
    let served = twinpath_core::wait_until(Duration::from_secs(10), || {
        f.used_heads().contains(&new_head)
    });
    std::thread::sleep(Duration::from_millis(500));
    let heads = f.used_heads();
    let lost: Vec<u16> = get_ids
        .iter()
        .copied()
        .filter(|&g| heads.iter().filter(|&&h| h == f.head(g)).count() != 1)
        .collect();
    eprintln!(
        "used after the resume at {base}: {heads:?}; write status {:#x}; new GET_ID served \
         {served}",
        f.status(write)
    );
    drop(f);
    assert!(daemon.stop().success());
    assert!(
        lost.is_empty(),
        "{} requests finished (status 0) long before GET_VRING_BASE answered, yet are not in \
         the used ring once (none: lost) after the queue resumed at base {base}: requests \
         {lost:?}",
        lost.len()
    );
    assert!(
        served && heads.contains(&new_head),
        "the queue did not serve on"
    );
}

/// SIGTERM (graceful stop: drain) while a read is held at a frozen smbd and ten finished
/// GET_IDs wait in line behind it; smbd continues a second later. The daemon must put all
/// eleven in the used ring, in order, before it goes, and exit cleanly.
#[test]
fn sigterm_with_requests_in_line_uses_them_all_before_exiting() {
    let mut smb = Samba::start();
    let dir = scratch();
    let (daemon, sock, image) = smb_daemon(dir.path(), &smb);
    let mut f = RawFrontend::connect(&sock, MIB as usize);
    let mut stopped = Stopped::new(&smb);
    let (read, _) = read_held_then_get_ids(&mut f, 10);
    let t = Instant::now();
    signal(daemon.pid(), libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(f.used(), 0);
    stopped.cont();
    let status = daemon.wait_exit(Duration::from_secs(20));
    eprintln!(
        "exited {status} {:?} after SIGTERM, used {}",
        t.elapsed(),
        f.used()
    );
    assert!(status.success());
    assert_eq!(f.used(), 11, "the drain left requests out of the used ring");
    in_order(&f, 0, 11).unwrap();
    assert_eq!(f.status(read), 0);
    let mut got = vec![0u8; 65536];
    f.read_bytes(DATA, &mut got);
    assert!(got == image[8 * 512..][..65536]);
    smb.kill();
}

/// A hostile frontend works the line while a read is held at a frozen smbd: heads already in
/// flight made available again (the held read's, and a finished GET_ID's that waits in
/// line), heads beyond the ring (tracked and untracked: 300, 1023, 5000, 65535), 40 valid
/// GET_IDs, more entries than the ring has, kicked once a millisecond for 2 s. The daemon's
/// memory and CPU stay flat, another disk of the same daemon keeps serving a real client,
/// and once smbd continues the queue gives every valid request its used entry, in order, and
/// serves new ones.
#[test]
fn a_hostile_frontend_working_the_line_costs_nothing_and_the_queue_recovers() {
    let mut smb = Samba::start();
    let dir = scratch();
    let image = pattern(41, 4 * MIB as usize);
    std::fs::write(smb.share_dir().join("vm.raw"), &image).unwrap();
    let (sock, osock) = (dir.path().join("vm.sock"), dir.path().join("other.sock"));
    let other = dir.path().join("other.img");
    make_image(&other, 16 * MIB);
    let daemon = Daemon::start(
        dir.path(),
        &format!(
            "disks:\n{}{}",
            smb_yaml("vm", &sock, smb.addr(), "vm.raw"),
            file_disk_yaml("other", &osock, &other, "")
        ),
    );
    let pid = daemon.pid();
    let mut f = RawFrontend::connect(&sock, MIB as usize);
    let mut stopped = Stopped::new(&smb);
    let (read, get_ids) = read_held_then_get_ids(&mut f, 40);
    let (held_read, waiting_id) = (f.head(read), f.head(get_ids[5]));
    // The heads the used ring must show, read before the waves wrap the available ring.
    let mut want = vec![f.head(read)];
    want.extend(get_ids.iter().map(|&g| f.head(g)));
    let before = rss_anon(pid);
    let c0 = cpu_ticks(pid);
    // Two waves within what the ring can hold unpopped: 41 valid + 200 refused entries,
    // then 200 more, of which the line (256 long) takes 15 and 185 wait.
    let hostile = [held_read, waiting_id, 300, 1023, 5000, 65535];
    for wave in 0..2u16 {
        for i in 0..200u16 {
            f.publish_head(hostile[usize::from((i + wave) % 6)]);
        }
        f.kick();
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut client = Client::connect(&osock, &ClientOptions::default()).unwrap();
    let t = Instant::now();
    let mut served = 0;
    let mut slowest = Duration::ZERO;
    while t.elapsed() < Duration::from_secs(2) {
        f.kick();
        let one = Instant::now();
        client
            .write(0, served * 4096, &pattern(served, 4096))
            .unwrap();
        slowest = slowest.max(one.elapsed());
        served += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let (cpu, grew) = (cpu_ticks(pid) - c0, rss_anon(pid).saturating_sub(before));
    assert_eq!(f.used(), 0);
    stopped.cont();
    let recovered = f.wait_used(41, Duration::from_secs(10));
    let n = f.get_id(DATA + 65536 + 41 * 32);
    f.kick();
    let new_served = f.wait_used(42, Duration::from_secs(5));
    eprintln!(
        "CPU {cpu} ticks in ~2.4 s, RssAnon +{} KiB; other disk: {served} writes, slowest \
         {slowest:?}; recovered {recovered} (used {}), new request served {new_served}; \
         rejected: {}",
        grew >> 10,
        f.used(),
        daemon
            .log()
            .lines()
            .filter(|l| l.contains("refused a malformed request"))
            .count()
    );
    want.push(f.head(n));
    assert_eq!(f.used_heads()[..usize::from(f.used().min(42))], want[..]);
    assert!(recovered && new_served, "the queue did not recover");
    assert_eq!(f.status(read), 0);
    let mut got = vec![0u8; 65536];
    f.read_bytes(DATA, &mut got);
    assert!(got == image[8 * 512..][..65536]);
    assert!(cpu < 60, "{cpu} CPU ticks in 2.4 s");
    assert!(grew < 16 * MIB, "the daemon grew by {} KiB", grew >> 10);
    assert!(slowest < Duration::from_millis(500), "{slowest:?}");
    drop(f);
    drop(client);
    assert!(daemon.stop().success());
    smb.kill();
}

/// A driver as Linux's virtio-blk with EVENT_IDX and INDIRECT_DESC: one descriptor per
/// request, up to the whole ring (256) outstanding, a kick only when the device's
/// avail_event asks for one. For 4 s it keeps the ring as full as it can with 4 KiB reads
/// and GET_IDs while smbd is frozen and continued every 40-160 ms (reads held, the line
/// filling up to the ring's size behind them). No stall (the device must pop again when
/// room comes back, with notifications still suppressed), every request used once, in order,
/// with the data of the image.
#[test]
fn an_event_idx_driver_keeping_the_whole_ring_outstanding_never_stalls() {
    let mut smb = Samba::start();
    let dir = scratch();
    let (daemon, sock, image) = smb_daemon(dir.path(), &smb);
    let mut f = RawFrontend::connect_event_idx_indirect(&sock, 4 * MIB as usize);
    let (tables, headers, statuses, bufs) = (
        DATA + MIB,
        DATA + 2 * MIB,
        DATA + 2 * MIB + 8192,
        DATA + 3 * MIB,
    );
    let avail_event = 0x2000 + 4 + 8 * u64::from(RING);
    let mut rng = Rng(seed());
    // Per outstanding request: number, head, read offset (None for GET_ID).
    let mut outstanding: std::collections::VecDeque<(u16, u16, Option<u64>)> = Default::default();
    let (mut posted, mut used, mut kicks, mut full_rings) = (0u16, 0u16, 0u64, 0u64);
    let mut stopped: Option<Stopped> = None;
    let mut toggle = Instant::now();
    let mut progress = Instant::now();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) || !outstanding.is_empty() {
        if toggle.elapsed() > Duration::from_millis(40 + rng.below(120)) {
            toggle = Instant::now();
            stopped = match stopped.take() {
                Some(mut s) => {
                    s.cont();
                    None
                }
                None if start.elapsed() < Duration::from_secs(4) => Some(Stopped::new(&smb)),
                None => None,
            };
        }
        // Take what the device used: in order, each with its data.
        let now = f.used();
        while used != now {
            let (n, head, read) = outstanding.pop_front().expect("a used entry too many");
            assert_eq!(
                used_head(&f, used),
                head,
                "used entry {used} is not request {n}'s"
            );
            assert_eq!(f.status(n), 0, "request {n}");
            if let Some(offset) = read {
                let mut got = vec![0u8; 4096];
                f.read_bytes(bufs + u64::from(n % RING) * 4096, &mut got);
                assert!(
                    got == image[offset as usize..][..4096],
                    "read {n} at {offset}"
                );
            }
            used = used.wrapping_add(1);
            progress = Instant::now();
        }
        assert!(
            progress.elapsed() < Duration::from_secs(5) || stopped.is_some(),
            "stalled: {} outstanding, used {used}, posted {posted}\n{}",
            outstanding.len(),
            daemon.log()
        );
        if start.elapsed() >= Duration::from_secs(4) {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        // Make more available, as many as there is room for (at most 64 at once).
        let room = usize::from(RING) - outstanding.len();
        full_rings += u64::from(room == 0);
        let old = posted;
        for _ in 0..room.min(1 + rng.below(64) as usize) {
            let slot = u64::from(posted % RING);
            let (header, status, buf) = (headers + slot * 16, statuses + slot, bufs + slot * 4096);
            let read = (rng.below(3) > 0).then(|| rng.below(4 * MIB / 4096 - 1) * 4096);
            let (kind, sector, len) = match read {
                Some(offset) => (0u32, offset / 512, 4096u32),
                None => (8, 0, 20),
            };
            f.write_bytes(header, &kind.to_le_bytes());
            f.write_bytes(header + 4, &0u32.to_le_bytes());
            f.write_bytes(header + 8, &sector.to_le_bytes());
            f.write_bytes(status, &[STATUS_UNSET]);
            let table = tables + slot * 48;
            let descs: [(u64, u32, u16, u16); 3] =
                [(header, 16, 1, 1), (buf, len, 3, 2), (status, 1, 2, 0)];
            for (i, (addr, len, flags, next)) in descs.into_iter().enumerate() {
                let at = table + i as u64 * 16;
                f.write_bytes(at, &addr.to_le_bytes());
                f.write_bytes(at + 8, &len.to_le_bytes());
                f.write_bytes(at + 12, &flags.to_le_bytes());
                f.write_bytes(at + 14, &next.to_le_bytes());
            }
            let n = f.post_indirect(table, 3);
            assert_eq!(n, posted);
            outstanding.push_back((n, f.head(n), read));
            posted = posted.wrapping_add(1);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        // vring_need_event(avail_event, new, old)
        let event = f.read_u16(avail_event);
        if posted.wrapping_sub(event).wrapping_sub(1) < posted.wrapping_sub(old) {
            f.kick();
            kicks += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    drop(stopped);
    eprintln!(
        "{posted} requests (wrapping), used {used}, {kicks} kicks, ring full at {full_rings} \
         turns"
    );
    assert!(full_rings > 0, "the ring never had all 256 outstanding");
    drop(f);
    assert!(daemon.stop().success());
    smb.kill();
}

/// QEMU's side of the connection breaks (no GET_VRING_BASE) while a read is held at a frozen
/// smbd and ten finished GET_IDs wait in line; it reconnects at once and resumes at the used
/// index (0), and smbd continues a second later. The daemon drops the gone connection's
/// requests, waits for the held read's backend work before it takes the new frontend, and
/// the new one gets all eleven again, each once, in order.
#[test]
fn a_frontend_hanging_up_with_requests_in_line_gets_each_once_on_its_next_connection() {
    let mut smb = Samba::start();
    let dir = scratch();
    let (daemon, sock, image) = smb_daemon(dir.path(), &smb);
    let mut f = RawFrontend::connect(&sock, MIB as usize);
    let mut stopped = Stopped::new(&smb);
    let (read, _) = read_held_then_get_ids(&mut f, 10);
    f.fill(DATA, 65536, 0xcc);
    let pid = smb.pid();
    let thaw = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1000));
        signal_group(pid, libc::SIGCONT);
    });
    let t = Instant::now();
    f.hang_up_and_reconnect(&sock).unwrap();
    let took = t.elapsed();
    f.kick();
    let all = f.wait_used(11, Duration::from_secs(20));
    thaw.join().unwrap();
    stopped.cont();
    std::thread::sleep(Duration::from_millis(200));
    eprintln!("reconnected after {took:?}; used {}", f.used());
    assert!(all && f.used() == 11, "used {}\n{}", f.used(), daemon.log());
    in_order(&f, 0, 11).unwrap();
    assert_eq!(f.status(read), 0);
    let mut got = vec![0u8; 65536];
    f.read_bytes(DATA, &mut got);
    assert!(got == image[8 * 512..][..65536]);
    drop(f);
    assert!(daemon.stop().success());
    smb.kill();
}

/// GET_VRING_BASE while the request at the front of the line is held at a frozen smbd and
/// five finished GET_IDs wait behind it; smbd continues 2 to 6 ms later, so the line empties
/// while the answer is being waited for. 2500 times (~17 s). `stop_vring` waits until the
/// queue has no future left (`futures.is_empty()`, checked every millisecond under the
/// queue's lock), but `process` drops that lock *before* it writes the used entries and
/// signals the call eventfd: when the check falls in between, GET_VRING_BASE answers (and
/// vhost-user-backend sets the call eventfd to none) before the used ring holds the six
/// requests, and their interrupt is lost (no signal on the call eventfd, neither before the
/// answer nor on the resumed queue's). In six runs of 2500 rounds: 3-8 lost interrupts per
/// run, 1-4 of them with the used index still short of the base at the answer. A guest whose last
/// requests these were waits for them after the VM continues. (Before 01255d2 the same
/// window existed for the requests finished in that pass.)
/// That was the code this test was written against; `process` now writes the used entries
/// and signals before it lets go of the queue's lock.
#[test]
fn get_vring_base_never_answers_before_the_used_ring_and_its_interrupt() {
    let mut smb = Samba::start();
    let dir = scratch();
    let (daemon, sock, _) = smb_daemon(dir.path(), &smb);
    let mut f = RawFrontend::connect(&sock, MIB as usize);
    let (mut short, mut silent) = (Vec::new(), Vec::new());
    let rounds = 2500u32;
    for round in 0..rounds {
        let mut stopped = Stopped::new(&smb);
        let before = f.used();
        let read = f.read(
            8,
            &[Seg {
                addr: DATA,
                len: 4096,
                write: true,
            }],
        );
        let ids: Vec<u16> = (0..5u64).map(|i| f.get_id(DATA + 8192 + i * 32)).collect();
        f.kick();
        f.take_calls();
        assert!(twinpath_core::wait_until(Duration::from_secs(5), || ids
            .iter()
            .all(|&n| f.status(n) == 0)));
        let pid = smb.pid();
        let delay = 2 + u64::from(round % 5);
        let thaw = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            signal_group(pid, libc::SIGCONT);
        });
        let (base, _) = f.get_vring_base_timed();
        let (at_answer, calls) = (f.used(), f.take_calls());
        thaw.join().unwrap();
        stopped.cont();
        let base = base.unwrap() as u16;
        assert_eq!(base, read.wrapping_add(6));
        if at_answer != base {
            short.push((round, base.wrapping_sub(at_answer)));
        }
        f.resume_queue(base).unwrap();
        assert!(f.wait_used(base, Duration::from_secs(5)));
        in_order(&f, before, base).unwrap();
        // A worker late enough signals the call eventfd of the resumed queue: not lost.
        std::thread::sleep(Duration::from_millis(1));
        if calls + f.take_calls() == 0 {
            silent.push(round);
        }
    }
    eprintln!(
        "{rounds} rounds: answered short of the used ring {} times {short:?} (round, \
         requests missing); no interrupt for the line {} times {silent:?}",
        short.len(),
        silent.len()
    );
    drop(f);
    assert!(daemon.stop().success());
    smb.kill();
    assert!(
        short.is_empty() && silent.is_empty(),
        "GET_VRING_BASE answered before the used ring held the requests in {} of {rounds} \
         rounds, and their interrupt was lost in {}",
        short.len(),
        silent.len()
    );
}

/// A frontend makes available, for 2 s, heads beyond any ring (2000 and up: not even tracked
/// in the head bitmap), in batches of 200 it waits to see popped (EVENT_IDX's avail_event).
/// Each is refused and joins the line as finished; `take_ready` hands it to `add_used`, which
/// virtio-queue refuses with an `error!` line of its own ("attempted to add out of bounds
/// descriptor to used ring"), not rate-limited like the device's own refusals: ~95,000 ERROR
/// lines in 2 s, ~11 MB of log at the production level (info), enough to fill a host's log
/// disk in hours. (Refused heads went to `add_used` before 01255d2 too.)
/// That was the code this test was written against; such heads get no `add_used` now.
#[test]
fn heads_beyond_the_ring_do_not_flood_the_log() {
    let dir = scratch();
    let img = dir.path().join("vm.img");
    make_image(&img, 16 * MIB);
    let sock = dir.path().join("vm.sock");
    let daemon = Daemon::start(
        dir.path(),
        &format!("disks:\n{}", file_disk_yaml("vm", &sock, &img, "")),
    );
    let mut f = RawFrontend::connect_event_idx(&sock, MIB as usize);
    let avail_event = 0x2000 + 4 + 8 * u64::from(RING);
    let t = Instant::now();
    let (mut n, mut total) = (0u16, 0u64);
    while t.elapsed() < Duration::from_secs(2) {
        for _ in 0..200 {
            f.publish_head(2000 + n % 60000);
            n = n.wrapping_add(1);
            total += 1;
        }
        f.kick();
        let t2 = Instant::now();
        while f.read_u16(avail_event) != n && t2.elapsed() < Duration::from_millis(500) {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    // Still serving: a valid request gets its used entry.
    let id = f.get_id(DATA);
    f.kick();
    let served = f.wait_used(1, Duration::from_secs(5)) && f.status(id) == 0;
    drop(f);
    let log = daemon.log_after_stop();
    let errors = log.lines().filter(|l| l.contains(" ERROR ")).count();
    let info_bytes: usize = log
        .lines()
        .filter(|l| !l.contains(" DEBUG ") && !l.contains(" TRACE "))
        .map(|l| l.len() + 1)
        .sum();
    eprintln!(
        "{total} entries made available in 2 s: {errors} ERROR lines, {} KiB of \
         log at level info; served after {served}",
        info_bytes >> 10
    );
    assert!(served, "the queue stopped serving");
    assert!(
        errors < 100,
        "a frontend made the daemon log {errors} ERROR lines ({} KiB at level info) in 2 s",
        info_bytes >> 10
    );
}
