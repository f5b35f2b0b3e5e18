//! The HTTP rules over a request: the fields of `policy-language.md` filled from the flow and the
//! request, and what the first matching rule asks for.
//!
//! The same [`Input`] that `waygate rules eval --filter http` builds from JSON is built here from
//! the traffic, and the same [`StagePolicy`] decides, so both agree.
//!
//! [`StagePolicy`]: waygate_policy::ruleset::StagePolicy

use std::net::SocketAddr;

use waygate_geoip::GeoIp;
use waygate_model::FlowCtx;
use waygate_policy::category_db::CategoryDb;
use waygate_policy::fields::{FieldId, Phase, Stage};
use waygate_policy::input::Input;
use waygate_policy::ruleset::{Action, CompiledRule, Decided};
use waygate_stages::policy::{fill_identity, Loaded};

/// What the rules decided for a request (or, before decryption, a TLS connection).
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Pass it on; `rule` is the allow rule that matched, if any.
    Allow {
        /// The matching rule.
        rule: Option<RuleRef>,
        /// `add_headers`: header names and the values to add.
        add_headers: Vec<(String, String)>,
    },
    /// Do Not Inspect: no decryption, no further HTTP rules, no HTTP log line.
    DoNotInspect(RuleRef),
    /// Blocked.
    Block {
        /// The matching rule.
        rule: RuleRef,
        /// `block_reason`.
        reason: Option<String>,
        /// `block_page.target_uri`: a 307 there instead of the built-in page.
        target_uri: Option<String>,
        /// `block_page.include_context`.
        include_context: bool,
    },
    /// Redirected.
    Redirect {
        /// The matching rule.
        rule: RuleRef,
        /// Where to.
        target_uri: String,
        /// Append the request's path and query to the target.
        preserve_path_and_query: bool,
        /// Append the context query parameters.
        include_context: bool,
    },
    /// A rule ranked above the match reads the response: decide again when it arrives.
    AwaitResponse,
}

/// The rule behind a decision, for pages and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// The action as written (`allow`, `block`, `isolate`, ...).
    pub action: String,
    /// `untrusted_cert.action` (`pass_through`, `block`, `error`), when set.
    pub untrusted_cert: Option<String>,
}

impl RuleRef {
    fn of(rule: &CompiledRule) -> RuleRef {
        RuleRef {
            id: rule.id.clone(),
            name: rule.name.clone(),
            action: rule.action_name.clone(),
            untrusted_cert: rule
                .settings
                .get("untrusted_cert")
                .and_then(|u| u.get("action"))
                .and_then(|a| a.as_str())
                .map(str::to_owned),
        }
    }
}

impl Verdict {
    /// The matching rule, if any.
    pub fn rule(&self) -> Option<&RuleRef> {
        match self {
            Verdict::Allow { rule, .. } => rule.as_ref(),
            Verdict::DoNotInspect(rule)
            | Verdict::Block { rule, .. }
            | Verdict::Redirect { rule, .. } => Some(rule),
            Verdict::AwaitResponse => None,
        }
    }

    /// The word for logs and counters.
    pub fn decision(&self) -> &'static str {
        match self {
            Verdict::Allow { .. } => "allow",
            Verdict::DoNotInspect(_) => "off",
            Verdict::Block { .. } => "block",
            Verdict::Redirect { .. } => "redirect",
            Verdict::AwaitResponse => "pending",
        }
    }
}

/// What a rule's action means for a request.
pub fn verdict_of(rule: Option<&CompiledRule>) -> Verdict {
    let Some(rule) = rule else {
        return Verdict::Allow {
            rule: None,
            add_headers: Vec::new(),
        };
    };
    let r = RuleRef::of(rule);
    match &rule.action {
        Action::Block(b) => Verdict::Block {
            rule: r,
            reason: b.reason.clone(),
            target_uri: b.target_uri.clone(),
            include_context: b.include_context,
        },
        Action::DoNotInspect => Verdict::DoNotInspect(r),
        Action::Redirect {
            target_uri,
            preserve_path_and_query,
            include_context,
        } => Verdict::Redirect {
            rule: r,
            target_uri: target_uri.clone(),
            preserve_path_and_query: *preserve_path_and_query,
            include_context: *include_context,
        },
        // allow, and the actions Waygate has no service for (isolate, noscan, quarantine):
        // documented to pass as allow.
        _ => Verdict::Allow {
            add_headers: add_headers(rule),
            rule: Some(r),
        },
    }
}

/// `add_headers` of a rule: a map of header name to a list of values (or one string).
fn add_headers(rule: &CompiledRule) -> Vec<(String, String)> {
    let Some(map) = rule.settings.get("add_headers").and_then(|h| h.as_object()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (name, values) in map {
        match values {
            serde_json::Value::Array(items) => out.extend(
                items
                    .iter()
                    .filter_map(|v| v.as_str())
                    .map(|v| (name.clone(), v.to_string())),
            ),
            serde_json::Value::String(v) => out.push((name.clone(), v.clone())),
            _ => {}
        }
    }
    out
}

/// Decides with what `input` holds, known up to `known` (`Request` or `Response`).
pub fn decide(loaded: &Loaded, input: &Input, known: Phase) -> Verdict {
    let stage = loaded.policy.stage(Stage::Http);
    match stage.decide(input, known, Phase::Response) {
        Decided::Final(rule) => verdict_of(rule),
        Decided::Wait(_) => Verdict::AwaitResponse,
    }
}

/// Sets the connection fields: source and destination, virtual network, geolocation, and the
/// user's identity and posture. A request to the explicit proxy (`proxy`: its endpoint's name)
/// has no device: `proxy.endpoint` is set, identity and posture stay empty, and the source is
/// the client's own address.
pub fn fill_conn(
    input: &mut Input,
    ctx: &FlowCtx,
    upstream: SocketAddr,
    geo: Option<&GeoIp>,
    proxy: Option<&str>,
) {
    input.clear();
    let public = match proxy {
        Some(_) => Some(ctx.src.ip()),
        None => ctx.device_public.map(|a| a.ip()),
    };
    input.set_ip(FieldId::HttpConnSrcIp, public.unwrap_or(ctx.src.ip()));
    input.set_ip(FieldId::HttpConnDstIp, upstream.ip());
    if let Some(vnet) = &ctx.device.vnet_id {
        input.set_str(FieldId::HttpConnVnetId, vnet);
    }
    if let Some(geo) = geo {
        if let Some(public) = public {
            let g = geo.lookup(public);
            if let Some(c) = g.country {
                input.set_str(FieldId::HttpSrcIpGeoCountry, c.as_str());
            }
            if let Some(c) = g.continent {
                input.set_str(FieldId::HttpSrcIpGeoContinent, c.as_str());
            }
        }
        let g = geo.lookup(upstream.ip());
        if let Some(c) = g.country {
            input.set_str(FieldId::HttpDstIpGeoCountry, c.as_str());
        }
        if let Some(c) = g.continent {
            input.set_str(FieldId::HttpDstIpGeoContinent, c.as_str());
        }
    }
    match proxy {
        Some(endpoint) => input.set_str(FieldId::ProxyEndpoint, endpoint),
        None => fill_identity(input, &ctx.device),
    }
}

/// Sets the host, its domains (filled by the input from the host) and its categories.
pub fn fill_host(input: &mut Input, host: &str, categories: Option<&CategoryDb>) {
    input.set_host(FieldId::HttpRequestHost, host);
    if let Some(db) = categories {
        let found = db.lookup(host);
        input.set_ints(FieldId::HttpRequestUriContentCategory, found.content);
        input.set_ints(FieldId::HttpRequestUriSecurityCategory, found.security);
    }
}

/// Sets the request line's fields: `uri` is the full URL, case kept.
pub fn fill_request(input: &mut Input, scheme: &str, host: &str, method: &str, pq: &str) {
    let (path, query) = pq.split_once('?').unwrap_or((pq, ""));
    input.set_str(FieldId::HttpRequestMethod, method);
    input.set_str(FieldId::HttpRequestUriPath, path);
    input.set_str(FieldId::HttpRequestUriQuery, query);
    input.set_str(FieldId::HttpRequestUriPathAndQuery, pq);
    input.set_str(FieldId::HttpRequestUri, &format!("{scheme}://{host}{pq}"));
}

/// A mebibyte: file sizes in rules are whole MiB (`http.upload.file.size >= 10`).
const MIB: u64 = 1024 * 1024;

/// Sets what an upload shows: `http.body_phase = "upload"`, the file types detected in its
/// first bytes (also in the deprecated upper-case singular form) and, when the request says
/// its length, the size in whole MiB.
pub fn fill_upload(input: &mut Input, types: &[&str], length: Option<u64>) {
    fill_body(
        input,
        "upload",
        [
            FieldId::HttpUploadFileTypes,
            FieldId::HttpUploadFileType,
            FieldId::HttpUploadFileSize,
        ],
        types,
        length,
    );
}

/// Sets what a download shows, as [`fill_upload`] does for uploads; the body phase becomes
/// `"download"`.
pub fn fill_download(input: &mut Input, types: &[&str], length: Option<u64>) {
    fill_body(
        input,
        "download",
        [
            FieldId::HttpDownloadFileTypes,
            FieldId::HttpDownloadFileType,
            FieldId::HttpDownloadFileSize,
        ],
        types,
        length,
    );
}

fn fill_body(
    input: &mut Input,
    phase: &str,
    [types_field, type_field, size_field]: [FieldId; 3],
    types: &[&str],
    length: Option<u64>,
) {
    input.set_str(FieldId::HttpBodyPhase, phase);
    if !types.is_empty() {
        input.set_strs(types_field, types.iter().copied());
        let upper: Vec<String> = types.iter().map(|t| t.to_ascii_uppercase()).collect();
        input.set_strs(type_field, upper.iter().map(String::as_str));
    }
    if let Some(len) = length {
        input.set_int(size_field, i64::try_from(len / MIB).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use waygate_policy::ruleset::{Lists, RuleSet};

    use super::*;

    pub(crate) fn loaded(rules: &str) -> Loaded {
        let set = RuleSet::from_json(rules).expect("rules");
        Loaded::compile(&set, &Lists::new(Vec::new())).expect("compile")
    }

    const RULES: &str = r#"[
      {"id": "dni", "name": "bank", "action": "off", "enabled": true, "precedence": 50,
       "filters": ["http"], "traffic": "any(http.request.domains[*] == \"bank.example\")"},
      {"id": "path", "name": "no admin", "action": "block", "enabled": true, "precedence": 1,
       "filters": ["http"], "traffic": "http.request.uri.path matches \"^/admin\"",
       "rule_settings": {"block_reason": "admin pages are closed"}},
      {"id": "status", "name": "no 404s", "action": "block", "enabled": true, "precedence": 2,
       "filters": ["http"], "traffic": "http.response.status_code == 404"},
      {"id": "hdr", "name": "tag", "action": "allow", "enabled": true, "precedence": 3,
       "filters": ["http"], "traffic": "http.request.host == \"tag.example\"",
       "rule_settings": {"add_headers": {"X-Waygate": ["one", "two"]}}},
      {"id": "go", "name": "move", "action": "redirect", "enabled": true, "precedence": 4,
       "filters": ["http"], "traffic": "http.request.uri == \"http://old.example/x?y=1\"",
       "rule_settings": {"redirect": {"target_uri": "https://new.example/",
                                      "preserve_path_and_query": true}}}
    ]"#;

    fn request(host: &str, pq: &str, status: Option<i64>) -> Verdict {
        let rules = loaded(RULES);
        let mut input = Input::new();
        fill_host(&mut input, host, None);
        fill_request(&mut input, "http", host, "GET", pq);
        let known = match status {
            Some(s) => {
                input.set_int(FieldId::HttpResponseStatusCode, s);
                Phase::Response
            }
            None => Phase::Request,
        };
        decide(&rules, &input, known)
    }

    #[test]
    fn body_fields_fill_the_singular_type_the_phase_and_the_size() {
        let rules = loaded(
            r#"[
          {"id": "big", "name": "big uploads", "action": "block", "enabled": true,
           "precedence": 1, "filters": ["http"],
           "traffic": "http.body_phase == \"upload\" and http.upload.file.size >= 10"},
          {"id": "old", "name": "old exe rule", "action": "block", "enabled": true,
           "precedence": 2, "filters": ["http"],
           "traffic": "http.body_phase == \"download\" and http.download.file.type in {\"EXE\" \"ZIP\"}"}
        ]"#,
        );
        let decided = |input: &Input, known| decide(&rules, input, known).decision();
        // A 9.5 MiB upload is 9: the download rule waits for the response, which is an exe.
        let mut input = Input::new();
        fill_upload(&mut input, &["pdf"], Some(9 * MIB + MIB / 2));
        assert_eq!(decided(&input, Phase::Request), "pending");
        fill_download(&mut input, &["exe"], None);
        assert_eq!(decided(&input, Phase::Response), "block");
        // A 10 MiB upload is blocked with the request.
        let mut input = Input::new();
        fill_upload(&mut input, &[], Some(10 * MIB));
        assert_eq!(decided(&input, Phase::Request), "block");
        // In the download phase the upload condition no longer holds.
        fill_download(&mut input, &["pdf"], Some(1));
        assert_eq!(decided(&input, Phase::Response), "allow");
    }

    #[test]
    fn rules_decide_in_cloudflares_order() {
        // Do Not Inspect first, whatever its precedence.
        assert_eq!(
            request("www.bank.example", "/admin", None).decision(),
            "off"
        );
        let v = request("a.example", "/admin/users", None);
        assert!(
            matches!(&v, Verdict::Block { rule, reason, .. } if rule.id == "path" && reason.as_deref() == Some("admin pages are closed")),
            "{v:?}"
        );
        // A response-phase rule ranked above every match: wait for the response.
        assert_eq!(request("a.example", "/", None), Verdict::AwaitResponse);
        assert_eq!(request("a.example", "/", Some(404)).decision(), "block");
        assert_eq!(request("a.example", "/", Some(200)).decision(), "allow");
        match request("tag.example", "/", Some(200)) {
            Verdict::Allow { rule, add_headers } => {
                assert_eq!(rule.map(|r| r.id), Some("hdr".into()));
                assert_eq!(
                    add_headers,
                    vec![
                        ("X-Waygate".to_string(), "one".to_string()),
                        ("X-Waygate".to_string(), "two".to_string())
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
        // The URL is case-sensitive and carries the query.
        assert_eq!(
            request("old.example", "/x?y=1", Some(200)).decision(),
            "redirect"
        );
        assert_eq!(
            request("old.example", "/X?y=1", Some(200)).decision(),
            "allow"
        );
    }
}
