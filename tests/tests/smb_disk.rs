//! `smb` disks against a private smbd, driven by the real vhost-user client.

use std::path::Path;

use twinpath_tests::samba::{Samba, PASSWORD, RO_SHARE, SHARE, USER};
use twinpath_tests::*;

const MIB: u64 = 1 << 20;

fn smb_disk_yaml(name: &str, sock: &Path, smb: &Samba, path: &str, extra: &str) -> String {
    format!(
        "  - name: {name}\n    socket: {}\n    backend:\n      type: smb\n      server: {}\n      share: {SHARE}\n      path: {path}\n{extra}",
        sock.display(),
        smb.addr()
    )
}

#[test]
fn smb_disk_reads_writes_and_flushes_through_the_share() {
    let smb = Samba::start();
    let dir = scratch();
    std::fs::create_dir(smb.share_dir().join("images")).unwrap();
    let image = smb.share_dir().join("images/vm.raw");
    std::fs::write(&image, pattern(1, 16 * MIB as usize)).unwrap();
    let pass = dir.path().join("smb.pass");
    twinpath_tests::write_secret(&pass, &format!("{PASSWORD}\n"));
    let sock = dir.path().join("smb.sock");
    let extra = format!(
        "      user: {USER}\n      password_file: {}\n      section_size: 64K\n",
        pass.display()
    );
    let daemon = Daemon::start(
        dir.path(),
        &format!(
            "disks:\n{}",
            smb_disk_yaml("smb0", &sock, &smb, "images/vm.raw", &extra)
        ),
    );

    let opts = ClientOptions {
        buffer_size: 4 * MIB as usize,
        ..Default::default()
    };
    let mut c = Client::connect(&sock, &opts).unwrap();
    assert_eq!(c.capacity(), 16 * MIB);
    // A 1 MiB read is 16 sections of 64 KiB in flight together.
    assert_eq!(
        c.read(0, 2 * MIB, MIB as usize).unwrap(),
        pattern(1, 16 * MIB as usize)[2 * MIB as usize..3 * MIB as usize]
    );
    let data = pattern(2, 3 * MIB as usize + 4096);
    c.write(0, 5 * MIB, &data).unwrap();
    c.flush(0).unwrap();
    assert_eq!(c.read(0, 5 * MIB, data.len()).unwrap(), data);
    drop(c);
    // The server's file has the data.
    let on_server = std::fs::read(&image).unwrap();
    assert_eq!(
        &on_server[5 * MIB as usize..5 * MIB as usize + data.len()],
        &data[..]
    );
    assert!(daemon.stop().success());
}

#[test]
fn smb_guest_disk_is_created_with_create_size() {
    let smb = Samba::start();
    let dir = scratch();
    let sock = dir.path().join("g.sock");
    let daemon = Daemon::start(
        dir.path(),
        &format!(
            "disks:\n{}",
            smb_disk_yaml("guest", &sock, &smb, "new.raw", "      create_size: 8M\n")
        ),
    );
    assert_eq!(
        std::fs::metadata(smb.share_dir().join("new.raw"))
            .unwrap()
            .len(),
        8 * MIB
    );
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    assert_eq!(c.capacity(), 8 * MIB);
    c.write(0, 8 * MIB - 4096, &pattern(5, 4096)).unwrap();
    assert_eq!(c.read(0, 8 * MIB - 4096, 4096).unwrap(), pattern(5, 4096));
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn start_errors_name_the_disk_and_the_cause() {
    let smb = Samba::start();
    let dir = scratch();
    let pass = dir.path().join("bad.pass");
    twinpath_tests::write_secret(&pass, "wrong-password\n");
    let creds = format!(
        "      user: {USER}\n      password_file: {}\n",
        pass.display()
    );
    // A password file others may read: refused, naming the file and its mode.
    let loose = dir.path().join("loose.pass");
    std::fs::write(&loose, format!("{PASSWORD}\n")).unwrap();
    std::fs::set_permissions(
        &loose,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o644),
    )
    .unwrap();
    let loose_creds = format!(
        "      user: {USER}\n      password_file: {}\n",
        loose.display()
    );
    std::fs::write(smb.share_dir().join("there.raw"), pattern(3, 4096)).unwrap();
    let cfg = format!(
        "disks:\n{}{}{}{}{}",
        smb_disk_yaml("missing", &dir.path().join("m.sock"), &smb, "nope.raw", ""),
        smb_disk_yaml(
            "badpass",
            &dir.path().join("b.sock"),
            &smb,
            "nope-either.raw",
            &creds
        ),
        smb_disk_yaml("noshare", &dir.path().join("s.sock"), &smb, "there.raw", "")
            .replace(&format!("share: {SHARE}"), "share: nosuchshare"),
        smb_disk_yaml("denied", &dir.path().join("d.sock"), &smb, "there.raw", "")
            .replace(&format!("share: {SHARE}"), &format!("share: {RO_SHARE}")),
        smb_disk_yaml(
            "loose",
            &dir.path().join("l.sock"),
            &smb,
            "there.raw",
            &loose_creds
        ),
    );
    let status = spawn_daemon(dir.path(), &cfg).wait_exit(std::time::Duration::from_secs(60));
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("disk `missing`") && log.contains("does not exist"),
        "{log}"
    );
    let line = |disk: &str| {
        log.lines()
            .find(|l| l.contains(&format!("disk `{disk}`")))
            .unwrap_or_else(|| panic!("no line for {disk}:\n{log}"))
            .to_owned()
    };
    assert!(line("badpass").contains("connect and log in"), "{log}");
    assert!(
        line("loose").contains(&format!("{}: mode 0644", loose.display())),
        "{log}"
    );
    assert!(line("noshare").contains("share `nosuchshare`"), "{log}");
    assert!(line("denied").contains("ACCESS_DENIED"), "{log}");
}

#[test]
fn read_only_smb_disk_opens_the_image_for_reading() {
    let smb = Samba::start();
    let dir = scratch();
    std::fs::write(smb.share_dir().join("ro.raw"), pattern(7, MIB as usize)).unwrap();
    let sock = dir.path().join("ro.sock");
    let yaml = smb_disk_yaml("ro", &sock, &smb, "ro.raw", "")
        .replace("    backend:", "    read_only: true\n    backend:");
    let daemon = Daemon::start(dir.path(), &format!("disks:\n{yaml}"));
    assert!(
        Client::connect(&sock, &ClientOptions::default()).is_err(),
        "a read-write client is refused"
    );
    let mut c = Client::connect(
        &sock,
        &ClientOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        c.read(0, 4096, 8192).unwrap(),
        pattern(7, MIB as usize)[4096..12288]
    );
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn smb_discard_and_write_zeroes_read_back_as_zeros() {
    let smb = Samba::start();
    let dir = scratch();
    let image = smb.share_dir().join("z.raw");
    std::fs::write(&image, pattern(9, 4 * MIB as usize)).unwrap();
    let sock = dir.path().join("z.sock");
    let daemon = Daemon::start(
        dir.path(),
        &format!("disks:\n{}", smb_disk_yaml("z", &sock, &smb, "z.raw", "")),
    );
    let mut c = Client::connect(
        &sock,
        &ClientOptions {
            buffer_size: 2 * MIB as usize,
            ..Default::default()
        },
    )
    .unwrap();
    c.discard(0, MIB, MIB as usize).unwrap();
    c.write_zeroes(0, 3 * MIB, 8192, false).unwrap();
    assert!(c
        .read(0, MIB, MIB as usize)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    let around = c.read(0, 3 * MIB - 4096, 16384).unwrap();
    assert!(around[4096..12288].iter().all(|&b| b == 0));
    let original = pattern(9, 4 * MIB as usize);
    assert_eq!(
        &around[..4096],
        &original[3 * MIB as usize - 4096..3 * MIB as usize]
    );
    assert_eq!(
        &around[12288..],
        &original[3 * MIB as usize + 8192..3 * MIB as usize + 12288]
    );
    drop(c);
    let on_server = std::fs::read(&image).unwrap();
    assert!(
        on_server[MIB as usize..2 * MIB as usize]
            .iter()
            .all(|&b| b == 0),
        "zeroed on the server"
    );
    assert_eq!(&on_server[..MIB as usize], &original[..MIB as usize]);
    assert!(daemon.stop().success());
}

/// Reads `len` bytes at `offset`, retrying while the disk has not reconnected yet (15 s).
fn read_once_back(c: &mut Client, queue: usize, offset: u64, len: usize) -> Vec<u8> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match c.read(queue, offset, len) {
            Ok(d) => return d,
            Err(e) => {
                assert!(std::time::Instant::now() < deadline, "no reconnect: {e}");
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
    }
}

/// Config lines that log in as the test user, the password in a file under `dir`.
fn user_login(dir: &Path) -> String {
    let pass = dir.join("smb.pass");
    twinpath_tests::write_secret(&pass, &format!("{PASSWORD}\n"));
    format!(
        "      user: {USER}\n      password_file: {}\n",
        pass.display()
    )
}

#[test]
fn disks_on_one_server_share_one_connection() {
    let smb = Samba::start();
    let dir = scratch();
    let login = user_login(dir.path());
    let mut cfg = String::from("disks:\n");
    for name in ["a", "b", "c"] {
        std::fs::write(
            smb.share_dir().join(format!("{name}.raw")),
            pattern(
                name.len() as u64 + name.as_bytes()[0] as u64,
                2 * MIB as usize,
            ),
        )
        .unwrap();
        cfg += &smb_disk_yaml(
            name,
            &dir.path().join(format!("{name}.sock")),
            &smb,
            &format!("{name}.raw"),
            &login,
        );
    }
    let daemon = Daemon::start(dir.path(), &cfg);
    let mut clients: Vec<Client> = ["a", "b", "c"]
        .iter()
        .map(|n| Client::connect(&dir.path().join(format!("{n}.sock")), &Default::default()))
        .collect::<Result<_, _>>()
        .unwrap();
    for (i, c) in clients.iter_mut().enumerate() {
        let data = pattern(100 + i as u64, 65536);
        c.write(0, 4096 * i as u64, &data).unwrap();
        assert_eq!(c.read(0, 4096 * i as u64, data.len()).unwrap(), data);
    }
    assert_eq!(
        tcp_connections(daemon.pid(), smb.addr().port()),
        1,
        "three disks, one login: one connection"
    );
    drop(clients);
    assert!(daemon.stop().success());
}

#[test]
fn smbd_killed_during_io_fails_requests_in_time_and_the_disk_reconnects() {
    let mut smb = Samba::start();
    let other = Samba::start();
    let dir = scratch();
    let image = pattern(11, 8 * MIB as usize);
    std::fs::write(smb.share_dir().join("vm.raw"), &image).unwrap();
    std::fs::write(other.share_dir().join("other.raw"), &image).unwrap();
    let sock = dir.path().join("vm.sock");
    let other_sock = dir.path().join("other.sock");
    let cfg = format!(
        "disks:\n{}{}",
        smb_disk_yaml(
            "vm",
            &sock,
            &smb,
            "vm.raw",
            &format!("{}      timeout: 5\n", user_login(dir.path()))
        ),
        smb_disk_yaml("other", &other_sock, &other, "other.raw", ""),
    );
    let daemon = Daemon::start(dir.path(), &cfg);
    let opts = ClientOptions {
        buffer_size: 4 * MIB as usize,
        ..Default::default()
    };

    // Reads keep going on `vm` until one fails; smbd dies under them.
    let reader = {
        let sock = sock.clone();
        let opts = opts.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&sock, &opts).unwrap();
            let mut ok = 0;
            loop {
                match c.read(0, (ok % 4) * MIB, 4 * MIB as usize) {
                    Ok(_) => ok += 1,
                    Err(e) => return (ok, e, std::time::Instant::now(), c),
                }
            }
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(500));
    let killed = std::time::Instant::now();
    smb.kill();
    let (reads_before, err, failed_at, mut c) = reader.join().unwrap();
    let took = failed_at.duration_since(killed);
    assert!(reads_before > 0, "reads worked before the kill");
    assert_eq!(err.errno, -libc::EIO, "{err}");
    assert!(
        took < std::time::Duration::from_secs(6),
        "failed after {took:?}"
    );

    // The other server's disk keeps serving while `vm`'s server is down.
    let mut o = Client::connect(&other_sock, &opts).unwrap();
    let data = pattern(12, MIB as usize);
    o.write(0, MIB, &data).unwrap();
    assert_eq!(o.read(0, MIB, data.len()).unwrap(), data);
    assert!(c.read(0, 0, 4096).is_err(), "server still down");

    // Back up: the disk reconnects on its own and I/O works again.
    smb.restart();
    let back = read_once_back(&mut c, 0, 0, MIB as usize);
    assert_eq!(back, image[..MIB as usize]);
    let data = pattern(13, MIB as usize);
    c.write(0, 2 * MIB, &data).unwrap();
    c.flush(0).unwrap();
    assert_eq!(
        std::fs::read(smb.share_dir().join("vm.raw")).unwrap()[2 * MIB as usize..3 * MIB as usize],
        data[..]
    );
    let log = daemon.log();
    assert!(
        log.contains("reconnected") && log.contains("reopened image"),
        "{log}"
    );
    drop((c, o));
    assert!(daemon.stop().success());
}

#[test]
fn a_flushed_write_survives_kill_9_of_smbd() {
    let mut smb = Samba::start();
    let dir = scratch();
    std::fs::write(
        smb.share_dir().join("vm.raw"),
        pattern(21, 4 * MIB as usize),
    )
    .unwrap();
    let sock = dir.path().join("vm.sock");
    let daemon = Daemon::start(
        dir.path(),
        &format!(
            "disks:\n{}",
            smb_disk_yaml("vm", &sock, &smb, "vm.raw", &user_login(dir.path()))
        ),
    );
    let mut c = Client::connect(
        &sock,
        &ClientOptions {
            buffer_size: 2 * MIB as usize,
            ..Default::default()
        },
    )
    .unwrap();
    let data = pattern(22, 2 * MIB as usize);
    c.write(0, MIB, &data).unwrap();
    c.flush(0).unwrap();
    smb.kill();
    smb.restart();
    let back = read_once_back(&mut c, 0, MIB, data.len());
    assert_eq!(back, data, "read back through the disk after the restart");
    let out = smb.smbclient("get vm.raw /dev/stdout", false);
    assert!(out.status.success());
    assert_eq!(
        out.stdout[MIB as usize..3 * MIB as usize],
        data[..],
        "read back through smbclient"
    );
    drop(c);
    assert!(daemon.stop().success());
}

#[test]
fn a_server_that_stops_answering_fails_requests_at_the_timeout() {
    let smb = Samba::start();
    let dir = scratch();
    std::fs::write(
        smb.share_dir().join("vm.raw"),
        pattern(31, 4 * MIB as usize),
    )
    .unwrap();
    let sock = dir.path().join("vm.sock");
    let daemon = Daemon::start(
        dir.path(),
        &format!(
            "disks:\n{}",
            smb_disk_yaml("vm", &sock, &smb, "vm.raw", "      timeout: 2\n")
        ),
    );
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    assert_eq!(
        c.read(0, 0, 4096).unwrap(),
        pattern(31, 4 * MIB as usize)[..4096]
    );
    // smbd and its connection's process freeze: the socket stays open, nothing answers.
    signal_group(smb.pid(), libc::SIGSTOP);
    let asked = std::time::Instant::now();
    let err = c.read(0, MIB, 65536).unwrap_err();
    let took = asked.elapsed();
    signal_group(smb.pid(), libc::SIGCONT);
    assert_eq!(err.errno, -libc::EIO, "{err}");
    assert!(
        took >= std::time::Duration::from_secs(2) && took < std::time::Duration::from_secs(10),
        "failed after {took:?}"
    );
    assert!(
        daemon.log().contains("not done after 2s"),
        "{}",
        daemon.log()
    );
    // Answering again: the same connection serves the next request.
    assert_eq!(
        c.read(0, MIB, 65536).unwrap(),
        pattern(31, 4 * MIB as usize)[MIB as usize..MIB as usize + 65536]
    );
    drop(c);
    assert!(daemon.stop().success());
}

/// Issue 16 item 3: an smb disk opens its image sharing it only with readers, as QEMU's image
/// locks do, so a writer anywhere else (another daemon on this or another host, smbclient) is
/// refused by the server, and this disk is refused while another client writes; readers are
/// welcome. `lock: false` on every disk that shares the image turns it off.
#[test]
fn a_second_writer_of_an_smb_image_is_refused_by_the_server() {
    let smb = Samba::start();
    let (a, b) = (scratch(), scratch());
    std::fs::write(
        smb.share_dir().join("shared.raw"),
        pattern(4, 4 * MIB as usize),
    )
    .unwrap();
    let (sock_a, sock_b) = (a.path().join("one.sock"), b.path().join("two.sock"));
    let yaml_a = smb_disk_yaml("one", &sock_a, &smb, "shared.raw", "");
    let yaml_b = smb_disk_yaml("two", &sock_b, &smb, "shared.raw", "");
    let daemon_a = Daemon::start(a.path(), &format!("disks:\n{yaml_a}"));

    let local = a.path().join("local.raw");
    std::fs::write(&local, pattern(9, 4096)).unwrap();
    let put = smb.smbclient(&format!("put {} shared.raw", local.display()), false);
    let put_out =
        String::from_utf8_lossy(&put.stdout).to_string() + &String::from_utf8_lossy(&put.stderr);
    assert!(
        put_out.contains("SHARING_VIOLATION"),
        "smbclient wrote the image a disk holds: {put_out}"
    );
    let got = a.path().join("got.raw");
    let get = smb.smbclient(&format!("get shared.raw {}", got.display()), false);
    assert!(get.status.success(), "a reader was refused: {get:?}");
    assert_eq!(std::fs::read(&got).unwrap(), pattern(4, 4 * MIB as usize));

    let refused = |yaml: &str| {
        let status = spawn_daemon(b.path(), &format!("disks:\n{yaml}"))
            .wait_exit(std::time::Duration::from_secs(60));
        let log = std::fs::read_to_string(b.path().join("daemon.log")).unwrap();
        assert_eq!(status.code(), Some(1), "{log}");
        let line = log
            .lines()
            .find(|l| l.contains("disk `two`"))
            .unwrap_or_else(|| panic!("no line for the disk:\n{log}"));
        assert!(
            line.contains("in use") && line.contains("shared.raw") && line.contains("lock: false"),
            "{line}"
        );
    };
    refused(&yaml_b);
    refused(&yaml_b.replace("    backend:", "    read_only: true\n    backend:"));

    // Once the first daemon is gone, the image is free.
    assert!(daemon_a.stop().success());
    let daemon_b = Daemon::start(b.path(), &format!("disks:\n{yaml_b}"));
    let mut c = Client::connect(&sock_b, &ClientOptions::default()).unwrap();
    c.write(0, 0, &pattern(5, 4096)).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern(5, 4096));
    drop(c);
    assert!(daemon_b.stop().success());

    // Shared on purpose: both served.
    let off = |yaml: &str| yaml.replace("    backend:", "    lock: false\n    backend:");
    let daemon_a = Daemon::start(a.path(), &format!("disks:\n{}", off(&yaml_a)));
    let daemon_b = Daemon::start(b.path(), &format!("disks:\n{}", off(&yaml_b)));
    for sock in [&sock_a, &sock_b] {
        let mut c = Client::connect(sock, &ClientOptions::default()).unwrap();
        assert_eq!(c.read(0, 0, 4096).unwrap(), pattern(5, 4096));
    }
    assert!(daemon_a.stop().success());
    assert!(daemon_b.stop().success());
}

/// (Review of 73262f0.) A reload that changes an smb disk replaced it with a disk refused by
/// the old one's own handle (share modes), which it kept open until the backend was dropped:
/// the disk was gone after the reload. A stopping disk closes its handle now, and a changed
/// disk on the same image is opened once the old one has stopped.
#[test]
fn a_reload_that_changes_an_smb_disk_keeps_it_served() {
    let smb = Samba::start();
    let dir = scratch();
    std::fs::write(smb.share_dir().join("vm.raw"), pattern(4, 4 * MIB as usize)).unwrap();
    let sock = dir.path().join("vm.sock");
    let yaml = smb_disk_yaml("vm", &sock, &smb, "vm.raw", "");
    let mut daemon = Daemon::start(dir.path(), &format!("disks:\n{yaml}"));
    {
        let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
        assert_eq!(
            c.read(0, 0, 4096).unwrap(),
            pattern(4, 4 * MIB as usize)[..4096]
        );
    }
    let changed = yaml.replace("    backend:", "    num_queues: 2\n    backend:");
    let t = std::time::Instant::now();
    let since = daemon.reload(dir.path(), &format!("disks:\n{changed}"));
    assert!(since.contains("1 replaced"), "{since}");
    // No waiting out the server's refusals.
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    c.write(0, 0, &pattern(5, 4096)).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), pattern(5, 4096));
    drop(c);
    assert!(daemon.stop().success());
}

/// (Review of 73262f0.) Share modes keep the image from being renamed or replaced while a disk
/// holds it, but not its directory: a client renamed the directory away and put another file
/// at the image's path, and after the next reconnect the disk reopened by path and served the
/// running guest that file. A reopen must find the same file (index number and volume).
#[test]
fn a_reopen_never_serves_another_file_put_at_the_images_path() {
    let mut smb = Samba::start();
    let dir = scratch();
    std::fs::create_dir(smb.share_dir().join("vms")).unwrap();
    let image = pattern(4, 4 * MIB as usize);
    std::fs::write(smb.share_dir().join("vms/vm.raw"), &image).unwrap();
    let sock = dir.path().join("vm.sock");
    let yaml = smb_disk_yaml("vm", &sock, &smb, "vms/vm.raw", "      timeout: 5\n");
    let mut daemon = Daemon::start(dir.path(), &format!("disks:\n{yaml}"));
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    assert_eq!(c.read(0, 0, 4096).unwrap(), image[..4096]);

    let other = dir.path().join("other.raw");
    let stranger = pattern(66, 4 * MIB as usize);
    std::fs::write(&other, &stranger).unwrap();
    let o = smb.smbclient(
        &format!(
            "rename vms vms.old; mkdir vms; put {} vms/vm.raw",
            other.display()
        ),
        false,
    );
    assert!(o.status.success(), "{o:?}");
    // The connection drops; the disk reconnects and reopens by path.
    smb.kill();
    smb.restart();
    let t = std::time::Instant::now();
    while t.elapsed() < std::time::Duration::from_secs(10) {
        if let Ok(got) = c.read(0, 0, 4096) {
            assert_ne!(got[..], stranger[..4096], "the guest reads another file");
        }
        let _ = c.write(0, 4096, &pattern(7, 4096));
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    daemon.wait_for_log("is another file now", std::time::Duration::from_secs(1));
    let share = smb.share_dir();
    assert_eq!(std::fs::read(share.join("vms/vm.raw")).unwrap(), stranger);
    assert_eq!(std::fs::read(share.join("vms.old/vm.raw")).unwrap(), image);
    drop(c);
    // The disk's last flush has no image to go to: an unclean stop, said so.
    assert!(!daemon.stop().success());
}

/// (Review 2 of 0b2d993.) A changed disk whose image its running self locks is no longer
/// opened before the old one stops; when that open then fails (here a wrong password in the
/// new entry; equally a server that is briefly unreachable), the old disk is already gone
/// and nothing reopens it: the running guest loses its disk. The reload code's own promise
/// ("a changed disk whose new backend cannot be opened keeps running on its old one") held
/// before 0b2d993 for this case.
#[test]
fn a_reload_whose_new_open_fails_keeps_the_old_disk_served() {
    let smb = Samba::start();
    let dir = scratch();
    std::fs::write(smb.share_dir().join("vm.raw"), pattern(4, 4 * MIB as usize)).unwrap();
    let (good, bad) = (dir.path().join("good.pass"), dir.path().join("bad.pass"));
    twinpath_tests::write_secret(&good, &format!("{PASSWORD}\n"));
    twinpath_tests::write_secret(&bad, "not-the-password\n");
    let sock = dir.path().join("vm.sock");
    let extra = |pass: &Path| {
        format!(
            "      user: {USER}\n      password_file: {}\n",
            pass.display()
        )
    };
    let yaml = smb_disk_yaml("vm", &sock, &smb, "vm.raw", &extra(&good));
    let mut daemon = Daemon::start(dir.path(), &format!("disks:\n{yaml}"));
    let mut c = Client::connect(&sock, &ClientOptions::default()).unwrap();
    c.write(0, 0, &pattern(5, 4096)).unwrap();
    drop(c);
    let changed = smb_disk_yaml("vm", &sock, &smb, "vm.raw", &extra(&bad));
    let since = daemon.reload(dir.path(), &format!("disks:\n{changed}"));
    assert!(
        since.contains("LOGON_FAILURE") && since.contains("serving the disk as it was"),
        "{since}"
    );
    assert!(since.contains("1 unchanged"), "{since}");
    let c = Client::connect(&sock, &ClientOptions::default());
    assert!(
        c.is_ok_and(|mut c| c.read(0, 0, 4096).is_ok_and(|d| d == pattern(5, 4096))),
        "the disk is not served after a reload whose new open failed:\n{since}"
    );
    assert!(daemon.stop().success());
}

/// A daemon killed while a request it took is still at the server, after it finished one the
/// driver made available later. QEMU cannot ask the dead daemon where it stopped: it starts the
/// new one at the used ring's index and counts every request the used ring does not hold as
/// not done. So the used ring must hold requests in the order they were made available: had
/// the later one gone in first, the new daemon would take it a second time (its buffers may
/// be the guest's again by then: a write so replayed puts stale data on the disk) and never
/// the earlier one (the guest waits for it for ever). Seen as a hung guest in
/// `guest::qemu_guest_fio_verify_survives_an_smb_daemon_killed_and_restarted`.
#[test]
fn a_daemon_killed_with_a_request_in_flight_leaves_a_used_ring_the_next_one_resumes_exactly() {
    use std::time::Duration;
    use twinpath_tests::frontend::{RawFrontend, Seg, DATA};

    let smb = Samba::start();
    let dir = scratch();
    let image = pattern(41, 4 * MIB as usize);
    std::fs::write(smb.share_dir().join("vm.raw"), &image).unwrap();
    let sock = dir.path().join("vm.sock");
    let daemon = Daemon::start(
        dir.path(),
        &format!("disks:\n{}", smb_disk_yaml("vm", &sock, &smb, "vm.raw", "")),
    );
    let mut f = RawFrontend::connect(&sock, MIB as usize);
    let len = 65536;
    let seg = Seg {
        addr: DATA,
        len,
        write: true,
    };

    // smbd freezes: the read waits at the server; GET_ID needs no server and finishes.
    signal_group(smb.pid(), libc::SIGSTOP);
    let read = f.read(8, &[seg]);
    let get_id = f.get_id(DATA + u64::from(len));
    f.kick();
    let answered = twinpath_core::wait_until(Duration::from_secs(10), || f.status(get_id) == 0);
    let used_at_kill = f.used_heads();
    daemon.kill();
    signal_group(smb.pid(), libc::SIGCONT);
    assert!(answered, "GET_ID was not answered while smbd was frozen");
    assert_eq!(f.status(read), 0xff, "the read finished with smbd frozen");
    assert_eq!(
        used_at_kill,
        Vec::<u16>::new(),
        "the used ring held GET_ID before the read made available before it"
    );

    let second = dir.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let daemon = Daemon::start_with(&dir.path().join("twinpath.yaml"), &second);
    f.reconnect(&sock).unwrap();
    f.kick();
    assert!(
        f.wait_used(2, Duration::from_secs(20)),
        "used {:?}\n{}",
        f.used_heads(),
        daemon.log()
    );
    let mut heads = f.used_heads();
    heads.sort_unstable();
    let mut want = vec![f.head(read), f.head(get_id)];
    want.sort_unstable();
    assert_eq!(heads, want, "each request once in the used ring");
    assert_eq!((f.status(read), f.status(get_id)), (0, 0));
    let mut got = vec![0u8; len as usize];
    f.read_bytes(DATA, &mut got);
    assert_eq!(got, image[8 * 512..][..len as usize]);
    drop(f);
    assert!(daemon.stop().success());
}
