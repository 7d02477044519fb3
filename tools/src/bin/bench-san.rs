//! The direct-path benchmark: a `san` disk and an `smb` disk through the vhost-user device
//! (driven by `twinpath bench`) against fio on the raw LUN and against qemu-storage-daemon
//! serving the same LUN range over vhost-user, in the same run. The LUN is a
//! loop device over a file on tmpfs holding xfs, shared by a private smbd, with the map
//! server on it. fio runs inside the san image's largest extent, so it overwrites nothing
//! else. A second san disk reaches the same LUN over iSCSI (tgtd on loopback exporting the
//! loop device), measured against `iscsi-perf` on that target. Rounds are interleaved; the
//! report gives medians and replaces the san section of docs/benchmarks.md. Run it with
//! `scripts/bench-san.sh` (ROUNDS, RUNTIME, SIZE_MIB).

use std::path::Path;
use std::process::Command;

use twinpath_filemap::{file_extents, ExtentClass};
use twinpath_tests::fileserver::FileServer;
use twinpath_tests::iscsi::Tgtd;
use twinpath_tests::lun::Fs;
use twinpath_tests::{pattern, Daemon};
use twinpath_tools::bench::{bench_disk, cpu, env_or, is_iops, p50, update_doc, CpuMeter, Results};

/// The default test set; `TESTS=a,b` runs a subset (the report then covers only those).
const DEFAULT_TESTS: &str =
    "read-1m-q1,read-1m-q16,write-1m-q1,write-1m-q16,randread-4k-q1,randread-4k-q32,randwrite-4k-q32";

/// `iscsi-perf` (libiscsi's reader: sequential or random reads only) on `url` for the read
/// tests; its "iops average N (M MB/s)" is the figure.
fn iscsi_perf(url: &str, test: &str, runtime: u64, results: &mut Results) {
    let mut parts = test.split('-');
    let (rw, bs, depth) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().trim_start_matches('q'),
    );
    let blocks = match bs {
        "1m" => "2048",
        "4k" => "8",
        other => panic!("block size {other}"),
    };
    let mut cmd = Command::new("iscsi-perf");
    cmd.args(["-m", depth, "-b", blocks, "-t", &runtime.to_string()]);
    match rw {
        "read" => {}
        "randread" => {
            cmd.arg("-r");
        }
        _ => return,
    }
    let out = cmd
        .arg(url)
        .output()
        .expect("iscsi-perf (apt install libiscsi-bin)");
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .rsplit("iops average ")
        .next()
        .filter(|_| out.status.success())
        .unwrap_or_else(|| {
            panic!(
                "iscsi-perf {test}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    let (iops, rest) = last.split_once(" (").expect("iscsi-perf figures");
    let mbs = rest.split_once(" MB/s").expect("iscsi-perf MB/s").0;
    let value: f64 = if is_iops(test) {
        iops.trim().parse().unwrap()
    } else {
        mbs.trim().parse().unwrap()
    };
    results.add("iscsi-perf", test, value);
}

/// One fio job on `dev` inside `[offset, offset + size)`, as `twinpath bench` names tests.
fn fio(dev: &Path, offset: u64, size: u64, test: &str, runtime: u64, results: &mut Results) {
    let mut parts = test.split('-');
    let (rw, bs, depth) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap().trim_start_matches('q'),
    );
    let out = Command::new("fio")
        .args([
            "--name=raw",
            "--direct=1",
            "--ioengine=io_uring",
            "--time_based",
            // The device holds the server's mounted filesystem; fio stays inside one extent
            // of the benchmark's own image.
            "--allow_mounted_write=1",
        ])
        .arg(format!("--filename={}", dev.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={depth}"))
        .arg(format!("--offset={offset}"))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={runtime}"))
        .arg("--output-format=json")
        .output()
        .expect("fio (apt install fio)");
    assert!(
        out.status.success(),
        "fio {test}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    let side = if rw.contains("write") {
        "write"
    } else {
        "read"
    };
    let job = &json["jobs"][0][side];
    let value = if is_iops(test) {
        job["iops"].as_f64().unwrap()
    } else {
        job["bw_bytes"].as_f64().unwrap() / 1e6
    };
    results.add("fio", test, value);
    let p50_ns = job["clat_ns"]["percentile"]["50.000000"]
        .as_f64()
        .unwrap_or(0.0);
    results.add("fio", &p50(test), p50_ns / 1000.0);
}

fn main() {
    let rounds = env_or("ROUNDS", 3);
    let runtime = env_or("RUNTIME", 5);
    let size = env_or("SIZE_MIB", 512) << 20;
    let tests = std::env::var("TESTS").unwrap_or_else(|_| DEFAULT_TESTS.to_owned());
    let tests = tests.as_str();

    let server = FileServer::start(3 * size + (512 << 20), Fs::Xfs, true, "");
    let (lun, dir) = (&server.lun, &server.dir);
    let chunk = pattern(3, 1 << 20);
    for name in ["san.raw", "iscsi.raw", "smb.raw"] {
        let mut f = std::fs::File::create(lun.mount_point().join(name)).unwrap();
        for _ in 0..size >> 20 {
            std::io::Write::write_all(&mut f, &chunk).unwrap();
        }
        f.sync_all().unwrap();
    }
    let extents =
        file_extents(&std::fs::File::open(lun.mount_point().join("san.raw")).unwrap()).unwrap();
    let biggest = extents
        .iter()
        .filter(|e| e.class == ExtentClass::Written)
        .max_by_key(|e| e.len)
        .expect("an extent");
    let fio_size = biggest.len.min(size);
    eprintln!(
        "san.raw: {} extents; fio uses {} MiB at device offset {}",
        extents.len(),
        fio_size >> 20,
        biggest.physical
    );

    let tgt = Tgtd::start(lun.device(), false, dir.path());
    let cfg = format!(
        "disks:\n  - name: san\n    socket: {}\n    backend: {}\n  - name: iscsi\n    socket: {}\n    backend: {}\n  - name: smb\n    socket: {}\n    backend: {}\n",
        dir.path().join("san.sock").display(),
        server.backend_yaml("san.raw", Some(&lun.device().display().to_string())),
        dir.path().join("iscsi.sock").display(),
        server.backend_yaml("iscsi.raw", Some(&format!("\"{}\"", tgt.url()))),
        dir.path().join("smb.sock").display(),
        server.backend_yaml("smb.raw", None),
    );
    let daemon = Daemon::start(dir.path(), &cfg);
    assert_eq!(
        daemon.log().matches("direct path ready").count(),
        2,
        "both san disks direct:\n{}",
        daemon.log()
    );
    // The vhost-user peer on the same LUN: qemu-storage-daemon serving exactly the extent fio
    // uses (a raw node with offset and size over the device), io_uring, O_DIRECT.
    let qsd_sock = dir.path().join("qsd.sock");
    let mut qsd = Command::new("qemu-storage-daemon")
        .args(["--object", "iothread,id=iot0", "--blockdev"])
        .arg(format!(
            "host_device,node-name=dev0,filename={},aio=io_uring,cache.direct=on",
            lun.device().display()
        ))
        .arg("--blockdev")
        .arg(format!(
            "raw,node-name=f0,file=dev0,offset={},size={fio_size}",
            biggest.physical
        ))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1,iothread=iot0",
            qsd_sock.display()
        ))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-storage-daemon (apt install qemu-utils)");
    while !qsd_sock.exists() {
        assert!(
            qsd.try_wait().unwrap().is_none(),
            "qemu-storage-daemon exited"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let mut results = Results::default();
    for round in 1..=rounds {
        eprintln!("round {round}/{rounds}: fio on the raw LUN");
        for test in tests.split(',') {
            let meter = CpuMeter::start(None);
            fio(
                lun.device(),
                biggest.physical,
                fio_size,
                test,
                runtime,
                &mut results,
            );
            results.add("fio", &cpu(test), meter.stop().0);
            iscsi_perf(&tgt.url(), test, runtime, &mut results);
        }
        for target in ["san", "qsd", "iscsi", "smb"] {
            eprintln!("round {round}/{rounds}: {target} disk");
            let sock = dir.path().join(format!("{target}.sock"));
            // One test at a time, to see what each costs the machine (and the daemon).
            for test in tests.split(',') {
                let meter = CpuMeter::start(Some(daemon.pid()));
                bench_disk(&sock, test, runtime, &mut results, target);
                let (machine, daemon_cpu) = meter.stop();
                results.add(target, &cpu(test), machine);
                if target == "san" {
                    results.add("san-daemon", &cpu(test), daemon_cpu);
                }
            }
        }
    }
    let _ = qsd.kill();
    let _ = qsd.wait();
    // The daemon first: it flushes its disks on the way out, the iSCSI one through tgtd.
    let log = daemon.log_after_stop();
    drop(tgt);
    let report = report(&results, tests, rounds, runtime, size, &log);
    println!("{report}");
    if tests == DEFAULT_TESTS {
        update_doc("san", &report);
    } else {
        eprintln!("TESTS is set: docs/benchmarks.md left as it was");
    }
}

fn report(r: &Results, tests: &str, rounds: u64, runtime: u64, size: u64, log: &str) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let totals = log
        .lines()
        .filter_map(|l| l.split("direct path totals").nth(1).map(str::trim))
        .collect::<Vec<_>>()
        .join("; ");
    let mut out = vec![
        format!(
            "Command: `ROUNDS={rounds} RUNTIME={runtime} SIZE_MIB={} scripts/bench-san.sh` \
             (medians of {rounds} interleaved rounds, {runtime} s per test; {cpus} CPUs; \
             loop device over tmpfs with xfs, {} MiB images; fio: io_uring, O_DIRECT, inside the \
             san image's largest extent; qsd: qemu-storage-daemon exporting that same extent \
             over vhost-user-blk, io_uring, O_DIRECT, own iothread; disks: one queue, \
             defaults).",
            size >> 20,
            size >> 20
        ),
        String::new(),
        "| test | fio raw LUN | san disk | san/fio | qsd on the LUN | san/qsd | smb disk | san/smb |"
            .into(),
        "|---|---|---|---|---|---|---|---|".into(),
    ];
    for test in tests.split(',') {
        let cell = |t: &str| {
            let v = r.median(t, test);
            let lat = r.median(t, &p50(test));
            if is_iops(test) {
                format!("{:.1}k IOPS, p50 {lat:.0} us", v / 1000.0)
            } else {
                format!("{v:.0} MB/s")
            }
        };
        let (fio, san, qsd, smb) = (
            r.median("fio", test),
            r.median("san", test),
            r.median("qsd", test),
            r.median("smb", test),
        );
        out.push(format!(
            "| {test} | {} | {} | {:.2}x | {} | {:.2}x | {} | {:.2}x |",
            cell("fio"),
            cell("san"),
            san / fio,
            cell("qsd"),
            san / qsd,
            cell("smb"),
            san / smb
        ));
    }
    out.push(String::new());
    out.push(format!(
        "CPUs busy during each test (median; the whole machine, {cpus} CPUs; for the san disk \
         also the twinpath daemon alone):"
    ));
    out.push(String::new());
    out.push("| test | fio raw LUN | san disk (daemon) | qsd on the LUN | smb disk |".into());
    out.push("|---|---|---|---|---|".into());
    for test in tests.split(',') {
        let c = |t: &str| r.median(t, &cpu(test));
        out.push(format!(
            "| {test} | {:.2} | {:.2} ({:.2}) | {:.2} | {:.2} |",
            c("fio"),
            c("san"),
            c("san-daemon"),
            c("qsd"),
            c("smb")
        ));
    }
    out.push(String::new());
    out.push(
        "The LUN over iSCSI (tgtd on loopback exporting the loop device): a san disk whose \
         `lun:` is the target's `iscsi://` URL, against `iscsi-perf` (libiscsi's own reader; \
         reads only) on the same target:"
            .into(),
    );
    out.push(String::new());
    out.push(
        "| test | iscsi-perf | san over iSCSI | san/iscsi-perf | san on the block device | smb disk |"
            .into(),
    );
    out.push("|---|---|---|---|---|---|".into());
    for test in tests.split(',') {
        let show = |v: f64| {
            if is_iops(test) {
                format!("{:.1}k IOPS", v / 1000.0)
            } else {
                format!("{v:.0} MB/s")
            }
        };
        let iscsi = r.median("iscsi", test);
        let (perf, ratio) = match r.try_median("iscsi-perf", test) {
            Some(p) => (show(p), format!("{:.2}x", iscsi / p)),
            None => ("-".into(), "-".into()),
        };
        out.push(format!(
            "| {test} | {perf} | {} | {ratio} | {} | {} |",
            show(iscsi),
            show(r.median("san", test)),
            show(r.median("smb", test))
        ));
    }
    out.push(String::new());
    out.push(format!(
        "Direct path of the san disks over the whole run: {totals}."
    ));
    out.join("\n")
}
