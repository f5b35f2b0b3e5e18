//! The device registry: an embedded SQLite database at `<data_dir>/registry.db`.
//!
//! Inputs: enrollments and revocations from the `waygate device` CLI and the admin API,
//! last-seen times from the running server, the rules, lists and admin tokens the API manages,
//! enrollment tokens (`waygate token`) and their uses by the enrollment listener.
//! Outputs: the device set the server's WireGuard endpoint accepts, and the rules it runs when
//! no rules file is configured (polled through [`Registry::policy_counter`]).
//!
//! The CLI and the server open the same file at the same time, each with its own [`Registry`]
//! (one connection): the database runs in WAL mode (readers never block the writer) with a busy
//! timeout, and every write is an IMMEDIATE transaction, so two enrollments racing for the next
//! free address serialize instead of failing. The server notices changes made by any process by
//! polling [`Registry::change_counter`], a generation number that SQL triggers bump whenever a
//! device row or a device's groups change (except `last_seen`, which the server itself writes).
//!
//! Revoked devices stay in the table (with `revoked_at`) and keep their name, public key and
//! addresses, so none of them is handed to a new device while logs may still refer to the old one.

#![deny(missing_docs)]

mod alloc;
pub mod datadir;
mod enroll_tokens;
mod identity;
mod migrations;
mod policy_store;
mod posture;
mod tokens;
pub mod validate;
mod vnets;

pub use enroll_tokens::StoredEnrollToken;
pub use identity::{parse_attribute, Group};
pub use policy_store::{NewListItem, StoredList, StoredListItem, StoredRule};
pub use posture::{PostureResult, StoredPostureRule};
pub use tokens::{StoredToken, TokenScope};
pub use vnets::{Vnet, VnetRoute};
pub use waygate_model::IdentityExtras;

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};
use serde::{Deserialize, Serialize};
use waygate_keys::PublicKey;

use waygate_config::TunnelConfig;

/// File name of the registry inside the data directory.
pub const REGISTRY_FILE: &str = "registry.db";

/// How long a statement waits for another process's write transaction before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Refuses a missing or empty `registry.db` beside an existing server key (see
/// [`RegistryError::Lost`]). A new data directory gets its registry before its key (the server
/// and the CLI open the registry first), so only a lost registry looks like this.
fn refuse_lost(data_dir: &Path, path: &Path) -> Result<(), RegistryError> {
    let key = datadir::server_key_path(data_dir);
    if !key.exists() {
        return Ok(());
    }
    let state = match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => "is missing",
        Ok(meta) if meta.len() == 0 => "is empty (0 bytes)",
        // Readable or not, SQLite says what is wrong with it.
        _ => return Ok(()),
    };
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    Err(RegistryError::Lost {
        path: path.to_path_buf(),
        key,
        state,
        wal: Path::new(&wal).exists(),
    })
}

/// Opens the connection in WAL mode and migrates the schema: every step that writes the file.
fn open_connection(path: &Path) -> Result<Connection, RegistryError> {
    let conn = Connection::open(path).map_err(|source| RegistryError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(RegistryError::NoWal {
            path: path.to_path_buf(),
            mode,
        });
    }
    // NORMAL is durable across process crashes in WAL mode; only a power cut may lose the
    // last commits, which a re-run of the CLI fixes.
    conn.execute_batch("PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;")?;
    migrations::migrate(&conn, path)?;
    Ok(conn)
}

/// Turns SQLite's "disk I/O error" (seen as "... xShmMap" on a full disk) or "database or disk
/// is full" while opening into an error that names the file and the likely cause.
fn on_open_error(path: &Path, err: RegistryError) -> RegistryError {
    let sqlite = match &err {
        RegistryError::Open { source, .. } | RegistryError::Sqlite(source) => source,
        _ => return err,
    };
    match sqlite.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DiskFull | rusqlite::ErrorCode::SystemIoFailure) => {
            RegistryError::Storage {
                path: path.to_path_buf(),
                free_bytes: path.parent().and_then(free_bytes),
                detail: sqlite.to_string(),
            }
        }
        _ => err,
    }
}

/// Bytes an unprivileged user may still write on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is NUL-terminated and outlives the call; statvfs fills `st` when it
    // returns 0, and only then is it read.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Most `-N` suffixes tried when deriving a default device name.
const MAX_NAME_SUFFIX: u32 = 99_999;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The data directory or database file could not be created.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The directory or file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// SQLite failed to open the database.
    #[error("cannot open registry {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The database could not be switched to WAL mode (needed for concurrent CLI and server).
    #[error("registry {path}: cannot enable WAL mode (journal mode stays {mode:?}); is the data directory on a network file system?")]
    NoWal {
        /// The database file.
        path: PathBuf,
        /// The journal mode SQLite reported.
        mode: String,
    },
    /// The schema was written by a newer (or foreign) program.
    #[error("registry {path} has schema version {found}, this waygate supports up to {supported}; upgrade waygate")]
    SchemaTooNew {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` found.
        found: i64,
        /// Highest version this build knows.
        supported: i64,
    },
    /// `registry.db` is missing or empty while the data directory holds a server key: the
    /// registry was lost, and starting an empty one would lock every device out.
    #[error(
        "registry {path} {state}, but the data directory holds a server key ({key}): the \
         registry was lost or truncated. Starting an empty one would lock out every enrolled \
         device and hand their addresses out again, so waygate refuses.{wal} Restore {path} \
         from a backup; or, to start over with a new key and no devices on purpose, move the \
         key away (mv {key} {key}.old) and run again",
        wal = if *.wal { " Its -wal file is still there: keep it beside the restored database." } else { "" }
    )]
    Lost {
        /// The database file.
        path: PathBuf,
        /// The server key beside it.
        key: PathBuf,
        /// "is missing" or "is empty (0 bytes)".
        state: &'static str,
        /// Whether `registry.db-wal` still exists.
        wal: bool,
    },
    /// SQLite could not write the database or its -wal/-shm files: usually a full disk.
    #[error(
        "cannot open registry {path}: {free}the disk may be full (or failing); free space and \
         run again. SQLite said: {detail}",
        free = match .free_bytes { Some(b) => format!("{b} bytes free on its file system; "), None => String::new() }
    )]
    Storage {
        /// The database file.
        path: PathBuf,
        /// Space left to unprivileged users, when it could be read.
        free_bytes: Option<u64>,
        /// SQLite's message.
        detail: String,
    },
    /// Any other SQLite error.
    #[error("registry database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A stored value does not parse (the database was edited by hand, or is damaged).
    #[error("registry row {id}: column {column} holds invalid value {value:?}")]
    Corrupt {
        /// The device id.
        id: String,
        /// The column.
        column: &'static str,
        /// The stored text.
        value: String,
    },
    /// The email does not look like an email address.
    #[error("invalid email {0:?}: expected an address like alice@example.com")]
    InvalidEmail(String),
    /// The device name breaks the naming rule.
    #[error("invalid device name {0:?}: expected 1 to 64 of [A-Za-z0-9._-]")]
    InvalidName(String),
    /// A group, user name or virtual network id is empty, too long or has control characters.
    #[error("invalid {what} {value:?}: expected 1 to 128 characters without control characters or surrounding spaces")]
    InvalidLabel {
        /// Which field.
        what: &'static str,
        /// The value given.
        value: String,
    },
    /// Another device (maybe revoked) already has this name.
    #[error("device name {name:?} is already taken by {} device {id}", if *.revoked { "revoked" } else { "active" })]
    NameTaken {
        /// The name.
        name: String,
        /// The device holding it.
        id: String,
        /// Whether that device is revoked (revoked devices keep their names).
        revoked: bool,
    },
    /// Another device (maybe revoked) already has this public key.
    #[error("public key {public_key} is already enrolled as {} device {name} ({id}); every device needs its own key", if *.revoked { "revoked" } else { "active" })]
    PublicKeyTaken {
        /// The key.
        public_key: PublicKey,
        /// The device holding it.
        name: String,
        /// Its id.
        id: String,
        /// Whether that device is revoked (a revoked key is never accepted again).
        revoked: bool,
    },
    /// No free tunnel address is left.
    #[error("tunnel pool {pool} has no free address left")]
    PoolExhausted {
        /// The pool.
        pool: String,
    },
    /// No device has this id, name or public key.
    #[error("no device with id, name or public key {0:?}")]
    NotFound(String),
    /// More than one device matches (e.g. one's name is another's id).
    #[error("{needle:?} matches several devices: {}; use the id", .matches.join(", "))]
    Ambiguous {
        /// What was looked up.
        needle: String,
        /// `id (name)` of each match.
        matches: Vec<String>,
    },
    /// No virtual network has this id or name.
    #[error("no virtual network with id or name {0:?}")]
    VnetNotFound(String),
    /// Another virtual network has this name.
    #[error("virtual network name {0:?} is already taken")]
    VnetNameTaken(String),
    /// Devices still belong to the virtual network.
    #[error("virtual network {name} is used by {} device(s): {}; move them first (waygate device set-vnet)", .devices.len(), .devices.join(", "))]
    VnetInUse {
        /// Its name.
        name: String,
        /// Names of the devices in it.
        devices: Vec<String>,
    },
    /// A route is malformed.
    #[error("invalid route {0:?}: expected CIDR=INTERFACE, e.g. 198.18.0.0/16=site-a")]
    InvalidRoute(String),
    /// No group has this id or name.
    #[error("no group with id or name {0:?}")]
    GroupNotFound(String),
    /// A group already has this name or id.
    #[error("group {0:?} already has this name or id")]
    GroupTaken(String),
    /// An attribute is not `name=value`.
    #[error("invalid attribute {0:?}: expected NAME=VALUE, e.g. department=engineering")]
    InvalidAttribute(String),
    /// No rule has this id.
    #[error("no rule with id {0:?}")]
    RuleNotFound(String),
    /// No device posture rule has this id.
    #[error("no posture rule with id {0:?}")]
    PostureRuleNotFound(String),
    /// No list has this id or name.
    #[error("no list with id or name {0:?}")]
    ListNotFound(String),
    /// Another list has this name.
    #[error("list name {0:?} is already taken")]
    ListNameTaken(String),
    /// A rule or list with this id exists already.
    #[error("id {0:?} is already taken")]
    IdTaken(String),
    /// No admin token has this id or prefix.
    #[error("no admin token with id or prefix {0:?}")]
    TokenNotFound(String),
    /// No active enrollment token has this id or prefix.
    #[error("no active enrollment token with id or prefix {0:?}")]
    EnrollTokenNotFound(String),
    /// The device was revoked before.
    #[error("device {name} ({id}) was already revoked at {revoked_at}")]
    AlreadyRevoked {
        /// Its name.
        name: String,
        /// Its id.
        id: String,
        /// When (unix seconds).
        revoked_at: i64,
    },
}

/// What `enroll` needs to know about a new device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    /// Device name; `None` derives one from the email.
    pub name: Option<String>,
    /// The user's email.
    pub email: String,
    /// The user's display name.
    pub user_name: Option<String>,
    /// The user's groups.
    pub groups: Vec<String>,
    /// The user's attributes, `name=value`.
    pub attributes: Vec<String>,
    /// Virtual network the device starts in.
    pub vnet_id: Option<String>,
    /// The device's WireGuard public key.
    pub public_key: PublicKey,
}

/// An enrolled device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Random UUID (v4).
    pub id: String,
    /// Unique name.
    pub name: String,
    /// WireGuard public key.
    pub public_key: PublicKey,
    /// Tunnel IPv4 address (a /32 inside the tunnel).
    pub ipv4: Ipv4Addr,
    /// Tunnel IPv6 address (a /128 inside the tunnel).
    pub ipv6: Ipv6Addr,
    /// The user's email.
    pub email: String,
    /// The user's display name.
    pub user_name: Option<String>,
    /// The user's groups, in the order given at enrollment.
    pub groups: Vec<String>,
    /// Virtual network id.
    pub vnet_id: Option<String>,
    /// Enrollment time (unix seconds).
    pub created_at: i64,
    /// Last time traffic was seen from it (unix seconds).
    pub last_seen: Option<i64>,
    /// The address (IP and UDP port) it was last seen at.
    pub last_endpoint: Option<SocketAddr>,
    /// Revocation time (unix seconds); revoked devices are refused.
    pub revoked_at: Option<i64>,
    /// Group ids and emails, the user's attributes, posture results.
    #[serde(flatten)]
    pub extras: IdentityExtras,
}

/// A device seen by the server: what [`Registry::record_last_seen`] writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The device's id.
    pub device_id: String,
    /// When (unix seconds).
    pub at: i64,
    /// Where from, when known.
    pub endpoint: Option<SocketAddr>,
}

impl Device {
    /// Whether the device may connect.
    pub fn is_active(&self) -> bool {
        self.revoked_at.is_none()
    }
}

/// An open registry: one SQLite connection. `Send`, not `Sync`; open one per thread or process.
#[derive(Debug)]
pub struct Registry {
    conn: Connection,
    path: PathBuf,
    tunnel: TunnelConfig,
    /// The time (unix seconds) that decides which posture passes have expired when devices
    /// are read; `None`: SQLite's clock, so reading a device never needs a time passed in.
    posture_now: Option<i64>,
}

const DEVICE_COLUMNS: &str = "id, name, public_key, ipv4, ipv6, email, user_name, vnet_id, \
                              created_at, last_seen, revoked_at, last_endpoint";

/// A device row as stored, before its text columns are parsed.
struct Row {
    id: String,
    name: String,
    public_key: String,
    ipv4: String,
    ipv6: String,
    email: String,
    user_name: Option<String>,
    vnet_id: Option<String>,
    created_at: i64,
    last_seen: Option<i64>,
    revoked_at: Option<i64>,
    last_endpoint: Option<String>,
}

impl Row {
    fn read(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
        Ok(Row {
            id: r.get(0)?,
            name: r.get(1)?,
            public_key: r.get(2)?,
            ipv4: r.get(3)?,
            ipv6: r.get(4)?,
            email: r.get(5)?,
            user_name: r.get(6)?,
            vnet_id: r.get(7)?,
            created_at: r.get(8)?,
            last_seen: r.get(9)?,
            revoked_at: r.get(10)?,
            last_endpoint: r.get(11)?,
        })
    }

    fn into_device(
        self,
        groups: Vec<String>,
        extras: IdentityExtras,
    ) -> Result<Device, RegistryError> {
        fn parse<T: std::str::FromStr>(
            id: &str,
            column: &'static str,
            value: &str,
        ) -> Result<T, RegistryError> {
            value.parse().map_err(|_| RegistryError::Corrupt {
                id: id.to_string(),
                column,
                value: value.to_string(),
            })
        }
        Ok(Device {
            public_key: parse(&self.id, "public_key", &self.public_key)?,
            ipv4: parse(&self.id, "ipv4", &self.ipv4)?,
            ipv6: parse(&self.id, "ipv6", &self.ipv6)?,
            id: self.id,
            name: self.name,
            email: self.email,
            user_name: self.user_name,
            groups,
            vnet_id: self.vnet_id,
            created_at: self.created_at,
            last_seen: self.last_seen,
            // Only a hint for reconnecting: an unreadable value is as good as none.
            last_endpoint: self.last_endpoint.and_then(|e| e.parse().ok()),
            revoked_at: self.revoked_at,
            extras,
        })
    }
}

impl Registry {
    /// Opens `<data_dir>/registry.db`, creating the directory (0700) and the database (0600)
    /// when missing, and migrating the schema.
    pub fn open(data_dir: &Path, tunnel: &TunnelConfig) -> Result<Registry, RegistryError> {
        datadir::ensure_data_dir(data_dir).map_err(|e| match e {
            datadir::DataDirError::CreateDir { path, source } => {
                RegistryError::Create { path, source }
            }
            other => RegistryError::Create {
                path: data_dir.to_path_buf(),
                source: io::Error::other(other.to_string()),
            },
        })?;
        let path = data_dir.join(REGISTRY_FILE);
        refuse_lost(data_dir, &path)?;
        // SQLite would create the file with the umask's mode; emails and group memberships are
        // nobody else's business. Its -wal and -shm files inherit the database's mode.
        // Only a missing file is opened here: closing any descriptor of the database drops
        // every POSIX lock this process holds on it, including those of the connections other
        // threads already have open (the gateway keeps several). Another process closing its
        // connection would then think it was the last one, checkpoint and delete the -wal file
        // under them, and their later commits would go to the deleted file and be lost.
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(RegistryError::Create {
                    path: path.clone(),
                    source,
                })
            }
        }
        let conn = open_connection(&path).map_err(|e| on_open_error(&path, e))?;
        Ok(Registry {
            conn,
            path,
            tunnel: tunnel.clone(),
            posture_now: None,
        })
    }

    /// Fixes the time (unix seconds) that decides which posture passes have expired when
    /// devices are read (tests); `None`: the system clock.
    pub fn set_posture_now(&mut self, now: Option<i64>) {
        self.posture_now = now;
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Enrolls a device: validates the input, picks a unique name if none was given, allocates
    /// the lowest free IPv4 and IPv6 tunnel addresses, and stores it.
    pub fn enroll(&self, new: NewDevice, now_unix: i64) -> Result<Device, RegistryError> {
        let tx = self.write_tx()?;
        let mut alloc = self.allocator(&tx)?;
        let mut device = self.enroll_in(&tx, new, now_unix, &mut alloc)?;
        tx.commit()?;
        // Group ids and emails come from the groups table: read them back.
        device.extras = self
            .extras(Some(&device.id))?
            .remove(&device.id)
            .unwrap_or_default();
        Ok(device)
    }

    /// Enrolls many devices in one transaction, each as [`Registry::enroll`] would: all are
    /// stored or, at the first refusal, none. For a fleet import or a load test: 100,000
    /// devices one transaction apiece take minutes, here seconds.
    pub fn enroll_many(
        &self,
        news: Vec<NewDevice>,
        now_unix: i64,
    ) -> Result<Vec<Device>, RegistryError> {
        let tx = self.write_tx()?;
        let mut alloc = self.allocator(&tx)?;
        let mut devices = Vec::with_capacity(news.len());
        for new in news {
            devices.push(self.enroll_in(&tx, new, now_unix, &mut alloc)?);
        }
        tx.commit()?;
        let mut extras = self.extras(None)?;
        for d in &mut devices {
            d.extras = extras.remove(&d.id).unwrap_or_default();
        }
        Ok(devices)
    }

    /// One enrollment inside `tx`, addresses from `alloc`; extras left empty.
    fn enroll_in(
        &self,
        tx: &Transaction<'_>,
        new: NewDevice,
        now_unix: i64,
        alloc: &mut alloc::Allocator,
    ) -> Result<Device, RegistryError> {
        if !validate::email_ok(&new.email) {
            return Err(RegistryError::InvalidEmail(new.email));
        }
        if let Some(name) = &new.name {
            if !validate::name_ok(name) {
                return Err(RegistryError::InvalidName(name.clone()));
            }
        }
        let mut groups: Vec<String> = Vec::with_capacity(new.groups.len());
        for group in new.groups {
            check_label("group", &group)?;
            if !groups.contains(&group) {
                groups.push(group);
            }
        }
        if let Some(user_name) = &new.user_name {
            check_label("user name", user_name)?;
        }
        let attributes = new
            .attributes
            .iter()
            .map(|a| parse_attribute(a))
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(vnet) = &new.vnet_id {
            check_label("virtual network", vnet)?;
        }

        let key_text = new.public_key.to_base64();
        let holder = tx
            .query_row(
                "SELECT id, name, revoked_at FROM devices WHERE public_key = ?1",
                [&key_text],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                },
            )
            .optional()?;
        if let Some((id, name, revoked_at)) = holder {
            return Err(RegistryError::PublicKeyTaken {
                public_key: new.public_key,
                name,
                id,
                revoked: revoked_at.is_some(),
            });
        }
        let name = match new.name {
            Some(name) => {
                if let Some((id, revoked)) = name_holder(tx, &name)? {
                    return Err(RegistryError::NameTaken { name, id, revoked });
                }
                name
            }
            None => default_name(tx, &new.email)?,
        };
        let (ipv4, ipv6) = self.allocate(alloc)?;
        let id = new_uuid(&mut rand::rngs::OsRng);
        tx.execute(
            &format!(
                "INSERT INTO devices ({DEVICE_COLUMNS}) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, NULL, NULL)"
            ),
            params![
                id,
                name,
                key_text,
                ipv4.to_string(),
                ipv6.to_string(),
                new.email,
                new.user_name,
                new.vnet_id,
                now_unix
            ],
        )?;
        {
            let mut insert =
                tx.prepare("INSERT INTO device_groups (device_id, name) VALUES (?1, ?2)")?;
            for group in &groups {
                insert.execute(params![id, group])?;
            }
        }
        identity::insert_attributes(tx, &id, &attributes)?;
        Ok(Device {
            id,
            name,
            public_key: new.public_key,
            ipv4,
            ipv6,
            email: new.email,
            user_name: new.user_name,
            groups,
            vnet_id: new.vnet_id,
            created_at: now_unix,
            last_seen: None,
            last_endpoint: None,
            revoked_at: None,
            extras: IdentityExtras::default(),
        })
    }

    /// Devices that may connect (not revoked), oldest first.
    pub fn active_devices(&self) -> Result<Vec<Device>, RegistryError> {
        self.query_devices("WHERE revoked_at IS NULL", [])
    }

    /// Every device, revoked ones included, oldest first.
    pub fn all_devices(&self) -> Result<Vec<Device>, RegistryError> {
        self.query_devices("", [])
    }

    /// The device whose id, name or public key is `needle` (revoked ones included).
    pub fn find(&self, needle: &str) -> Result<Device, RegistryError> {
        let mut found =
            self.query_devices("WHERE id = ?1 OR name = ?1 OR public_key = ?1", [needle])?;
        match found.len() {
            0 => Err(RegistryError::NotFound(needle.to_string())),
            1 => Ok(found.remove(0)),
            _ => Err(RegistryError::Ambiguous {
                needle: needle.to_string(),
                matches: found
                    .iter()
                    .map(|d| format!("{} ({})", d.id, d.name))
                    .collect(),
            }),
        }
    }

    /// Revokes the device `needle` names (see [`Registry::find`]); the server drops it on its
    /// next poll of [`Registry::change_counter`].
    pub fn revoke(&self, needle: &str, now_unix: i64) -> Result<Device, RegistryError> {
        let tx = self.write_tx()?;
        // Looked up inside the write transaction, so a concurrent revoke cannot slip between.
        let mut device = self.find(needle)?;
        if let Some(revoked_at) = device.revoked_at {
            return Err(RegistryError::AlreadyRevoked {
                name: device.name,
                id: device.id,
                revoked_at,
            });
        }
        tx.execute(
            "UPDATE devices SET revoked_at = ?2 WHERE id = ?1",
            params![device.id, now_unix],
        )?;
        tx.commit()?;
        device.revoked_at = Some(now_unix);
        Ok(device)
    }

    /// A number that changes whenever any process adds, revokes or changes a device. One
    /// indexed read; the server polls it (every 200 ms) and reloads the device set when it
    /// differs from the last value seen. `record_last_seen` does not change it.
    pub fn change_counter(&self) -> Result<u64, RegistryError> {
        let generation: i64 =
            self.conn
                .query_row("SELECT devices FROM generation WHERE id = 1", [], |r| {
                    r.get(0)
                })?;
        // The counter only ever grows from 0, so it is never negative.
        Ok(generation.unsigned_abs())
    }

    /// Records when (unix seconds) and from where devices were last seen; an older time than
    /// the one stored is ignored, a missing address keeps the stored one.
    pub fn record_last_seen(&self, seen: &[Seen]) -> Result<(), RegistryError> {
        if seen.is_empty() {
            return Ok(());
        }
        let tx = self.write_tx()?;
        {
            let mut update = tx.prepare(
                "UPDATE devices SET \
                   last_seen = CASE WHEN last_seen IS NULL OR last_seen < ?2 THEN ?2 \
                                    ELSE last_seen END, \
                   last_endpoint = coalesce(?3, last_endpoint) \
                 WHERE id = ?1",
            )?;
            for s in seen {
                update.execute(params![
                    s.device_id,
                    s.at,
                    s.endpoint.map(|e| e.to_string())
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Starts a write transaction that takes the database's write lock up front, so its reads
    /// (free addresses, taken names) stay true until it commits.
    fn write_tx(&self) -> Result<Transaction<'_>, RegistryError> {
        Ok(Transaction::new_unchecked(
            &self.conn,
            TransactionBehavior::Immediate,
        )?)
    }

    fn query_devices<P: rusqlite::Params>(
        &self,
        filter: &str,
        params: P,
    ) -> Result<Vec<Device>, RegistryError> {
        let mut stmt = self.conn.prepare(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices {filter} ORDER BY created_at, rowid"
        ))?;
        let rows = stmt
            .query_map(params, Row::read)?
            .collect::<Result<Vec<Row>, _>>()?;
        let mut groups = self.groups_of(&rows)?;
        // One device (a lookup) or all of them (a listing), as `groups_of` does.
        let mut extras = match rows.as_slice() {
            [] => HashMap::new(),
            [one] => self.extras(Some(&one.id))?,
            _ => self.extras(None)?,
        };
        rows.into_iter()
            .map(|row| {
                let g = groups.remove(&row.id).unwrap_or_default();
                let e = extras.remove(&row.id).unwrap_or_default();
                row.into_device(g, e)
            })
            .collect()
    }

    fn groups_of(&self, rows: &[Row]) -> Result<HashMap<String, Vec<String>>, RegistryError> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        if rows.is_empty() {
            return Ok(out);
        }
        let mut stmt = if rows.len() == 1 {
            self.conn.prepare(
                "SELECT device_id, name FROM device_groups WHERE device_id = ?1 ORDER BY rowid",
            )?
        } else {
            self.conn
                .prepare("SELECT device_id, name FROM device_groups ORDER BY rowid")?
        };
        let mut query = if rows.len() == 1 {
            stmt.query([&rows[0].id])?
        } else {
            stmt.query([])?
        };
        while let Some(r) = query.next()? {
            out.entry(r.get(0)?).or_default().push(r.get(1)?);
        }
        Ok(out)
    }

    /// An allocator over the addresses every device row holds.
    fn allocator(&self, tx: &Transaction<'_>) -> Result<alloc::Allocator, RegistryError> {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        {
            let mut stmt = tx.prepare("SELECT id, ipv4, ipv6 FROM devices")?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let id: String = r.get(0)?;
                let a: String = r.get(1)?;
                let b: String = r.get(2)?;
                let corrupt = |column, value: String| RegistryError::Corrupt {
                    id: id.clone(),
                    column,
                    value,
                };
                v4.push(
                    a.parse::<Ipv4Addr>()
                        .map_err(|_| corrupt("ipv4", a.clone()))?,
                );
                v6.push(
                    b.parse::<Ipv6Addr>()
                        .map_err(|_| corrupt("ipv6", b.clone()))?,
                );
            }
        }
        Ok(alloc::Allocator::new(
            self.tunnel.ipv4_pool,
            self.tunnel.ipv6_pool,
            v4,
            v6,
        ))
    }

    fn allocate(
        &self,
        alloc: &mut alloc::Allocator,
    ) -> Result<(Ipv4Addr, Ipv6Addr), RegistryError> {
        let ipv4 = alloc
            .take_v4()
            .ok_or_else(|| RegistryError::PoolExhausted {
                pool: self.tunnel.ipv4_pool.to_string(),
            })?;
        let ipv6 = alloc
            .take_v6()
            .ok_or_else(|| RegistryError::PoolExhausted {
                pool: self.tunnel.ipv6_pool.to_string(),
            })?;
        Ok((ipv4, ipv6))
    }
}

pub(crate) fn check_label(what: &'static str, value: &str) -> Result<(), RegistryError> {
    if validate::label_ok(value) {
        Ok(())
    } else {
        Err(RegistryError::InvalidLabel {
            what,
            value: value.to_string(),
        })
    }
}

/// `(id, revoked)` of the device named `name`, if any.
fn name_holder(tx: &Transaction<'_>, name: &str) -> Result<Option<(String, bool)>, RegistryError> {
    Ok(tx
        .query_row(
            "SELECT id, revoked_at IS NOT NULL FROM devices WHERE name = ?1",
            [name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?)
}

/// The email's local part, or `stem-2`, `stem-3`, ... whichever is free first.
fn default_name(tx: &Transaction<'_>, email: &str) -> Result<String, RegistryError> {
    let stem = validate::name_stem(email);
    if name_holder(tx, &stem)?.is_none() {
        return Ok(stem);
    }
    for n in 2..=MAX_NAME_SUFFIX {
        let candidate = format!("{stem}-{n}");
        if name_holder(tx, &candidate)?.is_none() {
            return Ok(candidate);
        }
    }
    let id = name_holder(tx, &stem)?
        .map(|(id, _)| id)
        .unwrap_or_default();
    Err(RegistryError::NameTaken {
        name: stem,
        id,
        revoked: false,
    })
}

/// A new random id for a record (a version 4 UUID).
pub fn new_id() -> String {
    new_uuid(&mut rand::rngs::OsRng)
}

/// A random (version 4) UUID in its usual text form.
pub(crate) fn new_uuid(rng: &mut impl RngCore) -> String {
    let mut b = [0u8; 16];
    rng.fill_bytes(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests;
