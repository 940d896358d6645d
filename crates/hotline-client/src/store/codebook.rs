//! Code books: pre-agreed messages. A channel adopts a catalogue (a JSON file: entries
//! with an id, typed fields and a text per language) as an agreed text that every
//! party signs (its only version, in language `x-code-book`, is the file's exact
//! bytes); the newest accepted one is the channel's code book. `send --code` sends an
//! entry and its fields with the catalogue's SHA-256; each device renders it in its own
//! language, so both sides can show they rendered the same entry. A message that does
//! not match the adopted code book is refused.

use std::collections::BTreeMap;

use hotline_core::{Coded, Message, Precedence};
use serde::Deserialize;

use super::*;
use crate::store::agreements::AgreementState;

/// The language an agreed text carries a code book in.
pub const CODE_BOOK_LANGUAGE: &str = "x-code-book";

/// A code book, as its file says.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    pub catalogue: String,
    pub version: u64,
    pub entries: Vec<CodeEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeEntry {
    pub id: String,
    #[serde(default)]
    pub fields: Vec<Field>,
    /// Language → text, with `{field}` where each field's value goes.
    pub text: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: FieldKind,
    /// The allowed values of a `choice`.
    #[serde(default)]
    pub values: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldKind {
    /// One line of at most 200 characters.
    Text,
    /// A decimal number: `-12`, `3.5`.
    Number,
    /// A UTC time: `2026-05-18T18:00Z`.
    Time,
    /// One of `values`.
    Choice,
}

fn bad(why: String) -> StoreError {
    StoreError::Agreement(why)
}

impl Catalogue {
    /// Parses and checks a code book file.
    pub fn parse(bytes: &[u8]) -> Result<Self, StoreError> {
        let catalogue: Catalogue =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a code book: {e}")))?;
        if catalogue.entries.is_empty() {
            return Err(bad("a code book needs at least one entry".into()));
        }
        for (index, entry) in catalogue.entries.iter().enumerate() {
            let id_ok = !entry.id.is_empty()
                && entry.id.len() <= hotline_core::envelope::MAX_CODE_LEN
                && entry.id.bytes().all(|b| {
                    b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !id_ok || catalogue.entries[..index].iter().any(|e| e.id == entry.id) {
                return Err(bad(format!(
                    "code {:?}: ids are 1 to 64 capitals, digits, '-' or '_', each once",
                    entry.id
                )));
            }
            if entry.fields.len() > hotline_core::envelope::MAX_FIELDS {
                return Err(bad(format!("code {}: too many fields", entry.id)));
            }
            for (at, field) in entry.fields.iter().enumerate() {
                let name_ok = !field.name.is_empty()
                    && field.name.len() <= hotline_core::envelope::MAX_CODE_LEN
                    && field
                        .name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
                if !name_ok || entry.fields[..at].iter().any(|f| f.name == field.name) {
                    return Err(bad(format!(
                        "code {}: field {:?}: names are lower-case letters, digits or '_', each once",
                        entry.id, field.name
                    )));
                }
                if (field.kind == FieldKind::Choice) == field.values.is_empty() {
                    return Err(bad(format!(
                        "code {}: field {}: values belong to choice fields, which need them",
                        entry.id, field.name
                    )));
                }
            }
            if entry.text.is_empty() {
                return Err(bad(format!("code {}: no text", entry.id)));
            }
            for (language, text) in &entry.text {
                if !hotline_core::agreement::language_ok(language) || text.trim().is_empty() {
                    return Err(bad(format!(
                        "code {}: language {language:?}: a language code and a text",
                        entry.id
                    )));
                }
                for placeholder in placeholders(text) {
                    if !entry.fields.iter().any(|f| f.name == placeholder) {
                        return Err(bad(format!(
                            "code {}: the {language} text names {{{placeholder}}}, which is not a field",
                            entry.id
                        )));
                    }
                }
            }
        }
        Ok(catalogue)
    }

    fn entry(&self, id: &str) -> Option<&CodeEntry> {
        self.entries.iter().find(|entry| entry.id == id)
    }

    /// The fields of `id` in the entry's order, each checked against its type; what
    /// does not match the code book is refused, saying why.
    pub fn check(
        &self,
        id: &str,
        given: &[(String, String)],
    ) -> Result<Vec<(String, String)>, StoreError> {
        let entry = self.entry(id).ok_or_else(|| {
            bad(format!(
                "code {id:?} is not in the adopted code book {} (version {}); see: hotline code list CHANNEL",
                self.catalogue, self.version
            ))
        })?;
        for (name, _) in given {
            if !entry.fields.iter().any(|f| f.name == *name) {
                return Err(bad(format!("code {id} has no field {name:?}")));
            }
        }
        let mut fields = Vec::with_capacity(entry.fields.len());
        for field in &entry.fields {
            let mut values = given.iter().filter(|(name, _)| *name == field.name);
            let (Some((_, value)), None) = (values.next(), values.next()) else {
                return Err(bad(format!(
                    "code {id} needs field {} once (--field {}=…)",
                    field.name, field.name
                )));
            };
            if !value_ok(field, value) {
                return Err(bad(format!(
                    "code {id}: {value:?} is not a {} for field {}{}",
                    match field.kind {
                        FieldKind::Text => "one-line text of at most 200 characters",
                        FieldKind::Number => "number (as in -12 or 3.5)",
                        FieldKind::Time => "UTC time (as in 2026-05-18T18:00Z)",
                        FieldKind::Choice => "choice",
                    },
                    field.name,
                    if field.kind == FieldKind::Choice {
                        format!(" (one of {})", field.values.join(", "))
                    } else {
                        String::new()
                    }
                )));
            }
            fields.push((field.name.clone(), value.clone()));
        }
        Ok(fields)
    }

    /// The entry's text in `language` (else the first language it has), the fields
    /// filled in; `None` if the code is not in this book.
    pub fn render(&self, coded: &Coded, language: Option<&str>) -> Option<String> {
        let entry = self.entry(&coded.id)?;
        let text = language
            .and_then(|language| entry.text.get(language))
            .or_else(|| entry.text.values().next())?;
        let mut out = text.clone();
        for (name, value) in &coded.fields {
            out = out.replace(&format!("{{{name}}}"), value);
        }
        Some(out)
    }
}

fn placeholders(text: &str) -> Vec<&str> {
    text.split('{')
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(name, _)| name))
        .collect()
}

fn value_ok(field: &Field, value: &str) -> bool {
    match field.kind {
        FieldKind::Text => {
            !value.trim().is_empty()
                && value.chars().count() <= 200
                && !value.chars().any(char::is_control)
        }
        FieldKind::Number => {
            let digits = value.strip_prefix('-').unwrap_or(value);
            let mut parts = digits.splitn(2, '.');
            let whole = parts.next().unwrap_or_default();
            let fraction = parts.next();
            !whole.is_empty()
                && whole.bytes().all(|b| b.is_ascii_digit())
                && fraction.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()))
                && value.len() <= 32
        }
        FieldKind::Time => {
            let b = value.as_bytes();
            b.len() == 17
                && b[4] == b'-'
                && b[7] == b'-'
                && b[10] == b'T'
                && b[13] == b':'
                && b[16] == b'Z'
                && [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15]
                    .iter()
                    .all(|&i| b[i].is_ascii_digit())
        }
        FieldKind::Choice => field.values.iter().any(|v| v == value),
    }
}

/// The language this device renders code books in: `HOTLINE_LANGUAGE`, else the
/// locale's (`LC_ALL`, `LC_MESSAGES`, `LANG`: `fr_FR.UTF-8` is `fr`).
pub fn preferred_language() -> Option<String> {
    if let Ok(language) = std::env::var("HOTLINE_LANGUAGE")
        && !language.is_empty()
    {
        return Some(language);
    }
    ["LC_ALL", "LC_MESSAGES", "LANG"]
        .iter()
        .filter_map(|name| std::env::var(name).ok())
        .find(|value| !value.is_empty())
        .map(|value| {
            value
                .split(['_', '.', '@'])
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .filter(|language| !language.is_empty() && language != "C" && language != "POSIX")
}

/// A coded message as a person reads it: the rendered entry, with its code.
pub fn render_coded(books: &BTreeMap<[u8; 32], Catalogue>, coded: &Coded) -> String {
    let rendered = books
        .get(&coded.catalogue)
        .and_then(|book| book.render(coded, preferred_language().as_deref()));
    match rendered {
        Some(text) => format!("[{}] {text}", coded.id),
        None => format!(
            "[{} from code book {} not adopted here: {}]",
            coded.id,
            &hex::encode(coded.catalogue)[..12],
            coded
                .fields
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

impl Store {
    /// Proposes `bytes` (a code book file) as the channel's code book: an agreed text
    /// that every party must sign (`agree sign`). Returns the proposal's id.
    pub fn adopt_code_book(
        &mut self,
        channel: &str,
        bytes: &[u8],
        deadline_ms: Option<u64>,
    ) -> Result<EnvelopeId, StoreError> {
        Catalogue::parse(bytes)?;
        let text = String::from_utf8(bytes.to_vec())
            .map_err(|_| bad("a code book file is UTF-8".into()))?;
        self.propose_agreement(
            channel,
            vec![(CODE_BOOK_LANGUAGE.to_owned(), text)],
            deadline_ms,
        )
    }

    /// Every code book adopted in the channel (accepted by every party), by SHA-256.
    pub fn code_books(
        &mut self,
        channel: &str,
    ) -> Result<BTreeMap<[u8; 32], Catalogue>, StoreError> {
        Ok(self
            .adopted(channel)?
            .into_iter()
            .map(|(hash, book, _)| (hash, book))
            .collect())
    }

    /// The channel's code book: the newest adopted one, with its SHA-256.
    pub fn code_book(
        &mut self,
        channel: &str,
    ) -> Result<Option<([u8; 32], Catalogue)>, StoreError> {
        Ok(self
            .adopted(channel)?
            .into_iter()
            .max_by_key(|(_, _, time)| *time)
            .map(|(hash, book, _)| (hash, book)))
    }

    fn adopted(&mut self, channel: &str) -> Result<Vec<([u8; 32], Catalogue, u64)>, StoreError> {
        Ok(self
            .agreements(channel)?
            .into_iter()
            .filter(|status| status.state == AgreementState::Accepted)
            .filter_map(|status| match status.versions.as_slice() {
                [(language, text)] if language == CODE_BOOK_LANGUAGE => {
                    let book = Catalogue::parse(text.as_bytes()).ok()?;
                    let hash: [u8; 32] = Sha256::digest(text.as_bytes()).into();
                    Some((hash, book, status.time_ms))
                }
                _ => None,
            })
            .collect())
    }

    /// Sends entry `id` of the channel's code book with `fields`, checked against it.
    pub fn send_code(
        &mut self,
        channel: &str,
        precedence: Precedence,
        id: &str,
        fields: &[(String, String)],
        deadline_ms: Option<u64>,
    ) -> Result<EnvelopeId, StoreError> {
        let Some((hash, book)) = self.code_book(channel)? else {
            return Err(bad(format!(
                "channel {channel} has no code book: adopt one with hotline code adopt (every party signs it)"
            )));
        };
        let fields = book.check(id, fields)?;
        let message = Message {
            precedence,
            text: String::new(),
            code: Some(Coded {
                catalogue: hash,
                id: id.to_owned(),
                fields,
            }),
        };
        self.send(channel, Body::Message(message), deadline_ms)
    }
}
