//! The rule engine in the gateway: loading Cloudflare-format rule sets from files, the fields a
//! new flow offers to the egress and network (l4) rules, and what their actions mean here.
//!
//! Rule sets are read and compiled away from the serving loop (see `runtime`), which swaps the
//! compiled set in whole; a set that fails to load leaves the running one in place.

use std::net::SocketAddr;
use std::path::Path;

use waygate_policy::fields::FieldId;
use waygate_policy::input::Input;
use waygate_policy::ruleset::{
    Action, CompiledRule, EgressAction, Ipv4Fallback, Lists, Policy, RuleError, RuleSet,
};

use crate::egress::EgressChoice;
use waygate_geoip::GeoIp;
use waygate_model::{DeviceInfo, FlowCtx};
use waygate_wire::sniff::Detected;

/// A compiled rule set, as the stages use it.
#[derive(Debug)]
pub struct Loaded {
    /// The compiled rules of every stage.
    pub policy: Policy,
}

impl Loaded {
    /// No rules: every stage takes its default.
    pub fn empty() -> Loaded {
        Loaded {
            policy: Policy::empty(),
        }
    }

    /// Compiles `set` with `lists`.
    pub fn compile(set: &RuleSet, lists: &Lists) -> Result<Loaded, Vec<RuleError>> {
        Ok(Loaded {
            policy: Policy::compile(set, lists)?,
        })
    }
}

/// Why a rule set could not be loaded, naming the config key of the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The rules file is unreadable, invalid, or its rules do not compile.
    #[error("policy.rules: {0}")]
    Rules(String),
    /// The lists file is unreadable or invalid.
    #[error("policy.lists: {0}")]
    Lists(String),
}

/// Reads and compiles a rule set (`rules`, with the lists of `lists` when given).
pub fn load(rules: &Path, lists: Option<&Path>) -> Result<Loaded, LoadError> {
    let text = std::fs::read_to_string(rules)
        .map_err(|e| LoadError::Rules(format!("cannot read {}: {e}", rules.display())))?;
    let set = RuleSet::from_json(&text)
        .map_err(|e| LoadError::Rules(format!("{}: {e}", rules.display())))?;
    let lists = match lists {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| LoadError::Lists(format!("cannot read {}: {e}", path.display())))?;
            Lists::from_json(&text)
                .map_err(|e| LoadError::Lists(format!("{}: {e}", path.display())))?
        }
        None => Lists::new(Vec::new()),
    };
    Loaded::compile(&set, &lists).map_err(|errors| {
        let all: Vec<String> = errors.iter().map(ToString::to_string).collect();
        LoadError::Rules(format!("{}: {}", rules.display(), all.join("; ")))
    })
}

/// Sets the fields the client's first bytes revealed.
pub fn first_bytes_input(input: &mut Input, detected: &Detected) {
    input.set_str(FieldId::NetDetectedProtocol, detected.protocol());
    if let Detected::Tls { sni: Some(host) } = detected {
        input.set_host(FieldId::NetSniHost, host);
    }
}

/// Fills `input` with what is known about a new flow going to `target`.
pub fn flow_input(input: &mut Input, ctx: &FlowCtx, target: SocketAddr, geo: Option<&GeoIp>) {
    input.clear();
    let device = &ctx.device;
    // The device's public address is its source as the Internet sees it; inside the tunnel
    // it has no other.
    let public = ctx.device_public.map(|a| a.ip());
    input.set_ip(FieldId::NetSrcIp, public.unwrap_or(ctx.src.ip()));
    input.set_int(FieldId::NetSrcPort, i64::from(ctx.src.port()));
    input.set_ip(FieldId::NetDstIp, target.ip());
    input.set_int(FieldId::NetDstPort, i64::from(target.port()));
    input.set_str(FieldId::NetProtocol, ctx.protocol.as_str());
    input.set_str(FieldId::NetOnrampType, "device_client");
    if let Some(name) = &ctx.rules.name {
        input.set_host(FieldId::NetFqdnHost, name);
    }
    if let Some(vnet) = &device.vnet_id {
        input.set_str(FieldId::NetVnetId, vnet);
    }
    if let Some(geo) = geo {
        if let Some(public) = public {
            let g = geo.lookup(public);
            if let Some(c) = g.country {
                input.set_str(FieldId::NetSrcGeoCountry, c.as_str());
            }
            if let Some(c) = g.continent {
                input.set_str(FieldId::NetSrcGeoContinent, c.as_str());
            }
        }
        let g = geo.lookup(target.ip());
        if let Some(c) = g.country {
            input.set_str(FieldId::NetDstGeoCountry, c.as_str());
        }
        if let Some(c) = g.continent {
            input.set_str(FieldId::NetDstGeoContinent, c.as_str());
        }
    }
    fill_identity(input, device);
}

/// Sets the identity and device posture fields (every stage reads them) of `device`'s user.
pub fn fill_identity(input: &mut Input, device: &DeviceInfo) {
    input.set_str(FieldId::IdentityEmail, &device.email);
    if let Some(name) = &device.user_name {
        input.set_str(FieldId::IdentityName, name);
    }
    if !device.groups.is_empty() {
        input.set_strs(
            FieldId::IdentityGroupsName,
            device.groups.iter().map(String::as_str),
        );
    }
    let extras = &device.extras;
    let fields = [
        (FieldId::IdentityGroupsId, &extras.group_ids),
        (FieldId::IdentityGroupsEmail, &extras.group_emails),
        (FieldId::IdentitySamlAttributes, &extras.attributes),
        (FieldId::DevicePostureChecksPassed, &extras.posture_passed),
        (FieldId::DevicePostureChecksFailed, &extras.posture_failed),
    ];
    for (field, values) in fields {
        if !values.is_empty() {
            input.set_strs(field, values.iter().map(String::as_str));
        }
    }
}

/// What an egress rule's action asks for; `None` for the default egress.
pub fn egress_choice(rule: &CompiledRule) -> Option<EgressChoice> {
    match &rule.action {
        Action::Egress(EgressAction::Dedicated {
            ipv4,
            ipv6,
            ipv4_fallback,
        }) => Some(EgressChoice {
            ipv4: *ipv4,
            ipv6: ipv6.and_then(|net| match net {
                ipnet::IpNet::V6(v6) => Some(v6),
                ipnet::IpNet::V4(_) => None,
            }),
            ipv4_fallback: match ipv4_fallback {
                Ipv4Fallback::None => None,
                Ipv4Fallback::DefaultEgress => Some(std::net::Ipv4Addr::UNSPECIFIED),
                Ipv4Fallback::Addr(a) => Some(*a),
            },
        }),
        _ => None,
    }
}

/// A network rule's verdict on a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum L4Verdict {
    /// Go on to `target` (the original destination, or the override's).
    Allow {
        /// Where to connect.
        target: SocketAddr,
    },
    /// Refuse the flow.
    Block,
}

/// Applies the matching network rule (if any) to a flow going to `target`.
pub fn l4_verdict(rule: Option<&CompiledRule>, target: SocketAddr) -> L4Verdict {
    match rule.map(|r| &r.action) {
        Some(Action::Block(_)) => L4Verdict::Block,
        Some(Action::L4Override { ip, port }) => L4Verdict::Allow {
            target: SocketAddr::new(*ip, port.unwrap_or(target.port())),
        },
        _ => L4Verdict::Allow { target },
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use waygate_model::testkit;
    use waygate_policy::fields::{Phase, Stage};
    use waygate_policy::ruleset::Decided;

    #[test]
    fn a_missing_lists_file_is_blamed_on_policy_lists() {
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.json");
        std::fs::write(&rules, "[]").unwrap();
        let lists = dir.path().join("lists.json");
        let Err(err) = load(&rules, Some(&lists)) else {
            panic!("a missing lists file was accepted")
        };
        let text = err.to_string();
        assert!(text.starts_with("policy.lists: cannot read "), "{text}");
        assert!(text.contains("lists.json"), "{text}");
        let Err(err) = load(&lists, None) else {
            panic!("a missing rules file was accepted")
        };
        assert!(err.to_string().starts_with("policy.rules: "), "{err}");
        assert!(load(&rules, None).is_ok());
    }

    fn ctx() -> FlowCtx {
        let ada = testkit::device()
            .id("d1")
            .user_name("Ada")
            .groups(&["eng", "ops"])
            .vnet("f70ff985-a4ef-4643-bbbc-4a0ed4fc8415");
        testkit::flow()
            .device(ada)
            .device_public("198.51.100.11:40000")
            .dst("203.0.113.10:443")
            .build()
    }

    fn compile(json: &str) -> Policy {
        let set = RuleSet::from_json(json).unwrap();
        Policy::compile(&set, &Lists::new(Vec::new())).unwrap()
    }

    fn geo() -> GeoIp {
        let csv = "198.51.100.0/24,US,NA\n203.0.113.0/24,JP,AS\n";
        GeoIp::from_bytes(waygate_geoip::build_from_csv(csv.as_bytes()).unwrap()).unwrap()
    }

    #[test]
    fn egress_rules_see_identity_geo_and_the_flow() {
        let policy = compile(
            r#"[
              {"id": "jp", "name": "Japan via .10", "action": "egress", "filters": ["egress"],
               "precedence": 1,
               "traffic": "net.dst.geo.country == \"JP\" and net.src.geo.continent == \"North America\" and net.dst.port == 443 and net.protocol == \"tcp\"",
               "identity": "any(identity.groups.name[*] == \"eng\") and identity.email == \"ada@example.com\"",
               "rule_settings": {"egress": {"ipv4": "192.0.2.10", "ipv6": "2001:db8:2:10::/64", "ipv4_fallback": "192.0.2.11"}}},
              {"id": "vnet", "name": "vnet", "action": "egress", "filters": ["egress"],
               "precedence": 2,
               "traffic": "net.vnet_id == \"f70ff985-a4ef-4643-bbbc-4a0ed4fc8415\" and net.src.ip == 198.51.100.0/24",
               "rule_settings": {"egress": {"ipv4": "192.0.2.12", "ipv4_fallback": "0.0.0.0"}}}
            ]"#,
        );
        let geo = geo();
        let mut input = Input::new();
        let flow = ctx();
        flow_input(&mut input, &flow, flow.dst, Some(&geo));
        let rule = policy.stage(Stage::Egress).evaluate(&input).unwrap();
        assert_eq!(rule.id, "jp");
        let choice = egress_choice(rule).unwrap();
        assert_eq!(choice.ipv4, Some(Ipv4Addr::new(192, 0, 2, 10)));
        assert_eq!(
            choice.ipv6.map(|p| p.to_string()).as_deref(),
            Some("2001:db8:2:10::/64")
        );
        assert_eq!(choice.ipv4_fallback, Some(Ipv4Addr::new(192, 0, 2, 11)));

        // Port 80 misses the first rule; the second matches on the vnet and public address.
        let target: SocketAddr = "203.0.113.10:80".parse().unwrap();
        flow_input(&mut input, &flow, target, Some(&geo));
        let rule = policy.stage(Stage::Egress).evaluate(&input).unwrap();
        assert_eq!(rule.id, "vnet");
        assert_eq!(
            egress_choice(rule).unwrap().ipv4_fallback,
            Some(Ipv4Addr::UNSPECIFIED)
        );

        // Without a database, geo fields are unset and geo rules do not match.
        flow_input(&mut input, &flow, flow.dst, None);
        assert_eq!(
            policy
                .stage(Stage::Egress)
                .evaluate(&input)
                .map(|r| r.id.as_str()),
            Some("vnet")
        );
    }

    #[test]
    fn network_rules_block_allow_and_override() {
        let policy = compile(
            r#"[
              {"id": "ssh", "action": "block", "filters": ["l4"], "precedence": 1,
               "traffic": "net.dst.port == 22"},
              {"id": "redirect", "action": "l4_override", "filters": ["l4"], "precedence": 2,
               "traffic": "net.dst.ip == 203.0.113.99",
               "rule_settings": {"l4override": {"ip": "203.0.113.10", "port": 8080}}}
            ]"#,
        );
        let flow = ctx();
        let mut input = Input::new();
        let mut verdict = |target: &str| {
            let target: SocketAddr = target.parse().unwrap();
            flow_input(&mut input, &flow, target, None);
            l4_verdict(policy.stage(Stage::L4).evaluate(&input), target)
        };
        assert_eq!(verdict("203.0.113.10:22"), L4Verdict::Block);
        assert_eq!(
            verdict("203.0.113.99:443"),
            L4Verdict::Allow {
                target: "203.0.113.10:8080".parse().unwrap()
            }
        );
        assert_eq!(
            verdict("203.0.113.10:443"),
            L4Verdict::Allow {
                target: "203.0.113.10:443".parse().unwrap()
            }
        );
    }

    #[test]
    fn flows_wait_for_first_bytes_only_when_a_sniffing_rule_ranks_above_their_match() {
        let loaded = |json: &str| {
            let set = RuleSet::from_json(json).unwrap();
            Loaded::compile(&set, &Lists::new(Vec::new())).unwrap()
        };
        let rules = loaded(
            r#"[{"id": "ssh", "action": "block", "filters": ["l4"], "precedence": 1,
                 "traffic": "net.dst.port == 22"},
                {"id": "sni", "action": "block", "filters": ["l4"], "precedence": 2,
                 "traffic": "net.sni.host == \"blocked.example\""},
                {"id": "web", "action": "allow", "filters": ["l4"], "precedence": 3,
                 "traffic": "net.dst.port == 443"}]"#,
        );
        let l4 = rules.policy.stage(Stage::L4);
        let decided = |port: i64| {
            let mut input = Input::new();
            input.set_int(FieldId::NetDstPort, port);
            match l4.decide(&input, Phase::FirstPacket, Phase::FirstBytes) {
                Decided::Final(rule) => Some(rule.map(|r| r.id.clone())),
                Decided::Wait(_) => None,
            }
        };
        // A match above the SNI rule is final; below it, or no match, waits for the bytes.
        assert_eq!(decided(22), Some(Some("ssh".to_string())));
        assert_eq!(decided(443), None);
        assert_eq!(decided(8080), None);

        let mut input = Input::new();
        input.set_int(FieldId::NetDstPort, 443);
        first_bytes_input(
            &mut input,
            &Detected::Tls {
                sni: Some("www.blocked.example".into()),
            },
        );
        assert_eq!(l4.evaluate(&input).map(|r| r.id.as_str()), Some("web"));
        first_bytes_input(
            &mut input,
            &Detected::Tls {
                sni: Some("blocked.example".into()),
            },
        );
        assert_eq!(l4.evaluate(&input).map(|r| r.id.as_str()), Some("sni"));

        let plain =
            loaded(r#"[{"action": "allow", "filters": ["l4"], "traffic": "net.dst.port == 443"}]"#);
        let input = Input::new();
        let plain = plain.policy.stage(Stage::L4);
        assert!(matches!(
            plain.decide(&input, Phase::FirstPacket, Phase::FirstBytes),
            Decided::Final(None)
        ));
    }

    #[test]
    fn a_rules_file_that_is_no_rule_set_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rules.json");
        std::fs::write(&path, "not json").unwrap();
        assert!(load(&path, None).is_err());
        std::fs::write(
            &path,
            r#"[{"action": "allow", "filters": ["l4"], "traffic": "net.dst.port == 443"}]"#,
        )
        .unwrap();
        assert!(load(&path, None).is_ok());
    }
}
