//! The shared fixtures themselves: a private smbd and the latency relay.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use twinpath_tests::relay::LatencyRelay;
use twinpath_tests::samba::Samba;
use twinpath_tests::*;

#[test]
fn private_smbd_serves_user_and_guest_and_dies_by_pid() {
    let mut smb = Samba::start();
    let local = scratch();
    let src = local.path().join("up.bin");
    std::fs::write(&src, pattern(3, 300_000)).unwrap();
    let out = smb.smbclient(&format!("put {} up.bin", src.display()), false);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(smb.share_dir().join("up.bin")).unwrap(),
        pattern(3, 300_000)
    );
    let out = smb.smbclient("ls", true);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && listing.contains("up.bin"),
        "{listing}"
    );
    let addr = smb.addr();
    smb.kill();
    assert!(TcpStream::connect(addr).is_err(), "smbd gone");
}

#[test]
fn relay_adds_latency_and_keeps_bytes() {
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = echo.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in echo.incoming() {
            let mut c = conn.unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let relay = LatencyRelay::start(target, Duration::from_millis(25));
    let mut c = TcpStream::connect(relay.addr()).unwrap();
    c.set_nodelay(true).unwrap();
    let start = Instant::now();
    c.write_all(b"x").unwrap();
    let mut one = [0u8; 1];
    c.read_exact(&mut one).unwrap();
    // A lower bound only: the relay must hold the byte 25 ms each way.
    assert!(
        start.elapsed() >= Duration::from_millis(50),
        "{:?}",
        start.elapsed()
    );

    let data = pattern(8, 1 << 20);
    let mut reader = c.try_clone().unwrap();
    let expect = data.clone();
    let got = std::thread::spawn(move || {
        let mut back = vec![0u8; expect.len()];
        reader.read_exact(&mut back).unwrap();
        back == expect
    });
    c.write_all(&data).unwrap();
    assert!(
        got.join().unwrap(),
        "bytes came back unchanged and in order"
    );
}

#[test]
fn smb_works_through_the_relay() {
    let smb = Samba::start();
    std::fs::write(smb.share_dir().join("seen.txt"), b"hello").unwrap();
    let relay = LatencyRelay::start(smb.addr(), Duration::from_millis(2));
    let out = std::process::Command::new("smbclient")
        .args([
            "//127.0.0.1/vmstore",
            "-p",
            &relay.addr().port().to_string(),
            "-N",
            "-c",
            "ls",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("seen.txt"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
