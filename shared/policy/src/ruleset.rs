//! Rule sets in Cloudflare's JSON form, lists, and their compilation into per-stage policies.
//!
//! [`RuleSet::from_json`] reads a JSON array of rule objects or the API's `{"result": [...]}`;
//! [`RuleSet::to_json`] writes it back with every key it did not know unchanged. [`Policy::compile`]
//! parses and checks every expression, types each rule's settings for its action and builds one
//! [`StagePolicy`] per stage: enabled rules by ascending precedence (file order breaks ties), HTTP
//! Do Not Inspect rules first, DNS rules that read the upstream answer after the others.
//! Compilation runs off the serving path; [`PolicyHandle`] swaps the result in atomically.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value as Json};

use super::ast::Expr;
use super::compile::{CompiledLists, Compiler, Evaluator};
use super::error::Pos;
use super::fields::{FieldId, Phase, Stage};
use super::input::Input;
pub use super::lists::{DocumentError, List, ListType, Lists};
use super::typecheck;

/// A key that may be absent, `null`, or hold a value; absent and `null` both round-trip.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Opt<T> {
    /// The key is not in the object.
    #[default]
    Absent,
    /// The key holds `null`.
    Null,
    /// The key holds a value.
    Some(T),
}

impl<T> Opt<T> {
    /// The value, if there is one.
    pub fn get(&self) -> Option<&T> {
        match self {
            Opt::Some(v) => Some(v),
            _ => None,
        }
    }
    /// True when the key is not in the object.
    pub fn is_absent(&self) -> bool {
        matches!(self, Opt::Absent)
    }
}

impl<T: Serialize> Serialize for Opt<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Opt::Some(v) => v.serialize(s),
            _ => s.serialize_none(),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Opt<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match Option::<T>::deserialize(d)? {
            Some(v) => Opt::Some(v),
            None => Opt::Null,
        })
    }
}

/// One rule object as the Gateway API returns it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Stable id (generated when absent).
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub id: Opt<String>,
    /// Name, shown in logs and on the block page.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub name: Opt<String>,
    /// Description.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub description: Opt<String>,
    /// Lower is evaluated first (assigned above the maximum when absent).
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub precedence: Opt<i64>,
    /// Disabled rules are kept but never match (absent means enabled).
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub enabled: Opt<bool>,
    /// What a match does.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub action: Opt<String>,
    /// The stage, as a one-element array (`["dns"]`).
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub filters: Opt<Vec<String>>,
    /// Traffic expression.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub traffic: Opt<String>,
    /// Identity expression.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub identity: Opt<String>,
    /// Device posture expression.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub device_posture: Opt<String>,
    /// Action parameters.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub rule_settings: Opt<RuleSettings>,
    /// Every other key, kept as written.
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

/// `rule_settings`: the keys Waygate acts on, typed; every other key kept as written.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuleSettings {
    /// Show the block page for blocked requests.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub block_page_enabled: Opt<bool>,
    /// Text shown on the block page.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub block_reason: Opt<String>,
    /// Custom block page.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub block_page: Opt<BlockPageSettings>,
    /// DNS override addresses.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub override_ips: Opt<Vec<String>>,
    /// DNS override host name.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub override_host: Opt<String>,
    /// HTTP redirect target.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub redirect: Opt<RedirectSettings>,
    /// Network override destination.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub l4override: Opt<L4OverrideSettings>,
    /// Egress source addresses.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub egress: Opt<EgressSettings>,
    /// Headers added to proxied HTTP requests (kept as written).
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub add_headers: Opt<Json>,
    /// Every other key, kept as written.
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

/// `rule_settings.block_page`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BlockPageSettings {
    /// Where blocked users are sent.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub target_uri: Opt<String>,
    /// Append the block context to the target.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub include_context: Opt<bool>,
    /// Every other key, kept as written.
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

/// `rule_settings.redirect`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RedirectSettings {
    /// Where requests are redirected.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub target_uri: Opt<String>,
    /// Keep the original path and query.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub preserve_path_and_query: Opt<bool>,
    /// Append the policy context to the target.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub include_context: Opt<bool>,
    /// Every other key, kept as written.
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

/// `rule_settings.l4override`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct L4OverrideSettings {
    /// Destination address.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub ip: Opt<String>,
    /// Destination port.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub port: Opt<i64>,
    /// Every other key, kept as written.
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

/// `rule_settings.egress`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EgressSettings {
    /// Primary IPv4 source.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub ipv4: Opt<String>,
    /// IPv6 source address or prefix.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub ipv6: Opt<String>,
    /// Secondary IPv4 source; `0.0.0.0` means the default egress.
    #[serde(default, skip_serializing_if = "Opt::is_absent")]
    pub ipv4_fallback: Opt<String>,
    /// Every other key, kept as written.
    #[serde(flatten)]
    pub extra: Map<String, Json>,
}

/// A rules document: the rules plus, for the API's envelope, its other keys.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuleSet {
    /// The rules in file order.
    pub rules: Vec<Rule>,
    /// The other keys of a `{"result": [...]}` document; None for a bare array.
    pub envelope: Option<Map<String, Json>>,
}

#[derive(Deserialize)]
struct Envelope {
    result: Vec<Rule>,
    #[serde(flatten)]
    rest: Map<String, Json>,
}

fn fnv(seed: u64, parts: &[&str]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for p in parts {
        for b in p.bytes().chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// A UUID-shaped id derived from the rule's content and position, stable across loads.
fn derived_id(rule: &Rule, index: usize) -> String {
    let s = |o: &Opt<String>| o.get().cloned().unwrap_or_default();
    let idx = index.to_string();
    let parts = [
        s(&rule.name),
        s(&rule.traffic),
        s(&rule.identity),
        s(&rule.device_posture),
        s(&rule.action),
    ];
    let mut refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    refs.push(&idx);
    let (a, b) = (fnv(1, &refs), fnv(2, &refs));
    let v = (u128::from(a) << 64 | u128::from(b)) & !(0xf000u128 << 64 | 0xc000u128 << 48)
        | (0x4000u128 << 64)
        | (0x8000u128 << 48);
    let x = format!("{v:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &x[0..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..32]
    )
}

impl RuleSet {
    /// Reads a JSON array of rules or `{"result": [...]}`, then fills absent ids and precedences.
    pub fn from_json(text: &str) -> Result<RuleSet, DocumentError> {
        let mut set = if text.trim_start().starts_with('[') {
            RuleSet {
                rules: serde_json::from_str(text)?,
                envelope: None,
            }
        } else {
            let env: Envelope = serde_json::from_str(text)?;
            RuleSet {
                rules: env.result,
                envelope: Some(env.rest),
            }
        };
        set.fill_defaults();
        Ok(set)
    }

    /// Gives rules without an id a stable derived one and rules without a precedence one above
    /// the current maximum, in file order.
    pub fn fill_defaults(&mut self) {
        let mut max = self
            .rules
            .iter()
            .filter_map(|r| r.precedence.get().copied())
            .max()
            .unwrap_or(0);
        for (i, rule) in self.rules.iter_mut().enumerate() {
            if rule.id.get().is_none_or(|id| id.is_empty()) {
                rule.id = Opt::Some(derived_id(rule, i));
            }
            if rule.precedence.get().is_none() {
                max = max.saturating_add(1);
                rule.precedence = Opt::Some(max);
            }
        }
    }

    /// The document as JSON, in the shape it was read (array or envelope).
    pub fn to_json(&self) -> Json {
        let rules = serde_json::to_value(&self.rules).unwrap_or(Json::Null);
        match &self.envelope {
            None => rules,
            Some(rest) => {
                let mut obj = rest.clone();
                obj.insert("result".into(), rules);
                Json::Object(obj)
            }
        }
    }
}

/// A block decision's parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BlockAction {
    /// Show a block page.
    pub block_page_enabled: bool,
    /// Reason shown on the page.
    pub reason: Option<String>,
    /// Custom block page address.
    pub target_uri: Option<String>,
    /// Append the context to the custom page address.
    pub include_context: bool,
}

/// How the secondary IPv4 source is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ipv4Fallback {
    /// None configured.
    None,
    /// The default egress (`0.0.0.0`).
    DefaultEgress,
    /// This address.
    Addr(Ipv4Addr),
}

/// Where traffic leaves.
#[derive(Clone, Debug, PartialEq)]
pub enum EgressAction {
    /// The gateway's default egress.
    Default,
    /// Dedicated source addresses.
    Dedicated {
        /// Primary IPv4 source.
        ipv4: Option<Ipv4Addr>,
        /// IPv6 source (a prefix to pick addresses from, or one address as /128).
        ipv6: Option<IpNet>,
        /// Secondary IPv4 source while the primary's location is down.
        ipv4_fallback: Ipv4Fallback,
    },
}

/// A rule's action with its settings, typed and validated.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Allow (DNS resolves normally, l4 and HTTP pass).
    Allow,
    /// Block.
    Block(BlockAction),
    /// DNS override: answer with these addresses or this host's.
    Override {
        /// Addresses to answer with.
        ips: Vec<IpAddr>,
        /// Host whose addresses to answer with.
        host: Option<String>,
    },
    /// DNS SafeSearch.
    SafeSearch,
    /// DNS YouTube restricted mode.
    YtRestricted,
    /// HTTP Do Not Inspect (`off`).
    DoNotInspect,
    /// HTTP redirect.
    Redirect {
        /// Target.
        target_uri: String,
        /// Keep the original path and query.
        preserve_path_and_query: bool,
        /// Append the policy context.
        include_context: bool,
    },
    /// Network override: send the flow to another destination.
    L4Override {
        /// Destination address.
        ip: IpAddr,
        /// Destination port, or None to keep the original.
        port: Option<u16>,
    },
    /// Egress source selection.
    Egress(EgressAction),
}

/// A compiled rule: what the rule set knows about it when it decides.
#[derive(Clone, Debug)]
pub struct CompiledRule {
    /// Position in the rule set.
    pub index: usize,
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Precedence.
    pub precedence: i64,
    /// Action as written.
    pub action_name: String,
    /// Typed action.
    pub action: Action,
    /// `rule_settings` as written (an empty object when absent).
    pub settings: Json,
    /// True for DNS rules that read the upstream answer.
    pub post_resolution: bool,
    /// When the rule can be decided: the latest [`Phase`] of the fields it reads.
    pub phase: Phase,
    /// The category ids it compares category fields with (subcategories included), sorted.
    pub categories: Vec<u16>,
}

/// A stage's decision given what is known about a flow so far.
#[derive(Clone, Copy, Debug)]
pub enum Decided<'a> {
    /// The first matching rule (or none): no rule ranked above it needs more.
    Final(Option<&'a CompiledRule>),
    /// A rule ranked above any match reads fields known only from this phase: decide again
    /// then.
    Wait(Phase),
}

/// One stage's rules in evaluation order.
#[derive(Debug)]
pub struct StagePolicy {
    stage: Stage,
    rules: Vec<CompiledRule>,
    first: Evaluator,
    second: Evaluator,
    /// For each phase known, the rank of the first rule that needs a later one.
    needs_later: [Option<usize>; PHASES],
}

/// How many [`Phase`]s there are.
const PHASES: usize = 4;

/// The rank of the first of `rules` that needs more than each phase, by phase.
fn needs_later(rules: &[CompiledRule]) -> [Option<usize>; PHASES] {
    let phases = [
        Phase::FirstPacket,
        Phase::FirstBytes,
        Phase::Request,
        Phase::Response,
    ];
    phases.map(|known| rules.iter().position(|r| r.phase > known))
}

impl StagePolicy {
    /// The stage.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The enabled rules in evaluation order.
    pub fn rules(&self) -> &[CompiledRule] {
        &self.rules
    }

    /// Decides with what is known: `known`, the phase whose fields `input` holds, and
    /// `reachable`, the latest phase this flow can reach (a UDP flow never sends first bytes
    /// worth sniffing; a rule needing more than that can never match it, so it is not waited for).
    pub fn decide(&self, input: &Input, known: Phase, reachable: Phase) -> Decided<'_> {
        let matched = self.evaluate_rank(input);
        if known >= reachable {
            return Decided::Final(matched.and_then(|i| self.rules.get(i)));
        }
        let Some(later) = self.needs_later[known as usize] else {
            return Decided::Final(matched.and_then(|i| self.rules.get(i)));
        };
        // Only the match and the rules ranked above it can change the decision (the match too,
        // when it read fields not known yet).
        let until = matched.map_or(self.rules.len(), |i| i + 1);
        let waited = self.rules[later..until.max(later)]
            .iter()
            .filter(|r| r.phase > known && r.phase <= reachable)
            .map(|r| r.phase)
            .min();
        match waited {
            Some(phase) => Decided::Wait(phase),
            None => Decided::Final(matched.and_then(|i| self.rules.get(i))),
        }
    }

    /// The rank of the first rule that matches, across both phases.
    fn evaluate_rank(&self, input: &Input) -> Option<usize> {
        self.first
            .first_match(input)
            .or_else(|| self.second.first_match(input).map(|i| self.first.len() + i))
    }

    /// The first rule that matches, across both phases.
    pub fn evaluate(&self, input: &Input) -> Option<&CompiledRule> {
        self.evaluate_first(input)
            .or_else(|| self.evaluate_second(input))
    }

    /// The first phase: DNS rules decidable before resolution, HTTP Do Not Inspect rules then the
    /// rest, or all rules of the other stages.
    pub fn evaluate_first(&self, input: &Input) -> Option<&CompiledRule> {
        self.first
            .first_match(input)
            .and_then(|i| self.rules.get(i))
    }

    /// How many rules run for every input because no index serves them.
    pub fn unindexed(&self) -> usize {
        self.first.unindexed() + self.second.unindexed()
    }

    /// True when a second phase exists: DNS rules that read the upstream answer.
    pub fn needs_resolution(&self) -> bool {
        !self.second.is_empty()
    }

    /// The second phase: DNS rules that read the upstream answer.
    pub fn evaluate_second(&self, input: &Input) -> Option<&CompiledRule> {
        self.second
            .first_match(input)
            .and_then(|i| self.rules.get(self.first.len() + i))
    }

    /// Like [`StagePolicy::evaluate`], trying every rule in order (for tests and comparisons).
    pub fn evaluate_linear(&self, input: &Input) -> Option<&CompiledRule> {
        match self.first.first_match_linear(input) {
            Some(i) => self.rules.get(i),
            None => self
                .second
                .first_match_linear(input)
                .and_then(|i| self.rules.get(self.first.len() + i)),
        }
    }
}

/// What is wrong with one rule.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleError {
    /// Position in the rule set (0-based).
    pub index: usize,
    /// The rule's id.
    pub id: String,
    /// The rule's name.
    pub name: String,
    /// The key at fault (`traffic`, `identity`, `device_posture`, `action`, `filters`,
    /// `rule_settings`).
    pub key: &'static str,
    /// Position inside an expression.
    pub pos: Option<Pos>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rule {} \"{}\" ({}): {}: ",
            self.index + 1,
            self.name,
            self.id,
            self.key
        )?;
        if let Some(pos) = self.pos {
            write!(f, "{pos}: ")?;
        }
        f.write_str(&self.message)
    }
}

struct PolicyErrors {
    errors: Vec<RuleError>,
    warnings: Vec<RuleError>,
}

/// What [`Policy::check`] found.
#[derive(Debug)]
pub struct PolicyCheck {
    /// The compiled policy, when there was no error.
    pub policy: Option<Policy>,
    /// Every error, in rule order.
    pub errors: Vec<RuleError>,
    /// Every warning, in rule order.
    pub warnings: Vec<RuleError>,
}

/// Every stage's compiled rules.
#[derive(Debug)]
pub struct Policy {
    stages: [StagePolicy; 4],
    warnings: Vec<RuleError>,
}

const EXPR_KEYS: [&str; 3] = ["traffic", "identity", "device_posture"];

fn stage_index(s: Stage) -> usize {
    match s {
        Stage::Dns => 0,
        Stage::Http => 1,
        Stage::L4 => 2,
        Stage::Egress => 3,
    }
}

/// The category ids `exprs` compare category fields with (a parent's subcategories included),
/// sorted: what a DNS line's `MatchedCategoryIDs` can show of the rule.
fn tested_categories(exprs: &[&Expr]) -> Vec<u16> {
    use super::ast::Rhs;
    use super::interp::{category_ids, int_literal, set_item_int_ranges};
    let mut out = Vec::new();
    for e in exprs {
        e.walk(&mut |n| {
            let Expr::Compare { lhs, rhs, .. } = n else {
                return;
            };
            if !lhs.field.info().is_category() {
                return;
            }
            let ranges: Vec<(i64, i64)> = match rhs {
                Rhs::Value(lit) => int_literal(lit)
                    .map(|id| category_ids(lhs.field, id).map(|c| (c, c)).collect())
                    .unwrap_or_default(),
                Rhs::Set(items) => items
                    .iter()
                    .flat_map(|i| set_item_int_ranges(lhs.field, i))
                    .collect(),
                Rhs::List(_) => Vec::new(),
            };
            for (a, b) in ranges {
                // Cloudflare's category ids are below 256: a wider range names no more of them.
                out.extend((a.max(0)..=b.min(1023)).filter_map(|id| u16::try_from(id).ok()));
            }
        });
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn names_list(e: &Expr, list: &str) -> bool {
    let mut found = false;
    e.walk(&mut |n| {
        if let Expr::Compare {
            rhs: super::ast::Rhs::List(l),
            ..
        } = n
        {
            found |= l == list;
        }
    });
    found
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim().parse().ok()
}

fn non_empty(o: &Opt<String>) -> Option<&str> {
    o.get().map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// Types the settings a rule's action uses.
fn typed_action(stage: Stage, action: &str, s: &RuleSettings) -> Result<Option<Action>, String> {
    let valid: &[&str] = match stage {
        Stage::Dns => &["allow", "block", "override", "safesearch", "ytrestricted"],
        Stage::Http => &[
            "allow",
            "block",
            "off",
            "redirect",
            "on",
            "isolate",
            "noisolate",
            "scan",
            "noscan",
            "quarantine",
        ],
        Stage::L4 => &["allow", "block", "l4_override", "audit_ssh"],
        Stage::Egress => &["egress"],
    };
    if !valid.contains(&action) {
        return Err(format!(
            "action \"{action}\" is not valid for {stage} rules (expected one of {})",
            valid.join(", ")
        ));
    }
    Ok(Some(match action {
        // `on` (Do Inspect) undoes an earlier Do Not Inspect: here, inspecting is what an
        // allow does.
        "allow" | "on" => Action::Allow,
        "block" => {
            let page = s.block_page.get();
            Action::Block(BlockAction {
                block_page_enabled: s.block_page_enabled.get().copied().unwrap_or(false),
                reason: non_empty(&s.block_reason).map(str::to_owned),
                target_uri: page
                    .and_then(|p| non_empty(&p.target_uri))
                    .map(str::to_owned),
                include_context: page
                    .and_then(|p| p.include_context.get().copied())
                    .unwrap_or(false),
            })
        }
        "override" => {
            let ips = s
                .override_ips
                .get()
                .map(|v| {
                    v.iter()
                        .map(|i| {
                            parse_ip(i)
                                .ok_or_else(|| format!("override_ips: \"{i}\" is not an address"))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?
                .unwrap_or_default();
            let host = non_empty(&s.override_host).map(str::to_owned);
            if ips.is_empty() && host.is_none() {
                return Err("override needs rule_settings.override_ips or override_host".into());
            }
            Action::Override { ips, host }
        }
        "safesearch" => Action::SafeSearch,
        "ytrestricted" => Action::YtRestricted,
        "off" => Action::DoNotInspect,
        "redirect" => {
            let r = s.redirect.get();
            let target = r
                .and_then(|r| non_empty(&r.target_uri))
                .ok_or("redirect needs rule_settings.redirect.target_uri")?;
            Action::Redirect {
                target_uri: target.to_owned(),
                preserve_path_and_query: r
                    .and_then(|r| r.preserve_path_and_query.get().copied())
                    .unwrap_or(false),
                include_context: r
                    .and_then(|r| r.include_context.get().copied())
                    .unwrap_or(false),
            }
        }
        "l4_override" => {
            let o = s
                .l4override
                .get()
                .ok_or("l4_override needs rule_settings.l4override")?;
            let ip = non_empty(&o.ip)
                .and_then(parse_ip)
                .ok_or("l4override.ip must be an address")?;
            let port = match o.port.get() {
                None | Some(0) => None,
                Some(p) => Some(
                    u16::try_from(*p)
                        .map_err(|_| format!("l4override.port {p} is out of range"))?,
                ),
            };
            Action::L4Override { ip, port }
        }
        "egress" => Action::Egress(typed_egress(s.egress.get())?),
        // isolate, noisolate, scan, noscan, quarantine, audit_ssh: accepted with a warning; such
        // a rule never matches (Waygate has no browser isolation or malware scanner).
        _ => return Ok(None),
    }))
}

fn typed_egress(e: Option<&EgressSettings>) -> Result<EgressAction, String> {
    let Some(e) = e else {
        return Ok(EgressAction::Default);
    };
    let v4 = |key: &str, o: &Opt<String>| -> Result<Option<Ipv4Addr>, String> {
        non_empty(o)
            .map(|s| {
                s.parse::<Ipv4Addr>()
                    .map_err(|_| format!("egress.{key}: \"{s}\" is not an IPv4 address"))
            })
            .transpose()
    };
    let ipv4 = v4("ipv4", &e.ipv4)?;
    let ipv6 = non_empty(&e.ipv6)
        .map(|s| {
            super::interp::parse_net(s)
                .filter(|n| matches!(n, IpNet::V6(_)))
                .ok_or_else(|| format!("egress.ipv6: \"{s}\" is not an IPv6 address or prefix"))
        })
        .transpose()?;
    let ipv4_fallback = match v4("ipv4_fallback", &e.ipv4_fallback)? {
        None => Ipv4Fallback::None,
        Some(a) if a.is_unspecified() => Ipv4Fallback::DefaultEgress,
        Some(a) => Ipv4Fallback::Addr(a),
    };
    if ipv4.is_none() && ipv6.is_none() {
        return Ok(EgressAction::Default);
    }
    Ok(EgressAction::Dedicated {
        ipv4,
        ipv6,
        ipv4_fallback,
    })
}

impl Policy {
    /// Parses, checks and compiles every rule; all errors are reported together.
    pub fn compile(set: &RuleSet, lists: &Lists) -> Result<Policy, Vec<RuleError>> {
        Policy::build(set, lists, false).map_err(|e| e.errors)
    }

    /// Like [`Policy::compile`] for rules whose lists file is not at hand: every `$list` matches
    /// nothing and is reported as a warning.
    pub fn compile_without_lists(set: &RuleSet) -> Result<Policy, Vec<RuleError>> {
        Policy::build(set, &Lists::default(), true).map_err(|e| e.errors)
    }

    /// Compiles for `rules check`: the policy when there is no error, every error, and the
    /// warnings also when there are errors. Without `lists` every `$list` matches nothing.
    pub fn check(set: &RuleSet, lists: Option<&Lists>) -> PolicyCheck {
        match Policy::build(set, lists.unwrap_or(&Lists::default()), lists.is_none()) {
            Ok(policy) => PolicyCheck {
                warnings: policy.warnings.clone(),
                policy: Some(policy),
                errors: Vec::new(),
            },
            Err(failed) => PolicyCheck {
                policy: None,
                errors: failed.errors,
                warnings: failed.warnings,
            },
        }
    }

    fn build(set: &RuleSet, lists: &Lists, missing_ok: bool) -> Result<Policy, PolicyErrors> {
        let compiled_lists = CompiledLists::new(lists);
        let mut compiler = Compiler::new(lists, &compiled_lists);
        if missing_ok {
            compiler = compiler.allow_missing_lists();
        }
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        // Per stage: (phase, precedence, index, rule, program).
        let mut staged: [Vec<_>; 4] = Default::default();
        for (index, rule) in set.rules.iter().enumerate() {
            let id = rule.id.get().cloned().unwrap_or_default();
            let name = rule.name.get().cloned().unwrap_or_default();
            let err = |key: &'static str, pos: Option<Pos>, message: String| RuleError {
                index,
                id: id.clone(),
                name: name.clone(),
                key,
                pos,
                message,
            };
            let filters = rule.filters.get().map(Vec::as_slice).unwrap_or(&[]);
            let stage = match filters {
                [one] => match Stage::parse(one) {
                    Some(s) => s,
                    // Gateway's resolver policies: kept so exports load whole, never evaluated.
                    None if one == "dns_resolver" => {
                        warnings.push(err(
                            "filters",
                            None,
                            "resolver policies (\"dns_resolver\") are not supported; the rule never matches".into(),
                        ));
                        continue;
                    }
                    None => {
                        errors.push(err(
                            "filters",
                            None,
                            format!("unknown filter \"{one}\" (expected dns, http, l4 or egress)"),
                        ));
                        continue;
                    }
                },
                _ => {
                    errors.push(err(
                        "filters",
                        None,
                        "must hold exactly one of \"dns\", \"http\", \"l4\", \"egress\"".into(),
                    ));
                    continue;
                }
            };
            let action_name = rule.action.get().cloned().unwrap_or_default();
            let settings = rule.rule_settings.get().cloned().unwrap_or_default();
            let action = match typed_action(stage, &action_name, &settings) {
                Ok(a) => a,
                Err(m) => {
                    let key = if m.starts_with("action") {
                        "action"
                    } else {
                        "rule_settings"
                    };
                    errors.push(err(key, None, m));
                    None
                }
            };
            let mut exprs = Vec::new();
            let mut ok = true;
            for (key, text) in
                EXPR_KEYS
                    .iter()
                    .zip([&rule.traffic, &rule.identity, &rule.device_posture])
            {
                let Some(text) = non_empty(text) else {
                    continue;
                };
                match typecheck::parse_checked(text, stage) {
                    Ok((e, warns)) => {
                        for w in warns {
                            let text = w.to_string();
                            let prefix = format!("{}: ", w.pos);
                            let message = text.strip_prefix(&prefix).unwrap_or(&text).to_owned();
                            warnings.push(err(key, Some(w.pos), message));
                        }
                        exprs.push((*key, e));
                    }
                    Err(e) => {
                        errors.push(err(key, Some(e.pos), e.kind.to_string()));
                        ok = false;
                    }
                }
            }
            let rule_phase = exprs
                .iter()
                .flat_map(|(_, e)| e.fields())
                .map(FieldId::phase)
                .max()
                .unwrap_or(Phase::FirstPacket);
            let mut post = false;
            for (_, e) in &exprs {
                post |=
                    stage == Stage::Dns && e.fields().iter().any(|f| f.info().post_resolution());
            }
            let refs: Vec<&Expr> = exprs.iter().map(|(_, e)| e).collect();
            let categories = tested_categories(&refs);
            let compiled = compiler.compile_rule(&refs);
            for (list, pos) in compiler.take_missing_lists() {
                let key = exprs
                    .iter()
                    .find(|(_, e)| names_list(e, &list))
                    .map_or("traffic", |(k, _)| k);
                warnings.push(err(
                    key,
                    Some(pos),
                    format!(
                        "list \"${list}\" is not known without a lists file; it matches nothing"
                    ),
                ));
            }
            let program = match compiled {
                Ok(p) => p,
                Err(e) => {
                    if ok {
                        // The compiler only fails on lists and regexes, which sit in one of the
                        // expressions; report it against the first that names them.
                        errors.push(err(
                            exprs.first().map_or("traffic", |(k, _)| k),
                            Some(e.pos),
                            e.kind.to_string(),
                        ));
                    }
                    continue;
                }
            };
            if !ok {
                continue;
            }
            let Some(action) = action else {
                if errors.last().is_none_or(|e| e.index != index) {
                    warnings.push(err(
                        "action",
                        None,
                        format!(
                            "action \"{action_name}\" is not supported; the rule never matches"
                        ),
                    ));
                }
                continue;
            };
            if rule.enabled.get() == Some(&false) {
                continue;
            }
            let phase = match stage {
                Stage::Dns => u8::from(post),
                Stage::Http => u8::from(action != Action::DoNotInspect),
                _ => 0,
            };
            let precedence = rule.precedence.get().copied().unwrap_or(i64::MAX);
            staged[stage_index(stage)].push((
                phase,
                precedence,
                CompiledRule {
                    index,
                    id: id.clone(),
                    name: name.clone(),
                    precedence,
                    action_name,
                    action,
                    settings: serde_json::to_value(&rule.rule_settings)
                        .ok()
                        .filter(|v| !v.is_null())
                        .unwrap_or_else(|| Json::Object(Map::new())),
                    post_resolution: post,
                    phase: rule_phase,
                    categories,
                },
                program,
            ));
        }
        if !errors.is_empty() {
            return Err(PolicyErrors { errors, warnings });
        }
        let build = |stage: Stage, mut v: Vec<(u8, i64, CompiledRule, super::compile::Program)>| {
            v.sort_by_key(|(phase, prec, r, _)| (*phase, *prec, r.index));
            let split = if stage == Stage::Dns {
                v.iter().take_while(|(phase, ..)| *phase == 0).count()
            } else {
                v.len()
            };
            let mut rules = Vec::with_capacity(v.len());
            let mut first = Vec::with_capacity(split);
            let mut second = Vec::new();
            for (i, (_, _, r, p)) in v.into_iter().enumerate() {
                rules.push(r);
                if i < split {
                    first.push(p);
                } else {
                    second.push(p);
                }
            }
            StagePolicy {
                stage,
                needs_later: needs_later(&rules),
                rules,
                first: Evaluator::new(first),
                second: Evaluator::new(second),
            }
        };
        let [dns, http, l4, egress] = staged;
        Ok(Policy {
            stages: [
                build(Stage::Dns, dns),
                build(Stage::Http, http),
                build(Stage::L4, l4),
                build(Stage::Egress, egress),
            ],
            warnings,
        })
    }

    /// One stage's rules.
    pub fn stage(&self, stage: Stage) -> &StagePolicy {
        &self.stages[stage_index(stage)]
    }

    /// Things worth telling that do not stop the rules from loading.
    pub fn warnings(&self) -> &[RuleError] {
        &self.warnings
    }

    /// A policy without rules: every stage takes its default.
    pub fn empty() -> Policy {
        let none = |stage| StagePolicy {
            stage,
            needs_later: [None; PHASES],
            rules: Vec::new(),
            first: Evaluator::default(),
            second: Evaluator::default(),
        };
        Policy {
            stages: [
                none(Stage::Dns),
                none(Stage::Http),
                none(Stage::L4),
                none(Stage::Egress),
            ],
            warnings: Vec::new(),
        }
    }
}

/// The policy in force, replaced atomically: readers keep the one they loaded until they finish.
pub struct PolicyHandle {
    current: ArcSwap<Policy>,
}

impl PolicyHandle {
    /// A handle serving `policy`.
    pub fn new(policy: Policy) -> PolicyHandle {
        PolicyHandle {
            current: ArcSwap::from_pointee(policy),
        }
    }

    /// The policy in force (cheap; no lock).
    pub fn load(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.current.load()
    }

    /// The policy in force, as an owned reference for long use.
    pub fn load_full(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Puts a new policy in force; returns the old one.
    pub fn replace(&self, policy: Policy) -> Arc<Policy> {
        self.current.swap(Arc::new(policy))
    }
}

impl fmt::Debug for PolicyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicyHandle").finish_non_exhaustive()
    }
}

/// Search engines whose SafeSearch the default DNS rules enforce.
pub const SAFESEARCH_DOMAINS: &[&str] = &[
    "google.com",
    "bing.com",
    "duckduckgo.com",
    "yandex.com",
    "yandex.ru",
    "youtube.com",
];

/// The seed's DNS order of operations as rules: Child Abuse blocked first, then the allow list,
/// the block list, SafeSearch, blocked categories; no match resolves normally. `allow_list` and
/// `block_list` name DOMAIN lists; `blocked_categories` are content or security category ids
/// (security threats are `21`).
pub fn default_dns_rules(
    allow_list: &str,
    block_list: &str,
    blocked_content: &[i64],
    blocked_security: &[i64],
) -> RuleSet {
    let ids = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(" ");
    let rule = |prec: i64, name: &str, action: &str, traffic: String| Rule {
        name: Opt::Some(name.into()),
        precedence: Opt::Some(prec),
        enabled: Opt::Some(true),
        action: Opt::Some(action.into()),
        filters: Opt::Some(vec!["dns".into()]),
        traffic: Opt::Some(traffic),
        ..Rule::default()
    };
    let safesearch = SAFESEARCH_DOMAINS
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(" ");
    let mut category = Vec::new();
    if !blocked_content.is_empty() {
        category.push(format!(
            "any(dns.content_category[*] in {{{}}})",
            ids(blocked_content)
        ));
    }
    if !blocked_security.is_empty() {
        category.push(format!(
            "any(dns.security_category[*] in {{{}}})",
            ids(blocked_security)
        ));
    }
    let mut rules = vec![
        rule(
            1,
            "Child abuse",
            "block",
            format!(
                "any(dns.content_category[*] in {{{}}})",
                super::categories::CHILD_ABUSE
            ),
        ),
        rule(
            2,
            "Allow list",
            "allow",
            format!("any(dns.domains[*] in ${allow_list})"),
        ),
        rule(
            3,
            "Block list",
            "block",
            format!("any(dns.domains[*] in ${block_list})"),
        ),
        rule(
            4,
            "SafeSearch",
            "safesearch",
            format!("any(dns.domains[*] in {{{safesearch}}})"),
        ),
    ];
    if !category.is_empty() {
        rules.push(rule(
            5,
            "Blocked categories",
            "block",
            category.join(" or "),
        ));
    }
    let mut set = RuleSet {
        rules,
        envelope: None,
    };
    set.fill_defaults();
    set
}
