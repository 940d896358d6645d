//! The device's home directory: created private, refused when others can read it.

use std::fs::{self, DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// The database file inside a home.
pub const DATABASE: &str = "device.db";
/// The lock held by the one process that receives.
pub const RECEIVE_LOCK: &str = "receive.lock";

/// Why a home cannot be used.
#[derive(Debug, Error)]
pub enum HomeError {
    #[error("{path} is readable by other users (mode {mode:o}); hotline keeps private keys there")]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("no hotline device in {path}")]
    Missing { path: PathBuf },
    #[error("a hotline device already exists in {path}")]
    Exists { path: PathBuf },
    #[error(
        "another hotline process ({holder}) is receiving for this device; \
         wait for it to finish or stop it (only one process receives at a time)"
    )]
    Busy { holder: String },
    #[error("cannot use {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A checked home directory.
#[derive(Debug, Clone)]
pub struct Home {
    path: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HomeError + '_ {
    move |source| HomeError::Io {
        path: path.to_owned(),
        source,
    }
}

impl Home {
    /// Creates a new home (mode 0700) with an empty database file (mode 0600).
    pub fn create(path: &Path) -> Result<Self, HomeError> {
        if path.join(DATABASE).exists() {
            return Err(HomeError::Exists {
                path: path.to_owned(),
            });
        }
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(io(path))?;
        // An existing directory keeps its mode: tighten it, we are creating the device.
        fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io(path))?;
        let database = path.join(DATABASE);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&database)
            .map_err(io(&database))?;
        Self::open(path)
    }

    /// Opens an existing home, refusing one that other users can read.
    pub fn open(path: &Path) -> Result<Self, HomeError> {
        let metadata = fs::metadata(path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => HomeError::Missing {
                path: path.to_owned(),
            },
            _ => HomeError::Io {
                path: path.to_owned(),
                source,
            },
        })?;
        if !metadata.is_dir() {
            return Err(HomeError::NotADirectory {
                path: path.to_owned(),
            });
        }
        let mode = metadata.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(HomeError::TooOpen {
                path: path.to_owned(),
                mode,
            });
        }
        if !path.join(DATABASE).exists() {
            return Err(HomeError::Missing {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn database(&self) -> PathBuf {
        self.path.join(DATABASE)
    }
}

/// The receive lock: one process at a time receives for a device.
#[derive(Debug)]
pub struct ReceiveLock {
    _file: std::fs::File,
}

impl Home {
    /// Takes the receive lock, or says which process holds it.
    pub fn lock_receiving(&self) -> Result<ReceiveLock, HomeError> {
        use std::io::{Read, Seek, Write};
        let path = self.path.join(RECEIVE_LOCK);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        if file.try_lock().is_err() {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(HomeError::Busy {
                holder: holder.trim().to_owned(),
            });
        }
        file.set_len(0).map_err(io(&path))?;
        file.rewind().map_err(io(&path))?;
        write!(file, "pid {}", std::process::id()).map_err(io(&path))?;
        Ok(ReceiveLock { _file: file })
    }
}
