//! The batch body: several messages in one request (`POST .../batch`, key packages).

use hotline_core::codec::{Reader, Writer};

/// Most messages in one batch post.
pub const MAX_BATCH: usize = 256;

/// Decodes a batch body: `u32 n, n × (u32 length, bytes)`, each message non-empty.
pub fn decode_batch(body: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    let mut reader = Reader::new(body);
    let count = reader
        .count("messages", MAX_BATCH, 5)
        .map_err(|e| e.to_string())?;
    let mut messages = Vec::with_capacity(count);
    for _ in 0..count {
        let bytes = reader
            .bytes("message", body.len())
            .map_err(|e| e.to_string())?;
        if bytes.is_empty() {
            return Err("empty message".into());
        }
        messages.push(bytes.to_vec());
    }
    reader.finish().map_err(|e| e.to_string())?;
    if messages.is_empty() {
        return Err("empty batch".into());
    }
    Ok(messages)
}

/// Encodes messages for [`decode_batch`].
pub fn encode_batch(messages: &[Vec<u8>]) -> Vec<u8> {
    let mut writer = Writer::new();
    writer.u32(messages.len() as u32);
    for message in messages {
        writer.bytes(message);
    }
    writer.into_bytes()
}
