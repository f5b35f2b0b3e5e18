//! `waygate health`: asks the running gateway whether it serves, over its WireGuard UAPI socket
//! (the container image's HEALTHCHECK). Exits 0 with a one-line summary, 1 with the reason.
//!
//! The UAPI socket rather than a probe of the UDP port: WireGuard answers nothing to a stranger,
//! and the socket is local, needs no key, and is served by the running gateway only.
use std::io::{BufReader, Write as _};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use waygate_config::Config;
use waygate_runtime::uapi;

/// How long the gateway may take to answer: a healthy one answers in well under a millisecond;
/// Docker's check times out at 5 s.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
/// Longest answer read: a gateway with many peers answers many lines, and only the counts matter.
const MAX_LINES: usize = 1_000_000;

/// Runs `waygate health`.
pub fn run(config: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(config)?;
    let path = uapi::socket_path(&cfg.wireguard.interface_name);
    match check(&path) {
        Ok(summary) => {
            println!("ok: {summary}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("unhealthy: {}", super::error_report(&e));
            Ok(ExitCode::FAILURE)
        }
    }
}

fn check(path: &Path) -> anyhow::Result<String> {
    let mut stream = UnixStream::connect(path)
        .with_context(|| format!("no gateway answers on {}", path.display()))?;
    stream.set_read_timeout(Some(ANSWER_WITHIN))?;
    stream.set_write_timeout(Some(ANSWER_WITHIN))?;
    stream.write_all(b"get=1\n\n")?;
    summarize(BufReader::new(stream))
}

/// Reads a UAPI `get` answer up to its blank line; returns "N peers, M with a handshake" when it
/// ends in `errno=0`. The answer holds the private key: nothing of it but counts is kept.
fn summarize(reader: impl std::io::BufRead) -> anyhow::Result<String> {
    let (mut peers, mut handshaken, mut errno) = (0usize, 0usize, None);
    for (n, line) in reader.lines().enumerate() {
        let line = line.context("reading the gateway's answer")?;
        if line.is_empty() || n >= MAX_LINES {
            break;
        }
        match line.split_once('=') {
            Some(("public_key", _)) => peers += 1,
            Some(("last_handshake_time_sec", v)) if v != "0" => handshaken += 1,
            Some(("errno", v)) => errno = Some(v.to_string()),
            _ => {}
        }
    }
    match errno.as_deref() {
        Some("0") => Ok(format!("{peers} peers, {handshaken} with a handshake")),
        Some(e) => bail!("the gateway answered errno={e}"),
        None => bail!("the gateway's answer ended early"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_peers_and_handshakes() {
        let answer =
            "private_key=aa\nlisten_port=51820\npublic_key=bb\nlast_handshake_time_sec=0\n\
                      public_key=cc\nlast_handshake_time_sec=1700000000\nerrno=0\n\n";
        assert_eq!(
            summarize(answer.as_bytes()).expect("healthy"),
            "2 peers, 1 with a handshake"
        );
    }

    #[test]
    fn errors_and_cut_answers_are_unhealthy() {
        assert!(summarize("errno=1\n\n".as_bytes()).is_err());
        assert!(summarize("private_key=aa\nlisten_port=1\n".as_bytes()).is_err());
        assert!(summarize("".as_bytes()).is_err());
    }

    #[test]
    fn no_socket_is_unhealthy_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = check(&dir.path().join("none.sock")).expect_err("no gateway");
        assert!(err.to_string().contains("none.sock"), "{err}");
    }
}
