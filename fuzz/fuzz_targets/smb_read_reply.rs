//! Fuzzes how the smb plugin takes a READ reply from the server (MS-SMB2 2.2.20): what comes
//! back for a read of `asked` bytes. Input: [asked u16][reply body].
//! Invariants: never more bytes than asked for, and they are the body's own bytes at the
//! offset the reply names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use twinpath_smb::fuzzing::read_payload;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let asked = usize::from(u16::from_le_bytes([data[0], data[1]]));
    let body = data[2..].to_vec();
    if let Ok(payload) = read_payload(body.clone(), asked) {
        assert!(payload.len() <= asked, "more data than asked for");
        if !payload.is_empty() {
            let start = usize::from(body[2]) - 64;
            assert_eq!(&body[start..start + payload.len()], &payload[..]);
        }
    }
});
