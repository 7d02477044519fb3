//! The network-path benchmark: `smb` disks through the vhost-user device, driven by
//! `twinpath bench`, against `smbclient get`/`put` of a file of the same size on the same
//! private smbd, on loopback and through a relay adding 1 ms each way. Also the engine's
//! serial (window 1) vs pipelined ratio at +1 ms with 64 KiB sections. Targets are measured
//! in interleaved rounds; the report gives medians and replaces the SMB section of
//! docs/benchmarks.md. Run it with `scripts/bench-smb.sh` (ROUNDS, RUNTIME, SIZE_MIB).

use std::process::Command;
use std::time::Duration;

use twinpath_tests::relay::LatencyRelay;
use twinpath_tests::samba::{Samba, PASSWORD, SHARE, USER};
use twinpath_tests::{pattern, scratch, Daemon};
use twinpath_tools::bench::{bench_disk, env_or, is_iops, p50, update_doc, Results};

const DISK_TESTS: &str =
    "read-1m-q1,read-1m-q4,read-1m-q32,write-1m-q1,write-1m-q4,write-1m-q32,randread-4k-q1,randread-4k-q32,randwrite-4k-q32";
/// One 1 MiB request at a time: the largest a guest sends (the device's SIZE_MAX), which
/// `twinpath bench` holds to.
const ENGINE_TESTS: &str = "read-1m-q1,write-1m-q1";

/// Runs smbclient against `addr` and returns the MB/s it reports for the transfer
/// ("... (123456.7 KiloBytes/sec) ...", KiB per second).
fn smbclient_rate(addr: std::net::SocketAddr, signed: bool, cmd: &str) -> f64 {
    let signing = if signed { "required" } else { "default" };
    let out = Command::new("smbclient")
        .arg(format!("//{}/{SHARE}", addr.ip()))
        .args(["-p", &addr.port().to_string()])
        .arg(format!("--option=clientsigning={signing}"))
        .args(["-U", &format!("{USER}%{PASSWORD}"), "-c", cmd])
        .output()
        .expect("smbclient");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "smbclient {cmd}: {text}");
    let kib: f64 = text
        .split("(average ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no rate in smbclient output: {text}"));
    kib * 1024.0 / 1e6
}

fn main() {
    let rounds = env_or("ROUNDS", 3);
    let runtime = env_or("RUNTIME", 5);
    let size = env_or("SIZE_MIB", 1024) << 20;

    let smb = Samba::start();
    let relay = LatencyRelay::start(smb.addr(), Duration::from_millis(1));
    let dir = scratch();
    // Written, not sparse: tmpfs would otherwise allocate pages while being measured.
    let chunk = pattern(1, 1 << 20);
    let mut image = Vec::with_capacity(size as usize);
    while (image.len() as u64) < size {
        image.extend_from_slice(&chunk);
    }
    std::fs::write(smb.share_dir().join("bench.raw"), &image).unwrap();
    let put_source = dir.path().join("put.raw");
    std::fs::write(&put_source, &image).unwrap();
    drop(image);
    let pass = dir.path().join("smb.pass");
    twinpath_tests::write_secret(&pass, PASSWORD);

    let disks: [(&str, std::net::SocketAddr, &str); 4] = [
        ("loopback", smb.addr(), ""),
        ("wan", relay.addr(), ""),
        (
            "wan-serial",
            relay.addr(),
            "section_size: 16K, max_in_flight: 1, ",
        ),
        (
            "wan-pipelined",
            relay.addr(),
            "section_size: 16K, max_in_flight: 64, ",
        ),
    ];
    let mut cfg = String::from("disks:\n");
    for (name, addr, extra) in disks {
        cfg += &format!(
            "  - name: {name}\n    socket: {}\n    lock: false\n    backend: {{type: smb, server: \"{addr}\", share: {SHARE}, path: bench.raw, {extra}user: {USER}, password_file: {}}}\n",
            dir.path().join(format!("{name}.sock")).display(),
            pass.display()
        );
    }
    let daemon = Daemon::start(dir.path(), &cfg);

    let mut results = Results::default();
    for round in 1..=rounds {
        for (target, addr) in [("loopback", smb.addr()), ("wan", relay.addr())] {
            for (peer, signed) in [("smbclient", false), ("smbclient-signed", true)] {
                eprintln!("round {round}/{rounds}: {peer} {target}");
                let get = smbclient_rate(addr, signed, "get bench.raw /dev/null");
                results.add(&format!("{peer}-{target}"), "read", get);
                let put = format!("put {} put.raw", put_source.display());
                let put = smbclient_rate(addr, signed, &put);
                results.add(&format!("{peer}-{target}"), "write", put);
            }
        }
        for (target, _, _) in disks {
            eprintln!("round {round}/{rounds}: disk {target}");
            let tests = if target.starts_with("wan-") {
                ENGINE_TESTS
            } else {
                DISK_TESTS
            };
            let sock = dir.path().join(format!("{target}.sock"));
            bench_disk(&sock, tests, runtime, &mut results, target);
        }
    }
    assert!(daemon.stop().success());

    let report = report(&results, rounds, runtime, size);
    println!("{report}");
    update_doc("smb", &report);
}

fn report(r: &Results, rounds: u64, runtime: u64, size: u64) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = vec![format!(
        "Command: `ROUNDS={rounds} RUNTIME={runtime} SIZE_MIB={} scripts/bench-smb.sh` \
         (medians of {rounds} interleaved rounds, {runtime} s per disk test; {cpus} CPUs; a \
         {} MiB image on a private smbd on loopback, share on tmpfs; `+1 ms` = through a relay \
         adding 1 ms each way; disks with default options (512 KiB sections, 64 in flight), \
         one queue, user login. twinpath's sessions are signed (AES-GMAC; the smb2 crate signs \
         every authenticated session), so the like-for-like peer is `smbclient` with \
         `client signing = required`; its default (unsigned) is shown too. smbclient streams \
         the whole file with its own read-ahead/write-behind, so it is one figure per \
         direction.)",
        size >> 20,
        size >> 20
    )];
    for (net, title) in [("loopback", "loopback"), ("wan", "+1 ms each way")] {
        out.push(String::new());
        out.push(format!("{title}:"));
        out.push(String::new());
        out.push(
            "| test | twinpath smb disk | smbclient signed | ratio | smbclient unsigned | ratio |"
                .into(),
        );
        out.push("|---|---|---|---|---|---|".into());
        for test in DISK_TESTS.split(',') {
            let ours = r.median(net, test);
            if is_iops(test) {
                let p50 = r.median(net, &p50(test));
                out.push(format!(
                    "| {test} | {:.1}k IOPS, p50 {p50:.0} us | - | - | - | - |",
                    ours / 1000.0
                ));
                continue;
            }
            let dir = if test.starts_with("read") {
                "read"
            } else {
                "write"
            };
            let signed = r.median(&format!("smbclient-signed-{net}"), dir);
            let plain = r.median(&format!("smbclient-{net}"), dir);
            out.push(format!(
                "| {test} | {ours:.0} MB/s | {signed:.0} MB/s | {:.2}x | {plain:.0} MB/s | {:.2}x |",
                ours / signed,
                ours / plain
            ));
        }
    }
    out.push(String::new());
    out.push(
        "Engine at +1 ms each way, one 1 MiB request at a time (QD1) in 16 KiB sections (64 \
         of them, so the window has room): window 1 (serial) vs window 64 (pipelined)."
            .into(),
    );
    out.push(String::new());
    out.push("| test | serial | pipelined | ratio |".into());
    out.push("|---|---|---|---|".into());
    for test in ENGINE_TESTS.split(',') {
        let serial = r.median("wan-serial", test);
        let piped = r.median("wan-pipelined", test);
        out.push(format!(
            "| {test} | {serial:.1} MB/s | {piped:.1} MB/s | {:.1}x |",
            piped / serial
        ));
    }
    out.join("\n")
}
