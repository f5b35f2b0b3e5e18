//! The data directory as a user meets it through the CLI: a lost registry is refused, and
//! errors name their cause once.

use std::path::Path;
use std::process::{Command, Output};

fn waygate(config: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_waygate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn config(dir: &Path, data: &Path) -> std::path::PathBuf {
    let path = dir.join("waygate.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[wireguard]\nlisten = \"127.0.0.1:0\"\n\
             public_endpoint = \"198.51.100.1:51820\"\ninterface_name = \"wgtest{}\"\n",
            data.display().to_string(),
            std::process::id() % 100_000
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_lost_registry_is_refused_until_the_key_is_moved_away() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = config(tmp.path(), &data);
    let out = waygate(&cfg, &["device", "enroll", "--email", "ada@example.com"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("Address = 100.96.0.2/32"));

    // The registry is truncated; the key stays.
    std::fs::write(data.join("registry.db"), b"").unwrap();
    for args in [
        &["device", "list"][..],
        &["device", "enroll", "--email", "bob@example.com"][..],
    ] {
        let out = waygate(&cfg, args);
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?} accepted a lost registry");
        assert!(err.contains("registry.db is empty"), "{err}");
        assert!(err.contains("mv "), "{err}");
        assert!(
            !text(&out.stdout).contains("100.96.0.2"),
            "handed out again"
        );
    }

    // Starting over on purpose, as the message says.
    std::fs::rename(data.join("server.key"), data.join("server.key.old")).unwrap();
    let out = waygate(&cfg, &["device", "enroll", "--email", "bob@example.com"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn serve_refuses_a_missing_registry_beside_a_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let cfg = config(tmp.path(), &data);
    let out = waygate(&cfg, &["device", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = waygate(&cfg, &["device", "enroll", "--email", "ada@example.com"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for f in ["registry.db", "registry.db-wal", "registry.db-shm"] {
        let _ = std::fs::remove_file(data.join(f));
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_waygate"))
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    // A serve that accepted the lost registry would run until stopped.
    for _ in 0..200 {
        if child.try_wait().expect("waits").is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    if child.try_wait().expect("waits").is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("registry.db is missing"), "{err}");
    assert!(!data.join("registry.db").exists());
}

#[test]
fn an_os_error_is_printed_once() {
    let tmp = tempfile::tempdir().unwrap();
    // The data directory would have to live under a regular file.
    let file = tmp.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let cfg = config(tmp.path(), &file.join("data"));
    let out = waygate(&cfg, &["device", "list"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.matches("os error").count(), 1, "{err}");
}
