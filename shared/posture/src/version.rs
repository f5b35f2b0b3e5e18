//! Version comparison as Cloudflare's posture rules do it: `major.minor.patch`, a missing part
//! counting as 0 (`1.2` means `1.2.0`). Reported versions are read up to their first character
//! that is neither a digit nor a dot, so a kernel's `6.1.0-18-amd64` is 6.1.0 (semver would
//! call `-18-amd64` a pre-release and order it before 6.1.0, which is wrong for kernels).

use std::cmp::Ordering;

/// `major.minor.patch`.
pub type Version = [u64; 3];

/// A comparison of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// `<`.
    Less,
    /// `<=`.
    LessEq,
    /// `>`.
    Greater,
    /// `>=`.
    GreaterEq,
    /// `==`.
    Equal,
}

impl Operator {
    /// The operator `text` spells.
    pub fn parse(text: &str) -> Option<Operator> {
        Some(match text.trim() {
            "<" => Operator::Less,
            "<=" => Operator::LessEq,
            ">" => Operator::Greater,
            ">=" => Operator::GreaterEq,
            "==" => Operator::Equal,
            _ => return None,
        })
    }
}

/// The leading `N[.N[.N]]` of `text` (a leading `v` allowed); `None` without a number.
pub fn parse_version(text: &str) -> Option<Version> {
    let text = text.trim();
    let text = text.strip_prefix('v').unwrap_or(text);
    let end = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let head = text[..end].trim_end_matches('.');
    if head.is_empty() {
        return None;
    }
    let mut out = [0u64; 3];
    for (n, part) in head.split('.').enumerate() {
        if n >= 3 {
            break;
        }
        out[n] = part.parse().ok()?;
    }
    Some(out)
}

/// Whether `have OP want` holds.
pub fn compare(have: &Version, op: Operator, want: &Version) -> bool {
    let ord = have.cmp(want);
    match op {
        Operator::Less => ord == Ordering::Less,
        Operator::LessEq => ord != Ordering::Greater,
        Operator::Greater => ord == Ordering::Greater,
        Operator::GreaterEq => ord != Ordering::Less,
        Operator::Equal => ord == Ordering::Equal,
    }
}
