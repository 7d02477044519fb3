//! `smb` disks against a private smbd, driven by the real vhost-user client.

use std::path::Path;

use twinpath_tests::samba::{Samba, PASSWORD, SHARE, USER};
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
    std::fs::write(&pass, format!("{PASSWORD}\n")).unwrap();
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
fn missing_image_and_wrong_password_are_named_at_start() {
    let smb = Samba::start();
    let dir = scratch();
    let pass = dir.path().join("bad.pass");
    std::fs::write(&pass, "wrong-password\n").unwrap();
    let creds = format!(
        "      user: {USER}\n      password_file: {}\n",
        pass.display()
    );
    let cfg = format!(
        "disks:\n{}{}",
        smb_disk_yaml("missing", &dir.path().join("m.sock"), &smb, "nope.raw", ""),
        smb_disk_yaml(
            "badpass",
            &dir.path().join("b.sock"),
            &smb,
            "nope.raw",
            &creds
        ),
    );
    let status = spawn_daemon(dir.path(), &cfg).wait_exit(std::time::Duration::from_secs(60));
    assert_eq!(status.code(), Some(1));
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(
        log.contains("disk `missing`") && log.contains("does not exist"),
        "{log}"
    );
    assert!(
        log.contains("disk `badpass`") && log.contains("connect and log in"),
        "{log}"
    );
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
