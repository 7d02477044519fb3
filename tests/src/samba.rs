//! A private smbd for a test run: its own config, directories and loopback port, started by
//! the test and stopped by PID. Never touches /etc/samba or system services.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const SHARE: &str = "vmstore";
/// The same directory, shared read-only: opening an image for writing there is denied.
pub const RO_SHARE: &str = "vmstore-ro";
pub const USER: &str = "root";
pub const PASSWORD: &str = "twinpath-test";

pub struct Samba {
    child: Option<Child>,
    dir: tempfile::TempDir,
    port: u16,
    share: PathBuf,
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Samba {
    /// Starts smbd sharing a fresh directory as `vmstore` (user `root`, guest allowed) and
    /// waits until it accepts connections.
    pub fn start() -> Samba {
        Self::start_sharing(None)
    }

    /// Like [`Samba::start`], sharing `share` (e.g. a mounted volume) instead of a fresh
    /// directory.
    pub fn start_sharing(share: Option<&Path>) -> Samba {
        let dir = tempfile::Builder::new()
            .prefix("twinpath-smbd-")
            .tempdir_in("/dev/shm")
            .expect("smbd dir");
        let d = dir.path();
        for sub in [
            "share", "private", "state", "lock", "cache", "pid", "ncalrpc",
        ] {
            std::fs::create_dir_all(d.join(sub)).expect("smbd subdir");
        }
        let port = free_port();
        let share = share.map_or_else(|| d.join("share"), Path::to_path_buf);
        let conf = d.join("smb.conf");
        std::fs::write(&conf, config(d, port, &share)).expect("smb.conf");
        let mut add = Command::new("smbpasswd")
            .args(["-c"])
            .arg(&conf)
            .args(["-s", "-a", USER])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("smbpasswd (apt install samba)");
        use std::io::Write;
        write!(add.stdin.take().unwrap(), "{PASSWORD}\n{PASSWORD}\n").unwrap();
        let out = add.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "smbpasswd: {}",
            String::from_utf8_lossy(&out.stderr)
        );

        let mut samba = Samba {
            child: None,
            dir,
            port,
            share,
        };
        samba.restart();
        samba
    }

    /// Starts smbd again (same config, port and share) after [`Samba::kill`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "smbd is running");
        let d = self.dir.path();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("smbd.log"))
            .expect("smbd log");
        // Its own process group: on SIGTERM smbd signals its whole group (kill(0, SIGTERM)),
        // which would otherwise be the test runner's.
        let child = Command::new("smbd")
            .process_group(0)
            .args([
                "-F",
                "--no-process-group",
                "--debug-stdout",
                "-d",
                "1",
                "-s",
            ])
            .arg(d.join("smb.conf"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("smbd (apt install samba)");
        self.child = Some(child);
        self.wait_listening(Duration::from_secs(20));
    }

    fn wait_listening(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while TcpStream::connect(self.addr()).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("smbd exited ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "smbd not listening after {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// smbd's PID, which also leads the process group of its connection processes.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("smbd running").id()
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The directory behind the share, as the server sees it.
    pub fn share_dir(&self) -> PathBuf {
        self.share.clone()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("smbd.log")).unwrap_or_default()
    }

    /// Runs `smbclient //127.0.0.1/vmstore -c CMD` as `root`, or as guest with `guest`.
    pub fn smbclient(&self, cmd: &str, guest: bool) -> Output {
        let mut c = Command::new("smbclient");
        c.arg(format!("//127.0.0.1/{SHARE}"))
            .args(["-p", &self.port.to_string(), "-c", cmd]);
        if guest {
            c.arg("-N");
        } else {
            c.args(["-U", &format!("{USER}%{PASSWORD}")]);
        }
        c.output().expect("smbclient (apt install smbclient)")
    }

    /// Kills smbd and the children serving its connections, as a crash of the server would
    /// (SIGKILL to the process group it leads).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::signal_group(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

impl Drop for Samba {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            crate::signal(c.id(), libc::SIGTERM);
            if crate::wait_timeout(&mut c, Duration::from_secs(5)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

fn config(d: &Path, port: u16, share: &Path) -> String {
    let p = |s: &str| d.join(s).display().to_string();
    format!(
        "[global]
    interfaces = 127.0.0.1
    bind interfaces only = yes
    smb ports = {port}
    disable netbios = yes
    server min protocol = SMB2_02
    server max protocol = SMB3_11
    security = user
    passdb backend = tdbsam:{passdb}
    map to guest = Bad User
    ntlm auth = ntlmv2-only
    server signing = auto
    load printers = no
    printing = bsd
    printcap name = /dev/null
    disable spoolss = yes
    private dir = {private}
    state directory = {state}
    lock directory = {lock}
    cache directory = {cache}
    pid directory = {pid}
    ncalrpc dir = {ncalrpc}
    log file = {log}

[{SHARE}]
    path = {share}
    read only = no
    guest ok = yes
    force user = root
    kernel oplocks = no
    kernel share modes = no
    posix locking = no

[{RO_SHARE}]
    path = {share}
    read only = yes
    guest ok = yes
    force user = root
",
        passdb = p("private/passdb.tdb"),
        private = p("private"),
        state = p("state"),
        lock = p("lock"),
        cache = p("cache"),
        pid = p("pid"),
        ncalrpc = p("ncalrpc"),
        log = p("smbd.log"),
        share = share.display(),
    )
}
