//! `hotline export` and `hotline bundle`: the record and messages as files.

use std::path::Path;

use hotline_client::Store;
use hotline_client::bundle;
use serde_json::json;

use crate::input::{self};

use super::{Failure, Outcome, create_private, failure, write_file};

pub fn export(home: &Path, channel: &str, out: &Path, force: bool, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    // Streamed into a private file beside the target (0600: it holds the plaintext of
    // every message), synced, then renamed: a crash never leaves half an export.
    let cannot = |e: std::io::Error| failure(format!("cannot write export {}: {e}", out.display()));
    let (file, temporary) = create_private(out, "export", force)?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 16, file);
    let written = store.export_to(channel, &mut writer);
    let finished = written.map_err(Failure::from).and_then(|()| {
        let file = writer.into_inner().map_err(|e| cannot(e.into_error()))?;
        file.sync_all().map_err(cannot)?;
        std::fs::rename(&temporary, out).map_err(cannot)?;
        Ok(file.metadata().map(|m| m.len()).unwrap_or(0))
    });
    let bytes = match finished {
        Ok(bytes) => bytes,
        Err(error) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(error);
        }
    };
    if json_output {
        out_json!(json!({"channel": channel, "file": out.display().to_string(), "bytes": bytes}));
    } else {
        eprintln!(
            "wrote {bytes} bytes; check it anywhere with: hotline verify {}",
            out.display()
        );
    }
    Ok(())
}

pub fn bundle_export(home: &Path, out: &Path, force: bool, json_output: bool) -> Outcome {
    let mut store = Store::open(home)?;
    let entries = store.export_outbox()?;
    write_file(out, &bundle::encode(&entries), "bundle", force)?;
    if json_output {
        out_json!(json!({"messages": entries.len(), "out": out}));
    } else {
        out!("{} messages written to {}", entries.len(), out.display());
    }
    Ok(())
}

pub fn bundle_import(home: &Path, file: &Path, json_output: bool) -> Outcome {
    let entries = bundle::decode(&input::read_limited(
        file,
        input::MAX_BUNDLE_FILE,
        "a bundle",
    )?)
    .map_err(|e| failure(format!("{} is not a hotline bundle: {e}", file.display())))?;
    let total = entries.len();
    let mut store = Store::open(home)?;
    let _lock = store.home().lock_receiving()?;
    let new = store.import_bundle(entries)?;
    if json_output {
        out_json!(json!({"messages": total, "new": new}));
    } else {
        out!("{new} new of {total} messages");
    }
    Ok(())
}
