//! The byte codec shared by every hotline format.
//!
//! Big-endian integers and length-prefixed byte strings, in the manner of the TLS
//! presentation language that MLS itself uses. Encoding is deterministic, so that the
//! hash of an encoding can name the value. Decoding checks every length against the
//! bytes that remain (and against a per-field limit) *before* allocating, and never
//! panics: every malformed input ends in a [`DecodeError`].

use thiserror::Error;

/// Why bytes could not be decoded. Carries no input bytes, so it is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended before the value was complete.
    #[error("input truncated while reading {0}")]
    Truncated(&'static str),
    /// A length prefix exceeds the limit of its field.
    #[error("{field} is {len} bytes or items, more than the limit of {limit}")]
    TooLong {
        /// The field being read.
        field: &'static str,
        /// The length announced by the input.
        len: u64,
        /// The most this field accepts.
        limit: u64,
    },
    /// Bytes remained after the value ended.
    #[error("{0} unexpected bytes after the end of the value")]
    TrailingBytes(usize),
    /// A version this build does not understand.
    #[error("unsupported {what} version {version}")]
    UnsupportedVersion {
        /// Which format.
        what: &'static str,
        /// The version found.
        version: u8,
    },
    /// A field holds a value outside its domain.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The field being read.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// Appends encoded values to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    bytes: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty writer with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            bytes: Vec::with_capacity(capacity),
        }
    }

    /// Overwrites a `u32` written earlier at `position` (a length known only later).
    /// Positions come from this writer's own past lengths, so they are in bounds.
    pub fn patch_u32(&mut self, position: usize, value: u32) {
        if let Some(slot) = self.bytes.get_mut(position..position + 4) {
            slot.copy_from_slice(&value.to_be_bytes());
        }
    }

    /// The encoding so far.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// The encoding so far, borrowed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn u8(&mut self, value: u8) {
        self.bytes.push(value);
    }

    pub fn u16(&mut self, value: u16) {
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    pub fn u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    pub fn u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_be_bytes());
    }

    /// Fixed-size bytes, written without a length.
    pub fn fixed(&mut self, value: &[u8]) {
        self.bytes.extend_from_slice(value);
    }

    /// Bytes with a 32-bit length prefix. Callers bound `value` by the field's limit,
    /// which is always far below `u32::MAX`.
    pub fn bytes(&mut self, value: &[u8]) {
        // Invariant: every field limit in hotline is below 4 GiB, checked by the callers'
        // constructors, so the cast cannot truncate.
        self.u32(value.len() as u32);
        self.bytes.extend_from_slice(value);
    }

    /// A UTF-8 string with a 32-bit length prefix.
    pub fn string(&mut self, value: &str) {
        self.bytes(value.as_bytes());
    }
}

/// Reads encoded values from a slice, checking bounds on every step.
#[derive(Debug)]
pub struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, position: 0 }
    }

    /// How many bytes have been consumed.
    pub fn position(&self) -> usize {
        self.position
    }

    /// How many bytes remain.
    pub fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    /// Fails unless every byte was consumed.
    pub fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes(extra)),
        }
    }

    pub fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated(field));
        }
        let start = self.position;
        self.position += len;
        Ok(&self.bytes[start..self.position])
    }

    pub fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    /// A boolean encoded as one byte, 0 or 1.
    pub fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::Invalid {
                field,
                reason: "flag is neither 0 nor 1",
            }),
        }
    }

    /// Length-prefixed bytes, at most `limit` long.
    pub fn bytes(&mut self, field: &'static str, limit: usize) -> Result<&'a [u8], DecodeError> {
        let len = self.u32(field)? as usize;
        if len > limit {
            return Err(DecodeError::TooLong {
                field,
                len: len as u64,
                limit: limit as u64,
            });
        }
        self.take(len, field)
    }

    /// A length-prefixed UTF-8 string, at most `limit` bytes long.
    pub fn string(&mut self, field: &'static str, limit: usize) -> Result<String, DecodeError> {
        let raw = self.bytes(field, limit)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Invalid {
                field,
                reason: "not valid UTF-8",
            })
    }

    /// A count of items, at most `limit`, and at most what the remaining bytes could
    /// hold at `min_item_len` bytes per item, so that a forged count cannot make the
    /// caller reserve memory the input does not back.
    pub fn count(
        &mut self,
        field: &'static str,
        limit: usize,
        min_item_len: usize,
    ) -> Result<usize, DecodeError> {
        let count = self.u32(field)? as usize;
        if count > limit {
            return Err(DecodeError::TooLong {
                field,
                len: count as u64,
                limit: limit as u64,
            });
        }
        if count.saturating_mul(min_item_len.max(1)) > self.remaining() {
            return Err(DecodeError::Truncated(field));
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_of_every_primitive() {
        let mut writer = Writer::new();
        writer.u8(7);
        writer.u16(0x1234);
        writer.u32(0xdead_beef);
        writer.u64(u64::MAX - 1);
        writer.string("ŝalom");
        let bytes = writer.into_bytes();
        let mut reader = Reader::new(&bytes);
        assert_eq!(reader.u8("a"), Ok(7));
        assert_eq!(reader.u16("b"), Ok(0x1234));
        assert_eq!(reader.u32("c"), Ok(0xdead_beef));
        assert_eq!(reader.u64("d"), Ok(u64::MAX - 1));
        assert_eq!(reader.string("e", 16).as_deref(), Ok("ŝalom"));
        assert_eq!(reader.finish(), Ok(()));
    }

    #[test]
    fn forged_lengths_are_refused_before_allocating() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        assert!(matches!(
            Reader::new(&bytes).bytes("body", 1 << 20),
            Err(DecodeError::TooLong { .. })
        ));
        assert!(matches!(
            Reader::new(&bytes).bytes("body", usize::MAX),
            Err(DecodeError::Truncated("body"))
        ));
        assert!(matches!(
            Reader::new(&[0, 0, 0, 200]).count("items", 1000, 32),
            Err(DecodeError::Truncated("items"))
        ));
    }
}
