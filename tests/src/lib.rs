//! Fixtures for the integration tests: start the real `twinpath` binary on a config, wait until
//! it serves, stop it by PID. Images live on tmpfs (/dev/shm) so tests do not wait on the disk.

pub mod fileserver;
pub mod frontend;
pub mod iscsi;
pub mod lun;
pub mod relay;
pub mod samba;
pub mod sanhost;
pub mod tamper;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub use twinpath_client::{Client, ClientOptions, Op, Req};

/// The `twinpath` binary of this build (`TWINPATH_BIN` overrides).
pub fn twinpath_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("TWINPATH_BIN") {
        return PathBuf::from(p);
    }
    // Test executables live in target/<profile>/deps; the binary one level up.
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("twinpath");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build` first (scripts/test.sh does)",
        bin.display()
    );
    bin
}

/// The test guest (tests/guest), built on first use into `TWINPATH_GUEST_DIR` or
/// target/guest.
pub fn guest_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let dir = std::env::var_os("TWINPATH_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/guest"));
    let status = std::process::Command::new(root.join("tests/guest/build-initramfs.sh"))
        .arg(&dir)
        .status()
        .expect("build-initramfs.sh");
    assert!(status.success(), "building the guest failed");
    dir
}

/// A scratch directory on tmpfs, removed on drop.
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("twinpath-test-")
        .tempdir_in("/dev/shm")
        .expect("tempdir on /dev/shm")
}

/// Writes a secret file (password, key) readable by its owner only, as twinpath demands.
pub fn write_secret(path: &Path, contents: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::Write::write_all(&mut f, contents.as_bytes()).expect("write secret");
}

/// Creates a zero-filled (allocated) image of `size` bytes.
pub fn make_image(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
}

/// Creates an image of `size` bytes with every page written: on tmpfs a sparse image would
/// have its pages allocated while being measured.
pub fn make_written_image(path: &Path, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let chunk = vec![0x5au8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    f.flush()
}

/// A running `twinpath serve`.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Writes `config` into `dir`, starts the daemon on it and waits for its "ready" line.
    pub fn start(dir: &Path, config: &str) -> Daemon {
        let cfg = dir.join("twinpath.yaml");
        std::fs::write(&cfg, config).expect("write config");
        Self::start_with(&cfg, dir)
    }

    /// Starts the daemon on an existing config, logging into `dir`, and waits for "ready".
    pub fn start_with(cfg: &Path, dir: &Path) -> Daemon {
        let mut d = Self::spawn(cfg, dir);
        d.wait_for_log("ready:", Duration::from_secs(20));
        d
    }

    fn spawn(cfg: &Path, dir: &Path) -> Daemon {
        Self::spawn_command("serve", cfg, &dir.join("daemon.log"))
    }

    /// Starts `twinpath map-server` on `config` (written into `dir`), logging to
    /// `dir/map-server.log`, and waits for its "ready" line.
    pub fn start_map_server(dir: &Path, config: &str) -> Daemon {
        let cfg = dir.join("map-server.yaml");
        std::fs::write(&cfg, config).expect("write config");
        let mut d = Self::spawn_command("map-server", &cfg, &dir.join("map-server.log"));
        d.wait_for_log("ready:", Duration::from_secs(20));
        d
    }

    fn spawn_command(command: &str, cfg: &Path, log: &Path) -> Daemon {
        let log = log.to_path_buf();
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(twinpath_bin())
            .args([command, "--config"])
            .arg(cfg)
            .args(["--log-level", "debug"])
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .expect("spawn twinpath");
        Daemon {
            child: Some(child),
            log,
        }
    }

    /// Kills it with SIGKILL (nothing drained, nothing cleaned up) and reaps it.
    pub fn kill(mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits until the log contains `needle`; panics with the log if the daemon exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "twinpath exited ({status}) before logging {needle:?}:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in the log after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the config that [`Daemon::start`] wrote into `dir`, sends SIGHUP and waits
    /// until the daemon has reloaded it or rejected it; returns what it logged meanwhile.
    pub fn reload(&mut self, dir: &Path, config: &str) -> String {
        let before = self.log().len();
        std::fs::write(dir.join("twinpath.yaml"), config).expect("write config");
        signal(self.pid(), libc::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let since = self.log().split_off(before);
            if since.contains("reloaded ") || since.contains("keeping the") {
                return since;
            }
            assert!(
                Instant::now() < deadline,
                "no reload after SIGHUP:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon (asserting a clean exit) and returns its whole log.
    pub fn log_after_stop(self) -> String {
        let log = self.log.clone();
        assert!(self.stop().success(), "twinpath did not exit cleanly");
        std::fs::read_to_string(log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the exit status; a failed exit shows the log on stderr.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), libc::SIGTERM);
        let status = wait_timeout(&mut child, Duration::from_secs(40)).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("twinpath did not exit after SIGTERM:\n{}", self.log())
        });
        if !status.success() {
            eprintln!("twinpath exited with {status}:\n{}", self.log());
        }
        status
    }

    /// Waits for the daemon to exit on its own (e.g. when no disk could be opened).
    pub fn wait_exit(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        wait_timeout(&mut child, timeout).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("twinpath kept running:\n{}", self.log())
        })
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A test failing with a daemon running: what the daemon said goes with the failure
        // (its directory is removed right after), the warnings and errors in full and the
        // last lines whatever they are.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let notable: Vec<&str> = lines
                .iter()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                .take(200)
                .copied()
                .collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- daemon log {}: warnings and errors ---\n{}\n--- its last lines ---\n{}",
                self.log.display(),
                notable.join("\n"),
                tail.join("\n")
            );
        }
    }
}

/// Starts the daemon without waiting for "ready" (for configs that must fail).
pub fn spawn_daemon(dir: &Path, config: &str) -> Daemon {
    let cfg = dir.join("twinpath.yaml");
    std::fs::write(&cfg, config).expect("write config");
    Daemon::spawn(&cfg, dir)
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a PID we spawned.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// How many established TCP connections process `pid` holds to port `port` on loopback.
pub fn tcp_connections(pid: u32, port: u16) -> usize {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            // rem_address is "IP:PORT" in hex, state 01 is ESTABLISHED, inode is field 9.
            f.len() > 9
                && f[2].ends_with(&format!(":{port:04X}"))
                && f[3] == "01"
                && inodes.contains(f[9])
        })
        .count()
}

/// Signals every process in the group led by `pgid`.
pub fn signal_group(pgid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process group we created.
    unsafe { libc::kill(-(pgid as libc::pid_t), sig) };
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `twinpath ARGS` to completion; returns (status, stdout, stderr).
pub fn run_twinpath(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = Command::new(twinpath_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn twinpath");
    let mut out = String::new();
    let mut err = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap(), out, err)
}

/// A deterministic byte pattern that differs per `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A one-disk `file` config for `image`, served on `socket`.
pub fn file_disk_yaml(name: &str, socket: &Path, image: &Path, extra: &str) -> String {
    format!(
        "  - name: {name}\n    socket: {}\n{extra}    backend:\n      type: file\n      path: {}\n",
        socket.display(),
        image.display()
    )
}

/// The value of `series` (name and labels, as printed) in an OpenMetrics text.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

/// The metrics a daemon serves on `127.0.0.1:port`.
pub fn scrape(port: u16) -> String {
    ureq::get(&format!("http://127.0.0.1:{port}/metrics"))
        .call()
        .expect("scrape")
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// CPU time (user + system) process `pid` has used, in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// Process `pid`'s anonymous memory (heap, bounce buffers; not the guests' shared memory).
pub fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("RssAnon in /proc/PID/status")
        * 1024
}

/// Bytes in use on the filesystem at `path` (its size less what is free).
pub fn fs_used(path: &Path) -> u64 {
    let st = statvfs(path);
    (st.f_blocks - st.f_bfree) * st.f_frsize
}

/// Bytes an unprivileged file may still take on the filesystem at `path`.
pub fn fs_available(path: &Path) -> u64 {
    let st = statvfs(path);
    st.f_bavail * st.f_frsize
}

fn statvfs(path: &Path) -> libc::statvfs {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs fills the struct we pass, for a NUL-terminated path.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(
            libc::statvfs(c.as_ptr(), &mut st),
            0,
            "statvfs {}",
            path.display()
        );
        st
    }
}
