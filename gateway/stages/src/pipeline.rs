//! The stages over a flow, in Cloudflare's order: egress, then network (l4); the HTTP stage will
//! follow them here.
//!
//! Every stage decides over the flow's context and what is known so far ([`Known`]). A stage whose
//! rules rank a rule above the match that reads fields not known yet (SNI, the detected protocol)
//! does not decide: the pipeline answers [`FlowDecision::wait`] and the engine asks again with
//! more. Which phase each rule needs comes from the policy library's compiled rules
//! ([`CompiledRule::phase`]), so nothing here reads an expression.

use std::net::SocketAddr;

use waygate_geoip::GeoIp;
use waygate_model::{FlowCtx, Protocol};
use waygate_policy::fields::{Phase, Stage};
use waygate_policy::input::Input;
use waygate_policy::ruleset::{CompiledRule, Decided};
use waygate_wire::sniff::Detected;

use crate::egress::EgressChoice;
use crate::policy::{self, L4Verdict, Loaded};

/// What is known about a flow when the stages run.
#[derive(Debug, Clone, Copy)]
pub enum Known<'a> {
    /// Its first packet: addresses, ports, the device and its user.
    FirstPacket,
    /// The client's first bytes too: the detected protocol and TLS SNI.
    FirstBytes(&'a Detected),
}

impl Known<'_> {
    /// The phase this much knowledge reaches.
    pub fn phase(&self) -> Phase {
        match self {
            Known::FirstPacket => Phase::FirstPacket,
            Known::FirstBytes(_) => Phase::FirstBytes,
        }
    }
}

/// What the stages decided for a flow.
#[derive(Debug, Clone)]
pub struct FlowDecision<'r> {
    /// The egress rule that matched; `None` takes the default egress.
    pub egress_rule: Option<&'r CompiledRule>,
    /// The source the egress rule asks for.
    pub egress: Option<EgressChoice>,
    /// The network rule that matched (`None` when none did, or while waiting).
    pub network_rule: Option<&'r CompiledRule>,
    /// Where the flow goes, or that it is refused. While waiting: what the rules decided so
    /// far, which the flow may act on provisionally (connect ahead, or hold).
    pub verdict: L4Verdict,
    /// Decide again once this phase is known; the decision is not final.
    pub wait: Option<Phase>,
}

/// Runs the stages; owns the scratch input so a decision allocates nothing.
#[derive(Debug, Default)]
pub struct Pipeline {
    input: Input,
}

impl Pipeline {
    /// A pipeline with an empty scratch input.
    pub fn new() -> Pipeline {
        Pipeline::default()
    }

    /// Runs egress then network for `ctx` going to `target` (the dialled destination), with
    /// what is `known`.
    pub fn decide<'r>(
        &mut self,
        rules: &'r Loaded,
        geo: Option<&GeoIp>,
        ctx: &FlowCtx,
        target: SocketAddr,
        known: Known<'_>,
    ) -> FlowDecision<'r> {
        policy::flow_input(&mut self.input, ctx, target, geo);
        if let Known::FirstBytes(detected) = known {
            policy::first_bytes_input(&mut self.input, detected);
        }
        let egress_rule = rules.policy.stage(Stage::Egress).evaluate(&self.input);
        // Only a TCP flow has first bytes to wait for; the HTTP phases belong to the HTTP stage.
        let reachable = match ctx.protocol {
            Protocol::Tcp => Phase::FirstBytes,
            Protocol::Udp | Protocol::Icmp => Phase::FirstPacket,
        };
        let network = rules
            .policy
            .stage(Stage::L4)
            .decide(&self.input, known.phase(), reachable);
        let (network_rule, wait) = match network {
            Decided::Final(rule) => (rule, None),
            Decided::Wait(phase) => {
                // What the rules decided without the fields still to come.
                let so_far = rules.policy.stage(Stage::L4).evaluate(&self.input);
                return FlowDecision {
                    egress_rule,
                    egress: egress_rule.and_then(policy::egress_choice),
                    network_rule: None,
                    verdict: policy::l4_verdict(so_far, target),
                    wait: Some(phase),
                };
            }
        };
        FlowDecision {
            egress_rule,
            egress: egress_rule.and_then(policy::egress_choice),
            network_rule,
            verdict: policy::l4_verdict(network_rule, target),
            wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::sync::Arc;
    use std::time::Instant;

    use waygate_model::{DeviceInfo, FlowRules};
    use waygate_policy::ruleset::{Lists, RuleSet};

    use super::*;

    fn loaded(rules: &str) -> Loaded {
        let set = RuleSet::from_json(rules).expect("rules parse");
        Loaded::compile(&set, &Lists::new(Vec::new())).expect("rules compile")
    }

    fn ctx(protocol: Protocol, dst: &str) -> FlowCtx {
        FlowCtx {
            id: 1,
            peer: 1,
            device: Arc::new(DeviceInfo {
                id: "d1".into(),
                name: "laptop".into(),
                email: "a@example.com".into(),
                user_name: None,
                groups: vec![],
                extras: Arc::default(),
                vnet_id: None,
                ipv4: Ipv4Addr::new(100, 96, 0, 2),
                ipv6: Ipv6Addr::LOCALHOST,
                log_fields: Default::default(),
            }),
            device_public: None,
            protocol,
            src: "100.96.0.2:40000".parse().expect("addr"),
            dst: dst.parse().expect("addr"),
            #[allow(clippy::disallowed_methods)] // any instant: the stages ignore it
            opened: Instant::now(),
            rules: FlowRules::default(),
        }
    }

    const RULES: &str = r#"[
        {"id": "sni", "name": "block by SNI", "action": "block", "enabled": true, "precedence": 1,
         "filters": ["l4"], "traffic": "net.sni.host == \"blocked.example\""},
        {"id": "port", "name": "block 8443", "action": "block", "enabled": true, "precedence": 2,
         "filters": ["l4"], "traffic": "net.dst.port == 8443"}
    ]"#;

    #[test]
    fn a_tcp_flow_waits_for_first_bytes_when_a_sni_rule_ranks_above() {
        let rules = loaded(RULES);
        let mut p = Pipeline::new();
        let c = ctx(Protocol::Tcp, "198.51.100.7:8443");
        let d = p.decide(&rules, None, &c, c.dst, Known::FirstPacket);
        assert_eq!(d.wait, Some(Phase::FirstBytes));
        // Provisionally the port rule blocks: the flow is held, not connected.
        assert_eq!(d.verdict, L4Verdict::Block);
        let tls = Detected::Tls {
            sni: Some("other.example".into()),
        };
        let d = p.decide(&rules, None, &c, c.dst, Known::FirstBytes(&tls));
        assert_eq!(d.wait, None);
        assert_eq!(d.network_rule.map(|r| r.id.as_str()), Some("port"));
        let tls = Detected::Tls {
            sni: Some("blocked.example".into()),
        };
        let d = p.decide(&rules, None, &c, c.dst, Known::FirstBytes(&tls));
        assert_eq!(d.network_rule.map(|r| r.id.as_str()), Some("sni"));
        assert_eq!(d.verdict, L4Verdict::Block);
    }

    #[test]
    fn udp_never_waits_for_first_bytes() {
        let rules = loaded(RULES);
        let c = ctx(Protocol::Udp, "198.51.100.7:8443");
        let d = Pipeline::new().decide(&rules, None, &c, c.dst, Known::FirstPacket);
        assert_eq!(d.wait, None);
        assert_eq!(d.network_rule.map(|r| r.id.as_str()), Some("port"));
    }

    #[test]
    fn a_match_ranked_above_every_sni_rule_decides_at_once() {
        let rules = loaded(
            r#"[
            {"id": "port", "name": "allow 443", "action": "allow", "enabled": true, "precedence": 1,
             "filters": ["l4"], "traffic": "net.dst.port == 443"},
            {"id": "sni", "name": "block by SNI", "action": "block", "enabled": true, "precedence": 2,
             "filters": ["l4"], "traffic": "net.sni.host == \"blocked.example\""}
        ]"#,
        );
        let c = ctx(Protocol::Tcp, "198.51.100.7:443");
        let d = Pipeline::new().decide(&rules, None, &c, c.dst, Known::FirstPacket);
        assert_eq!(d.wait, None);
        assert_eq!(d.network_rule.map(|r| r.id.as_str()), Some("port"));
        // A flow no earlier rule matches still waits: the SNI rule may match it.
        let c = ctx(Protocol::Tcp, "198.51.100.7:80");
        let d = Pipeline::new().decide(&rules, None, &c, c.dst, Known::FirstPacket);
        assert_eq!(d.wait, Some(Phase::FirstBytes));
        assert_eq!(d.verdict, L4Verdict::Allow { target: c.dst });
    }

    #[test]
    fn egress_is_decided_with_the_network_stage() {
        let rules = loaded(
            r#"[
            {"id": "eg", "name": "dedicated", "action": "egress", "enabled": true, "precedence": 1,
             "filters": ["egress"], "traffic": "net.dst.port == 443",
             "rule_settings": {"egress": {"ipv4": "192.0.2.9", "ipv6": "2001:db8::/64"}}}
        ]"#,
        );
        let c = ctx(Protocol::Tcp, "198.51.100.7:443");
        let d = Pipeline::new().decide(&rules, None, &c, c.dst, Known::FirstPacket);
        assert_eq!(d.egress_rule.map(|r| r.id.as_str()), Some("eg"));
        assert_eq!(
            d.egress.map(|e| e.ipv4),
            Some(Some("192.0.2.9".parse().expect("addr")))
        );
    }
}
