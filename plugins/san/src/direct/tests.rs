//! The executor against a map server scripted here (real protocol, on loopback) and a LUN in
//! memory that checks every device operation against the server's book, as it is issued and,
//! for writes, as it lands: it must lie in the extent of a lease the server still counts as
//! this host's (the image moves on the LUN whenever nothing is leased, so an operation under
//! a lease returned earlier lands outside every live lease). The unit-level proof, without
//! root, smbd or a loop device, that direct I/O happens only under a valid grant (safety.md
//! promise 2), and that a slow or silent map server costs a request at most the map timeout
//! (promise 4). The guest's network path is the server writing its file, on the same LUN.
//! Not covered here: several windows (the image is smaller than one), and a LUN that refuses
//! (reservation conflicts): `tests/tests/fence_attacks.rs` has those against tgtd.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::OnceLock;

use async_trait::async_trait;
use tokio::net::TcpListener;
use tokio::sync::watch;
use twinpath_core::{BlockBackend, DiskInfo};
use twinpath_filemap::{Access, Span, SpanKind};
use twinpath_mapproto::{Frame, HostKeys, Key, MapGrant, VolumeIdentity};

use super::*;
use crate::volume::Volume;

/// Where the image's places start on the LUN; the bytes before belong to someone else.
const BASE: u64 = 1 << 20;
/// Large enough that one request of all of it has device sections waiting for others.
const FILE: u64 = 32 << 20;
/// The image moves between this many places on the LUN (see [`Server::grant`]).
const PLACES: u64 = 3;
const LUN: u64 = BASE + PLACES * FILE;
const LEASE_TIME: Duration = Duration::from_secs(1);
const MAP_TIMEOUT: Duration = Duration::from_millis(300);
const HOST: &str = "host-a";

/// A live lease: its access, and where on the LUN the image was when it was granted.
#[derive(Debug, Clone, Copy)]
struct Held {
    write: bool,
    base: u64,
}

/// What the server holds true (the LUN's bytes among it), and what the LUN found against it.
struct Book {
    /// The whole LUN.
    data: Vec<u8>,
    /// Where the image is now.
    current: u64,
    leases: HashMap<u64, Held>,
    /// Leases recalled and not yet returned: no new map is answered until they are back, so
    /// a device operation after a return and before the next grant has no lease at all.
    recalled: HashSet<u64>,
    next_lease: u64,
    /// When the server last heard from the host: a silent host's leases are its own for
    /// [`LEASE_TIME`] from then, and no longer.
    heard: Duration,
    /// Nothing gets through either way (a partition, a frozen server).
    silent: bool,
    /// Map requests go unanswered; everything else is answered.
    maps_unanswered: bool,
    /// Device operations issued outside what the server holds true.
    violations: Vec<String>,
    /// Device operations checked.
    checked: usize,
}

impl Book {
    fn new() -> Book {
        Book {
            data: vec![0xee; LUN as usize],
            current: BASE,
            leases: HashMap::new(),
            recalled: HashSet::new(),
            next_lease: 0,
            heard: Duration::ZERO,
            silent: false,
            maps_unanswered: false,
            violations: Vec::new(),
            checked: 0,
        }
    }

    /// The live leases that cover `[physical, physical + len)` with the access asked.
    fn covering(&self, physical: u64, len: u64, write: bool) -> Vec<u64> {
        self.leases
            .iter()
            .filter(|(_, h)| h.write || !write)
            .filter(|(_, h)| h.base <= physical && physical + len <= h.base + FILE)
            .map(|(&l, _)| l)
            .collect()
    }

    fn file(&self) -> &[u8] {
        &self.data[self.current as usize..(self.current + FILE) as usize]
    }
}

struct Server {
    addr: String,
    book: Arc<Mutex<Book>>,
    /// Frames to send to the connected host.
    to_host: Mutex<Option<mpsc::UnboundedSender<Frame>>>,
}

impl Server {
    async fn start(key: &Key) -> Arc<Server> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = Arc::new(Server {
            addr: listener.local_addr().unwrap().to_string(),
            book: Arc::new(Mutex::new(Book::new())),
            to_host: Mutex::default(),
        });
        let keys = Arc::new(HostKeys::new(vec![(HOST.into(), key.clone())]).unwrap());
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, keys) = (s.clone(), keys.clone());
                tokio::spawn(async move { s.serve(stream, &keys).await });
            }
        });
        server
    }

    async fn serve(self: Arc<Self>, stream: tokio::net::TcpStream, keys: &HostKeys) {
        // As the map server does: a recall must not wait for an acknowledgement.
        stream.set_nodelay(true).unwrap();
        let Ok((conn, _)) = twinpath_mapproto::accept(stream, keys).await else {
            return;
        };
        let (mut reader, mut writer) = (conn.reader, conn.writer);
        let (tx, mut rx) = mpsc::unbounded_channel();
        *lock(&self.to_host) = Some(tx.clone());
        tokio::spawn(async move {
            while let Some(f) = rx.recv().await {
                if writer.send(&f).await.is_err() {
                    return;
                }
            }
        });
        while let Ok(frame) = reader.recv().await {
            let Frame::Request { id, request } = frame else {
                return;
            };
            let reply = {
                let mut b = lock(&self.book);
                if b.silent {
                    continue;
                }
                b.heard = clock::now();
                match request {
                    Request::Identity => Reply::Identity(VolumeIdentity {
                        fs_type: "xfs".into(),
                        uuid: "0".repeat(32),
                        size: LUN,
                        token_offset: 0,
                        token_len: 1,
                        token_sha256: "0".repeat(64),
                    }),
                    Request::Renew => Reply::Renewed {
                        lease_time_ms: LEASE_TIME.as_millis() as u64,
                    },
                    Request::GetMap { .. } if b.maps_unanswered => continue,
                    Request::GetMap { offset, write, .. } => {
                        let (book, tx) = (self.book.clone(), tx.clone());
                        tokio::spawn(async move {
                            let reply = Server::grant(&book, offset, write).await;
                            let _ = tx.send(Frame::Reply { id, reply });
                        });
                        continue;
                    }
                    Request::Return { lease } => {
                        b.leases.remove(&lease);
                        b.recalled.remove(&lease);
                        Reply::Done
                    }
                    Request::Commit { .. } => Reply::Done,
                    Request::Allocate { .. } => Reply::Refused {
                        reason: "not here".into(),
                    },
                }
            };
            if tx.send(Frame::Reply { id, reply }).is_err() {
                return;
            }
        }
    }

    /// A map of the rest of the file from `offset`, once no recalled lease is outstanding.
    async fn grant(book: &Mutex<Book>, offset: u64, write: bool) -> Reply {
        let asked = std::time::Instant::now();
        while !lock(book).recalled.is_empty() {
            if asked.elapsed() > Duration::from_secs(5) {
                return Reply::Refused {
                    reason: "recalled leases not returned".into(),
                };
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut b = lock(book);
        if b.leases.is_empty() {
            // Nothing leased: the image moves (as a defragmenter would move it), so that a
            // device operation under a lease returned earlier lands outside every live
            // lease's extent and is told apart from one under the new lease.
            let from = b.current as usize;
            let to = BASE + ((b.current - BASE) / FILE + 1) % PLACES * FILE;
            b.data.copy_within(from..from + FILE as usize, to as usize);
            b.data[from..from + FILE as usize].fill(0xdd);
            b.current = to;
        }
        b.next_lease += 1;
        let lease = b.next_lease;
        let base = b.current;
        b.leases.insert(lease, Held { write, base });
        let access = if write {
            Access::ReadWrite
        } else {
            Access::Read
        };
        Reply::Map(MapGrant {
            lease,
            file_size: FILE,
            spans: vec![Span {
                logical: offset,
                len: FILE - offset,
                kind: SpanKind::Data {
                    physical: base + offset,
                },
                access,
            }],
        })
    }

    /// Recalls every live lease, as a truncate on the server would; from now on the server
    /// counts them as the host's only until it returns them.
    fn recall_all(&self) {
        let leases: Vec<u64> = {
            let mut b = lock(&self.book);
            let live: Vec<u64> = b.leases.keys().copied().collect();
            b.recalled.extend(&live);
            live
        };
        let tx = lock(&self.to_host).clone().expect("a host connected");
        for lease in leases {
            let _ = tx.send(Frame::Recall {
                lease,
                reason: "truncated".into(),
            });
        }
    }

    /// The host's leases as the server knows them: a lease taken from the host by its lease
    /// time running out is gone here too.
    fn expire(&self) {
        let mut b = lock(&self.book);
        if clock::now() > b.heard + LEASE_TIME {
            b.leases.clear();
            b.recalled.clear();
        }
    }
}

/// The shared volume in memory (its bytes in the server's book).
struct MemLun {
    book: Arc<Mutex<Book>>,
    /// Device operations wait while this is false (a stalled path).
    open: watch::Sender<bool>,
    /// Device operations issued and not yet done.
    busy: AtomicUsize,
    /// How long each device operation takes, in microseconds.
    latency_us: AtomicU64,
}

impl MemLun {
    fn new(book: Arc<Mutex<Book>>) -> Arc<MemLun> {
        Arc::new(MemLun {
            book,
            open: watch::channel(true).0,
            busy: AtomicUsize::new(0),
            latency_us: AtomicU64::new(0),
        })
    }

    /// Checks an operation at its issue; returns the leases that allowed it.
    fn check(&self, what: &str, physical: u64, len: usize, write: bool) -> Vec<u64> {
        let now = clock::now();
        let mut b = lock(&self.book);
        b.checked += 1;
        let covering = b.covering(physical, len as u64, write);
        if covering.is_empty() || now > b.heard + LEASE_TIME {
            let why = format!(
                "{what} at {physical}+{len}, {:?} after the server last heard the host, \
                 under none of the live leases {:?}",
                now.saturating_sub(b.heard),
                b.leases
            );
            b.violations.push(why);
        }
        covering
    }

    async fn device(&self, physical: u64, bufs: &GuestBuffers, write: bool) {
        let allowed = self.check(
            if write { "write" } else { "read" },
            physical,
            bufs.len(),
            write,
        );
        self.busy.fetch_add(1, Ordering::AcqRel);
        let _ = self.open.subscribe().wait_for(|open| *open).await;
        let latency = self.latency_us.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_micros(latency)).await;
        }
        let at = physical as usize;
        let mut b = lock(&self.book);
        if write {
            bufs.copy_to_slice(0, &mut b.data[at..at + bufs.len()]);
            // Landing counts too: a write still in the device when the lease it was issued
            // under went back could overwrite what the server wrote next.
            if !allowed.iter().any(|l| b.leases.contains_key(l)) {
                let why = format!(
                    "write at {physical}+{} landed after its leases {allowed:?} went back",
                    bufs.len()
                );
                b.violations.push(why);
            }
        } else {
            bufs.copy_from_slice(0, &b.data[at..at + bufs.len()]);
        }
        drop(b);
        self.busy.fetch_sub(1, Ordering::AcqRel);
    }

    /// The file as the server reads it.
    fn file(&self) -> Vec<u8> {
        lock(&self.book).file().to_vec()
    }
}

#[async_trait]
impl LunIo for MemLun {
    async fn read(
        &self,
        _: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        _: Arc<dyn Permit>,
    ) -> Result<()> {
        self.device(offset, &bufs, false).await;
        Ok(())
    }

    async fn write(
        &self,
        _: Option<&QueueRing>,
        offset: u64,
        bufs: GuestBuffers,
        _: Arc<dyn Permit>,
    ) -> Result<()> {
        self.device(offset, &bufs, true).await;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// The checker's own writes ask no grant: it is the one judging them.
struct Always;

impl Permit for Always {
    fn allows(&self) -> bool {
        true
    }
}

struct MemVolume(Arc<MemLun>);

impl Volume for MemVolume {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn size(&self) -> u64 {
        LUN
    }

    fn read_at(&self, offset: u64, len: usize) -> twinpath_core::Result<Vec<u8>> {
        Ok(lock(&self.0.book).data[offset as usize..offset as usize + len].to_vec())
    }

    fn io(
        &self,
        _read_only: bool,
        _runtime: &tokio::runtime::Handle,
    ) -> twinpath_core::Result<Arc<dyn LunIo>> {
        Ok(self.0.clone())
    }

    fn register(&self, _key: u64) -> twinpath_core::Result<bool> {
        Ok(false)
    }
}

struct Rig {
    server: Arc<Server>,
    lun: Arc<MemLun>,
    direct: Arc<Direct>,
    /// What the guest wrote, acknowledged.
    model: Mutex<Vec<u8>>,
}

/// Which path a request took.
#[derive(Debug, PartialEq)]
enum Took {
    Direct,
    Network,
}

impl Rig {
    async fn start() -> Rig {
        let key = Key::new(vec![7; 32]).unwrap();
        let server = Server::start(&key).await;
        let lun = MemLun::new(server.book.clone());
        let links = crate::link::Links::default();
        let link = crate::link::MapLink::shared(&links, &server.addr, key, HOST);
        let member = link.join();
        let connected = link.connect(MAP_TIMEOUT).await.unwrap();
        let direct = Direct::new(
            member,
            connected.generation,
            DirectConfig {
                path: "vm.raw".into(),
                throttle: None,
                map_timeout: MAP_TIMEOUT,
                fence_key: 1,
            },
            LunDevice {
                volume: Arc::new(MemVolume(lun.clone())),
                io: lun.clone(),
            },
            Arc::new(PathStats::with_events(&super::EVENTS)),
        );
        let model = Mutex::new(lun.file());
        Rig {
            server,
            lun,
            direct,
            model,
        }
    }

    /// One guest request the way the san backend carries it out: directly if the direct
    /// path takes it, else over the network after [`Direct::before_network`].
    async fn request(&self, offset: u64, len: usize, write: Option<u8>) -> Took {
        let d = &self.direct;
        let data = vec![write.unwrap_or(0); len];
        let (bufs, mem) = GuestBuffers::from_vec(data.clone());
        let is_write = write.is_some();
        let lookup = d.lookup(offset, len as u64, is_write);
        let took = match d.io(lookup, offset, &bufs, is_write).await {
            Ok(Outcome::Done) => Took::Direct,
            Ok(Outcome::Network) | Err(_) => {
                d.before_network(offset, len as u64, is_write).await;
                let mut b = lock(&self.lun.book);
                let at = (b.current + offset) as usize;
                if is_write {
                    b.data[at..at + len].copy_from_slice(&data);
                } else {
                    lock(&mem).copy_from_slice(&b.data[at..at + len]);
                }
                Took::Network
            }
        };
        let mut model = lock(&self.model);
        let range = offset as usize..offset as usize + len;
        if is_write {
            model[range].copy_from_slice(&data);
        } else {
            assert!(
                lock(&mem)[..] == model[range],
                "read at {offset} ({took:?}) differs from what the guest wrote"
            );
        }
        took
    }

    fn violations(&self) -> Vec<String> {
        lock(&self.server.book).violations.clone()
    }

    fn checked(&self) -> usize {
        lock(&self.server.book).checked
    }
}

/// A guest writing 64 KiB blocks round the image from `seed`, `n` times; the paths taken.
async fn writes(rig: &Rig, seed: u64, n: u64) -> Vec<Took> {
    writes_in(rig, (0, FILE), seed, n).await
}

/// [`writes`] within `(start, len)` of the image: guests writing at once keep apart, so what
/// each wrote stays the last word in the model and in the image alike.
async fn writes_in(rig: &Rig, (start, len): (u64, u64), seed: u64, n: u64) -> Vec<Took> {
    let mut took = Vec::new();
    for i in 0..n {
        let offset = start + (seed * 7 + i) * 65536 % len;
        took.push(rig.request(offset, 65536, Some((seed + i) as u8)).await);
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_direct_under_the_lease_and_read_back() {
    let rig = Rig::start().await;
    let took = writes(&rig, 1, 64).await;
    assert!(took.iter().all(|t| *t == Took::Direct), "{took:?}");
    assert_eq!(rig.request(0, FILE as usize, None).await, Took::Direct);
    assert!(rig.checked() > 64);
    assert_eq!(rig.violations(), Vec::<String>::new());
    assert!(rig.lun.file() == *lock(&rig.model));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recall_while_writes_flow_ends_device_io_before_the_lease_goes_back() {
    // Four writers at once and a recall in their midst, at a different moment each round; a
    // fresh disk each round, since a recalled window rests for seconds. Every device
    // operation is checked at its issue and its landing against the server's book, where a
    // returned lease is gone.
    let mut direct = 0;
    for round in 0..12u64 {
        let rig = Arc::new(Rig::start().await);
        rig.lun.latency_us.store(1000, Ordering::Relaxed);
        writes(&rig, round, 1).await;
        let mut guests = Vec::new();
        for g in 0..4 {
            let rig = rig.clone();
            let part = (g * FILE / 4, FILE / 4);
            guests.push(tokio::spawn(async move {
                writes_in(&rig, part, round * 4 + g, 8).await
            }));
        }
        tokio::time::sleep(Duration::from_micros(500 * round)).await;
        rig.server.recall_all();
        for g in guests {
            direct += g
                .await
                .unwrap()
                .iter()
                .filter(|t| **t == Took::Direct)
                .count();
        }
        assert_eq!(rig.violations(), Vec::<String>::new(), "round {round}");
        assert!(rig.lun.file() == *lock(&rig.model), "image differs");
    }
    assert!(direct > 12 * 4, "{direct} writes went direct");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_recalled_with_device_io_in_flight_goes_back_only_after_it() {
    let rig = Arc::new(Rig::start().await);
    writes(&rig, 3, 1).await;
    rig.lun.open.send_replace(false);
    let r = rig.clone();
    let guest = tokio::spawn(async move { r.request(0, 65536, Some(9)).await });
    while rig.lun.busy.load(Ordering::Acquire) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    rig.server.recall_all();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        lock(&rig.server.book).leases.len(),
        1,
        "the lease went back with a device write still in flight"
    );
    rig.lun.open.send_replace(true);
    assert_eq!(guest.await.unwrap(), Took::Direct);
    let t = std::time::Instant::now();
    while !lock(&rig.server.book).leases.is_empty() {
        assert!(t.elapsed() < Duration::from_secs(2), "lease never returned");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(rig.violations(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_ends_direct_io_within_the_lease_time_and_costs_no_guest_error() {
    let rig = Rig::start().await;
    writes(&rig, 4, 8).await;
    lock(&rig.server.book).silent = true;
    let cut = std::time::Instant::now();
    // The guest keeps writing; the server, hearing nothing, takes the leases back after the
    // lease time (checked by the LUN at every device operation).
    let mut after = Vec::new();
    while cut.elapsed() < LEASE_TIME * 3 {
        rig.server.expire();
        let started = std::time::Instant::now();
        after.push((cut.elapsed(), rig.request(0, 4096, Some(5)).await));
        assert!(started.elapsed() < MAP_TIMEOUT * 2 + Duration::from_millis(500));
    }
    assert_eq!(rig.violations(), Vec::<String>::new());
    let last_direct = after
        .iter()
        .filter(|(_, t)| *t == Took::Direct)
        .map(|(at, _)| *at)
        .max()
        .unwrap_or_default();
    assert!(last_direct < LEASE_TIME, "direct at {last_direct:?}");
    assert!(after.last().is_some_and(|(_, t)| *t == Took::Network));
    assert!(rig.lun.file() == *lock(&rig.model), "image differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_maps_cost_a_request_the_map_timeout_then_go_over_the_network() {
    let rig = Rig::start().await;
    lock(&rig.server.book).maps_unanswered = true;
    let started = std::time::Instant::now();
    assert_eq!(rig.request(0, 4096, Some(1)).await, Took::Network);
    let waited = started.elapsed();
    assert!(
        waited >= MAP_TIMEOUT && waited < MAP_TIMEOUT + Duration::from_millis(500),
        "{waited:?}"
    );
    // The window rests: the next request does not wait again.
    let started = std::time::Instant::now();
    assert_eq!(rig.request(4096, 4096, Some(2)).await, Took::Network);
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(rig.checked(), 0, "no device operation without a grant");
    assert!(rig.lun.file() == *lock(&rig.model), "image differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outliving_its_lease_issues_nothing_after_the_lease_ran_out() {
    let rig = Arc::new(Rig::start().await);
    writes(&rig, 5, 1).await;
    // One write of the whole image: more device sections than the pipeline has in flight,
    // so the later ones are issued only as the first finish, and the device holds those.
    rig.lun.open.send_replace(false);
    let r = rig.clone();
    let guest = tokio::spawn(async move { r.request(0, FILE as usize, Some(6)).await });
    while rig.lun.busy.load(Ordering::Acquire) == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    lock(&rig.server.book).silent = true;
    // (The server does not give the blocks away here: what the device held before the lease
    // ran out lands when it is released; fencing is what covers that, see docs/san.md.)
    tokio::time::sleep(LEASE_TIME + Duration::from_millis(200)).await;
    rig.lun.open.send_replace(true);
    let took = guest.await.unwrap();
    assert_eq!(rig.violations(), Vec::<String>::new());
    assert_eq!(took, Took::Network);
    assert!(rig.lun.file() == *lock(&rig.model), "image differs");
}

/// The checker itself: a write into the place a returned lease covered is flagged, though
/// another write lease (elsewhere) lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_flags_a_write_under_a_returned_lease_while_another_lives() {
    let rig = Rig::start().await;
    {
        let mut b = lock(&rig.server.book);
        b.heard = clock::now();
        let old = BASE + FILE;
        b.leases.insert(
            100,
            Held {
                write: true,
                base: old,
            },
        );
        b.leases.insert(
            101,
            Held {
                write: true,
                base: BASE,
            },
        );
        b.leases.remove(&100);
    }
    let (bufs, _mem) = GuestBuffers::from_vec(vec![0xab; 65536]);
    rig.lun
        .write(None, BASE + FILE, bufs, Arc::new(Always))
        .await
        .unwrap();
    let v = rig.violations();
    assert!(v.first().is_some_and(|v| v.contains("under none")), "{v:?}");
}

/// The network path as the server's own writes to its file: on the LUN, where the image is.
struct MemNetwork(Arc<Mutex<Book>>);

impl MemNetwork {
    fn at(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let b = lock(&self.0);
        let start = (b.current + offset) as usize;
        start..start + len as usize
    }
}

#[async_trait]
impl crate::network::NetworkPath for MemNetwork {
    fn info(&self) -> DiskInfo {
        DiskInfo {
            discard: true,
            write_zeroes: true,
            ..DiskInfo::new(FILE)
        }
    }

    fn stats(&self) -> Arc<PathStats> {
        Arc::default()
    }

    fn within(&self, what: &str, offset: u64, len: u64) -> Result<()> {
        twinpath_core::within(FILE, offset, len, || what.to_owned())
    }

    async fn read(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        let at = self.at(offset, bufs.len() as u64);
        bufs.copy_from_slice(0, &lock(&self.0).data[at]);
        Ok(())
    }

    async fn write(&self, offset: u64, bufs: &GuestBuffers) -> Result<()> {
        let at = self.at(offset, bufs.len() as u64);
        bufs.copy_to_slice(0, &mut lock(&self.0).data[at]);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let at = self.at(offset, len);
        lock(&self.0).data[at].fill(0);
        Ok(())
    }

    async fn close(&self) {}
}

/// The san backend itself (direct path first, the network where it cannot) keeps the backend
/// contract every backend keeps, with every device operation checked against the server's
/// book: none outside a lease the server counts as this host's.
#[test]
fn the_san_backend_keeps_the_backend_contract_and_writes_only_under_its_leases() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rig = rt.block_on(Rig::start());
    let backend = Arc::new(crate::SanBackend {
        network: Arc::new(MemNetwork(rig.server.book.clone())),
        direct: Arc::new(OnceLock::from(rig.direct.clone())),
        runtime: rt.handle().clone(),
        stats: Arc::new(PathStats::with_events(&super::EVENTS)),
    });
    twinpath_core::testing::conformance(|| Ok(backend.clone() as Arc<dyn BlockBackend>));
    assert_eq!(rig.violations(), Vec::<String>::new());
    assert!(rig.checked() > 0, "nothing went the direct path");
}
