//! Device posture in Cloudflare's shapes: the rules an admin writes (`{id, name, description,
//! type, schedule, expiration, match: [{platform}], input}`), the facts a client reports about
//! itself, and the evaluation of facts against rules into passed or failed.
//!
//! The gateway evaluates (NetBird's model): a client only says what it sees (a file's hash, the
//! running executables, the kernel version), never a verdict, so every verdict is the gateway's
//! and can be audited from the stored reason. Plain functions of their inputs; no I/O, no clock
//! (callers pass the time).
//!
//! Inputs: rule JSON (CLI files, admin API bodies, the registry), facts JSON (the device API).
//! Outputs: checked [`PostureRule`]s, [`Facts`], [`Verdict`]s and how long a verdict stays valid.
#![deny(missing_docs)]

mod certificate;
mod version;

pub use certificate::certificate_blocks;
pub use version::{compare, parse_version, Operator, Version};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// Platforms a rule's `match` may name (Cloudflare's).
pub const PLATFORMS: [&str; 6] = ["windows", "mac", "linux", "android", "ios", "chromeos"];

/// The schedule a rule gets when it names none (Cloudflare's default).
pub const DEFAULT_SCHEDULE: &str = "5m";

/// The shortest schedule and expiration accepted (Cloudflare's minimum schedule).
pub const MIN_INTERVAL_SECS: u64 = 60;

/// Added to twice the schedule when a rule has no `expiration`: one missed report and a slow
/// one are forgiven, a device that stopped reporting loses its passes within ~2 schedules.
pub const GRACE_SECS: u64 = 60;

/// Longest path, name or description accepted.
const MAX_TEXT: usize = 4096;
/// Most facts of one kind in a report (a device API body is small; this bounds the work).
pub const MAX_FACTS: usize = 256;

/// A check type a Linux client can check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckType {
    /// A file exists (or not), optionally with a SHA-256.
    File,
    /// An executable runs (`/proc/PID/exe`), optionally with a SHA-256.
    Application,
    /// The kernel version (`uname -r`) and the distribution (`/etc/os-release`).
    OsVersion,
    /// Mount points lie on an encrypted (dm-crypt) device.
    DiskEncryption,
    /// The machine's serial number is in a list of type SERIAL.
    SerialNumber,
    /// The version of `waygate-client` (Waygate's own type; Cloudflare has none).
    ClientVersion,
    /// A certificate in a PEM file, signed by a CA the gateway knows.
    ClientCertificateV2,
}

impl CheckType {
    /// Every type, with its name as rules spell it.
    pub const ALL: [(&'static str, CheckType); 7] = [
        ("file", CheckType::File),
        ("application", CheckType::Application),
        ("os_version", CheckType::OsVersion),
        ("disk_encryption", CheckType::DiskEncryption),
        ("serial_number", CheckType::SerialNumber),
        ("client_version", CheckType::ClientVersion),
        ("client_certificate_v2", CheckType::ClientCertificateV2),
    ];

    /// The name rules use.
    pub fn as_str(self) -> &'static str {
        CheckType::ALL
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("file", |(n, _)| n)
    }
}

/// One entry of a rule's `match`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlatformMatch {
    /// `windows`, `mac`, `linux`, `android`, `ios` or `chromeos`.
    pub platform: String,
}

/// `file` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileInput {
    /// The platform the input is for (informational; `match` selects devices).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_system: Option<String>,
    /// Absolute path.
    pub path: String,
    /// Whether the file must exist (true) or must not (false).
    #[serde(default = "yes")]
    pub exists: bool,
    /// Hex SHA-256 the file must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Signing thumbprint (Windows and macOS only; refused here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbprint: Option<String>,
}

/// `application` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplicationInput {
    /// The platform the input is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_system: Option<String>,
    /// Absolute path of the executable some running process must be.
    pub path: String,
    /// Hex SHA-256 that executable must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Signing thumbprint (Windows and macOS only; refused here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbprint: Option<String>,
}

/// `os_version` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OsVersionInput {
    /// The platform the input is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_system: Option<String>,
    /// Kernel version to compare with (`1.2` means `1.2.0`).
    pub version: String,
    /// `<`, `<=`, `>`, `>=` or `==`.
    pub operator: String,
    /// Distribution `ID` of `/etc/os-release` it must be (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_distro_name: Option<String>,
    /// Distribution `VERSION_ID`, compared with the same operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_distro_revision: Option<String>,
}

/// `disk_encryption` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEncryptionInput {
    /// Mount points to check (empty: `/`).
    #[serde(default)]
    pub check_disks: Vec<String>,
    /// All of them must be encrypted (false: any one).
    #[serde(default)]
    pub require_all: bool,
}

/// `serial_number` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialNumberInput {
    /// Id of a list of type SERIAL holding the allowed serial numbers.
    pub id: String,
}

/// `client_version` input (Waygate's own type).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientVersionInput {
    /// Version to compare with.
    pub version: String,
    /// `<`, `<=`, `>`, `>=` or `==`.
    pub operator: String,
}

/// Where `client_certificate_v2` looks for the certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateLocations {
    /// PEM files holding the certificate (and maybe its chain; private keys are never read).
    #[serde(default)]
    pub paths: Vec<String>,
    /// System trust stores (Windows and macOS only; refused here).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_stores: Vec<String>,
}

/// `client_certificate_v2` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificateInput {
    /// The platform the input is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operating_system: Option<String>,
    /// Hex SHA-256 of the signing CA's certificate (DER): the gateway's CA (`waygate ca show`)
    /// or one in `<data_dir>/posture-cas/`.
    pub certificate_id: String,
    /// The common name the certificate must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cn: Option<String>,
    /// Extended key usages it must have (`clientAuth`, `emailProtection`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extended_key_usage: Vec<String>,
    /// Whether the private key must be present (refused: the key never leaves its file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_private_key: Option<bool>,
    /// Subject alternative names it must have (not supported; refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_alternative_names: Option<Json>,
    /// Where the certificate is.
    pub locations: CertificateLocations,
}

/// A rule's input, by type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Input {
    /// `file`.
    File(FileInput),
    /// `application`.
    Application(ApplicationInput),
    /// `os_version`.
    OsVersion(OsVersionInput),
    /// `disk_encryption`.
    DiskEncryption(DiskEncryptionInput),
    /// `serial_number`.
    SerialNumber(SerialNumberInput),
    /// `client_version`.
    ClientVersion(ClientVersionInput),
    /// `client_certificate_v2`.
    ClientCertificate(ClientCertificateInput),
}

fn yes() -> bool {
    true
}

/// A checked posture rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PostureRule {
    /// Its id (kept when given, else a new UUID).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The check.
    #[serde(rename = "type")]
    pub kind: CheckType,
    /// How often clients check (`5m`).
    pub schedule: String,
    /// How long a result stays valid (empty: twice the schedule plus [`GRACE_SECS`]).
    pub expiration: String,
    /// Platforms it applies to (empty: all).
    #[serde(rename = "match")]
    pub platforms: Vec<PlatformMatch>,
    /// The type's input.
    pub input: Input,
}

/// Why a rule or a report was refused: the field at fault and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostureError {
    /// The field (`input.path`, `schedule`, `files[2].sha256`, `body`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for PostureError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for PostureError {}

fn err(field: impl Into<String>, message: impl Into<String>) -> PostureError {
    PostureError {
        field: field.into(),
        message: message.into(),
    }
}

/// Seconds in `text`: a number and a unit, `s`, `m`, `h` or `d` (`30s`, `5m`, `24h`, `7d`).
pub fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    let unit = text.chars().last()?;
    let scale = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    let digits = &text[..text.len() - 1];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(scale)
}

fn text_ok(value: &str) -> bool {
    !value.is_empty() && value.len() <= MAX_TEXT && !value.chars().any(char::is_control)
}

fn check_path(field: &str, path: &str) -> Result<(), PostureError> {
    if !path.starts_with('/') || !text_ok(path) {
        return Err(err(
            field,
            format!("{path:?} is not an absolute path (it must start with /, without control characters, at most {MAX_TEXT} bytes)"),
        ));
    }
    Ok(())
}

/// Lowercase hex SHA-256, or why `value` is not one.
fn check_sha256(field: &str, value: &str) -> Result<String, PostureError> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(err(
            field,
            format!("{value:?} is not a SHA-256 (64 hex digits, as sha256sum prints it)"),
        ))
    }
}

fn check_operator(field: &str, value: &str) -> Result<(), PostureError> {
    Operator::parse(value)
        .map(drop)
        .ok_or_else(|| err(field, format!("{value:?} is not one of <, <=, >, >=, ==")))
}

fn check_version(field: &str, value: &str) -> Result<(), PostureError> {
    let parts: Vec<&str> = value.split('.').collect();
    let strict = parts.len() <= 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit()));
    strict.then_some(()).ok_or_else(|| {
        err(
            field,
            format!("{value:?} is not a version (1 to 3 numbers: 6, 6.1 or 6.1.0)"),
        )
    })
}

fn no_thumbprint(field: &str, value: &Option<String>) -> Result<(), PostureError> {
    match value {
        Some(_) => Err(err(
            field,
            "signing thumbprints are checked on Windows and macOS only; a Linux client cannot report one",
        )),
        None => Ok(()),
    }
}

fn check_platform(field: &str, value: &Option<String>) -> Result<(), PostureError> {
    match value {
        Some(p) if !PLATFORMS.contains(&p.as_str()) => Err(err(
            field,
            format!("{p:?} is not one of {}", PLATFORMS.join(", ")),
        )),
        _ => Ok(()),
    }
}

/// What a JSON value must hold to be typed as `T`, with serde's complaint under `field`.
fn typed<T: for<'de> Deserialize<'de>>(field: &str, value: Json) -> Result<T, PostureError> {
    serde_json::from_value(value).map_err(|e| err(field, e.to_string()))
}

/// The input of a `kind` rule, checked.
fn parse_input(kind: CheckType, value: Json) -> Result<Input, PostureError> {
    if !value.is_object() {
        return Err(err("input", "expected an object"));
    }
    Ok(match kind {
        CheckType::File => {
            let mut i: FileInput = typed("input", value)?;
            check_platform("input.operating_system", &i.operating_system)?;
            check_path("input.path", &i.path)?;
            no_thumbprint("input.thumbprint", &i.thumbprint)?;
            if let Some(h) = &i.sha256 {
                if !i.exists {
                    return Err(err(
                        "input.sha256",
                        "a hash needs the file to exist; drop sha256 or set exists to true",
                    ));
                }
                i.sha256 = Some(check_sha256("input.sha256", h)?);
            }
            Input::File(i)
        }
        CheckType::Application => {
            let mut i: ApplicationInput = typed("input", value)?;
            check_platform("input.operating_system", &i.operating_system)?;
            check_path("input.path", &i.path)?;
            no_thumbprint("input.thumbprint", &i.thumbprint)?;
            if let Some(h) = &i.sha256 {
                i.sha256 = Some(check_sha256("input.sha256", h)?);
            }
            Input::Application(i)
        }
        CheckType::OsVersion => {
            let i: OsVersionInput = typed("input", value)?;
            check_platform("input.operating_system", &i.operating_system)?;
            check_version("input.version", &i.version)?;
            check_operator("input.operator", &i.operator)?;
            if let Some(name) = &i.os_distro_name {
                if !text_ok(name) {
                    return Err(err(
                        "input.os_distro_name",
                        "expected a distribution ID such as debian or ubuntu",
                    ));
                }
            }
            if let Some(rev) = &i.os_distro_revision {
                check_version("input.os_distro_revision", rev)?;
            }
            Input::OsVersion(i)
        }
        CheckType::DiskEncryption => {
            let i: DiskEncryptionInput = typed("input", value)?;
            for (n, disk) in i.check_disks.iter().enumerate() {
                check_path(&format!("input.check_disks[{n}]"), disk)?;
            }
            Input::DiskEncryption(i)
        }
        CheckType::SerialNumber => {
            let i: SerialNumberInput = typed("input", value)?;
            if !text_ok(&i.id) {
                return Err(err("input.id", "expected the id of a list of type SERIAL"));
            }
            Input::SerialNumber(i)
        }
        CheckType::ClientVersion => {
            let i: ClientVersionInput = typed("input", value)?;
            check_version("input.version", &i.version)?;
            check_operator("input.operator", &i.operator)?;
            Input::ClientVersion(i)
        }
        CheckType::ClientCertificateV2 => {
            let mut i: ClientCertificateInput = typed("input", value)?;
            check_platform("input.operating_system", &i.operating_system)?;
            i.certificate_id =
                check_sha256("input.certificate_id", &i.certificate_id).map_err(|_| {
                    err(
                        "input.certificate_id",
                        "expected the hex SHA-256 of the signing CA's certificate in DER \
                         (waygate ca show | openssl x509 -outform der | sha256sum)",
                    )
                })?;
            if let Some(cn) = &i.cn {
                if !text_ok(cn) {
                    return Err(err("input.cn", "expected a common name"));
                }
            }
            for (n, eku) in i.extended_key_usage.iter().enumerate() {
                if !["clientAuth", "emailProtection"].contains(&eku.as_str()) {
                    return Err(err(
                        format!("input.extended_key_usage[{n}]"),
                        format!("{eku:?} is not clientAuth or emailProtection"),
                    ));
                }
            }
            if i.check_private_key == Some(true) {
                return Err(err(
                    "input.check_private_key",
                    "the client never reads private keys; leave it out or false",
                ));
            }
            if i.subject_alternative_names.is_some() {
                return Err(err(
                    "input.subject_alternative_names",
                    "not supported; match on cn",
                ));
            }
            if !i.locations.trust_stores.is_empty() {
                return Err(err(
                    "input.locations.trust_stores",
                    "trust stores are a Windows and macOS check; give PEM files in locations.paths",
                ));
            }
            if i.locations.paths.is_empty() {
                return Err(err(
                    "input.locations.paths",
                    "required on Linux: the PEM files to look in",
                ));
            }
            for (n, path) in i.locations.paths.iter().enumerate() {
                check_path(&format!("input.locations.paths[{n}]"), path)?;
            }
            Input::ClientCertificate(i)
        }
    })
}

/// The keys a rule may have; any other is refused by name.
const RULE_KEYS: [&str; 8] = [
    "id",
    "name",
    "description",
    "type",
    "schedule",
    "expiration",
    "match",
    "input",
];

fn string_field(
    obj: &serde_json::Map<String, Json>,
    key: &str,
) -> Result<Option<String>, PostureError> {
    match obj.get(key) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(err(key, "expected a string")),
    }
}

/// Checks one rule in Cloudflare's JSON. `new_id` gives the id when the rule has none. Schedule
/// defaults to [`DEFAULT_SCHEDULE`]; an `input` path, hash, version or operator that cannot be
/// checked is refused, naming the field.
pub fn parse_rule(
    value: Json,
    new_id: impl FnOnce() -> String,
) -> Result<PostureRule, PostureError> {
    let Json::Object(mut obj) = value else {
        return Err(err("body", "expected one posture rule, a JSON object"));
    };
    if let Some(unknown) = obj.keys().find(|k| !RULE_KEYS.contains(&k.as_str())) {
        return Err(err(
            unknown.clone(),
            format!("unknown field; a posture rule has {}", RULE_KEYS.join(", ")),
        ));
    }
    let id = match string_field(&obj, "id")? {
        Some(id) if !text_ok(&id) || id.len() > 128 => {
            return Err(err(
                "id",
                "expected 1 to 128 characters without control characters",
            ))
        }
        Some(id) => id,
        None => new_id(),
    };
    let name = string_field(&obj, "name")?.ok_or_else(|| err("name", "required"))?;
    if !text_ok(&name) || name.len() > 256 {
        return Err(err(
            "name",
            "expected 1 to 256 characters without control characters",
        ));
    }
    let description = string_field(&obj, "description")?.unwrap_or_default();
    if description.len() > MAX_TEXT {
        return Err(err("description", format!("longer than {MAX_TEXT} bytes")));
    }
    let type_name = string_field(&obj, "type")?.ok_or_else(|| err("type", "required"))?;
    if type_name == "client_certificate" {
        return Err(err(
            "type",
            "client_certificate names no file a Linux client could read; use client_certificate_v2 \
             with input.locations.paths",
        ));
    }
    let kind = CheckType::ALL
        .iter()
        .find(|(n, _)| *n == type_name)
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            err(
                "type",
                format!(
                    "{type_name:?} is not a type a Linux client can check; use one of {}",
                    CheckType::ALL.map(|(n, _)| n).join(", ")
                ),
            )
        })?;
    let schedule = string_field(&obj, "schedule")?
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_SCHEDULE.to_string());
    match parse_duration(&schedule) {
        Some(s) if s >= MIN_INTERVAL_SECS => {}
        _ => {
            return Err(err(
                "schedule",
                format!("{schedule:?} is not a duration of at least 1m (such as 5m, 1h, 24h)"),
            ))
        }
    }
    let expiration = string_field(&obj, "expiration")?.unwrap_or_default();
    if !expiration.is_empty() {
        match parse_duration(&expiration) {
            Some(s) if s >= MIN_INTERVAL_SECS => {}
            _ => {
                return Err(err(
                    "expiration",
                    format!(
                    "{expiration:?} is not a duration of at least 1m (such as 10m, 1h), or empty"
                ),
                ))
            }
        }
    }
    let platforms: Vec<PlatformMatch> = match obj.remove("match") {
        None | Some(Json::Null) => Vec::new(),
        Some(v) => typed("match", v)?,
    };
    for (n, p) in platforms.iter().enumerate() {
        if !PLATFORMS.contains(&p.platform.as_str()) {
            return Err(err(
                format!("match[{n}].platform"),
                format!("{:?} is not one of {}", p.platform, PLATFORMS.join(", ")),
            ));
        }
    }
    let input = parse_input(
        kind,
        obj.remove("input")
            .ok_or_else(|| err("input", "required"))?,
    )?;
    Ok(PostureRule {
        id,
        name,
        description,
        kind,
        schedule,
        expiration,
        platforms,
        input,
    })
}

impl PostureRule {
    /// Whether the rule applies to a device on `platform` (an empty `match` applies to all).
    pub fn applies_to(&self, platform: &str) -> bool {
        self.platforms.is_empty() || self.platforms.iter().any(|p| p.platform == platform)
    }

    /// How often clients check, in seconds.
    pub fn schedule_secs(&self) -> u64 {
        parse_duration(&self.schedule).unwrap_or(300)
    }

    /// How long a result stays valid, in seconds: `expiration`, or when it is empty twice the
    /// schedule plus [`GRACE_SECS`], so a device that stops reporting loses its passes.
    pub fn validity_secs(&self) -> u64 {
        parse_duration(&self.expiration).unwrap_or_else(|| {
            self.schedule_secs()
                .saturating_mul(2)
                .saturating_add(GRACE_SECS)
        })
    }
}

/// Whether a stored result counts as passed at `now` (unix seconds): a pass whose `expires_at`
/// has come counts as failed.
pub fn effective(passed: bool, expires_at: Option<i64>, now: i64) -> bool {
    passed && expires_at.is_none_or(|at| now < at)
}

/// A file as the client found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFact {
    /// The path asked for.
    pub path: String,
    /// Whether it exists (and is a regular file).
    pub exists: bool,
    /// Its hex SHA-256, when it exists and could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// An executable path as the client found it among running processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessFact {
    /// The path asked for.
    pub path: String,
    /// Whether some process runs it (`/proc/PID/exe`).
    pub running: bool,
    /// The hex SHA-256 of the executable, when it runs and could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// A mount point as the client found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskFact {
    /// The mount point asked for.
    pub mount: String,
    /// Whether its block device lies on a dm-crypt device.
    pub encrypted: bool,
}

/// A PEM file as the client found it: its certificates only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFact {
    /// The path asked for.
    pub path: String,
    /// The file's `CERTIFICATE` blocks (never a key), when it exists and has any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pem: Option<String>,
}

/// Longest `pem` of a certificate fact (a leaf and a few chain certificates fit many times).
pub const MAX_PEM: usize = 64 * 1024;

/// What a client reports about itself (`POST /v1/posture`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Facts {
    /// `linux` (a rule's `match` platform).
    #[serde(default)]
    pub platform: String,
    /// The client's version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_version: Option<String>,
    /// `uname -r`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// `ID` of `/etc/os-release`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_distro_name: Option<String>,
    /// `VERSION_ID` of `/etc/os-release`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_distro_revision: Option<String>,
    /// The system serial number (`/sys/class/dmi/id/product_serial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_number: Option<String>,
    /// Files asked for.
    #[serde(default)]
    pub files: Vec<FileFact>,
    /// Executables asked for.
    #[serde(default)]
    pub processes: Vec<ProcessFact>,
    /// Mount points asked for.
    #[serde(default)]
    pub disks: Vec<DiskFact>,
    /// Certificate files asked for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateFact>,
}

/// Reads a report, refusing unknown keys, oversized lists and malformed hashes by field.
pub fn parse_facts(body: &[u8]) -> Result<Facts, PostureError> {
    let mut facts: Facts = serde_json::from_slice(body).map_err(|e| err("body", e.to_string()))?;
    for (what, n) in [
        ("files", facts.files.len()),
        ("processes", facts.processes.len()),
        ("disks", facts.disks.len()),
        ("certificates", facts.certificates.len()),
    ] {
        if n > MAX_FACTS {
            return Err(err(what, format!("{n} entries; at most {MAX_FACTS}")));
        }
    }
    for (n, f) in facts.files.iter_mut().enumerate() {
        if let Some(h) = &f.sha256 {
            f.sha256 = Some(check_sha256(&format!("files[{n}].sha256"), h)?);
        }
    }
    for (n, c) in facts.certificates.iter().enumerate() {
        if c.pem.as_ref().is_some_and(|p| p.len() > MAX_PEM) {
            return Err(err(
                format!("certificates[{n}].pem"),
                format!("longer than {MAX_PEM} bytes"),
            ));
        }
    }
    for (n, p) in facts.processes.iter_mut().enumerate() {
        if let Some(h) = &p.sha256 {
            p.sha256 = Some(check_sha256(&format!("processes[{n}].sha256"), h)?);
        }
    }
    Ok(facts)
}

/// What clients must look at for `rules`: the paths, executables and mount points they name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// Files (for `file` rules).
    pub files: Vec<String>,
    /// Executables (for `application` rules).
    pub processes: Vec<String>,
    /// Mount points (for `disk_encryption` rules).
    pub disks: Vec<String>,
    /// The serial number is needed.
    pub serial: bool,
    /// Certificate files (for `client_certificate_v2` rules).
    pub certificates: Vec<String>,
}

/// What facts the rules need, each path once.
pub fn wanted<'a>(rules: impl IntoIterator<Item = &'a PostureRule>) -> Wanted {
    let mut w = Wanted::default();
    let push = |list: &mut Vec<String>, v: &str| {
        if !list.iter().any(|x| x == v) {
            list.push(v.to_string());
        }
    };
    for rule in rules {
        match &rule.input {
            Input::File(i) => push(&mut w.files, &i.path),
            Input::Application(i) => push(&mut w.processes, &i.path),
            Input::DiskEncryption(i) => {
                if i.check_disks.is_empty() {
                    push(&mut w.disks, "/");
                }
                for d in &i.check_disks {
                    push(&mut w.disks, d);
                }
            }
            Input::SerialNumber(_) => w.serial = true,
            Input::ClientCertificate(i) => {
                for p in &i.locations.paths {
                    push(&mut w.certificates, p);
                }
            }
            Input::OsVersion(_) | Input::ClientVersion(_) => {}
        }
    }
    w
}

/// The gateway's verdict on one rule, with the reason kept for audit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether the check passed.
    pub passed: bool,
    /// Why, in words (`file /etc/x exists with the required sha256`).
    pub reason: String,
}

fn verdict(passed: bool, reason: impl Into<String>) -> Verdict {
    Verdict {
        passed,
        reason: reason.into(),
    }
}

fn versions_hold(fact: Option<&str>, operator: &str, wanted: &str) -> Option<bool> {
    let have = parse_version(fact?)?;
    let want = parse_version(wanted)?;
    Some(compare(&have, Operator::parse(operator)?, &want))
}

/// What evaluation needs from the gateway besides the facts.
pub struct Env<'a> {
    /// The time (unix seconds) certificates must be valid at.
    pub now: i64,
    /// The items of the list of type SERIAL with this id (`None`: no such list).
    pub serials: &'a dyn Fn(&str) -> Option<Vec<String>>,
    /// The CA certificate (DER) whose SHA-256 is this `certificate_id` (`None`: unknown).
    pub ca: &'a dyn Fn(&str) -> Option<Vec<u8>>,
}

/// Evaluates `rule` on `facts` in `env`. A fact the report lacks fails the check.
pub fn evaluate(rule: &PostureRule, facts: &Facts, env: &Env<'_>) -> Verdict {
    let serials = env.serials;
    if !rule.applies_to(&facts.platform) {
        return verdict(
            false,
            format!("the rule does not apply to platform {:?}", facts.platform),
        );
    }
    match &rule.input {
        Input::File(i) => {
            let Some(f) = facts.files.iter().find(|f| f.path == i.path) else {
                return verdict(false, format!("no report on file {}", i.path));
            };
            match (i.exists, f.exists, &i.sha256) {
                (false, false, _) => verdict(true, format!("file {} is absent", i.path)),
                (false, true, _) => verdict(false, format!("file {} exists", i.path)),
                (true, false, _) => verdict(false, format!("file {} is missing", i.path)),
                (true, true, None) => verdict(true, format!("file {} exists", i.path)),
                (true, true, Some(want)) if f.sha256.as_deref() == Some(want.as_str()) => {
                    verdict(true, format!("file {} has sha256 {want}", i.path))
                }
                (true, true, Some(_)) => verdict(
                    false,
                    format!(
                        "file {} has sha256 {}",
                        i.path,
                        f.sha256.as_deref().unwrap_or("(unreadable)")
                    ),
                ),
            }
        }
        Input::Application(i) => {
            let Some(p) = facts.processes.iter().find(|p| p.path == i.path) else {
                return verdict(false, format!("no report on application {}", i.path));
            };
            match (&i.sha256, p.running) {
                (_, false) => verdict(false, format!("{} is not running", i.path)),
                (None, true) => verdict(true, format!("{} is running", i.path)),
                (Some(want), true) if p.sha256.as_deref() == Some(want.as_str()) => {
                    verdict(true, format!("{} is running with sha256 {want}", i.path))
                }
                (Some(_), true) => verdict(
                    false,
                    format!(
                        "{} is running with sha256 {}",
                        i.path,
                        p.sha256.as_deref().unwrap_or("(unreadable)")
                    ),
                ),
            }
        }
        Input::OsVersion(i) => {
            let kernel = facts.kernel.as_deref();
            match versions_hold(kernel, &i.operator, &i.version) {
                Some(true) => {}
                Some(false) => {
                    return verdict(
                        false,
                        format!(
                            "kernel {} is not {} {}",
                            kernel.unwrap_or(""),
                            i.operator,
                            i.version
                        ),
                    )
                }
                None => return verdict(false, "no readable kernel version in the report"),
            }
            if let Some(name) = &i.os_distro_name {
                let have = facts.os_distro_name.as_deref().unwrap_or("");
                if !have.eq_ignore_ascii_case(name) {
                    return verdict(false, format!("distribution {have:?} is not {name:?}"));
                }
            }
            if let Some(rev) = &i.os_distro_revision {
                let have = facts.os_distro_revision.as_deref();
                if versions_hold(have, &i.operator, rev) != Some(true) {
                    return verdict(
                        false,
                        format!(
                            "distribution revision {:?} is not {} {rev}",
                            have.unwrap_or(""),
                            i.operator
                        ),
                    );
                }
            }
            verdict(
                true,
                format!(
                    "kernel {} {} {}",
                    kernel.unwrap_or(""),
                    i.operator,
                    i.version
                ),
            )
        }
        Input::DiskEncryption(i) => {
            let root = ["/".to_string()];
            let disks: &[String] = if i.check_disks.is_empty() {
                &root
            } else {
                &i.check_disks
            };
            let encrypted = |d: &String| facts.disks.iter().any(|f| &f.mount == d && f.encrypted);
            let ok = if i.require_all {
                disks.iter().all(encrypted)
            } else {
                disks.iter().any(encrypted)
            };
            let listed: Vec<&str> = disks
                .iter()
                .filter(|d| encrypted(d))
                .map(String::as_str)
                .collect();
            verdict(
                ok,
                format!(
                    "encrypted: [{}] of [{}]",
                    listed.join(", "),
                    disks.join(", ")
                ),
            )
        }
        Input::SerialNumber(i) => {
            let Some(serial) = facts.serial_number.as_deref().filter(|s| !s.is_empty()) else {
                return verdict(false, "no serial number in the report");
            };
            match serials(&i.id) {
                None => verdict(false, format!("list {} does not exist", i.id)),
                Some(items) if items.iter().any(|s| s == serial) => {
                    verdict(true, format!("serial {serial} is in list {}", i.id))
                }
                Some(_) => verdict(false, format!("serial {serial} is not in list {}", i.id)),
            }
        }
        Input::ClientCertificate(i) => {
            let Some(ca) = (env.ca)(&i.certificate_id) else {
                return verdict(
                    false,
                    format!("no CA with certificate_id {}", i.certificate_id),
                );
            };
            let mut why = Vec::new();
            for path in &i.locations.paths {
                let pem = facts
                    .certificates
                    .iter()
                    .find(|c| &c.path == path)
                    .and_then(|c| c.pem.as_deref());
                let Some(pem) = pem else {
                    why.push(format!("no certificate at {path}"));
                    continue;
                };
                match certificate::find_signed(pem, &ca, i, env.now) {
                    Ok(cn) => {
                        return verdict(
                            true,
                            format!(
                                "certificate CN={cn} at {path} is signed by CA {}",
                                i.certificate_id
                            ),
                        )
                    }
                    Err(e) => why.push(format!("{path}: {e}")),
                }
            }
            verdict(false, why.join("; "))
        }
        Input::ClientVersion(i) => {
            let have = facts.client_version.as_deref();
            match versions_hold(have, &i.operator, &i.version) {
                Some(ok) => verdict(
                    ok,
                    format!(
                        "client {} {} {} {}",
                        have.unwrap_or(""),
                        if ok { "is" } else { "is not" },
                        i.operator,
                        i.version
                    ),
                ),
                None => verdict(false, "no readable client version in the report"),
            }
        }
    }
}

#[cfg(test)]
mod tests;
