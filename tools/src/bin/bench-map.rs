//! Map requests through the authenticated session: how many a host gets per second and how
//! long each takes (p50, p99), for read maps and write maps of 64 MiB windows of a written
//! image on a loop LUN with xfs. One host, one request at a time (a disk asks for one window
//! at a time). Run it with `scripts/bench-map.sh` (COUNT requests per kind, ROUNDS).

use std::time::{Duration, Instant};

use twinpath_mapproto::{MapClient, Reply, Request};
use twinpath_tests::fileserver::{host_key, FileServer};
use twinpath_tests::lun::Fs;
use twinpath_tools::bench::env_or;

const WINDOW: u64 = 64 << 20;
const WINDOWS: u64 = 8;

/// Asks for `count` maps of successive windows, returning each lease right away; the
/// latency of each map request.
async fn run(c: &MapClient, count: u64, write: bool) -> Vec<Duration> {
    let mut took = Vec::with_capacity(count as usize);
    for i in 0..count {
        let t = Instant::now();
        let r = c
            .call(Request::GetMap {
                path: "bench.raw".into(),
                offset: (i % WINDOWS) * WINDOW,
                len: WINDOW,
                write,
            })
            .await
            .expect("map connection");
        took.push(t.elapsed());
        let Reply::Map(m) = r else {
            panic!("map {i}: {r:?}")
        };
        assert_eq!(
            c.call(Request::Return { lease: m.lease }).await.unwrap(),
            Reply::Done
        );
    }
    took
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let count = env_or("COUNT", 2000);
    let rounds = env_or("ROUNDS", 3);
    let server = FileServer::start(WINDOWS * WINDOW + (512 << 20), Fs::Xfs, false, "");
    twinpath_tests::make_written_image(
        &server.lun.mount_point().join("bench.raw"),
        WINDOWS * WINDOW,
    )
    .expect("image");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (c, _recalls) = rt
        .block_on(MapClient::connect(
            &server.map_addr,
            &host_key("host-a"),
            "host-a",
        ))
        .expect("connect");
    println!("| maps | requests/s | p50 | p99 |");
    println!("|---|---|---|---|");
    for (kind, write) in [("read", false), ("write", true)] {
        let mut rates = Vec::new();
        let mut all = Vec::new();
        for _ in 0..rounds {
            let t = Instant::now();
            let took = rt.block_on(run(&c, count, write));
            // Each map is followed by its return: two requests per map.
            rates.push(count as f64 / t.elapsed().as_secs_f64());
            all.extend(took);
        }
        rates.sort_by(f64::total_cmp);
        all.sort();
        println!(
            "| {kind} (map + return) | {:.0} maps/s | {} us | {} us |",
            rates[rates.len() / 2],
            quantile(&all, 0.5).as_micros(),
            quantile(&all, 0.99).as_micros()
        );
    }
}
