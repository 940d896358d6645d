//! Limits both ends know.

/// Most key packages a device may have in stock on a relay.
pub const MAX_KEY_PACKAGE_STOCK: usize = 64;
/// Largest key package a relay stocks, in bytes.
pub const MAX_KEY_PACKAGE: usize = 16 * 1024;
/// Largest message a relay accepts by default, in bytes (its `max_message` limit).
pub const MAX_MESSAGE: usize = 1 << 20;
