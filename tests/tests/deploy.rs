//! The deployment files are what they claim: the systemd units load and keep their hardening,
//! the libvirt domain in docs/deploy.md validates against libvirt's schema, and the QEMU command
//! line in README.md is the one the guest tests run. Needs systemd-analyze and
//! virt-xml-validate (libvirt-clients), which scripts/test.sh installs.

use std::path::{Path, PathBuf};
use std::process::Command;

use twinpath_tests::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The fenced blocks of `lang` in a markdown text.
fn fenced<'a>(text: &'a str, lang: &str) -> Vec<&'a str> {
    let open = format!("```{lang}\n");
    text.split(open.as_str())
        .skip(1)
        .map(|rest| rest.split("\n```").next().unwrap())
        .collect()
}

/// A copy of a unit from configs/systemd whose commands run the binary under test, so that
/// `systemd-analyze verify` can check they exist.
fn unit_copy(dir: &Path, name: &str) -> PathBuf {
    let text = read(&format!("configs/systemd/{name}"))
        .replace("/usr/local/bin/twinpath", &twinpath_bin().to_string_lossy());
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
#[ignore = "needs systemd-analyze; scripts/test.sh installs it"]
fn systemd_units_load_and_stay_hardened() {
    let dir = scratch();
    for (unit, most_exposed) in [
        ("twinpath.service", 2.5),
        ("twinpath-map-server.service", 3.0),
    ] {
        let path = unit_copy(dir.path(), unit);
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .expect("systemd-analyze");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && stderr.trim().is_empty(),
            "{unit}: {stderr}"
        );

        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&path)
            .output()
            .expect("systemd-analyze security");
        let report = String::from_utf8_lossy(&out.stdout);
        let score: f64 = report
            .lines()
            .find_map(|l| l.split_once(&format!("exposure level for {unit}: ")))
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("{unit}: no exposure level in:\n{report}"));
        assert!(score <= most_exposed, "{unit}: exposure {score}:\n{report}");
    }

    // The units run what the CLI has: the subcommands and the config flag.
    for unit in ["twinpath.service", "twinpath-map-server.service"] {
        for line in read(&format!("configs/systemd/{unit}")).lines() {
            let Some(cmd) = line
                .strip_prefix("ExecStart=")
                .or_else(|| line.strip_prefix("ExecStartPre="))
            else {
                continue;
            };
            let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
            let (status, out, err) = run_twinpath(&[args[0], "--help"]);
            assert!(status.success(), "{unit}: `{cmd}`: {err}");
            assert!(out.contains(args[1]), "{unit}: `{cmd}`: {out}");
        }
    }
}

#[test]
#[ignore = "needs virt-xml-validate; scripts/test.sh installs libvirt-clients"]
fn libvirt_domain_in_the_docs_validates() {
    let docs = read("docs/deploy.md");
    let blocks = fenced(&docs, "xml");
    assert_eq!(blocks.len(), 1, "one domain XML in docs/deploy.md");
    let domain = blocks[0];
    assert!(domain.contains("<disk type='vhostuser'") && domain.contains("mode='shared'"));
    let dir = scratch();
    let path = dir.path().join("domain.xml");
    std::fs::write(&path, domain).unwrap();
    let out = Command::new("virt-xml-validate")
        .arg(&path)
        .arg("domain")
        .output()
        .expect("virt-xml-validate");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn documented_qemu_command_line_is_the_tested_one() {
    let script = read("tests/guest/run-guest.sh");
    let tested: Vec<String> = script
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("-object ") || l.starts_with("-chardev "))
        .chain(
            script
                .lines()
                .map(str::trim)
                .filter(|l| l.starts_with("-device vhost-user-blk")),
        )
        .map(|l| l.replace("\"$sock\"", "/run/twinpath/vm1-root.sock"))
        .collect();
    assert_eq!(tested.len(), 3, "{tested:?}");
    for doc in ["README.md", "docs/deploy.md"] {
        let text = read(doc);
        let block = fenced(&text, "sh")
            .into_iter()
            .find(|b| b.starts_with("qemu-system-x86_64"))
            .unwrap_or_else(|| panic!("{doc}: no QEMU command line"));
        for line in &tested {
            assert!(
                block.contains(line.as_str()),
                "{doc} lacks `{line}`:\n{block}"
            );
        }
    }
}
