//! The batch body decoder: whatever a client sends, it answers with messages or an error,
//! never a panic; what `encode_batch` writes comes back unchanged.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use hotline_relay::server::{MAX_BATCH, decode_batch, encode_batch};
use proptest::prelude::*;

proptest! {
    #[test]
    fn arbitrary_bytes_decode_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(messages) = decode_batch(&bytes) {
            prop_assert!(!messages.is_empty() && messages.len() <= MAX_BATCH);
            prop_assert!(messages.iter().all(|m| !m.is_empty()));
            prop_assert_eq!(encode_batch(&messages), bytes);
        }
    }

    #[test]
    fn encoded_batches_round_trip(messages in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 1..64), 1..=MAX_BATCH)) {
        prop_assert_eq!(decode_batch(&encode_batch(&messages)).unwrap(), messages);
    }

    #[test]
    fn a_batch_cut_short_is_refused(messages in proptest::collection::vec(
        proptest::collection::vec(any::<u8>(), 1..64), 1..16), cut in 1usize..64) {
        let encoded = encode_batch(&messages);
        let cut = cut.min(encoded.len());
        prop_assert!(decode_batch(&encoded[..encoded.len() - cut]).is_err());
    }
}

#[test]
fn too_many_or_empty_messages_are_refused() {
    let too_many: Vec<Vec<u8>> = (0..=MAX_BATCH).map(|n| vec![n as u8 | 1]).collect();
    assert!(decode_batch(&encode_batch(&too_many)).is_err());
    assert!(decode_batch(&encode_batch(&[])).is_err());
    assert!(decode_batch(&encode_batch(&[b"x".to_vec(), Vec::new()])).is_err());
}
