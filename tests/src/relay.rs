//! A TCP relay that holds every chunk for a fixed delay in each direction: WAN-like latency
//! on loopback, since this kernel has no netem. Order is kept; bandwidth is not limited.
//!
//! Plain threads and blocking sockets: `std::thread::sleep` is precise to tens of
//! microseconds, where an async timer wheel's millisecond ticks would add up to a millisecond
//! more each way than asked.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct LatencyRelay {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Once set, nothing more is forwarded either way, and nothing is closed: a silent
    /// partition, which neither end's TCP stack can see.
    cut: Arc<AtomicBool>,
    /// Both ends of every relayed connection, to cut them when the relay stops.
    open: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl LatencyRelay {
    /// Listens on a free loopback port and relays each connection to `target`, adding `delay`
    /// each way.
    pub fn start(target: SocketAddr, delay: Duration) -> LatencyRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(AtomicBool::new(false));
        let open = Arc::new(Mutex::new(Vec::new()));
        let thread = {
            let (stop, open, cut) = (stop.clone(), open.clone(), cut.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            if let Ok(server) = TcpStream::connect(target) {
                                relay(client, server, delay, &open, &cut);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        LatencyRelay {
            port,
            stop,
            cut,
            open,
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// From now on every byte either way is dropped, and every connection stays open.
    pub fn cut_silently(&self) {
        self.cut.store(true, Ordering::Relaxed);
    }
}

impl Drop for LatencyRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay(
    client: TcpStream,
    server: TcpStream,
    delay: Duration,
    open: &Mutex<Vec<TcpStream>>,
    cut: &Arc<AtomicBool>,
) {
    for s in [&client, &server] {
        let _ = s.set_nonblocking(false);
        let _ = s.set_nodelay(true);
    }
    let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
    for (from, to) in [(&client, &server), (&server, &client)] {
        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
            return;
        };
        delayed_pipe(from, to, delay, cut.clone());
    }
    open.extend([client, server]);
}

/// Copies `from` to `to` on two threads, releasing each chunk `delay` after it arrived, until
/// `cut`.
fn delayed_pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration, cut: Arc<AtomicBool>) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0
                || tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
            {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        while let Ok((due, chunk)) = rx.recv() {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if cut.load(Ordering::Relaxed) {
                continue;
            }
            if to.write_all(&chunk).is_err() {
                return;
            }
        }
        // A cut relay passes on no close either.
        if !cut.load(Ordering::Relaxed) {
            let _ = to.shutdown(Shutdown::Write);
        }
    });
}

/// A relay whose `cut_server_side` closes the connection towards the map server (which sees
/// the host gone) while the host's side stays open and silent (the host sees nothing: a
/// partition where only the server's end noticed, e.g. its keepalive or an RST on its side).
pub struct HalfCutRelay {
    port: u16,
    cut: Arc<AtomicBool>,
    servers: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl HalfCutRelay {
    pub fn start(target: std::net::SocketAddr) -> HalfCutRelay {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let servers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c2, s2) = (cut.clone(), servers.clone());
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(client) = client else { continue };
                if c2.load(Ordering::Relaxed) {
                    // After the cut, new connections go nowhere (held open, silent).
                    std::mem::forget(client);
                    continue;
                }
                let server = TcpStream::connect(target).unwrap();
                s2.lock().unwrap().push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server.try_clone().unwrap(), client.try_clone().unwrap()),
                ] {
                    let cut = c2.clone();
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 65536];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || cut.load(Ordering::Relaxed) {
                                break;
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        // Keep the host's end open: leak it.
                        std::mem::forget(from);
                        std::mem::forget(to);
                    });
                }
                std::mem::forget(client);
            }
        });
        HalfCutRelay { port, cut, servers }
    }
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
    pub fn cut_server_side(&self) {
        self.cut.store(true, Ordering::Relaxed);
        for s in self.servers.lock().unwrap().iter() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A relay towards the target that can stop reading from the host (a target, or a network
/// path, that is slow to take bytes: the host's TCP send queue fills), with a small receive
/// buffer so that what the host wrote stays in the host's own kernel.
pub struct StallRelay {
    port: u16,
    paused: Arc<AtomicBool>,
    /// Bytes the relay read from the host after it was resumed.
    after_resume: Arc<AtomicUsize>,
    /// The host's side of every relayed connection.
    clients: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl StallRelay {
    /// Listens on a free loopback port and relays each connection to `target`.
    pub fn start(target: SocketAddr) -> StallRelay {
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.set_reuse_address(true).unwrap();
        // Inherited by accepted sockets: the host's bytes pile up in the host's send queue.
        sock.set_recv_buffer_size(4096).unwrap();
        sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        sock.listen(16).unwrap();
        let l: TcpListener = sock.into();
        let port = l.local_addr().unwrap().port();
        let paused = Arc::new(AtomicBool::new(false));
        let after_resume = Arc::new(AtomicUsize::new(0));
        let clients = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (p, a) = (paused.clone(), after_resume.clone());
        let cl = clients.clone();
        std::thread::spawn(move || {
            for client in l.incoming() {
                let Ok(mut client) = client else { continue };
                cl.lock().unwrap().push(client.try_clone().unwrap());
                let Ok(mut server) = TcpStream::connect(target) else {
                    continue;
                };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (p, a) = (p.clone(), a.clone());
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    let mut was_paused = false;
                    loop {
                        while p.load(Ordering::SeqCst) {
                            was_paused = true;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        match client.read(&mut buf) {
                            Ok(0) | Err(_) => {
                                // Give the target time to act on what it got, then close.
                                std::thread::sleep(Duration::from_secs(3));
                                let _ = server.shutdown(Shutdown::Write);
                                return;
                            }
                            Ok(n) => {
                                if was_paused {
                                    a.fetch_add(n, Ordering::SeqCst);
                                }
                                if server.write_all(&buf[..n]).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 65536];
                    let mut host_gone = false;
                    loop {
                        match s2.read(&mut buf) {
                            Ok(0) | Err(_) => {
                                let _ = c2.shutdown(Shutdown::Write);
                                return;
                            }
                            Ok(n) => {
                                // Keep draining the target even once the host is gone.
                                if !host_gone && c2.write_all(&buf[..n]).is_err() {
                                    host_gone = true;
                                }
                            }
                        }
                    }
                });
            }
        });
        StallRelay {
            port,
            paused,
            after_resume,
            clients,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Stops (`true`) or resumes reading from the host.
    pub fn pause(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
    }

    /// Bytes read from the host after a pause ended.
    pub fn read_after_pause(&self) -> usize {
        self.after_resume.load(Ordering::SeqCst)
    }

    /// Bytes that already left the host: in the relay's receive queues, unread.
    pub fn queued(&self) -> usize {
        use std::os::fd::AsRawFd;
        self.clients
            .lock()
            .unwrap()
            .iter()
            .map(|c| {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD writes an int.
                unsafe { libc::ioctl(c.as_raw_fd(), libc::FIONREAD, &mut n) };
                n.max(0) as usize
            })
            .sum()
    }
}
