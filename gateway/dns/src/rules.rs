//! The rule engine behind the resolver's policy seam: DNS rules of the loaded rule set decide each
//! query from the question and who asked (pre-resolution rules), then, when the set has rules on
//! the answer (`dns.resolved_ips`, `dns.response.cname`, `dns.dst.geo.*`), from the upstream's
//! answer.
//!
//! Block answers follow the rule's settings: REFUSED by default; `block_page_enabled: false`
//! answers `0.0.0.0` / `::` (as Cloudflare does with its block page off), `true` the configured
//! block-page address; the Waygate key `"dns_block": "refused" | "nxdomain" | "zero"` picks one
//! explicitly.

use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use hickory_proto::rr::{Name, RData, Record};
use waygate_policy::category_db::CategoryDb;
use waygate_policy::fields::{FieldId, Stage};
use waygate_policy::input::Input;
use waygate_policy::ruleset::{Action, CompiledRule};

use super::policy::{BlockMode, Decision, DnsPolicy, LogCategories, PolicyVerdict, QueryInfo};
use waygate_geoip::GeoIp;
use waygate_model::activity::RuleRef;
use waygate_stages::policy::Loaded;

/// Yandex's family-search address (Yandex publishes no CNAME target for it).
pub const YANDEX_SAFE: Ipv4Addr = Ipv4Addr::new(213, 180, 193, 56);

/// The DNS rules in force, with what block answers need.
#[derive(Clone)]
pub struct DnsRules {
    loaded: Arc<Loaded>,
    /// Log labels of the DNS rules by rule index, made once per rule set.
    labels: Arc<[Option<Arc<str>>]>,
    /// Ids and names of the DNS rules by rule index, for the activity logs.
    refs: Arc<[Option<Arc<RuleRef>>]>,
    geoip: Option<Arc<GeoIp>>,
    categories: Option<Arc<CategoryDb>>,
    block_page: Option<IpAddr>,
}

thread_local! {
    /// Reused per thread, so deciding allocates nothing once warm.
    static INPUT: RefCell<Input> = RefCell::new(Input::new());
}

impl DnsRules {
    /// Rules from `loaded`; `block_page` answers rules with `block_page_enabled: true`.
    pub fn new(loaded: Arc<Loaded>, geoip: Option<Arc<GeoIp>>, block_page: Option<IpAddr>) -> Self {
        let rules = loaded.policy.stage(Stage::Dns).rules();
        let mut labels = vec![None; rules.iter().map(|r| r.index + 1).max().unwrap_or(0)];
        let mut refs = vec![None; labels.len()];
        for r in rules {
            labels[r.index] = Some(Arc::from(rule_label(r)));
            refs[r.index] = Some(Arc::new(
                RuleRef::new(&r.id, &r.name).with_categories(r.categories.iter().copied()),
            ));
        }
        DnsRules {
            loaded,
            labels: labels.into(),
            refs: refs.into(),
            geoip,
            categories: None,
            block_page,
        }
    }

    /// The same rules reading `categories` for `dns.content_category` and
    /// `dns.security_category`.
    pub fn with_categories(mut self, categories: Option<Arc<CategoryDb>>) -> Self {
        self.categories = categories;
        self
    }

    fn fill(&self, input: &mut Input, query: &QueryInfo<'_>) {
        input.clear();
        input.set_host(FieldId::DnsFqdn, query.name);
        let rtype: &'static str = query.qtype.into();
        input.set_str(FieldId::DnsQueryRtype, rtype);
        if let Some(db) = &self.categories {
            let found = db.lookup(query.name);
            input.set_ints(FieldId::DnsContentCategory, found.content);
            input.set_ints(FieldId::DnsSecurityCategory, found.security);
        }
        let client = query.client;
        input.set_ip(FieldId::DnsSrcIp, client.src_ip);
        if let Some(location) = &client.location {
            input.set_str(FieldId::DnsLocation, location);
        }
        if let Some(device) = &client.device {
            waygate_stages::policy::fill_identity(input, device);
        }
        if let (Some(geo), Some(public)) = (&self.geoip, client.public_ip) {
            let g = geo.lookup(public);
            if let Some(c) = g.country {
                input.set_str(FieldId::DnsSrcGeoCountry, c.as_str());
            }
            if let Some(c) = g.continent {
                input.set_str(FieldId::DnsSrcGeoContinent, c.as_str());
            }
        }
    }

    fn verdict(&self, rule: &CompiledRule, query: &QueryInfo<'_>) -> PolicyVerdict {
        let decision = match &rule.action {
            Action::Block(_) => Decision::Block(self.block_mode(rule)),
            Action::Override { ips, host } => match host {
                Some(host) => match Name::from_ascii(host) {
                    Ok(mut name) => {
                        // Written without the root dot; asked upstream as the absolute name.
                        name.set_fqdn(true);
                        Decision::OverrideHost(name)
                    }
                    Err(_) => Decision::Block(BlockMode::Refused),
                },
                None => Decision::OverrideIps(ips.clone()),
            },
            Action::SafeSearch => safe_search(query.name).unwrap_or(Decision::Resolve),
            Action::YtRestricted => {
                let moderate = rule
                    .settings
                    .get("youtube_restricted")
                    .and_then(|v| v.as_str())
                    == Some("moderate");
                youtube(query.name, moderate).unwrap_or(Decision::Resolve)
            }
            _ => Decision::Resolve,
        };
        let label = self.labels.get(rule.index).cloned().flatten();
        PolicyVerdict {
            decision,
            rule: label.or_else(|| Some(Arc::from(rule_label(rule)))),
            policy: self.refs.get(rule.index).cloned().flatten(),
        }
    }

    fn block_mode(&self, rule: &CompiledRule) -> BlockMode {
        match rule.settings.get("dns_block").and_then(|v| v.as_str()) {
            Some("nxdomain") => return BlockMode::NxDomain,
            Some("zero") => return BlockMode::ZeroIp,
            Some("refused") => return BlockMode::Refused,
            _ => {}
        }
        match rule
            .settings
            .get("block_page_enabled")
            .and_then(|v| v.as_bool())
        {
            Some(true) => self
                .block_page
                .map_or(BlockMode::ZeroIp, BlockMode::Address),
            Some(false) => BlockMode::ZeroIp,
            None => BlockMode::Refused,
        }
    }
}

fn rule_label(rule: &CompiledRule) -> String {
    if rule.name.is_empty() {
        rule.id.clone()
    } else {
        format!("{} ({})", rule.id, rule.name)
    }
}

impl DnsPolicy for DnsRules {
    fn decide(&self, query: &QueryInfo<'_>) -> PolicyVerdict {
        INPUT.with(|cell| {
            let mut input = cell.borrow_mut();
            self.fill(&mut input, query);
            let dns = self.loaded.policy.stage(Stage::Dns);
            match dns.evaluate_first(&input) {
                Some(rule) => self.verdict(rule, query),
                None => Decision::Resolve.into(),
            }
        })
    }

    fn wants_answer(&self) -> bool {
        self.loaded.policy.stage(Stage::Dns).needs_resolution()
    }

    fn log_categories(
        &self,
        name: &str,
        rule: Option<&RuleRef>,
        ips: &[IpAddr],
        out: &mut LogCategories,
    ) {
        let Some(db) = &self.categories else {
            return;
        };
        out.query.extend_from_slice(db.ids(name));
        if let Some(rule) = rule {
            // Both sorted: the name's categories the rule tested.
            out.matched.extend(
                out.query
                    .iter()
                    .filter(|c| rule.categories.binary_search(c).is_ok()),
            );
        }
        for ip in ips {
            out.resolved_ips.extend_from_slice(db.ip_ids(*ip));
        }
        if ips.len() > 1 {
            out.resolved_ips.sort_unstable();
            out.resolved_ips.dedup();
        }
    }

    fn decide_answer(&self, query: &QueryInfo<'_>, answers: &[Record]) -> Option<PolicyVerdict> {
        INPUT.with(|cell| {
            let mut input = cell.borrow_mut();
            self.fill(&mut input, query);
            let ips: Vec<IpAddr> = answers
                .iter()
                .filter_map(|r| match r.data() {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })
                .collect();
            input.set_ips(FieldId::DnsResolvedIps, ips.iter().copied());
            let cnames: Vec<String> = answers
                .iter()
                .filter_map(|r| match r.data() {
                    RData::CNAME(c) => Some(c.0.to_ascii().trim_end_matches('.').to_string()),
                    _ => None,
                })
                .collect();
            input.set_strs(FieldId::DnsResponseCname, cnames.iter().map(String::as_str));
            if let Some(geo) = &self.geoip {
                let found: Vec<_> = ips.iter().map(|ip| geo.lookup(*ip)).collect();
                let countries: Vec<&str> = found
                    .iter()
                    .filter_map(|g| g.country.as_ref().map(|c| c.as_str()))
                    .collect();
                let continents: Vec<&str> = found
                    .iter()
                    .filter_map(|g| g.continent.as_ref().map(|c| c.as_str()))
                    .collect();
                input.set_strs(FieldId::DnsDstGeoCountry, countries);
                input.set_strs(FieldId::DnsDstGeoContinent, continents);
            }
            let rule = self
                .loaded
                .policy
                .stage(Stage::Dns)
                .evaluate_second(&input)?;
            Some(self.verdict(rule, query))
        })
    }
}

fn labels(name: &str) -> Vec<&str> {
    name.trim_end_matches('.').split('.').collect()
}

/// Whether `rest` (the labels after the engine's name) is a country or generic TLD of the kind
/// search engines register: `com`, `de`, `co.uk`, `com.au`.
fn engine_tld(rest: &[&str]) -> bool {
    let short = |l: &&str| l.len() == 2 && l.bytes().all(|b| b.is_ascii_lowercase());
    match rest {
        [one] => *one == "com" || short(one),
        [first, cc] => (*first == "co" || *first == "com") && short(cc),
        _ => false,
    }
}

fn target(name: &str) -> Decision {
    match Name::from_ascii(name) {
        Ok(n) => Decision::SafeSearch(n),
        Err(_) => Decision::Resolve,
    }
}

/// The SafeSearch answer for `name` (lowercase), if it is a search engine's name.
pub fn safe_search(name: &str) -> Option<Decision> {
    let l = labels(name);
    match l.as_slice() {
        ["www", "google", ..] if engine_tld(&l[2..]) => Some(target("forcesafesearch.google.com.")),
        ["google", ..] if engine_tld(&l[1..]) => Some(target("forcesafesearch.google.com.")),
        ["www" | "edgeservices", "bing", "com"] => Some(target("strict.bing.com.")),
        ["duckduckgo", "com"] | ["www" | "start", "duckduckgo", "com"] => {
            Some(target("safe.duckduckgo.com."))
        }
        ["ya", "ru"] => Some(Decision::OverrideIps(vec![IpAddr::V4(YANDEX_SAFE)])),
        ["yandex", ..] if engine_tld(&l[1..]) => {
            Some(Decision::OverrideIps(vec![IpAddr::V4(YANDEX_SAFE)]))
        }
        ["www", "yandex", ..] if engine_tld(&l[2..]) => {
            Some(Decision::OverrideIps(vec![IpAddr::V4(YANDEX_SAFE)]))
        }
        _ => youtube(name, false),
    }
}

/// The YouTube restricted-mode answer for `name` (lowercase; strict, or `moderate`), if it is
/// YouTube's.
pub fn youtube(name: &str, moderate: bool) -> Option<Decision> {
    let youtube = matches!(
        name.trim_end_matches('.'),
        "www.youtube.com"
            | "m.youtube.com"
            | "youtubei.googleapis.com"
            | "youtube.googleapis.com"
            | "www.youtube-nocookie.com"
    );
    youtube.then(|| {
        target(if moderate {
            "restrictmoderate.youtube.com."
        } else {
            "restrict.youtube.com."
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::ClientCtx;
    use hickory_proto::rr::RecordType;
    use waygate_policy::ruleset::{Lists, RuleSet};

    fn rules(json: &str) -> DnsRules {
        let set = RuleSet::from_json(json).unwrap();
        let loaded = Loaded::compile(&set, &Lists::new(Vec::new())).unwrap();
        DnsRules::new(Arc::new(loaded), None, Some("192.0.2.80".parse().unwrap()))
    }

    fn ask(r: &DnsRules, client: &ClientCtx, name: &str, qtype: RecordType) -> PolicyVerdict {
        r.decide(&QueryInfo {
            client,
            name: name.trim_end_matches('.'),
            qtype,
        })
    }

    fn alice() -> ClientCtx {
        let mut c = ClientCtx::from_ip("100.96.0.2".parse().unwrap());
        c.device = Some(
            crate::testkit::device()
                .id("d-alice")
                .name("alice-laptop")
                .email("alice@example.com")
                .groups(&["eng"])
                .arc(),
        );
        c
    }

    #[test]
    fn rules_decide_by_name_type_and_identity_with_each_block_answer() {
        let r = rules(
            r#"[{"id": "eng-games", "name": "No games for eng", "action": "block", "filters": ["dns"],
                 "precedence": 1, "traffic": "any(dns.domains[*] == \"games.example\")",
                 "identity": "any(identity.groups.name[*] in {\"eng\"})"},
                {"id": "nx", "action": "block", "filters": ["dns"], "precedence": 2,
                 "traffic": "dns.fqdn == \"gone.example\"", "rule_settings": {"dns_block": "nxdomain"}},
                {"id": "page", "action": "block", "filters": ["dns"], "precedence": 3,
                 "traffic": "dns.fqdn == \"page.example\"", "rule_settings": {"block_page_enabled": true}},
                {"id": "zero", "action": "block", "filters": ["dns"], "precedence": 4,
                 "traffic": "dns.fqdn == \"zero.example\"", "rule_settings": {"block_page_enabled": false}},
                {"id": "no-aaaa", "action": "block", "filters": ["dns"], "precedence": 5,
                 "traffic": "dns.query_rtype == \"AAAA\""},
                {"id": "ov", "action": "override", "filters": ["dns"], "precedence": 6,
                 "traffic": "dns.fqdn == \"ov.example\"", "rule_settings": {"override_ips": ["203.0.113.10"]}}]"#,
        );
        let a = alice();
        let bob = ClientCtx::from_ip("100.96.0.3".parse().unwrap());
        let d = |v: PolicyVerdict| v.decision;
        assert_eq!(
            d(ask(&r, &a, "www.games.example.", RecordType::A)),
            Decision::Block(BlockMode::Refused)
        );
        assert_eq!(
            d(ask(&r, &bob, "www.games.example.", RecordType::A)),
            Decision::Resolve
        );
        assert_eq!(
            d(ask(&r, &bob, "gone.example.", RecordType::A)),
            Decision::Block(BlockMode::NxDomain)
        );
        assert_eq!(
            d(ask(&r, &bob, "page.example.", RecordType::A)),
            Decision::Block(BlockMode::Address("192.0.2.80".parse().unwrap()))
        );
        assert_eq!(
            d(ask(&r, &bob, "zero.example.", RecordType::A)),
            Decision::Block(BlockMode::ZeroIp)
        );
        assert_eq!(
            d(ask(&r, &bob, "any.example.", RecordType::AAAA)),
            Decision::Block(BlockMode::Refused)
        );
        assert_eq!(
            d(ask(&r, &bob, "ov.example.", RecordType::A)),
            Decision::OverrideIps(vec!["203.0.113.10".parse().unwrap()])
        );
        let v = ask(&r, &a, "www.games.example.", RecordType::A);
        assert_eq!(v.rule.as_deref(), Some("eng-games (No games for eng)"));
    }

    #[test]
    fn safesearch_and_youtube_targets() {
        let n = |s: &str| Name::from_ascii(s).unwrap();
        let t = |s: &str| Some(Decision::SafeSearch(n(s)));
        assert_eq!(
            safe_search("www.google.co.uk."),
            t("forcesafesearch.google.com.")
        );
        assert_eq!(safe_search("google.com."), t("forcesafesearch.google.com."));
        assert_eq!(safe_search("www.bing.com."), t("strict.bing.com."));
        assert_eq!(safe_search("duckduckgo.com."), t("safe.duckduckgo.com."));
        assert_eq!(
            safe_search("yandex.ru."),
            Some(Decision::OverrideIps(vec![IpAddr::V4(YANDEX_SAFE)]))
        );
        assert_eq!(safe_search("www.youtube.com."), t("restrict.youtube.com."));
        assert_eq!(
            youtube("m.youtube.com.", true),
            t("restrictmoderate.youtube.com.")
        );
        assert_eq!(safe_search("maps.google.com."), None);
        assert_eq!(safe_search("www.google.example.org."), None);
        assert_eq!(youtube("www.example.com.", false), None);
    }
}
