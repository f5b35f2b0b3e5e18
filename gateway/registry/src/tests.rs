use std::fs;
use std::os::unix::fs::PermissionsExt;

use rand::rngs::StdRng;
use rand::SeedableRng;
use waygate_keys::PrivateKey;

use super::*;
use waygate_config::Config;

fn tunnel() -> TunnelConfig {
    Config::default().tunnel
}

fn key(seed: u64) -> PublicKey {
    PrivateKey::generate(&mut StdRng::seed_from_u64(seed)).public_key()
}

fn new(email: &str, seed: u64) -> NewDevice {
    NewDevice {
        name: None,
        email: email.to_string(),
        user_name: None,
        groups: Vec::new(),
        attributes: vec![],
        vnet_id: None,
        public_key: key(seed),
    }
}

fn open(dir: &Path) -> Registry {
    Registry::open(dir, &tunnel()).unwrap()
}

/// Another process's view: a raw connection to the same file.
fn raw(dir: &Path) -> Connection {
    let conn = Connection::open(dir.join(REGISTRY_FILE)).unwrap();
    conn.busy_timeout(BUSY_TIMEOUT).unwrap();
    conn
}

#[test]
fn open_creates_private_dir_and_db_in_wal_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("waygate-data");
    let reg = open(&dir);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(reg.path()), 0o600);
    let journal: String = reg
        .conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(journal, "wal");
    let version: i64 = reg
        .conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, migrations::SCHEMA_VERSION);
    drop(reg);
    // Reopening an up-to-date database migrates nothing and keeps the data.
    let reg = open(&dir);
    reg.enroll(new("alice@example.com", 1), 100).unwrap();
    drop(reg);
    assert_eq!(open(&dir).all_devices().unwrap().len(), 1);
}

#[test]
fn newer_schema_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    drop(open(tmp.path()));
    raw(tmp.path())
        .execute_batch("PRAGMA user_version = 99")
        .unwrap();
    let err = Registry::open(tmp.path(), &tunnel()).unwrap_err();
    assert!(
        matches!(err, RegistryError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn enroll_allocates_lowest_addresses_and_default_names() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = open(tmp.path());
    let a = reg.enroll(new("alice@example.com", 1), 100).unwrap();
    let b = reg.enroll(new("alice@example.com", 2), 101).unwrap();
    let c = reg.enroll(new("bob+x@example.com", 3), 102).unwrap();
    assert_eq!(a.name, "alice");
    assert_eq!(b.name, "alice-2");
    assert_eq!(c.name, "bob-x");
    assert_eq!(a.ipv4, Ipv4Addr::new(100, 96, 0, 2));
    assert_eq!(b.ipv4, Ipv4Addr::new(100, 96, 0, 3));
    assert_eq!(c.ipv4, Ipv4Addr::new(100, 96, 0, 4));
    assert_eq!(a.ipv6.to_string(), "fd77:6761:7465::2");
    assert_eq!(c.ipv6.to_string(), "fd77:6761:7465::4");
    assert_eq!(a.created_at, 100);
    assert_eq!(a.id.len(), 36);
    assert_eq!(&a.id[14..15], "4", "UUID version 4: {}", a.id);
    assert_ne!(a.id, b.id);
    // What enroll returned is what is stored.
    assert_eq!(reg.all_devices().unwrap(), vec![a.clone(), b, c]);
    assert_eq!(reg.find(&a.id).unwrap(), a);
}

#[test]
fn enroll_many_stores_all_as_enroll_would_or_none() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = open(tmp.path());
    let a = reg.enroll(new("alice@example.com", 1), 100).unwrap();
    let mut grouped = new("bob@example.com", 3);
    grouped.groups = vec!["eng".into()];
    let many = reg
        .enroll_many(vec![new("alice@example.com", 2), grouped], 101)
        .unwrap();
    assert_eq!(many[0].name, "alice-2");
    assert_eq!(many[1].name, "bob");
    assert_eq!(many[0].ipv4, Ipv4Addr::new(100, 96, 0, 3));
    assert_eq!(many[1].ipv4, Ipv4Addr::new(100, 96, 0, 4));
    assert_eq!(many[1].ipv6.to_string(), "fd77:6761:7465::4");
    let mut all = vec![a];
    all.extend(many);
    assert_eq!(reg.all_devices().unwrap(), all);
    // A taken key in the batch: nothing of it is stored.
    let refused = reg.enroll_many(
        vec![new("carol@example.com", 4), new("dave@example.com", 1)],
        102,
    );
    assert!(
        matches!(refused, Err(RegistryError::PublicKeyTaken { .. })),
        "{refused:?}"
    );
    assert_eq!(reg.all_devices().unwrap(), all);
}

#[test]
fn explicit_fields_are_stored_and_groups_deduplicated() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = open(tmp.path());
    let d = reg
        .enroll(
            NewDevice {
                name: Some("alice-laptop".into()),
                email: "alice@example.com".into(),
                user_name: Some("Alice Liddell".into()),
                groups: vec!["eng".into(), "sre team".into(), "eng".into()],
                attributes: vec![],
                vnet_id: Some("office".into()),
                public_key: key(1),
            },
            7,
        )
        .unwrap();
    assert_eq!(d.groups, vec!["eng".to_string(), "sre team".to_string()]);
    let found = reg.find("alice-laptop").unwrap();
    assert_eq!(found, d);
    assert_eq!(found.user_name.as_deref(), Some("Alice Liddell"));
    assert_eq!(found.vnet_id.as_deref(), Some("office"));
    assert_eq!(reg.find(&key(1).to_string()).unwrap(), d);
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["ipv4"], "100.96.0.2");
    assert_eq!(json["public_key"], key(1).to_string());
    assert_eq!(json["groups"][1], "sre team");
}

#[test]
fn duplicates_and_bad_input_are_refused_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = open(tmp.path());
    let first = NewDevice {
        name: Some("phone".into()),
        ..new("alice@example.com", 1)
    };
    let d = reg.enroll(first, 1).unwrap();

    let err = reg
        .enroll(
            NewDevice {
                name: Some("phone".into()),
                ..new("bob@example.com", 2)
            },
            2,
        )
        .unwrap_err();
    assert!(
        matches!(&err, RegistryError::NameTaken { name, id, revoked: false } if name == "phone" && *id == d.id),
        "{err}"
    );
    let err = reg.enroll(new("bob@example.com", 1), 2).unwrap_err();
    assert!(
        matches!(&err, RegistryError::PublicKeyTaken { name, .. } if name == "phone"),
        "{err}"
    );
    assert!(err.to_string().contains(&key(1).to_string()), "{err}");

    let cases: Vec<(NewDevice, &str)> = vec![
        (new("not-an-email", 3), "invalid email \"not-an-email\""),
        (
            NewDevice {
                name: Some("bad name".into()),
                ..new("bob@example.com", 3)
            },
            "invalid device name \"bad name\"",
        ),
        (
            NewDevice {
                groups: vec!["".into()],
                attributes: vec![],
                ..new("bob@example.com", 3)
            },
            "invalid group \"\"",
        ),
        (
            NewDevice {
                vnet_id: Some("a\nb".into()),
                ..new("bob@example.com", 3)
            },
            "invalid virtual network",
        ),
    ];
    for (input, needle) in cases {
        let err = reg.enroll(input, 3).unwrap_err();
        assert!(err.to_string().contains(needle), "{err} lacks {needle}");
    }
    assert_eq!(reg.all_devices().unwrap().len(), 1);
}

#[test]
fn find_reports_missing_and_ambiguous() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = open(tmp.path());
    let a = reg.enroll(new("alice@example.com", 1), 1).unwrap();
    // A UUID is a valid name, so one device's name can be another's id.
    let b = reg
        .enroll(
            NewDevice {
                name: Some(a.id.clone()),
                ..new("bob@example.com", 2)
            },
            2,
        )
        .unwrap();
    let err = reg.find(&a.id).unwrap_err();
    let RegistryError::Ambiguous { matches, .. } = &err else {
        panic!("expected Ambiguous, got {err}");
    };
    assert_eq!(matches.len(), 2);
    assert_eq!(reg.find(&b.id).unwrap(), b);
    assert!(matches!(
        reg.find("nobody"),
        Err(RegistryError::NotFound(n)) if n == "nobody"
    ));
}

#[test]
fn revoked_devices_keep_name_key_and_addresses_until_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = open(tmp.path());
    let a = reg.enroll(new("alice@example.com", 1), 1).unwrap();
    let b = reg.enroll(new("bob@example.com", 2), 2).unwrap();
    let revoked = reg.revoke("alice", 50).unwrap();
    assert_eq!(revoked.revoked_at, Some(50));
    assert!(!revoked.is_active());
    assert_eq!(reg.active_devices().unwrap(), vec![b.clone()]);
    assert_eq!(reg.all_devices().unwrap().len(), 2);
    assert_eq!(reg.find("alice").unwrap().revoked_at, Some(50));
    assert!(matches!(
        reg.revoke(&a.id, 60),
        Err(RegistryError::AlreadyRevoked { revoked_at: 50, .. })
    ));

    // New devices get neither the revoked device's addresses, nor its key, nor its name.
    let c = reg.enroll(new("alice@example.com", 3), 3).unwrap();
    assert_eq!(c.ipv4, Ipv4Addr::new(100, 96, 0, 4));
    assert_eq!(c.name, "alice-2");
    assert!(matches!(
        reg.enroll(new("carol@example.com", 1), 4),
        Err(RegistryError::PublicKeyTaken { revoked: true, .. })
    ));

    // Once the row is deleted, its address is the lowest free one again.
    raw(tmp.path())
        .execute("DELETE FROM devices WHERE id = ?1", [&a.id])
        .unwrap();
    let d = reg.enroll(new("dave@example.com", 4), 5).unwrap();
    assert_eq!(d.ipv4, a.ipv4);
    assert_eq!(d.ipv6, a.ipv6);
}

#[test]
fn change_counter_sees_other_processes_but_not_last_seen() {
    let tmp = tempfile::tempdir().unwrap();
    let server = open(tmp.path());
    let cli = open(tmp.path());
    let c0 = server.change_counter().unwrap();
    assert_eq!(server.change_counter().unwrap(), c0, "stable when idle");

    let d = cli
        .enroll(
            NewDevice {
                groups: vec!["eng".into()],
                attributes: vec![],
                ..new("alice@example.com", 1)
            },
            1,
        )
        .unwrap();
    let c1 = server.change_counter().unwrap();
    assert_ne!(c1, c0);

    let here: SocketAddr = "198.51.100.11:40000".parse().unwrap();
    let there: SocketAddr = "[2001:db8::11]:41000".parse().unwrap();
    let seen = |id: &str, at: i64, endpoint: Option<SocketAddr>| Seen {
        device_id: id.to_string(),
        at,
        endpoint,
    };
    server
        .record_last_seen(&[seen(&d.id, 500, Some(here))])
        .unwrap();
    cli.record_last_seen(&[seen(&d.id, 600, None)]).unwrap();
    // Neither time nor address is a change of the device set.
    assert_eq!(server.change_counter().unwrap(), c1);
    let found = server.find(&d.id).unwrap();
    assert_eq!(
        (found.last_seen, found.last_endpoint),
        (Some(600), Some(here))
    );
    // Older reports never move last_seen back; unknown ids are skipped; a new address sticks.
    server
        .record_last_seen(&[seen(&d.id, 550, Some(there)), seen("gone", 1, None)])
        .unwrap();
    let found = server.find(&d.id).unwrap();
    assert_eq!(
        (found.last_seen, found.last_endpoint),
        (Some(600), Some(there))
    );
    // A hand-edited address that does not parse reads as none.
    raw(tmp.path())
        .execute("UPDATE devices SET last_endpoint = 'nowhere'", [])
        .unwrap();
    assert_eq!(server.find(&d.id).unwrap().last_endpoint, None);
    assert_eq!(server.change_counter().unwrap(), c1);

    cli.revoke(&d.name, 700).unwrap();
    let c2 = server.change_counter().unwrap();
    assert_ne!(c2, c1);

    // Hand edits through any connection count too.
    raw(tmp.path())
        .execute("UPDATE devices SET email = 'a@example.org'", [])
        .unwrap();
    assert_ne!(server.change_counter().unwrap(), c2);
}

#[test]
fn pool_exhaustion_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let mut t = tunnel();
    t.ipv4_pool = "100.96.0.0/30".parse().unwrap();
    let reg = Registry::open(tmp.path(), &t).unwrap();
    reg.enroll(new("a@example.com", 1), 1).unwrap();
    let err = reg.enroll(new("b@example.com", 2), 1).unwrap_err();
    assert!(
        matches!(&err, RegistryError::PoolExhausted { pool } if pool == "100.96.0.0/30"),
        "{err}"
    );
}

#[test]
fn concurrent_enrollments_get_distinct_addresses() {
    let tmp = tempfile::tempdir().unwrap();
    drop(open(tmp.path()));
    let dir = tmp.path().to_path_buf();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let reg = open(&dir);
                for i in 0..5u64 {
                    reg.enroll(new("user@example.com", 1000 + t * 10 + i), 1)
                        .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let all = open(&dir).all_devices().unwrap();
    assert_eq!(all.len(), 20);
    let mut v4: Vec<_> = all.iter().map(|d| d.ipv4).collect();
    v4.sort();
    v4.dedup();
    assert_eq!(v4.len(), 20);
    assert_eq!(v4[19], Ipv4Addr::new(100, 96, 0, 21));
    let mut names: Vec<_> = all.iter().map(|d| d.name.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 20);
}

#[test]
fn groups_attributes_and_posture_reach_the_device_and_bump_the_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = open(tmp.path());
    let eng = reg
        .create_group("eng", Some("eng@example.com"), Some("c5e1e3a0-eng"), 1)
        .unwrap();
    assert_eq!(eng.id, "c5e1e3a0-eng");
    let ops = reg.create_group("ops", None, None, 2).unwrap();
    assert_eq!(ops.id.len(), 36);
    assert!(matches!(
        reg.create_group("eng", None, None, 3),
        Err(RegistryError::GroupTaken(_))
    ));
    assert!(reg
        .create_group("x", Some("not-an-email"), None, 3)
        .is_err());

    let mut n = new("alice@example.com", 1);
    n.groups = vec!["eng".into(), "ops".into(), "unknown".into()];
    n.attributes = vec!["department=Engineering".into(), "site = Berlin".into()];
    let d = reg.enroll(n, 10).unwrap();
    assert_eq!(d.extras.group_ids, vec![eng.id.clone(), ops.id.clone()]);
    assert_eq!(d.extras.group_emails, vec!["eng@example.com".to_string()]);
    assert_eq!(
        d.extras.attributes,
        vec![
            "department=Engineering".to_string(),
            "site=Berlin".to_string()
        ]
    );
    let mut bad = new("bob@example.com", 2);
    bad.attributes = vec!["no-equals".into()];
    assert!(matches!(
        reg.enroll(bad, 11),
        Err(RegistryError::InvalidAttribute(_))
    ));

    let before = reg.change_counter().unwrap();
    let d = reg
        .set_posture(
            &d.name,
            &["disk-encryption".into()],
            &["firewall".into()],
            12,
        )
        .unwrap();
    assert_eq!(d.extras.posture_passed, vec!["disk-encryption".to_string()]);
    assert_eq!(d.extras.posture_failed, vec!["firewall".to_string()]);
    assert!(reg.change_counter().unwrap() > before);
    // Results are replaced, not accumulated; a check cannot both pass and fail.
    let d = reg
        .set_posture(&d.id, &["firewall".into()], &[], 13)
        .unwrap();
    assert_eq!(d.extras.posture_passed, vec!["firewall".to_string()]);
    assert!(d.extras.posture_failed.is_empty());
    assert!(reg
        .set_posture(&d.id, &["a".into()], &["a".into()], 14)
        .is_err());

    // Deleting a group takes its id and email off its members.
    reg.delete_group("eng").unwrap();
    let d = reg.find(&d.id).unwrap();
    assert_eq!(d.extras.group_ids, vec![ops.id]);
    assert!(d.extras.group_emails.is_empty());
    assert!(matches!(
        reg.delete_group("eng"),
        Err(RegistryError::GroupNotFound(_))
    ));
}

#[test]
fn a_new_registry_is_never_empty_on_disk_while_open() {
    // A key appears only after the first open; by then the file must not look lost.
    let tmp = tempfile::tempdir().unwrap();
    let reg = open(tmp.path());
    assert!(fs::metadata(reg.path()).unwrap().len() > 0);
}

#[test]
fn a_lost_registry_beside_a_server_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let reg = open(dir);
    reg.enroll(new("alice@example.com", 1), 100).unwrap();
    drop(reg);
    crate::datadir::load_or_create_server_key(dir).unwrap();
    let db = dir.join(REGISTRY_FILE);

    // Truncated to zero bytes, its -wal file left beside it.
    fs::write(&db, b"").unwrap();
    fs::write(dir.join("registry.db-wal"), b"x").unwrap();
    let err = Registry::open(dir, &tunnel()).unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::Lost {
                state: "is empty (0 bytes)",
                wal: true,
                ..
            }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains("server.key"), "{text}");
    assert!(text.contains("mv "), "{text}");
    assert!(text.contains("-wal"), "{text}");
    // Nothing was created or changed on the way.
    assert_eq!(fs::metadata(&db).unwrap().len(), 0);

    // Missing altogether.
    fs::remove_file(&db).unwrap();
    fs::remove_file(dir.join("registry.db-wal")).unwrap();
    let err = Registry::open(dir, &tunnel()).unwrap_err();
    assert!(
        matches!(
            err,
            RegistryError::Lost {
                state: "is missing",
                wal: false,
                ..
            }
        ),
        "{err}"
    );
    assert!(!db.exists());

    // Starting over on purpose: the key moved away.
    let key = crate::datadir::server_key_path(dir);
    fs::rename(&key, dir.join("server.key.old")).unwrap();
    assert!(open(dir).all_devices().unwrap().is_empty());
}

#[test]
fn a_full_disk_on_open_names_the_file_and_the_cause() {
    let path = Path::new("/var/lib/waygate/registry.db");
    let io = rusqlite::Error::SqliteFailure(
        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_SHMSIZE),
        Some("disk I/O error".into()),
    );
    let err = on_open_error(path, RegistryError::Sqlite(io));
    let text = err.to_string();
    assert!(matches!(err, RegistryError::Storage { .. }), "{text}");
    assert!(text.contains("/var/lib/waygate/registry.db"), "{text}");
    assert!(text.contains("disk may be full"), "{text}");
    let full =
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL), None);
    assert!(matches!(
        on_open_error(path, RegistryError::Sqlite(full)),
        RegistryError::Storage { .. }
    ));
    // Other errors pass unchanged.
    let busy =
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY), None);
    assert!(matches!(
        on_open_error(path, RegistryError::Sqlite(busy)),
        RegistryError::Sqlite(_)
    ));
}
