//! Checks on what an operator types into `waygate device enroll`, before it reaches the database.

/// Longest device name.
pub const MAX_NAME_LEN: usize = 64;
/// Longest email address (RFC 5321 path limit).
pub const MAX_EMAIL_LEN: usize = 254;
/// Longest group, user or virtual network name.
pub const MAX_LABEL_LEN: usize = 128;

/// Device names: 1 to 64 of `[A-Za-z0-9._-]`, so they are safe in file names and shells.
pub fn name_ok(name: &str) -> bool {
    (1..=MAX_NAME_LEN).contains(&name.len()) && name.bytes().all(name_byte_ok)
}

fn name_byte_ok(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

/// A plausible email address: `local@domain.tld`, ASCII, no spaces, dot-separated DNS labels.
/// Not RFC 5322 (quoted local parts are refused): identity providers emit plain addresses, and
/// policy compares these strings.
pub fn email_ok(email: &str) -> bool {
    if email.len() > MAX_EMAIL_LEN {
        return false;
    }
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    let local_ok = (1..=64).contains(&local.len())
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+/=?^_`{|}~.-".contains(&b));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            (1..=63).contains(&l.len())
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    local_ok && domain_ok
}

/// Free-form labels (groups, user names, virtual network ids): 1 to 128 characters, no control
/// characters, no leading or trailing whitespace.
pub fn label_ok(label: &str) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.chars().count())
        && label.trim() == label
        && !label.chars().any(char::is_control)
}

/// Turns an email's local part into a device name stem: disallowed characters become `-`, and it
/// is cut short enough to leave room for a `-NNNNN` suffix.
pub fn name_stem(email: &str) -> String {
    let local = email.split('@').next().unwrap_or_default();
    let stem: String = local
        .bytes()
        .take(MAX_NAME_LEN - 6)
        .map(|b| if name_byte_ok(b) { b as char } else { '-' })
        .collect();
    if stem.is_empty() {
        "device".to_string()
    } else {
        stem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["laptop", "alice.phone-2", "A_b", &"x".repeat(64)] {
            assert!(name_ok(good), "{good}");
        }
        for bad in ["", "has space", "émile", "a/b", &"x".repeat(65), "a\n"] {
            assert!(!name_ok(bad), "{bad:?}");
        }
    }

    #[test]
    fn emails() {
        for good in ["alice@example.com", "a.b+tag@sub.example.org", "x@y.io"] {
            assert!(email_ok(good), "{good}");
        }
        for bad in [
            "",
            "alice",
            "alice@",
            "@example.com",
            "alice@example",
            "alice@@example.com",
            "al ice@example.com",
            ".alice@example.com",
            "al..ice@example.com",
            "alice@-example.com",
            "alice@example..com",
            "alice@exa_mple.com",
            "alice@example.com\n",
        ] {
            assert!(!email_ok(bad), "{bad:?}");
        }
        assert!(!email_ok(&format!("{}@example.com", "a".repeat(65))));
    }

    #[test]
    fn labels() {
        assert!(label_ok("eng"));
        assert!(label_ok("Site Reliability"));
        assert!(!label_ok(""));
        assert!(!label_ok(" eng"));
        assert!(!label_ok("eng\t"));
        assert!(!label_ok("a\u{7}b"));
        assert!(!label_ok(&"g".repeat(129)));
    }

    #[test]
    fn stems() {
        assert_eq!(name_stem("alice@example.com"), "alice");
        assert_eq!(name_stem("a+b!c@example.com"), "a-b-c");
        assert!(name_ok(&format!(
            "{}-99999",
            name_stem(&format!("{}@x.io", "a".repeat(64)))
        )));
        assert_eq!(name_stem("@x"), "device");
    }
}
