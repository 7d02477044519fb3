//! The guest fio runner: boots the test guest (tests/guest) on each vhost-user-blk socket,
//! runs fio job files from configs/fio inside it, collects fio's JSON and writes a report: a
//! markdown table and an SVG chart comparing the targets. Used by the `guest-fio` binary
//! (scripts/guest-fio.sh) and by its test.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use serde_json::Value;

/// A vhost-user-blk socket to measure and the name it has in the report.
#[derive(Debug, Clone)]
pub struct Target {
    pub label: String,
    pub socket: PathBuf,
}

/// A fio job file, with the overrides of this run applied.
#[derive(Debug, Clone)]
pub struct Job {
    pub name: String,
    pub text: String,
    /// Seconds it runs for (ramp included), for progress and timeouts; `None` when it covers
    /// its size instead (the verify job).
    pub seconds: Option<u64>,
}

/// What to change in every job's `[global]` section.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub runtime: Option<u64>,
    pub ramp_time: Option<u64>,
    pub size: Option<String>,
}

/// Reads the job files `names` (all of them, sorted, when empty) from `dir`.
pub fn load_jobs(dir: &Path, names: &[String], o: &Overrides) -> Result<Vec<Job>, String> {
    let mut names = names.to_vec();
    if names.is_empty() {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        names = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".fio").map(str::to_owned))
            .collect();
        names.sort();
    }
    names
        .iter()
        .map(|name| {
            let path = dir.join(format!("{name}.fio"));
            let text = std::fs::read_to_string(&path).map_err(|e| {
                format!(
                    "job `{name}`: {}: {e} (see {})",
                    path.display(),
                    dir.display()
                )
            })?;
            Ok(apply(name, &text, o))
        })
        .collect()
}

/// Rewrites the `[global]` keys a run overrides (fio lets a job file's `[global]` win over
/// the command line, so they are changed in the file).
fn apply(name: &str, text: &str, o: &Overrides) -> Job {
    let mut section = String::new();
    let mut out = String::new();
    let (mut runtime, mut ramp, mut time_based) = (None, 0, false);
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = trimmed.to_owned();
        }
        let key = trimmed.split('=').next().unwrap_or("").trim();
        let replaced = match (section.as_str(), key) {
            ("[global]", "runtime") => o.runtime.map(|v| format!("runtime={v}")),
            ("[global]", "ramp_time") => o.ramp_time.map(|v| format!("ramp_time={v}")),
            ("[global]", "size") => o.size.as_ref().map(|v| format!("size={v}")),
            _ => None,
        };
        let line = replaced.unwrap_or_else(|| line.to_owned());
        let value = line.split_once('=').map(|(_, v)| v.trim());
        match key {
            "runtime" => runtime = value.and_then(|v| v.parse().ok()),
            "ramp_time" => ramp = value.and_then(|v| v.parse().ok()).unwrap_or(0),
            "time_based" => time_based = value == Some("1"),
            _ => {}
        }
        out.push_str(&line);
        out.push('\n');
    }
    Job {
        name: name.to_owned(),
        text: out,
        seconds: runtime.filter(|_| time_based).map(|r: u64| r + ramp),
    }
}

/// One job's outcome on one target.
#[derive(Debug, Clone)]
pub struct JobResult {
    pub job: String,
    pub iops: f64,
    /// MB/s (10^6 bytes), reads and writes together.
    pub mbps: f64,
    /// 99th percentile completion latency in microseconds, the worse of reads and writes.
    pub p99_us: f64,
    /// fio's complaint when the job failed.
    pub error: Option<String>,
    /// The guest stopped answering during this job and was stopped.
    pub stalled: bool,
    pub json: Value,
}

impl JobResult {
    fn failed(job: &str, why: String) -> JobResult {
        JobResult {
            job: job.to_owned(),
            iops: 0.0,
            mbps: 0.0,
            p99_us: 0.0,
            error: Some(why),
            stalled: false,
            json: Value::Null,
        }
    }

    /// 4 KiB jobs are judged by IOPS, the others by bandwidth.
    pub fn is_iops(&self) -> bool {
        crate::bench::is_iops(&self.job)
    }
}

/// The guest build (kernel, initramfs with fio) and the script that boots it.
pub struct Guest {
    pub dir: PathBuf,
    pub run_script: PathBuf,
}

impl Guest {
    /// Builds the test guest into `dir` (once; later calls reuse it).
    pub fn build(repo: &Path, dir: &Path) -> Result<Guest, String> {
        // Its chatter goes to stderr: stdout is the report's.
        let status = Command::new(repo.join("tests/guest/build-initramfs.sh"))
            .arg(dir)
            .stdout(std::io::stderr())
            .status()
            .map_err(|e| format!("build-initramfs.sh: {e}"))?;
        if !status.success() {
            return Err("building the guest failed (see above)".into());
        }
        Ok(Guest {
            // Absolute: boot directories link to its kernel.
            dir: std::fs::canonicalize(dir).map_err(|e| format!("{}: {e}", dir.display()))?,
            run_script: repo.join("tests/guest/run-guest.sh"),
        })
    }

    /// Boots a guest on `target`, runs `jobs` in it and returns their results in order; a
    /// job the guest did not finish is a failed result saying why. `work` keeps the console
    /// log, the job files and fio's JSON per job. `progress` gets each job as the
    /// guest starts it. A job that overruns its time (twice its length plus a minute) stops
    /// the guest: a disk that stops answering must not hang the whole run.
    pub fn run(
        &self,
        target: &Target,
        jobs: &[Job],
        work: &Path,
        progress: &mut dyn FnMut(&Job),
    ) -> Result<Vec<JobResult>, String> {
        std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
        let boot_dir = work.join("guest");
        self.initrd_with_jobs(jobs, &boot_dir)?;
        let log = work.join("console.log");
        // A console left from an earlier run would pass for this one's progress.
        let _ = std::fs::remove_file(&log);
        let budget: u64 = jobs.iter().map(|j| job_limit(j).as_secs()).sum();
        let mut child = Command::new(&self.run_script)
            .arg(&target.socket)
            .arg(&boot_dir)
            .arg(&log)
            .args(["twinpath.suite=1", "loglevel=1"])
            .env(
                "TWINPATH_GUEST_TIMEOUT",
                (budget + BOOT_LIMIT.as_secs()).to_string(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // Its own group, so that stopping it stops the QEMU it started too.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.run_script.display()))?;
        let (mut started, mut since, mut stopped) = (0, Instant::now(), None);
        let status = loop {
            let console = std::fs::read_to_string(&log).unwrap_or_default();
            for line in console
                .lines()
                .filter_map(|l| l.strip_prefix("TWINPATH-FIO-BEGIN "))
            {
                if started < jobs.len() && line.trim() == file_name(started, &jobs[started]) {
                    progress(&jobs[started]);
                    started += 1;
                    since = Instant::now();
                }
            }
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break Some(status);
            }
            let limit = match started {
                0 => BOOT_LIMIT,
                n => job_limit(&jobs[n - 1]),
            };
            if since.elapsed() > limit {
                twinpath_tests::signal_group(child.id(), libc::SIGKILL);
                let _ = child.wait();
                stopped = Some(limit);
                break None;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        let console = std::fs::read_to_string(&log).unwrap_or_default();
        if status.is_some_and(|s| !s.success()) || stopped.is_some() {
            let tail: Vec<&str> = console.lines().rev().take(8).collect();
            eprintln!(
                "guest-fio: the guest on {} failed; its console ({}) ends:\n{}",
                target.socket.display(),
                log.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let results = jobs.iter().enumerate().map(|(i, job)| {
            match stopped {
                Some(limit) if i + 1 == started => {
                    let why = format!(
                        "no result after {} s; the guest was stopped",
                        limit.as_secs()
                    );
                    return Ok(JobResult {
                        stalled: true,
                        ..JobResult::failed(&job.name, why)
                    });
                }
                _ if i >= started => {
                    let why = "not run: the guest ended before it".to_owned();
                    return Ok(JobResult::failed(&job.name, why));
                }
                _ => {}
            }
            let r = parse_job(&console, &file_name(i, job), &job.name)
                .unwrap_or_else(|e| JobResult::failed(&job.name, e));
            std::fs::write(work.join(format!("{}.json", job.name)), r.json.to_string())
                .map_err(|e| e.to_string())?;
            Ok(r)
        });
        results.collect()
    }

    /// [`Guest::run`], giving a guest that stalls one more chance: the job it stalled in and
    /// the ones after it run again in a fresh guest (under TCG a guest on a vhost-user-blk
    /// disk very occasionally stops seeing completions, with qemu-storage-daemon as with
    /// twinpath). Also returns the job that stalled, if one did.
    pub fn run_retrying(
        &self,
        target: &Target,
        jobs: &[Job],
        work: &Path,
        progress: &mut dyn FnMut(&Job),
    ) -> Result<(Vec<JobResult>, Option<String>), String> {
        let mut results = self.run(target, jobs, work, progress)?;
        let Some(at) = results.iter().position(|r| r.stalled) else {
            return Ok((results, None));
        };
        let stalled = jobs[at].name.clone();
        eprintln!(
            "guest-fio: {}: the guest stalled in {stalled}; running it and the jobs after it again in a fresh guest",
            target.label
        );
        let again = self.run(target, &jobs[at..], &work.join("retry"), progress)?;
        results.truncate(at);
        results.extend(again);
        Ok((results, Some(stalled)))
    }

    /// A boot directory whose initrd is the guest's with the job files appended (the kernel
    /// unpacks concatenated cpio archives in order).
    fn initrd_with_jobs(&self, jobs: &[Job], boot: &Path) -> Result<(), String> {
        let io = |e: std::io::Error| format!("{}: {e}", boot.display());
        let _ = std::fs::remove_dir_all(boot);
        let jobs_dir = boot.join("root/jobs");
        std::fs::create_dir_all(&jobs_dir).map_err(io)?;
        for (i, job) in jobs.iter().enumerate() {
            std::fs::write(
                jobs_dir.join(format!("{}.fio", file_name(i, job))),
                &job.text,
            )
            .map_err(io)?;
        }
        let mut initrd = std::fs::read(self.dir.join("initrd.img")).map_err(io)?;
        let mut cpio = Command::new("sh")
            .arg("-c")
            .arg("find jobs | cpio -o -H newc --quiet | gzip -1")
            .current_dir(boot.join("root"))
            .stdout(Stdio::piped())
            .spawn()
            .map_err(io)?;
        let mut archive = Vec::new();
        std::io::Read::read_to_end(cpio.stdout.as_mut().expect("piped"), &mut archive)
            .map_err(io)?;
        if !cpio.wait().map_err(io)?.success() || archive.is_empty() {
            return Err("packing the job files (cpio, gzip) failed".into());
        }
        initrd.extend_from_slice(&archive);
        std::fs::write(boot.join("initrd.img"), initrd).map_err(io)?;
        std::os::unix::fs::symlink(self.dir.join("vmlinuz"), boot.join("vmlinuz")).map_err(io)?;
        // The KVM-or-TCG verdict of earlier boots saves 15 s of probing.
        if let Ok(accel) = std::fs::read(self.dir.join("accel")) {
            std::fs::write(boot.join("accel"), accel).map_err(io)?;
        }
        Ok(())
    }
}

/// The longest the guest may take to boot and start the first job.
const BOOT_LIMIT: Duration = Duration::from_secs(180);

/// The longest a job may take before the guest is stopped: a job that covers its size
/// (verify) gets five minutes.
fn job_limit(job: &Job) -> Duration {
    Duration::from_secs(job.seconds.map_or(300, |s| 2 * s + 60))
}

/// The job's file name in the guest: numbered, so the guest runs the jobs in their order.
fn file_name(i: usize, job: &Job) -> String {
    format!("{:02}-{}", i + 1, job.name)
}

/// Finds one job's JSON between its markers on the console.
fn parse_job(console: &str, marker: &str, name: &str) -> Result<JobResult, String> {
    let begin = format!("TWINPATH-FIO-BEGIN {marker}");
    let end = format!("TWINPATH-FIO-END {marker}");
    let body = console
        .split_once(&begin)
        .and_then(|(_, rest)| rest.split_once(&end))
        .map(|(body, _)| body)
        .ok_or_else(|| format!("job `{name}`: no output on the console"))?;
    let error = body
        .lines()
        .find_map(|l| l.strip_prefix("TWINPATH-FIO-ERROR "))
        .map(str::to_owned);
    // Serial consoles end lines with \r; anything before the JSON is the kernel's.
    let clean: String = body.replace('\r', "");
    let json_text = clean.find('{').map(|at| &clean[at..]).unwrap_or("");
    // A failed job may print no JSON at all; its error says what happened.
    let json: Value = match (serde_json::from_str(json_text), &error) {
        (Ok(v), _) => v,
        (Err(_), Some(_)) => Value::Null,
        (Err(e), None) => return Err(format!("job `{name}`: fio's JSON does not parse: {e}")),
    };
    Ok(summarize(name, json, error))
}

fn summarize(name: &str, json: Value, error: Option<String>) -> JobResult {
    let job = &json["jobs"][0];
    let dirs = [&job["read"], &job["write"]];
    let sum = |key: &str| {
        dirs.iter()
            .map(|d| d[key].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    let p99_ns = dirs
        .iter()
        .filter(|d| d["total_ios"].as_u64().unwrap_or(0) > 0)
        .filter_map(|d| d["clat_ns"]["percentile"]["99.000000"].as_f64())
        .fold(0.0, f64::max);
    let fio_error = job["error"].as_i64().filter(|&e| e != 0);
    let error = error.or(fio_error.map(|e| format!("fio error {e}")));
    JobResult {
        job: name.to_owned(),
        iops: sum("iops"),
        mbps: sum("bw_bytes") / 1e6,
        p99_us: p99_ns / 1e3,
        error,
        stalled: false,
        json,
    }
}

/// The results of every target, in the order measured.
pub type Results = [(String, Vec<JobResult>)];

/// The markdown report: one row per job, per target its main figure (IOPS for 4 KiB jobs,
/// MB/s otherwise) and p99 latency, and with a peer each target's ratio to it.
pub fn markdown(results: &Results, peer: Option<&str>, setup: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{setup}\n");
    let mut header = "| job |".to_owned();
    let mut rule = "|---|".to_owned();
    for (label, _) in results {
        let _ = write!(header, " {label} | p99 |");
        rule.push_str("---:|---:|");
        if peer.is_some_and(|p| p != label) {
            header.push_str(" vs peer |");
            rule.push_str("---:|");
        }
    }
    let _ = writeln!(out, "{header}\n{rule}");
    let Some((_, first)) = results.first() else {
        return out;
    };
    let peer_results = peer.and_then(|p| results.iter().find(|(l, _)| l == p));
    for (i, job) in first.iter().enumerate() {
        let _ = write!(out, "| {} |", job.job);
        for (label, rs) in results {
            let r = &rs[i];
            match &r.error {
                Some(e) => {
                    let _ = write!(out, " FAILED: {} | |", e.replace('|', "/"));
                }
                None => {
                    let _ = write!(out, " {} | {} |", figure(r), latency(r.p99_us));
                }
            }
            if let Some((_, prs)) = peer_results.filter(|(p, _)| p != label) {
                let p = &prs[i];
                let ratio = main_value(r) / main_value(p);
                if r.error.is_none() && p.error.is_none() && ratio.is_finite() {
                    let _ = write!(out, " {ratio:.2}x |");
                } else {
                    out.push_str(" - |");
                }
            }
        }
        out.push('\n');
    }
    out.push_str("\n4 KiB jobs in IOPS, the others in MB/s (10^6 bytes/s, reads and writes together); p99 is fio's 99th percentile completion latency (the worse of reads and writes).\n");
    out
}

fn main_value(r: &JobResult) -> f64 {
    if r.is_iops() {
        r.iops
    } else {
        r.mbps
    }
}

fn figure(r: &JobResult) -> String {
    if r.is_iops() {
        format!("{:.0} IOPS", r.iops)
    } else {
        format!("{:.1} MB/s", r.mbps)
    }
}

fn latency(us: f64) -> String {
    if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} us")
    }
}

/// A grouped bar chart per kind of figure: IOPS for the 4 KiB jobs, MB/s for the others;
/// one bar per target, failed jobs left out.
pub fn chart(results: &Results, title: &str) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1400, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        let root = root
            .titled(title, ("sans-serif", 20))
            .map_err(|e| e.to_string())?;
        let (left, right) = root.split_horizontally(760);
        panel(&left, results, true)?;
        panel(&right, results, false)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(svg)
}

fn panel(
    area: &DrawingArea<SVGBackend, plotters::coord::Shift>,
    results: &Results,
    iops: bool,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<_>| e.to_string();
    let Some((_, first)) = results.first() else {
        return Ok(());
    };
    let jobs: Vec<(usize, &str)> = first
        .iter()
        .enumerate()
        .filter(|(_, r)| r.is_iops() == iops)
        .map(|(i, r)| (i, r.job.as_str()))
        .collect();
    if jobs.is_empty() {
        return Ok(());
    }
    let value = |r: &JobResult| {
        if r.error.is_some() {
            0.0
        } else if iops {
            r.iops
        } else {
            r.mbps
        }
    };
    let top = results
        .iter()
        .flat_map(|(_, rs)| jobs.iter().map(|&(i, _)| value(&rs[i])))
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.35; // headroom for the legend
    let n = jobs.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(if iops { "IOPS" } else { "MB/s" }, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..top)
        .map_err(err)?;
    let names: Vec<&str> = jobs.iter().map(|&(_, name)| name).collect();
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            names
                .get(i as usize)
                .map(|s| s.to_string())
                .unwrap_or_default()
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(jobs.len() * 2 + 2)
        .x_label_formatter(&label)
        .x_label_style(("sans-serif", 11))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .draw()
        .map_err(err)?;
    let width = 0.8 / results.len() as f64;
    for (t, (target, rs)) in results.iter().enumerate() {
        let color = Palette99::pick(t).to_rgba();
        let bars = jobs.iter().enumerate().map(|(x, &(i, _))| {
            let x0 = x as f64 - 0.4 + t as f64 * width;
            Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.95, value(&rs[i]))],
                color.filled(),
            )
        });
        chart
            .draw_series(bars)
            .map_err(err)?
            .label(target.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    if !iops {
        // One legend is enough; the other panel has the same colours.
        return Ok(());
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Prints progress lines on stderr: which target and job runs, and for how long.
pub fn progress_line(target: &str, index: usize, total: usize, job: &Job, started: Instant) {
    let length = job
        .seconds
        .map(|s| format!("{s} s"))
        .unwrap_or_else(|| "until its size is covered".into());
    eprintln!(
        "[{:>4.0} s] {target}: job {index}/{total} {} ({length})",
        started.elapsed().as_secs_f64(),
        job.name
    );
    let _ = std::io::stderr().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_change_only_the_global_keys() {
        let text = "[global]\nruntime=30\nramp_time=2\nsize=1g\ntime_based=1\n\n[j]\nsize=5m\n";
        let o = Overrides {
            runtime: Some(3),
            ramp_time: Some(0),
            size: Some("64m".into()),
        };
        let job = apply("j", text, &o);
        assert_eq!(
            job.text,
            "[global]\nruntime=3\nramp_time=0\nsize=64m\ntime_based=1\n\n[j]\nsize=5m\n"
        );
        assert_eq!(job.seconds, Some(3));
        assert_eq!(apply("j", text, &Overrides::default()).seconds, Some(32));
        assert_eq!(apply("v", "[global]\nsize=1g\n", &o).seconds, None);
    }

    fn result(job: &str, v: f64, error: Option<&str>) -> JobResult {
        JobResult {
            job: job.into(),
            iops: v,
            mbps: v / 10.0,
            p99_us: 250.0,
            error: error.map(str::to_owned),
            stalled: false,
            json: Value::Null,
        }
    }

    #[test]
    fn report_and_chart_cover_every_job_and_target() {
        let jobs = [
            "randread-4k-qd1",
            "randwrite-4k-qd32",
            "read-1m",
            "write-128k",
        ];
        let results: Vec<(String, Vec<JobResult>)> = [("twinpath file", 2.0), ("peer", 1.0)]
            .into_iter()
            .map(|(label, scale)| {
                let rs = jobs
                    .iter()
                    .map(|j| {
                        result(
                            j,
                            1000.0 * scale,
                            (*j == "write-128k" && scale == 2.0).then_some("boom"),
                        )
                    })
                    .collect();
                (label.to_owned(), rs)
            })
            .collect();
        let md = markdown(&results, Some("peer"), "setup");
        assert!(
            md.contains("| randread-4k-qd1 | 2000 IOPS | 250 us | 2.00x | 1000 IOPS | 250 us |"),
            "{md}"
        );
        assert!(
            md.contains("| read-1m | 200.0 MB/s | 250 us | 2.00x |"),
            "{md}"
        );
        assert!(md.contains("| write-128k | FAILED: boom | | - |"), "{md}");
        let svg = chart(&results, "t").unwrap();
        for j in jobs {
            assert!(svg.contains(j), "{j} labelled");
        }
        // Background, two plot areas, legend box and its two keys, 8 bars.
        assert!(svg.matches("<rect").count() >= 8, "{svg}");
        if let Some(path) = std::env::var_os("GUESTFIO_CHART") {
            std::fs::write(path, &svg).unwrap();
        }
    }

    #[test]
    fn console_output_is_split_per_job() {
        let json = r#"{"jobs":[{"error":0,"read":{"iops":100.5,"bw_bytes":411648,"total_ios":10,"clat_ns":{"percentile":{"99.000000":64000}}},"write":{"iops":0,"bw_bytes":0,"total_ios":0}}]}"#;
        let console = format!(
            "boot\r\nTWINPATH-FIO-BEGIN 01-a\r\n[  1.0] kernel says hi\r\n{json}\r\nTWINPATH-FIO-END 01-a\r\nTWINPATH-FIO-BEGIN 02-b\r\nTWINPATH-FIO-ERROR 02-b: fio: verify failed\r\nTWINPATH-FIO-END 02-b\r\n"
        );
        let a = parse_job(&console, "01-a", "a").unwrap();
        assert_eq!(
            (a.iops, a.mbps, a.p99_us, a.error),
            (100.5, 0.411648, 64.0, None)
        );
        let b = parse_job(&console, "02-b", "b").unwrap();
        assert_eq!(b.error.as_deref(), Some("02-b: fio: verify failed"));
        assert!(parse_job(&console, "03-c", "c").is_err());
    }
}
