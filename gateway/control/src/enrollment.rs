//! Enrollment tokens and what they buy: `waygate token create` makes a token, the enrollment
//! listener ([`redeem`]) trades one, with a device's own public key, for the device's tunnel
//! settings.
//!
//! A token ([`EnrollToken`], in the keys crate so the client parses it too) reads
//! `wgenroll1-PREFIX-SECRET-CAHASH` (Headscale's `hskey-auth-PREFIX-SECRET` with
//! kubeadm's discovery hash): PREFIX is 12 random hex digits shown in listings, SECRET 64 random
//! hex digits (256 bits) of which the registry keeps only the SHA-256, and CAHASH the hex SHA-256
//! of the gateway CA's certificate (DER), so the client trusts the listener's certificate chain
//! only if it ends at that CA, with no other trust anchor. The token is shown once.

use std::net::IpAddr;

use rand::RngCore;
use serde::{Deserialize, Serialize};
use waygate_config::Config;
use waygate_registry::{Registry, StoredEnrollToken};

pub use waygate_keys::enroll_token::{
    ca_sha256, hex, EnrollToken, TokenFormatError, PREFIX_HEX, SECRET_HEX,
};

use crate::{ControlError, EnrollRequest};

/// Path of the enrollment endpoint on the listener.
pub const ENROLL_PATH: &str = "/v1/enroll";
/// Default lifetime of a token.
pub const DEFAULT_TTL_SECS: i64 = 24 * 3600;
/// Longest lifetime a token may have (a year).
pub const MAX_TTL_SECS: i64 = 366 * 24 * 3600;

/// What `waygate token create` asks for.
#[derive(Debug, Clone, Default)]
pub struct NewEnrollToken {
    /// The user's email.
    pub email: String,
    /// Device name (`None`: derived from the email at enrollment).
    pub name: Option<String>,
    /// Groups.
    pub groups: Vec<String>,
    /// Virtual network, name or id.
    pub vnet: Option<String>,
    /// Lifetime in seconds (`None`: a day).
    pub ttl_secs: Option<i64>,
    /// Devices it may enroll (`None`: one; 0: any number until it expires).
    pub uses: Option<i64>,
}

/// Creates a token for the CA whose certificate is `ca_der`; returns the token (shown once, its
/// secret never stored) and its record.
pub fn create(
    registry: &Registry,
    request: NewEnrollToken,
    ca_der: &[u8],
    rng: &mut impl RngCore,
    now: i64,
) -> Result<(EnrollToken, StoredEnrollToken), ControlError> {
    if !waygate_registry::validate::email_ok(&request.email) {
        return Err(ControlError::invalid(
            "email",
            format!("{:?} is not an email address", request.email),
        ));
    }
    if let Some(name) = &request.name {
        if !waygate_registry::validate::name_ok(name) {
            return Err(ControlError::invalid(
                "name",
                format!("{name:?}: expected letters, digits, '-', '_' or '.'"),
            ));
        }
    }
    let mut groups: Vec<String> = Vec::new();
    for g in request.groups {
        if !waygate_registry::validate::label_ok(&g) {
            return Err(ControlError::invalid(
                "group",
                format!("{g:?}: expected 1 to 128 characters without control characters"),
            ));
        }
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let ttl = request.ttl_secs.unwrap_or(DEFAULT_TTL_SECS);
    if !(1..=MAX_TTL_SECS).contains(&ttl) {
        return Err(ControlError::invalid(
            "ttl",
            format!("{ttl} s: expected 1 s to 366 days"),
        ));
    }
    let uses = request.uses.unwrap_or(1);
    if !(0..=1_000_000).contains(&uses) {
        return Err(ControlError::invalid(
            "uses",
            format!("{uses}: expected 0 (any number) to 1000000"),
        ));
    }
    let vnet_id = match &request.vnet {
        Some(needle) => Some(registry.find_vnet(needle)?.id),
        None => None,
    };
    let mut bytes = [0u8; PREFIX_HEX / 2 + SECRET_HEX / 2];
    rng.fill_bytes(&mut bytes);
    let token = EnrollToken {
        prefix: hex(&bytes[..PREFIX_HEX / 2]),
        secret: hex(&bytes[PREFIX_HEX / 2..]),
        ca_sha256: ca_sha256(ca_der),
    };
    let stored = StoredEnrollToken {
        id: waygate_registry::new_id(),
        prefix: token.prefix.clone(),
        hash: crate::tokens::hash(&token.secret),
        email: request.email,
        name: request.name,
        groups,
        vnet_id,
        uses,
        used: 0,
        expires_at: now.saturating_add(ttl),
        created_at: now,
        last_used_at: None,
        revoked_at: None,
    };
    registry.insert_enroll_token(&stored)?;
    Ok((token, stored))
}

/// Every enrollment token (never their secrets).
pub fn list(registry: &Registry) -> Result<Vec<StoredEnrollToken>, ControlError> {
    Ok(registry.enroll_tokens()?)
}

/// Revokes the token with this id or prefix.
pub fn revoke(
    registry: &Registry,
    needle: &str,
    now: i64,
) -> Result<StoredEnrollToken, ControlError> {
    Ok(registry.revoke_enroll_token(needle, now)?)
}

/// Why a token was refused at enrollment.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The text is not a token.
    #[error("{0}")]
    Malformed(TokenFormatError),
    /// No token has this secret (a typo, or one from another gateway).
    #[error("unknown enrollment token (prefix {0}); ask for a new one")]
    Unknown(String),
    /// Its lifetime is over.
    #[error("enrollment token {prefix} expired at {}; ask for a new one", crate::time::rfc3339(*at))]
    Expired {
        /// Its prefix.
        prefix: String,
        /// When it expired (unix seconds).
        at: i64,
    },
    /// Every use is taken.
    #[error("enrollment token {prefix} is used up ({uses} of {uses} devices enrolled); ask for a new one")]
    Spent {
        /// Its prefix.
        prefix: String,
        /// How many it allowed.
        uses: i64,
    },
    /// It was revoked.
    #[error("enrollment token {prefix} was revoked at {}; ask for a new one", crate::time::rfc3339(*at))]
    Revoked {
        /// Its prefix.
        prefix: String,
        /// When (unix seconds).
        at: i64,
    },
    /// Too many failed attempts from this address.
    #[error("too many failed enrollment attempts from this address; try again in {retry_after} s")]
    RateLimited {
        /// Seconds until one more attempt is allowed.
        retry_after: u64,
    },
}

/// What the client sends: its token and its own public key (the private key stays on the
/// device).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollBody {
    /// The whole token as printed by `waygate token create`.
    pub token: String,
    /// The device's WireGuard public key (base64).
    pub public_key: String,
}

/// What the client gets back: everything it needs to bring its tunnel up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResult {
    /// The device's id.
    pub device_id: String,
    /// The device's name.
    pub name: String,
    /// Its tunnel addresses with prefix lengths (`100.96.0.2/32`, `fd77:6761:7465::2/128`).
    pub addresses: Vec<String>,
    /// The gateway's WireGuard public key (base64).
    pub gateway_public_key: String,
    /// The gateway's WireGuard endpoint (`host:port`).
    pub endpoint: String,
    /// DNS servers: the gateway's tunnel addresses.
    pub dns: Vec<IpAddr>,
    /// Tunnel MTU.
    pub mtu: u16,
    /// The virtual network's name (`None`: the default network).
    pub vnet: Option<String>,
}

/// Trades a token and a public key for an enrolled device, at `now` (unix seconds). A refused
/// token is `Err(Ok(Refusal))`; other failures (a bad key, the registry) `Err(Err(_))`.
pub fn redeem(
    config: &Config,
    registry: &Registry,
    body: &EnrollBody,
    now: i64,
) -> Result<EnrollResult, Result<Refusal, ControlError>> {
    let token: EnrollToken = body.token.parse().map_err(|e| Ok(Refusal::Malformed(e)))?;
    let stored = registry
        .enroll_token_by_hash(&crate::tokens::hash(&token.secret))
        .map_err(|e| Err(e.into()))?
        .filter(|t| t.prefix == token.prefix)
        .ok_or_else(|| Ok(Refusal::Unknown(token.prefix.clone())))?;
    usable(&stored, now).map_err(Ok)?;
    if body.public_key.parse::<waygate_keys::PublicKey>().is_err() {
        return Err(Err(ControlError::PublicKey(format!(
            "{:?} is not a WireGuard public key (32 bytes, base64)",
            body.public_key
        ))));
    }
    if !registry
        .take_enroll_token_use(&stored.id, now)
        .map_err(|e| Err(e.into()))?
    {
        // Taken by a concurrent enrollment since the check above: say which limit it hit.
        let fresh = registry
            .enroll_token_by_hash(&stored.hash)
            .map_err(|e| Err(e.into()))?
            .unwrap_or(stored);
        return Err(usable(&fresh, now).err().map_or_else(
            || {
                Err(ControlError::Conflict(
                    "enrollment token changed; try again".into(),
                ))
            },
            Ok,
        ));
    }
    let request = EnrollRequest {
        name: stored.name.clone(),
        email: stored.email.clone(),
        groups: stored.groups.clone(),
        vnet: stored.vnet_id.clone(),
        public_key: Some(body.public_key.clone()),
        ..EnrollRequest::default()
    };
    let enrolled = match enroll_with_free_name(config, registry, request, now) {
        Ok(e) => e,
        Err(e) => {
            let _ = registry.return_enroll_token_use(&stored.id);
            return Err(Err(e));
        }
    };
    let device = enrolled.device;
    let vnet = match &device.vnet_id {
        Some(id) => registry.find_vnet(id).ok().map(|v| v.name),
        None => None,
    };
    let server = waygate_registry::datadir::load_or_create_server_key(&config.data_dir)
        .map_err(|e| Err(e.into()))?;
    Ok(EnrollResult {
        device_id: device.id,
        name: device.name,
        addresses: vec![
            format!("{}/32", device.ipv4),
            format!("{}/128", device.ipv6),
        ],
        gateway_public_key: server.public_key().to_string(),
        endpoint: enrolled.endpoint,
        dns: vec![
            IpAddr::V4(config.tunnel.gateway_ipv4()),
            IpAddr::V6(config.tunnel.gateway_ipv6()),
        ],
        mtu: config.tunnel.mtu,
        vnet,
    })
}

/// Names tried after a token's `--name` is taken: `NAME-2` up to `NAME-{this}`.
const MAX_TOKEN_NAME_SUFFIX: u32 = 1_000;

/// Enrolls with the token's name, or, when a device holds it already (a token for several
/// devices, or a name reused), with the first free `NAME-2`, `NAME-3`, ... as names derived from
/// the email are: a second laptop enrolled with the same token must not be refused.
fn enroll_with_free_name(
    config: &Config,
    registry: &Registry,
    request: EnrollRequest,
    now: i64,
) -> Result<crate::Enrolled, ControlError> {
    let Some(stem) = request.name.clone() else {
        return crate::enroll(config, registry, request, now);
    };
    let mut candidate = stem.clone();
    let mut n = 1;
    loop {
        let attempt = EnrollRequest {
            name: Some(candidate.clone()),
            ..request.clone()
        };
        match crate::enroll(config, registry, attempt, now) {
            Err(ControlError::Registry(waygate_registry::RegistryError::NameTaken { .. }))
                if n < MAX_TOKEN_NAME_SUFFIX =>
            {
                n += 1;
                candidate = format!("{stem}-{n}");
                if !waygate_registry::validate::name_ok(&candidate) {
                    return crate::enroll(config, registry, request, now);
                }
            }
            other => return other,
        }
    }
}

/// Whether a stored token may enroll one more device at `now`.
fn usable(t: &StoredEnrollToken, now: i64) -> Result<(), Refusal> {
    let prefix = t.prefix.clone();
    if let Some(at) = t.revoked_at {
        return Err(Refusal::Revoked { prefix, at });
    }
    if now >= t.expires_at {
        return Err(Refusal::Expired {
            prefix,
            at: t.expires_at,
        });
    }
    if t.spent() {
        return Err(Refusal::Spent {
            prefix,
            uses: t.uses,
        });
    }
    Ok(())
}

/// Parses a duration such as `90s`, `30m`, `24h`, `7d` (or plain seconds) into seconds.
pub fn parse_ttl(text: &str) -> Result<i64, ControlError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let bad = || {
        ControlError::invalid(
            "ttl",
            format!("{text:?}: expected a duration like 90s, 30m, 24h or 7d"),
        )
    };
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let unit = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(unit).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use waygate_keys::PrivateKey;

    const CA: &[u8] = b"not really a certificate, but DER all the same";

    fn setup() -> (tempfile::TempDir, Config, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        config.wireguard.public_endpoint = Some("198.51.100.1:51820".into());
        let reg = Registry::open(dir.path(), &config.tunnel).unwrap();
        (dir, config, reg)
    }

    fn new(uses: Option<i64>, ttl: Option<i64>) -> NewEnrollToken {
        NewEnrollToken {
            email: "ada@example.com".into(),
            groups: vec!["eng".into(), "eng".into()],
            uses,
            ttl_secs: ttl,
            ..NewEnrollToken::default()
        }
    }

    fn key(seed: u64) -> String {
        PrivateKey::generate(&mut StdRng::seed_from_u64(seed))
            .public_key()
            .to_string()
    }

    #[test]
    fn a_token_prints_and_parses_back() {
        let (_d, _c, reg) = setup();
        let (token, stored) =
            create(&reg, new(None, None), CA, &mut StdRng::seed_from_u64(1), 10).unwrap();
        let text = token.to_string();
        assert_eq!(text.len(), 9 + 1 + 12 + 1 + 64 + 1 + 64, "{text}");
        assert!(text.starts_with("wgenroll1-"));
        assert!(text.ends_with(&hex(&ca_sha256(CA))));
        let back: EnrollToken = text.parse().unwrap();
        assert_eq!(back, token);
        assert!(
            !format!("{back:?}").contains(&token.secret),
            "Debug hides the secret"
        );
        assert_eq!(stored.hash, crate::tokens::hash(&token.secret));
        assert!(!stored.hash.contains(&token.secret));
        assert_eq!((stored.uses, stored.expires_at), (1, 10 + 86_400));
        assert_eq!(stored.groups, vec!["eng".to_string()]);
        for bad in [
            "",
            "wgenroll1",
            "hskey-auth-x-y",
            &text.replace("wgenroll1", "wgenroll2"),
            &text[..text.len() - 1],
            &format!("{text}-00"),
            &text.to_uppercase(),
        ] {
            assert!(bad.parse::<EnrollToken>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn redeeming_enrolls_the_device_with_its_own_key() {
        let (_d, config, reg) = setup();
        let (token, _) = create(
            &reg,
            new(Some(2), None),
            CA,
            &mut StdRng::seed_from_u64(2),
            10,
        )
        .unwrap();
        let body = EnrollBody {
            token: token.to_string(),
            public_key: key(9),
        };
        let got = redeem(&config, &reg, &body, 20).unwrap();
        assert_eq!(
            got.addresses,
            vec!["100.96.0.2/32", "fd77:6761:7465::2/128"]
        );
        assert_eq!(got.endpoint, "198.51.100.1:51820");
        assert_eq!(got.dns[0].to_string(), "100.96.0.1");
        assert_eq!(got.mtu, 1420);
        let device = reg.find(&got.device_id).unwrap();
        assert_eq!(device.public_key.to_string(), key(9));
        assert_eq!(device.email, "ada@example.com");
        assert_eq!(device.groups, vec!["eng".to_string()]);
        // A bad key is refused without taking a use.
        let bad = EnrollBody {
            token: token.to_string(),
            public_key: "nope".into(),
        };
        assert!(matches!(
            redeem(&config, &reg, &bad, 21),
            Err(Err(ControlError::PublicKey(_)))
        ));
        redeem(
            &config,
            &reg,
            &EnrollBody {
                public_key: key(10),
                ..body.clone()
            },
            22,
        )
        .unwrap();
        let err = redeem(
            &config,
            &reg,
            &EnrollBody {
                public_key: key(11),
                ..body
            },
            23,
        )
        .unwrap_err()
        .unwrap();
        assert!(matches!(err, Refusal::Spent { uses: 2, .. }), "{err}");
        assert!(err.to_string().contains("used up"), "{err}");
    }

    #[test]
    fn a_named_token_for_several_devices_gives_each_a_free_name() {
        let (_d, config, reg) = setup();
        let mut spec = new(Some(3), None);
        spec.name = Some("lab-pc".into());
        let (token, _) = create(&reg, spec, CA, &mut StdRng::seed_from_u64(5), 10).unwrap();
        let names: Vec<String> = (0..3)
            .map(|i| {
                let body = EnrollBody {
                    token: token.to_string(),
                    public_key: key(40 + i),
                };
                redeem(&config, &reg, &body, 20).unwrap().name
            })
            .collect();
        assert_eq!(names, ["lab-pc", "lab-pc-2", "lab-pc-3"]);
    }

    #[test]
    fn expired_revoked_and_unknown_tokens_are_refused_clearly() {
        let (_d, config, reg) = setup();
        let mut rng = StdRng::seed_from_u64(3);
        let (short, _) = create(&reg, new(None, Some(1)), CA, &mut rng, 100).unwrap();
        let body = |t: &EnrollToken| EnrollBody {
            token: t.to_string(),
            public_key: key(4),
        };
        let err = redeem(&config, &reg, &body(&short), 101)
            .unwrap_err()
            .unwrap();
        assert!(
            err.to_string().contains("expired at 1970-01-01T00:01:41Z"),
            "{err}"
        );

        let (revoked, stored) = create(&reg, new(None, None), CA, &mut rng, 100).unwrap();
        revoke(&reg, &stored.prefix, 150).unwrap();
        let err = redeem(&config, &reg, &body(&revoked), 160)
            .unwrap_err()
            .unwrap();
        assert!(matches!(err, Refusal::Revoked { at: 150, .. }), "{err}");

        let mut forged = revoked.clone();
        forged.secret = "0".repeat(64);
        let err = redeem(&config, &reg, &body(&forged), 160)
            .unwrap_err()
            .unwrap();
        assert!(matches!(err, Refusal::Unknown(_)), "{err}");
        let err = redeem(
            &config,
            &reg,
            &EnrollBody {
                token: "x".into(),
                public_key: key(4),
            },
            160,
        )
        .unwrap_err()
        .unwrap();
        assert!(matches!(err, Refusal::Malformed(_)), "{err}");
        assert!(reg.all_devices().unwrap().is_empty());
    }

    #[test]
    fn bad_requests_name_their_field() {
        let (_d, _c, reg) = setup();
        let mut rng = StdRng::seed_from_u64(4);
        let field = |r: NewEnrollToken, reg: &Registry, rng: &mut StdRng| match create(
            reg, r, CA, rng, 1,
        ) {
            Err(ControlError::Invalid { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        let mut r = new(None, None);
        r.email = "nobody".into();
        assert_eq!(field(r, &reg, &mut rng), "email");
        assert_eq!(field(new(Some(-1), None), &reg, &mut rng), "uses");
        assert_eq!(field(new(None, Some(0)), &reg, &mut rng), "ttl");
        let mut r = new(None, None);
        r.vnet = Some("nowhere".into());
        assert!(create(&reg, r, CA, &mut rng, 1).is_err());
    }

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("1s").unwrap(), 1);
        assert_eq!(parse_ttl("90").unwrap(), 90);
        assert_eq!(parse_ttl("30m").unwrap(), 1800);
        assert_eq!(parse_ttl("24h").unwrap(), 86_400);
        assert_eq!(parse_ttl("7d").unwrap(), 604_800);
        for bad in ["", "h", "1w", "-1s", "99999999999999999999d", "1.5h"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }
}
