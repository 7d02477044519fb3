//! An on-path attacker for the map protocol: a TCP relay that parses the length-prefixed
//! frames (4-byte big-endian lengths, as both sides frame them) and lets a test rewrite every
//! frame the server sends to the host. It knows no key: what it can do is what anyone between
//! a VM host and its map server can do.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Rewrites frame number `index` (counted from 0 per connection) from the server; gets the
/// payload without its length prefix and returns the payload to send instead.
pub type Rewrite = Arc<dyn Fn(u64, Vec<u8>) -> Vec<u8> + Send + Sync>;

pub struct TamperRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Frames the rewrite changed, over all connections.
    pub altered: Arc<AtomicU64>,
}

impl TamperRelay {
    /// Listens on a free loopback port and relays each connection to `target`, host-bound
    /// frames through `rewrite`.
    pub fn start(target: SocketAddr, rewrite: Rewrite) -> TamperRelay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("relay bind");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let altered = Arc::new(AtomicU64::new(0));
        {
            let (stop, altered) = (stop.clone(), altered.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((host, _)) => {
                            let Ok(server) = TcpStream::connect(target) else {
                                continue;
                            };
                            let _ = host.set_nonblocking(false);
                            relay(host, server, rewrite.clone(), altered.clone());
                        }
                        Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
                    }
                }
            });
        }
        TamperRelay {
            addr,
            stop,
            altered,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TamperRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn relay(host: TcpStream, server: TcpStream, rewrite: Rewrite, altered: Arc<AtomicU64>) {
    let (Ok(mut h_in), Ok(mut s_out)) = (host.try_clone(), server.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut h_in, &mut s_out);
        let _ = s_out.shutdown(Shutdown::Write);
    });
    let (mut s_in, mut h_out) = (server, host);
    std::thread::spawn(move || {
        let mut index = 0u64;
        loop {
            let mut len = [0u8; 4];
            if s_in.read_exact(&mut len).is_err() {
                break;
            }
            let mut payload = vec![0u8; u32::from_be_bytes(len) as usize];
            if s_in.read_exact(&mut payload).is_err() {
                break;
            }
            let out = rewrite(index, payload.clone());
            if out != payload {
                altered.fetch_add(1, Ordering::Relaxed);
            }
            index += 1;
            let mut frame = (out.len() as u32).to_be_bytes().to_vec();
            frame.extend_from_slice(&out);
            if h_out.write_all(&frame).is_err() {
                break;
            }
        }
        let _ = h_out.shutdown(Shutdown::Both);
    });
}
