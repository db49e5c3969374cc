//! Whether a call sets its idempotency key (AIP-155 `request_id`), read from the request's
//! wire bytes without decoding the message.

/// Whether the gRPC request `body` (one length-prefixed, uncompressed message) sets the
/// length-delimited field `number` to something non-empty. Anything unreadable says no.
pub fn sets_key(body: &[u8], number: u32) -> bool {
    // The gRPC frame: a compressed flag, a 4-byte length, the message.
    let Some((&0, rest)) = body.split_first() else {
        return false;
    };
    let Some((length, mut message)) = rest.split_first_chunk::<4>() else {
        return false;
    };
    if u32::from_be_bytes(*length) as usize != message.len() {
        return false;
    }
    let mut found = false;
    while !message.is_empty() {
        let Some(tag) = varint(&mut message) else {
            return false;
        };
        let (field, wire_type) = (tag >> 3, tag & 7);
        let skipped = match wire_type {
            0 => varint(&mut message).map(|_| 0),
            1 => Some(8),
            2 => varint(&mut message).and_then(|n| usize::try_from(n).ok()),
            5 => Some(4),
            // Groups are long deprecated; no keel message has one.
            _ => None,
        };
        let Some(skipped) = skipped.filter(|n| *n <= message.len()) else {
            return false;
        };
        if wire_type == 2 && field == u64::from(number) {
            // The last occurrence wins, as in any protobuf parser.
            found = skipped > 0;
        }
        message = &message[skipped..];
    }
    found
}

fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, byte) in bytes.iter().enumerate().take(10) {
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A message with a string `request_id` = 3 among other fields.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Charge {
        #[prost(string, tag = "1")]
        name: String,
        #[prost(int64, tag = "2")]
        amount: i64,
        #[prost(string, tag = "3")]
        request_id: String,
        #[prost(fixed64, tag = "4")]
        at: u64,
        #[prost(fixed32, tag = "5")]
        flags: u32,
        #[prost(bytes = "vec", tag = "6")]
        blob: Vec<u8>,
    }

    fn framed(message: &impl prost::Message) -> Vec<u8> {
        let bytes = message.encode_to_vec();
        let mut frame = vec![0];
        frame.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
        frame.extend_from_slice(&bytes);
        frame
    }

    proptest! {
        #[test]
        fn the_key_is_found_exactly_when_it_is_set(
            name in ".*", amount in any::<i64>(), request_id in ".{0,40}",
            at in any::<u64>(), flags in any::<u32>(), blob in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let charge = Charge { name, amount, request_id: request_id.clone(), at, flags, blob };
            prop_assert_eq!(sets_key(&framed(&charge), 3), !request_id.is_empty());
            // Without it, other fields (strings and bytes included) never pass for the key.
            let unkeyed = Charge { request_id: String::new(), ..charge };
            prop_assert!(!sets_key(&framed(&unkeyed), 3));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = sets_key(&bytes, 3);
        }
    }

    #[test]
    fn compressed_or_truncated_frames_are_not_trusted() {
        let charge = Charge {
            request_id: "r-1".into(),
            ..Charge::default()
        };
        let mut frame = framed(&charge);
        assert!(sets_key(&frame, 3));
        frame[0] = 1;
        assert!(!sets_key(&frame, 3), "compressed");
        frame[0] = 0;
        frame.pop();
        assert!(!sets_key(&frame, 3), "truncated");
    }
}
