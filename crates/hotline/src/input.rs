//! Reading the files a command is given, never more than their format allows.
//!
//! Every file the command line reads (a contact card, a bundle, an invitation, an
//! export, a relay's address) goes through [`read_limited`] (or
//! [`read_limited_expecting`], for a format with a magic): at most `limit + 1` bytes
//! through [`Read::take`], so a wrong file, a device such as `/dev/zero` or an endless
//! pipe is refused as soon as it passes its limit instead of being read until memory
//! runs out. The length in a file's metadata is never trusted alone (devices, pipes and
//! `/proc` files report 0, and a file can grow while it is read), but a regular file
//! whose metadata already says it is too large is refused before a byte is read.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use hotline_core::card::{MAX_KEY_PACKAGE_LEN, MAX_KEY_PACKAGES, MAX_RELAY_LEN, MAX_RELAYS};
use hotline_core::identity::MAX_NAME_LEN;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The largest contact card `hotline-core` decodes (`card.rs`, version 1): version byte,
/// party and device names with their 4-byte lengths, the 32-byte key, up to
/// `MAX_KEY_PACKAGES` key packages plus the last-resort one of up to
/// `MAX_KEY_PACKAGE_LEN` bytes each, up to `MAX_RELAYS` relay addresses and the 64-byte
/// signature. About 1.02 MiB.
const LARGEST_CARD: u64 = 1
    + 2 * (4 + MAX_NAME_LEN as u64)
    + 32
    + 4
    + (MAX_KEY_PACKAGES as u64 + 1) * (4 + MAX_KEY_PACKAGE_LEN as u64)
    + 4
    + MAX_RELAYS as u64 * (4 + MAX_RELAY_LEN as u64)
    + 64;

/// Largest contact card file read by `card import`: the largest card the decoder
/// accepts ([`LARGEST_CARD`], just over 1 MiB) rounded up. A real card (a few key
/// packages of a few hundred bytes) is a few KiB.
pub const MAX_CARD_FILE: u64 = 2 * MIB;
const _: () = assert!(MAX_CARD_FILE >= LARGEST_CARD);

/// Largest bundle file read by `bundle import`. The bundle format
/// (`hotline-client::bundle`) allows 1,000,000 entries of up to 2 MiB each, about
/// 2 TiB, far more than can be held: the whole file and the decoded entries are in
/// memory at once (about twice the file). 256 MiB is what the command line accepted
/// before (from the file's metadata), so no bundle that imported before is refused: a
/// two hundred messages of the largest size (1 MiB of text), tens of thousands of
/// ordinary ones. `bundle export` writes the whole outbox; a larger outbox needs relays or more
/// frequent exports.
pub const MAX_BUNDLE_FILE: u64 = 256 * MIB;

/// Largest invitation file read by `channel join`. An invitation is a bundle (the
/// committer's `bundle export`: the Welcome, of at most 2 MiB, and whatever else its
/// outbox held), decoded and imported like one, so it gets the bundle's limit: a file
/// that `bundle import` accepts is never refused by `channel join`.
pub const MAX_INVITATION_FILE: u64 = MAX_BUNDLE_FILE;

/// Largest export read by `verify`. The format (`hotline-core::export`) allows
/// 10,000,000 envelopes of up to 1 MiB + 96 KiB, about 11 TB. `verify` streams the file
/// (bounded memory, a scratch database beside it), so the bound is on time and disk,
/// not memory: 4 GiB is millions of ordinary messages. A regular file over it is
/// refused from its length; a stream is cut at it, and one that does not start with the
/// export's magic is refused by its first bytes.
pub const MAX_EXPORT_FILE: u64 = 4 * GIB;

/// Largest relay address file read by `relay url`: one address (host, port and the
/// certificate's hash; a card allows 512 bytes per address), with room to spare.
pub const MAX_ADDRESS_FILE: u64 = 4 * KIB;

/// Largest message read from a file or standard input: what one envelope's body holds.
pub const MAX_MESSAGE_FILE: u64 = hotline_core::envelope::MAX_BODY_LEN as u64;

/// The text of a message: `text` itself, standard input when it is `-`, or `file`; at
/// most [`MAX_MESSAGE_FILE`] bytes of UTF-8.
pub fn message(
    text: Option<&str>,
    file: Option<&Path>,
) -> Result<String, crate::commands::Failure> {
    let failure = |message: String| crate::commands::Failure {
        message,
        code: crate::exit::ERROR,
    };
    let bytes = match (text, file) {
        (Some("-"), _) => {
            use std::io::Read;
            let mut bytes = Vec::new();
            std::io::stdin()
                .lock()
                .take(MAX_MESSAGE_FILE + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| failure(format!("cannot read standard input: {e}")))?;
            if bytes.len() as u64 > MAX_MESSAGE_FILE {
                return Err(failure(format!(
                    "the message on standard input is over {MAX_MESSAGE_FILE} bytes, \
                     what one message holds"
                )));
            }
            bytes
        }
        (Some(text), _) => return Ok(text.to_owned()),
        (None, Some(path)) => read_limited(path, MAX_MESSAGE_FILE, "a message")?,
        (None, None) => {
            return Err(crate::commands::Failure {
                message: "give the message as TEXT, - for standard input, or --file FILE".into(),
                code: crate::exit::USAGE,
            });
        }
    };
    String::from_utf8(bytes).map_err(|_| failure("the message is not UTF-8 text".into()))
}

/// Why an input file was not read.
#[derive(Debug)]
pub enum InputError {
    /// The file could not be opened or read.
    Unreadable {
        path: PathBuf,
        what: &'static str,
        error: io::Error,
    },
    /// The path names a directory.
    Directory { path: PathBuf, what: &'static str },
    /// The file holds more than `limit` bytes; `size` is its length where its metadata
    /// told it before reading.
    TooLarge {
        path: PathBuf,
        what: &'static str,
        limit: u64,
        size: Option<u64>,
    },
}

impl InputError {
    /// The file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, InputError::Unreadable { error, .. } if error.kind() == io::ErrorKind::NotFound)
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputError::Unreadable { path, what, error } => {
                write!(f, "cannot read {} ({what}): {error}", path.display())
            }
            InputError::Directory { path, what } => write!(
                f,
                "{} is a directory, not {what}; name the file itself",
                path.display()
            ),
            InputError::TooLarge {
                path,
                what,
                limit,
                size,
            } => {
                write!(f, "{}", path.display())?;
                if let Some(size) = size {
                    write!(f, " ({size} bytes)")?;
                }
                write!(
                    f,
                    " is larger than the {} {what} may be; is it the right file?",
                    human(*limit)
                )
            }
        }
    }
}

impl std::error::Error for InputError {}

/// Reads the file at `path` if it holds at most `limit` bytes. `what` names the file
/// in messages, with its article: "a contact card".
pub fn read_limited(path: &Path, limit: u64, what: &'static str) -> Result<Vec<u8>, InputError> {
    read_limited_expecting(path, limit, what, b"")
}

/// [`read_limited`] for a format that starts with `magic`: when the first bytes are
/// not `magic`, only they are returned, for the format's decoder to refuse at once.
/// For a large limit this is what refuses a stream of another kind (`/dev/zero`, a
/// disk) promptly instead of reading it up to the limit.
pub fn read_limited_expecting(
    path: &Path,
    limit: u64,
    what: &'static str,
    magic: &[u8],
) -> Result<Vec<u8>, InputError> {
    let unreadable = |error| InputError::Unreadable {
        path: path.to_owned(),
        what,
        error,
    };
    let too_large = |size| InputError::TooLarge {
        path: path.to_owned(),
        what,
        limit,
        size,
    };
    let (file, metadata) = open_limited(path, limit, what)?;
    let mut bytes = Vec::new();
    if metadata.is_file() {
        // The length is only a hint: reserve it (one byte more, to see the end), and
        // turn an allocation failure into an error rather than an abort.
        let hint = usize::try_from(metadata.len() + 1).unwrap_or(usize::MAX);
        bytes
            .try_reserve_exact(hint)
            .map_err(|e| unreadable(io::Error::other(e)))?;
    }
    let mut reader = file.take(limit.saturating_add(1));
    (&mut reader)
        .take(magic.len() as u64)
        .read_to_end(&mut bytes)
        .map_err(unreadable)?;
    if bytes != magic {
        return Ok(bytes);
    }
    reader.read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(None));
    }
    Ok(bytes)
}

/// Opens the file at `path` for reading it in pieces: refuses a directory, and a regular
/// file whose length is already over `limit` (the caller reads at most `limit` bytes).
pub fn open_limited(
    path: &Path,
    limit: u64,
    what: &'static str,
) -> Result<(File, std::fs::Metadata), InputError> {
    let unreadable = |error| InputError::Unreadable {
        path: path.to_owned(),
        what,
        error,
    };
    let file = File::open(path).map_err(unreadable)?;
    // The metadata of the file opened, not of the path again.
    let metadata = file.metadata().map_err(unreadable)?;
    if metadata.is_dir() {
        return Err(InputError::Directory {
            path: path.to_owned(),
            what,
        });
    }
    if metadata.is_file() && metadata.len() > limit {
        return Err(InputError::TooLarge {
            path: path.to_owned(),
            what,
            limit,
            size: Some(metadata.len()),
        });
    }
    Ok((file, metadata))
}

/// A limit in the largest binary unit that divides it: "2 MiB", "4 GiB", "10 bytes".
fn human(bytes: u64) -> String {
    match bytes {
        0 => "0 bytes".to_owned(),
        b if b.is_multiple_of(GIB) => format!("{} GiB", b / GIB),
        b if b.is_multiple_of(MIB) => format!("{} MiB", b / MIB),
        b if b.is_multiple_of(KIB) => format!("{} KiB", b / KIB),
        1 => "1 byte".to_owned(),
        b => format!("{b} bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hotline-input-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_at_the_limit_is_read_and_one_byte_more_is_refused() {
        let dir = workdir("limit");
        let at = dir.join("at.card");
        std::fs::write(&at, [7u8; 16]).unwrap();
        assert_eq!(read_limited(&at, 16, "a contact card").unwrap(), [7u8; 16]);
        let over = dir.join("over.card");
        std::fs::write(&over, [7u8; 17]).unwrap();
        let error = read_limited(&over, 16, "a contact card").unwrap_err();
        assert!(matches!(
            error,
            InputError::TooLarge {
                limit: 16,
                size: Some(17),
                ..
            }
        ));
        assert_eq!(
            error.to_string(),
            format!(
                "{} (17 bytes) is larger than the 16 bytes a contact card may be; is it the right file?",
                over.display()
            )
        );
        // An empty file is within any limit (its decoder refuses it).
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(read_limited(&empty, 0, "a bundle").unwrap(), b"");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stream_without_a_length_is_cut_at_the_limit() {
        // /dev/zero reports no length and never ends.
        let error = read_limited(Path::new("/dev/zero"), 2 * KIB, "a bundle").unwrap_err();
        assert!(
            matches!(
                error,
                InputError::TooLarge {
                    limit: 2048,
                    size: None,
                    ..
                }
            ),
            "{error}"
        );
        assert!(
            error
                .to_string()
                .contains("larger than the 2 KiB a bundle may be")
        );
    }

    #[test]
    fn a_stream_of_another_kind_is_refused_by_its_first_bytes() {
        // Without the magic only the first bytes are read, however large the limit.
        let bytes =
            read_limited_expecting(Path::new("/dev/zero"), u64::MAX - 1, "an export", b"MAGIC")
                .unwrap();
        assert_eq!(bytes, [0; 5]);
        // With it, the rest is read up to the limit as before.
        let dir = workdir("magic");
        let path = dir.join("file");
        std::fs::write(&path, b"MAGIC and the rest").unwrap();
        assert_eq!(
            read_limited_expecting(&path, 18, "an export", b"MAGIC").unwrap(),
            b"MAGIC and the rest"
        );
        assert!(matches!(
            read_limited_expecting(&path, 17, "an export", b"MAGIC"),
            Err(InputError::TooLarge { .. })
        ));
        // A file shorter than the magic is returned whole.
        std::fs::write(&path, b"MAG").unwrap();
        assert_eq!(
            read_limited_expecting(&path, 18, "an export", b"MAGIC").unwrap(),
            b"MAG"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_large_regular_file_is_refused_from_its_metadata() {
        let dir = workdir("sparse");
        let path = dir.join("huge.hotline");
        // Sparse: as long as it claims, without the disk space.
        std::fs::File::create(&path)
            .unwrap()
            .set_len(MAX_EXPORT_FILE + 1)
            .unwrap();
        let error = read_limited(&path, MAX_EXPORT_FILE, "a transcript export").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("(4294967297 bytes) is larger than the 4 GiB a transcript export may be"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directories_and_missing_files_are_refused_clearly() {
        let dir = workdir("dir");
        let error = read_limited(&dir, MAX_CARD_FILE, "a contact card").unwrap_err();
        assert!(matches!(error, InputError::Directory { .. }));
        assert!(
            error
                .to_string()
                .contains("is a directory, not a contact card")
        );
        let error =
            read_limited(&dir.join("missing"), MAX_CARD_FILE, "a contact card").unwrap_err();
        assert!(error.is_not_found());
        assert!(error.to_string().starts_with("cannot read "));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn limits_read_as_people_write_them() {
        assert_eq!(human(MAX_CARD_FILE), "2 MiB");
        assert_eq!(human(MAX_BUNDLE_FILE), "256 MiB");
        assert_eq!(human(MAX_EXPORT_FILE), "4 GiB");
        assert_eq!(human(MAX_ADDRESS_FILE), "4 KiB");
        assert_eq!(human(1), "1 byte");
        assert_eq!(human(1025), "1025 bytes");
    }
}
