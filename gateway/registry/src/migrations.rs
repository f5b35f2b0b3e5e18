//! Schema migrations, tracked in `PRAGMA user_version`: migration `i` (0-based) takes the schema
//! from version `i` to `i + 1`. Append new migrations; never edit a released one.

use rusqlite::{Connection, Transaction, TransactionBehavior};

use super::RegistryError;

/// The migrations in order.
const MIGRATIONS: &[&str] = &[
    // v1: devices, their groups, and a generation counter that triggers bump on every change
    // to the device set, so every writer (this code, a future API, an operator's sqlite3
    // shell) is seen by a polling server. last_seen is left out of the UPDATE trigger on
    // purpose: the server writes it constantly and must not reload itself every time.
    r#"
    CREATE TABLE devices (
        id          TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL UNIQUE,
        public_key  TEXT NOT NULL UNIQUE,
        ipv4        TEXT NOT NULL UNIQUE,
        ipv6        TEXT NOT NULL UNIQUE,
        email       TEXT NOT NULL,
        user_name   TEXT,
        vnet_id     TEXT,
        created_at  INTEGER NOT NULL,
        last_seen   INTEGER,
        revoked_at  INTEGER
    ) STRICT;
    CREATE INDEX devices_email ON devices(email);

    CREATE TABLE device_groups (
        device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        name        TEXT NOT NULL,
        PRIMARY KEY (device_id, name)
    ) STRICT;

    CREATE TABLE generation (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        devices     INTEGER NOT NULL
    ) STRICT;
    INSERT INTO generation (id, devices) VALUES (1, 0);

    CREATE TRIGGER devices_insert AFTER INSERT ON devices
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER devices_delete AFTER DELETE ON devices
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER devices_update
    AFTER UPDATE OF id, name, public_key, ipv4, ipv6, email, user_name, vnet_id, revoked_at
    ON devices
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER device_groups_insert AFTER INSERT ON device_groups
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER device_groups_delete AFTER DELETE ON device_groups
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER device_groups_update AFTER UPDATE ON device_groups
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    "#,
    // v2: virtual networks and their private routes. Changes bump the same generation
    // counter, so a running server reloads them with the devices.
    r#"
    CREATE TABLE vnets (
        id          TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE vnet_routes (
        vnet_id     TEXT NOT NULL REFERENCES vnets(id) ON DELETE CASCADE,
        cidr        TEXT NOT NULL,
        via         TEXT NOT NULL,
        PRIMARY KEY (vnet_id, cidr)
    ) STRICT;

    CREATE TRIGGER vnets_insert AFTER INSERT ON vnets
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER vnets_delete AFTER DELETE ON vnets
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER vnets_update AFTER UPDATE ON vnets
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER vnet_routes_insert AFTER INSERT ON vnet_routes
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER vnet_routes_delete AFTER DELETE ON vnet_routes
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    "#,
    // v3: what identity and posture rules read beyond names: groups with ids and emails, the
    // user's attributes (SAML-style `name=value`) and each device's posture-check results.
    r#"
    CREATE TABLE groups (
        id          TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL UNIQUE,
        email       TEXT,
        created_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE device_attributes (
        device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        name        TEXT NOT NULL,
        value       TEXT NOT NULL,
        PRIMARY KEY (device_id, name, value)
    ) STRICT;

    CREATE TABLE device_posture (
        device_id   TEXT NOT NULL REFERENCES devices(id) ON DELETE CASCADE,
        check_id    TEXT NOT NULL,
        passed      INTEGER NOT NULL,
        reported_at INTEGER NOT NULL,
        PRIMARY KEY (device_id, check_id)
    ) STRICT;

    CREATE TRIGGER groups_insert AFTER INSERT ON groups
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER groups_delete AFTER DELETE ON groups
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER groups_update AFTER UPDATE ON groups
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER device_attributes_insert AFTER INSERT ON device_attributes
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER device_attributes_delete AFTER DELETE ON device_attributes
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER device_posture_insert AFTER INSERT ON device_posture
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER device_posture_delete AFTER DELETE ON device_posture
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    CREATE TRIGGER device_posture_update AFTER UPDATE ON device_posture
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    "#,
    // v4: the address each device was last seen at, written with last_seen (and like it left out
    // of the update trigger), so a restarted gateway can start the handshake itself.
    r#"
    ALTER TABLE devices ADD COLUMN last_endpoint TEXT;
    "#,
    // v5: rules and lists the admin API manages (when the config names no rules file), and the
    // API's bearer tokens (only their SHA-256 is kept). Rule and list changes bump a counter of
    // their own, so a running gateway recompiles its rules without reloading its devices, and
    // device changes do not recompile rules.
    r#"
    ALTER TABLE generation ADD COLUMN policy INTEGER NOT NULL DEFAULT 0;

    CREATE TABLE rules (
        id          TEXT PRIMARY KEY NOT NULL,
        body        TEXT NOT NULL,
        precedence  INTEGER NOT NULL,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        version     INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE lists (
        id          TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL UNIQUE,
        type        TEXT NOT NULL,
        description TEXT,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    ) STRICT;

    CREATE TABLE list_items (
        list_id     TEXT NOT NULL REFERENCES lists(id) ON DELETE CASCADE,
        value       TEXT NOT NULL,
        description TEXT,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (list_id, value)
    ) STRICT;

    CREATE TABLE admin_tokens (
        id          TEXT PRIMARY KEY NOT NULL,
        name        TEXT NOT NULL,
        prefix      TEXT NOT NULL,
        hash        TEXT NOT NULL UNIQUE,
        scope       TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        revoked_at  INTEGER
    ) STRICT;

    CREATE TRIGGER rules_insert AFTER INSERT ON rules
    BEGIN UPDATE generation SET policy = policy + 1 WHERE id = 1; END;
    CREATE TRIGGER rules_delete AFTER DELETE ON rules
    BEGIN UPDATE generation SET policy = policy + 1 WHERE id = 1; END;
    CREATE TRIGGER rules_update AFTER UPDATE ON rules
    BEGIN UPDATE generation SET policy = policy + 1 WHERE id = 1; END;
    CREATE TRIGGER lists_insert AFTER INSERT ON lists
    BEGIN UPDATE generation SET policy = policy + 1 WHERE id = 1; END;
    CREATE TRIGGER lists_delete AFTER DELETE ON lists
    BEGIN UPDATE generation SET policy = policy + 1 WHERE id = 1; END;
    CREATE TRIGGER lists_update AFTER UPDATE ON lists
    BEGIN UPDATE generation SET policy = policy + 1 WHERE id = 1; END;
    CREATE TRIGGER list_items_insert AFTER INSERT ON list_items
    BEGIN UPDATE generation SET policy = policy + 1 WHERE id = 1; END;
    CREATE TRIGGER list_items_delete AFTER DELETE ON list_items
    BEGIN UPDATE generation SET policy = policy + 1 WHERE id = 1; END;
    CREATE TRIGGER list_items_update AFTER UPDATE ON list_items
    BEGIN UPDATE generation SET policy = policy + 1 WHERE id = 1; END;
    "#,
    // v6: enrollment tokens (only the SHA-256 of each secret is kept), with the identity the
    // devices they enroll get, how many they may enroll and until when.
    r#"
    CREATE TABLE enroll_tokens (
        id           TEXT PRIMARY KEY NOT NULL,
        prefix       TEXT NOT NULL UNIQUE,
        hash         TEXT NOT NULL UNIQUE,
        email        TEXT NOT NULL,
        name         TEXT,
        groups       TEXT NOT NULL,
        vnet_id      TEXT,
        uses         INTEGER NOT NULL,
        used         INTEGER NOT NULL DEFAULT 0,
        expires_at   INTEGER NOT NULL,
        created_at   INTEGER NOT NULL,
        last_used_at INTEGER,
        revoked_at   INTEGER
    ) STRICT;
    "#,
    // v7: device posture rules (Cloudflare's JSON, checked, in `body`), and for each posture
    // result when it stops counting as a pass and why the gateway decided it (results the
    // gateway evaluates from a device's report expire; results an admin types in do not).
    r#"
    CREATE TABLE posture_rules (
        id          TEXT PRIMARY KEY NOT NULL,
        body        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL
    ) STRICT;

    ALTER TABLE device_posture ADD COLUMN expires_at INTEGER;
    ALTER TABLE device_posture ADD COLUMN reason TEXT;

    -- A report that only renews a result (a new expiry, the same verdict) must not reload
    -- every device: only a changed verdict bumps the generation.
    DROP TRIGGER device_posture_update;
    CREATE TRIGGER device_posture_update AFTER UPDATE OF passed ON device_posture
    BEGIN UPDATE generation SET devices = devices + 1 WHERE id = 1; END;
    "#,
];

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to [`SCHEMA_VERSION`]. Runs in one IMMEDIATE transaction, so two
/// processes opening a fresh database at once migrate it exactly once.
pub(super) fn migrate(conn: &Connection, path: &std::path::Path) -> Result<(), RegistryError> {
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if !(0..=SCHEMA_VERSION).contains(&found) {
        return Err(RegistryError::SchemaTooNew {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for sql in MIGRATIONS.iter().skip(found as usize) {
        tx.execute_batch(sql)?;
    }
    if found != SCHEMA_VERSION {
        // PRAGMA takes no bound parameters; the value is our own constant.
        tx.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    }
    tx.commit()?;
    Ok(())
}
