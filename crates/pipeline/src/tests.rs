//! The engine against a fake transport that delays, reorders, fails and drops replies.
//! Time is tokio's paused clock, so delays cost nothing and orderings are repeatable.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use proptest::prelude::*;
use tokio::time::Instant;

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Sent(u64),
    Completed(u64),
    Failed(u64),
}

struct Fake {
    max: usize,
    credits: usize,
    data: Mutex<Vec<u8>>,
    /// Delay of the reply to the section starting at each offset, in ms.
    delay_ms: Box<dyn Fn(u64) -> u64 + Send + Sync>,
    fail_at: Option<u64>,
    drop_at: Option<u64>,
    log: Mutex<Vec<(Instant, Event)>>,
    outstanding: AtomicUsize,
    max_outstanding: AtomicUsize,
}

impl Fake {
    fn new(size: usize, max: usize, credits: usize) -> Fake {
        Fake {
            max,
            credits,
            data: Mutex::new((0..size).map(|i| (i * 7 + i / 251) as u8).collect()),
            delay_ms: Box::new(|_| 1),
            fail_at: None,
            drop_at: None,
            log: Mutex::new(Vec::new()),
            outstanding: AtomicUsize::new(0),
            max_outstanding: AtomicUsize::new(0),
        }
    }

    fn note(&self, e: Event) {
        self.log.lock().unwrap().push((Instant::now(), e));
    }

    async fn op(&self, offset: u64) -> Result<()> {
        self.note(Event::Sent(offset));
        let now = self.outstanding.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_outstanding.fetch_max(now, Ordering::SeqCst);
        if self.drop_at == Some(offset) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(Duration::from_millis((self.delay_ms)(offset))).await;
        self.outstanding.fetch_sub(1, Ordering::SeqCst);
        if self.fail_at == Some(offset) {
            self.note(Event::Failed(offset));
            return Err(Error::new(
                ErrorKind::Io,
                format!("injected failure at {offset}"),
            ));
        }
        self.note(Event::Completed(offset));
        Ok(())
    }

    fn events(&self) -> Vec<(Instant, Event)> {
        self.log.lock().unwrap().clone()
    }
}

#[async_trait]
impl SectionIo for Fake {
    fn max_section_len(&self) -> usize {
        self.max
    }

    fn credits(&self) -> usize {
        self.credits
    }

    async fn read_at(&self, offset: u64, len: usize) -> Result<SectionData> {
        assert!(
            len <= self.max,
            "section of {len} bytes over the maximum {}",
            self.max
        );
        self.op(offset).await?;
        let data = self.data.lock().unwrap();
        let start = (offset as usize).min(data.len());
        let end = (start + len).min(data.len());
        Ok(data[start..end].to_vec().into())
    }

    async fn write_at(&self, offset: u64, bytes: Vec<u8>) -> Result<()> {
        assert!(bytes.len() <= self.max);
        self.op(offset).await?;
        let mut data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + bytes.len()].copy_from_slice(&bytes);
        Ok(())
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

fn config(max_in_flight: usize) -> PipelineConfig {
    PipelineConfig {
        section_len: None,
        max_in_flight,
        timeout: Duration::from_secs(5),
    }
}

#[test]
fn tracker_counts_down_to_done() {
    let mut t = SectionTracker::new(3);
    assert_eq!((t.remaining(), t.done()), (3, false));
    t.succeeded(2);
    t.succeeded(0);
    assert!(t.is_pending(1) && !t.is_pending(0));
    t.succeeded(1);
    assert!(t.done());
    assert!(SectionTracker::new(0).done());
}

#[test]
fn out_of_order_replies_land_in_place() {
    runtime().block_on(async {
        let mut fake = Fake::new(1 << 20, 64 << 10, 100);
        // Later sections answer first.
        fake.delay_ms = Box::new(|off| 100 - off / (64 << 10));
        let expected = fake.data.lock().unwrap().clone();
        let (bufs, out) = GuestBuffers::from_vec(vec![0; 1 << 20]);
        Pipeline::new(config(16))
            .read(&fake, 0, &bufs)
            .await
            .unwrap();
        assert_eq!(*out.lock().unwrap(), expected);
        let done: Vec<u64> = fake
            .events()
            .iter()
            .filter_map(|(_, e)| {
                if let Event::Completed(o) = e {
                    Some(*o)
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(done.len(), 16);
        assert!(
            done.windows(2).all(|w| w[0] > w[1]),
            "replies came back in reverse: {done:?}"
        );
        assert_eq!(
            fake.max_outstanding.load(Ordering::SeqCst),
            16,
            "all sections were outstanding at once"
        );
    });
}

#[test]
fn writes_reach_their_offsets() {
    runtime().block_on(async {
        let fake = Fake::new(300_000, 4096, 8);
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let (bufs, _) = GuestBuffers::from_vec(payload.clone());
        Pipeline::new(config(4))
            .write(&fake, 12_345, &bufs)
            .await
            .unwrap();
        assert_eq!(&fake.data.lock().unwrap()[12_345..112_345], &payload[..]);
        assert!(fake.max_outstanding.load(Ordering::SeqCst) <= 4);
    });
}

#[test]
fn window_is_bounded_by_credits() {
    runtime().block_on(async {
        let fake = Fake::new(1 << 20, 4096, 3);
        let (bufs, _) = GuestBuffers::from_vec(vec![0; 1 << 20]);
        Pipeline::new(config(64))
            .read(&fake, 0, &bufs)
            .await
            .unwrap();
        assert_eq!(fake.max_outstanding.load(Ordering::SeqCst), 3);
    });
}

#[test]
fn configured_section_size_caps_the_transport_maximum() {
    runtime().block_on(async {
        let fake = Fake::new(1 << 20, 1 << 20, 64);
        let (bufs, _) = GuestBuffers::from_vec(vec![0; 256 << 10]);
        let cfg = PipelineConfig {
            section_len: Some(64 << 10),
            ..config(64)
        };
        Pipeline::new(cfg).read(&fake, 0, &bufs).await.unwrap();
        let sent = fake
            .events()
            .iter()
            .filter(|(_, e)| matches!(e, Event::Sent(_)))
            .count();
        assert_eq!(sent, 4);
    });
}

#[test]
fn a_request_within_one_section_goes_as_is() {
    runtime().block_on(async {
        let fake = Fake::new(1 << 20, 64 << 10, 64);
        let (bufs, _) = GuestBuffers::from_vec(vec![0; 64 << 10]);
        Pipeline::new(config(64))
            .read(&fake, 4096, &bufs)
            .await
            .unwrap();
        let events = fake.events();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].1, Event::Sent(4096));
    });
}

#[test]
fn first_error_fails_the_request_after_draining() {
    runtime().block_on(async {
        let mut fake = Fake::new(1 << 20, 4096, 64);
        fake.fail_at = Some(5 * 4096);
        let (bufs, _) = GuestBuffers::from_vec(vec![0; 64 * 4096]);
        let err = Pipeline::new(config(8))
            .read(&fake, 0, &bufs)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io);
        assert!(
            err.to_string().contains("section 5 of 64 (offset 20480"),
            "{err}"
        );
        let events = fake.events();
        let failed_at = events
            .iter()
            .find(|(_, e)| matches!(e, Event::Failed(_)))
            .unwrap()
            .0;
        assert!(events
            .iter()
            .all(|(t, e)| !matches!(e, Event::Sent(_)) || *t <= failed_at));
        // Everything that was sent has answered: the siblings were drained, not abandoned.
        assert_eq!(fake.outstanding.load(Ordering::SeqCst), 0);
        let sent = events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Sent(_)))
            .count();
        assert!(sent < 64, "sending stopped early ({sent} of 64)");
    });
}

#[test]
fn a_lost_reply_times_out() {
    runtime().block_on(async {
        let mut fake = Fake::new(1 << 20, 4096, 64);
        fake.drop_at = Some(3 * 4096);
        let (bufs, _) = GuestBuffers::from_vec(vec![0; 16 * 4096]);
        let start = Instant::now();
        let err = Pipeline::new(config(8))
            .write(&fake, 0, &bufs)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    });
}

#[test]
fn reads_past_end_of_file_are_zeros() {
    runtime().block_on(async {
        let fake = Fake::new(10_000, 4096, 8);
        let (bufs, out) = GuestBuffers::from_vec(vec![0xaa; 8192]);
        Pipeline::new(config(8))
            .read(&fake, 8192, &bufs)
            .await
            .unwrap();
        let out = out.lock().unwrap();
        assert_eq!(&out[..1808], &fake.data.lock().unwrap()[8192..]);
        assert!(out[1808..].iter().all(|&b| b == 0));
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Success exactly when no section fails; never a send after a failure was seen; never
    /// more outstanding than the window; on success the data is right.
    #[test]
    fn engine_invariants(
        size in 1usize..200_000,
        max in 512usize..40_000,
        window in 1usize..16,
        credits in 1usize..16,
        fail in proptest::option::of(0usize..64),
        seed in any::<u64>(),
        write in any::<bool>(),
    ) {
        runtime().block_on(async {
            let mut fake = Fake::new(size + 1000, max, credits);
            fake.delay_ms = Box::new(move |off| (off.wrapping_mul(seed | 1) >> 7) % 20);
            let count = size.div_ceil(max);
            fake.fail_at = fail.filter(|&k| k < count).map(|k| (1000 + k * max) as u64);
            let payload: Vec<u8> = (0..size).map(|i| (i as u64 ^ seed) as u8).collect();
            let (bufs, out) = GuestBuffers::from_vec(if write { payload.clone() } else { vec![0; size] });
            let p = Pipeline::new(config(window));
            let result = if write { p.write(&fake, 1000, &bufs).await } else { p.read(&fake, 1000, &bufs).await };

            prop_assert_eq!(result.is_ok(), fake.fail_at.is_none());
            prop_assert!(fake.max_outstanding.load(Ordering::SeqCst) <= window.min(credits));
            let events = fake.events();
            if let Some((failed_at, _)) = events.iter().find(|(_, e)| matches!(e, Event::Failed(_))) {
                prop_assert!(events.iter().all(|(t, e)| !matches!(e, Event::Sent(_)) || t <= failed_at));
            } else if write {
                prop_assert_eq!(&fake.data.lock().unwrap()[1000..1000 + size], &payload[..]);
            } else {
                prop_assert_eq!(&out.lock().unwrap()[..], &fake.data.lock().unwrap()[1000..1000 + size]);
            }
            Ok(())
        })?;
    }
}
