//! Settings from a flag, the environment, a TOML file or the default, in that order of
//! precedence, each kept with where it came from (`relay config` shows them).
//!
//! A scope (the relay's settings, say) is a table of [`Spec`]s: a key (`max_message`,
//! as in the file), its environment variable (`HOTLINE_RELAY_MAX_MESSAGE`) and flag
//! (`--max-message`), and its default. A key in the file that no spec names is an error
//! that names it; so is a value that does not parse, naming where it came from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::commands::Failure;
use crate::exit;

/// One setting of a scope.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// As in the file; the flag is the same with `-` for `_`.
    pub key: &'static str,
    pub env: &'static str,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

/// Where an effective value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Flag,
    Env(&'static str),
    File(PathBuf),
    Default,
}

impl Source {
    pub fn describe(&self) -> String {
        match self {
            Source::Flag => "flag".into(),
            Source::Env(name) => format!("environment ({name})"),
            Source::File(path) => format!("file ({})", path.display()),
            Source::Default => "default".into(),
        }
    }
}

/// The effective settings of a scope.
#[derive(Debug)]
pub struct Settings {
    specs: &'static [Spec],
    values: BTreeMap<&'static str, (String, Source)>,
}

/// A device's settings: its home, and the defaults of `sync` and `status` flags (a flag
/// given wins). The file is `$HOTLINE_CONFIG`, else `$XDG_CONFIG_HOME/hotline/config.toml`
/// (`~/.config/hotline/config.toml`) if it exists.
pub const DEVICE: &[Spec] = &[
    Spec {
        key: "home",
        env: "HOTLINE_HOME",
        default: None,
        help: "the device's home directory (default: $XDG_DATA_HOME/hotline)",
    },
    Spec {
        key: "round",
        env: "HOTLINE_ROUND",
        default: Some("10"),
        help: "sync --follow: seconds between full rounds",
    },
    Spec {
        key: "link_test_interval",
        env: "HOTLINE_LINK_TEST_INTERVAL",
        default: None,
        help: "sync: time between link tests (kept in the device's database)",
    },
    Spec {
        key: "record_every",
        env: "HOTLINE_RECORD_EVERY",
        default: None,
        help: "sync: period of availability records (kept)",
    },
    Spec {
        key: "link_test_retention",
        env: "HOTLINE_LINK_TEST_RETENTION",
        default: None,
        help: "sync: how long raw link tests are kept (kept)",
    },
    Spec {
        key: "log_level",
        env: "HOTLINE_LOG_LEVEL",
        default: None,
        help: "sync --follow: error, warn, info or debug (else RUST_LOG, else info)",
    },
    Spec {
        key: "undelivered_after",
        env: "HOTLINE_UNDELIVERED_AFTER",
        default: None,
        help: "status: age of an undelivered message that raises an alarm (kept)",
    },
];

/// The device's settings file: `$HOTLINE_CONFIG` (which must exist), else
/// `$XDG_CONFIG_HOME/hotline/config.toml` or `~/.config/hotline/config.toml` if it
/// exists.
pub fn device_file() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HOTLINE_CONFIG").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config")))?;
    let path = base.join("hotline").join("config.toml");
    path.exists().then_some(path)
}

/// Largest settings file read.
const MAX_FILE: u64 = 64 * 1024;

fn usage(message: String) -> Failure {
    Failure {
        message,
        code: exit::USAGE,
    }
}

impl Settings {
    /// Resolves every spec: `flags` (key → value given on the command line), then the
    /// environment, then `file` (TOML; unknown keys refused), then the default.
    pub fn resolve(
        specs: &'static [Spec],
        flags: &BTreeMap<&'static str, String>,
        file: Option<&Path>,
    ) -> Result<Self, Failure> {
        Self::resolve_with(specs, flags, file, |name| std::env::var(name).ok())
    }

    /// [`Settings::resolve`] with the environment read through `env`.
    pub fn resolve_with(
        specs: &'static [Spec],
        flags: &BTreeMap<&'static str, String>,
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Failure> {
        let from_file = match file {
            Some(path) => read_file(specs, path)?,
            None => BTreeMap::new(),
        };
        let mut values = BTreeMap::new();
        for spec in specs {
            let found = if let Some(value) = flags.get(spec.key) {
                Some((value.clone(), Source::Flag))
            } else if let Some(value) = env(spec.env).filter(|v| !v.is_empty()) {
                Some((value, Source::Env(spec.env)))
            } else if let (Some(value), Some(path)) = (from_file.get(spec.key), file) {
                Some((value.clone(), Source::File(path.to_owned())))
            } else {
                spec.default
                    .map(|value| (value.to_owned(), Source::Default))
            };
            if let Some(found) = found {
                values.insert(spec.key, found);
            }
        }
        Ok(Self { specs, values })
    }

    /// Gives `key` a value computed now when nothing set it (reported as the default).
    pub fn default_to(&mut self, key: &'static str, value: String) {
        self.values.entry(key).or_insert((value, Source::Default));
    }

    /// The value of `key`, if it has one.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(|(value, _)| value.as_str())
    }

    /// The value of `key`, or a usage error saying how to give it.
    pub fn require(&self, key: &str) -> Result<&str, Failure> {
        self.get(key).ok_or_else(|| {
            let env = self
                .specs
                .iter()
                .find(|spec| spec.key == key)
                .map_or("", |spec| spec.env);
            usage(format!(
                "no {key}: give --{}, {env} or `{key} = ...` in the --config file",
                key.replace('_', "-")
            ))
        })
    }

    /// The value of `key` parsed by `parse` (which says what it expects); a value that
    /// does not parse is a usage error naming where it came from.
    pub fn parse<T>(
        &self,
        key: &str,
        parse: impl Fn(&str) -> Option<T>,
        expected: &str,
    ) -> Result<Option<T>, Failure> {
        let Some((value, source)) = self.values.get(key) else {
            return Ok(None);
        };
        parse(value).map(Some).ok_or_else(|| {
            usage(format!(
                "invalid {key} {value:?} from the {}: {expected}",
                source.describe()
            ))
        })
    }

    /// Every setting with its value (or none) and where it came from, in spec order.
    pub fn report(&self) -> Vec<(&'static Spec, Option<&str>, Option<&Source>)> {
        self.specs
            .iter()
            .map(|spec| {
                let found = self.values.get(spec.key);
                (
                    spec,
                    found.map(|(value, _)| value.as_str()),
                    found.map(|(_, source)| source),
                )
            })
            .collect()
    }
}

/// The file's settings as text, each key checked against the specs.
fn read_file(specs: &[Spec], path: &Path) -> Result<BTreeMap<String, String>, Failure> {
    let bytes = crate::input::read_limited(path, MAX_FILE, "a settings file")?;
    let text = String::from_utf8(bytes)
        .map_err(|_| usage(format!("{} is not UTF-8 text", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| usage(format!("{} is not valid TOML: {e}", path.display())))?;
    let mut values = BTreeMap::new();
    for (key, value) in table {
        if !specs.iter().any(|spec| spec.key == key) {
            let known: Vec<&str> = specs.iter().map(|spec| spec.key).collect();
            return Err(usage(format!(
                "{}: unknown setting {key:?} (known: {})",
                path.display(),
                known.join(", ")
            )));
        }
        let text = match value {
            toml::Value::String(text) => text,
            toml::Value::Integer(number) => number.to_string(),
            toml::Value::Float(number) => number.to_string(),
            toml::Value::Boolean(flag) => flag.to_string(),
            other => {
                return Err(usage(format!(
                    "{}: {key} must be a string or a number, not {}",
                    path.display(),
                    other.type_str()
                )));
            }
        };
        values.insert(key, text);
    }
    Ok(values)
}

/// A size: a whole number of bytes, or with B, KiB, MiB, GiB, TiB (KB, MB, GB, TB are
/// powers of 1000).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let unit: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return None,
    };
    number.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[Spec] = &[
        Spec {
            key: "listen",
            env: "HOTLINE_TEST_SETTINGS_LISTEN",
            default: None,
            help: "",
        },
        Spec {
            key: "max_message",
            env: "HOTLINE_TEST_SETTINGS_MAX_MESSAGE",
            default: Some("1MiB"),
            help: "",
        },
        Spec {
            key: "retention",
            env: "HOTLINE_TEST_SETTINGS_RETENTION",
            default: Some("30d"),
            help: "",
        },
    ];

    fn file(name: &str, text: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!(
            "hotline-settings-{}-{name}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_flag_beats_the_environment_beats_the_file_beats_the_default() {
        let path = file(
            "order",
            "listen = \"127.0.0.1:1\"\nmax_message = 4096\nretention = \"7d\"\n",
        );
        let env =
            |name: &str| (name == "HOTLINE_TEST_SETTINGS_MAX_MESSAGE").then(|| "2KiB".to_owned());
        let flags = BTreeMap::from([("listen", "127.0.0.1:2".to_owned())]);
        let settings = Settings::resolve_with(SPECS, &flags, Some(&path), env).unwrap();
        let report: Vec<_> = settings
            .report()
            .into_iter()
            .map(|(spec, value, source)| (spec.key, value.map(str::to_owned), source.cloned()))
            .collect();
        assert_eq!(
            report,
            [
                ("listen", Some("127.0.0.1:2".into()), Some(Source::Flag)),
                (
                    "max_message",
                    Some("2KiB".into()),
                    Some(Source::Env("HOTLINE_TEST_SETTINGS_MAX_MESSAGE"))
                ),
                (
                    "retention",
                    Some("7d".into()),
                    Some(Source::File(path.clone()))
                ),
            ]
        );
        assert_eq!(
            settings.parse("max_message", parse_size, "a size").unwrap(),
            Some(2048)
        );
        let without = Settings::resolve(SPECS, &BTreeMap::new(), None).unwrap();
        assert_eq!(without.get("retention"), Some("30d"));
        assert_eq!(without.get("listen"), None);
        assert!(
            without
                .require("listen")
                .unwrap_err()
                .message
                .contains("--listen")
        );
    }

    #[test]
    fn an_unknown_key_or_a_bad_value_is_a_usage_error_naming_it() {
        let path = file("unknown", "listen = \"x\"\nmax_mesage = 1\n");
        let error = Settings::resolve(SPECS, &BTreeMap::new(), Some(&path)).unwrap_err();
        assert_eq!(error.code, exit::USAGE);
        assert!(
            error.message.contains("\"max_mesage\""),
            "{}",
            error.message
        );
        let path = file("bad", "retention = \"7d\"\nmax_message = \"lots\"\n");
        let settings = Settings::resolve(SPECS, &BTreeMap::new(), Some(&path)).unwrap();
        let error = settings
            .parse("max_message", parse_size, "a size such as 1MiB")
            .unwrap_err();
        assert!(
            error.message.contains("\"lots\" from the file"),
            "{}",
            error.message
        );
        let path = file("table", "[relay]\nlisten = 1\n");
        assert!(Settings::resolve(SPECS, &BTreeMap::new(), Some(&path)).is_err());
    }

    #[test]
    fn sizes_read_with_their_units() {
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("64 KiB"), Some(64 << 10));
        assert_eq!(parse_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("1 parsec"), None);
        assert_eq!(parse_size("99999999999TiB"), None);
    }
}
