//! Prometheus text (OpenMetrics) for the samples, through prometheus-client's collector API:
//! the counters are read at scrape time, not registered one by one.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;

use twinpath_core::stats::{bucket_bound_us, IoSnapshot, PathSnapshot, LATENCY_BUCKETS};

use crate::{DiskSample, Source};

/// The samples `source` gives now, as OpenMetrics text.
pub fn render(source: &Source) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Samples(source.clone())));
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

struct Samples(Source);

impl std::fmt::Debug for Samples {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("twinpath disk samples")
    }
}

type Labels = Vec<(&'static str, String)>;

/// The samples of one family.
type Rows = Vec<(Labels, u64)>;

/// One I/O scope: a disk as its guests see it, or one of its backend's paths.
struct Scope<'a> {
    labels: Labels,
    io: &'a IoSnapshot,
}

impl Collector for Samples {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let disks: Vec<DiskSample> = (self.0)();
        let guest: Vec<Scope> = disks
            .iter()
            .map(|d| Scope {
                labels: vec![("disk", d.disk.clone())],
                io: &d.io,
            })
            .collect();
        let paths: Vec<(Labels, &PathSnapshot)> = disks
            .iter()
            .flat_map(|d| {
                d.paths.iter().map(|p| {
                    let labels = vec![("disk", d.disk.clone()), ("path", p.path.clone())];
                    (labels, &p.stats)
                })
            })
            .collect();
        let path_scopes: Vec<Scope> = paths
            .iter()
            .map(|(labels, p)| Scope {
                labels: labels.clone(),
                io: &p.io,
            })
            .collect();
        encode_io(
            &mut encoder,
            "twinpath_disk",
            "requests from guests",
            &guest,
        )?;
        family(
            &mut encoder,
            "twinpath_disk_rejected",
            "requests from guests refused as malformed (a broken or hostile driver)",
            MetricType::Counter,
            disks
                .iter()
                .map(|d| (vec![("disk", d.disk.clone())], d.rejected)),
        )?;
        encode_io(
            &mut encoder,
            "twinpath_path",
            "requests on a backend path (network: SMB, direct: the LUN)",
            &path_scopes,
        )?;
        // One family per event any path counts (`twinpath_path_<name>`), with the paths that
        // count it.
        let mut events: BTreeMap<&str, (&str, Rows)> = BTreeMap::new();
        for (labels, p) in &paths {
            for e in &p.events {
                let (_, rows) = events.entry(&e.name).or_insert((&e.help, Vec::new()));
                rows.push((labels.clone(), e.count));
            }
        }
        for (name, (help, rows)) in events {
            let name = format!("twinpath_path_{name}");
            family(
                &mut encoder,
                &name,
                help,
                MetricType::Counter,
                rows.into_iter(),
            )?;
        }
        Ok(())
    }
}

/// A counter or gauge family: one sample per label set.
fn family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl Iterator<Item = (Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        let mut metric = family.encode_family(&labels)?;
        match kind {
            MetricType::Gauge => metric.encode_gauge(&value)?,
            _ => metric.encode_counter::<NoLabelSet, _, u64>(&value, None)?,
        }
    }
    Ok(())
}

/// `labels` with one more: the operation.
fn with_op(labels: &Labels, op: &str) -> Labels {
    let mut l = labels.clone();
    l.push(("op", op.to_owned()));
    l
}

/// The I/O families of `prefix` for every scope: requests and bytes by op, errors, in flight,
/// latency.
fn encode_io(
    encoder: &mut DescriptorEncoder,
    prefix: &str,
    what: &str,
    scopes: &[Scope],
) -> Result<(), std::fmt::Error> {
    let requests = scopes.iter().flat_map(|s| {
        [
            ("read", s.io.reads),
            ("write", s.io.writes),
            ("other", s.io.others),
        ]
        .map(|(op, n)| (with_op(&s.labels, op), n))
    });
    family(
        encoder,
        &format!("{prefix}_requests"),
        &format!("{what}, completed, by operation"),
        MetricType::Counter,
        requests,
    )?;
    let bytes = scopes.iter().flat_map(|s| {
        [("read", s.io.read_bytes), ("write", s.io.written_bytes)]
            .map(|(op, n)| (with_op(&s.labels, op), n))
    });
    family(
        encoder,
        &format!("{prefix}_bytes"),
        &format!("bytes of {what}, read and written successfully"),
        MetricType::Counter,
        bytes,
    )?;
    family(
        encoder,
        &format!("{prefix}_errors"),
        &format!("{what} that failed"),
        MetricType::Counter,
        scopes.iter().map(|s| (s.labels.clone(), s.io.errors)),
    )?;
    family(
        encoder,
        &format!("{prefix}_in_flight"),
        &format!("{what} in flight now"),
        MetricType::Gauge,
        scopes.iter().map(|s| (s.labels.clone(), s.io.in_flight)),
    )?;
    let name = format!("{prefix}_latency_seconds");
    let help = format!("time {what} took, from start to completion");
    let mut family = encoder.encode_descriptor(&name, &help, None, MetricType::Histogram)?;
    for s in scopes {
        let buckets: Vec<(f64, u64)> =
            s.io.latency
                .iter()
                .enumerate()
                .map(|(i, &n)| {
                    let bound = if i < LATENCY_BUCKETS {
                        bucket_bound_us(i) as f64 / 1e6
                    } else {
                        f64::INFINITY
                    };
                    (bound, n)
                })
                .collect();
        family
            .encode_family(&s.labels)?
            .encode_histogram::<NoLabelSet>(
                s.io.latency_sum_us as f64 / 1e6,
                s.io.latency.iter().sum(),
                &buckets,
                None,
            )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PathSample;
    use std::sync::Arc;
    use twinpath_core::stats::{Event, IoStats, Op, PathStats};

    #[test]
    fn renders_disks_and_paths_with_their_labels() {
        let guest = IoStats::default();
        guest.begin().end(Op::Read, 4096, true);
        guest.begin().end(Op::Write, 512, false);
        const RECALLS: Event = Event {
            name: "recalls",
            help: "leases recalled",
        };
        let direct = PathStats::with_events(&[RECALLS]);
        direct.io.begin().end(Op::Read, 4096, true);
        direct.count(RECALLS);
        direct.count(RECALLS);
        let (g, d) = (guest.snapshot(), direct.snapshot());
        let source: Source = Arc::new(move || {
            vec![DiskSample {
                disk: "vm1".into(),
                io: g.clone(),
                rejected: 3,
                paths: vec![PathSample {
                    path: "direct".into(),
                    stats: d.clone(),
                }],
            }]
        });
        let text = render(&source);
        for line in [
            "twinpath_disk_requests_total{disk=\"vm1\",op=\"read\"} 1",
            "twinpath_disk_requests_total{disk=\"vm1\",op=\"write\"} 1",
            "twinpath_disk_bytes_total{disk=\"vm1\",op=\"read\"} 4096",
            "twinpath_disk_bytes_total{disk=\"vm1\",op=\"write\"} 0",
            "twinpath_disk_errors_total{disk=\"vm1\"} 1",
            "twinpath_disk_rejected_total{disk=\"vm1\"} 3",
            "twinpath_disk_in_flight{disk=\"vm1\"} 0",
            "twinpath_disk_latency_seconds_count{disk=\"vm1\"} 2",
            "twinpath_disk_latency_seconds_bucket{le=\"+Inf\",disk=\"vm1\"} 2",
            "twinpath_path_requests_total{disk=\"vm1\",path=\"direct\",op=\"read\"} 1",
            "twinpath_path_recalls_total{disk=\"vm1\",path=\"direct\"} 2",
            "# TYPE twinpath_path_latency_seconds histogram",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in:\n{text}");
        }
    }
}
