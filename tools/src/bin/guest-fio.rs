//! `guest-fio`: runs the fio job set of configs/fio inside a real QEMU guest (KVM where
//! /dev/kvm works, TCG otherwise) on vhost-user-blk disks, and writes a report comparing
//! them: report.md (a markdown table) and chart.svg. Run it through scripts/guest-fio.sh.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use twinpath_tests::samba::{Samba, PASSWORD, SHARE, USER};
use twinpath_tests::{scratch, Daemon};
use twinpath_tools::guestfio::{self, Guest, Overrides, Target};

#[derive(Parser)]
#[command(
    name = "guest-fio",
    about = "Run the fio job set in a QEMU guest on vhost-user-blk disks and report",
    long_about = "Boots the test guest (tests/guest: a Debian kernel and an initramfs with fio) \
        on each disk in turn, runs the chosen fio job files from configs/fio on it as /dev/vda, \
        collects fio's JSON and writes OUT/report.md (a table: IOPS or MB/s and p99 latency \
        per job and disk, and each disk's ratio to the peer) and OUT/chart.svg.\n\n\
        The jobs write to the disks: use scratch images only.\n\n\
        Examples:\n  \
        guest-fio --target file=/run/twinpath/scratch.sock --peer-image /dev/shm/scratch.raw\n  \
        guest-fio --local --jobs randread-4k-qd1,read-1m --runtime 5"
)]
struct Args {
    /// A disk of a running twinpath (or any vhost-user-blk socket): LABEL=SOCKET. Repeat
    /// for more disks.
    #[arg(long = "target", value_parser = parse_target)]
    targets: Vec<Target>,
    /// Serve the peer, qemu-storage-daemon, on this raw image and measure it last. Give the
    /// image a twinpath `file` disk serves, for a like-for-like comparison.
    #[arg(long)]
    peer_image: Option<PathBuf>,
    /// Set up everything here instead: a twinpath `file` disk and an `smb` disk (on a
    /// private smbd; needs root and samba), both on tmpfs images of the job size, and the
    /// peer on the file disk's image.
    #[arg(long)]
    local: bool,
    /// Job files to run (names in --job-dir without .fio), comma separated; default all.
    #[arg(long, value_delimiter = ',')]
    jobs: Vec<String>,
    /// Where the job files are.
    #[arg(long, default_value = "configs/fio")]
    job_dir: PathBuf,
    /// Seconds per time-based job, instead of the job file's `runtime`.
    #[arg(long)]
    runtime: Option<u64>,
    /// Ramp-up seconds, instead of the job file's `ramp_time`.
    #[arg(long)]
    ramp: Option<u64>,
    /// Bytes of the disk the jobs cover (fio syntax: 256m, 1g), instead of the job file's
    /// `size`. With --local it is also the images' size (default 256m there).
    #[arg(long)]
    size: Option<String>,
    /// Where the report, the chart, fio's JSON and the guest consoles go.
    #[arg(long, default_value = "target/guest-fio")]
    out: PathBuf,
    /// Where the guest (kernel, initramfs) is built.
    #[arg(long, default_value = "target/guest")]
    guest_dir: PathBuf,
}

fn parse_target(s: &str) -> Result<Target, String> {
    let (label, socket) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected LABEL=SOCKET"))?;
    if label.is_empty() || socket.is_empty() {
        return Err(format!("`{s}`: expected LABEL=SOCKET"));
    }
    Ok(Target {
        label: label.to_owned(),
        socket: PathBuf::from(socket),
    })
}

const PEER: &str = "qemu-storage-daemon";

/// The peer serving `image`, stopped by PID on drop.
struct Peer(Child);

impl Peer {
    fn start(image: &std::path::Path, socket: &std::path::Path) -> Result<Peer, String> {
        let mut child = Command::new("qemu-storage-daemon")
            .args(["--object", "iothread,id=iot0", "--blockdev"])
            .arg(format!(
                // Measured after twinpath's disks on the same image, which may still hold
                // its image locks: the runs take turns, so the peer leaves the locks alone.
                "file,node-name=f0,filename={},aio=io_uring,cache.direct=on,locking=off",
                image.display()
            ))
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues=1,iothread=iot0",
                socket.display()
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("qemu-storage-daemon: {e} (apt install qemu-utils)"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if child.try_wait().map_err(|e| e.to_string())?.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!(
                    "qemu-storage-daemon did not serve {}",
                    image.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Peer(child))
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What --local starts; dropped (stopped) at the end.
struct Local {
    _dir: tempfile::TempDir,
    _smb: Samba,
    _daemon: Daemon,
    image: PathBuf,
    /// The daemon's metrics endpoint, to show where requests were when a guest stalls.
    metrics: String,
}

fn write_image(path: &std::path::Path, size: u64) -> Result<(), String> {
    twinpath_tests::make_written_image(path, size).map_err(|e| format!("{}: {e}", path.display()))
}

fn start_local(size: u64) -> Result<(Local, Vec<Target>), String> {
    let dir = scratch();
    let image = dir.path().join("file.raw");
    write_image(&image, size)?;
    let smb = Samba::start();
    write_image(&smb.share_dir().join("smb.raw"), size)?;
    let password = dir.path().join("smb.pass");
    twinpath_tests::write_secret(&password, PASSWORD);
    let (file_sock, smb_sock) = (dir.path().join("file.sock"), dir.path().join("smb.sock"));
    let metrics = format!("127.0.0.1:{}", twinpath_tests::samba::free_port());
    let config = format!(
        "metrics: {{listen: '{metrics}'}}\ndisks:\n  - name: file\n    socket: {}\n    backend: {{type: file, path: {}}}\n  - name: smb\n    socket: {}\n    backend: {{type: smb, server: '{}', share: {SHARE}, path: smb.raw, user: {USER}, password_file: {}}}\n",
        file_sock.display(),
        image.display(),
        smb_sock.display(),
        smb.addr(),
        password.display()
    );
    let daemon = Daemon::start(dir.path(), &config);
    let targets = vec![
        Target {
            label: "twinpath file".into(),
            socket: file_sock,
        },
        Target {
            label: "twinpath smb".into(),
            socket: smb_sock,
        },
    ];
    Ok((
        Local {
            _dir: dir,
            _smb: smb,
            _daemon: daemon,
            image,
            metrics,
        },
        targets,
    ))
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("guest-fio: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(mut args: Args) -> Result<(), String> {
    let repo = std::env::current_dir().map_err(|e| e.to_string())?;
    if !repo.join("tests/guest/run-guest.sh").exists() {
        return Err(
            "run it from the repository's top directory (scripts/guest-fio.sh does)".into(),
        );
    }
    if args.local && args.size.is_none() {
        args.size = Some("256m".into());
    }
    let overrides = Overrides {
        runtime: args.runtime,
        ramp_time: args.ramp,
        size: args.size.clone(),
    };
    let jobs = guestfio::load_jobs(&args.job_dir, &args.jobs, &overrides)?;
    let local = if args.local {
        let size = twinpath_core::ByteSize::parse(args.size.as_deref().unwrap_or("256m"))
            .map_err(|e| e.to_string())?
            .0;
        let (local, targets) = start_local(size)?;
        args.targets.extend(targets);
        args.peer_image = Some(local.image.clone());
        Some(local)
    } else {
        None
    };
    if args.targets.is_empty() && args.peer_image.is_none() {
        return Err(
            "nothing to measure: give --target LABEL=SOCKET, --peer-image or --local".into(),
        );
    }
    let guest = Guest::build(&repo, &args.guest_dir)?;
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let peer_dir = scratch();
    let peer = match &args.peer_image {
        Some(image) => {
            let socket = peer_dir.path().join("qsd.sock");
            Some((Peer::start(image, &socket)?, socket))
        }
        None => None,
    };
    let mut targets = args.targets.clone();
    if let Some((_, socket)) = &peer {
        targets.push(Target {
            label: PEER.into(),
            socket: socket.clone(),
        });
    }

    let started = Instant::now();
    let accel = std::fs::read_to_string(args.guest_dir.join("accel")).unwrap_or_default();
    eprintln!(
        "guest-fio: {} jobs on {} disks{}",
        jobs.len(),
        targets.len(),
        if accel.trim().is_empty() {
            String::new()
        } else {
            format!(" (guest accelerator: {})", accel.trim())
        }
    );
    let mut results = Vec::new();
    let mut retried = Vec::new();
    for target in &targets {
        let work = args.out.join(target.label.replace([' ', '/'], "-"));
        // Retried jobs are the same elements of `jobs`, so they keep their numbers.
        let mut progress = |job: &guestfio::Job| {
            let index = jobs
                .iter()
                .position(|j| std::ptr::eq(j, job))
                .map_or(0, |i| i + 1);
            guestfio::progress_line(&target.label, index, jobs.len(), job, started);
        };
        eprintln!(
            "[{:>4.0} s] {}: booting the guest on {}",
            started.elapsed().as_secs_f64(),
            target.label,
            target.socket.display()
        );
        let (r, stalled) = guest.run_retrying(target, &jobs, &work, &mut progress)?;
        if let Some(job) = stalled {
            retried.push(format!("{} (in {job})", target.label));
        }
        if let (Some(local), true) = (&local, r.iter().any(|r| r.error.is_some())) {
            // Whether the daemon still holds requests tells a stalled disk from a stalled guest.
            let out = Command::new(twinpath_tests::twinpath_bin())
                .args(["stats", "--address", &local.metrics])
                .output()
                .map_err(|e| format!("twinpath stats: {e}"))?;
            eprintln!(
                "guest-fio: twinpath's counters now:\n{}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        results.push((target.label.clone(), r));
    }
    drop(peer);
    drop(local);

    let accel = std::fs::read_to_string(args.guest_dir.join("accel")).unwrap_or_default();
    let setup = format!(
        "Guest fio report: {} jobs ({}), guest on QEMU with {}, {} s in all.",
        jobs.len(),
        jobs.iter()
            .map(|j| j.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        if accel.trim().is_empty() {
            "?"
        } else {
            accel.trim()
        },
        started.elapsed().as_secs()
    );
    let setup = if retried.is_empty() {
        setup
    } else {
        format!(
            "{setup} The guest stalled and ran the rest of the jobs again in a fresh guest on: {}.",
            retried.join(", ")
        )
    };
    let report = guestfio::markdown(&results, peer_label(&targets), &setup);
    let svg = guestfio::chart(&results, "fio in a guest, per disk")?;
    std::fs::write(args.out.join("report.md"), &report).map_err(|e| e.to_string())?;
    std::fs::write(args.out.join("chart.svg"), svg).map_err(|e| e.to_string())?;
    print!("{report}");
    eprintln!(
        "guest-fio: wrote {0}/report.md and {0}/chart.svg",
        args.out.display()
    );
    if results
        .iter()
        .any(|(_, rs)| rs.iter().any(|r| r.error.is_some()))
    {
        return Err("some jobs failed (see the report)".into());
    }
    Ok(())
}

fn peer_label(targets: &[Target]) -> Option<&str> {
    targets
        .iter()
        .find(|t| t.label == PEER)
        .map(|t| t.label.as_str())
}
