use proptest::prelude::*;

use super::*;

const S: u64 = SECTOR;

fn data(logical: u64, len: u64, physical: u64, access: Access) -> Span {
    Span {
        logical: logical * S,
        len: len * S,
        kind: SpanKind::Data {
            physical: physical * S,
        },
        access,
    }
}

fn zero(logical: u64, len: u64) -> Span {
    Span {
        logical: logical * S,
        len: len * S,
        kind: SpanKind::Zero,
        access: Access::Read,
    }
}

#[test]
fn bad_grants_are_refused_with_the_span() {
    let dev = 100 * S;
    let rw = Access::ReadWrite;
    let cases = [
        (vec![data(0, 0, 0, rw)], GrantError::Empty { span: 0 }),
        (
            vec![Span {
                logical: 1,
                ..data(0, 1, 0, rw)
            }],
            GrantError::Unaligned { span: 0 },
        ),
        (
            vec![data(0, 4, 0, rw), data(2, 4, 10, rw)],
            GrantError::Overlap { span: 1 },
        ),
        (
            vec![data(0, 4, 98, rw)],
            GrantError::BeyondDevice {
                span: 0,
                device_size: dev,
            },
        ),
        (
            vec![Span {
                access: rw,
                ..zero(0, 4)
            }],
            GrantError::WritableZeros { span: 0 },
        ),
        (
            vec![Span {
                logical: u64::MAX - 511,
                ..data(0, 2, 0, rw)
            }],
            GrantError::Overlap { span: 0 },
        ),
    ];
    for (spans, want) in cases {
        assert_eq!(Grant::new(spans.clone(), dev), Err(want), "{spans:?}");
    }
}

#[test]
fn resolve_maps_pieces_and_sends_ungranted_io_to_the_network() {
    let g = Grant::new(
        vec![
            data(0, 8, 50, Access::ReadWrite),
            zero(8, 8),
            data(16, 8, 10, Access::Read),
        ],
        100 * S,
    )
    .unwrap();
    assert_eq!(
        g.resolve(4 * S, 8 * S, false).unwrap(),
        vec![
            Piece::Device {
                physical: 54 * S,
                len: 4 * S
            },
            Piece::Zero { len: 4 * S }
        ]
    );
    assert_eq!(
        g.resolve(2 * S, 2 * S, true).unwrap(),
        vec![Piece::Device {
            physical: 52 * S,
            len: 2 * S
        }]
    );
    assert!(
        g.resolve(6 * S, 4 * S, true).is_none(),
        "zeros not writable"
    );
    assert!(g.resolve(16 * S, S, true).is_none(), "read-only data");
    assert!(g.resolve(20 * S, 8 * S, false).is_none(), "past the grant");
    let guard = g.guard();
    assert!(guard.check(50 * S, 8 * S, true).is_ok());
    assert_eq!(
        guard.check(49 * S, 2 * S, true),
        Err(OutsideGrant {
            physical: 49 * S,
            len: 2 * S,
            write: true
        })
    );
    assert!(guard.check(10 * S, S, true).is_err(), "read-only extent");
    assert!(guard.check(10 * S, S, false).is_ok());
    assert!(guard.check(u64::MAX - 1, 4, false).is_err());
}

/// Grants over a small device: up to 6 spans with random gaps, kinds and access.
fn grants() -> impl Strategy<Value = (Vec<Span>, u64)> {
    let device = 64u64;
    prop::collection::vec((0u64..4, 1u64..8, 0u64..64, 0u8..3), 0..6).prop_map(move |raw| {
        let mut at = 0;
        let spans = raw
            .into_iter()
            .map(|(gap, len, phys, kind)| {
                at += gap;
                let s = match kind {
                    0 => zero(at, len),
                    1 => data(at, len, phys.min(device - len), Access::Read),
                    _ => data(at, len, phys.min(device - len), Access::ReadWrite),
                };
                at += len;
                s
            })
            .collect();
        (spans, device * S)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// resolve() succeeds exactly when every sector is granted with the access needed, its
    /// pieces cover the request in order with the right device locations, and every device
    /// piece passes the guard.
    #[test]
    fn resolve_agrees_with_a_sector_by_sector_model(
        (spans, dev) in grants(),
        start in 0u64..40,
        len in 1u64..16,
        write in any::<bool>(),
    ) {
        let g = Grant::new(spans.clone(), dev).unwrap();
        let lookup = |sector: u64| spans.iter().find(|s| {
            s.logical <= sector * S && sector * S < s.logical + s.len
        });
        let allowed = (start..start + len).all(|sec| match lookup(sec) {
            None => false,
            Some(s) => !write || s.access == Access::ReadWrite,
        });
        let pieces = g.resolve(start * S, len * S, write);
        prop_assert_eq!(pieces.is_some(), allowed);
        if let Some(pieces) = pieces {
            let guard = g.guard();
            let mut sec = start;
            for p in pieces {
                match p {
                    Piece::Device { physical, len } => {
                        prop_assert!(guard.check(physical, len, write).is_ok());
                        for k in 0..len / S {
                            let s = lookup(sec + k).unwrap();
                            let SpanKind::Data { physical: base } = s.kind else {
                                return Err(TestCaseError::fail("device piece over zeros"));
                            };
                            prop_assert_eq!(physical + k * S, base + (sec + k) * S - s.logical);
                        }
                        sec += len / S;
                    }
                    Piece::Zero { len } => {
                        for k in 0..len / S {
                            prop_assert_eq!(lookup(sec + k).unwrap().kind, SpanKind::Zero);
                        }
                        sec += len / S;
                    }
                }
            }
            prop_assert_eq!(sec, start + len);
        }
    }

    /// The guard lets through exactly the device sectors granted for the access.
    #[test]
    fn guard_agrees_with_a_sector_by_sector_model(
        (spans, dev) in grants(),
        start in 0u64..70,
        len in 1u64..10,
        write in any::<bool>(),
    ) {
        let g = Grant::new(spans.clone(), dev).unwrap();
        let granted = |sector: u64| spans.iter().any(|s| match s.kind {
            SpanKind::Data { physical } => {
                (!write || s.access == Access::ReadWrite)
                    && physical <= sector * S
                    && sector * S < physical + s.len
            }
            SpanKind::Zero => false,
        });
        let want = (start..start + len).all(granted);
        prop_assert_eq!(g.guard().check(start * S, len * S, write).is_ok(), want);
    }
}
